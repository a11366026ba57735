// C entry points of qft's CUDA kernels. No torch headers: callers pass raw device pointers, sizes
// and a cudaStream_t (as an opaque handle), so the extension does not depend on the torch ABI.
// Every function returns a cudaError_t value (0 = success).
#pragma once

#include <cstdint>

namespace qft {

// Element types the kernels read and write; values match qft.ops.dispatch.DTYPE_CODES.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// A quantized weight as the kernels read it: its parts (qft.formats.Weight) and the format's tables.
struct QuantWeight {
  const void* codes;           // packed (qft/formats/packing.py): 4-bit bytes, 3-/2-bit int32 words
  const void* scales;          // per block: fp32, or uint8 codes of dynamic_map when nested_scales is set
  const void* zeros;           // affine and ICQ formats: fp16 per block, subtracted from the level (else nullptr)
  const float* nested_scales;  // double quantization: scale = dynamic_map[q] * nested_scales[block /
  const float* offset;         //   nested_block_size] + *offset, rounded after each step
  const float* code;           // code-book formats: the 2**bits fp32 values (else nullptr)
  const float* dynamic_map;    // double quantization: the signed 8-bit map, 256 fp32
  int bits;                    // 4, 3 or 2
  bool affine;                 // (q - zero) * scale instead of code[q] * scale
  int64_t numel;
  int block_size;
  int nested_block_size;
};

// Blockwise nf4/fp4 quantization, bit-identical to qft.formats.quantize.
// w: numel values of `dtype`; codes: (numel + 1) / 2 bytes; scales: ceil(numel / block_size) fp32.
// thresholds: 15 ascending fp32; encode_order: 16 int32 (threshold position -> nibble).
int quantize_codebook4(const void* w, DType dtype, uint8_t* codes, float* scales, const float* thresholds,
                       const int32_t* encode_order, int64_t numel, int block_size, void* stream);

// Decodes all w.numel values into `out` (`out_dtype`), bit-identical to qft.formats.dequantize:
// code[q] * scale, (code[q] - zero) * scale or (q - zero) * scale in fp32, rounded to nearest even. 4-bit
// code books without zeros (nf4, fp4) take a byte-pair kernel (block_size % 8 == 0), every other format a packing-unit one
// (block_size % 32 == 0). Rows of `row_length` values land `row_stride` values apart (row_stride ==
// row_length: flat), so a GEMM operand can hold more columns beside W; a strided row_length must be a
// multiple of 32.
int dequantize(const QuantWeight& w, void* out, DType out_dtype, int64_t row_length, int64_t row_stride,
               void* stream);

// Largest M served by quant_gemv.
constexpr int kMaxGemvRows = 4;

// y [rows, n_out] = x [rows, k_in] @ W^T (+ bias) (+ scaling * lora_xa [rows, rank] @ lora_b [n_out, rank]^T)
// with W = w [n_out, k_in] in any qft format. x, bias and y have `dtype`; lora_xa and lora_b are fp32;
// bias and lora_xa may be nullptr; rows <= kMaxGemvRows; w.numel == n_out * k_in.
// Every real layer (blocks of >= 64 inside rows, power-of-two nested blocks, x and codes 16-byte
// aligned) takes the chunked kernel (csrc/gemv_core.cuh): fp32 sums of code values times x, scaled
// once per block, so decoded weights are never rounded to x's dtype. With splits > 1 it splits K
// over that many CTAs (at most k_in / 64), writing fp32 partials to workspace [splits, rows, n_out]
// that a second kernel adds in split order (deterministic). Other shapes take a per-value kernel that
// rounds each decoded weight as dequantize does (splits then unused).
int quant_gemv(const void* x, DType dtype, const QuantWeight& w, const void* bias, const float* lora_xa,
               const float* lora_b, float scaling, int rank, void* y, int rows, int64_t n_out, int64_t k_in,
               int splits, float* workspace, void* stream);

// quant_gemv's chunked kernel run on the CPU, every pointer a host one: the same arithmetic, table
// and reduction order (csrc/gemv_core.cuh), so a GPU result can be checked bit for bit against it and
// its index math tested on machines without a GPU. Returns cudaErrorInvalidValue where quant_gemv
// would refuse, cudaErrorNotSupported for problems quant_gemv sends to the per-value kernel.
int quant_gemv_emulate(const void* x, DType dtype, const QuantWeight& w, const void* bias, const float* lora_xa,
                       const float* lora_b, float scaling, int rank, void* y, int rows, int64_t n_out,
                       int64_t k_in, int splits, float* workspace);

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
