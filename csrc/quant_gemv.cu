// Decode GEMV for the smallest M: y[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n]) (+ s * xa[m, :] . B[n, :]).
// One warp per output feature n; the weight row is decoded once and used for all M <= kMaxRows rows
// of x. Memory-bound: each lane reads one 4-byte word of packed codes (8 values) per step when the
// row is 8-aligned, else decodes value by value. fp32 accumulation; y rounded once to x's dtype.
#include <cuda_runtime.h>

#include "element.cuh"
#include "qft_kernels.h"

namespace qft {
namespace {

constexpr int kWarpsPerCta = 8;

struct Weight {
  const uint8_t* packed;
  const void* absmax;
  const float* nested_absmax;
  const float* offset;
  const float* dynamic_map;
  int block_size, nested_block_size;
  bool nested;

  __device__ __forceinline__ float scale(int64_t block) const {
    if (!nested) return static_cast<const float*>(absmax)[block];
    const uint8_t q = static_cast<const uint8_t*>(absmax)[block];
    return __fadd_rn(__fmul_rn(__ldg(dynamic_map + q), nested_absmax[block / nested_block_size]), *offset);
  }
};

// Decoded weights are rounded to x's dtype, as dequantize_4bit writes them, so y matches
// decode-then-matmul.
__device__ __forceinline__ float round_to(float v, float*) { return v; }
__device__ __forceinline__ float round_to(float v, __half*) { return __half2float(__float2half_rn(v)); }
__device__ __forceinline__ float round_to(float v, __nv_bfloat16*) { return __bfloat162float(__float2bfloat16_rn(v)); }

template <typename T>
__device__ __forceinline__ float decode(const Weight& w, const float* code, int64_t flat) {
  const uint8_t byte = w.packed[flat >> 1];
  const int nibble = (flat & 1) ? (byte & 0xF) : (byte >> 4);
  return round_to(__fmul_rn(code[nibble], w.scale(flat / w.block_size)), static_cast<T*>(nullptr));
}

template <typename T>
__global__ void quant_gemv_kernel(const T* __restrict__ x, Weight w, const float* __restrict__ code_global,
                                  const T* __restrict__ bias, const float* __restrict__ lora_xa,
                                  const float* __restrict__ lora_b, float scaling, T* __restrict__ y, int rows,
                                  int64_t n_out, int64_t k_in, int rank) {
  __shared__ float code[16];
  if (threadIdx.x < 16) code[threadIdx.x] = code_global[threadIdx.x];
  __syncthreads();
  const int lane = threadIdx.x & 31;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kWarpsPerCta + (threadIdx.x >> 5);
  if (n >= n_out) return;
  float acc[kMaxGemvRows] = {};
  const int64_t row_start = n * k_in;
  const bool vector = k_in % 8 == 0 && reinterpret_cast<uintptr_t>(w.packed) % 4 == 0;
  if (vector) {
    for (int64_t k = lane * 8; k < k_in; k += 32 * 8) {
      const int64_t flat = row_start + k;  // multiple of 8: one word, one block
      const uint32_t word = *reinterpret_cast<const uint32_t*>(w.packed + flat / 2);
      const float s = w.scale(flat / w.block_size);
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const uint32_t byte = (word >> (8 * (i / 2))) & 0xFFu;
        const int nibble = (i % 2) ? (byte & 0xF) : (byte >> 4);
        const float value = round_to(__fmul_rn(code[nibble], s), static_cast<T*>(nullptr));
        for (int m = 0; m < rows; ++m) acc[m] += to_float(x[m * k_in + k + i]) * value;
      }
    }
  } else {
    for (int64_t k = lane; k < k_in; k += 32) {
      const float value = decode<T>(w, code, row_start + k);
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
cudaError_t launch(const void* x, const Weight& w, const float* code, const void* bias, const float* lora_xa,
                   const float* lora_b, float scaling, void* y, int rows, int64_t n_out, int64_t k_in, int rank,
                   cudaStream_t stream) {
  const unsigned ctas = static_cast<unsigned>((n_out + kWarpsPerCta - 1) / kWarpsPerCta);
  quant_gemv_kernel<T><<<ctas, 32 * kWarpsPerCta, 0, stream>>>(
      static_cast<const T*>(x), w, code, static_cast<const T*>(bias), lora_xa, lora_b, scaling, static_cast<T*>(y),
      rows, n_out, k_in, rank);
  return cudaGetLastError();
}

}  // namespace

int quant_gemv(const void* x, DType dtype, const uint8_t* packed, const void* absmax, const float* nested_absmax,
               const float* offset, const float* dynamic_map, const float* code, int block_size,
               int nested_block_size, const void* bias, const float* lora_xa, const float* lora_b, float scaling,
               int rank, void* y, int rows, int64_t n_out, int64_t k_in, void* stream) {
  if (rows < 1 || rows > kMaxGemvRows || n_out <= 0 || k_in <= 0 || block_size < 8 || block_size % 8 ||
      (lora_xa != nullptr && (lora_b == nullptr || rank <= 0)))
    return cudaErrorInvalidValue;
  const Weight w{packed, absmax, nested_absmax, offset, dynamic_map, block_size, nested_block_size,
                 nested_absmax != nullptr};
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat32:
      return launch<float>(x, w, code, bias, lora_xa, lora_b, scaling, y, rows, n_out, k_in, rank, s);
    case DType::kFloat16:
      return launch<__half>(x, w, code, bias, lora_xa, lora_b, scaling, y, rows, n_out, k_in, rank, s);
    case DType::kBFloat16:
      return launch<__nv_bfloat16>(x, w, code, bias, lora_xa, lora_b, scaling, y, rows, n_out, k_in, rank, s);
  }
  return cudaErrorInvalidValue;
}

}  // namespace qft
