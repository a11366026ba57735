// C entry points of qft's CPU kernels (the `qft._cpu` module). Like the CUDA extension they take raw
// host pointers and sizes, so no torch header is needed and the module builds with any C++17
// compiler. Every function returns 0 on success or an Error code; nothing throws.
#pragma once

#include <cstdint>

namespace qft::cpu {

// Element types, numbered as qft.ops.dispatch.DTYPE_CODES.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

enum Error : int { kOk = 0, kInvalidValue = 1 };

// Instruction sets a kernel can be run with, chosen at run time (isa.cpp). The kernels have AVX2 paths
// (AVX2, FMA and F16C); the bf16 linear, OFT and LoRA-term kernels run at kAvx512Bf16 only (AVX512F/BW/VL/BF16).
enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx512Bf16 = 2 };

// The best set this CPU supports, capped by set_isa_cap (tests run every path on one machine).
Isa active_isa();
Isa detected_isa();
void set_isa_cap(Isa cap);
const char* isa_name(Isa isa);
// Whether the CPU multiplies bf16 natively (AVX512-BF16): torch's bf16 GEMM then beats its fp32 one.
bool native_bf16();

// A quantized weight as the kernels read it (the same fields as the CUDA QuantWeight).
struct Weight {
  const void* codes;            // packed: 4-bit bytes, 3-/2-bit int32 words (qft/formats/packing.py)
  const void* scales;           // fp32 per block, or uint8 codes of dynamic_map when nested_scales is set
  const uint16_t* zeros;        // fp16 bits per block (affine and ICQ formats), else nullptr
  const float* nested_scales;   // double quantization: fl(fl(dynamic_map[q] * nested) + *offset)
  const float* offset;
  const float* code;            // code-book formats: 2**bits values (else nullptr)
  const float* dynamic_map;     // double quantization: 256 values
  int bits;                     // 4, 3 or 2
  bool affine;                  // (q - zero) * scale instead of (code[q] - zero) * scale
  int64_t numel;
  int block_size;               // a multiple of 32
  int nested_block_size;
};

// Decodes every value into `out` (`out_dtype`), bit-identical to qft.formats.dequantize into
// `round_dtype`: each value is fl32((level - zero) * scale) rounded to nearest even into round_dtype,
// then widened exactly to out_dtype. round_dtype == out_dtype is a plain decode; fp32 out with a
// 16-bit round_dtype is the operand of an fp32 GEMM that equals the reference's x.float() @ W.float().
// out_dtype must be fp32 or equal to round_dtype.
int dequantize(const Weight& w, void* out, DType out_dtype, DType round_dtype);

// Largest M quant_gemv serves.
constexpr int kMaxCpuGemvRows = 8;

// y [rows, n_out] (x_dtype) = x [rows, k_in] (x_dtype) @ W^T (+ bias [n_out], bias_dtype) (+ scaling *
// lora_xa [rows, rank] @ lora_b [n_out, rank]^T, both fp32), for rows <= kMaxCpuGemvRows, k_in and the
// block size multiples of 32, w.numel == n_out * k_in. fp32 sums of level(q) * x scaled once per block
// (gemv_cpu.cpp): not bit-equal to decode-then-matmul, closer to the exact product.
int quant_gemv(const Weight& w, const void* x, DType x_dtype, int rows, int64_t n_out, int64_t k_in, const void* bias,
               DType bias_dtype, const float* lora_xa, const float* lora_b, int rank, float scaling, void* y);

// The bf16 linear kernels (linear_bf16_cpu.cpp), for bf16 activations on CPUs with AVX512-BF16
// (active_isa() == kAvx512Bf16, else kInvalidValue). W is decoded into bf16 as dequantize rounds it, and
// bf16 pairs are multiplied exactly and summed in fp32 (vdpbf16ps): the reference's operands and fp32
// sums, in another order; bf16 inputs or sums below fp32's normal range are flushed to zero. k_in and the
// block size multiples of 32, w.numel == n_out * k_in; the epilogue in fp32, one rounding to bf16.
//
// y [rows, n_out] = x [rows, k_in] @ W^T (+ bias [n_out], bias_dtype) (+ scaling * lora_xa [rows, rank] @
// lora_b [n_out, rank]^T, both fp32).
int quant_linear_bf16(const Weight& w, const uint16_t* x, int64_t rows, int64_t n_out, int64_t k_in,
                      const void* bias, DType bias_dtype, const float* lora_xa, const float* lora_b, int rank,
                      float scaling, uint16_t* y);
// grad_x [rows, k_in] = grad [rows, n_out] @ W (+ lora_grad_xa [rows, rank] @ lora_a [rank, k_in], fp32).
int quant_linear_grad_input_bf16(const Weight& w, const uint16_t* grad, int64_t rows, int64_t n_out, int64_t k_in,
                                 const float* lora_grad_xa, const float* lora_a, int rank, uint16_t* grad_x);

// LoRA's thin products between bf16 activations a [rows, width] and fp32 adapters (lora_terms_cpu.cpp),
// each bf16 value widened exactly to fp32 and the products summed in fp32 by fused multiply-adds, in
// another order than torch's fp32 GEMM; at kAvx512Bf16 only (else kInvalidValue). out [rows, outs] = a @ f^T
// with f [outs, width]; and out [outs, width] = f^T @ a with f [rows, outs].
int bf16_times_fp32_nt(const uint16_t* a, int64_t rows, int64_t width, const float* f, int64_t outs, float* out);
int fp32_tn_times_bf16(const float* f, int64_t rows, int64_t outs, const uint16_t* a, int64_t width, float* out);

// dL/d(params) [blocks, b(b-1)/2] of OFT's rotation R = I + sum_k c_k Q^k (Q = U - U^T, U the strict
// upper triangle of params in triu order) from dL/dR [blocks, b, b], all fp32: the closed form of
// qft.reference.oft_rotation_params_grad with `count` coefficients c_1..c_count, in another summation order.
int oft_rotation_params_grad(const float* params, const float* grad_rot, int64_t blocks, int b,
                             const float* coefficients, int count, float* out);

// OFT's rotation of x [rows, blocks * b] (x_dtype) by R [blocks, b, b] fp32 (R^T when `transpose`) into out
// (out_dtype): out[m, rb + c] = sum_k x[m, rb + k] R[r, k, c] by fp32 fused multiply-adds in k order, one
// rounding (oft_rotate_cpu.cpp); and dL/dR [blocks, b, b] fp32 = sum_m x[m, rb + k] g[m, rb + c]. b of 16,
// 32, 48 or 64, at kAvx512Bf16 only (else kInvalidValue).
int oft_rotate(const void* x, DType x_dtype, const float* rot, int64_t rows, int64_t blocks, int b, bool transpose,
               void* out, DType out_dtype);
int oft_rotation_grad(const void* x, DType x_dtype, const void* g, DType g_dtype, int64_t rows, int64_t blocks, int b,
                      float* grad_rot);

// One torch.optim.AdamW step of `numel` values in place (qft.ops.adamw.reference_step's arithmetic,
// as the fused Triton step computes it): p (p_dtype) and g (g_dtype) any float type; the moments either
// fp32 (m, v) or 8-bit (codes m8, v8 with fp32 absmax per 256 values, moments8's format, when
// m_absmax != nullptr). `scalars`: decay, w1 (1 - beta1), beta2, w2 (1 - beta2), bc2_sqrt, eps,
// neg_step, sign (-1 to maximize), as fp32. `first`: 65536 int32 and `mids`: 256 fp32 (255 midpoints
// and +inf) per map, signed then unsigned (moments8._code_lookup); `maps`: the signed then unsigned
// 256-entry dynamic maps.
struct AdamWScalars {
  float decay, w1, beta2, w2, bc2_sqrt, eps, neg_step, sign;
};
int adamw_step(void* p, DType p_dtype, const void* g, DType g_dtype, void* m, void* v, float* m_absmax,
               float* v_absmax, int64_t numel, const AdamWScalars& s, const float* maps, const int32_t* first,
               const float* mids);

}  // namespace qft::cpu
