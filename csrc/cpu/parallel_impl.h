// parallel_for's body (parallel.h): a template, so each kernel's loop inlines into its thread.
#pragma once

#include <algorithm>
#include <thread>
#include <vector>

namespace qft::cpu {

// Below this many bytes touched a call runs on the caller's thread: starting a thread costs tens of
// microseconds, about what 1 MiB of decode costs.
constexpr int64_t kParallelMinWork = int64_t{4} << 20;

template <typename Fn>
void parallel_for(int64_t count, int64_t work, Fn&& fn) {
  const int64_t threads = std::min<int64_t>(num_threads(), count);
  if (threads <= 1 || work < kParallelMinWork) {
    if (count > 0) fn(int64_t{0}, count);
    return;
  }
  std::vector<std::thread> pool;
  pool.reserve(threads - 1);
  const int64_t piece = (count + threads - 1) / threads;
  int64_t inline_from = threads;  // pieces no thread could be started for run here
  for (int64_t t = 1; t < threads; ++t) {
    const int64_t begin = t * piece, end = std::min(count, begin + piece);
    if (begin >= end) continue;
    try {
      pool.emplace_back([&fn, begin, end] { fn(begin, end); });
    } catch (...) {  // out of threads: nothing may throw out of a kernel
      inline_from = t;
      break;
    }
  }
  fn(int64_t{0}, std::min(count, piece));
  for (int64_t t = inline_from; t < threads; ++t) {
    const int64_t begin = t * piece, end = std::min(count, begin + piece);
    if (begin < end) fn(begin, end);
  }
  for (auto& thread : pool) thread.join();
}

}  // namespace qft::cpu
