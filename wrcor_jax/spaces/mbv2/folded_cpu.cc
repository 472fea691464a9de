// The backward of the expand's folded conv (BatchNorm folded into the 1x1 conv) on a tile of
// rows, for XLA:CPU (an XLA FFI custom call). For the output's cotangent g and the output
// z = (x - mean) (W scale) + bias, both (N, R, Co), on the tile's real rows (mask):
//   d_centred = g (W scale)^T        (N, R, Ci), 0 on the other rows
//   sums      = [sum g (z - bias), sum g]   over the real rows                     (2, Co)
// (the scale's gradient is the first over the scale, the bias's the second). XLA:CPU read
// the wide g once for the sums and again for the product; here each chunk of rows is
// summed and multiplied while in cache. The sums are added in double per part of the rows
// and merged in order, so the results do not depend on the threads.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "native_cpu.h"

namespace {

constexpr int64_t kChunk = 128;  // rows multiplied at a time (a multiple of kRows)

template <typename T>
void Cotangent(ffi::ThreadPool& pool, int64_t n, int64_t rows, int64_t ci, int64_t co,
               const T* g, const T* z, const T* kernel, const T* bias, const int32_t* mask,
               T* d_centred, T* sums) {
  const int64_t cip = Padded<T>(ci), cop = Padded<T>(co), count = n * rows;
  const int64_t part_rows = PartRows(count, kChunk), parts = (count + part_rows - 1) / part_rows;
  const std::vector<T> w_t = PaddedMatrix(kernel, ci, co, cip, cop, true);
  std::vector<std::vector<double>> partial(parts, std::vector<double>(2 * co));
  ParallelFor(pool, parts, [&](int64_t part) {
    double* scaled = partial[part].data();
    double* plain = scaled + co;
    auto read = [&](int64_t q, T* into) {
      if (!mask[q % rows]) {
        std::fill(into, into + co, T(0));
        return;
      }
      const T* g_row = g + q * co;
      const T* z_row = z + q * co;
      for (int64_t j = 0; j < co; ++j) {
        into[j] = g_row[j];
        scaled[j] += g_row[j] * (z_row[j] - bias[j]);
        plain[j] += g_row[j];
      }
    };
    auto keep = [&](int64_t q, const T* product) {
      std::memcpy(d_centred + q * ci, product, ci * sizeof(T));
    };
    const int64_t start = part * part_rows, stop = std::min(count, start + part_rows);
    ChunkProducts(start, stop, kChunk, cop, w_t.data(), cip, read, keep);
  });
  MergeParts(partial, 2 * co, sums);
}

// g and z (N, R, Co), kernel (Ci, Co) times the scale, bias (Co,), mask (R,): which rows of
// the tile are real; results d_centred (N, R, Ci) and sums (2, Co).
ffi::Error FoldedConvCotangent(ffi::ThreadPool pool, ffi::AnyBuffer g, ffi::AnyBuffer z,
                               ffi::AnyBuffer kernel, ffi::AnyBuffer bias,
                               ffi::Buffer<ffi::S32> mask, ffi::Result<ffi::AnyBuffer> d_centred,
                               ffi::Result<ffi::AnyBuffer> sums) {
  const auto d = g.dimensions(), kd = kernel.dimensions();
  const ffi::DataType type = g.element_type();
  if (d.size() != 3 || kd.size() != 2) {
    return ffi::Error::InvalidArgument("folded conv: expected (N, R, Co) and (Ci, Co)");
  }
  const int64_t n = d[0], rows = d[1], co = d[2], ci = kd[0];
  const bool shaped = Shaped(z, {n, rows, co}, type) && Shaped(kernel, {ci, co}, type) &&
                      Shaped(bias, {co}, type) && mask.element_count() == size_t(rows) &&
                      Shaped(*d_centred, {n, rows, ci}, type) && Shaped(*sums, {2, co}, type);
  if (!shaped) return ffi::Error::InvalidArgument("folded conv: arguments of other shapes");
  const int32_t* real = mask.typed_data();
  if (type == ffi::DataType::F64) {
    Cotangent(pool, n, rows, ci, co, g.typed_data<double>(), z.typed_data<double>(),
              kernel.typed_data<double>(), bias.typed_data<double>(), real,
              d_centred->typed_data<double>(), sums->typed_data<double>());
  } else if (type == ffi::DataType::F32) {
    Cotangent(pool, n, rows, ci, co, g.typed_data<float>(), z.typed_data<float>(),
              kernel.typed_data<float>(), bias.typed_data<float>(), real,
              d_centred->typed_data<float>(), sums->typed_data<float>());
  } else {
    return ffi::Error::InvalidArgument("folded conv: float32 or float64 only");
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(WrcorFoldedConvCotangent, FoldedConvCotangent,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());
