// Scalar conversions between fp32 and the 16-bit storage types, round to nearest even as torch's
// .to(dtype) rounds; every kernel's tables and tails go through these.
#pragma once

#include <cstdint>
#include <cstring>

#include "cpu_kernels.h"

namespace qft::cpu {

// The same bits as another type of the same size (std::bit_cast before C++20).
template <typename To, typename From>
inline To same_bits(From from) {
  static_assert(sizeof(To) == sizeof(From), "same_bits needs types of one size");
  To to;
  std::memcpy(&to, &from, sizeof to);
  return to;
}

inline uint32_t bits_of(float f) { return same_bits<uint32_t>(f); }
inline float float_of(uint32_t u) { return same_bits<float>(u); }

// bf16 keeps fp32's top 16 bits: add half of the dropped part (and its lowest kept bit, for ties to
// even); every NaN becomes the quiet NaN 0x7FC0 (as c10::BFloat16).
inline uint16_t bf16_bits(float f) {
  const uint32_t u = bits_of(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0u;
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

inline float from_bf16(uint16_t h) { return float_of(static_cast<uint32_t>(h) << 16); }

// fp16 through the compiler's _Float16 (IEEE conversions, round to nearest even).
inline uint16_t fp16_bits(float f) { return same_bits<uint16_t>(static_cast<_Float16>(f)); }
inline float from_fp16(uint16_t u) { return static_cast<float>(same_bits<_Float16>(u)); }

inline float load_float(const void* base, DType dtype, int64_t i) {
  switch (dtype) {
    case DType::kFloat16:
      return from_fp16(static_cast<const uint16_t*>(base)[i]);
    case DType::kBFloat16:
      return from_bf16(static_cast<const uint16_t*>(base)[i]);
    default:
      return static_cast<const float*>(base)[i];
  }
}

inline void store_float(void* base, DType dtype, int64_t i, float v) {
  switch (dtype) {
    case DType::kFloat16:
      static_cast<uint16_t*>(base)[i] = fp16_bits(v);
      break;
    case DType::kBFloat16:
      static_cast<uint16_t*>(base)[i] = bf16_bits(v);
      break;
    default:
      static_cast<float*>(base)[i] = v;
  }
}

// v rounded to `dtype` and widened back to fp32 (exact): the value a 16-bit operand holds.
inline float rounded_through(float v, DType dtype) {
  switch (dtype) {
    case DType::kFloat16:
      return from_fp16(fp16_bits(v));
    case DType::kBFloat16:
      return from_bf16(bf16_bits(v));
    default:
      return v;
  }
}

}  // namespace qft::cpu
