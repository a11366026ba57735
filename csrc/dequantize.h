// The two kernels behind qft::dequantize, one per file; qft::dequantize (dequantize.cu) checks
// the weight and picks one.
#pragma once

#include <cuda_runtime.h>

#include "qft_kernels.h"

namespace qft {

// nf4/fp4: two values per byte from a shared-memory code book (dequantize_codebook4.cu). block_size % 8 == 0.
cudaError_t dequantize_codebook4(const QuantWeight& w, void* out, DType out_dtype, cudaStream_t stream);

// Every format, one packing unit per thread (dequantize.cu). block_size % 32 == 0.
cudaError_t dequantize_units(const QuantWeight& w, void* out, DType out_dtype, cudaStream_t stream);

}  // namespace qft
