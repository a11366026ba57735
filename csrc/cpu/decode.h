// Decoding pieces the CPU kernels share (dequantize_cpu.cpp): a linear kernel decodes the rows or
// columns it is about to multiply, as dequantize decodes them.
#pragma once

#include <cstdint>

#include "cpu_kernels.h"

namespace qft::cpu {

// Values [start, start + count) of w as bf16 bits, each as dequantize rounds it into bf16; start and
// count multiples of 32. For the kernels that run at Isa::kAvx512Bf16: 4-bit codes take a word permute
// there, other widths (and other sets) the scalar table lookup.
void decode_span_bf16(const Weight& w, int64_t start, int64_t count, uint16_t* out);

}  // namespace qft::cpu
