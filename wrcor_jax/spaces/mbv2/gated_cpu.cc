// The project's gated 1x1 conv of a tile of rows, and its backward, for XLA:CPU (XLA FFI
// custom calls). For rows h (N, R, Cw), the SE gate (N, Cw) and the kernel W (Cw, Co):
//   forward    y = (relu(h) gate) W,  and  s = the sum of y's rows                  (Co,)
//   backward   D = (g + ds) W^T,  dh = [h > 0] D gate,  dgate = sum over rows of D relu(h)
// XLA:CPU wrote relu(h) gate out full size before the product, and D before the mask and the
// gate's sums: on large images those passes over the wide rows cost as much as the product.
// Here each chunk of rows is gated, multiplied and read back while in cache, over the
// kernel's nonzero block only (the engine pads it with zeros to the bucket widths), and
// forward over the rows the gate leaves nonzero (the image's padding rows are 0; checking
// h's rows in the backward cost a cache miss per row, more than the product saved). The
// sums are added in double per part of the rows (a part never spans two images) and merged
// in a fixed order, so the results do not depend on the threads.

#include <algorithm>
#include <cstdint>
#include <vector>

#include "native_cpu.h"

namespace {

constexpr int64_t kChunk = 128;  // rows gated at a time (a multiple of kRows)

struct Layout {
  int64_t n, rows, cw, co, part_rows, parts_per_image;

  int64_t Parts() const { return n * parts_per_image; }
  int64_t Image(int64_t part) const { return part / parts_per_image; }
  // The part's rows [Start, Stop), numbered over all images' rows.
  int64_t Start(int64_t part) const {
    return Image(part) * rows + part % parts_per_image * part_rows;
  }
  int64_t Stop(int64_t part) const {
    return std::min((Image(part) + 1) * rows, Start(part) + part_rows);
  }
};

Layout MakeLayout(int64_t n, int64_t rows, int64_t cw, int64_t co) {
  const int64_t per_image = std::max<int64_t>(1, (kParts + n - 1) / n);
  const int64_t chunks = std::max<int64_t>(1, (rows + kChunk - 1) / kChunk);
  const int64_t part_rows = (chunks + per_image - 1) / per_image * kChunk;
  return Layout{n, rows, cw, co, part_rows,
                std::max<int64_t>(1, (rows + part_rows - 1) / part_rows)};
}

template <typename T>
void Forward(ffi::ThreadPool& pool, const Layout& l, const T* h, const T* gate, const T* kernel,
             T* y, T* sums) {
  const Operand<T> w = NonzeroOperand(kernel, l.cw, l.co, false);
  std::vector<std::vector<double>> partial(l.Parts(), std::vector<double>(l.co));
  ParallelFor(pool, l.Parts(), [&](int64_t part) {
    const T* g = gate + l.Image(part) * l.cw;
    double* sum = partial[part].data();
    auto gated = [&](int64_t row, T* into) {
      const T* x = h + row * l.cw;
      int nonzero = 0;  // not a bool, nor read back from `into`: so that GCC vectorizes
      for (int64_t i = 0; i < w.inner; ++i) {
        const T v = std::max(x[i], T(0)) * g[i];
        into[i] = v;
        nonzero |= v != T(0);
      }
      return nonzero != 0;
    };
    auto keep = [&](int64_t row, const T* product) {
      w.Keep(product, y + row * l.co, l.co);
      for (int64_t j = 0; j < w.live; ++j) sum[j] += product[j];
    };
    ChunkProducts(l.Start(part), l.Stop(part), kChunk, w, gated, keep);
  });
  MergeParts(partial, l.co, sums);
}

template <typename T>
void Backward(ffi::ThreadPool& pool, const Layout& l, const T* h, const T* gate,
              const T* kernel, const T* g, const T* d_sums, T* d_h, T* d_gate) {
  const Operand<T> w_t = NonzeroOperand(kernel, l.cw, l.co, true);
  std::vector<std::vector<double>> partial(l.Parts(), std::vector<double>(l.cw));
  ParallelFor(pool, l.Parts(), [&](int64_t part) {
    const T* gi = gate + l.Image(part) * l.cw;
    double* sum = partial[part].data();
    auto cotangent = [&](int64_t row, T* into) {
      const T* g_row = g + row * l.co;
      for (int64_t j = 0; j < w_t.inner; ++j) into[j] = g_row[j] + d_sums[j];
      return true;
    };
    auto spread = [&](int64_t row, const T* d) {
      const T* x = h + row * l.cw;
      T* dx = d_h + row * l.cw;
      for (int64_t i = 0; i < w_t.live; ++i) {
        dx[i] = x[i] > T(0) ? d[i] * gi[i] : T(0);
        sum[i] += d[i] * std::max(x[i], T(0));
      }
      std::fill(dx + w_t.live, dx + l.cw, T(0));
    };
    ChunkProducts(l.Start(part), l.Stop(part), kChunk, w_t, cotangent, spread);
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

// h (N, R, Cw), gate (N, Cw), kernel (Cw, Co), all of one type; `l` is filled in.
ffi::Error Check(ffi::AnyBuffer h, ffi::AnyBuffer gate, ffi::AnyBuffer kernel, Layout& l) {
  const auto d = h.dimensions(), kd = kernel.dimensions();
  const ffi::DataType type = h.element_type();
  if (d.size() != 3 || kd.size() != 2 || !Shaped(gate, {d[0], d[2]}, type) ||
      !Shaped(kernel, {d[2], kd[1]}, type)) {
    return ffi::Error::InvalidArgument("gated product: expected (N, R, Cw), (N, Cw), (Cw, Co)");
  }
  l = MakeLayout(d[0], d[1], d[2], kd[1]);
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
  return ForFloatType(type, "gated product", [&](auto zero) {
    using T = decltype(zero);
    Forward(pool, l, h.typed_data<T>(), gate.typed_data<T>(), kernel.typed_data<T>(),
            y->typed_data<T>(), sums->typed_data<T>());
  });
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
  return ForFloatType(type, "gated product", [&](auto zero) {
    using T = decltype(zero);
    Backward(pool, l, h.typed_data<T>(), gate.typed_data<T>(), kernel.typed_data<T>(),
             g.typed_data<T>(), d_sums.typed_data<T>(), d_h->typed_data<T>(),
             d_gate->typed_data<T>());
  });
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
