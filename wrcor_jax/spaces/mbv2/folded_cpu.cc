// The expand's folded conv (BatchNorm folded into the 1x1 conv) on a tile of rows and its
// backward, for XLA:CPU (XLA FFI custom calls). For the centred input c = (x - mean) (N, R,
// Ci), 0 on the padding rows, the kernel W scale (Ci, Co) and the tile's real rows (mask):
//   forward   z = c (W scale) + bias                 (N, R, Co), 0 on the other rows
// and for the output's cotangent g:
//   d_centred = g (W scale)^T        (N, R, Ci), 0 on the other rows
//   sums      = [sum g (z - bias), sum g]   over the real rows                     (2, Co)
// (the scale's gradient is the first over the scale, the bias's the second). The sums also
// come alone, for the BatchNorms whose conv's backward is another call (after the
// depthwise conv, on the 1x1 tiles).
// XLA:CPU ran the products over the padded widths and rows, and read the wide g once for
// the sums and again for the product; here each chunk of rows is summed and multiplied
// while in cache, over the real rows and the kernel's nonzero block only (the engine pads
// it with zeros to the bucket widths). The sums are added in double per part of the rows
// and merged in order, so the results do not depend on the threads.

#include <algorithm>
#include <cstdint>
#include <vector>

#include "native_cpu.h"

namespace {

constexpr int64_t kChunk = 128;  // rows multiplied at a time (a multiple of kRows)

template <typename T>
void Forward(ffi::ThreadPool& pool, int64_t n, int64_t rows, int64_t ci, int64_t co,
             const T* centred, const T* kernel, const T* bias, const int32_t* mask, T* z) {
  const int64_t count = n * rows;
  const int64_t part_rows = PartRows(count, kChunk), parts = (count + part_rows - 1) / part_rows;
  const Operand<T> w = NonzeroOperand(kernel, ci, co, false);
  ParallelFor(pool, parts, [&](int64_t part) {
    auto read = [&](int64_t q, T* into) {
      if (!mask[q % rows]) return false;
      std::copy(centred + q * ci, centred + q * ci + w.inner, into);
      return true;
    };
    auto keep = [&](int64_t q, const T* product) {
      T* z_row = z + q * co;
      if (!mask[q % rows]) {
        std::fill(z_row, z_row + co, T(0));
        return;
      }
      for (int64_t j = 0; j < w.live; ++j) z_row[j] = product[j] + bias[j];
      std::copy(bias + w.live, bias + co, z_row + w.live);
    };
    const int64_t start = part * part_rows, stop = std::min(count, start + part_rows);
    ChunkProducts(start, stop, kChunk, w, read, keep);
  });
}

// Row q's terms of the sums over the real rows: scaled += g (z - bias), plain += g.
template <typename T>
void AddSums(const T* g_row, const T* z_row, const T* bias, int64_t co, double* scaled,
             double* plain) {
  for (int64_t j = 0; j < co; ++j) {
    scaled[j] += g_row[j] * (z_row[j] - bias[j]);
    plain[j] += g_row[j];
  }
}

// The sums alone, for a BatchNorm whose conv's backward is another call's (after the
// depthwise conv, on the 1x1 tiles): XLA:CPU read g three times for them, at under half
// this VM's copy rate.
template <typename T>
void Sums(ffi::ThreadPool& pool, int64_t n, int64_t rows, int64_t co, const T* g, const T* z,
          const T* bias, const int32_t* mask, T* sums) {
  const int64_t count = n * rows;
  const int64_t part_rows = PartRows(count, kChunk), parts = (count + part_rows - 1) / part_rows;
  std::vector<std::vector<double>> partial(parts, std::vector<double>(2 * co));
  ParallelFor(pool, parts, [&](int64_t part) {
    double* scaled = partial[part].data();
    const int64_t start = part * part_rows, stop = std::min(count, start + part_rows);
    for (int64_t q = start; q < stop; ++q) {
      if (mask[q % rows]) AddSums(g + q * co, z + q * co, bias, co, scaled, scaled + co);
    }
  });
  MergeParts(partial, 2 * co, sums);
}

template <typename T>
void Cotangent(ffi::ThreadPool& pool, int64_t n, int64_t rows, int64_t ci, int64_t co,
               const T* g, const T* z, const T* kernel, const T* bias, const int32_t* mask,
               T* d_centred, T* sums) {
  const int64_t count = n * rows;
  const int64_t part_rows = PartRows(count, kChunk), parts = (count + part_rows - 1) / part_rows;
  const Operand<T> w_t = NonzeroOperand(kernel, ci, co, true);
  std::vector<std::vector<double>> partial(parts, std::vector<double>(2 * co));
  ParallelFor(pool, parts, [&](int64_t part) {
    double* scaled = partial[part].data();
    double* plain = scaled + co;
    auto read = [&](int64_t q, T* into) {
      if (!mask[q % rows]) return false;
      AddSums(g + q * co, z + q * co, bias, co, scaled, plain);
      std::copy(g + q * co, g + q * co + w_t.inner, into);
      return true;
    };
    auto keep = [&](int64_t q, const T* product) {
      w_t.Keep(product, d_centred + q * ci, ci);
    };
    const int64_t start = part * part_rows, stop = std::min(count, start + part_rows);
    ChunkProducts(start, stop, kChunk, w_t, read, keep);
  });
  MergeParts(partial, 2 * co, sums);
}

// centred (N, R, Ci), kernel (Ci, Co) times the scale, bias (Co,), mask (R,): which rows of
// the tile are real; result z (N, R, Co).
ffi::Error FoldedConv(ffi::ThreadPool pool, ffi::AnyBuffer centred, ffi::AnyBuffer kernel,
                      ffi::AnyBuffer bias, ffi::Buffer<ffi::S32> mask,
                      ffi::Result<ffi::AnyBuffer> z) {
  const auto d = centred.dimensions(), kd = kernel.dimensions();
  const ffi::DataType type = centred.element_type();
  if (d.size() != 3 || kd.size() != 2) {
    return ffi::Error::InvalidArgument("folded conv: expected (N, R, Ci) and (Ci, Co)");
  }
  const int64_t n = d[0], rows = d[1], ci = d[2], co = kd[1];
  const bool shaped = Shaped(kernel, {ci, co}, type) && Shaped(bias, {co}, type) &&
                      mask.element_count() == size_t(rows) && Shaped(*z, {n, rows, co}, type);
  if (!shaped) return ffi::Error::InvalidArgument("folded conv: arguments of other shapes");
  const int32_t* real = mask.typed_data();
  return ForFloatType(type, "folded conv", [&](auto zero) {
    using T = decltype(zero);
    Forward(pool, n, rows, ci, co, centred.typed_data<T>(), kernel.typed_data<T>(),
            bias.typed_data<T>(), real, z->typed_data<T>());
  });
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
  return ForFloatType(type, "folded conv", [&](auto zero) {
    using T = decltype(zero);
    Cotangent(pool, n, rows, ci, co, g.typed_data<T>(), z.typed_data<T>(), kernel.typed_data<T>(),
              bias.typed_data<T>(), real, d_centred->typed_data<T>(), sums->typed_data<T>());
  });
}

// g and z (N, R, Co), bias (Co,), mask (R,): which rows of the tile are real; result sums
// (2, Co), as FoldedConvCotangent's.
ffi::Error CotangentSums(ffi::ThreadPool pool, ffi::AnyBuffer g, ffi::AnyBuffer z,
                         ffi::AnyBuffer bias, ffi::Buffer<ffi::S32> mask,
                         ffi::Result<ffi::AnyBuffer> sums) {
  const auto d = g.dimensions();
  const ffi::DataType type = g.element_type();
  if (d.size() != 3) return ffi::Error::InvalidArgument("cotangent sums: expected (N, R, Co)");
  const int64_t n = d[0], rows = d[1], co = d[2];
  const bool shaped = Shaped(z, {n, rows, co}, type) && Shaped(bias, {co}, type) &&
                      mask.element_count() == size_t(rows) && Shaped(*sums, {2, co}, type);
  if (!shaped) return ffi::Error::InvalidArgument("cotangent sums: arguments of other shapes");
  return ForFloatType(type, "cotangent sums", [&](auto zero) {
    using T = decltype(zero);
    Sums(pool, n, rows, co, g.typed_data<T>(), z.typed_data<T>(), bias.typed_data<T>(),
         mask.typed_data(), sums->typed_data<T>());
  });
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(WrcorFoldedConv, FoldedConv,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(WrcorCotangentSums, CotangentSums,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>());
