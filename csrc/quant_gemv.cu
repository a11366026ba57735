// Decode GEMV for the smallest M: y[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n]) (+ s * xa[m, :] . B[n, :]),
// for every qft format (4-bit code books and int4: bytes; 3-bit planar and 2-bit: int32 words).
// One warp per output feature n; the weight row is decoded once and used for all M <= kMaxRows rows
// of x. Memory-bound: each lane decodes one packing unit per step (8 values at 4 bits, 32 at 3, 16
// at 2) when K is a multiple of the unit, else value by value. fp32 accumulation; y rounded once.
#include <cuda_runtime.h>

#include "decode.cuh"
#include "element.cuh"

namespace qft {
namespace {

constexpr int kWarpsPerCta = 8;

// Decoded weights are rounded to x's dtype, as dequantize writes them, so y matches
// decode-then-matmul.
__device__ __forceinline__ float round_to(float v, float*) { return v; }
__device__ __forceinline__ float round_to(float v, __half*) { return __half2float(__float2half_rn(v)); }
__device__ __forceinline__ float round_to(float v, __nv_bfloat16*) { return __bfloat162float(__float2bfloat16_rn(v)); }

template <typename T>
__device__ __forceinline__ float value_of(const QuantWeight& w, const float* code, int q, float scale, float zero) {
  return round_to(decode_value(w.affine, code, q, scale, zero), static_cast<T*>(nullptr));
}

template <typename T>
__global__ void quant_gemv_kernel(const T* __restrict__ x, QuantWeight w, const T* __restrict__ bias,
                                  const float* __restrict__ lora_xa, const float* __restrict__ lora_b, float scaling,
                                  T* __restrict__ y, int rows, int64_t n_out, int64_t k_in, int rank) {
  __shared__ float code[16];
  if (threadIdx.x < 16 && !w.affine && threadIdx.x < (1 << w.bits)) code[threadIdx.x] = __ldg(w.code + threadIdx.x);
  __syncthreads();
  const int lane = threadIdx.x & 31;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kWarpsPerCta + (threadIdx.x >> 5);
  if (n >= n_out) return;
  const bool nested = w.nested_scales != nullptr;
  const ReadOnly map{w.dynamic_map};
  float acc[kMaxGemvRows] = {};
  const int64_t row_start = n * k_in;
  const int unit_size = unit_values(w.bits);
  const bool vector = k_in % unit_size == 0 && reinterpret_cast<uintptr_t>(w.codes) % 4 == 0;
  if (vector) {
    int q[32];
    for (int64_t k = lane * unit_size; k < k_in; k += 32 * unit_size) {
      const int64_t flat = row_start + k;  // a whole unit inside one block (blocks hold >= 32 values)
      const int count = unit_codes(w.codes, w.bits, flat / unit_size, q);
      const int64_t block = flat / w.block_size;
      const float s = block_scale(w, nested, map, block);
      const float zero = block_zero(w, block);
      for (int i = 0; i < count; ++i) {
        const float value = value_of<T>(w, code, q[i], s, zero);
        for (int m = 0; m < rows; ++m) acc[m] += to_float(x[m * k_in + k + i]) * value;
      }
    }
  } else {
    for (int64_t k = lane; k < k_in; k += 32) {
      const int64_t flat = row_start + k;
      const int64_t block = flat / w.block_size;
      const float zero = block_zero(w, block);
      const int q = code_at(w.codes, w.bits, flat);
      const float value = value_of<T>(w, code, q, block_scale(w, nested, map, block), zero);
      for (int m = 0; m < rows; ++m) acc[m] += to_float(x[m * k_in + k]) * value;
    }
  }
  if (lora_xa != nullptr) {
    for (int r = lane; r < rank; r += 32) {
      const float b = scaling * lora_b[n * rank + r];
      for (int m = 0; m < rows; ++m) acc[m] += lora_xa[m * rank + r] * b;
    }
  }
  for (int m = 0; m < rows; ++m) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc[m] += __shfl_xor_sync(0xffffffffu, acc[m], o);
  }
  if (lane == 0) {
    const float b = bias != nullptr ? to_float(bias[n]) : 0.0f;
    for (int m = 0; m < rows; ++m) store1(y + m * n_out + n, acc[m] + b);
  }
}

template <typename T>
cudaError_t launch(const void* x, const QuantWeight& w, const void* bias, const float* lora_xa, const float* lora_b,
                   float scaling, void* y, int rows, int64_t n_out, int64_t k_in, int rank, cudaStream_t stream) {
  const unsigned ctas = static_cast<unsigned>((n_out + kWarpsPerCta - 1) / kWarpsPerCta);
  quant_gemv_kernel<T><<<ctas, 32 * kWarpsPerCta, 0, stream>>>(static_cast<const T*>(x), w,
                                                              static_cast<const T*>(bias), lora_xa, lora_b, scaling,
                                                              static_cast<T*>(y), rows, n_out, k_in, rank);
  return cudaGetLastError();
}

}  // namespace

int quant_gemv(const void* x, DType dtype, const QuantWeight& w, const void* bias, const float* lora_xa,
               const float* lora_b, float scaling, int rank, void* y, int rows, int64_t n_out, int64_t k_in,
               void* stream) {
  if (!valid_weight(w) || rows < 1 || rows > kMaxGemvRows || n_out <= 0 || k_in <= 0 || w.numel != n_out * k_in ||
      w.block_size < 32 || w.block_size % 32 || (lora_xa != nullptr && (lora_b == nullptr || rank <= 0)))
    return cudaErrorInvalidValue;
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat32:
      return launch<float>(x, w, bias, lora_xa, lora_b, scaling, y, rows, n_out, k_in, rank, s);
    case DType::kFloat16:
      return launch<__half>(x, w, bias, lora_xa, lora_b, scaling, y, rows, n_out, k_in, rank, s);
    case DType::kBFloat16:
      return launch<__nv_bfloat16>(x, w, bias, lora_xa, lora_b, scaling, y, rows, n_out, k_in, rank, s);
  }
  return cudaErrorInvalidValue;
}

}  // namespace qft
