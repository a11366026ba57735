// Dequantization of every format one packing unit per thread (qft/formats/packing.py): 32 values
// (three int32 words) at 3 bits, 16 (one word) at 2 bits, 8 (four bytes) at 4 bits. Every block/group
// holds a multiple of 32 values, so a unit never straddles two scales; outputs go out 8 at a time
// (16-byte stores). Also qft::dequantize, which sends nf4/fp4 to the byte-pair kernel instead.
#include <cuda_runtime.h>

#include "decode.cuh"
#include "dequantize.h"
#include "element.cuh"

namespace qft {
namespace {

constexpr int kThreads = 256;

template <typename T, int kBits>
__global__ void dequantize_units_kernel(QuantWeight w, T* __restrict__ out, OutRows rows) {
  constexpr int kValues = unit_values(kBits);
  const int64_t unit = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t first = unit * kValues;
  if (first >= w.numel) return;
  int q[kValues];
  unit_codes<kBits, /*kAligned=*/false>(w.codes, unit, q);  // 4-bit codes may start at any byte
  const int64_t block = first / w.block_size;
  const float scale = block_scale(w, w.nested_scales != nullptr, w.dynamic_map, block);
  const float zero = block_zero(w, block);
  float v[kValues];
#pragma unroll
  for (int i = 0; i < kValues; ++i) v[i] = decode_value(w.affine, w.code, q[i], scale, zero);
  T* dst = out + rows(first);  // a unit stays in one row (length % 32 == 0 when strided)
  const bool whole = first + kValues <= w.numel && reinterpret_cast<uintptr_t>(dst) % 16 == 0;
  if (whole) {
#pragma unroll
    for (int i = 0; i < kValues; i += 8) store8(dst + i, *reinterpret_cast<const float(*)[8]>(v + i));
    return;
  }
  for (int i = 0; i < kValues && first + i < w.numel; ++i) store1(dst + i, v[i]);
}

template <typename T>
cudaError_t launch(const QuantWeight& w, void* out, const OutRows& rows, cudaStream_t stream) {
  const int64_t units = (w.numel + unit_values(w.bits) - 1) / unit_values(w.bits);
  const unsigned ctas = static_cast<unsigned>((units + kThreads - 1) / kThreads);
  T* o = static_cast<T*>(out);
  if (w.bits == 3)
    dequantize_units_kernel<T, 3><<<ctas, kThreads, 0, stream>>>(w, o, rows);
  else if (w.bits == 2)
    dequantize_units_kernel<T, 2><<<ctas, kThreads, 0, stream>>>(w, o, rows);
  else
    dequantize_units_kernel<T, 4><<<ctas, kThreads, 0, stream>>>(w, o, rows);
  return cudaGetLastError();
}

}  // namespace

cudaError_t dequantize_units(const QuantWeight& w, void* out, DType out_dtype, const OutRows& rows,
                             cudaStream_t stream) {
  if (w.block_size < 32 || w.block_size % 32) return cudaErrorInvalidValue;
  switch (out_dtype) {
    case DType::kFloat32:
      return launch<float>(w, out, rows, stream);
    case DType::kFloat16:
      return launch<__half>(w, out, rows, stream);
    case DType::kBFloat16:
      return launch<__nv_bfloat16>(w, out, rows, stream);
  }
  return cudaErrorInvalidValue;
}

int dequantize(const QuantWeight& w, void* out, DType out_dtype, int64_t row_length, int64_t row_stride,
               void* stream) {
  const bool rows_ok = row_length > 0 && w.numel % row_length == 0 &&
                       (row_stride == row_length || (row_stride > row_length && row_length % 32 == 0));
  if (!valid_weight(w) || out == nullptr || !rows_ok) return cudaErrorInvalidValue;
  auto s = static_cast<cudaStream_t>(stream);
  const OutRows rows{row_length, row_stride};
  return w.bits == 4 && !w.affine && w.zeros == nullptr ? dequantize_codebook4(w, out, out_dtype, rows, s)
                                                        : dequantize_units(w, out, out_dtype, rows, s);
}

}  // namespace qft
