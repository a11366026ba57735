// How a QuantWeight decodes, written once for every CUDA kernel (as kernels/decode.py is for Triton):
// where a code sits in the packed codes (qft/formats/packing.py; pack4 is the 4-bit quantizer's
// inverse), the block scale with or without double quantization, and the value. The arithmetic is
// qft.formats' reference bit for bit: each product or sum one fp32 rounding (__fmul_rn/__fadd_rn, so
// nothing is contracted into an fma).
#pragma once

#include <cuda_fp16.h>

#include <cstdint>

#include "qft_kernels.h"

namespace qft {

// ---- codes ----------------------------------------------------------------------------------------------

// Values per packing unit: 4 bytes at 4 bits (one 32-bit load), three int32 words at 3, one at 2.
__host__ __device__ constexpr int unit_values(int bits) { return bits == 3 ? 32 : bits == 2 ? 16 : 8; }

// 4-bit: value 2j in the high nibble of byte j, 2j + 1 in the low one (bitsandbytes' order).
__device__ __forceinline__ int code4(uint32_t byte, int odd) {
  return static_cast<int>(odd ? (byte & 0xFu) : (byte >> 4));
}
// The byte holding values 2j (`even`) and 2j + 1 (`odd`): code4's inverse, for the 4-bit quantizer.
__device__ __forceinline__ uint8_t pack4(int even, int odd) { return static_cast<uint8_t>((even << 4) | odd); }
// 2-bit: value i (0..15) of a word at bits 2i, 2i + 1.
__device__ __forceinline__ int code2(uint32_t word, int i) { return static_cast<int>((word >> (2 * i)) & 3u); }
// 3-bit planar: value i (0..31) has its low two bits in word i / 16 (`low`) and its high bit at bit i of
// the unit's third word (`high`).
__device__ __forceinline__ int code3(uint32_t low, uint32_t high, int i) {
  return static_cast<int>(((low >> (2 * (i % 16))) & 3u) | (((high >> i) & 1u) << 2));
}

// The codes of packing unit `unit` into q[0, unit_values(kBits)). 4-bit units are read as one 32-bit
// word when kAligned (codes 4-byte aligned), else byte by byte.
template <int kBits, bool kAligned = true, int N>
__device__ __forceinline__ void unit_codes(const void* codes, int64_t unit, int (&q)[N]) {
  static_assert(N >= unit_values(kBits), "q too small for the unit");
  const uint32_t* words = static_cast<const uint32_t*>(codes);
  if constexpr (kBits == 4) {
    uint32_t word;  // byte j of the unit at bits 8j..8j+7
    if constexpr (kAligned) {
      word = words[unit];
    } else {
      const uint8_t* b = static_cast<const uint8_t*>(codes) + 4 * unit;
      word = b[0] | (b[1] << 8) | (b[2] << 16) | (static_cast<uint32_t>(b[3]) << 24);
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) q[i] = code4((word >> (8 * (i / 2))) & 0xFFu, i % 2);
  } else if constexpr (kBits == 2) {
    const uint32_t word = words[unit];
#pragma unroll
    for (int i = 0; i < 16; ++i) q[i] = code2(word, i);
  } else {
    static_assert(kBits == 3, "4-, 3- or 2-bit codes");
    const uint32_t w0 = words[3 * unit], w1 = words[3 * unit + 1], w2 = words[3 * unit + 2];
#pragma unroll
    for (int i = 0; i < 32; ++i) q[i] = code3(i < 16 ? w0 : w1, w2, i);
  }
}

// The same with the width known at run time (codes 4-byte aligned); returns the unit's value count.
__device__ __forceinline__ int unit_codes(const void* codes, int bits, int64_t unit, int (&q)[32]) {
  if (bits == 4) {
    unit_codes<4>(codes, unit, q);
    return unit_values(4);
  }
  if (bits == 2) {
    unit_codes<2>(codes, unit, q);
    return unit_values(2);
  }
  unit_codes<3>(codes, unit, q);
  return unit_values(3);
}

// The code of flat value `flat` alone (any alignment of 4-bit codes).
__device__ __forceinline__ int code_at(const void* codes, int bits, int64_t flat) {
  if (bits == 4) return code4(static_cast<const uint8_t*>(codes)[flat >> 1], static_cast<int>(flat & 1));
  const uint32_t* words = static_cast<const uint32_t*>(codes);
  if (bits == 2) return code2(words[flat / 16], static_cast<int>(flat % 16));
  const int64_t base = 3 * (flat / 32);
  const int i = static_cast<int>(flat % 32);
  return code3(words[base + i / 16], words[base + 2], i);
}

// ---- scales ---------------------------------------------------------------------------------------------

// Reads the dynamic map through the read-only cache; a plain `const float*` (global or shared) serves too.
struct ReadOnly {
  const float* table;
  __device__ __forceinline__ float operator[](int i) const { return __ldg(table + i); }
};

// fp32 scale of block `block`: stored, or (nested: w.nested_scales != nullptr, passed so a kernel can fix
// it at compile time) the uint8 code's dynamic-map value times its nested scale plus the offset, rounded
// after each step as qft.formats.double_quant: fl(fl(map[q] * nested) + offset).
template <typename Map>
__device__ __forceinline__ float block_scale(const QuantWeight& w, bool nested, const Map& map, int64_t block) {
  if (!nested) return static_cast<const float*>(w.scales)[block];
  const uint8_t q = static_cast<const uint8_t*>(w.scales)[block];
  return __fadd_rn(__fmul_rn(map[q], w.nested_scales[block / w.nested_block_size]), *w.offset);
}

// The block's zero point as fp32 (formats with zeros: affine, ICQ code books; 0 otherwise).
__device__ __forceinline__ float block_zero(const QuantWeight& w, int64_t block) {
  return w.zeros != nullptr ? __half2float(static_cast<const __half*>(w.zeros)[block]) : 0.0f;
}

// ---- values ---------------------------------------------------------------------------------------------

// code[q] * scale for code books (`code` wherever the kernel keeps it), (code[q] - zero) * scale for code
// books with zeros (zero 0 without: code[q] - 0 is code[q] exactly), (q - zero) * scale for affine formats:
// one fp32 rounding per step.
__device__ __forceinline__ float codebook_value(const float* code, int q, float scale) {
  return __fmul_rn(code[q], scale);
}
__device__ __forceinline__ float codebook_value(const float* code, int q, float scale, float zero) {
  return __fmul_rn(__fsub_rn(code[q], zero), scale);
}
__device__ __forceinline__ float affine_value(int q, float zero, float scale) {
  return __fmul_rn(static_cast<float>(q) - zero, scale);
}
__device__ __forceinline__ float decode_value(bool affine, const float* code, int q, float scale, float zero) {
  return affine ? affine_value(q, zero, scale) : codebook_value(code, q, scale, zero);
}

// ---- host side ------------------------------------------------------------------------------------------

// The checks every entry point makes before a launch: a width qft packs, the parts its format needs, a
// positive nested block size. Block-size rules differ per kernel and stay with them.
inline bool valid_weight(const QuantWeight& w) {
  const bool nested_ok = w.nested_scales == nullptr || (w.offset != nullptr && w.dynamic_map != nullptr);
  return w.numel > 0 && (w.bits == 2 || w.bits == 3 || w.bits == 4) && w.codes != nullptr &&
         w.scales != nullptr && (w.affine ? w.zeros != nullptr : w.code != nullptr) && nested_ok &&
         w.nested_block_size > 0;
}

}  // namespace qft
