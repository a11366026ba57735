// Dequantization of 3-/2-bit code books and affine int4/3/2 (qft/formats.py layouts).
// One thread decodes one packing unit: 32 values (three int32 words) at 3 bits, 16 values (one
// word) at 2 bits, 8 values (four bytes) at 4 bits. Every block/group holds a multiple of 32
// values, so a unit never straddles two scales; outputs go out 8 at a time (16-byte stores).
#include <cuda_runtime.h>

#include "element.cuh"
#include "qft_kernels.h"

namespace qft {
namespace {

constexpr int kThreads = 256;

struct LowbitArgs {
  const void* packed;
  const void* scale;  // fp32 per block, or uint8 codes when nested_absmax != nullptr
  const float* nested_absmax;
  const float* offset;
  const float* dynamic_map;
  const float* code;     // code books: 2**bits values
  const __half* zero;    // affine: per block
  int bits, block_size, nested_block_size;
  bool affine;
};

__device__ __forceinline__ float block_scale(const LowbitArgs& a, int64_t block) {
  if (a.nested_absmax == nullptr) return static_cast<const float*>(a.scale)[block];
  const uint8_t q = static_cast<const uint8_t*>(a.scale)[block];
  return __fadd_rn(__fmul_rn(a.dynamic_map[q], a.nested_absmax[block / a.nested_block_size]), *a.offset);
}

template <int kValues>
__device__ __forceinline__ void unpack_unit(const LowbitArgs& a, int64_t unit, int (&q)[kValues]) {
  if constexpr (kValues == 32) {  // 3-bit planar
    const uint32_t* w = static_cast<const uint32_t*>(a.packed) + 3 * unit;
    const uint32_t w0 = w[0], w1 = w[1], w2 = w[2];
#pragma unroll
    for (int i = 0; i < 32; ++i) {
      const uint32_t low = ((i < 16 ? w0 : w1) >> (2 * (i % 16))) & 3u;
      q[i] = static_cast<int>(low | (((w2 >> i) & 1u) << 2));
    }
  } else if constexpr (kValues == 16) {  // 2-bit
    const uint32_t w = static_cast<const uint32_t*>(a.packed)[unit];
#pragma unroll
    for (int i = 0; i < 16; ++i) q[i] = static_cast<int>((w >> (2 * i)) & 3u);
  } else {  // 4-bit: two codes per byte, element 2j high
    const uint8_t* b = static_cast<const uint8_t*>(a.packed) + 4 * unit;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      q[2 * i] = b[i] >> 4;
      q[2 * i + 1] = b[i] & 0xF;
    }
  }
}

template <typename T, int kValues>
__global__ void dequantize_lowbit_kernel(LowbitArgs a, T* __restrict__ out, int64_t numel) {
  const int64_t unit = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t first = unit * kValues;
  if (first >= numel) return;
  int q[kValues];
  unpack_unit<kValues>(a, unit, q);
  const int64_t block = first / a.block_size;
  const float scale = block_scale(a, block);
  const float zero = a.affine ? __half2float(a.zero[block]) : 0.0f;
  float v[kValues];
#pragma unroll
  for (int i = 0; i < kValues; ++i)
    v[i] = a.affine ? __fmul_rn(static_cast<float>(q[i]) - zero, scale) : __fmul_rn(a.code[q[i]], scale);
  const bool whole = first + kValues <= numel && reinterpret_cast<uintptr_t>(out + first) % 16 == 0;
  if (whole) {
#pragma unroll
    for (int i = 0; i < kValues; i += 8) store8(out + first + i, *reinterpret_cast<const float(*)[8]>(v + i));
    return;
  }
  for (int i = 0; i < kValues && first + i < numel; ++i) store1(out + first + i, v[i]);
}

template <typename T>
cudaError_t launch(const LowbitArgs& a, void* out, int64_t numel, cudaStream_t stream) {
  const int values = a.bits == 3 ? 32 : a.bits == 2 ? 16 : 8;
  const int64_t units = (numel + values - 1) / values;
  const unsigned ctas = static_cast<unsigned>((units + kThreads - 1) / kThreads);
  T* o = static_cast<T*>(out);
  if (a.bits == 3)
    dequantize_lowbit_kernel<T, 32><<<ctas, kThreads, 0, stream>>>(a, o, numel);
  else if (a.bits == 2)
    dequantize_lowbit_kernel<T, 16><<<ctas, kThreads, 0, stream>>>(a, o, numel);
  else
    dequantize_lowbit_kernel<T, 8><<<ctas, kThreads, 0, stream>>>(a, o, numel);
  return cudaGetLastError();
}

}  // namespace

int dequantize_lowbit(const void* packed, int bits, bool affine, const void* scale, const float* nested_absmax,
                      const float* offset, const float* dynamic_map, const float* code, const void* zero, void* out,
                      DType out_dtype, int64_t numel, int block_size, int nested_block_size, void* stream) {
  if (numel <= 0 || (bits != 2 && bits != 3 && bits != 4) || block_size < 32 || block_size % 32 ||
      (affine && zero == nullptr) || (!affine && code == nullptr))
    return cudaErrorInvalidValue;
  const LowbitArgs a{packed, scale, nested_absmax, offset, dynamic_map, code, static_cast<const __half*>(zero),
                     bits, block_size, nested_block_size, affine};
  auto s = static_cast<cudaStream_t>(stream);
  switch (out_dtype) {
    case DType::kFloat32:
      return launch<float>(a, out, numel, s);
    case DType::kFloat16:
      return launch<__half>(a, out, numel, s);
    case DType::kBFloat16:
      return launch<__nv_bfloat16>(a, out, numel, s);
  }
  return cudaErrorInvalidValue;
}

}  // namespace qft
