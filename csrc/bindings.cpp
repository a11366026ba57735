// The one pybind11 module, qft._C. Pointers and streams arrive as integers (tensor.data_ptr(),
// torch.cuda.current_stream().cuda_stream), so no torch header is needed.
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "qft_kernels.h"

namespace py = pybind11;

namespace {

void check(int error) {
  if (error != 0) throw std::runtime_error(std::string("qft CUDA kernel failed: ") + qft::error_string(error));
}

template <typename T>
T* ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

// The one place a QuantWeight is assembled from Python: by keyword, so no part can land in another's field.
qft::QuantWeight make_weight(uintptr_t codes, uintptr_t scales, uintptr_t zeros, uintptr_t nested_scales,
                             uintptr_t offset, uintptr_t code, uintptr_t dynamic_map, int bits, bool affine,
                             int64_t numel, int block_size, int nested_block_size) {
  return {ptr<const void>(codes), ptr<const void>(scales), ptr<const void>(zeros),
          ptr<const float>(nested_scales), ptr<const float>(offset), ptr<const float>(code),
          ptr<const float>(dynamic_map), bits, affine, numel, block_size, nested_block_size};
}

template <auto kField>
uintptr_t address(const qft::QuantWeight& w) {
  return reinterpret_cast<uintptr_t>(w.*kField);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "qft CUDA kernels over raw device pointers (see csrc/qft_kernels.h)";

  using qft::QuantWeight;
  py::class_<QuantWeight>(m, "QuantWeight", "A quantized weight's part addresses and numbers (qft_kernels.h).")
      .def(py::init(&make_weight), py::kw_only(), py::arg("codes"), py::arg("scales"), py::arg("zeros"),
           py::arg("nested_scales"), py::arg("offset"), py::arg("code"), py::arg("dynamic_map"), py::arg("bits"),
           py::arg("affine"), py::arg("numel"), py::arg("block_size"), py::arg("nested_block_size"))
      .def_property_readonly("codes", &address<&QuantWeight::codes>)
      .def_property_readonly("scales", &address<&QuantWeight::scales>)
      .def_property_readonly("zeros", &address<&QuantWeight::zeros>)
      .def_property_readonly("nested_scales", &address<&QuantWeight::nested_scales>)
      .def_property_readonly("offset", &address<&QuantWeight::offset>)
      .def_property_readonly("code", &address<&QuantWeight::code>)
      .def_property_readonly("dynamic_map", &address<&QuantWeight::dynamic_map>)
      .def_readonly("bits", &QuantWeight::bits)
      .def_readonly("affine", &QuantWeight::affine)
      .def_readonly("numel", &QuantWeight::numel)
      .def_readonly("block_size", &QuantWeight::block_size)
      .def_readonly("nested_block_size", &QuantWeight::nested_block_size);

  m.def(
      "quantize_codebook4",
      [](uintptr_t w, int dtype, uintptr_t codes, uintptr_t scales, uintptr_t thresholds, uintptr_t order,
         int64_t numel, int block_size, uintptr_t stream) {
        check(qft::quantize_codebook4(ptr<const void>(w), static_cast<qft::DType>(dtype), ptr<uint8_t>(codes),
                                      ptr<float>(scales), ptr<const float>(thresholds), ptr<const int32_t>(order),
                                      numel, block_size, ptr<void>(stream)));
      },
      py::arg("w"), py::arg("dtype"), py::arg("codes"), py::arg("scales"), py::arg("thresholds"),
      py::arg("encode_order"), py::arg("numel"), py::arg("block_size"), py::arg("stream"),
      py::call_guard<py::gil_scoped_release>(), "Blockwise nf4/fp4 quantization (see qft_kernels.h).");

  m.def(
      "dequantize",
      [](const QuantWeight& w, uintptr_t out, int out_dtype, int64_t row_length, int64_t row_stride,
         uintptr_t stream) {
        check(qft::dequantize(w, ptr<void>(out), static_cast<qft::DType>(out_dtype), row_length, row_stride,
                              ptr<void>(stream)));
      },
      py::arg("weight"), py::arg("out"), py::arg("out_dtype"), py::arg("row_length"), py::arg("row_stride"),
      py::arg("stream"),
      py::call_guard<py::gil_scoped_release>(), "Decode every value of a weight (see qft_kernels.h).");

  m.def(
      "quant_gemv",
      [](uintptr_t x, int dtype, const QuantWeight& w, uintptr_t bias, uintptr_t lora_xa, uintptr_t lora_b,
         float scaling, int rank, uintptr_t y, int rows, int64_t n_out, int64_t k_in, int splits, uintptr_t workspace,
         uintptr_t stream) {
        check(qft::quant_gemv(ptr<const void>(x), static_cast<qft::DType>(dtype), w, ptr<const void>(bias),
                              ptr<const float>(lora_xa), ptr<const float>(lora_b), scaling, rank, ptr<void>(y), rows,
                              n_out, k_in, splits, ptr<float>(workspace), ptr<void>(stream)));
      },
      py::arg("x"), py::arg("dtype"), py::arg("weight"), py::arg("bias"), py::arg("lora_xa"), py::arg("lora_b"),
      py::arg("scaling"), py::arg("rank"), py::arg("y"), py::arg("rows"), py::arg("n_out"), py::arg("k_in"),
      py::arg("splits"), py::arg("workspace"), py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
      "Decode GEMV for M <= max_gemv_rows (see qft_kernels.h).");
  m.def(
      "quant_gemv_emulate",
      [](uintptr_t x, int dtype, const QuantWeight& w, uintptr_t bias, uintptr_t lora_xa, uintptr_t lora_b,
         float scaling, int rank, uintptr_t y, int rows, int64_t n_out, int64_t k_in, int splits,
         uintptr_t workspace) {
        check(qft::quant_gemv_emulate(ptr<const void>(x), static_cast<qft::DType>(dtype), w, ptr<const void>(bias),
                                      ptr<const float>(lora_xa), ptr<const float>(lora_b), scaling, rank,
                                      ptr<void>(y), rows, n_out, k_in, splits, ptr<float>(workspace)));
      },
      py::arg("x"), py::arg("dtype"), py::arg("weight"), py::arg("bias"), py::arg("lora_xa"), py::arg("lora_b"),
      py::arg("scaling"), py::arg("rank"), py::arg("y"), py::arg("rows"), py::arg("n_out"), py::arg("k_in"),
      py::arg("splits"), py::arg("workspace"), py::call_guard<py::gil_scoped_release>(),
      "quant_gemv's chunked kernel on the CPU, host pointers (see qft_kernels.h).");
  m.attr("max_gemv_rows") = qft::kMaxGemvRows;

  m.def(
      "managed_alloc",
      [](size_t nbytes) {
        void* p = nullptr;
        check(qft::managed_alloc(&p, nbytes));
        return reinterpret_cast<uintptr_t>(p);
      },
      py::arg("nbytes"), "cudaMallocManaged; returns the address.");
  m.def(
      "managed_free", [](uintptr_t address) { check(qft::managed_free(ptr<void>(address))); }, py::arg("address"),
      "cudaFree of a managed allocation.");
  m.def(
      "managed_prefetch",
      [](uintptr_t address, size_t nbytes, int device, uintptr_t stream) {
        int prefetched = 0;
        check(qft::managed_prefetch(ptr<void>(address), nbytes, device, ptr<void>(stream), &prefetched));
        return prefetched != 0;
      },
      py::arg("address"), py::arg("nbytes"), py::arg("device"), py::arg("stream"),
      py::call_guard<py::gil_scoped_release>(),
      "Prefetch a managed range to GPU `device` (host if < 0); False where the GPU cannot prefetch.");

  m.def("device_count", &qft::device_count, "Visible CUDA devices; 0 without a GPU (never raises).");
  m.def("device_status", &qft::device_status, "Why device_count() found no device, or ''.");
  m.def("runtime_version", &qft::runtime_version, "CUDA runtime version the extension was built with.");
  m.def("driver_version", &qft::driver_version, "CUDA driver version, 0 without a driver.");
}
