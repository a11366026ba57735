// qft::cpu::oft_rotation_params_grad (cpu_kernels.h): dL/d(params) of OFT's Cayley-Neumann rotation,
// qft.reference.oft_rotation_params_grad's closed form block by block in fp32. On CPU the reference's
// dozen batched matmuls of b x b matrices cost more in per-op overhead than in arithmetic; here each
// block's products run back to back in cache. Sums in another order than torch's: not its bits.
#include <algorithm>
#include <cmath>
#include <vector>

#include "avx512.h"
#include "cpu_kernels.h"
#include "parallel.h"

#if defined(__x86_64__)
#define QFT_X86 1
#endif

namespace qft::cpu {
namespace {

// c = a @ b for n x n row-major matrices, each element's sum over k in order by fused multiply-adds: the
// same bits from the scalar loop (std::fma) and the AVX-512 one (n a multiple of 16, rows in registers).
void matmul_scalar(const float* a, const float* b, float* c, int n) {
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j) {
      float acc = 0.0f;
      for (int k = 0; k < n; ++k) acc = std::fma(a[i * n + k], b[k * n + j], acc);
      c[i * n + j] = acc;
    }
}

#ifdef QFT_X86
// Four rows of c at a time: 4 * kVectors independent accumulator chains hide the multiply-add latency.
template <int kVectors>
QFT_AVX512_BF16 void matmul_rows(const float* a, const float* b, float* c, int n) {
  constexpr int kRows = 4;  // n is a multiple of 16
  for (int i = 0; i < n; i += kRows) {
    __m512 acc[kRows][kVectors];
    for (auto& row : acc)
      for (auto& v : row) v = _mm512_setzero_ps();
    for (int k = 0; k < n; ++k) {
      __m512 bk[kVectors];
      for (int v = 0; v < kVectors; ++v) bk[v] = _mm512_loadu_ps(b + k * n + 16 * v);
      for (int r = 0; r < kRows; ++r) {
        const __m512 s = _mm512_set1_ps(a[(i + r) * n + k]);
        for (int v = 0; v < kVectors; ++v) acc[r][v] = _mm512_fmadd_ps(s, bk[v], acc[r][v]);
      }
    }
    for (int r = 0; r < kRows; ++r)
      for (int v = 0; v < kVectors; ++v) _mm512_storeu_ps(c + (i + r) * n + 16 * v, acc[r][v]);
  }
}
#endif

void matmul(const float* a, const float* b, float* c, int n) {
#ifdef QFT_X86
  if (active_isa() >= Isa::kAvx512Bf16) {
    switch (n) {
      case 16: return matmul_rows<1>(a, b, c, n);
      case 32: return matmul_rows<2>(a, b, c, n);
      case 48: return matmul_rows<3>(a, b, c, n);
      case 64: return matmul_rows<4>(a, b, c, n);
      default: break;
    }
  }
#endif
  matmul_scalar(a, b, c, n);
}

struct Problem {
  const float* params;
  const float* grad_rot;
  int b;
  const float* coefficients;
  int count;
  float* out;
};

// One block: P = Q^T (Q = U - U^T), T_1 = G, T_k = P T_{k-1} + G P^{k-1}, dQ = sum c_k T_k, then the
// strict upper triangle of dQ - dQ^T in triu order.
void block_grad(const Problem& p, int64_t block, std::vector<float>& scratch) {
  const int n = p.b, nn = n * n;
  const int64_t row = int64_t{n} * (n - 1) / 2;
  float *pm = scratch.data(), *term = pm + nn, *next = term + nn, *power = next + nn, *spare = power + nn,
        *grad_q = spare + nn;
  const float* u = p.params + block * row;
  const float* g = p.grad_rot + block * nn;
  std::fill(pm, pm + nn, 0.0f);
  for (int i = 0, at = 0; i < n; ++i)
    for (int j = i + 1; j < n; ++j, ++at) pm[i * n + j] = -u[at], pm[j * n + i] = u[at];
  std::copy(g, g + nn, term);
  std::copy(pm, pm + nn, power);
  for (int e = 0; e < nn; ++e) grad_q[e] = 0.0f + p.coefficients[0] * g[e];
  for (int k = 1; k < p.count; ++k) {
    matmul(pm, term, next, n);   // P T
    matmul(g, power, spare, n);  // G P^k
    for (int e = 0; e < nn; ++e) next[e] += spare[e];
    std::swap(term, next);
    if (k + 1 < p.count) {  // the next power, when a next term needs it
      matmul(power, pm, spare, n);
      std::swap(power, spare);
    }
    for (int e = 0; e < nn; ++e) grad_q[e] += p.coefficients[k] * term[e];
  }
  float* out = p.out + block * row;
  for (int i = 0, at = 0; i < n; ++i)
    for (int j = i + 1; j < n; ++j, ++at) out[at] = grad_q[i * n + j] - grad_q[j * n + i];
}

}  // namespace

int oft_rotation_params_grad(const float* params, const float* grad_rot, int64_t blocks, int b,
                             const float* coefficients, int count, float* out) {
  if (params == nullptr || grad_rot == nullptr || out == nullptr || coefficients == nullptr || blocks <= 0 || b < 2 ||
      count < 1)
    return kInvalidValue;
  const Problem p{params, grad_rot, b, coefficients, count, out};
  // About three b x b products per term and block; parallel_for's unit is bytes, about 4 products each
  // (16 blocks of 32 split: 111 -> 67 us on two threads; 8 blocks of 16 stay on one).
  const int64_t products = blocks * int64_t{b} * b * b * 3 * (count - 1);
  parallel_for(blocks, products / 4, [&](int64_t first, int64_t last) {
    std::vector<float> scratch(static_cast<size_t>(6) * b * b);
    for (int64_t block = first; block < last; ++block) block_grad(p, block, scratch);
  });
  return kOk;
}

}  // namespace qft::cpu
