// Decode GEMV for the smallest M: y[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n]) (+ s * xa[m, :] . B[n, :]),
// for every qft format (4-bit code books and int4: bytes; 3-bit planar and 2-bit: int32 words).
// One warp per output feature n; the weight row is decoded once and used for all M <= kMaxRows rows
// of x. Memory-bound: each lane decodes one packing unit per step (8 values at 4 bits, 32 at 3, 16
// at 2) when K is a multiple of the unit, else value by value. fp32 accumulation; y rounded once.
#include <cuda_runtime.h>

#include "element.cuh"
#include "qft_kernels.h"

namespace qft {
namespace {

constexpr int kWarpsPerCta = 8;

struct Weight {
  const void* packed;
  const void* absmax;
  const float* nested_absmax;
  const float* offset;
  const float* dynamic_map;
  const __half* zero;  // affine formats
  int block_size, nested_block_size, bits;
  bool nested, affine;

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

__device__ __forceinline__ int code_at(const Weight& w, int64_t flat) {
  if (w.bits == 4) {
    const uint8_t byte = static_cast<const uint8_t*>(w.packed)[flat >> 1];
    return (flat & 1) ? (byte & 0xF) : (byte >> 4);
  }
  const uint32_t* words = static_cast<const uint32_t*>(w.packed);
  if (w.bits == 2) return static_cast<int>((words[flat / 16] >> (2 * (flat % 16))) & 3u);
  const int64_t base = 3 * (flat / 32);
  const int lane = static_cast<int>(flat % 32);
  const uint32_t low = (words[base + lane / 16] >> (2 * (lane % 16))) & 3u;
  return static_cast<int>(low | (((words[base + 2] >> lane) & 1u) << 2));
}

template <typename T>
__device__ __forceinline__ float value_of(const Weight& w, const float* code, int q, float scale, float zero) {
  const float v = w.affine ? __fmul_rn(static_cast<float>(q) - zero, scale) : __fmul_rn(code[q], scale);
  return round_to(v, static_cast<T*>(nullptr));
}

template <typename T>
__device__ __forceinline__ float decode(const Weight& w, const float* code, int64_t flat) {
  const int64_t block = flat / w.block_size;
  const float zero = w.affine ? __half2float(w.zero[block]) : 0.0f;
  return value_of<T>(w, code, code_at(w, flat), w.scale(block), zero);
}

// The codes of packing unit `unit` (8, 32 or 16 values by w.bits); returns how many.
__device__ __forceinline__ int unit_codes(const Weight& w, int64_t unit, int (&q)[32]) {
  if (w.bits == 4) {
    const uint32_t word = static_cast<const uint32_t*>(w.packed)[unit];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const uint32_t byte = (word >> (8 * (i / 2))) & 0xFFu;
      q[i] = (i % 2) ? (byte & 0xF) : (byte >> 4);
    }
    return 8;
  }
  const uint32_t* words = static_cast<const uint32_t*>(w.packed);
  if (w.bits == 2) {
    const uint32_t word = words[unit];
#pragma unroll
    for (int i = 0; i < 16; ++i) q[i] = static_cast<int>((word >> (2 * i)) & 3u);
    return 16;
  }
  const uint32_t w0 = words[3 * unit], w1 = words[3 * unit + 1], w2 = words[3 * unit + 2];
#pragma unroll
  for (int i = 0; i < 32; ++i)
    q[i] = static_cast<int>((((i < 16 ? w0 : w1) >> (2 * (i % 16))) & 3u) | (((w2 >> i) & 1u) << 2));
  return 32;
}

template <typename T>
__global__ void quant_gemv_kernel(const T* __restrict__ x, Weight w, const float* __restrict__ code_global,
                                  const T* __restrict__ bias, const float* __restrict__ lora_xa,
                                  const float* __restrict__ lora_b, float scaling, T* __restrict__ y, int rows,
                                  int64_t n_out, int64_t k_in, int rank) {
  __shared__ float code[16];
  if (threadIdx.x < 16 && !w.affine && threadIdx.x < (1 << w.bits)) code[threadIdx.x] = code_global[threadIdx.x];
  __syncthreads();
  const int lane = threadIdx.x & 31;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kWarpsPerCta + (threadIdx.x >> 5);
  if (n >= n_out) return;
  float acc[kMaxGemvRows] = {};
  const int64_t row_start = n * k_in;
  const int unit_size = w.bits == 4 ? 8 : w.bits == 3 ? 32 : 16;
  const bool vector = k_in % unit_size == 0 && reinterpret_cast<uintptr_t>(w.packed) % 4 == 0;
  if (vector) {
    int q[32];
    for (int64_t k = lane * unit_size; k < k_in; k += 32 * unit_size) {
      const int64_t flat = row_start + k;  // a whole unit inside one block (blocks hold >= 32 values)
      const int count = unit_codes(w, flat / unit_size, q);
      const int64_t block = flat / w.block_size;
      const float s = w.scale(block);
      const float zero = w.affine ? __half2float(w.zero[block]) : 0.0f;
      for (int i = 0; i < count; ++i) {
        const float value = value_of<T>(w, code, q[i], s, zero);
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

int quant_gemv(const void* x, DType dtype, const void* packed, int bits, const void* zero, const void* absmax,
               const float* nested_absmax, const float* offset, const float* dynamic_map, const float* code,
               int block_size, int nested_block_size, const void* bias, const float* lora_xa, const float* lora_b,
               float scaling, int rank, void* y, int rows, int64_t n_out, int64_t k_in, void* stream) {
  if (rows < 1 || rows > kMaxGemvRows || n_out <= 0 || k_in <= 0 || block_size < 32 || block_size % 32 ||
      (bits != 2 && bits != 3 && bits != 4) || (zero == nullptr && code == nullptr) ||
      (lora_xa != nullptr && (lora_b == nullptr || rank <= 0)))
    return cudaErrorInvalidValue;
  const Weight w{packed, absmax, nested_absmax, offset, dynamic_map, static_cast<const __half*>(zero), block_size,
                 nested_block_size, bits, nested_absmax != nullptr, zero != nullptr};
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
