// Which instruction set the kernels run with: what the CPU reports, capped by set_isa_cap; and the
// module's thread count.
#include <algorithm>
#include <atomic>
#include <string>

#if defined(_OPENMP) && defined(__linux__)
#include <dlfcn.h>
#endif

#include "cpu_kernels.h"
#include "parallel.h"

namespace qft::cpu {
namespace {

std::atomic<int> isa_cap{static_cast<int>(Isa::kAvx512Bf16)};
std::atomic<int> threads{0};  // 0: OpenMP's count
std::atomic<bool> openmp_enabled{true};  // false: qft found a second OpenMP runtime beside torch's

}  // namespace

Isa detected_isa() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  if (native_bf16() && avx512 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c"))
    return Isa::kAvx512Bf16;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return Isa::kAvx2;
#endif
  return Isa::kScalar;
}

Isa active_isa() {
  static const Isa detected = detected_isa();
  return static_cast<Isa>(std::min(static_cast<int>(detected), isa_cap.load()));
}

void set_isa_cap(Isa cap) { isa_cap.store(static_cast<int>(cap)); }

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512Bf16:
      return "avx512bf16";
    case Isa::kAvx2:
      return "avx2";
    default:
      return "scalar";
  }
}

bool native_bf16() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

int num_threads() {
  const int set = threads.load();
#ifdef _OPENMP
  if (!openmp_enabled.load()) return 1;
  return set > 0 ? set : std::max(1, omp_get_max_threads());
#else
  return set > 0 ? set : 1;
#endif
}

bool built_with_openmp() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

std::string openmp_library() {
#if defined(_OPENMP) && defined(__linux__)
  Dl_info info{};
  if (dladdr(reinterpret_cast<void*>(&omp_get_max_threads), &info) != 0 && info.dli_fname != nullptr)
    return info.dli_fname;
#endif
  return "";
}

void set_openmp_enabled(bool enabled) { openmp_enabled.store(enabled); }

void set_num_threads(int count) { threads.store(std::max(0, count)); }

}  // namespace qft::cpu
