// Work split over threads: OpenMP's, when the module is built with it. Torch's wheel ships libgomp
// (soname libgomp.so.1) and loads it before this module, so the dynamic loader binds this module to that
// same runtime: its parallel regions run on torch's own warm thread team (about 2 us to start one on
// this project's machine, against about 100 us for starting a std::thread), and no second team of
// spinning threads competes with torch's GEMM. Built without OpenMP, every call runs on one thread.
#pragma once

#include <cstdint>

namespace qft::cpu {

// Threads a large call may use (default: OpenMP's, which torch.set_num_threads sets; 1 without OpenMP).
int num_threads();
void set_num_threads(int threads);

// Whether the module was built with OpenMP (without it, parallel_for runs on the caller's thread).
bool built_with_openmp();

// fn(begin, end) over [0, count) in contiguous pieces, one per thread; on the caller's thread alone when
// `work` (about the bytes touched) is too small to pay for waking a team.
template <typename Fn>
void parallel_for(int64_t count, int64_t work, Fn&& fn);

}  // namespace qft::cpu

#include "parallel_impl.h"
