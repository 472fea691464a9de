// Depthwise convolution of images stored as rows, for XLA:CPU (an XLA FFI custom call).
//
// Layout: (N, P, C), an image of side s in its first s * s rows (row = y * s + x), the rest
// padding. XLA:CPU runs the engine's sum of row-shifted taps at 5-20 GMAC/s and ignores the
// image's shape (on a 7 x 7 image a 7 x 7 kernel reads mostly padding); here each output
// pixel sums only the taps inside the image, over a block of channels held in registers.
//
// One routine serves both directions of a k x k (k = 2r + 1) conv with stride t:
//   forward    out(o) = sum_d k(d) * relu(x(t o + d - r))                  (o < ceil(s / t))
//   transposed dx(i)  = [x(i) > 0] * sum_d k(d) * g((i + r - d) / t)      (where t divides)
// per axis, both as sums over a padded source plane (below).

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// The source plane of both directions, padded: row m, column j of it is
//   forward     relu(x(m - r, j - r))
//   transposed  g((m - r) / t, (j - r) / t) where t divides both, else 0
// and output pixel (y, x) sums k'(dy, dx) * plane(t' y + dy, t' x + dx): t' = t and k' = k
// forward, t' = 1 and k' the kernel turned by 180 degrees transposed. Output rows read
// overlapping plane rows; each thread keeps the last k of them (`Rows`).
struct Geometry {
  int64_t n, p_src, p_dst, c, k, side_src, side_dst, stride;
  bool transposed;
  int64_t width() const { return (transposed ? side_dst : side_src) + k - 1; }
  int64_t step() const { return transposed ? 1 : stride; }
};

template <typename T>
class Rows {
 public:
  Rows(const Geometry& g, const T* src) : g_(g), src_(src), data_(g.k * g.width() * g.c) {
    tags_.assign(g.k, -1);
  }

  // Plane row m of `image`, or nullptr where it is all zeros.
  const T* Get(int64_t image, int64_t m) {
    const int64_t r = g_.k / 2, c = g_.c, slot = m % g_.k;
    const int64_t t = g_.transposed ? g_.stride : 1, shifted = m - r;
    if (shifted < 0 || shifted % t != 0 || shifted / t >= g_.side_src) return nullptr;
    T* row = data_.data() + slot * g_.width() * c;
    const int64_t tag = image * (g_.width() + g_.side_src) + m;
    if (tags_[slot] == tag) return row;
    tags_[slot] = tag;
    std::fill(row, row + g_.width() * c, T(0));
    const T* line = src_ + (image * g_.p_src + shifted / t * g_.side_src) * c;
    for (int64_t j = 0; j < g_.side_src; ++j) {
      T* out = row + (r + j * t) * c;
      for (int64_t i = 0; i < c; ++i) {
        const T v = line[j * c + i];
        out[i] = g_.transposed ? v : (v > T(0) ? v : T(0));
      }
    }
    return row;
  }

 private:
  const Geometry& g_;
  const T* src_;
  std::vector<T> data_;
  std::vector<int64_t> tags_;
};

// 64 bytes of channels, loaded unaligned (GCC ignores vector_size on a template alias).
typedef float FloatVec __attribute__((vector_size(64), aligned(alignof(float))));
typedef double DoubleVec __attribute__((vector_size(64), aligned(alignof(double))));
template <typename T>
struct VecOf;
template <>
struct VecOf<float> {
  using Type = FloatVec;
};
template <>
struct VecOf<double> {
  using Type = DoubleVec;
};
template <typename T>
using Vec = typename VecOf<T>::Type;

constexpr int64_t kPixels = 4;  // output pixels summed at once, sharing each tap's load

// P output pixels from x0 of one row, the channels [c0, c0 + lanes), in registers.
template <typename T, int64_t P>
void Block(const Geometry& g, const T* const* plane, const T* kernel, const T* keep_row,
           T* out_row, int64_t x0, int64_t c0) {
  const int64_t c = g.c, k = g.k, step = g.step();
  Vec<T> acc[P] = {};
  for (int64_t dy = 0; dy < k; ++dy) {
    if (plane[dy] == nullptr) continue;
    const T* base = plane[dy] + step * x0 * c + c0;
    for (int64_t dx = 0; dx < k; ++dx) {
      const Vec<T> w = *reinterpret_cast<const Vec<T>*>(kernel + (dy * k + dx) * c + c0);
      const T* s = base + dx * c;
      for (int64_t i = 0; i < P; ++i) {
        acc[i] += w * *reinterpret_cast<const Vec<T>*>(s + i * step * c);
      }
    }
  }
  for (int64_t i = 0; i < P; ++i) {
    Vec<T> v = acc[i];
    if (g.transposed) {
      const Vec<T> keep = *reinterpret_cast<const Vec<T>*>(keep_row + (x0 + i) * c + c0);
      v = keep > T(0) ? v : Vec<T>{};
    }
    *reinterpret_cast<Vec<T>*>(out_row + (x0 + i) * c + c0) = v;
  }
}

// The same for widths that are not a multiple of the vector: one channel at a time.
template <typename T>
void Scalar(const Geometry& g, const T* const* plane, const T* kernel, const T* keep_row,
            T* out_row, int64_t x) {
  const int64_t c = g.c, k = g.k, step = g.step();
  for (int64_t j = 0; j < c; ++j) {
    T acc = 0;
    for (int64_t dy = 0; dy < k; ++dy) {
      if (plane[dy] == nullptr) continue;
      for (int64_t dx = 0; dx < k; ++dx) {
        acc += kernel[(dy * k + dx) * c + j] * plane[dy][(step * x + dx) * c + j];
      }
    }
    const bool zero = g.transposed && !(keep_row[x * c + j] > T(0));
    out_row[x * c + j] = zero ? T(0) : acc;
  }
}

// Output row y of `image`: the plane rows it reads, then blocks of pixels x channels.
template <typename T>
void Row(const Geometry& g, Rows<T>& rows, const T* kernel, const T* mask, T* dst,
         int64_t image, int64_t y) {
  constexpr int64_t lanes = sizeof(Vec<T>) / sizeof(T);
  const T* plane[16];
  for (int64_t dy = 0; dy < g.k; ++dy) plane[dy] = rows.Get(image, g.step() * y + dy);
  T* out_row = dst + (image * g.p_dst + y * g.side_dst) * g.c;
  const T* keep_row = mask + (image * g.p_dst + y * g.side_dst) * g.c;
  if (g.c % lanes != 0) {
    for (int64_t x = 0; x < g.side_dst; ++x) Scalar(g, plane, kernel, keep_row, out_row, x);
    return;
  }
  for (int64_t x0 = 0; x0 < g.side_dst; x0 += kPixels) {
    for (int64_t c0 = 0; c0 < g.c; c0 += lanes) {
      switch (std::min(kPixels, g.side_dst - x0)) {
        case 4: Block<T, 4>(g, plane, kernel, keep_row, out_row, x0, c0); break;
        case 3: Block<T, 3>(g, plane, kernel, keep_row, out_row, x0, c0); break;
        case 2: Block<T, 2>(g, plane, kernel, keep_row, out_row, x0, c0); break;
        default: Block<T, 1>(g, plane, kernel, keep_row, out_row, x0, c0);
      }
    }
  }
}

// Runs fn(0..count-1) on the caller and XLA's intra-op threads, pulling indices from one
// counter: the caller finishes alone when the pool is busy.
template <typename F>
void ParallelFor(ffi::ThreadPool& pool, int64_t count, F fn) {
  struct State {
    std::atomic<int64_t> next{0}, done{0};
    std::mutex mutex;
    std::condition_variable finished;
  };
  auto state = std::make_shared<State>();
  auto work = [state, count, fn]() {
    int64_t finished = 0;
    for (int64_t i; (i = state->next.fetch_add(1)) < count;) {
      fn(i);
      ++finished;
    }
    if (finished && state->done.fetch_add(finished) + finished == count) {
      std::lock_guard<std::mutex> lock(state->mutex);
      state->finished.notify_all();
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), count) - 1;
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([work] { work(); });
  work();
  std::unique_lock<std::mutex> lock(state->mutex);
  state->finished.wait(lock, [&] { return state->done.load() == count; });
}

template <typename T>
void Run(ffi::ThreadPool& pool, const Geometry& g, const T* src, const T* kernel,
         const T* mask, T* dst) {
  std::vector<T> turned;  // transposed: the kernel turned by 180 degrees
  if (g.transposed) {
    const int64_t taps = g.k * g.k;
    turned.resize(taps * g.c);
    for (int64_t t = 0; t < taps; ++t) {
      std::copy(kernel + t * g.c, kernel + (t + 1) * g.c, turned.data() + (taps - 1 - t) * g.c);
    }
    kernel = turned.data();
  }
  const int64_t lines = g.n * g.side_dst;
  const int64_t chunk = std::max<int64_t>(1, lines / 64);
  ParallelFor(pool, (lines + chunk - 1) / chunk, [&, chunk](int64_t part) {
    Rows<T> rows(g, src);
    for (int64_t line = part * chunk; line < std::min(lines, (part + 1) * chunk); ++line) {
      const int64_t image = line / g.side_dst, y = line % g.side_dst;
      Row(g, rows, kernel, mask, dst, image, y);
      if (y == g.side_dst - 1) {  // the padding rows after the image: zeros
        const int64_t real = g.side_dst * g.side_dst;
        std::memset(dst + (image * g.p_dst + real) * g.c, 0,
                    (g.p_dst - real) * g.c * sizeof(T));
      }
    }
  });
}

ffi::Error Depthwise(ffi::ThreadPool pool, ffi::AnyBuffer src, ffi::AnyBuffer kernel,
                     ffi::Buffer<ffi::S32> side, ffi::AnyBuffer mask,
                     ffi::Result<ffi::AnyBuffer> dst, int64_t stride, bool transposed) {
  const auto s = src.dimensions(), d = dst->dimensions(), kd = kernel.dimensions();
  if (s.size() != 3 || d.size() != 3 || kd.size() != 4 || kd[0] != kd[1] || kd[0] % 2 == 0 ||
      s[0] != d[0] || s[2] != d[2] || kd[3] != s[2] || kd[0] > 15 || stride < 1) {
    return ffi::Error::InvalidArgument("depthwise: expected (N, P, C) rows, (k, k, 1, C)");
  }
  const int64_t side_in = side.typed_data()[0];
  const int64_t side_out = (side_in + stride - 1) / stride;
  Geometry g{s[0], s[1], d[1], s[2], kd[0], transposed ? side_out : side_in,
             transposed ? side_in : side_out, stride, transposed};
  if (g.side_src * g.side_src > g.p_src || g.side_dst * g.side_dst > g.p_dst) {
    return ffi::Error::InvalidArgument("depthwise: the image does not fit its rows");
  }
  switch (src.element_type()) {
    case ffi::DataType::F32:
      Run(pool, g, src.typed_data<float>(), kernel.typed_data<float>(),
          mask.typed_data<float>(), dst->typed_data<float>());
      break;
    case ffi::DataType::F64:
      Run(pool, g, src.typed_data<double>(), kernel.typed_data<double>(),
          mask.typed_data<double>(), dst->typed_data<double>());
      break;
    default:
      return ffi::Error::InvalidArgument("depthwise: float32 or float64 only");
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(WrcorDepthwise, Depthwise,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("stride")
                                  .Attr<bool>("transposed"));
