// What the engine's XLA:CPU custom calls share: GCC vectors of one register, a product summed
// in registers, and a parallel loop on XLA's intra-op threads.

#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <mutex>
#include <string>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// One register of channels: 64 bytes with AVX-512, 32 with AVX, else 16 (SSE, NEON). A GCC
// vector wider than the CPU's registers is split into parts that pass through the stack:
// on an AVX2 CPU the products ran ~30x slower with 64 bytes. Loaded unaligned, and through
// pointers of any type (GCC ignores vector_size on a template alias).
#if defined(__AVX512F__)
#define WRCOR_VECTOR_BYTES 64
#elif defined(__AVX__)
#define WRCOR_VECTOR_BYTES 32
#else
#define WRCOR_VECTOR_BYTES 16
#endif
typedef float FloatVec
    __attribute__((vector_size(WRCOR_VECTOR_BYTES), aligned(alignof(float)), may_alias));
typedef double DoubleVec
    __attribute__((vector_size(WRCOR_VECTOR_BYTES), aligned(alignof(double)), may_alias));
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

template <typename T>
constexpr int64_t kLanes = sizeof(Vec<T>) / sizeof(T);

// Rows of a product's result held in registers at once, and vectors of its columns: 16 of
// AVX-512's 32 registers, else 8 of 16 (with 16 of AVX2's 16, the accumulators spill).
constexpr int64_t kRows = 8;
constexpr int64_t kVectors = WRCOR_VECTOR_BYTES == 64 ? 2 : 1;

// A vector of T from `from` (unaligned) and back. A direct load, not a memcpy: GCC kept
// memcpy'd vectors, and the accumulators they were added to, on the stack.
template <typename T>
Vec<T> Load(const T* from) {
  return *reinterpret_cast<const Vec<T>*>(from);
}

template <typename T>
void Store(Vec<T> v, T* to) {
  *reinterpret_cast<Vec<T>*>(to) = v;
}

// Columns padded to whole vectors.
template <typename T>
int64_t Padded(int64_t c) {
  return (c + kLanes<T> - 1) / kLanes<T> * kLanes<T>;
}

// block(V, j0) for the column blocks [j0, j0 + V vectors) that tile columns [from, to) (both
// whole vectors): kVectors vectors wide, the last one narrower where the columns end, so
// that no block multiplies more than a vector of padding (V is a std::integral_constant).
template <typename T, typename Block>
void ColumnBlocks(int64_t from, int64_t to, Block&& block) {
  constexpr int64_t wide = kVectors * kLanes<T>;
  int64_t j0 = from;
  for (; j0 + wide <= to; j0 += wide) block(std::integral_constant<int64_t, kVectors>{}, j0);
  if (j0 < to) block(std::integral_constant<int64_t, 1>{}, j0);
}

// The leading block of an (r, c) matrix outside which it is 0. The engine pads its kernels
// with zero rows and columns to the bucket widths: a product need not run over them.
struct Extent {
  int64_t rows, cols;
};

template <typename T>
Extent NonzeroExtent(const T* m, int64_t r, int64_t c) {
  Extent extent{0, 0};
  for (int64_t i = 0; i < r; ++i) {
    for (int64_t j = 0; j < c; ++j) {
      if (m[i * c + j] != T(0)) {
        extent.rows = i + 1;
        extent.cols = std::max(extent.cols, j + 1);
      }
    }
  }
  return extent;
}

// The right operand of a product by an (r, c) matrix, or by its transpose: its nonzero
// block, `inner` rows of `cols` columns (whole register blocks), of which the first `live`
// give the product's results; the padded result's others are 0. Stored as the product
// reads it: each column block of `ColumnBlocks` (`width` columns from j0) apart, its
// `inner` rows one after another at Panel(j0), so that the product reads b in order.
template <typename T>
struct Operand {
  int64_t inner, live, cols;
  std::vector<T> values;

  const T* Panel(int64_t j0) const { return values.data() + inner * j0; }

  // A row of the product into a result row `width` wide.
  void Keep(const T* product, T* into, int64_t width) const {
    std::copy(product, product + live, into);
    std::fill(into + live, into + width, T(0));
  }
};

template <typename T>
Operand<T> NonzeroOperand(const T* m, int64_t r, int64_t c, bool transposed) {
  const Extent e = NonzeroExtent(m, r, c);
  Operand<T> b;
  b.inner = transposed ? e.cols : e.rows;
  b.live = transposed ? e.rows : e.cols;
  b.cols = Padded<T>(b.live);
  b.values.assign(b.inner * b.cols, T(0));
  // b's entry (i, j): m's (i, j), or its (j, i) when transposed; 0 past the nonzero block
  auto entry = [&](int64_t i, int64_t j) {
    const int64_t row = transposed ? j : i, col = transposed ? i : j;
    return row < e.rows && col < e.cols ? m[row * c + col] : T(0);
  };
  ColumnBlocks<T>(0, b.cols, [&](auto vectors, int64_t j0) {
    const int64_t width = decltype(vectors)::value * kLanes<T>;
    T* panel = b.values.data() + b.inner * j0;
    for (int64_t i = 0; i < b.inner; ++i) {
      for (int64_t j = 0; j < width; ++j) panel[i * width + j] = entry(i, j0 + j);
    }
  });
  return b;
}

// out (rows, b.cols) = a (rows, b.inner) b, row-major: `rows` a multiple of kRows. Each
// block of the result is summed in registers.
template <typename T>
void Product(const T* a, int64_t rows, const Operand<T>& b, T* out) {
  constexpr int64_t lanes = kLanes<T>;
  const int64_t inner = b.inner, cols = b.cols;
  for (int64_t k0 = 0; k0 < rows; k0 += kRows) {
    ColumnBlocks<T>(0, cols, [&](auto vectors, int64_t j0) {
      constexpr int64_t V = decltype(vectors)::value, width = V * lanes;
      const T* panel = b.Panel(j0);
      Vec<T> acc[kRows][V] = {};
      for (int64_t i = 0; i < inner; ++i) {
        Vec<T> w[V];
        for (int64_t v = 0; v < V; ++v) w[v] = Load(panel + i * width + v * lanes);
        for (int64_t k = 0; k < kRows; ++k) {
          for (int64_t v = 0; v < V; ++v) acc[k][v] += a[(k0 + k) * inner + i] * w[v];
        }
      }
      for (int64_t k = 0; k < kRows; ++k) {
        T* into = out + (k0 + k) * cols + j0;
        for (int64_t v = 0; v < V; ++v) Store(acc[k][v], into + v * lanes);
      }
    });
  }
}

// Rows [q0, q1) in chunks of `chunk` rows (a multiple of kRows): fill(q, into) writes row
// q's operand (b.inner wide; each call the same entries: what it leaves unwritten stays 0)
// and says whether its product is needed; the needed rows of each chunk are multiplied by
// b while in cache, and use(q, product) reads row q's product back (b.cols wide), zeros for
// the rows not needed (padding rows, rows a mask drops), which are not multiplied.
template <typename T, typename Fill, typename Use>
void ChunkProducts(int64_t q0, int64_t q1, int64_t chunk, const Operand<T>& b, Fill fill,
                   Use use) {
  const int64_t in = b.inner, out = b.cols;
  std::vector<T> a(chunk * in, T(0)), product(chunk * out);
  const std::vector<T> zeros(out, T(0));
  std::vector<int64_t> needed(chunk);
  for (int64_t q = q0; q < q1; q += chunk) {
    const int64_t count = std::min(chunk, q1 - q);
    int64_t live = 0;
    for (int64_t k = 0; k < count; ++k) {
      if (fill(q + k, a.data() + live * in)) {
        needed[live++] = q + k;
      } else {
        use(q + k, zeros.data());
      }
    }
    const int64_t used = (live + kRows - 1) / kRows * kRows;
    std::fill(a.begin() + live * in, a.begin() + used * in, T(0));
    Product(a.data(), used, b, product.data());
    for (int64_t k = 0; k < live; ++k) use(needed[k], product.data() + k * out);
  }
}

constexpr int64_t kParts = 16;  // about how many parts rows are summed in, for the threads

// Rows per part, a whole number of `chunk`s, when `count` rows are summed in about kParts
// parts: a function of the count only, so that no sum depends on the threads.
inline int64_t PartRows(int64_t count, int64_t chunk) {
  const int64_t chunks = (count + chunk - 1) / chunk;
  return std::max<int64_t>(1, (chunks + kParts - 1) / kParts) * chunk;
}

// Per-part sums in double, merged over the parts in order into `into` (of type T).
template <typename T>
void MergeParts(const std::vector<std::vector<double>>& parts, int64_t size, T* into) {
  for (int64_t j = 0; j < size; ++j) {
    double sum = 0;
    for (const std::vector<double>& part : parts) sum += part[j];
    into[j] = static_cast<T>(sum);
  }
}

// Whether buffer b has the dimensions `dims` and the element type `type`.
bool Shaped(ffi::AnyBuffer b, std::initializer_list<int64_t> dims, ffi::DataType type) {
  const auto d = b.dimensions();
  return b.element_type() == type && std::equal(d.begin(), d.end(), dims.begin(), dims.end());
}

// run(T{}) with T the C++ type of `type`, float or double (run returns nothing or an
// ffi::Error); for other types, an error that names the call `what`.
template <typename Run>
ffi::Error ForFloatType(ffi::DataType type, const char* what, Run&& run) {
  auto call = [&](auto zero) -> ffi::Error {
    if constexpr (std::is_void_v<decltype(run(zero))>) {
      run(zero);
      return ffi::Error::Success();
    } else {
      return run(zero);
    }
  };
  if (type == ffi::DataType::F32) return call(float{});
  if (type == ffi::DataType::F64) return call(double{});
  return ffi::Error::InvalidArgument(std::string(what) + ": float32 or float64 only");
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

}  // namespace
