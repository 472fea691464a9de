// The centred Gram matrix of a tile of rows, and its cotangent, for XLA:CPU (XLA FFI
// custom calls): the statistics of the engine's expand piece, sum over the real rows of
// (x - mean)(x - mean)^T. XLA:CPU wrote the centred tile out before its product, and ran
// the transposed product at half its usual rate (28-100 GFLOP/s here); this centres
// each chunk of rows in cache and sums only the upper triangle, in registers.
//
// Layout: a tile (N, R, C) of the engine's rows, its rows t R .. t R + R - 1 of each image's
// padded rows, of which the first `rows` per image are real.
//   gram       G = sum_real (x - m)(x - m)^T                                  (C, C)
//   cotangent  dx = [real] (x - m) H, and s = sum_real (x - m)   for H = dG + dG^T
// Each chunk's products are summed in the input's type, then added in double per part of
// the rows; parts merge in a fixed order, so the results do not depend on the threads.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "native_cpu.h"

namespace {

constexpr int64_t kChunk = 256;  // rows centred at a time (a multiple of kRows)

// The real rows of a tile, numbered image by image.
template <typename T>
struct RealRows {
  const T* x;
  int64_t n, rows, c, live;

  int64_t Count() const { return n * live; }
  int64_t Offset(int64_t q) const { return ((q / live) * rows + q % live) * c; }
};

// Rows [q0, q0 + count) centred into a (kChunk, cp) buffer, its padding 0. Returns the
// channels up to the chunk's last nonzero one: the engine's padded channels are 0 in x and
// in the mean, and the product need not run over them.
template <typename T>
int64_t Centre(const RealRows<T>& real, const T* mean, int64_t q0, int64_t count, int64_t cp,
               T* a) {
  using Bits = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  std::vector<Bits> nonzero(real.c, 0);  // each channel's values' bits, or-ed over the rows
  std::fill(a, a + kChunk * cp, T(0));
  for (int64_t k = 0; k < count; ++k) {
    const T* row = real.x + real.Offset(q0 + k);
    T* out = a + k * cp;
    for (int64_t j = 0; j < real.c; ++j) {
      out[j] = row[j] - mean[j];
      Bits bits;
      std::memcpy(&bits, out + j, sizeof(T));
      nonzero[j] |= bits;
    }
  }
  int64_t live = real.c;
  while (live > 0 && nonzero[live - 1] == 0) --live;
  return live;
}

// upper += a^T a over the first `count` rows of a chunk a (kChunk, cp), 0 past its first
// `live` channels: the blocks on and right of the diagonal.
template <typename T>
void ChunkGram(const T* a, int64_t count, int64_t cp, int64_t live, double* upper) {
  constexpr int64_t lanes = kLanes<T>;
  for (int64_t i0 = 0; i0 < live; i0 += kRows) {
    ColumnBlocks<T>(i0 / lanes * lanes, Padded<T>(live), [&](auto vectors, int64_t j0) {
      constexpr int64_t V = decltype(vectors)::value, width = V * lanes;
      Vec<T> acc[kRows][V] = {};
      for (int64_t k = 0; k < count; ++k) {
        const T* row = a + k * cp;
        Vec<T> b[V];
        for (int64_t v = 0; v < V; ++v) b[v] = Load(row + j0 + v * lanes);
        for (int64_t i = 0; i < kRows; ++i) {
          for (int64_t v = 0; v < V; ++v) acc[i][v] += row[i0 + i] * b[v];
        }
      }
      for (int64_t i = 0; i < kRows; ++i) {
        T sums[width];
        for (int64_t v = 0; v < V; ++v) Store(acc[i][v], sums + v * lanes);
        double* into = upper + (i0 + i) * cp + j0;
        for (int64_t l = 0; l < width; ++l) into[l] += sums[l];
      }
    });
  }
}

template <typename T>
void Gram(ffi::ThreadPool& pool, const RealRows<T>& real, const T* mean, T* gram) {
  const int64_t c = real.c, cp = Padded<T>(c), count = real.Count();
  const int64_t part_rows = PartRows(count, kChunk), parts = (count + part_rows - 1) / part_rows;
  std::vector<std::vector<double>> upper(parts, std::vector<double>(cp * cp));
  ParallelFor(pool, parts, [&](int64_t part) {
    std::vector<T> a(kChunk * cp);
    const int64_t end = std::min(count, (part + 1) * part_rows);
    for (int64_t q = part * part_rows; q < end; q += kChunk) {
      const int64_t count = std::min(kChunk, end - q);
      const int64_t live = Centre(real, mean, q, count, cp, a.data());
      ChunkGram(a.data(), count, cp, live, upper[part].data());
    }
  });
  for (int64_t i = 0; i < c; ++i) {
    for (int64_t j = i; j < c; ++j) {
      double sum = 0;
      for (const std::vector<double>& part : upper) sum += part[i * cp + j];
      gram[i * c + j] = gram[j * c + i] = static_cast<T>(sum);
    }
  }
}

template <typename T>
void Cotangent(ffi::ThreadPool& pool, const RealRows<T>& real, const T* mean, const T* h,
               T* dx, T* sums) {
  const int64_t c = real.c, count = real.Count();
  const int64_t part_rows = PartRows(count, kChunk), parts = (count + part_rows - 1) / part_rows;
  // h's padded channels (the kernel's zero rows) are 0: the product skips them
  const Operand<T> nonzero_h = NonzeroOperand(h, c, c, false);
  std::vector<std::vector<double>> partial(parts, std::vector<double>(c));
  ParallelFor(pool, parts, [&](int64_t part) {
    double* sum = partial[part].data();
    auto centred = [&](int64_t q, T* into) {
      const T* row = real.x + real.Offset(q);
      for (int64_t j = 0; j < c; ++j) sum[j] += row[j] - mean[j];
      for (int64_t j = 0; j < nonzero_h.inner; ++j) into[j] = row[j] - mean[j];
      return true;
    };
    auto keep = [&](int64_t q, const T* product) {
      nonzero_h.Keep(product, dx + real.Offset(q), c);
    };
    const int64_t start = part * part_rows, stop = std::min(count, start + part_rows);
    ChunkProducts(start, stop, kChunk, nonzero_h, centred, keep);
  });
  for (int64_t image = 0; image < real.n; ++image) {  // the padded rows' cotangent: 0
    T* first = dx + (image * real.rows + real.live) * c;
    std::fill(first, first + (real.rows - real.live) * c, T(0));
  }
  MergeParts(partial, c, sums);
}

// x (N, R, C), mean (C,) and where (2,): the real rows per image and the tile's index,
// checked against each other; `real` is filled in.
template <typename T>
ffi::Error Rows(ffi::AnyBuffer x, ffi::AnyBuffer mean, ffi::Buffer<ffi::S32> where,
                RealRows<T>& real) {
  const auto d = x.dimensions();
  if (d.size() != 3 || mean.dimensions().size() != 1 || mean.dimensions()[0] != d[2] ||
      mean.element_type() != x.element_type() || where.element_count() != 2) {
    return ffi::Error::InvalidArgument("centred gram: expected (N, R, C) rows, a (C,) mean");
  }
  const int64_t rows = where.typed_data()[0], tile = where.typed_data()[1];
  if (rows < 0 || tile < 0) return ffi::Error::InvalidArgument("centred gram: negative rows");
  const int64_t live = std::clamp<int64_t>(rows - tile * d[1], 0, d[1]);
  real = RealRows<T>{static_cast<const T*>(x.untyped_data()), d[0], d[1], d[2], live};
  return ffi::Error::Success();
}

template <typename T>
ffi::Error TypedGram(ffi::ThreadPool& pool, ffi::AnyBuffer x, ffi::AnyBuffer mean,
                     ffi::Buffer<ffi::S32> where, ffi::AnyBuffer gram) {
  RealRows<T> real;
  if (ffi::Error error = Rows(x, mean, where, real); error.failure()) return error;
  if (!Shaped(gram, {real.c, real.c}, x.element_type())) {
    return ffi::Error::InvalidArgument("centred gram: expected a (C, C) result");
  }
  Gram(pool, real, static_cast<const T*>(mean.untyped_data()),
       static_cast<T*>(gram.untyped_data()));
  return ffi::Error::Success();
}

template <typename T>
ffi::Error TypedCotangent(ffi::ThreadPool& pool, ffi::AnyBuffer x, ffi::AnyBuffer mean,
                          ffi::Buffer<ffi::S32> where, ffi::AnyBuffer h, ffi::AnyBuffer dx,
                          ffi::AnyBuffer sums) {
  RealRows<T> real;
  if (ffi::Error error = Rows(x, mean, where, real); error.failure()) return error;
  const ffi::DataType type = x.element_type();
  const bool shaped = Shaped(h, {real.c, real.c}, type) &&
                      Shaped(dx, {real.n, real.rows, real.c}, type) && Shaped(sums, {real.c}, type);
  if (!shaped) {
    return ffi::Error::InvalidArgument("centred gram: expected (C, C), (N, R, C) and (C,)");
  }
  Cotangent(pool, real, static_cast<const T*>(mean.untyped_data()),
            static_cast<const T*>(h.untyped_data()), static_cast<T*>(dx.untyped_data()),
            static_cast<T*>(sums.untyped_data()));
  return ffi::Error::Success();
}

ffi::Error CentredGram(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer mean,
                       ffi::Buffer<ffi::S32> where, ffi::Result<ffi::AnyBuffer> gram) {
  return ForFloatType(x.element_type(), "centred gram", [&](auto zero) {
    return TypedGram<decltype(zero)>(pool, x, mean, where, *gram);
  });
}

// h: the cotangent of the gram plus its transpose; results: x's cotangent and the sum of
// the centred real rows (the mean's cotangent is -sums h).
ffi::Error CentredGramCotangent(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer mean,
                                ffi::Buffer<ffi::S32> where, ffi::AnyBuffer h,
                                ffi::Result<ffi::AnyBuffer> dx,
                                ffi::Result<ffi::AnyBuffer> sums) {
  return ForFloatType(x.element_type(), "centred gram", [&](auto zero) {
    return TypedCotangent<decltype(zero)>(pool, x, mean, where, h, *dx, *sums);
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(WrcorCentredGram, CentredGram,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(WrcorCentredGramCotangent, CentredGramCotangent,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());
