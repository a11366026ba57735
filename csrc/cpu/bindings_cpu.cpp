// The pybind11 module qft._cpu over cpu_kernels.h. Tensors arrive as addresses (tensor.data_ptr()),
// so no torch header is needed; every kernel runs with the GIL released.
#include <pybind11/pybind11.h>

#include <atomic>
#include <stdexcept>
#include <string>
#include <tuple>

#include "cpu_kernels.h"
#include "parallel.h"

namespace py = pybind11;
using namespace qft::cpu;

namespace {

void check(int error) {
  if (error != kOk) throw std::invalid_argument("qft CPU kernel refused its arguments");
}

template <typename T>
T* ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

// A weight as Python passes it: (codes, scales, zeros, nested_scales, offset, code, dynamic_map, bits,
// affine, numel, block_size, nested_block_size), the fields of Weight in order (qft.ops.cpu_calls).
using WeightArgs = std::tuple<uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t, int, bool,
                              int64_t, int, int>;

Weight weight_of(const WeightArgs& a) {
  return Weight{ptr<const void>(std::get<0>(a)),  ptr<const void>(std::get<1>(a)),  ptr<const uint16_t>(std::get<2>(a)),
                ptr<const float>(std::get<3>(a)), ptr<const float>(std::get<4>(a)), ptr<const float>(std::get<5>(a)),
                ptr<const float>(std::get<6>(a)), std::get<7>(a),                   std::get<8>(a),
                std::get<9>(a),                   std::get<10>(a),                  std::get<11>(a)};
}

}  // namespace

PYBIND11_MODULE(_cpu, m) {
  m.doc() = "qft CPU kernels over raw host pointers (see csrc/cpu/cpu_kernels.h)";

  m.def(
      "dequantize",
      [](const WeightArgs& weight, uintptr_t out, int out_dtype, int round_dtype) {
        check(dequantize(weight_of(weight), ptr<void>(out), static_cast<DType>(out_dtype),
                         static_cast<DType>(round_dtype)));
      },
      py::kw_only(), py::arg("weight"), py::arg("out"), py::arg("out_dtype"), py::arg("round_dtype"),
      py::call_guard<py::gil_scoped_release>(), "Decode every value of a weight (see cpu_kernels.h).");

  m.def(
      "quant_gemv",
      [](const WeightArgs& weight, uintptr_t x, int x_dtype, int rows, int64_t n_out, int64_t k_in, uintptr_t bias,
         int bias_dtype, uintptr_t lora_xa, uintptr_t lora_b, int rank, float scaling, uintptr_t y) {
        check(quant_gemv(weight_of(weight), ptr<const void>(x), static_cast<DType>(x_dtype), rows, n_out, k_in,
                         ptr<const void>(bias), static_cast<DType>(bias_dtype), ptr<const float>(lora_xa),
                         ptr<const float>(lora_b), rank, scaling, ptr<void>(y)));
      },
      py::kw_only(), py::arg("weight"), py::arg("x"), py::arg("x_dtype"), py::arg("rows"), py::arg("n_out"),
      py::arg("k_in"), py::arg("bias"), py::arg("bias_dtype"), py::arg("lora_xa"), py::arg("lora_b"), py::arg("rank"),
      py::arg("scaling"), py::arg("y"), py::call_guard<py::gil_scoped_release>(),
      "y = x W^T (+ bias) (+ scaling xa B^T) for a few rows (see cpu_kernels.h).");
  m.def(
      "quant_linear_bf16",
      [](const WeightArgs& weight, uintptr_t x, int64_t rows, int64_t n_out, int64_t k_in, uintptr_t bias,
         int bias_dtype, uintptr_t lora_xa, uintptr_t lora_b, int rank, float scaling, uintptr_t out) {
        check(quant_linear_bf16(weight_of(weight), ptr<const uint16_t>(x), rows, n_out, k_in, ptr<const void>(bias),
                                static_cast<DType>(bias_dtype), ptr<const float>(lora_xa), ptr<const float>(lora_b),
                                rank, scaling, ptr<uint16_t>(out)));
      },
      py::kw_only(), py::arg("weight"), py::arg("x"), py::arg("rows"), py::arg("n_out"), py::arg("k_in"),
      py::arg("bias"), py::arg("bias_dtype"), py::arg("lora_xa"), py::arg("lora_b"), py::arg("rank"),
      py::arg("scaling"), py::arg("out"), py::call_guard<py::gil_scoped_release>(),
      "bf16 y = x W^T (+ bias) (+ scaling xa B^T) by bf16 dot products (see cpu_kernels.h).");
  m.def(
      "quant_linear_grad_input_bf16",
      [](const WeightArgs& weight, uintptr_t grad, int64_t rows, int64_t n_out, int64_t k_in, uintptr_t lora_grad_xa,
         uintptr_t lora_a, int rank, uintptr_t out) {
        check(quant_linear_grad_input_bf16(weight_of(weight), ptr<const uint16_t>(grad), rows, n_out, k_in,
                                           ptr<const float>(lora_grad_xa), ptr<const float>(lora_a), rank,
                                           ptr<uint16_t>(out)));
      },
      py::kw_only(), py::arg("weight"), py::arg("grad"), py::arg("rows"), py::arg("n_out"), py::arg("k_in"),
      py::arg("lora_grad_xa"), py::arg("lora_a"), py::arg("rank"), py::arg("out"),
      py::call_guard<py::gil_scoped_release>(),
      "bf16 grad_x = grad W (+ lora_grad_xa A) by bf16 dot products (see cpu_kernels.h).");
  m.attr("max_gemv_rows") = kMaxCpuGemvRows;

  m.def(
      "oft_rotation_params_grad",
      [](uintptr_t params, uintptr_t grad_rot, int64_t blocks, int block_size, uintptr_t coefficients, int count,
         uintptr_t out) {
        check(oft_rotation_params_grad(ptr<const float>(params), ptr<const float>(grad_rot), blocks, block_size,
                                       ptr<const float>(coefficients), count, ptr<float>(out)));
      },
      py::kw_only(), py::arg("params"), py::arg("grad_rot"), py::arg("blocks"), py::arg("block_size"),
      py::arg("coefficients"), py::arg("count"), py::arg("out"), py::call_guard<py::gil_scoped_release>(),
      "dL/d(params) of OFT's Cayley-Neumann rotation from dL/dR, fp32 (see cpu_kernels.h).");
  m.def(
      "oft_rotate",
      [](uintptr_t x, int x_dtype, uintptr_t rot, int64_t rows, int64_t blocks, int block_size, bool transpose,
         uintptr_t out, int out_dtype) {
        check(oft_rotate(ptr<const void>(x), static_cast<DType>(x_dtype), ptr<const float>(rot), rows, blocks,
                         block_size, transpose, ptr<void>(out), static_cast<DType>(out_dtype)));
      },
      py::kw_only(), py::arg("x"), py::arg("x_dtype"), py::arg("rot"), py::arg("rows"), py::arg("blocks"),
      py::arg("block_size"), py::arg("transpose"), py::arg("out"), py::arg("out_dtype"),
      py::call_guard<py::gil_scoped_release>(),
      "OFT's per-block rotation of x by R (see cpu_kernels.h).");
  m.def(
      "oft_rotation_grad",
      [](uintptr_t x, int x_dtype, uintptr_t grad, int grad_dtype, int64_t rows, int64_t blocks, int block_size,
         uintptr_t grad_rot) {
        check(oft_rotation_grad(ptr<const void>(x), static_cast<DType>(x_dtype), ptr<const void>(grad),
                                static_cast<DType>(grad_dtype), rows, blocks, block_size, ptr<float>(grad_rot)));
      },
      py::kw_only(), py::arg("x"), py::arg("x_dtype"), py::arg("grad"), py::arg("grad_dtype"), py::arg("rows"),
      py::arg("blocks"), py::arg("block_size"), py::arg("grad_rot"), py::call_guard<py::gil_scoped_release>(),
      "dL/dR of OFT's rotation, fp32 (see cpu_kernels.h).");
  m.def(
      "bf16_times_fp32_nt",
      [](uintptr_t a, int64_t rows, int64_t width, uintptr_t f, int64_t outs, uintptr_t out) {
        check(bf16_times_fp32_nt(ptr<const uint16_t>(a), rows, width, ptr<const float>(f), outs, ptr<float>(out)));
      },
      py::kw_only(), py::arg("a"), py::arg("rows"), py::arg("width"), py::arg("f"), py::arg("outs"), py::arg("out"),
      py::call_guard<py::gil_scoped_release>(), "fp32 a @ f^T of bf16 a and fp32 f (see cpu_kernels.h).");
  m.def(
      "fp32_tn_times_bf16",
      [](uintptr_t f, int64_t rows, int64_t outs, uintptr_t a, int64_t width, uintptr_t out) {
        check(fp32_tn_times_bf16(ptr<const float>(f), rows, outs, ptr<const uint16_t>(a), width, ptr<float>(out)));
      },
      py::kw_only(), py::arg("f"), py::arg("rows"), py::arg("outs"), py::arg("a"), py::arg("width"), py::arg("out"),
      py::call_guard<py::gil_scoped_release>(), "fp32 f^T @ a of fp32 f and bf16 a (see cpu_kernels.h).");
  m.def(
      "adamw_step",
      [](uintptr_t p, int p_dtype, uintptr_t g, int g_dtype, uintptr_t exp_avg, uintptr_t exp_avg_sq,
         uintptr_t m_absmax, uintptr_t v_absmax, int64_t numel, float decay, float w1, float beta2, float w2,
         float bc2_sqrt, float eps, float neg_step, float sign, uintptr_t maps, uintptr_t first, uintptr_t mids) {
        const AdamWScalars s{decay, w1, beta2, w2, bc2_sqrt, eps, neg_step, sign};
        check(adamw_step(ptr<void>(p), static_cast<DType>(p_dtype), ptr<const void>(g), static_cast<DType>(g_dtype),
                         ptr<void>(exp_avg), ptr<void>(exp_avg_sq), ptr<float>(m_absmax), ptr<float>(v_absmax), numel,
                         s, ptr<const float>(maps), ptr<const int32_t>(first), ptr<const float>(mids)));
      },
      py::kw_only(), py::arg("p"), py::arg("p_dtype"), py::arg("g"), py::arg("g_dtype"), py::arg("exp_avg"),
      py::arg("exp_avg_sq"), py::arg("m_absmax"), py::arg("v_absmax"), py::arg("numel"), py::arg("decay"),
      py::arg("w1"), py::arg("beta2"), py::arg("w2"), py::arg("bc2_sqrt"), py::arg("eps"), py::arg("neg_step"),
      py::arg("sign"), py::arg("maps"), py::arg("first"), py::arg("mids"), py::call_guard<py::gil_scoped_release>(),
      "One AdamW step of one tensor, fp32 or 8-bit moments (see cpu_kernels.h).");

  m.def("isa", [] { return std::string(isa_name(active_isa())); }, "The instruction set the kernels run with now.");
  m.def("detected_isa", [] { return std::string(isa_name(detected_isa())); }, "The best one this CPU supports.");
  m.def(
      "set_isa_cap",
      [](const std::string& name) {
        for (Isa isa : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512Bf16}) {
          if (name == isa_name(isa)) return set_isa_cap(isa);
        }
        throw std::invalid_argument("isa must be 'scalar', 'avx2' or 'avx512bf16', got '" + name + "'");
      },
      py::arg("name"), "Run no kernel above this instruction set (tests run every path on one machine).");
  m.def("native_bf16", &native_bf16, "Whether the CPU multiplies bf16 natively (AVX512-BF16).");
  m.def("num_threads", &num_threads, "Threads a large call uses.");
  m.def("set_num_threads", &set_num_threads, py::arg("threads"), "Threads a large call uses (0: OpenMP's).");
  m.def("built_with_openmp", &built_with_openmp, "Whether large calls can split over OpenMP's threads.");
  m.def("openmp_library", &openmp_library, "The file of the OpenMP runtime the module is bound to (or '').");
  m.def("set_openmp_enabled", &set_openmp_enabled, py::arg("enabled"), "False: every call on one thread.");
  m.def(
      "team_size",
      [](int64_t count, int64_t work) {
        std::atomic<int> pieces{0};
        parallel_for(count, work, [&](int64_t, int64_t) { pieces.fetch_add(1); });
        return pieces.load();
      },
      py::arg("count"), py::arg("work"), "Pieces parallel_for splits `count` items of `work` bytes into.");
}
