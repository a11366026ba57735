// Runtime queries that must answer cleanly on a machine with no GPU.
#include <cuda_runtime.h>

#include "qft_kernels.h"

namespace qft {

static const char* g_status = "";

int device_count() {
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    g_status = cudaGetErrorString(err);
    cudaGetLastError();  // clear the sticky error so later queries start clean
    return 0;
  }
  g_status = count == 0 ? "no CUDA device" : "";
  return count;
}

const char* device_status() { return g_status; }

int runtime_version() {
  int v = 0;
  cudaRuntimeGetVersion(&v);
  return v;
}

int driver_version() {
  int v = 0;
  if (cudaDriverGetVersion(&v) != cudaSuccess) return 0;
  return v;
}

const char* error_string(int error) { return cudaGetErrorString(static_cast<cudaError_t>(error)); }

}  // namespace qft
