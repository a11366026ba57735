// qft::cpu::oft_rotate and oft_rotation_grad (cpu_kernels.h): OFT's per-block input rotation and dL/dR on
// AVX-512, in one call each where the reference takes a dtype copy, two layout copies around a batched
// GEMM and a copy back (qft.reference.oft_rotate / oft_rotation_grad).
//
// The rotation sums each output over k in order by fused multiply-adds from zero, vectorized over the
// output column: the order torch's batched fp32 GEMM takes for these shapes on x86 (tested bit for bit
// against the reference where the backend routes it, qft.ops.oft), so OFT stays PEFT-exact. dL/dR sums
// over the rows in order: not torch's bits, which nothing downstream needs (an fp32 parameter gradient).
#include <algorithm>
#include <vector>

#include "avx512.h"
#include "convert.h"
#include "cpu_kernels.h"
#include "parallel.h"

namespace qft::cpu {
namespace {

// Values [at, at + count) of a flat tensor of `dtype` as fp32 (exact).
void widen(const void* src, DType dtype, int64_t at, int64_t count, float* dst) {
  if (dtype == DType::kFloat32) {
    std::copy_n(static_cast<const float*>(src) + at, count, dst);
  } else if (dtype == DType::kBFloat16) {
    const uint16_t* h = static_cast<const uint16_t*>(src) + at;
    for (int64_t i = 0; i < count; ++i) dst[i] = from_bf16(h[i]);
  } else {
    const uint16_t* h = static_cast<const uint16_t*>(src) + at;
    for (int64_t i = 0; i < count; ++i) dst[i] = from_fp16(h[i]);
  }
}

#if defined(__x86_64__)
constexpr int kRotateRows = 4;  // rows of x per register block: 4 * b / 16 independent sums in flight

// Rows [first, last): out row m, block r = sum over k of x[m, rb + k] * R[r, k, :] (b = 16 * kVectors
// columns in registers, each sum over k in order).
template <int kVectors>
QFT_AVX512_BF16 void rotate_rows(const void* x, DType x_dtype, const float* rot, int64_t blocks, void* out,
                                 DType out_dtype, int64_t first, int64_t last) {
  constexpr int b = 16 * kVectors;
  const int64_t width = blocks * b;
  std::vector<float> rows(static_cast<size_t>(kRotateRows) * width, 0.0f);
  for (int64_t m0 = first; m0 < last; m0 += kRotateRows) {
    const int64_t count = std::min<int64_t>(kRotateRows, last - m0);
    for (int64_t i = 0; i < count; ++i) widen(x, x_dtype, (m0 + i) * width, width, rows.data() + i * width);
    for (int64_t r = 0; r < blocks; ++r) {
      __m512 acc[kRotateRows * kVectors];  // flat and fully unrolled: GCC keeps it in registers
#pragma GCC unroll 16
      for (int i = 0; i < kRotateRows * kVectors; ++i) acc[i] = _mm512_setzero_ps();
      const float* block = rot + r * b * b;
      for (int k = 0; k < b; ++k) {
        __m512 w[kVectors];
#pragma GCC unroll 4
        for (int v = 0; v < kVectors; ++v) w[v] = _mm512_loadu_ps(block + k * b + 16 * v);
#pragma GCC unroll 4
        for (int i = 0; i < kRotateRows; ++i) {
          const __m512 s = _mm512_set1_ps(rows[i * width + r * b + k]);
#pragma GCC unroll 4
          for (int v = 0; v < kVectors; ++v) acc[i * kVectors + v] = _mm512_fmadd_ps(s, w[v], acc[i * kVectors + v]);
        }
      }
      __m512 sums[kRotateRows * kVectors];  // read below by a run-time row count: kept out of acc's way
#pragma GCC unroll 16
      for (int i = 0; i < kRotateRows * kVectors; ++i) sums[i] = acc[i];
      for (int64_t i = 0; i < count; ++i)
        for (int v = 0; v < kVectors; ++v) {
          const int64_t at = (m0 + i) * width + r * b + 16 * v;
          const __m512 sum = sums[i * kVectors + v];
          if (out_dtype == DType::kFloat32) {
            _mm512_storeu_ps(static_cast<float*>(out) + at, sum);
          } else {
            const __m256i bits = out_dtype == DType::kBFloat16
                                     ? bf16_of(sum)
                                     : _mm512_cvtps_ph(sum, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(out) + at), bits);
          }
        }
    }
  }
}

// dL/dR of blocks [first, last): grad_rot[r, k, :] = sum over m of x[m, rb + k] * g[m, rb + :]; the
// block's columns of x and g widened to fp32 first, then eight rows k (four at b = 64) at a time in registers.
template <int kVectors>
QFT_AVX512_BF16 void grad_blocks(const void* x, DType x_dtype, const void* g, DType g_dtype, int64_t rows,
                                 int64_t blocks, float* grad_rot, int64_t first, int64_t last) {
  constexpr int b = 16 * kVectors, kRows = kVectors == 4 ? 4 : 8;  // accumulators and g within 32 registers
  const int64_t width = blocks * b;
  std::vector<float> xs(static_cast<size_t>(rows) * b), gs(xs.size());
  for (int64_t r = first; r < last; ++r) {
    for (int64_t m = 0; m < rows; ++m) {
      widen(x, x_dtype, m * width + r * b, b, xs.data() + m * b);
      widen(g, g_dtype, m * width + r * b, b, gs.data() + m * b);
    }
    for (int k0 = 0; k0 < b; k0 += kRows) {
      __m512 acc[kRows * kVectors];  // flat and fully unrolled: GCC keeps it in registers
#pragma GCC unroll 32
      for (int i = 0; i < kRows * kVectors; ++i) acc[i] = _mm512_setzero_ps();
      for (int64_t m = 0; m < rows; ++m) {
        __m512 gv[kVectors];
#pragma GCC unroll 4
        for (int v = 0; v < kVectors; ++v) gv[v] = _mm512_loadu_ps(gs.data() + m * b + 16 * v);
#pragma GCC unroll 8
        for (int k = 0; k < kRows; ++k) {
          const __m512 s = _mm512_set1_ps(xs[m * b + k0 + k]);
#pragma GCC unroll 4
          for (int v = 0; v < kVectors; ++v) acc[k * kVectors + v] = _mm512_fmadd_ps(s, gv[v], acc[k * kVectors + v]);
        }
      }
#pragma GCC unroll 32
      for (int i = 0; i < kRows * kVectors; ++i)
        _mm512_storeu_ps(grad_rot + (r * b + k0 + i / kVectors) * b + 16 * (i % kVectors), acc[i]);
    }
  }
}

template <typename Fn>
int by_width(int b, Fn&& fn) {
  switch (b) {
    case 16: return fn(std::integral_constant<int, 1>{});
    case 32: return fn(std::integral_constant<int, 2>{});
    case 48: return fn(std::integral_constant<int, 3>{});
    case 64: return fn(std::integral_constant<int, 4>{});
    default: return kInvalidValue;
  }
}
#endif

bool args_ok(const void* x, const float* rot, int64_t rows, int64_t blocks, const void* out) {
  return active_isa() >= Isa::kAvx512Bf16 && x != nullptr && rot != nullptr && out != nullptr && rows > 0 &&
         blocks > 0;
}

}  // namespace

int oft_rotate(const void* x, DType x_dtype, const float* rot, int64_t rows, int64_t blocks, int b, bool transpose,
               void* out, DType out_dtype) {
  if (!args_ok(x, rot, rows, blocks, out)) return kInvalidValue;
#if defined(__x86_64__)
  std::vector<float> transposed;
  if (transpose) {  // R^T block by block, once per call (a torch copy of the transposed view took ~1 ms at 128 x 32)
    transposed.resize(static_cast<size_t>(blocks) * b * b);
    for (int64_t r = 0; r < blocks; ++r)
      for (int i = 0; i < b; ++i)
        for (int j = 0; j < b; ++j) transposed[(r * b + j) * b + i] = rot[(r * b + i) * b + j];
    rot = transposed.data();
  }
  return by_width(b, [&](auto vectors) {
    // About b products per value: 16 blocks of 32 over 128 rows split (55 -> 41 us on two threads).
    parallel_for(rows, rows * blocks * b * b / 4, [&](int64_t first, int64_t last) {
      rotate_rows<decltype(vectors)::value>(x, x_dtype, rot, blocks, out, out_dtype, first, last);
    });
    return static_cast<int>(kOk);
  });
#else
  return kInvalidValue;
#endif
}

int oft_rotation_grad(const void* x, DType x_dtype, const void* g, DType g_dtype, int64_t rows, int64_t blocks, int b,
                      float* grad_rot) {
  if (!args_ok(x, grad_rot, rows, blocks, g)) return kInvalidValue;
#if defined(__x86_64__)
  return by_width(b, [&](auto vectors) {
    parallel_for(blocks, rows * blocks * b * b / 4, [&](int64_t first, int64_t last) {
      grad_blocks<decltype(vectors)::value>(x, x_dtype, g, g_dtype, rows, blocks, grad_rot, first, last);
    });
    return static_cast<int>(kOk);
  });
#else
  return kInvalidValue;
#endif
}

}  // namespace qft::cpu
