// The decode GEMV's arithmetic, written once for the GPU kernel (quant_gemv.cu) and for its CPU
// emulation (quant_gemv_emulate.cu): every function here is __host__ __device__, so the emulation
// runs the same index math, look-up tables, loads, fmaf chains and warp reduction as the kernel,
// bit for bit (fmaf is one rounding on both sides). Designed to an instruction budget at M = 1
// (issue 16: <= 6 / 5 / 4 SASS instructions per weight at 4 / 3 / 2 bits):
//
// * A lane owns whole chunks of kChunk = 64 values of rows_per_warp(M, x) weight rows, loaded with 16- (or
//   8-, 3-bit) byte loads, all rows' loads issued before any decode.
// * Codes decode through a shared-memory table indexed by a byte (4-bit: two values; 2-bit: four) or by
//   6 bits (3-bit: two values, low bits of both from one word, high bits from the third): one shift
//   and one mask give the table offset, one LDS.64/.128 gives fp32 values, then one fmaf per weight.
//   The table holds one copy per bank group a shared-memory phase serves (16 for 8-byte entries, 8 for
//   16-byte ones), each lane reading its own, so random codes never conflict on a bank.
// * Scales multiply a chunk's dot product once (code books: scale * sum(code[q] x); formats with zeros:
//   scale * (sum(level(q) x) - zero * sum(x))), so decoded weights are not rounded to x's dtype: y is closer
//   to the exact product than decode-then-matmul is, not bit-equal to it.
// * Each x value is loaded and converted once per chunk and used for every row of the warp.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "decode.cuh"
#include "qft_kernels.h"

namespace qft {
namespace gemv {

constexpr int kChunk = 64;       // values per lane step (divides every block the fast path takes)
constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;
// Weight rows a warp owns, sharing each x load: four, half that at M >= 3 or fp32 x (whose sums or x
// values take the registers; more spill at 128 per thread).
__host__ __device__ constexpr int rows_per_warp(int m, int x_bytes) { return (m <= 2 ? 4 : 2) / (x_bytes == 4 ? 2 : 1); }
// CTAs per SM the register budget is set for: two (128 registers a thread); one for fp32 x at M >= 2,
// whose values spill within 128.
__host__ __device__ constexpr int min_ctas_per_sm(int m, int x_bytes) { return x_bytes == 4 && m >= 2 ? 1 : 2; }

// Look-up table geometry per bit width: an entry holds kValues fp32 values; entries of consecutive
// indices are kStride bytes apart, with kCopies copies side by side (lane % kCopies reads its own).
template <int kBits>
struct Lut {
  static_assert(kBits == 2 || kBits == 3 || kBits == 4, "4-, 3- or 2-bit codes");
  static constexpr int kValues = kBits == 2 ? 4 : 2;
  static constexpr int kEntries = kBits == 3 ? 64 : 256;
  static constexpr int kEntryBytes = 4 * kValues;
  static constexpr int kStride = 128;  // one shared-memory phase: 32 banks x 4 bytes
  static constexpr int kCopies = kStride / kEntryBytes;
  static constexpr int kBytes = kEntries * kStride;
  static constexpr int kWords = kChunk * kBits / 32;  // packed 32-bit words per chunk
};

// The value code q stands for before scaling: the code book's, or q itself for affine formats.
__host__ __device__ __forceinline__ float level(const float* code, bool affine, int q) {
  return affine ? static_cast<float>(q) : code[q];
}

// Values of table entry e, in the order of the values in the packed codes (qft/formats/packing.py).
template <int kBits>
__host__ __device__ __forceinline__ void entry_values(int e, const float* code, bool affine, float* v) {
  if constexpr (kBits == 4) {  // a byte: the first value in the high nibble
    v[0] = level(code, affine, e >> 4);
    v[1] = level(code, affine, e & 15);
  } else if constexpr (kBits == 2) {  // a byte: value i at bits 2i, 2i + 1
    for (int i = 0; i < 4; ++i) v[i] = level(code, affine, (e >> (2 * i)) & 3);
  } else {  // bits 0-3: low bits of both values (2 each); bits 4-5: their high bits
    v[0] = level(code, affine, (e & 3) | (((e >> 4) & 1) << 2));
    v[1] = level(code, affine, ((e >> 2) & 3) | (((e >> 5) & 1) << 2));
  }
}

// Writes slot `slot` (0 .. kEntries * kCopies) of the table: entry slot / kCopies, copy slot % kCopies.
template <int kBits>
__host__ __device__ __forceinline__ void fill_slot(unsigned char* lut, int slot, const float* code, bool affine) {
  using L = Lut<kBits>;
  float v[L::kValues];
  entry_values<kBits>(slot / L::kCopies, code, affine, v);
  float* dst = reinterpret_cast<float*>(lut + (slot / L::kCopies) * L::kStride + (slot % L::kCopies) * L::kEntryBytes);
  for (int i = 0; i < L::kValues; ++i) dst[i] = v[i];
}

// `word` moved so that its bit `from` lands at bit `to` (both compile-time once loops unroll).
__host__ __device__ __forceinline__ uint32_t shifted(uint32_t word, int from, int to) {
  return from >= to ? word >> (from - to) : word << (to - from);
}

// Table byte offset of look-up s of value group t (values 8t .. 8t + 7 of the chunk), plus the lane's
// copy `copy_offset` (< 128, so OR adds it).
template <int kBits>
__host__ __device__ __forceinline__ uint32_t lookup_offset(const uint32_t* words, int t, int s, uint32_t copy_offset) {
  if constexpr (kBits == 4) {  // word t, byte s: values 8t + 2s, + 1
    return (shifted(words[t], 8 * s, 7) & 0x7F80u) | copy_offset;
  } else if constexpr (kBits == 2) {  // word t / 2, byte 2 (t % 2) + s: values 8t + 4s .. + 3
    return (shifted(words[t / 2], 8 * (2 * (t % 2) + s), 7) & 0x7F80u) | copy_offset;
  } else {  // unit t / 4 (three words), pair j = 4 (t % 4) + s: values 8t + 2s, + 1
    const int unit = t / 4, j = 4 * (t % 4) + s;
    const uint32_t low = words[3 * unit + j / 8], high = words[3 * unit + 2];
    return (shifted(low, 4 * (j % 8), 7) & 0x780u) | (shifted(high, 2 * j, 11) & 0x1800u) | copy_offset;
  }
}

// ---- loads ------------------------------------------------------------------------------------------------

// 16 (or 8) bytes from `src` into `dst`; `src` aligned to the width.
template <int kBytes>
__host__ __device__ __forceinline__ void load_bytes(const void* src, uint32_t* dst) {
#ifdef __CUDA_ARCH__
  if constexpr (kBytes == 16) {
    const uint4 v = __ldg(static_cast<const uint4*>(src));
    dst[0] = v.x, dst[1] = v.y, dst[2] = v.z, dst[3] = v.w;
  } else {
    static_assert(kBytes == 8, "8- or 16-byte loads");
    const uint2 v = __ldg(static_cast<const uint2*>(src));
    dst[0] = v.x, dst[1] = v.y;
  }
#else
  std::memcpy(dst, src, kBytes);
#endif
}

// The packed words of the chunk at `src`: 16-byte loads at 4 and 2 bits, 8-byte ones at 3 (a chunk is
// 24 bytes there).
template <int kBits>
__host__ __device__ __forceinline__ void load_chunk(const unsigned char* src, uint32_t* words) {
  constexpr int kWords = Lut<kBits>::kWords, kWidth = kWords % 4 == 0 ? 16 : 8;
#pragma unroll
  for (int i = 0; i < kWords; i += kWidth / 4) load_bytes<kWidth>(src + 4 * i, words + i);
}

// Read-only loads of a scalar (the non-coherent cache on the GPU).
template <typename T>
__host__ __device__ __forceinline__ T read_only(const T* p) {
#ifdef __CUDA_ARCH__
  return __ldg(p);
#else
  return *p;
#endif
}

__host__ __device__ __forceinline__ float bf16_bits_to_float(uint32_t bits_in_high_half) {
  float f;
#ifdef __CUDA_ARCH__
  f = __uint_as_float(bits_in_high_half);
#else
  std::memcpy(&f, &bits_in_high_half, 4);
#endif
  return f;
}

// Eight consecutive x values (16-byte aligned) as fp32.
__host__ __device__ __forceinline__ void load_x8(const float* p, float* v) {
  uint32_t raw[8];
  load_bytes<16>(p, raw);
  load_bytes<16>(p + 4, raw + 4);
  for (int i = 0; i < 8; ++i) v[i] = bf16_bits_to_float(raw[i]);  // the bits of an fp32 are the fp32
}
__host__ __device__ __forceinline__ void load_x8(const __nv_bfloat16* p, float* v) {
  uint32_t raw[4];
  load_bytes<16>(p, raw);
  for (int i = 0; i < 4; ++i) {  // a bf16 is the high half of the fp32 with the same value
    v[2 * i] = bf16_bits_to_float(raw[i] << 16);
    v[2 * i + 1] = bf16_bits_to_float(raw[i] & 0xFFFF0000u);
  }
}
__host__ __device__ __forceinline__ void load_x8(const __half* p, float* v) {
  uint32_t raw[4];
  load_bytes<16>(p, raw);
  for (int i = 0; i < 4; ++i) {
    __half2 h;
    std::memcpy(&h, &raw[i], 4);
    const float2 f = __half22float2(h);
    v[2 * i] = f.x;
    v[2 * i + 1] = f.y;
  }
}

__host__ __device__ __forceinline__ float to_fp32(float v) { return v; }
__host__ __device__ __forceinline__ float to_fp32(__half v) { return __half2float(v); }
__host__ __device__ __forceinline__ float to_fp32(__nv_bfloat16 v) { return __bfloat162float(v); }
__host__ __device__ __forceinline__ void store_rounded(float* p, float v) { *p = v; }
__host__ __device__ __forceinline__ void store_rounded(__half* p, float v) { *p = __float2half_rn(v); }
__host__ __device__ __forceinline__ void store_rounded(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// ---- the problem ------------------------------------------------------------------------------------------

// One launch's arguments, as the kernel and the emulation both read them.
template <typename T>
struct Args {
  const T* x;  // [rows, k_in], 16-byte aligned
  QuantWeight w;
  const T* bias;
  const float* lora_xa;  // [rows, rank]
  const float* lora_b;   // [n_out, rank]
  float scaling;
  int rank;
  T* y;              // [rows, n_out]
  float* workspace;  // [splits, rows, n_out] partial sums when splits > 1
  int rows;
  int64_t n_out, k_in;
  int splits;
  int block_shift;   // log2(block_size); k_in % block_size == 0
  int nested_shift;  // log2(nested_block_size) when nested
};

// The chunks [first, last) of a row that split `split` covers.
template <typename T>
__host__ __device__ __forceinline__ void split_range(const Args<T>& a, int split, int64_t& first, int64_t& last) {
  const int64_t chunks = a.k_in / kChunk, per_split = (chunks + a.splits - 1) / a.splits;
  first = split * per_split;
  last = first + per_split < chunks ? first + per_split : chunks;
}

// One fp32 rounding per product or sum (nvcc would otherwise contract a * b + c into one fma).
__host__ __device__ __forceinline__ float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
__host__ __device__ __forceinline__ float add_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

// The block's fp32 scale: stored, or its 8-bit code's dynamic-map value times its nested scale plus the
// offset, rounded after each step as qft.formats.double_quant.
__host__ __device__ __forceinline__ float chunk_scale(const QuantWeight& w, int64_t block, int nested_shift) {
  if (w.nested_scales == nullptr) return read_only(static_cast<const float*>(w.scales) + block);
  const uint8_t q = read_only(static_cast<const uint8_t*>(w.scales) + block);
  const float scaled = mul_rn(read_only(w.dynamic_map + q), read_only(w.nested_scales + (block >> nested_shift)));
  return add_rn(scaled, read_only(w.offset));
}

// Lane `lane`'s partial sums acc[r][m] for weight rows n0 + r (rows past n_out repeat the last; the
// caller does not store them) over split `split`'s chunks lane, lane + 32, ...; split 0 adds the LoRA
// term for ranks lane, lane + 32, .... `lut` is the filled table (Lut<kBits>::kBytes).
template <typename T, int kBits, bool kZeros, int kRows>
__host__ __device__ __forceinline__ void lane_sums(const Args<T>& a, const unsigned char* lut, int64_t n0, int split,
                                                   int lane, float (&acc)[rows_per_warp(kRows, sizeof(T))][kRows]) {
  constexpr int kRowsPerWarp = rows_per_warp(kRows, sizeof(T));
  using L = Lut<kBits>;
  int64_t first, last;
  split_range(a, split, first, last);
  // Pointers advance by one warp step per iteration (cheaper than recomputing 64-bit addresses).
  constexpr int kChunkBytes = 4 * L::kWords;
  const unsigned char* codes[kRowsPerWarp];
  int64_t first_block[kRowsPerWarp];
  const int64_t row_bytes = a.k_in / 32 * (4 * kBits), blocks_per_row = a.k_in >> a.block_shift;
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int64_t n = n0 + r < a.n_out ? n0 + r : a.n_out - 1;
    codes[r] = static_cast<const unsigned char*>(a.w.codes) + n * row_bytes + (first + lane) * kChunkBytes;
    first_block[r] = n * blocks_per_row;
#pragma unroll
    for (int m = 0; m < kRows; ++m) acc[r][m] = 0.0f;
  }
  const T* x = a.x + (first + lane) * kChunk;
  const uint32_t copy_offset = (lane % L::kCopies) * L::kEntryBytes;
  for (int c = static_cast<int>(first) + lane; c < last; c += 32, x += 32 * kChunk) {
    uint32_t words[kRowsPerWarp][L::kWords];
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      load_chunk<kBits>(codes[r], words[r]);
      codes[r] += 32 * kChunkBytes;
    }
    float dot[kRowsPerWarp][kRows] = {}, xsum[kRows] = {};
#pragma unroll
    for (int t = 0; t < kChunk / 8; ++t) {
      float xv[kRows][8];
#pragma unroll
      for (int m = 0; m < kRows; ++m) {
        load_x8(x + m * a.k_in + 8 * t, xv[m]);
        if constexpr (kZeros) {
#pragma unroll
          for (int i = 0; i < 8; ++i) xsum[m] = add_rn(xsum[m], xv[m][i]);
        }
      }
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
#pragma unroll
        for (int s = 0; s < 8 / L::kValues; ++s) {
          const float* v = reinterpret_cast<const float*>(lut + lookup_offset<kBits>(words[r], t, s, copy_offset));
          float values[L::kValues];
          if constexpr (L::kValues == 4) {
            const float4 e = *reinterpret_cast<const float4*>(v);
            values[0] = e.x, values[1] = e.y, values[2] = e.z, values[3] = e.w;
          } else {
            const float2 e = *reinterpret_cast<const float2*>(v);
            values[0] = e.x, values[1] = e.y;
          }
#pragma unroll
          for (int i = 0; i < L::kValues; ++i) {
#pragma unroll
            for (int m = 0; m < kRows; ++m) dot[r][m] = fmaf(values[i], xv[m][L::kValues * s + i], dot[r][m]);
          }
        }
      }
    }
    const int block_in_row = (c * kChunk) >> a.block_shift;
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int64_t block = first_block[r] + block_in_row;
      const float scale = chunk_scale(a.w, block, a.nested_shift);
      float zero = 0.0f;
      if constexpr (kZeros) zero = to_fp32(read_only(static_cast<const __half*>(a.w.zeros) + block));
#pragma unroll
      for (int m = 0; m < kRows; ++m) {
        const float centred = kZeros ? fmaf(-zero, xsum[m], dot[r][m]) : dot[r][m];
        acc[r][m] = fmaf(scale, centred, acc[r][m]);
      }
    }
  }
  if (split != 0 || a.lora_xa == nullptr) return;
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int64_t n = n0 + r < a.n_out ? n0 + r : a.n_out - 1;
    for (int k = lane; k < a.rank; k += 32) {
      const float b = mul_rn(a.scaling, a.lora_b[n * a.rank + k]);
#pragma unroll
      for (int m = 0; m < kRows; ++m) acc[r][m] = fmaf(a.lora_xa[m * a.rank + k], b, acc[r][m]);
    }
  }
}

// Where a warp's reduced sum for (row n, x row m) goes: y (+ bias, rounded) with one split, else the
// split's fp32 partial, which `finish` adds up.
template <typename T>
__host__ __device__ __forceinline__ void store_sum(const Args<T>& a, int split, int64_t n, int m, float sum) {
  if (a.splits == 1) {
    store_rounded(a.y + m * a.n_out + n, a.bias != nullptr ? add_rn(sum, to_fp32(a.bias[n])) : sum);
  } else {
    a.workspace[(split * a.rows + m) * a.n_out + n] = sum;
  }
}

// y[m, n] from the splits' partials, in split order, plus bias.
template <typename T>
__host__ __device__ __forceinline__ void finish(const Args<T>& a, int64_t n, int m) {
  float sum = 0.0f;
  for (int s = 0; s < a.splits; ++s) sum = add_rn(sum, a.workspace[(s * a.rows + m) * a.n_out + n]);
  store_rounded(a.y + m * a.n_out + n, a.bias != nullptr ? add_rn(sum, to_fp32(a.bias[n])) : sum);
}

// ---- host side -------------------------------------------------------------------------------------------

inline int log2_exact(int64_t v) {  // log2 of a power of two, -1 otherwise
  if (v <= 0 || (v & (v - 1)) != 0) return -1;
  int s = 0;
  while ((int64_t{1} << s) < v) ++s;
  return s;
}

// The checks quant_gemv and its emulation make before any work (qft_kernels.h states the contract).
inline bool gemv_args_valid(const QuantWeight& w, int rows, int64_t n_out, int64_t k_in, const float* lora_xa,
                            const float* lora_b, int rank, int splits, const float* workspace) {
  const int64_t chunks = k_in / kChunk;
  const bool split_ok = splits == 1 || (splits > 1 && workspace != nullptr && splits <= (chunks > 0 ? chunks : 1));
  return valid_weight(w) && rows >= 1 && rows <= kMaxGemvRows && n_out > 0 && k_in > 0 && w.numel == n_out * k_in &&
         w.block_size > 0 && split_ok && (lora_xa == nullptr || (lora_b != nullptr && rank > 0));
}

template <typename T>
inline Args<T> make_args(const void* x, const QuantWeight& w, const void* bias, const float* lora_xa,
                         const float* lora_b, float scaling, int rank, void* y, float* workspace, int rows,
                         int64_t n_out, int64_t k_in, int splits) {
  return {static_cast<const T*>(x), w, static_cast<const T*>(bias), lora_xa, lora_b, scaling, rank,
          static_cast<T*>(y), workspace, rows, n_out, k_in, splits, 0, 0};
}

// Whether the chunked kernel takes this problem (blocks inside rows and a multiple of the chunk,
// power-of-two nested blocks, aligned codes and x); fills a's shifts when it does. Other problems take
// the per-value kernel.
template <typename T>
inline bool takes_fast_path(Args<T>& a) {
  const QuantWeight& w = a.w;
  const int block_shift = log2_exact(w.block_size);
  const int nested_shift = w.nested_scales != nullptr ? log2_exact(w.nested_block_size) : 0;
  const bool aligned = reinterpret_cast<uintptr_t>(w.codes) % 16 == 0 && reinterpret_cast<uintptr_t>(a.x) % 16 == 0;
  if (block_shift < 0 || w.block_size % kChunk != 0 || a.k_in % w.block_size != 0 || nested_shift < 0 || !aligned)
    return false;
  a.block_shift = block_shift;
  a.nested_shift = nested_shift;
  return true;
}

// The butterfly sum the kernel's __shfl_xor_sync steps make: after it every lane holds the same
// total, added in this order (the emulation calls it on 32 values; the kernel shuffles).
__host__ __device__ __forceinline__ void butterfly_sum(float* lanes) {
  for (int o = 16; o > 0; o >>= 1) {
    float next[32];
    for (int l = 0; l < 32; ++l) next[l] = add_rn(lanes[l], lanes[l ^ o]);
    for (int l = 0; l < 32; ++l) lanes[l] = next[l];
  }
}

}  // namespace gemv
}  // namespace qft
