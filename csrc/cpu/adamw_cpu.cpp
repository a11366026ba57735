// qft::cpu::adamw_step: torch.optim.AdamW's update of one tensor, the moments in fp32 or in moments8's
// 8-bit blocks of 256 (decoded, updated and encoded again block by block, so no fp32 copy of a moment
// is ever whole). The arithmetic is the fused Triton step's (kernels/adamw.py): torch's lerp and addcmul
// as one fused multiply-add each, addcdiv as p + (value * m) / denom.
#include <algorithm>
#include <cmath>
#include <cstring>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "convert.h"
#include "cpu_kernels.h"
#include "parallel.h"

namespace qft::cpu {
namespace {

constexpr int kBlock = 256;     // moments8.BLOCK
constexpr float kFloor = 1e-38f;  // qft.formats.ABSMAX_FLOOR

struct Step {
  void* p;
  DType p_dtype;
  const void* g;
  DType g_dtype;
  void* m;
  void* v;
  float* m_absmax;
  float* v_absmax;
  int64_t numel;
  AdamWScalars s;
  const float* maps;
  const int32_t* first;
  const float* mids;
};

#define QFT_INLINE __attribute__((always_inline)) inline

// The fp32 update of `count` values in place: p (its new value), m and v. std::fma on floats is fmaf:
// one rounding, an instruction where the caller is compiled for FMA, libm's exact routine elsewhere.
// kSmall: torch's lerp for a weight below 0.5 (w1 = 1 - beta1 < 0.5), start + w (end - start).
template <bool kSmall>
QFT_INLINE void update(const AdamWScalars& s, const float* g_in, float* p, float* m, float* v, int count) {
  for (int i = 0; i < count; ++i) {
    const float g = g_in[i] * s.sign;
    const float d = g - m[i];
    m[i] = kSmall ? std::fma(s.w1, d, m[i]) : std::fma(s.w1 - 1.0f, d, g);
    v[i] = std::fma(s.w2 * g, g, v[i] * s.beta2);
    const float denom = std::sqrt(v[i]) / s.bc2_sqrt + s.eps;
    p[i] = p[i] * s.decay + (s.neg_step * m[i]) / denom;
  }
}

// count values of a float tensor from `start`, widened to fp32 (one loop per dtype, so each vectorizes).
QFT_INLINE void widen(const void* base, DType dtype, int64_t start, int count, float* out) {
  if (dtype == DType::kFloat32) {
    std::memcpy(out, static_cast<const float*>(base) + start, count * sizeof(float));
    return;
  }
  const uint16_t* in = static_cast<const uint16_t*>(base) + start;
  if (dtype == DType::kBFloat16) {
    for (int i = 0; i < count; ++i) out[i] = from_bf16(in[i]);
  } else {
    for (int i = 0; i < count; ++i) out[i] = from_fp16(in[i]);
  }
}

QFT_INLINE void narrow(const float* in, void* base, DType dtype, int64_t start, int count) {
  if (dtype == DType::kFloat32) {
    std::memcpy(static_cast<float*>(base) + start, in, count * sizeof(float));
    return;
  }
  uint16_t* out = static_cast<uint16_t*>(base) + start;
  if (dtype == DType::kBFloat16) {
    for (int i = 0; i < count; ++i) out[i] = bf16_bits(in[i]);
  } else {
    for (int i = 0; i < count; ++i) out[i] = fp16_bits(in[i]);
  }
}

// moments8.nearest_codes for one value in [-1, 1]: the table's first candidate, then one comparison.
QFT_INLINE uint8_t nearest_code(float scaled, const int32_t* first, const float* mids) {
  const uint32_t high = bits_of(scaled) >> 16;
  const uint32_t key = high < 0x8000u ? high + 0x8000u : 0xFFFFu - high;
  const int32_t lower = first[key];
  return static_cast<uint8_t>(lower + (mids[lower] < scaled ? 1 : 0));
}

#if defined(__x86_64__)
// nearest_code for 8 values at a time: the key by xor (high + 0x8000 is high ^ 0x8000 below 0x8000,
// 0xFFFF - high is high ^ 0xFFFF above), both table reads by gathers.
__attribute__((target("avx2"))) void nearest_codes_avx2(const float* scaled, int count, uint8_t* codes,
                                                        const int32_t* first, const float* mids) {
  alignas(32) int32_t out[kBlock];
  int i = 0;
  for (; i + 8 <= count; i += 8) {
    const __m256 x = _mm256_loadu_ps(scaled + i);
    const __m256i bits = _mm256_castps_si256(x);
    const __m256i flip = _mm256_or_si256(_mm256_set1_epi32(0x8000),
                                         _mm256_and_si256(_mm256_srai_epi32(bits, 31), _mm256_set1_epi32(0x7FFF)));
    const __m256i key = _mm256_xor_si256(_mm256_srli_epi32(bits, 16), flip);
    const __m256i lower = _mm256_i32gather_epi32(first, key, 4);
    const __m256 mid = _mm256_i32gather_ps(mids, lower, 4);
    const __m256i above = _mm256_castps_si256(_mm256_cmp_ps(mid, x, _CMP_LT_OQ));  // -1 where mid < x
    _mm256_store_si256(reinterpret_cast<__m256i*>(out + i), _mm256_sub_epi32(lower, above));
  }
  for (int k = 0; k < i; ++k) codes[k] = static_cast<uint8_t>(out[k]);
  for (; i < count; ++i) codes[i] = nearest_code(scaled[i], first, mids);
}
#endif

// moments8.quantize of one block: NaN stored as 0, codes of value / max(absmax, floor). Simple loops,
// each vectorizable: |x| compared as integer bits (for non-NaN floats the same order).
template <bool kVector>
QFT_INLINE void encode_block(float* values, int count, uint8_t* codes, float* absmax, const int32_t* first,
                             const float* mids) {
  uint32_t top = 0;
  for (int i = 0; i < count; ++i) {
    const uint32_t u = bits_of(values[i]) & 0x7FFFFFFFu;
    const bool nan = u > 0x7F800000u;
    values[i] = nan ? 0.0f : values[i];
    top = std::max(top, nan ? 0u : u);
  }
  *absmax = float_of(top);
  const float divisor = std::fmax(float_of(top), kFloor);
  float scaled[kBlock];
  for (int i = 0; i < count; ++i) scaled[i] = values[i] / divisor;
#if defined(__x86_64__)
  if constexpr (kVector) return nearest_codes_avx2(scaled, count, codes, first, mids);
#endif
  for (int i = 0; i < count; ++i) codes[i] = nearest_code(scaled[i], first, mids);
}

template <bool kVector>
QFT_INLINE void step_blocks(const Step& t, int64_t first_block, int64_t last_block) {
  const bool eight = t.m_absmax != nullptr;
  float p[kBlock], g[kBlock], m[kBlock], v[kBlock];
  for (int64_t block = first_block; block < last_block; ++block) {
    const int64_t start = block * kBlock;
    const int count = static_cast<int>(std::min<int64_t>(kBlock, t.numel - start));
    if (eight) {
      const uint8_t* mc = static_cast<const uint8_t*>(t.m) + start;
      const uint8_t* vc = static_cast<const uint8_t*>(t.v) + start;
      const float ma = t.m_absmax[block], va = t.v_absmax[block];
      for (int i = 0; i < count; ++i) m[i] = t.maps[mc[i]] * ma;
      for (int i = 0; i < count; ++i) v[i] = t.maps[256 + vc[i]] * va;
    } else {
      widen(t.m, DType::kFloat32, start, count, m);
      widen(t.v, DType::kFloat32, start, count, v);
    }
    widen(t.p, t.p_dtype, start, count, p);
    widen(t.g, t.g_dtype, start, count, g);
    if (t.s.w1 < 0.5f)
      update<true>(t.s, g, p, m, v, count);
    else
      update<false>(t.s, g, p, m, v, count);
    narrow(p, t.p, t.p_dtype, start, count);
    if (eight) {
      encode_block<kVector>(m, count, static_cast<uint8_t*>(t.m) + start, t.m_absmax + block, t.first, t.mids);
      uint8_t* v_codes = static_cast<uint8_t*>(t.v) + start;
      encode_block<kVector>(v, count, v_codes, t.v_absmax + block, t.first + 65536, t.mids + 256);
    } else {
      narrow(m, t.m, DType::kFloat32, start, count);
      narrow(v, t.v, DType::kFloat32, start, count);
    }
  }
}

#if defined(__x86_64__)
__attribute__((target("avx2,fma"))) void step_blocks_fma(const Step& t, int64_t first, int64_t last) {
  step_blocks<true>(t, first, last);
}
#endif

}  // namespace

int adamw_step(void* p, DType p_dtype, const void* g, DType g_dtype, void* m, void* v, float* m_absmax,
               float* v_absmax, int64_t numel, const AdamWScalars& s, const float* maps, const int32_t* first,
               const float* mids) {
  if (numel <= 0) return kOk;
  if (p == nullptr || g == nullptr || m == nullptr || v == nullptr || (m_absmax == nullptr) != (v_absmax == nullptr))
    return kInvalidValue;
  if (m_absmax != nullptr && (maps == nullptr || first == nullptr || mids == nullptr)) return kInvalidValue;
  const Step t{p, p_dtype, g, g_dtype, m, v, m_absmax, v_absmax, numel, s, maps, first, mids};
  const int64_t blocks = (numel + kBlock - 1) / kBlock;
  const bool fma = active_isa() >= Isa::kAvx2;
  parallel_for(blocks, numel * 16, [&](int64_t first_block, int64_t last_block) {
#if defined(__x86_64__)
    if (fma) return step_blocks_fma(t, first_block, last_block);
#endif
    step_blocks<false>(t, first_block, last_block);
  });
  return kOk;
}

}  // namespace qft::cpu
