// Blockwise nf4/fp4 quantization: one warp per quantization block.
#include <cuda_runtime.h>

#include "decode.cuh"
#include "element.cuh"

namespace qft {
namespace {

constexpr int kWarpsPerCta = 8;
constexpr float kAbsmaxFloor = 1e-38f;  // bitsandbytes' clamp before the reciprocal

struct Encoder {
  float thresholds[15];  // indexed by unrolled constants: stays in registers
  const int32_t* order;  // indexed at run time: read through the read-only cache, not a local array
  float reciprocal, floored;
  bool partial;

  // Same fp32 steps as qft.formats.quantize: x * (1/absmax) (x / absmax in a partial block), clamp,
  // count thresholds strictly below.
  __device__ __forceinline__ int operator()(float x) const {
    float s = partial ? __fdiv_rn(x, floored) : __fmul_rn(x, reciprocal);
    s = fminf(fmaxf(s, -1.0f), 1.0f);
    int position = 0;
#pragma unroll
    for (int t = 0; t < 15; ++t) position += s > thresholds[t];
    return __ldg(order + position);
  }
};

template <typename T>
__global__ void quantize_codebook4_kernel(const T* __restrict__ w, uint8_t* __restrict__ packed,
                                     float* __restrict__ absmax, const float* __restrict__ thresholds,
                                     const int32_t* __restrict__ encode_order, int64_t numel,
                                     int block_size, int64_t num_blocks) {
  const int lane = threadIdx.x & 31;
  const int64_t block = static_cast<int64_t>(blockIdx.x) * kWarpsPerCta + (threadIdx.x >> 5);
  if (block >= num_blocks) return;
  const int64_t start = block * block_size;
  const int64_t end = min(start + block_size, numel);

  float amax = 0.0f;
  for (int64_t i = start + lane; i < end; i += 32) amax = fmaxf(amax, fabsf(to_float(w[i])));
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  if (lane == 0) absmax[block] = amax;

  Encoder enc;
#pragma unroll
  for (int t = 0; t < 15; ++t) enc.thresholds[t] = __ldg(thresholds + t);
  enc.order = encode_order;
  enc.floored = fmaxf(amax, kAbsmaxFloor);
  enc.reciprocal = __frcp_rn(enc.floored);
  enc.partial = end - start < block_size;

  // Each lane packs whole bytes: elements 2p (high nibble) and 2p + 1 (low; zero code past the end).
  for (int64_t p = start / 2 + lane; 2 * p < end; p += 32) {
    const int high = enc(to_float(w[2 * p]));
    const int low = enc(2 * p + 1 < end ? to_float(w[2 * p + 1]) : 0.0f);
    packed[p] = pack4(high, low);
  }
}

template <typename T>
cudaError_t launch(const void* w, uint8_t* packed, float* absmax, const float* thresholds,
                   const int32_t* order, int64_t numel, int block_size, cudaStream_t stream) {
  const int64_t num_blocks = (numel + block_size - 1) / block_size;
  const int64_t ctas = (num_blocks + kWarpsPerCta - 1) / kWarpsPerCta;
  quantize_codebook4_kernel<T><<<static_cast<unsigned>(ctas), 32 * kWarpsPerCta, 0, stream>>>(
      static_cast<const T*>(w), packed, absmax, thresholds, order, numel, block_size, num_blocks);
  return cudaGetLastError();
}

}  // namespace

int quantize_codebook4(const void* w, DType dtype, uint8_t* codes, float* scales, const float* thresholds,
                       const int32_t* encode_order, int64_t numel, int block_size, void* stream) {
  if (numel <= 0 || block_size < 2 || block_size % 2) return cudaErrorInvalidValue;
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat32:
      return launch<float>(w, codes, scales, thresholds, encode_order, numel, block_size, s);
    case DType::kFloat16:
      return launch<__half>(w, codes, scales, thresholds, encode_order, numel, block_size, s);
    case DType::kBFloat16:
      return launch<__nv_bfloat16>(w, codes, scales, thresholds, encode_order, numel, block_size, s);
  }
  return cudaErrorInvalidValue;
}

}  // namespace qft
