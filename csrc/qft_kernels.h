// C entry points of qft's CUDA kernels. No torch headers: callers pass raw device pointers, sizes
// and a cudaStream_t (as an opaque handle), so the extension does not depend on the torch ABI.
// Every function returns a cudaError_t value (0 = success).
#pragma once

#include <cstdint>

namespace qft {

// Element types the kernels read and write; values match qft/ops.py's DTYPE_CODES.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Blockwise 4-bit quantization, bit-identical to qft.reference.quantize_4bit.
// w: numel values of `dtype`; packed: (numel + 1) / 2 bytes; absmax: ceil(numel / block_size) fp32.
// thresholds: 15 ascending fp32; encode_order: 16 int32 (threshold position -> nibble).
int quantize_4bit(const void* w, DType dtype, uint8_t* packed, float* absmax, const float* thresholds,
                  const int32_t* encode_order, int64_t numel, int block_size, void* stream);

// Blockwise 4-bit dequantization, bit-identical to qft.reference.dequantize_4bit.
// absmax: fp32 per block, or (when nested_absmax != nullptr) uint8 codes of `dynamic_map` decoded as
// dynamic_map[q] * nested_absmax[block / nested_block_size] + *offset.
int dequantize_4bit(const uint8_t* packed, const void* absmax, const float* nested_absmax,
                    const float* offset, const float* dynamic_map, const float* code, void* out,
                    DType out_dtype, int64_t numel, int block_size, int nested_block_size, void* stream);

// Dequantization of 3-/2-bit code books and affine int4/3/2 (bit-identical to qft.reference_lowbit):
// code[q] * scale, or (q - zero) * scale for affine formats (zero: fp16 per block). `packed` holds
// int32 words (3-, 2-bit) or bytes (4-bit); scale as in dequantize_4bit's absmax. block_size % 32 == 0.
int dequantize_lowbit(const void* packed, int bits, bool affine, const void* scale, const float* nested_absmax,
                      const float* offset, const float* dynamic_map, const float* code, const void* zero, void* out,
                      DType out_dtype, int64_t numel, int block_size, int nested_block_size, void* stream);

// Largest M served by quant_gemv.
constexpr int kMaxGemvRows = 4;

// y [rows, n_out] = x [rows, k_in] @ W^T (+ bias) (+ scaling * lora_xa [rows, rank] @ lora_b [n_out, rank]^T)
// with W [n_out, k_in] in any qft format (`bits` 4/3/2; `zero` fp16 per block for affine formats, else
// `code` the code book), decoded as dequantize_4bit / dequantize_lowbit do and rounded to x's dtype. x,
// bias and y have `dtype`; lora_xa and lora_b are fp32; bias and lora_xa may be nullptr.
// rows <= kMaxGemvRows; block_size % 32 == 0.
int quant_gemv(const void* x, DType dtype, const void* packed, int bits, const void* zero, const void* absmax,
               const float* nested_absmax, const float* offset, const float* dynamic_map, const float* code,
               int block_size, int nested_block_size, const void* bias, const float* lora_xa, const float* lora_b,
               float scaling, int rank, void* y, int rows, int64_t n_out, int64_t k_in, void* stream);

// Managed (unified) memory for paged optimizer state (csrc/managed.cu). managed_prefetch moves a
// range to GPU `device`, or to the host when device < 0; it sets *prefetched = 0 (and succeeds) on
// GPUs without concurrent managed access, where pages migrate on demand.
int managed_alloc(void** ptr, size_t nbytes);
int managed_free(void* ptr);
int managed_prefetch(void* ptr, size_t nbytes, int device, void* stream, int* prefetched);

// Number of visible CUDA devices, 0 when there is no GPU or no usable driver (never throws).
int device_count();
// Text of the last device_count() failure ("" when a device is present).
const char* device_status();
int runtime_version();
int driver_version();
const char* error_string(int error);

}  // namespace qft
