// AVX-512 pieces shared by the kernels that run at Isa::kAvx512Bf16 (functions compiled for that set
// by target attribute, so the rest of the module stays runnable on any x86-64).
#pragma once

#if defined(__x86_64__)
#include <immintrin.h>

// GCC 12's AVX-512 headers start some intrinsics from _mm512_undefined_*, which -Wall reports as
// (maybe-)uninitialized wherever they inline; the value is never read.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

#define QFT_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")))

namespace qft::cpu {

// 16 fp32 values as bf16 bits, round to nearest even, every NaN the quiet 0x7FC0 (convert.h's bf16_bits).
QFT_AVX512_BF16 inline __m256i bf16_of(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb), 16);
  rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(rounded);
}

// 16 bf16 values as fp32, exactly (bf16 is fp32's upper half).
QFT_AVX512_BF16 inline __m512 fp32_of(__m256i bf16) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bf16), 16));
}

}  // namespace qft::cpu

#endif
