// qft::cpu::bf16_times_fp32_nt and fp32_tn_times_bf16 (cpu_kernels.h): LoRA's thin products between bf16
// activations and fp32 adapters (x A^T forward; g B, grad_xa^T x and xa^T g backward). The reference
// widens the activations into an fp32 copy and calls torch's fp32 GEMM; here each bf16 value is widened in
// a register as it is read (exactly: bf16 is fp32's upper half), so no fp32 tensor of x's size is written.
// Products and sums in fp32 by fused multiply-adds, in another order than torch's: not its bits.
#include <algorithm>

#include "avx512.h"
#include "cpu_kernels.h"
#include "parallel.h"

#if defined(__x86_64__)
#define QFT_X86 1
#endif

namespace qft::cpu {
namespace {

#ifdef QFT_X86
#define QFT_BF16 QFT_AVX512_BF16

constexpr int kNtRows = 4;     // nt: rows per pass
constexpr int kNtOuts = 4;     // nt: outputs per pass (16 accumulators)
constexpr int kTnOuts = 4;     // tn: outputs per pass
constexpr int kTnVectors = 4;  // tn: 16-column vectors per pass (64 columns: 16 accumulators)

// Up to 16 bf16 values at p (mask: which) as fp32 lanes, exactly.
QFT_BF16 inline __m512 widen(const uint16_t* p, __mmask16 mask) {
  return fp32_of(_mm256_maskz_loadu_epi16(mask, p));
}

QFT_BF16 inline __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1u);
}

// out[m, j] for four rows (a short last group repeats a row and stores it once) and outputs [j0, j0 + G):
// each sum in 16 lanes over k (k, k + 16, ... in order), then the lanes added. Four rows per pass, so each
// load of f serves four multiply-adds; G a template argument, so the accumulators stay in registers.
template <int G>
QFT_BF16 void nt_pass(const uint16_t* const* rows, int64_t width, const float* f, float* const* outs) {
  __m512 acc[kNtRows * G];  // one flat, fully unrolled array: GCC keeps it in registers
#pragma GCC unroll 16
  for (int i = 0; i < kNtRows * G; ++i) acc[i] = _mm512_setzero_ps();
  const int64_t whole = width / 16 * 16;
  for (int64_t k = 0; k < width; k += 16) {
    const __mmask16 mask = k < whole ? static_cast<__mmask16>(0xFFFF) : tail_mask(width - k);
    __m512 x[kNtRows];
#pragma GCC unroll 4
    for (int r = 0; r < kNtRows; ++r) x[r] = widen(rows[r] + k, mask);
#pragma GCC unroll 4
    for (int g = 0; g < G; ++g) {
      const __m512 fv = _mm512_maskz_loadu_ps(mask, f + g * width + k);
#pragma GCC unroll 4
      for (int r = 0; r < kNtRows; ++r) acc[r * G + g] = _mm512_fmadd_ps(x[r], fv, acc[r * G + g]);
    }
  }
  float sums[kNtRows * G];
#pragma GCC unroll 16
  for (int i = 0; i < kNtRows * G; ++i) sums[i] = _mm512_reduce_add_ps(acc[i]);
  for (int r = 0; r < kNtRows; ++r)
    if (outs[r] != nullptr)
      for (int g = 0; g < G; ++g) outs[r][g] = sums[r * G + g];
}

using NtPass = void (*)(const uint16_t* const*, int64_t, const float*, float* const*);
constexpr NtPass kNtPasses[kNtOuts] = {nt_pass<1>, nt_pass<2>, nt_pass<3>, nt_pass<4>};

// out[m, j] = sum_k a[m, k] f[j, k] for the four-row groups [q0, q1): up to four outputs per pass.
QFT_BF16 void nt_groups(const uint16_t* a, int64_t rows, int64_t width, const float* f, int64_t outs, int64_t q0,
                        int64_t q1, float* out) {
  for (int64_t q = q0; q < q1; ++q) {
    const uint16_t* row[kNtRows];
    float* dst[kNtRows];
    for (int64_t j0 = 0; j0 < outs; j0 += kNtOuts) {
      for (int r = 0; r < kNtRows; ++r) {
        const int64_t m = std::min(q * kNtRows + r, rows - 1);
        row[r] = a + m * width;
        dst[r] = q * kNtRows + r < rows ? out + m * outs + j0 : nullptr;
      }
      kNtPasses[std::min<int64_t>(kNtOuts, outs - j0) - 1](row, width, f + j0 * width, dst);
    }
  }
}

// out[j, c0 + c] for outputs [j0, j0 + G) and the 64 columns from c0 (masks: which are in range), each
// sum over m in order.
template <int G>
QFT_BF16 void tn_pass(const float* f, int64_t rows, int64_t outs, const uint16_t* a, int64_t width, int64_t c0,
                      const __mmask16* masks, float* out) {
  __m512 acc[G * kTnVectors];  // one flat, fully unrolled array: GCC keeps it in registers
#pragma GCC unroll 16
  for (int i = 0; i < G * kTnVectors; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t m = 0; m < rows; ++m) {
    __m512 x[kTnVectors];
#pragma GCC unroll 4
    for (int v = 0; v < kTnVectors; ++v) x[v] = widen(a + m * width + c0 + 16 * v, masks[v]);
#pragma GCC unroll 4
    for (int g = 0; g < G; ++g) {
      const __m512 s = _mm512_set1_ps(f[m * outs + g]);
#pragma GCC unroll 4
      for (int v = 0; v < kTnVectors; ++v) acc[g * kTnVectors + v] = _mm512_fmadd_ps(s, x[v], acc[g * kTnVectors + v]);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < G * kTnVectors; ++i)
    _mm512_mask_storeu_ps(out + i / kTnVectors * width + c0 + 16 * (i % kTnVectors), masks[i % kTnVectors], acc[i]);
}

using TnPass = void (*)(const float*, int64_t, int64_t, const uint16_t*, int64_t, int64_t, const __mmask16*, float*);
constexpr TnPass kTnPasses[kTnOuts] = {tn_pass<1>, tn_pass<2>, tn_pass<3>, tn_pass<4>};

// out[j, k] = sum_m f[m, j] a[m, k] for the 64-column tiles [t0, t1), up to four outputs per pass.
QFT_BF16 void tn_tiles(const float* f, int64_t rows, int64_t outs, const uint16_t* a, int64_t width, int64_t t0,
                       int64_t t1, float* out) {
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t c0 = t * 16 * kTnVectors;
    __mmask16 masks[kTnVectors];
    for (int v = 0; v < kTnVectors; ++v) masks[v] = c0 + 16 * v < width ? tail_mask(width - c0 - 16 * v) : 0;
    for (int64_t j0 = 0; j0 < outs; j0 += kTnOuts) {
      const int64_t group = std::min<int64_t>(kTnOuts, outs - j0);
      kTnPasses[group - 1](f + j0, rows, outs, a, width, c0, masks, out + j0 * width);
    }
  }
}
#endif

bool args_ok(const void* a, const float* f, const float* out, int64_t rows, int64_t width, int64_t outs) {
  return active_isa() >= Isa::kAvx512Bf16 && a != nullptr && f != nullptr && out != nullptr && rows > 0 &&
         width > 0 && outs > 0;
}

}  // namespace

int bf16_times_fp32_nt(const uint16_t* a, int64_t rows, int64_t width, const float* f, int64_t outs, float* out) {
  if (!args_ok(a, f, out, rows, width, outs)) return kInvalidValue;
#ifdef QFT_X86
  // parallel_for's unit is bytes; about 4 products each, as the OFT kernels count.
  parallel_for((rows + kNtRows - 1) / kNtRows, rows * width * outs / 4, [&](int64_t first, int64_t last) {
    nt_groups(a, rows, width, f, outs, first, last, out);
  });
  return kOk;
#else
  return kInvalidValue;
#endif
}

int fp32_tn_times_bf16(const float* f, int64_t rows, int64_t outs, const uint16_t* a, int64_t width, float* out) {
  if (!args_ok(a, f, out, rows, width, outs)) return kInvalidValue;
#ifdef QFT_X86
  const int64_t tiles = (width + 16 * kTnVectors - 1) / (16 * kTnVectors);
  parallel_for(tiles, rows * width * outs / 4, [&](int64_t first, int64_t last) {
    tn_tiles(f, rows, outs, a, width, first, last, out);
  });
  return kOk;
#else
  return kInvalidValue;
#endif
}

}  // namespace qft::cpu
