// qft::cpu::dequantize: every format, block by block. Each block's 2**bits levels are decoded once
// into a table of finished output elements ((level - zero) * scale in fp32, rounded to round_dtype,
// widened to out_dtype), so decoding a value is one table lookup. 4-bit codes take an AVX2 loop of
// byte shuffles (32 values per step) where the CPU has it; everything else a scalar loop.
#include <cstring>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "avx512.h"
#include "convert.h"
#include "cpu_kernels.h"
#include "decode.h"
#include "parallel.h"
#include "weight.h"

#if defined(__x86_64__)
#include <immintrin.h>
#define QFT_X86 1
#endif

namespace qft::cpu {
namespace {

// The block's levels in fp32: (level - zero) * scale, two roundings (zero 0 without zeros: exact).
void level_values(const Weight& w, int64_t block, float* values) {
  const float scale = block_scale(w, block), zero = block_zero(w, block);
  const int levels = 1 << w.bits;
  for (int i = 0; i < levels; ++i) {
    const float level = w.affine ? static_cast<float>(i) : w.code[i];
    values[i] = (level - zero) * scale;
  }
}

// T: uint16_t (16-bit output: bits of round_dtype) or float (fp32 output, rounded through round_dtype).
template <typename T>
void block_table(const Weight& w, int64_t block, DType round_dtype, T* table) {
  float values[16];
  level_values(w, block, values);
  for (int i = 0; i < (1 << w.bits); ++i) {
    if constexpr (sizeof(T) == 2)
      table[i] = round_dtype == DType::kFloat16 ? fp16_bits(values[i]) : bf16_bits(values[i]);
    else
      table[i] = rounded_through(values[i], round_dtype);
  }
}

// Values [start, start + count) of the weight (start a multiple of 32) by table lookup.
template <typename T>
void decode_scalar(const Weight& w, int64_t start, int64_t count, const T* table, T* out) {
  if (w.bits == 4) {
    const uint8_t* bytes = static_cast<const uint8_t*>(w.codes) + start / 2;
    const int64_t pairs = count / 2;
    for (int64_t j = 0; j < pairs; ++j) {
      out[2 * j] = table[bytes[j] >> 4];  // value 2j: the high nibble
      out[2 * j + 1] = table[bytes[j] & 0xF];
    }
    if (count % 2) out[count - 1] = table[bytes[pairs] >> 4];
  } else if (w.bits == 2) {
    const uint32_t* words = static_cast<const uint32_t*>(w.codes) + start / 16;
    for (int64_t i = 0; i < count; ++i) out[i] = table[(words[i / 16] >> (2 * (i % 16))) & 3u];
  } else {  // 3-bit planar units of 32 values in three words
    const uint32_t* words = static_cast<const uint32_t*>(w.codes) + 3 * (start / 32);
    for (int64_t i = 0; i < count; ++i) {
      const uint32_t* unit = words + 3 * (i / 32);
      const int k = static_cast<int>(i % 32);
      const uint32_t low = (unit[k / 16] >> (2 * (k % 16))) & 3u, high = (unit[2] >> k) & 1u;
      out[i] = table[low | (high << 2)];
    }
  }
}

#ifdef QFT_X86
#define QFT_AVX2 __attribute__((target("avx2,f16c")))

// 32 codes (16 bytes) as 32 byte indices in value order: value 2j is byte j's high nibble.
QFT_AVX2 inline __m256i nibbles32(const uint8_t* bytes) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes));
  const __m128i low_mask = _mm_set1_epi8(0x0F);
  const __m128i high = _mm_and_si128(_mm_srli_epi16(b, 4), low_mask), low = _mm_and_si128(b, low_mask);
  return _mm256_set_m128i(_mm_unpackhi_epi8(high, low), _mm_unpacklo_epi8(high, low));
}

// bf16 bits of 8 floats in the low halves of 32-bit lanes (bf16_bits, vectorized).
QFT_AVX2 inline __m256i bf16_lanes(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb), 16);
  const __m256i magnitude = _mm256_and_si256(u, _mm256_set1_epi32(0x7FFFFFFF));
  const __m256i nan = _mm256_cmpgt_epi32(magnitude, _mm256_set1_epi32(0x7F800000));
  return _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), nan);
}

// A 4-bit block's 16 values: (level - zero) * scale in fp32, as level_values computes them.
struct Table16 {
  __m256 first, second;  // entries 0-7, 8-15
};

QFT_AVX2 inline Table16 table16(const Weight& w, int64_t block) {
  const __m256 scale = _mm256_set1_ps(block_scale(w, block)), zero = _mm256_set1_ps(block_zero(w, block));
  __m256 first, second;
  if (w.affine) {
    first = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
    second = _mm256_setr_ps(8, 9, 10, 11, 12, 13, 14, 15);
  } else {
    first = _mm256_loadu_ps(w.code), second = _mm256_loadu_ps(w.code + 8);
  }
  return {_mm256_mul_ps(_mm256_sub_ps(first, zero), scale), _mm256_mul_ps(_mm256_sub_ps(second, zero), scale)};
}

// The 16 entries as 16-bit values of round_dtype, entry i in lane i / 8, position i % 8.
QFT_AVX2 inline __m256i entries16(const Table16& t, DType round_dtype) {
  if (round_dtype == DType::kFloat16)
    return _mm256_set_m128i(_mm256_cvtps_ph(t.second, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC),
                            _mm256_cvtps_ph(t.first, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  // packus interleaves lanes ([a0-3 b0-3 | a4-7 b4-7]); the permute restores entry order.
  return _mm256_permute4x64_epi64(_mm256_packus_epi32(bf16_lanes(t.first), bf16_lanes(t.second)), 0xD8);
}

// 16-bit outputs: the entries split into a low-byte and a high-byte plane (each in both lanes), then
// every 32 codes are two byte shuffles.
QFT_AVX2 void decode4_avx2(const Weight& w, int64_t block, int64_t count, DType round_dtype, uint16_t* out) {
  const uint8_t* bytes = static_cast<const uint8_t*>(w.codes) + block * w.block_size / 2;
  const __m256i entries = entries16(table16(w, block), round_dtype);
  const __m256i split = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,  //
                                         0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  // Per lane [low bytes | high bytes]; as 64-bit pieces [lo 0-7, hi 0-7, lo 8-15, hi 8-15] -> [lo, lo, hi, hi].
  const __m256i planes = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(entries, split), 0xD8);
  const __m256i lo_plane = _mm256_permute2x128_si256(planes, planes, 0x00);
  const __m256i hi_plane = _mm256_permute2x128_si256(planes, planes, 0x11);
  int64_t i = 0;
  for (; i + 32 <= count; i += 32) {
    const __m256i idx = nibbles32(bytes + i / 2);
    const __m256i l = _mm256_shuffle_epi8(lo_plane, idx), h = _mm256_shuffle_epi8(hi_plane, idx);
    // unpack works per 128-bit lane: lane 0 holds values 0-15, lane 1 values 16-31.
    const __m256i a = _mm256_unpacklo_epi8(l, h), b = _mm256_unpackhi_epi8(l, h);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), _mm256_permute2x128_si256(a, b, 0x20));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i + 16), _mm256_permute2x128_si256(a, b, 0x31));
  }
  if (i < count) {
    alignas(32) uint16_t table[16];
    _mm256_store_si256(reinterpret_cast<__m256i*>(table), entries);
    Weight tail{};
    tail.codes = bytes + i / 2;
    tail.bits = 4;
    decode_scalar(tail, 0, count - i, table, out + i);
  }
}

// fp32 outputs: the two 8-entry halves permuted by the low three bits, picked by the fourth.
QFT_AVX2 void decode4_avx2(const Weight& w, int64_t block, int64_t count, DType round_dtype, float* out) {
  const uint8_t* bytes = static_cast<const uint8_t*>(w.codes) + block * w.block_size / 2;
  Table16 t = table16(w, block);
  if (round_dtype == DType::kBFloat16) {
    t.first = _mm256_castsi256_ps(_mm256_slli_epi32(bf16_lanes(t.first), 16));
    t.second = _mm256_castsi256_ps(_mm256_slli_epi32(bf16_lanes(t.second), 16));
  } else if (round_dtype == DType::kFloat16) {
    t.first = _mm256_cvtph_ps(_mm256_cvtps_ph(t.first, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    t.second = _mm256_cvtph_ps(_mm256_cvtps_ph(t.second, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  int64_t i = 0;
  for (; i + 32 <= count; i += 32) {
    const __m256i idx = nibbles32(bytes + i / 2);
    const __m128i halves[2] = {_mm256_castsi256_si128(idx), _mm256_extracti128_si256(idx, 1)};
    for (int k = 0; k < 4; ++k) {
      const __m128i eight = k % 2 ? _mm_srli_si128(halves[k / 2], 8) : halves[k / 2];
      const __m256i q = _mm256_cvtepu8_epi32(eight);
      const __m256 pick = _mm256_castsi256_ps(_mm256_slli_epi32(q, 28));  // bit 3 -> sign bit
      const __m256 v =
          _mm256_blendv_ps(_mm256_permutevar8x32_ps(t.first, q), _mm256_permutevar8x32_ps(t.second, q), pick);
      _mm256_storeu_ps(out + i + 8 * k, v);
    }
  }
  if (i < count) {
    alignas(32) float table[16];
    _mm256_store_ps(table, t.first);
    _mm256_store_ps(table + 8, t.second);
    Weight tail{};
    tail.codes = bytes + i / 2;
    tail.bits = 4;
    decode_scalar(tail, 0, count - i, table, out + i);
  }
}

// AVX-512: a 4-bit block's 16 values in one register, every 32 codes word indices for one permute
// (16-bit outputs: vpermw over the 16 rounded entries) or two (fp32 outputs: vpermps). Values [start, start
// + count) of block `block` (start even); a tail short of 32 values by the scalar table lookup.
template <typename T>
QFT_AVX512_BF16 void decode4_avx512(const Weight& w, int64_t block, int64_t start, int64_t count, DType round_dtype,
                                    T* out) {
  const __m512 levels = w.affine ? _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)
                                 : _mm512_loadu_ps(w.code);
  const __m512 values = _mm512_mul_ps(_mm512_sub_ps(levels, _mm512_set1_ps(block_zero(w, block))),
                                      _mm512_set1_ps(block_scale(w, block)));  // as level_values
  const __m256i halves = round_dtype == DType::kFloat16
                             ? _mm512_cvtps_ph(values, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
                             : bf16_of(values);
  __m512 wide = values;  // fp32 entries, rounded through round_dtype
  if (round_dtype == DType::kBFloat16)
    wide = fp32_of(halves);
  else if (round_dtype == DType::kFloat16)
    wide = _mm512_cvtph_ps(halves);
  const __m512i entries = _mm512_castsi256_si512(halves);
  const uint8_t* bytes = static_cast<const uint8_t*>(w.codes) + start / 2;
  const __m512i low_mask = _mm512_set1_epi32(0x0F);
  int64_t i = 0;
  for (; i + 32 <= count; i += 32) {
    // byte j's high nibble is value 2j (the low word of dword j), its low nibble value 2j + 1
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes + i / 2)));
    const __m512i idx = _mm512_or_si512(_mm512_srli_epi32(b, 4), _mm512_slli_epi32(_mm512_and_si512(b, low_mask), 16));
    if constexpr (sizeof(T) == 2) {
      _mm512_storeu_si512(out + i, _mm512_permutexvar_epi16(idx, entries));
    } else {
      const __m512i first = _mm512_cvtepu16_epi32(_mm512_castsi512_si256(idx));
      const __m512i second = _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(idx, 1));
      _mm512_storeu_ps(out + i, _mm512_permutexvar_ps(first, wide));
      _mm512_storeu_ps(out + i + 16, _mm512_permutexvar_ps(second, wide));
    }
  }
  if (i < count) {
    T table[16];
    block_table(w, block, round_dtype, table);
    decode_scalar(w, start + i, count - i, table, out + i);
  }
}
#endif

template <typename T>
void decode_blocks(const Weight& w, T* out, DType round_dtype, Isa isa, int64_t first, int64_t last) {
  T table[16];
  for (int64_t block = first; block < last; ++block) {
    const int64_t start = block * w.block_size;
    const int64_t count = std::min<int64_t>(w.block_size, w.numel - start);
#ifdef QFT_X86
    if (isa >= Isa::kAvx512Bf16 && w.bits == 4) {
      decode4_avx512(w, block, start, count, round_dtype, out + start);
      continue;
    }
    if (isa >= Isa::kAvx2 && w.bits == 4) {
      decode4_avx2(w, block, count, round_dtype, out + start);
      continue;
    }
#endif
    block_table(w, block, round_dtype, table);
    decode_scalar(w, start, count, table, out + start);
  }
}

bool valid(const Weight& w) {
  return w.numel > 0 && weight_parts_ok(w) && w.block_size >= 32 && w.block_size % 32 == 0;
}

// A fresh output (torch allocates large tensors as new mappings) costs a page fault per 4 KiB on first
// touch, more than the decode itself; asking for huge pages over its 2 MiB-aligned interior (a hint:
// memory already touched is left as it is) makes that 512 times fewer faults where the kernel allows.
void advise_huge_pages(void* out, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  if (bytes < static_cast<int64_t>(4 * kHuge)) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(out) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(out) + static_cast<uintptr_t>(bytes)) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#endif
}

}  // namespace

void decode_span_bf16(const Weight& w, int64_t start, int64_t count, uint16_t* out) {
  const bool wide = active_isa() >= Isa::kAvx512Bf16;
  uint16_t table[16];
  for (int64_t at = start, end = start + count; at < end;) {
    const int64_t block = at / w.block_size;
    const int64_t piece = std::min<int64_t>(end, (block + 1) * w.block_size) - at;
#ifdef QFT_X86
    if (wide && w.bits == 4) {
      decode4_avx512(w, block, at, piece, DType::kBFloat16, out + (at - start));
      at += piece;
      continue;
    }
#endif
    block_table(w, block, DType::kBFloat16, table);
    decode_scalar(w, at, piece, table, out + (at - start));
    at += piece;
  }
}

int dequantize(const Weight& w, void* out, DType out_dtype, DType round_dtype) {
  if (!valid(w) || out == nullptr || (out_dtype != DType::kFloat32 && out_dtype != round_dtype)) return kInvalidValue;
  const Isa isa = active_isa();
  const int64_t blocks = (w.numel + w.block_size - 1) / w.block_size;
  const int64_t bytes = w.numel * (out_dtype == DType::kFloat32 ? 4 : 2);
  advise_huge_pages(out, bytes);
  parallel_for(blocks, bytes, [&](int64_t first, int64_t last) {
    if (out_dtype == DType::kFloat32)
      decode_blocks(w, static_cast<float*>(out), round_dtype, isa, first, last);
    else
      decode_blocks(w, static_cast<uint16_t*>(out), round_dtype, isa, first, last);
  });
  return kOk;
}

}  // namespace qft::cpu
