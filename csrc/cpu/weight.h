// A quantized weight's per-block numbers, as every CPU kernel reads them (qft.formats' reference:
// double-quantized scales fl(fl(map[q] * nested) + offset), fp16 zeros).
#pragma once

#include <cstdint>

#include "convert.h"
#include "cpu_kernels.h"

namespace qft::cpu {

// fp32 scale of block `block`: stored, or decoded from the double quantization (one rounding per step).
inline float block_scale(const Weight& w, int64_t block) {
  if (w.nested_scales == nullptr) return static_cast<const float*>(w.scales)[block];
  const uint8_t q = static_cast<const uint8_t*>(w.scales)[block];
  const float scaled = w.dynamic_map[q] * w.nested_scales[block / w.nested_block_size];
  return scaled + *w.offset;
}

// The block's zero point as fp32 (formats with zeros; 0 otherwise).
inline float block_zero(const Weight& w, int64_t block) {
  return w.zeros != nullptr ? from_fp16(w.zeros[block]) : 0.0f;
}

// The parts a weight of this width and kind needs, and a positive nested block size.
inline bool weight_parts_ok(const Weight& w) {
  const bool nested_ok = w.nested_scales == nullptr || (w.offset != nullptr && w.dynamic_map != nullptr);
  return (w.bits == 2 || w.bits == 3 || w.bits == 4) && w.codes != nullptr && w.scales != nullptr &&
         (w.affine ? w.zeros != nullptr : w.code != nullptr) && nested_ok && w.nested_block_size > 0;
}

}  // namespace qft::cpu
