// quant_gemv's chunked kernel on the CPU (qft_kernels.h): every CTA, warp and lane in turn, calling the
// same gemv_core.cuh functions, then the butterfly sum the shuffles make and the split-K finish.
#include <cuda_runtime.h>

#include <vector>

#include "gemv_core.cuh"

namespace qft {
namespace {

using gemv::Args;

template <typename T, int kBits, bool kZeros, int kRows>
void emulate(const Args<T>& a) {
  using L = gemv::Lut<kBits>;
  constexpr int kRowsPerWarp = gemv::rows_per_warp(kRows, sizeof(T));
  std::vector<unsigned char> lut(L::kBytes);
  for (int slot = 0; slot < L::kEntries * L::kCopies; ++slot) gemv::fill_slot<kBits>(lut.data(), slot, a.w.code, a.w.affine);
  for (int split = 0; split < a.splits; ++split) {
    for (int64_t n0 = 0; n0 < a.n_out; n0 += kRowsPerWarp) {
      float lanes[kRowsPerWarp][kRows][32];
      for (int lane = 0; lane < 32; ++lane) {
        float acc[kRowsPerWarp][kRows];
        gemv::lane_sums<T, kBits, kZeros, kRows>(a, lut.data(), n0, split, lane, acc);
        for (int r = 0; r < kRowsPerWarp; ++r)
          for (int m = 0; m < kRows; ++m) lanes[r][m][lane] = acc[r][m];
      }
      for (int r = 0; r < kRowsPerWarp && n0 + r < a.n_out; ++r) {
        for (int m = 0; m < kRows; ++m) {
          gemv::butterfly_sum(lanes[r][m]);
          gemv::store_sum(a, split, n0 + r, m, lanes[r][m][0]);
        }
      }
    }
  }
  if (a.splits > 1)
    for (int m = 0; m < a.rows; ++m)
      for (int64_t n = 0; n < a.n_out; ++n) gemv::finish(a, n, m);
}

template <typename T, int kBits, bool kZeros>
void emulate_rows(const Args<T>& a) {
  switch (a.rows) {
    case 1: return emulate<T, kBits, kZeros, 1>(a);
    case 2: return emulate<T, kBits, kZeros, 2>(a);
    case 3: return emulate<T, kBits, kZeros, 3>(a);
    default: return emulate<T, kBits, kZeros, 4>(a);
  }
}

template <typename T>
int emulate_any(Args<T> a) {
  if (!gemv::takes_fast_path(a)) return cudaErrorNotSupported;
  const bool zeros = a.w.zeros != nullptr;
  switch (a.w.bits) {
    case 4: zeros ? emulate_rows<T, 4, true>(a) : emulate_rows<T, 4, false>(a); break;
    case 3: zeros ? emulate_rows<T, 3, true>(a) : emulate_rows<T, 3, false>(a); break;
    default: zeros ? emulate_rows<T, 2, true>(a) : emulate_rows<T, 2, false>(a); break;
  }
  return cudaSuccess;
}

}  // namespace

int quant_gemv_emulate(const void* x, DType dtype, const QuantWeight& w, const void* bias, const float* lora_xa,
                       const float* lora_b, float scaling, int rank, void* y, int rows, int64_t n_out,
                       int64_t k_in, int splits, float* workspace) {
  if (!gemv::gemv_args_valid(w, rows, n_out, k_in, lora_xa, lora_b, rank, splits, workspace))
    return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat32:
      return emulate_any(gemv::make_args<float>(x, w, bias, lora_xa, lora_b, scaling, rank, y, workspace, rows, n_out,
                                          k_in, splits));
    case DType::kFloat16:
      return emulate_any(gemv::make_args<__half>(x, w, bias, lora_xa, lora_b, scaling, rank, y, workspace, rows, n_out,
                                           k_in, splits));
    case DType::kBFloat16:
      return emulate_any(gemv::make_args<__nv_bfloat16>(x, w, bias, lora_xa, lora_b, scaling, rank, y, workspace, rows,
                                                  n_out, k_in, splits));
  }
  return cudaErrorInvalidValue;
}

}  // namespace qft
