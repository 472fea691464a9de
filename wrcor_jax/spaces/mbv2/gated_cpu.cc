// The project's gated 1x1 conv of a tile of rows, and its backward, for XLA:CPU (XLA FFI
// custom calls). For rows h (N, R, Cw), the SE gate (N, Cw) and the kernel W (Cw, Co):
//   forward    y = (relu(h) gate) W,  and  s = the sum of y's rows                  (Co,)
//   backward   D = (g + ds) W^T,  dh = [h > 0] D gate,  dgate = sum over rows of D relu(h)
// XLA:CPU wrote relu(h) gate out full size before the product, and D before the mask and the
// gate's sums: on large images those passes over the wide rows cost as much as the product.
// Here each chunk of rows is gated, multiplied and read back while in cache. The sums are
// added in double per part of the rows (a part never spans two images) and merged in a
// fixed order, so the results do not depend on the threads.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "native_cpu.h"

namespace {

constexpr int64_t kChunk = 128;  // rows gated at a time (a multiple of kRows)
constexpr int64_t kParts = 16;   // at least, where the images' rows allow, for the threads

struct Layout {
  int64_t n, rows, cw, co, cwp, cop, part_rows, parts_per_image;

  int64_t Parts() const { return n * parts_per_image; }
  int64_t Image(int64_t part) const { return part / parts_per_image; }
  int64_t First(int64_t part) const { return part % parts_per_image * part_rows; }
  int64_t End(int64_t part) const { return std::min(rows, First(part) + part_rows); }
};

template <typename T>
Layout MakeLayout(int64_t n, int64_t rows, int64_t cw, int64_t co) {
  const int64_t per_image = std::max<int64_t>(1, (kParts + n - 1) / n);
  const int64_t chunks = std::max<int64_t>(1, (rows + kChunk - 1) / kChunk);
  const int64_t part_rows = (chunks + per_image - 1) / per_image * kChunk;
  return Layout{n, rows, cw, co, Padded<T>(cw), Padded<T>(co), part_rows,
                std::max<int64_t>(1, (rows + part_rows - 1) / part_rows)};
}

// m (r, c) into a zeroed (rp, cp) copy, transposed when asked.
template <typename T>
std::vector<T> PaddedMatrix(const T* m, int64_t r, int64_t c, int64_t rp, int64_t cp,
                            bool transposed) {
  std::vector<T> out(transposed ? cp * rp : rp * cp, T(0));
  for (int64_t i = 0; i < r; ++i) {
    for (int64_t j = 0; j < c; ++j) {
      (transposed ? out[j * rp + i] : out[i * cp + j]) = m[i * c + j];
    }
  }
  return out;
}

template <typename T>
void Forward(ffi::ThreadPool& pool, const Layout& l, const T* h, const T* gate, const T* kernel,
             T* y, T* sums) {
  const std::vector<T> w = PaddedMatrix(kernel, l.cw, l.co, l.cwp, l.cop, false);
  std::vector<std::vector<double>> partial(l.Parts(), std::vector<double>(l.co));
  ParallelFor(pool, l.Parts(), [&](int64_t part) {
    std::vector<T> a(kChunk * l.cwp, T(0)), out(kChunk * l.cop);
    const int64_t image = l.Image(part), end = l.End(part);
    const T* g = gate + image * l.cw;
    for (int64_t r0 = l.First(part); r0 < end; r0 += kChunk) {
      const int64_t count = std::min(kChunk, end - r0), used = (count + kRows - 1) / kRows * kRows;
      for (int64_t k = 0; k < count; ++k) {
        T* into = a.data() + k * l.cwp;
        const T* row = h + ((image * l.rows) + r0 + k) * l.cw;
        for (int64_t i = 0; i < l.cw; ++i) into[i] = std::max(row[i], T(0)) * g[i];
      }
      std::fill(a.begin() + count * l.cwp, a.begin() + used * l.cwp, T(0));
      Product(a.data(), used, l.cwp, w.data(), l.cop, out.data());
      for (int64_t k = 0; k < count; ++k) {
        const T* row = out.data() + k * l.cop;
        std::memcpy(y + ((image * l.rows) + r0 + k) * l.co, row, l.co * sizeof(T));
        for (int64_t j = 0; j < l.co; ++j) partial[part][j] += row[j];
      }
    }
  });
  for (int64_t j = 0; j < l.co; ++j) {
    double sum = 0;
    for (const std::vector<double>& part : partial) sum += part[j];
    sums[j] = static_cast<T>(sum);
  }
}

template <typename T>
void Backward(ffi::ThreadPool& pool, const Layout& l, const T* h, const T* gate,
              const T* kernel, const T* g, const T* d_sums, T* d_h, T* d_gate) {
  const std::vector<T> w_t = PaddedMatrix(kernel, l.cw, l.co, l.cwp, l.cop, true);
  std::vector<std::vector<double>> partial(l.Parts(), std::vector<double>(l.cw));
  ParallelFor(pool, l.Parts(), [&](int64_t part) {
    std::vector<T> a(kChunk * l.cop, T(0)), d(kChunk * l.cwp);
    const int64_t image = l.Image(part), end = l.End(part);
    const T* gi = gate + image * l.cw;
    for (int64_t r0 = l.First(part); r0 < end; r0 += kChunk) {
      const int64_t count = std::min(kChunk, end - r0), used = (count + kRows - 1) / kRows * kRows;
      for (int64_t k = 0; k < count; ++k) {
        T* into = a.data() + k * l.cop;
        const T* row = g + ((image * l.rows) + r0 + k) * l.co;
        for (int64_t j = 0; j < l.co; ++j) into[j] = row[j] + d_sums[j];
      }
      std::fill(a.begin() + count * l.cop, a.begin() + used * l.cop, T(0));
      Product(a.data(), used, l.cop, w_t.data(), l.cwp, d.data());
      for (int64_t k = 0; k < count; ++k) {
        const int64_t at = ((image * l.rows) + r0 + k) * l.cw;
        const T* dk = d.data() + k * l.cwp;
        for (int64_t i = 0; i < l.cw; ++i) {
          const T hv = h[at + i];
          d_h[at + i] = hv > T(0) ? dk[i] * gi[i] : T(0);
          partial[part][i] += dk[i] * std::max(hv, T(0));
        }
      }
    }
  });
  for (int64_t image = 0; image < l.n; ++image) {
    for (int64_t i = 0; i < l.cw; ++i) {
      double sum = 0;
      for (int64_t p = 0; p < l.parts_per_image; ++p) {
        sum += partial[image * l.parts_per_image + p][i];
      }
      d_gate[image * l.cw + i] = static_cast<T>(sum);
    }
  }
}

bool Shaped(ffi::AnyBuffer b, std::initializer_list<int64_t> dims, ffi::DataType type) {
  const auto d = b.dimensions();
  return b.element_type() == type && std::equal(d.begin(), d.end(), dims.begin(), dims.end());
}

// h (N, R, Cw), gate (N, Cw), kernel (Cw, Co), all of one type; `l` is filled in.
ffi::Error Check(ffi::AnyBuffer h, ffi::AnyBuffer gate, ffi::AnyBuffer kernel, Layout& l) {
  const auto d = h.dimensions(), kd = kernel.dimensions();
  const ffi::DataType type = h.element_type();
  if (d.size() != 3 || kd.size() != 2 || !Shaped(gate, {d[0], d[2]}, type) ||
      !Shaped(kernel, {d[2], kd[1]}, type)) {
    return ffi::Error::InvalidArgument("gated product: expected (N, R, Cw), (N, Cw), (Cw, Co)");
  }
  if (type == ffi::DataType::F64) {
    l = MakeLayout<double>(d[0], d[1], d[2], kd[1]);
  } else if (type == ffi::DataType::F32) {
    l = MakeLayout<float>(d[0], d[1], d[2], kd[1]);
  } else {
    return ffi::Error::InvalidArgument("gated product: float32 or float64 only");
  }
  return ffi::Error::Success();
}

ffi::Error GatedProduct(ffi::ThreadPool pool, ffi::AnyBuffer h, ffi::AnyBuffer gate,
                        ffi::AnyBuffer kernel, ffi::Result<ffi::AnyBuffer> y,
                        ffi::Result<ffi::AnyBuffer> sums) {
  Layout l;
  if (ffi::Error error = Check(h, gate, kernel, l); error.failure()) return error;
  const ffi::DataType type = h.element_type();
  if (!Shaped(*y, {l.n, l.rows, l.co}, type) || !Shaped(*sums, {l.co}, type)) {
    return ffi::Error::InvalidArgument("gated product: expected (N, R, Co) and (Co,) results");
  }
  if (type == ffi::DataType::F64) {
    Forward(pool, l, h.typed_data<double>(), gate.typed_data<double>(),
            kernel.typed_data<double>(), y->typed_data<double>(), sums->typed_data<double>());
  } else {
    Forward(pool, l, h.typed_data<float>(), gate.typed_data<float>(),
            kernel.typed_data<float>(), y->typed_data<float>(), sums->typed_data<float>());
  }
  return ffi::Error::Success();
}

// g (N, R, Co) and d_sums (Co,): the cotangents of y and of its sums.
ffi::Error GatedProductBackward(ffi::ThreadPool pool, ffi::AnyBuffer h, ffi::AnyBuffer gate,
                                ffi::AnyBuffer kernel, ffi::AnyBuffer g, ffi::AnyBuffer d_sums,
                                ffi::Result<ffi::AnyBuffer> d_h,
                                ffi::Result<ffi::AnyBuffer> d_gate) {
  Layout l;
  if (ffi::Error error = Check(h, gate, kernel, l); error.failure()) return error;
  const ffi::DataType type = h.element_type();
  const bool shaped = Shaped(g, {l.n, l.rows, l.co}, type) && Shaped(d_sums, {l.co}, type) &&
                      Shaped(*d_h, {l.n, l.rows, l.cw}, type) &&
                      Shaped(*d_gate, {l.n, l.cw}, type);
  if (!shaped) return ffi::Error::InvalidArgument("gated product: cotangents of other shapes");
  if (type == ffi::DataType::F64) {
    Backward(pool, l, h.typed_data<double>(), gate.typed_data<double>(),
             kernel.typed_data<double>(), g.typed_data<double>(), d_sums.typed_data<double>(),
             d_h->typed_data<double>(), d_gate->typed_data<double>());
  } else {
    Backward(pool, l, h.typed_data<float>(), gate.typed_data<float>(),
             kernel.typed_data<float>(), g.typed_data<float>(), d_sums.typed_data<float>(),
             d_h->typed_data<float>(), d_gate->typed_data<float>());
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(WrcorGatedProduct, GatedProduct,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(WrcorGatedProductBackward, GatedProductBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());
