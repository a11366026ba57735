// Decode GEMV for the smallest M: y[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n]) (+ s * xa[m, :] . B[n, :]),
// every qft format. Two kernels:
// * chunked (gemv_core.cuh): blocks inside rows, power-of-two sizes, aligned pointers (every real
//   layer): a warp owns 4 weight rows (fewer at M >= 3 or fp32 x), its lanes whole 64-value chunks, codes decoded through
//   a per-lane shared-memory table; K may be split across CTAs (fp32 partials in `workspace`, added
//   up by a second kernel in split order, so results do not depend on timing);
// * per value (any shape): one warp per row, lanes over K, each value decoded as dequantize does and
//   rounded to x's dtype.
// Bit width, format kind and M are template parameters: no local arrays, nothing spilled.
#include <cuda_runtime.h>

#include "decode.cuh"
#include "element.cuh"
#include "gemv_core.cuh"

namespace qft {
namespace {

using gemv::Args;

// ---- chunked ----------------------------------------------------------------------------------------------

template <typename T, int kBits, bool kZeros, int kRows>
__global__ void __launch_bounds__(gemv::kThreads, gemv::min_ctas_per_sm(kRows, sizeof(T))) chunked_kernel(Args<T> a) {
  using L = gemv::Lut<kBits>;
  __shared__ __align__(16) unsigned char lut[L::kBytes];
  for (int slot = threadIdx.x; slot < L::kEntries * L::kCopies; slot += gemv::kThreads)
    gemv::fill_slot<kBits>(lut, slot, a.w.code, a.w.affine);
  __syncthreads();
  constexpr int kRowsPerWarp = gemv::rows_per_warp(kRows, sizeof(T));
  const int lane = threadIdx.x & 31;
  const int64_t n0 = (static_cast<int64_t>(blockIdx.x) * gemv::kWarps + (threadIdx.x >> 5)) * kRowsPerWarp;
  if (n0 >= a.n_out) return;
  float acc[kRowsPerWarp][kRows];
  gemv::lane_sums<T, kBits, kZeros, kRows>(a, lut, n0, blockIdx.y, lane, acc);
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
#pragma unroll
    for (int m = 0; m < kRows; ++m) {
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) acc[r][m] = __fadd_rn(acc[r][m], __shfl_xor_sync(0xffffffffu, acc[r][m], o));
      if (lane == 0 && n0 + r < a.n_out) gemv::store_sum(a, blockIdx.y, n0 + r, m, acc[r][m]);
    }
  }
}

template <typename T>
__global__ void finish_kernel(Args<T> a) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < a.rows * a.n_out) gemv::finish(a, i % a.n_out, static_cast<int>(i / a.n_out));
}

template <typename T, int kBits, bool kZeros>
cudaError_t launch_chunked(const Args<T>& a, cudaStream_t stream) {
  const int64_t per_cta = gemv::kWarps * gemv::rows_per_warp(a.rows, sizeof(T));
  const dim3 grid(static_cast<unsigned>((a.n_out + per_cta - 1) / per_cta), a.splits);
  switch (a.rows) {
    case 1: chunked_kernel<T, kBits, kZeros, 1><<<grid, gemv::kThreads, 0, stream>>>(a); break;
    case 2: chunked_kernel<T, kBits, kZeros, 2><<<grid, gemv::kThreads, 0, stream>>>(a); break;
    case 3: chunked_kernel<T, kBits, kZeros, 3><<<grid, gemv::kThreads, 0, stream>>>(a); break;
    default: chunked_kernel<T, kBits, kZeros, 4><<<grid, gemv::kThreads, 0, stream>>>(a); break;
  }
  if (a.splits > 1) {
    const int64_t outputs = a.rows * a.n_out;
    finish_kernel<T><<<static_cast<unsigned>((outputs + 255) / 256), 256, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

template <typename T, int kBits>
cudaError_t launch_chunked(const Args<T>& a, cudaStream_t stream) {
  return a.w.zeros != nullptr ? launch_chunked<T, kBits, true>(a, stream) : launch_chunked<T, kBits, false>(a, stream);
}

// ---- per value --------------------------------------------------------------------------------------------

constexpr int kWarpsPerCta = 8;

// Decoded weights are rounded to x's dtype, as dequantize writes them, so y matches decode-then-matmul.
__device__ __forceinline__ float round_to(float v, float*) { return v; }
__device__ __forceinline__ float round_to(float v, __half*) { return __half2float(__float2half_rn(v)); }
__device__ __forceinline__ float round_to(float v, __nv_bfloat16*) { return __bfloat162float(__float2bfloat16_rn(v)); }

template <typename T, int kRows>
__global__ void per_value_kernel(Args<T> a) {
  __shared__ float code[16];
  const QuantWeight& w = a.w;
  if (threadIdx.x < 16 && !w.affine && threadIdx.x < (1 << w.bits)) code[threadIdx.x] = __ldg(w.code + threadIdx.x);
  __syncthreads();
  const int lane = threadIdx.x & 31;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kWarpsPerCta + (threadIdx.x >> 5);
  if (n >= a.n_out) return;
  const bool nested = w.nested_scales != nullptr;
  const ReadOnly map{w.dynamic_map};
  float acc[kRows] = {};
  for (int64_t k = lane; k < a.k_in; k += 32) {
    const int64_t flat = n * a.k_in + k;
    const int64_t block = flat / w.block_size;
    const float value = decode_value(w.affine, code, code_at(w.codes, w.bits, flat),
                                     block_scale(w, nested, map, block), block_zero(w, block));
    const float rounded = round_to(value, static_cast<T*>(nullptr));
#pragma unroll
    for (int m = 0; m < kRows; ++m) acc[m] += to_float(a.x[m * a.k_in + k]) * rounded;
  }
  if (a.lora_xa != nullptr) {
    for (int r = lane; r < a.rank; r += 32) {
      const float b = a.scaling * a.lora_b[n * a.rank + r];
#pragma unroll
      for (int m = 0; m < kRows; ++m) acc[m] += a.lora_xa[m * a.rank + r] * b;
    }
  }
#pragma unroll
  for (int m = 0; m < kRows; ++m) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc[m] += __shfl_xor_sync(0xffffffffu, acc[m], o);
    if (lane == 0) store1(a.y + m * a.n_out + n, acc[m] + (a.bias != nullptr ? to_float(a.bias[n]) : 0.0f));
  }
}

template <typename T>
cudaError_t launch_per_value(const Args<T>& a, cudaStream_t stream) {
  const unsigned ctas = static_cast<unsigned>((a.n_out + kWarpsPerCta - 1) / kWarpsPerCta);
  switch (a.rows) {
    case 1: per_value_kernel<T, 1><<<ctas, 32 * kWarpsPerCta, 0, stream>>>(a); break;
    case 2: per_value_kernel<T, 2><<<ctas, 32 * kWarpsPerCta, 0, stream>>>(a); break;
    case 3: per_value_kernel<T, 3><<<ctas, 32 * kWarpsPerCta, 0, stream>>>(a); break;
    default: per_value_kernel<T, 4><<<ctas, 32 * kWarpsPerCta, 0, stream>>>(a); break;
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch(Args<T> a, cudaStream_t stream) {
  if (!gemv::takes_fast_path(a)) return launch_per_value(a, stream);
  switch (a.w.bits) {
    case 4: return launch_chunked<T, 4>(a, stream);
    case 3: return launch_chunked<T, 3>(a, stream);
    default: return launch_chunked<T, 2>(a, stream);
  }
}

}  // namespace

int quant_gemv(const void* x, DType dtype, const QuantWeight& w, const void* bias, const float* lora_xa,
               const float* lora_b, float scaling, int rank, void* y, int rows, int64_t n_out, int64_t k_in,
               int splits, float* workspace, void* stream) {
  if (!gemv::gemv_args_valid(w, rows, n_out, k_in, lora_xa, lora_b, rank, splits, workspace)) return cudaErrorInvalidValue;
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat32:
      return launch(gemv::make_args<float>(x, w, bias, lora_xa, lora_b, scaling, rank, y, workspace, rows, n_out, k_in,
                                     splits), s);
    case DType::kFloat16:
      return launch(gemv::make_args<__half>(x, w, bias, lora_xa, lora_b, scaling, rank, y, workspace, rows, n_out, k_in,
                                      splits), s);
    case DType::kBFloat16:
      return launch(gemv::make_args<__nv_bfloat16>(x, w, bias, lora_xa, lora_b, scaling, rank, y, workspace, rows, n_out,
                                             k_in, splits), s);
  }
  return cudaErrorInvalidValue;
}

}  // namespace qft
