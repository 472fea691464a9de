// Depthwise convolution of images stored as rows, for XLA:CPU (an XLA FFI custom call).
//
// Layout: (N, P, C), an image of side s in its first s * s rows (row = y * s + x), the rest
// padding, given as consecutive tiles of P / T rows each ((N, P / T, C) buffers, T >= 1: the
// engine's 1x1 pieces run over tiles, and joining and splitting them around the conv cost
// about as much as a pass of their own). XLA:CPU runs the engine's sum of row-shifted taps
// at 5-20 GMAC/s and ignores the image's shape (on a 7 x 7 image a 7 x 7 kernel reads
// mostly padding); here each output pixel sums only the taps inside the image, over a block
// of channels held in registers.
//
// One routine serves both directions of a k x k (k = 2r + 1) conv with stride t:
//   forward    out(o) = sum_d k(d) * relu(x(t o + d - r))                  (o < ceil(s / t))
//   transposed dx(i)  = [x(i) > 0] * sum_d k(d) * g((i + r - d) / t)      (where t divides)
// per axis, both as sums over a padded source plane (below). The forward can also give
// the output's per-channel sum and sum of squares about its mean over the real rows
// (BatchNorm's statistics), summed in double while each output row is in cache: apart,
// XLA:CPU read the output twice more for them. The kernel's cotangent
//   dk(d) = sum_o g(o) * relu(x(t o + d - r))
// reads the forward's plane rows beside each row of g: as XLA's taps, it read the input
// and g once per tap (49 times at k = 7).

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "native_cpu.h"

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

bool Fits(const Geometry& g) {
  return g.side_src * g.side_src <= g.p_src && g.side_dst * g.side_dst <= g.p_dst;
}

// (N, P, C) rows stored as tiles of `rows` rows per image.
template <typename T>
struct Tiles {
  std::vector<T*> data;
  int64_t rows, c;

  T* At(int64_t image, int64_t row) const {
    return data[row / rows] + (image * rows + row % rows) * c;
  }
  // `count` rows from `row` of `image` where they lie in one tile, else nullptr.
  T* Span(int64_t image, int64_t row, int64_t count) const {
    return row / rows == (row + count - 1) / rows ? At(image, row) : nullptr;
  }
};

template <typename T>
class Rows {
 public:
  Rows(const Geometry& g, const Tiles<const T>& src, int64_t live)
      : g_(g), src_(src), live_(live), data_(g.k * g.width() * g.c) {
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
    const int64_t first = shifted / t * g_.side_src;
    for (int64_t j = 0; j < g_.side_src; ++j) {
      T* out = row + (r + j * t) * c;
      const T* pixel = src_.At(image, first + j);
      for (int64_t i = 0; i < live_; ++i) {
        const T v = pixel[i];
        out[i] = g_.transposed ? v : (v > T(0) ? v : T(0));
      }
    }
    return row;
  }

 private:
  const Geometry& g_;
  const Tiles<const T>& src_;
  const int64_t live_;  // the channels read (the others stay 0)
  std::vector<T> data_;
  std::vector<int64_t> tags_;
};

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
      const Vec<T> w = Load(kernel + (dy * k + dx) * c + c0);
      const T* s = base + dx * c;
      for (int64_t i = 0; i < P; ++i) {
        acc[i] += w * Load(s + i * step * c);
      }
    }
  }
  for (int64_t i = 0; i < P; ++i) {
    Vec<T> v = acc[i];
    if (g.transposed) {
      const Vec<T> keep = Load(keep_row + (x0 + i) * c + c0);
      v = keep > T(0) ? v : Vec<T>{};
    }
    Store(v, out_row + (x0 + i) * c + c0);
  }
}

// The same for widths that are not a multiple of the vector: one channel at a time.
template <typename T>
void Scalar(const Geometry& g, const T* const* plane, const T* kernel, const T* keep_row,
            T* out_row, int64_t x, int64_t live) {
  const int64_t c = g.c, k = g.k, step = g.step();
  for (int64_t j = 0; j < live; ++j) {
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

// The pixels of one output row into `out_row`, in blocks of pixels x channels: channels
// [0, live) summed, the others 0.
template <typename T>
void Pixels(const Geometry& g, const T* const* plane, const T* kernel, const T* keep_row,
            T* out_row, int64_t live) {
  constexpr int64_t lanes = kLanes<T>;
  for (int64_t x = 0; x < g.side_dst; ++x) {
    std::fill(out_row + x * g.c + live, out_row + (x + 1) * g.c, T(0));
  }
  if (g.c % lanes != 0) {
    for (int64_t x = 0; x < g.side_dst; ++x) {
      Scalar(g, plane, kernel, keep_row, out_row, x, live);
    }
    return;
  }
  for (int64_t x0 = 0; x0 < g.side_dst; x0 += kPixels) {
    for (int64_t c0 = 0; c0 < live; c0 += lanes) {
      switch (std::min(kPixels, g.side_dst - x0)) {
        case 4: Block<T, 4>(g, plane, kernel, keep_row, out_row, x0, c0); break;
        case 3: Block<T, 3>(g, plane, kernel, keep_row, out_row, x0, c0); break;
        case 2: Block<T, 2>(g, plane, kernel, keep_row, out_row, x0, c0); break;
        default: Block<T, 1>(g, plane, kernel, keep_row, out_row, x0, c0);
      }
    }
  }
}

// A thread's output row, and its mask row (transposed), where they cross a tile's end.
template <typename T>
struct Scratch {
  std::vector<T> out, keep;
};

// Output row y of `image`: the plane rows it reads, then blocks of pixels x channels.
template <typename T>
void Row(const Geometry& g, Rows<T>& rows, const T* kernel, int64_t live,
         const Tiles<const T>& mask, const Tiles<T>& dst, Scratch<T>& scratch, int64_t image,
         int64_t y) {
  const T* plane[16];
  for (int64_t dy = 0; dy < g.k; ++dy) plane[dy] = rows.Get(image, g.step() * y + dy);
  const int64_t first = y * g.side_dst, bytes = g.c * sizeof(T);
  T* out_row = dst.Span(image, first, g.side_dst);
  if (out_row == nullptr) out_row = scratch.out.data();
  const T* keep_row = nullptr;
  if (g.transposed) {
    keep_row = mask.Span(image, first, g.side_dst);
    if (keep_row == nullptr) {
      for (int64_t x = 0; x < g.side_dst; ++x) {
        std::memcpy(scratch.keep.data() + x * g.c, mask.At(image, first + x), bytes);
      }
      keep_row = scratch.keep.data();
    }
  }
  Pixels(g, plane, kernel, keep_row, out_row, live);
  if (out_row == scratch.out.data()) {
    for (int64_t x = 0; x < g.side_dst; ++x) {
      std::memcpy(dst.At(image, first + x), out_row + x * g.c, bytes);
    }
  }
}

// Adds one output row's share of the kernel's cotangent to `partial` (k * k * C, double):
// per channel block and tap, the row's products summed in registers first.
template <typename T>
void KernelRow(const Geometry& g, const T* const* plane, const T* g_row, double* partial) {
  constexpr int64_t lanes = kLanes<T>;
  const int64_t c = g.c, k = g.k, step = g.step(), width = g.side_dst;
  const int64_t block = c % lanes == 0 ? lanes : 1;
  for (int64_t c0 = 0; c0 < c; c0 += block) {
    for (int64_t dy = 0; dy < k; ++dy) {
      if (plane[dy] == nullptr) continue;
      for (int64_t dx = 0; dx < k; ++dx) {
        double* into = partial + (dy * k + dx) * c + c0;
        const T* s = plane[dy] + dx * c + c0;
        if (block == 1) {
          T acc = 0;
          for (int64_t x = 0; x < width; ++x) acc += g_row[x * c + c0] * s[x * step * c];
          *into += acc;
          continue;
        }
        Vec<T> acc = {};
        for (int64_t x = 0; x < width; ++x) {
          acc += Load(g_row + x * c + c0) * Load(s + x * step * c);
        }
        for (int64_t i = 0; i < lanes; ++i) into[i] += acc[i];
      }
    }
  }
}

// Per-channel sums of one part of the output rows, in double: of the values and their
// squares (merged over parts in order, so the result does not depend on the threads).
struct Moments {
  std::vector<double> sum, squares;

  explicit Moments(int64_t c) : sum(c), squares(c) {}
  template <typename T>
  void Add(const T* pixel, int64_t c) {
    for (int64_t j = 0; j < c; ++j) {
      const double v = pixel[j];
      sum[j] += v;
      squares[j] += v * v;
    }
  }
};

// stats (2, C): the sum over the real rows and the sum of squares about their mean.
template <typename T>
void Merge(const std::vector<Moments>& parts, int64_t count, int64_t c, T* stats) {
  for (int64_t j = 0; j < c; ++j) {
    double sum = 0, squares = 0;
    for (const Moments& part : parts) sum += part.sum[j], squares += part.squares[j];
    stats[j] = static_cast<T>(sum);
    stats[c + j] = static_cast<T>(std::max(0.0, squares - sum * sum / count));
  }
}

template <typename T>
void Run(ffi::ThreadPool& pool, const Geometry& g, const Tiles<const T>& src, const T* kernel,
         const Tiles<const T>& mask, const Tiles<T>& dst, T* stats) {
  std::vector<T> turned;  // transposed: the kernel turned by 180 degrees
  if (g.transposed) {
    const int64_t taps = g.k * g.k;
    turned.resize(taps * g.c);
    for (int64_t t = 0; t < taps; ++t) {
      std::copy(kernel + t * g.c, kernel + (t + 1) * g.c, turned.data() + (taps - 1 - t) * g.c);
    }
    kernel = turned.data();
  }
  // the kernel's zero channels (the engine pads it to the bucket width) give zeros: the
  // sums run up to its last nonzero channel, in whole vectors where the width has them
  const int64_t nonzero = NonzeroExtent(kernel, g.k * g.k, g.c).cols;
  const int64_t lanes = g.c % kLanes<T> == 0 ? kLanes<T> : 1;
  const int64_t live = (nonzero + lanes - 1) / lanes * lanes;
  const int64_t lines = g.n * g.side_dst;
  const int64_t chunk = std::max<int64_t>(1, lines / 64), parts = (lines + chunk - 1) / chunk;
  std::vector<Moments> moments(stats == nullptr ? 0 : parts, Moments(g.c));
  ParallelFor(pool, parts, [&, chunk](int64_t part) {
    Rows<T> rows(g, src, live);
    Scratch<T> scratch{std::vector<T>(g.side_dst * g.c),
                       std::vector<T>(g.transposed ? g.side_dst * g.c : 0)};
    for (int64_t line = part * chunk; line < std::min(lines, (part + 1) * chunk); ++line) {
      const int64_t image = line / g.side_dst, y = line % g.side_dst;
      Row(g, rows, kernel, live, mask, dst, scratch, image, y);
      if (stats != nullptr) {
        for (int64_t x = 0; x < g.side_dst; ++x) {
          moments[part].Add(dst.At(image, y * g.side_dst + x), g.c);
        }
      }
      if (y == g.side_dst - 1) {  // the padding rows after the image: zeros, tile by tile
        for (int64_t row = g.side_dst * g.side_dst; row < g.p_dst;) {
          const int64_t end = std::min(g.p_dst, (row / dst.rows + 1) * dst.rows);
          std::memset(dst.At(image, row), 0, (end - row) * g.c * sizeof(T));
          row = end;
        }
      }
    }
  });
  if (stats != nullptr) Merge(moments, g.n * g.side_dst * g.side_dst, g.c, stats);
}

// dk (k, k, 1, C): the parts of the output rows summed apart in double, merged in order
// (so the result does not depend on the threads).
template <typename T>
void RunKernel(ffi::ThreadPool& pool, const Geometry& g, const Tiles<const T>& src,
               const Tiles<const T>& cotangent, T* dk) {
  const int64_t lines = g.n * g.side_dst, taps = g.k * g.k * g.c;
  const int64_t chunk = std::max<int64_t>(1, lines / 64), parts = (lines + chunk - 1) / chunk;
  std::vector<std::vector<double>> partial(parts, std::vector<double>(taps));
  ParallelFor(pool, parts, [&, chunk](int64_t part) {
    Rows<T> rows(g, src, g.c);
    std::vector<T> scratch(g.side_dst * g.c);
    for (int64_t line = part * chunk; line < std::min(lines, (part + 1) * chunk); ++line) {
      const int64_t image = line / g.side_dst, y = line % g.side_dst;
      const T* plane[16];
      for (int64_t dy = 0; dy < g.k; ++dy) plane[dy] = rows.Get(image, g.step() * y + dy);
      const int64_t first = y * g.side_dst;
      const T* g_row = cotangent.Span(image, first, g.side_dst);
      if (g_row == nullptr) {
        for (int64_t x = 0; x < g.side_dst; ++x) {
          std::memcpy(scratch.data() + x * g.c, cotangent.At(image, first + x), g.c * sizeof(T));
        }
        g_row = scratch.data();
      }
      KernelRow(g, plane, g_row, partial[part].data());
    }
  });
  for (int64_t i = 0; i < taps; ++i) {
    double sum = 0;
    for (const std::vector<double>& part : partial) sum += part[i];
    dk[i] = static_cast<T>(sum);
  }
}

// `buffers` as the tiles of one (N, P, C) array: all (N, P / T, C), of the kernel's type.
template <typename T>
ffi::Error AsTiles(const std::vector<ffi::AnyBuffer>& buffers, ffi::DataType type,
                   Tiles<T>& tiles, int64_t& n) {
  if (buffers.empty()) return ffi::Error::InvalidArgument("depthwise: no tiles");
  const auto first = buffers[0].dimensions();
  for (const ffi::AnyBuffer& buffer : buffers) {
    const auto d = buffer.dimensions();
    if (d.size() != 3 || first.size() != 3 || d[0] != first[0] || d[1] != first[1] ||
        d[2] != first[2] || buffer.element_type() != type) {
      return ffi::Error::InvalidArgument("depthwise: expected (N, R, C) tiles of one shape");
    }
    tiles.data.push_back(static_cast<T*>(buffer.untyped_data()));
  }
  n = first[0], tiles.rows = first[1], tiles.c = first[2];
  return ffi::Error::Success();
}

template <typename T>
ffi::Error Typed(ffi::ThreadPool& pool, ffi::DataType type, const T* kernel, const int64_t k,
                 const int64_t side_in,
                 const std::vector<ffi::AnyBuffer>& sources,
                 const std::vector<ffi::AnyBuffer>& masks,
                 std::vector<ffi::AnyBuffer> results, int64_t stride, bool transposed,
                 bool statistics) {
  T* stats = nullptr;
  if (statistics) {
    const auto error = ffi::Error::InvalidArgument("depthwise: (2, C) statistics, forward only");
    if (transposed || results.size() < 2) return error;
    const ffi::AnyBuffer last = results.back();
    const auto d = last.dimensions();
    if (d.size() != 2 || d[0] != 2 || d[1] != results[0].dimensions().back() ||
        last.element_type() != type) {
      return error;
    }
    stats = static_cast<T*>(last.untyped_data());
    results.pop_back();
  }
  Tiles<const T> src, mask;
  Tiles<T> dst;
  int64_t n_src = 0, n_dst = 0, n_mask = 0;
  for (ffi::Error error :
       {AsTiles(sources, type, src, n_src), AsTiles(results, type, dst, n_dst)}) {
    if (error.failure()) return error;
  }
  mask = Tiles<const T>{{}, dst.rows, dst.c};
  if (transposed) {
    ffi::Error error = AsTiles(masks, type, mask, n_mask);
    if (error.failure()) return error;
  }
  const int64_t p_src = src.rows * sources.size(), p_dst = dst.rows * results.size();
  const int64_t side_out = (side_in + stride - 1) / stride;
  Geometry g{n_src, p_src, p_dst, src.c, k, transposed ? side_out : side_in,
             transposed ? side_in : side_out, stride, transposed};
  const bool masked = !transposed || (n_mask == n_dst && mask.rows * masks.size() == p_dst &&
                                      mask.c == dst.c);
  if (n_src != n_dst || src.c != dst.c || !masked) {
    return ffi::Error::InvalidArgument("depthwise: sources, mask and results disagree");
  }
  if (!Fits(g)) return ffi::Error::InvalidArgument("depthwise: the image does not fit its rows");
  Run(pool, g, src, kernel, mask, dst, stats);
  return ffi::Error::Success();
}

template <typename T>
ffi::Error TypedKernel(ffi::ThreadPool& pool, ffi::DataType type, const int64_t k,
                       const int64_t side_in, const std::vector<ffi::AnyBuffer>& sources,
                       const std::vector<ffi::AnyBuffer>& cotangents, ffi::AnyBuffer dk,
                       int64_t stride) {
  Tiles<const T> src, cotangent;
  int64_t n_src = 0, n_g = 0;
  for (ffi::Error error : {AsTiles(sources, type, src, n_src),
                           AsTiles(cotangents, type, cotangent, n_g)}) {
    if (error.failure()) return error;
  }
  const int64_t p_src = src.rows * sources.size(), p_dst = cotangent.rows * cotangents.size();
  Geometry g{n_src, p_src, p_dst, src.c, k, side_in, (side_in + stride - 1) / stride, stride,
             false};
  const auto d = dk.dimensions();
  const bool shaped = d.size() == 4 && d[0] == k && d[1] == k && d[2] == 1 && d[3] == src.c &&
                      dk.element_type() == type;
  if (n_src != n_g || src.c != cotangent.c || !shaped) {
    return ffi::Error::InvalidArgument("depthwise kernel: sources, cotangent and kernel disagree");
  }
  if (!Fits(g)) return ffi::Error::InvalidArgument("depthwise: the image does not fit its rows");
  RunKernel(pool, g, src, cotangent, static_cast<T*>(dk.untyped_data()));
  return ffi::Error::Success();
}

// The remaining arguments, the first `sources` into `first` and the others into `rest`.
ffi::Error SplitArgs(const ffi::RemainingArgs& args, int64_t sources,
                     std::vector<ffi::AnyBuffer>& first, std::vector<ffi::AnyBuffer>& rest) {
  for (size_t i = 0; i < args.size(); ++i) {
    ffi::ErrorOr<ffi::AnyBuffer> buffer = args.get<ffi::AnyBuffer>(i);
    if (!buffer.has_value()) return buffer.error();
    (static_cast<int64_t>(i) < sources ? first : rest).push_back(*buffer);
  }
  return ffi::Error::Success();
}

// Whether `kd` are a (k, k, 1, C) kernel's dimensions, k odd and at most 15 (`Row`'s planes).
bool IsKernel(ffi::Span<const int64_t> kd) {
  return kd.size() == 4 && kd[0] == kd[1] && kd[0] % 2 == 1 && kd[0] <= 15 && kd[2] == 1;
}

// kernel (k, k, 1, C); the remaining arguments: `sources` tiles of the source (the input
// forward, the output's cotangent transposed), then (transposed) the forward input's tiles
// for the ReLU's mask; the results: the output's tiles, then with `statistics` (forward)
// its (2, C) sum and sum of squares about the mean over the real rows.
ffi::Error Depthwise(ffi::ThreadPool pool, ffi::AnyBuffer kernel, ffi::Buffer<ffi::S32> side,
                     ffi::RemainingArgs args, ffi::RemainingRets rets, int64_t stride,
                     bool transposed, int64_t sources, bool statistics) {
  std::vector<ffi::AnyBuffer> inputs, masks, results;
  if (ffi::Error error = SplitArgs(args, sources, inputs, masks); error.failure()) return error;
  for (size_t i = 0; i < rets.size(); ++i) {
    ffi::ErrorOr<ffi::Result<ffi::AnyBuffer>> buffer = rets.get<ffi::AnyBuffer>(i);
    if (!buffer.has_value()) return buffer.error();
    results.push_back(**buffer);
  }
  const auto kd = kernel.dimensions();
  if (!IsKernel(kd) || stride < 1 || inputs.empty() || kd[3] != inputs[0].dimensions().back()) {
    return ffi::Error::InvalidArgument("depthwise: expected a (k, k, 1, C) kernel");
  }
  const int64_t side_in = side.typed_data()[0];
  const ffi::DataType type = kernel.element_type();
  return ForFloatType(type, "depthwise", [&](auto zero) {
    return Typed(pool, type, kernel.typed_data<decltype(zero)>(), kd[0], side_in, inputs, masks,
                 results, stride, transposed, statistics);
  });
}

// kernel (k, k, 1, C), read for its shape; the remaining arguments: `sources` tiles of the
// forward's input, then the tiles of its output's cotangent; the result: the kernel's
// cotangent, (k, k, 1, C).
ffi::Error DepthwiseKernel(ffi::ThreadPool pool, ffi::AnyBuffer kernel,
                           ffi::Buffer<ffi::S32> side, ffi::RemainingArgs args,
                           ffi::Result<ffi::AnyBuffer> dk, int64_t stride, int64_t sources) {
  std::vector<ffi::AnyBuffer> inputs, cotangents;
  if (ffi::Error error = SplitArgs(args, sources, inputs, cotangents); error.failure()) {
    return error;
  }
  const auto kd = kernel.dimensions();
  if (!IsKernel(kd) || stride < 1 || inputs.empty() || cotangents.empty()) {
    return ffi::Error::InvalidArgument("depthwise kernel: expected a (k, k, 1, C) kernel");
  }
  const int64_t side_in = side.typed_data()[0];
  const ffi::DataType type = kernel.element_type();
  return ForFloatType(type, "depthwise kernel", [&](auto zero) {
    return TypedKernel<decltype(zero)>(pool, type, kd[0], side_in, inputs, cotangents, *dk,
                                       stride);
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(WrcorDepthwise, Depthwise,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<int64_t>("stride")
                                  .Attr<bool>("transposed")
                                  .Attr<int64_t>("sources")
                                  .Attr<bool>("statistics"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(WrcorDepthwiseKernel, DepthwiseKernel,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .RemainingArgs()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("sources"));
