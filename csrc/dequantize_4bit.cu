// Blockwise 4-bit dequantization: each thread decodes 4 packed bytes into 8 outputs.
// Memory-bound: one 4-byte load and one (or two) 16-byte stores per thread; code books live in
// shared memory (16 entries fit 16 banks, so random lookups do not conflict).
#include <cuda_runtime.h>

#include "element.cuh"
#include "qft_kernels.h"

namespace qft {
namespace {

constexpr int kThreads = 256;
constexpr int kBytesPerThread = 4;

template <typename T, bool kNested, bool kVector>
__global__ void dequantize_4bit_kernel(const uint8_t* __restrict__ packed, const void* __restrict__ absmax,
                                       const float* __restrict__ nested_absmax,
                                       const float* __restrict__ offset, const float* __restrict__ dynamic_map,
                                       const float* __restrict__ code, T* __restrict__ out, int64_t numel,
                                       int64_t n_packed, int block_size, int nested_block_size) {
  __shared__ float s_code[16];
  __shared__ float s_map[kNested ? 256 : 1];
  if (threadIdx.x < 16) s_code[threadIdx.x] = code[threadIdx.x];
  if constexpr (kNested) s_map[threadIdx.x] = dynamic_map[threadIdx.x];  // kThreads == 256
  __syncthreads();

  const int64_t first = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * kBytesPerThread;
  if (first >= n_packed) return;
  // 8 | block_size, so a thread's 8 outputs share one block.
  const int64_t block = 2 * first / block_size;
  float scale;
  if constexpr (kNested) {
    const uint8_t q = static_cast<const uint8_t*>(absmax)[block];
    // Separate roundings (no fma), as the reference: fl(fl(map[q] * absmax2) + offset).
    scale = __fadd_rn(__fmul_rn(s_map[q], nested_absmax[block / nested_block_size]), *offset);
  } else {
    scale = static_cast<const float*>(absmax)[block];
  }

  if (kVector && first + kBytesPerThread <= n_packed && 2 * first + 8 <= numel) {
    const uint32_t word = *reinterpret_cast<const uint32_t*>(packed + first);
    float v[8];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint32_t byte = (word >> (8 * i)) & 0xFFu;  // little-endian: byte i of the word
      v[2 * i] = __fmul_rn(s_code[byte >> 4], scale);
      v[2 * i + 1] = __fmul_rn(s_code[byte & 0xFu], scale);
    }
    store8(out + 2 * first, v);
    return;
  }
  for (int64_t j = first; j < first + kBytesPerThread && j < n_packed; ++j) {
    const uint8_t byte = packed[j];
    if (2 * j < numel) store1(out + 2 * j, __fmul_rn(s_code[byte >> 4], scale));
    if (2 * j + 1 < numel) store1(out + 2 * j + 1, __fmul_rn(s_code[byte & 0xF], scale));
  }
}

template <typename T, bool kNested>
cudaError_t launch(const uint8_t* packed, const void* absmax, const float* nested_absmax, const float* offset,
                   const float* dynamic_map, const float* code, void* out, int64_t numel, int block_size,
                   int nested_block_size, cudaStream_t stream) {
  const int64_t n_packed = (numel + 1) / 2;
  const int64_t threads = (n_packed + kBytesPerThread - 1) / kBytesPerThread;
  const unsigned ctas = static_cast<unsigned>((threads + kThreads - 1) / kThreads);
  const bool aligned = reinterpret_cast<uintptr_t>(packed) % 4 == 0 && reinterpret_cast<uintptr_t>(out) % 16 == 0;
  auto kernel = aligned ? dequantize_4bit_kernel<T, kNested, true> : dequantize_4bit_kernel<T, kNested, false>;
  kernel<<<ctas, kThreads, 0, stream>>>(packed, absmax, nested_absmax, offset, dynamic_map, code,
                                        static_cast<T*>(out), numel, n_packed, block_size, nested_block_size);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_any(const uint8_t* packed, const void* absmax, const float* nested_absmax, const float* offset,
                       const float* dynamic_map, const float* code, void* out, int64_t numel, int block_size,
                       int nested_block_size, cudaStream_t stream) {
  if (nested_absmax != nullptr)
    return launch<T, true>(packed, absmax, nested_absmax, offset, dynamic_map, code, out, numel, block_size,
                           nested_block_size, stream);
  return launch<T, false>(packed, absmax, nullptr, nullptr, nullptr, code, out, numel, block_size,
                          nested_block_size, stream);
}

}  // namespace

int dequantize_4bit(const uint8_t* packed, const void* absmax, const float* nested_absmax, const float* offset,
                    const float* dynamic_map, const float* code, void* out, DType out_dtype, int64_t numel,
                    int block_size, int nested_block_size, void* stream) {
  if (numel <= 0 || block_size < 8 || block_size % 8 || nested_block_size <= 0) return cudaErrorInvalidValue;
  auto s = static_cast<cudaStream_t>(stream);
  switch (out_dtype) {
    case DType::kFloat32:
      return launch_any<float>(packed, absmax, nested_absmax, offset, dynamic_map, code, out, numel, block_size,
                               nested_block_size, s);
    case DType::kFloat16:
      return launch_any<__half>(packed, absmax, nested_absmax, offset, dynamic_map, code, out, numel, block_size,
                                nested_block_size, s);
    case DType::kBFloat16:
      return launch_any<__nv_bfloat16>(packed, absmax, nested_absmax, offset, dynamic_map, code, out, numel,
                                       block_size, nested_block_size, s);
  }
  return cudaErrorInvalidValue;
}

}  // namespace qft
