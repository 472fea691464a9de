// What the engine's XLA:CPU custom calls share: GCC vectors of 64 bytes and a parallel loop
// on XLA's intra-op threads.

#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

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

template <typename T>
constexpr int64_t kLanes = sizeof(Vec<T>) / sizeof(T);

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
