// qft::cpu::quant_gemv: y = x W^T (+ bias) (+ scaling xa B^T) for a few rows of x, W decoded on the fly
// and never written out. As the CUDA GEMV (csrc/gemv_core.cuh) it multiplies code values (the code book's,
// or q itself for affine formats) with x in fp32 and scales each block's partial sums once:
// scale * (sum(level(q) x) - zero * sum(x)); the decoded weights are not rounded to x's dtype, so y is
// closer to the exact product than decode-then-matmul, not bit-equal to it.
#include <algorithm>
#include <cstring>
#include <vector>

#include "convert.h"
#include "cpu_kernels.h"
#include "parallel.h"
#include "weight.h"

#if defined(__x86_64__)
#include <immintrin.h>
#define QFT_X86 1
#endif

namespace qft::cpu {
namespace {

constexpr int kChunk = 32;  // values decoded per step: one packing unit at 3 bits, two at 2, 16 bytes at 4

// The codes of values [flat, flat + 32) (flat a multiple of 32), one byte each.
void codes32(const Weight& w, int64_t flat, uint8_t* q) {
  if (w.bits == 4) {
    const uint8_t* bytes = static_cast<const uint8_t*>(w.codes) + flat / 2;
    for (int j = 0; j < 16; ++j) q[2 * j] = bytes[j] >> 4, q[2 * j + 1] = bytes[j] & 0xF;
  } else if (w.bits == 2) {
    const uint32_t* words = static_cast<const uint32_t*>(w.codes) + flat / 16;
    for (int i = 0; i < 32; ++i) q[i] = (words[i / 16] >> (2 * (i % 16))) & 3u;
  } else {
    const uint32_t* unit = static_cast<const uint32_t*>(w.codes) + 3 * (flat / 32);
    for (int i = 0; i < 32; ++i) q[i] = ((unit[i / 16] >> (2 * (i % 16))) & 3u) | (((unit[2] >> i) & 1u) << 2);
  }
}

struct Problem {
  const Weight& w;
  const float* x;     // [rows, k] fp32
  const float* xsum;  // [rows, k / 32]: sums of x per chunk (formats with zeros), else nullptr
  int rows;
  int64_t n, k;
  float* acc;  // [rows, n]
};

// One weight row's dot products with every x row, scalar.
void row_scalar(const Problem& p, const float* levels, int64_t row, float* out) {
  float total[kMaxCpuGemvRows] = {}, part[kMaxCpuGemvRows] = {}, seg[kMaxCpuGemvRows] = {};
  int64_t block = -1;
  float scale = 0.0f, zero = 0.0f;
  uint8_t q[kChunk];
  const int64_t chunks = p.k / kChunk;
  auto flush = [&] {
    for (int m = 0; m < p.rows; ++m) total[m] += scale * (part[m] - zero * seg[m]), part[m] = seg[m] = 0.0f;
  };
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t flat = row * p.k + c * kChunk, b = flat / p.w.block_size;
    if (b != block) {
      flush();
      block = b, scale = block_scale(p.w, b);
      zero = block_zero(p.w, b);
    }
    codes32(p.w, flat, q);
    for (int m = 0; m < p.rows; ++m) {
      const float* xm = p.x + m * p.k + c * kChunk;
      float s = 0.0f;
      for (int i = 0; i < kChunk; ++i) s += levels[q[i]] * xm[i];
      part[m] += s;
      if (p.xsum != nullptr) seg[m] += p.xsum[m * chunks + c];
    }
  }
  flush();
  for (int m = 0; m < p.rows; ++m) out[m * p.n] = total[m];
}

#ifdef QFT_X86
#define QFT_AVX2 __attribute__((target("avx2,fma,f16c")))

QFT_AVX2 inline float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

// A block's partial sums into the row's totals: scale * (sum(level x) - zero * sum(x)).
template <int kRows>
QFT_AVX2 inline void flush_avx2(float scale, float zero, __m256* part, float* seg, __m256* total, float* ztotal) {
  const __m256 s = _mm256_set1_ps(scale);
  for (int m = 0; m < kRows; ++m) {
    total[m] = _mm256_fmadd_ps(part[m], s, total[m]);
    ztotal[m] += scale * zero * seg[m];
    part[m] = _mm256_setzero_ps(), seg[m] = 0.0f;
  }
}

// The same with 8 values per instruction: level lookups by permutes, one fused multiply-add per x row.
template <int kRows>
QFT_AVX2 void row_avx2(const Problem& p, const float* levels, int64_t row, float* out) {
  const __m256 first = _mm256_loadu_ps(levels), second = _mm256_loadu_ps(levels + 8);
  __m256 total[kRows], part[kRows];
  float ztotal[kRows] = {}, seg[kRows] = {};
  for (int m = 0; m < kRows; ++m) total[m] = part[m] = _mm256_setzero_ps();
  int64_t block = -1;
  float scale = 0.0f, zero = 0.0f;
  alignas(32) uint8_t q[kChunk];
  const int64_t chunks = p.k / kChunk;
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t flat = row * p.k + c * kChunk, b = flat / p.w.block_size;
    if (b != block) {
      flush_avx2<kRows>(scale, zero, part, seg, total, ztotal);
      block = b, scale = block_scale(p.w, b);
      zero = block_zero(p.w, b);
    }
    __m128i lo, hi;  // the 32 codes as bytes, values 0-15 and 16-31
    if (p.w.bits == 4) {
      const uint8_t* codes = static_cast<const uint8_t*>(p.w.codes) + flat / 2;
      const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes));
      const __m128i mask = _mm_set1_epi8(0x0F);
      const __m128i h = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask), l = _mm_and_si128(bytes, mask);
      lo = _mm_unpacklo_epi8(h, l), hi = _mm_unpackhi_epi8(h, l);
    } else {
      codes32(p.w, flat, q);
      lo = _mm_load_si128(reinterpret_cast<const __m128i*>(q));
      hi = _mm_load_si128(reinterpret_cast<const __m128i*>(q + 16));
    }
    for (int g = 0; g < 4; ++g) {
      const __m128i eight = g == 0 ? lo : g == 1 ? _mm_srli_si128(lo, 8) : g == 2 ? hi : _mm_srli_si128(hi, 8);
      const __m256i idx = _mm256_cvtepu8_epi32(eight);
      const __m256 pick = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28));
      const __m256 v =
          _mm256_blendv_ps(_mm256_permutevar8x32_ps(first, idx), _mm256_permutevar8x32_ps(second, idx), pick);
      for (int m = 0; m < kRows; ++m)
        part[m] = _mm256_fmadd_ps(v, _mm256_loadu_ps(p.x + m * p.k + c * kChunk + 8 * g), part[m]);
    }
    if (p.xsum != nullptr)
      for (int m = 0; m < kRows; ++m) seg[m] += p.xsum[m * chunks + c];
  }
  flush_avx2<kRows>(scale, zero, part, seg, total, ztotal);
  for (int m = 0; m < kRows; ++m) out[m * p.n] = hsum(total[m]) - ztotal[m];
}

template <int kRows>
QFT_AVX2 void rows_avx2(const Problem& p, const float* levels, int64_t first, int64_t last) {
  for (int64_t row = first; row < last; ++row) row_avx2<kRows>(p, levels, row, p.acc + row);
}

void rows_vector(const Problem& p, const float* levels, int64_t first, int64_t last) {
  switch (p.rows) {
    case 1: return rows_avx2<1>(p, levels, first, last);
    case 2: return rows_avx2<2>(p, levels, first, last);
    case 3: return rows_avx2<3>(p, levels, first, last);
    case 4: return rows_avx2<4>(p, levels, first, last);
    case 5: return rows_avx2<5>(p, levels, first, last);
    case 6: return rows_avx2<6>(p, levels, first, last);
    case 7: return rows_avx2<7>(p, levels, first, last);
    default: return rows_avx2<8>(p, levels, first, last);
  }
}
#endif

}  // namespace

int quant_gemv(const Weight& w, const void* x, DType x_dtype, int rows, int64_t n_out, int64_t k_in, const void* bias,
               DType bias_dtype, const float* lora_xa, const float* lora_b, int rank, float scaling, void* y) {
  const bool shape_ok = rows >= 1 && rows <= kMaxCpuGemvRows && n_out > 0 && k_in > 0 && k_in % kChunk == 0 &&
                        w.numel == n_out * k_in && w.block_size >= kChunk && w.block_size % kChunk == 0;
  const bool lora_ok = (lora_xa == nullptr) == (lora_b == nullptr) && (lora_xa == nullptr || rank > 0);
  if (!shape_ok || !weight_parts_ok(w) || x == nullptr || y == nullptr || !lora_ok)
    return kInvalidValue;
  // x in fp32, and its sums per chunk where blocks have zeros (scale * zero * sum(x) leaves the dot product).
  std::vector<float> xf(static_cast<size_t>(rows) * k_in), xsum;
  for (int64_t i = 0; i < rows * k_in; ++i) xf[i] = load_float(x, x_dtype, i);
  if (w.zeros != nullptr) {
    xsum.resize(static_cast<size_t>(rows) * (k_in / kChunk));
    for (size_t c = 0; c < xsum.size(); ++c) {
      float s = 0.0f;
      for (int i = 0; i < kChunk; ++i) s += xf[c * kChunk + i];
      xsum[c] = s;
    }
  }
  float levels[16] = {};
  for (int i = 0; i < (1 << w.bits); ++i) levels[i] = w.affine ? static_cast<float>(i) : w.code[i];
  std::vector<float> acc(static_cast<size_t>(rows) * n_out);
  const Problem p{w, xf.data(), xsum.empty() ? nullptr : xsum.data(), rows, n_out, k_in, acc.data()};
  const bool vector = active_isa() >= Isa::kAvx2;
  parallel_for(n_out, w.numel * w.bits / 8, [&](int64_t first, int64_t last) {
#ifdef QFT_X86
    if (vector) return rows_vector(p, levels, first, last);
#endif
    for (int64_t row = first; row < last; ++row) row_scalar(p, levels, row, p.acc + row);
  });
  // The epilogue as the reference orders it: + bias, + scaling * (xa B^T), one rounding to x's dtype. The
  // LoRA sums run over r in the outer loop, so consecutive n are independent (no serial add chain).
  std::vector<float> lora(lora_xa != nullptr ? n_out : 0);
  for (int m = 0; m < rows; ++m) {
    if (lora_xa != nullptr) {
      std::fill(lora.begin(), lora.end(), 0.0f);
      for (int r = 0; r < rank; ++r) {
        const float a = lora_xa[m * rank + r];
        for (int64_t n = 0; n < n_out; ++n) lora[n] += a * lora_b[n * rank + r];
      }
    }
    for (int64_t n = 0; n < n_out; ++n) {
      float v = acc[m * n_out + n];
      if (bias != nullptr) v += load_float(bias, bias_dtype, n);
      if (lora_xa != nullptr) v += scaling * lora[n];
      store_float(y, x_dtype, m * n_out + n, v);
    }
  }
  return kOk;
}

}  // namespace qft::cpu
