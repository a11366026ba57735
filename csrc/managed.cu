// Unified (managed) memory for paged optimizer state: allocate, free, and prefetch a range to a GPU
// or to the host. Prefetching needs concurrent managed access; without it the pages migrate on
// demand instead (prefetch reports that it did nothing).
#include <cuda_runtime.h>

#include "qft_kernels.h"

namespace qft {

int managed_alloc(void** ptr, size_t nbytes) {
  return cudaMallocManaged(ptr, nbytes, cudaMemAttachGlobal);
}

int managed_free(void* ptr) { return cudaFree(ptr); }

int managed_prefetch(void* ptr, size_t nbytes, int device, void* stream, int* prefetched) {
  *prefetched = 0;
  int gpu = device;
  if (gpu < 0 && cudaGetDevice(&gpu) != cudaSuccess) return cudaGetLastError();
  int concurrent = 0;
  cudaError_t err = cudaDeviceGetAttribute(&concurrent, cudaDevAttrConcurrentManagedAccess, gpu);
  if (err != cudaSuccess) return err;
  if (!concurrent) return cudaSuccess;  // pages migrate on first touch instead
  cudaMemLocation location{};
  location.type = device < 0 ? cudaMemLocationTypeHost : cudaMemLocationTypeDevice;
  location.id = device < 0 ? 0 : device;
  err = cudaMemPrefetchAsync(ptr, nbytes, location, 0, static_cast<cudaStream_t>(stream));
  if (err == cudaSuccess) *prefetched = 1;
  return err;
}

}  // namespace qft
