// Work split over threads: OpenMP's, when the module is built with it. Torch's wheel ships libgomp
// (soname libgomp.so.1 in torch 2.13's wheels) and loads it before this module, so the dynamic loader
// binds this module to that same runtime: its parallel regions run on torch's own warm thread team
// (about 2 us to start one on this project's machine, against about 100 us for a std::thread), and no
// second team of spinning threads competes with torch's GEMM. Built without OpenMP, or beside a second
// runtime (qft._extension checks), every call runs on one thread.
#pragma once

#include <cstdint>
#include <string>

namespace qft::cpu {

// Threads a large call may use (default: OpenMP's, which torch.set_num_threads sets; 1 without OpenMP).
int num_threads();
void set_num_threads(int threads);

// Whether the module was built with OpenMP (without it, parallel_for runs on the caller's thread).
bool built_with_openmp();

// The file of the OpenMP runtime this module is bound to ("" unknown or none): qft compares it with
// torch's, and where they differ (a torch whose libgomp carries another name) it calls
// set_openmp_enabled(false), so no second team of threads ever starts and every call runs on one thread.
std::string openmp_library();
void set_openmp_enabled(bool enabled);

// fn(begin, end) over [0, count) in contiguous pieces, one per thread; on the caller's thread alone when
// `work` (about the bytes touched) is too small to pay for waking a team.
template <typename Fn>
void parallel_for(int64_t count, int64_t work, Fn&& fn);

}  // namespace qft::cpu

#include "parallel_impl.h"
