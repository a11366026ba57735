// parallel_for's body (parallel.h): a template, so each kernel's loop inlines into its thread.
#pragma once

#include <algorithm>
#include <exception>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace qft::cpu {

// Below this many bytes touched a call runs on the caller's thread: waking torch's team costs a few
// microseconds (tens when its threads have gone to sleep), about what 256 KiB of decode costs.
constexpr int64_t kParallelMinWork = int64_t{256} << 10;

template <typename Fn>
void parallel_for(int64_t count, int64_t work, Fn&& fn) {
#ifdef _OPENMP
  const int64_t threads = std::min<int64_t>(num_threads(), count);
  // Inside a team already (a caller's own parallel region), nesting would oversubscribe: run inline.
  if (threads > 1 && work >= kParallelMinWork && !omp_in_parallel()) {
    std::exception_ptr error;  // an exception must not leave a parallel region (std::terminate)
#pragma omp parallel num_threads(static_cast<int>(threads))
    {
      const int64_t team = omp_get_num_threads(), piece = (count + team - 1) / team;
      const int64_t begin = omp_get_thread_num() * piece, end = std::min(count, begin + piece);
      try {
        if (begin < end) fn(begin, end);
      } catch (...) {
#pragma omp critical(qft_parallel_for_error)
        if (!error) error = std::current_exception();
      }
    }
    if (error) std::rethrow_exception(error);
    return;
  }
#else
  static_cast<void>(work);
#endif
  if (count > 0) fn(int64_t{0}, count);
}

}  // namespace qft::cpu
