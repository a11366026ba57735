// Work split over threads of this module's own, started per call and joined before it returns.
// Not OpenMP: torch's wheel ships its own OpenMP runtime, and a second one in the process would keep
// its idle threads spinning beside torch's GEMM threads on the same cores.
#pragma once

#include <cstdint>

namespace qft::cpu {

// Threads a large call may use (default: the hardware's; qft sets torch.get_num_threads()).
int num_threads();
void set_num_threads(int threads);

// fn(begin, end) over [0, count) in contiguous pieces, one per thread; single-threaded when `work`
// (about the bytes touched) is too small to pay for starting threads.
template <typename Fn>
void parallel_for(int64_t count, int64_t work, Fn&& fn);

}  // namespace qft::cpu

#include "parallel_impl.h"
