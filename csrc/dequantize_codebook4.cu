// nf4/fp4 dequantization: each thread decodes 4 packed bytes into 8 outputs.
// Memory-bound: one 4-byte load and one (or two) 16-byte stores per thread; code books live in
// shared memory (16 entries fit 16 banks, so random lookups do not conflict).
#include <cuda_runtime.h>

#include "decode.cuh"
#include "dequantize.h"
#include "element.cuh"

namespace qft {
namespace {

constexpr int kThreads = 256;
constexpr int kBytesPerThread = 4;

template <typename T, bool kNested, bool kVector>
__global__ void dequantize_codebook4_kernel(QuantWeight w, T* __restrict__ out, int64_t n_packed, OutRows rows) {
  __shared__ float s_code[16];
  __shared__ float s_map[kNested ? 256 : 1];
  if (threadIdx.x < 16) s_code[threadIdx.x] = w.code[threadIdx.x];
  if constexpr (kNested) s_map[threadIdx.x] = w.dynamic_map[threadIdx.x];  // kThreads == 256
  __syncthreads();

  const int64_t first = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * kBytesPerThread;
  if (first >= n_packed) return;
  // 8 | block_size, so a thread's 8 outputs share one block.
  const float scale = block_scale(w, kNested, s_map, 2 * first / w.block_size);
  const int64_t numel = w.numel;

  if (kVector && first + kBytesPerThread <= n_packed && 2 * first + 8 <= numel) {
    int q[8];
    unit_codes<4>(w.codes, first / kBytesPerThread, q);
    float v[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = codebook_value(s_code, q[i], scale);
    store8(out + rows(2 * first), v);  // eight values stay in one row (length % 32 == 0 when strided)
    return;
  }
  for (int64_t j = first; j < first + kBytesPerThread && j < n_packed; ++j) {
    const uint8_t byte = static_cast<const uint8_t*>(w.codes)[j];
    if (2 * j < numel) store1(out + rows(2 * j), codebook_value(s_code, code4(byte, 0), scale));
    if (2 * j + 1 < numel) store1(out + rows(2 * j + 1), codebook_value(s_code, code4(byte, 1), scale));
  }
}

template <typename T, bool kNested>
cudaError_t launch(const QuantWeight& w, void* out, const OutRows& rows, cudaStream_t stream) {
  const int64_t n_packed = (w.numel + 1) / 2;
  const int64_t threads = (n_packed + kBytesPerThread - 1) / kBytesPerThread;
  const unsigned ctas = static_cast<unsigned>((threads + kThreads - 1) / kThreads);
  // 16-byte stores need every row start aligned too (a stride of whole 16-byte groups)
  const bool aligned = reinterpret_cast<uintptr_t>(w.codes) % 4 == 0 && reinterpret_cast<uintptr_t>(out) % 16 == 0 &&
                       (rows.stride * static_cast<int64_t>(sizeof(T))) % 16 == 0;
  auto kernel = aligned ? dequantize_codebook4_kernel<T, kNested, true> : dequantize_codebook4_kernel<T, kNested, false>;
  kernel<<<ctas, kThreads, 0, stream>>>(w, static_cast<T*>(out), n_packed, rows);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_any(const QuantWeight& w, void* out, const OutRows& rows, cudaStream_t stream) {
  return w.nested_scales != nullptr ? launch<T, true>(w, out, rows, stream) : launch<T, false>(w, out, rows, stream);
}

}  // namespace

cudaError_t dequantize_codebook4(const QuantWeight& w, void* out, DType out_dtype, const OutRows& rows,
                                 cudaStream_t stream) {
  if (w.block_size < 8 || w.block_size % 8) return cudaErrorInvalidValue;
  switch (out_dtype) {
    case DType::kFloat32:
      return launch_any<float>(w, out, rows, stream);
    case DType::kFloat16:
      return launch_any<__half>(w, out, rows, stream);
    case DType::kBFloat16:
      return launch_any<__nv_bfloat16>(w, out, rows, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace qft
