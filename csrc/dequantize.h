// The two kernels behind qft::dequantize, one per file; qft::dequantize (dequantize.cu) checks
// the weight and picks one.
#pragma once

#include <cuda_runtime.h>

#include "qft_kernels.h"

namespace qft {

// Where decoded value `flat` goes: rows of `length` values `stride` apart (stride == length: flat).
// Callers keep a thread's values inside one row (length a multiple of what a thread decodes).
struct OutRows {
  int64_t length;
  int64_t stride;
  __device__ __forceinline__ int64_t operator()(int64_t flat) const {
    return stride == length ? flat : flat + (flat / length) * (stride - length);
  }
};

// nf4/fp4: two values per byte from a shared-memory code book (dequantize_codebook4.cu). block_size % 8 == 0.
cudaError_t dequantize_codebook4(const QuantWeight& w, void* out, DType out_dtype, const OutRows& rows,
                                 cudaStream_t stream);

// Every format, one packing unit per thread (dequantize.cu). block_size % 32 == 0.
cudaError_t dequantize_units(const QuantWeight& w, void* out, DType out_dtype, const OutRows& rows,
                             cudaStream_t stream);

}  // namespace qft
