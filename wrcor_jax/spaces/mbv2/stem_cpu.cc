// The stem's first convolution, on the images, for XLA:CPU (an XLA FFI custom call).
//
// NHWC images of a few channels, a k x k kernel (k, k, Ci, Co), stride t, zero padding
// k / 2 (torch's):  out(n, y, x) = sum_{dy, dx, ci} img(n, t y + dy - k/2, t x + dx - k/2, ci)
// * kernel(dy, dx, ci). XLA:CPU ran it at 15 GFLOP/s here (3 input channels starve its
// product); this holds an output pixel's channels in registers and adds the taps inside the
// image, in a fixed order.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "native_cpu.h"

namespace {

constexpr int64_t kMaxVectors = 4;  // output channels held in registers at once

struct Shape {
  int64_t n, h, w, ci, k, co, stride, h_out, w_out;

  // The output channels padded to a whole number of vectors of T.
  template <typename T>
  int64_t CoPadded() const {
    return (co + kLanes<T> - 1) / kLanes<T> * kLanes<T>;
  }
};

// Output pixel (image, y, x), channels [c0, c0 + V lanes) of the padded kernel, into `out`.
template <typename T, int64_t V>
void Pixel(const Shape& s, const T* img, const T* packed, int64_t image, int64_t y, int64_t x,
           int64_t c0, T* out) {
  constexpr int64_t lanes = kLanes<T>;
  const int64_t r = s.k / 2, cp = s.CoPadded<T>();
  Vec<T> acc[V] = {};
  for (int64_t dy = 0; dy < s.k; ++dy) {
    const int64_t iy = s.stride * y + dy - r;
    if (iy < 0 || iy >= s.h) continue;
    for (int64_t dx = 0; dx < s.k; ++dx) {
      const int64_t ix = s.stride * x + dx - r;
      if (ix < 0 || ix >= s.w) continue;
      const T* pixel = img + ((image * s.h + iy) * s.w + ix) * s.ci;
      const T* taps = packed + (dy * s.k + dx) * s.ci * cp + c0;
      for (int64_t i = 0; i < s.ci; ++i) {
        for (int64_t v = 0; v < V; ++v) acc[v] += pixel[i] * Load(taps + i * cp + v * lanes);
      }
    }
  }
  for (int64_t v = 0; v < V; ++v) Store(acc[v], out + v * lanes);
}

template <typename T>
void Run(ffi::ThreadPool& pool, const Shape& s, const T* img, const T* kernel, T* out) {
  constexpr int64_t lanes = kLanes<T>;
  const int64_t taps = s.k * s.k * s.ci, cp = s.CoPadded<T>();
  std::vector<T> packed(taps * cp, T(0));  // rows padded to whole vectors
  for (int64_t t = 0; t < taps; ++t) {
    std::copy(kernel + t * s.co, kernel + (t + 1) * s.co, &packed[t * cp]);
  }
  const int64_t lines = s.n * s.h_out;
  ParallelFor(pool, lines, [&](int64_t line) {
    const int64_t image = line / s.h_out, y = line % s.h_out;
    std::vector<T> channels(cp);
    for (int64_t x = 0; x < s.w_out; ++x) {
      for (int64_t c0 = 0; c0 < cp; c0 += kMaxVectors * lanes) {
        T* into = channels.data() + c0;
        switch (std::min(kMaxVectors, (cp - c0) / lanes)) {
          case 4: Pixel<T, 4>(s, img, packed.data(), image, y, x, c0, into); break;
          case 3: Pixel<T, 3>(s, img, packed.data(), image, y, x, c0, into); break;
          case 2: Pixel<T, 2>(s, img, packed.data(), image, y, x, c0, into); break;
          default: Pixel<T, 1>(s, img, packed.data(), image, y, x, c0, into); break;
        }
      }
      std::memcpy(out + ((image * s.h_out + y) * s.w_out + x) * s.co, channels.data(),
                  s.co * sizeof(T));
    }
  });
}

// images (N, H, W, Ci), kernel (k, k, Ci, Co) of the same type; the result (N, Ho, Wo, Co).
ffi::Error StemConv(ffi::ThreadPool pool, ffi::AnyBuffer images, ffi::AnyBuffer kernel,
                    ffi::Result<ffi::AnyBuffer> out, int64_t stride) {
  const auto d = images.dimensions(), kd = kernel.dimensions(), od = out->dimensions();
  const bool shaped = d.size() == 4 && kd.size() == 4 && kd[0] == kd[1] && kd[0] % 2 == 1 &&
                      kd[2] == d[3] && od.size() == 4 && stride >= 1 &&
                      kernel.element_type() == images.element_type() &&
                      out->element_type() == images.element_type();
  if (!shaped) return ffi::Error::InvalidArgument("stem conv: expected NHWC, (k, k, Ci, Co)");
  const int64_t k = kd[0], h_out = (d[1] - 1) / stride + 1, w_out = (d[2] - 1) / stride + 1;
  if (od[0] != d[0] || od[1] != h_out || od[2] != w_out || od[3] != kd[3]) {
    return ffi::Error::InvalidArgument("stem conv: the result's shape is not the conv's");
  }
  const Shape s{d[0], d[1], d[2], d[3], k, kd[3], stride, h_out, w_out};
  return ForFloatType(images.element_type(), "stem conv", [&](auto zero) {
    using T = decltype(zero);
    Run(pool, s, images.typed_data<T>(), kernel.typed_data<T>(), out->typed_data<T>());
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(WrcorStemConv, StemConv,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("stride"));
