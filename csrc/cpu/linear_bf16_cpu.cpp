// qft::cpu::quant_linear_bf16 and quant_linear_grad_input_bf16 (cpu_kernels.h): bf16 products on CPUs
// with AVX512-BF16, in one call from the packed weight to the finished output.
//
// Both run one register block: 16 fp32 accumulators of 16 lanes, where the lanes are 16 rows of the
// activations (x forward, grad backward) and the accumulators 16 outputs. Each step loads one vector of
// activation pairs, transposed so that lane l holds row l's pair, and meets it with 16 broadcast weight
// pairs (vdpbf16ps: both products of a pair exact, summed into the fp32 lane). The weight is decoded a
// tile at a time just before its products (16 rows forward, 64 columns of every row backward), so it is
// read once and never written out whole; threads split the tiles.
#include <algorithm>
#include <cstring>
#include <memory>
#include <vector>

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

constexpr int kLanes = 16;         // activation rows per vector
constexpr int kOuts = 16;          // accumulators: outputs per register block
constexpr int64_t kGradCols = 64;  // backward: columns of W decoded per tile

#ifdef QFT_X86
#define QFT_BF16 QFT_AVX512_BF16

inline uint32_t load32(const void* p) {
  uint32_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// Rows [m0, m0 + 16) of a [rows, rank] fp32 matrix transposed: out[r * 16 + l] (zero past the last row).
void lanes_transposed(const float* a, int64_t rows, int rank, int64_t m0, float* out) {
  std::fill(out, out + int64_t{rank} * kLanes, 0.0f);
  for (int64_t l = 0; l < kLanes && m0 + l < rows; ++l)
    for (int r = 0; r < rank; ++r) out[r * kLanes + l] = a[(m0 + l) * rank + r];
}

// out[o] = sum over j < steps of act[j] (16 lanes of pairs) times weight pair w[j * j_stride + o] (in
// dwords), broadcast to every lane. The accumulators stay in registers (a local array, fully unrolled).
QFT_BF16 inline void dot_block(const uint32_t* act, const uint32_t* w, int64_t j_stride, int64_t steps, __m512* out) {
  __m512 acc[kOuts];
#pragma GCC unroll 16
  for (int o = 0; o < kOuts; ++o) acc[o] = _mm512_setzero_ps();
  for (int64_t j = 0; j < steps; ++j) {
    const __m512bh a = (__m512bh)_mm512_loadu_si512(act + j * kLanes);
    const uint32_t* wj = w + j * j_stride;
#pragma GCC unroll 16
    for (int o = 0; o < kOuts; ++o)
      acc[o] = _mm512_dpbf16_ps(acc[o], a, (__m512bh)_mm512_set1_epi32(static_cast<int>(load32(wj + o))));
  }
#pragma GCC unroll 16
  for (int o = 0; o < kOuts; ++o) out[o] = acc[o];
}

// The 16 x 16 dwords of r transposed in place (r[i] lane j <-> r[j] lane i).
QFT_BF16 inline void transpose16(__m512i* r) {
  __m512i t[16], u[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // u[i + c]: column c of each 128-bit lane, rows i..i+3
    u[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    u[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    u[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    u[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int h = 0; h < 16; h += 8)
    for (int c = 0; c < 4; ++c) {
      t[h + c] = _mm512_shuffle_i32x4(u[h + c], u[h + 4 + c], 0x88);
      t[h + 4 + c] = _mm512_shuffle_i32x4(u[h + c], u[h + 4 + c], 0xDD);
    }
  for (int c = 0; c < 8; ++c) {
    r[c] = _mm512_shuffle_i32x4(t[c], t[8 + c], 0x88);
    r[c + 8] = _mm512_shuffle_i32x4(t[c], t[8 + c], 0xDD);
  }
}

// Rows [m0, m0 + 16) of a [rows, width] bf16 matrix as transposed pairs: out[j * 16 + l] holds values
// 2j and 2j + 1 of row m0 + l (zero past the last row or column). A full block goes 16 x 16 pairs at a
// time through transpose16; a partial one, and the pairs past the last multiple of 16, one at a time.
QFT_BF16 void pairs_transposed(const uint16_t* a, int64_t rows, int64_t width, int64_t m0, uint32_t* out) {
  const int64_t pairs = (width + 1) / 2, whole = m0 + kLanes <= rows ? width / 32 * 16 : 0;
  for (int64_t j0 = 0; j0 < whole; j0 += 16) {
    __m512i r[16];
    for (int l = 0; l < 16; ++l) r[l] = _mm512_loadu_si512(a + (m0 + l) * width + 2 * j0);
    transpose16(r);
    for (int i = 0; i < 16; ++i) _mm512_storeu_si512(out + (j0 + i) * kLanes, r[i]);
  }
  std::memset(out + whole * kLanes, 0, sizeof(uint32_t) * (pairs - whole) * kLanes);
  for (int64_t l = 0; l < kLanes && m0 + l < rows; ++l) {
    const uint16_t* row = a + (m0 + l) * width;
    for (int64_t j = whole; j < width / 2; ++j) out[j * kLanes + l] = load32(row + 2 * j);
    if (width % 2) out[(pairs - 1) * kLanes + l] = row[width - 1];
  }
}

// out[o] lanes l (row m0 + l, output o) into rows of the bf16 [rows, width] matrix at column c0: the block
// transposed, then per row one store of `outs` values.
QFT_BF16 inline void store_block(__m512* out, int64_t rows, int64_t m0, int64_t width, int64_t c0, int64_t outs,
                                 uint16_t* dst) {
  __m512i r[16];
  for (int o = 0; o < 16; ++o) r[o] = _mm512_castps_si512(out[o]);
  transpose16(r);
  const __mmask16 keep = static_cast<__mmask16>((1u << outs) - 1u);
  for (int64_t l = 0; l < kLanes && m0 + l < rows; ++l)
    _mm256_mask_storeu_epi16(dst + (m0 + l) * width + c0, keep, bf16_of(_mm512_castsi512_ps(r[l])));
}

struct Forward {
  const Weight& w;
  const uint16_t* x;
  int64_t rows, n, k;
  const void* bias;
  DType bias_dtype;
  const float* lora_b;
  int rank;
  float scaling;
  uint16_t* y;
  const uint32_t* xt;   // [blocks][k / 2][16]: pairs_transposed of x
  const float* xat;     // [blocks][rank][16]: lanes_transposed of lora_xa
};

// Rows [n0, n0 + outs) of W decoded, as bf16 pairs transposed: out[j * 16 + o] holds values 2j and 2j + 1
// of row n0 + o (zero past the last row), so one step's 16 broadcasts are adjacent.
QFT_BF16 void row_pairs(const Forward& p, int64_t n0, int64_t outs, uint32_t* rows, uint32_t* out) {
  const int64_t pairs = p.k / 2;
  decode_span_bf16(p.w, n0 * p.k, outs * p.k, reinterpret_cast<uint16_t*>(rows));
  std::fill(rows + outs * pairs, rows + kOuts * pairs, 0u);
  for (int64_t j0 = 0; j0 < pairs; j0 += 16) {  // pairs is a multiple of 16 (k of 32)
    __m512i r[16];
    for (int o = 0; o < 16; ++o) r[o] = _mm512_loadu_si512(rows + o * pairs + j0);
    transpose16(r);
    for (int i = 0; i < 16; ++i) _mm512_storeu_si512(out + (j0 + i) * kOuts, r[i]);
  }
}

QFT_BF16 void forward_tiles(const Forward& p, int64_t first, int64_t last) {
  const int64_t pairs = p.k / 2, blocks = (p.rows + kLanes - 1) / kLanes;
  std::vector<uint32_t> rows(static_cast<size_t>(kOuts) * pairs), tile(rows.size());
  for (int64_t t = first; t < last; ++t) {
    const int64_t n0 = t * kOuts, outs = std::min<int64_t>(kOuts, p.n - n0);
    row_pairs(p, n0, outs, rows.data(), tile.data());
    for (int64_t b = 0; b < blocks; ++b) {
      __m512 acc[kOuts];
      dot_block(p.xt + b * pairs * kLanes, tile.data(), kOuts, pairs, acc);
      // The reference's epilogue: (acc + bias) + scaling * (xa B^T), per output over the 16 rows.
      for (int64_t o = 0; o < outs; ++o) {
        if (p.bias != nullptr) acc[o] = _mm512_add_ps(acc[o], _mm512_set1_ps(load_float(p.bias, p.bias_dtype, n0 + o)));
        if (p.lora_b == nullptr) continue;
        __m512 lora = _mm512_setzero_ps();
        for (int r = 0; r < p.rank; ++r)
          lora = _mm512_add_ps(lora, _mm512_mul_ps(_mm512_loadu_ps(p.xat + (b * p.rank + r) * kLanes),
                                                   _mm512_set1_ps(p.lora_b[(n0 + o) * p.rank + r])));
        acc[o] = _mm512_add_ps(acc[o], _mm512_mul_ps(_mm512_set1_ps(p.scaling), lora));
      }
      store_block(acc, p.rows, b * kLanes, p.n, n0, outs, p.y);
    }
  }
}

struct Backward {
  const Weight& w;
  int64_t rows, n, k;
  const float* lora_a;
  int rank;
  uint16_t* grad_x;
  const uint32_t* gt;    // [blocks][(n + 1) / 2][16]: pairs_transposed of grad
  const float* gxat;     // [blocks][rank][16]: lanes_transposed of lora_grad_xa
};

// Columns [c0, c0 + width) of rows 2j and 2j + 1 interleaved: out[j * kGradCols + i] = (w[2j][c0 + i],
// w[2j + 1][c0 + i]) as a bf16 pair (the second zero past the last row).
QFT_BF16 void column_pairs(const Backward& p, int64_t c0, int64_t width, uint32_t* out) {
  alignas(64) uint16_t two[2 * kGradCols] = {};
  for (int64_t j = 0; j < (p.n + 1) / 2; ++j) {
    decode_span_bf16(p.w, 2 * j * p.k + c0, width, two);
    if (2 * j + 1 < p.n)
      decode_span_bf16(p.w, (2 * j + 1) * p.k + c0, width, two + kGradCols);
    else
      std::fill(two + kGradCols, two + 2 * kGradCols, uint16_t{0});
    for (int64_t i = 0; i < width; i += 16) {
      const auto* even = reinterpret_cast<const __m256i*>(two + i);
      const auto* odd = reinterpret_cast<const __m256i*>(two + kGradCols + i);
      const __m512i hi = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_load_si256(odd)), 16);
      _mm512_storeu_si512(out + j * kGradCols + i, _mm512_or_si512(_mm512_cvtepu16_epi32(_mm256_load_si256(even)), hi));
    }
  }
}

QFT_BF16 void backward_tiles(const Backward& p, int64_t first, int64_t last) {
  const int64_t pairs = (p.n + 1) / 2, blocks = (p.rows + kLanes - 1) / kLanes;
  std::vector<uint32_t> tile(static_cast<size_t>(pairs) * kGradCols);
  for (int64_t t = first; t < last; ++t) {
    const int64_t c0 = t * kGradCols, width = std::min<int64_t>(kGradCols, p.k - c0);
    column_pairs(p, c0, width, tile.data());
    for (int64_t b = 0; b < blocks; ++b)
      for (int64_t g = 0; g < width; g += kOuts) {
        __m512 acc[kOuts];
        dot_block(p.gt + b * pairs * kLanes, tile.data() + g, kGradCols, pairs, acc);
        // The reference's epilogue: acc + lora_grad_xa A, per column over the 16 rows.
        if (p.lora_a != nullptr)
          for (int o = 0; o < kOuts; ++o) {
            __m512 lora = _mm512_setzero_ps();
            for (int r = 0; r < p.rank; ++r)
              lora = _mm512_add_ps(lora, _mm512_mul_ps(_mm512_loadu_ps(p.gxat + (b * p.rank + r) * kLanes),
                                                       _mm512_set1_ps(p.lora_a[r * p.k + c0 + g + o])));
            acc[o] = _mm512_add_ps(acc[o], lora);
          }
        store_block(acc, p.rows, b * kLanes, p.k, c0 + g, kOuts, p.grad_x);
      }
  }
}

// The activations as dot_block reads them: per 16-row block its transposed pairs ([blocks][pairs][16]) and
// the transposed rows of its LoRA operand ([blocks][rank][16]; empty without one).
struct Packed {
  std::unique_ptr<uint32_t[]> pairs;  // uninitialized when allocated: pack writes every value
  std::unique_ptr<float[]> lora;
};

QFT_BF16 Packed pack(const uint16_t* a, int64_t rows, int64_t width, const float* lora, int rank) {
  const int64_t blocks = (rows + kLanes - 1) / kLanes, pairs = (width + 1) / 2;
  Packed out{std::unique_ptr<uint32_t[]>(new uint32_t[blocks * pairs * kLanes]),
             std::unique_ptr<float[]>(lora != nullptr ? new float[blocks * rank * kLanes] : nullptr)};
  parallel_for(blocks, rows * width * 4, [&](int64_t first, int64_t last) {
    for (int64_t b = first; b < last; ++b) {
      pairs_transposed(a, rows, width, b * kLanes, out.pairs.get() + b * pairs * kLanes);
      if (lora != nullptr) lanes_transposed(lora, rows, rank, b * kLanes, out.lora.get() + b * rank * kLanes);
    }
  });
  return out;
}

#endif

bool shapes_ok(const Weight& w, int64_t rows, int64_t n, int64_t k, bool lora, int rank) {
  return active_isa() >= Isa::kAvx512Bf16 && rows > 0 && n > 0 && k > 0 && k % 32 == 0 && w.numel == n * k &&
         w.block_size >= 32 && w.block_size % 32 == 0 && weight_parts_ok(w) && (!lora || rank > 0);
}

// About the bytes a call touches and the products it makes, in parallel_for's units (16 rows of a
// 512 x 512 weight already split: 100 -> 67-90 us on two threads).
int64_t work_of(int64_t rows, int64_t n, int64_t k) { return n * k * (1 + (rows + kLanes - 1) / kLanes) * 4; }

}  // namespace

int quant_linear_bf16(const Weight& w, const uint16_t* x, int64_t rows, int64_t n_out, int64_t k_in,
                      const void* bias, DType bias_dtype, const float* lora_xa, const float* lora_b, int rank,
                      float scaling, uint16_t* y) {
  if (!shapes_ok(w, rows, n_out, k_in, lora_xa != nullptr, rank) || x == nullptr || y == nullptr ||
      (lora_xa == nullptr) != (lora_b == nullptr))
    return kInvalidValue;
#ifdef QFT_X86
  const Packed xp = pack(x, rows, k_in, lora_xa, rank);
  const Forward p{w, x, rows, n_out, k_in, bias, bias_dtype, lora_b, lora_xa != nullptr ? rank : 0, scaling, y,
                  xp.pairs.get(), xp.lora.get()};
  parallel_for((n_out + kOuts - 1) / kOuts, work_of(rows, n_out, k_in),
               [&](int64_t first, int64_t last) { forward_tiles(p, first, last); });
  return kOk;
#else
  return kInvalidValue;
#endif
}

int quant_linear_grad_input_bf16(const Weight& w, const uint16_t* grad, int64_t rows, int64_t n_out, int64_t k_in,
                                 const float* lora_grad_xa, const float* lora_a, int rank, uint16_t* grad_x) {
  if (!shapes_ok(w, rows, n_out, k_in, lora_grad_xa != nullptr, rank) || grad == nullptr || grad_x == nullptr ||
      (lora_grad_xa == nullptr) != (lora_a == nullptr))
    return kInvalidValue;
#ifdef QFT_X86
  const Packed gp = pack(grad, rows, n_out, lora_grad_xa, rank);
  const int lora_rank = lora_grad_xa != nullptr ? rank : 0;
  const Backward p{w, rows, n_out, k_in, lora_a, lora_rank, grad_x, gp.pairs.get(), gp.lora.get()};
  parallel_for((k_in + kGradCols - 1) / kGradCols, work_of(rows, n_out, k_in),
               [&](int64_t first, int64_t last) { backward_tiles(p, first, last); });
  return kOk;
#else
  return kInvalidValue;
#endif
}

}  // namespace qft::cpu
