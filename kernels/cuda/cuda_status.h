// CUDA runtime and cuBLAS results as absl::Status, naming the failed call.
//
// Every kernel wrapper checks its launch with LaunchStatus(); errors raised
// while a kernel runs (a bad address, say) surface at the next synchronising
// call, which callers check with RETURN_IF_CUDA_ERROR.
#ifndef MORPHSERVE_KERNELS_CUDA_CUDA_STATUS_H_
#define MORPHSERVE_KERNELS_CUDA_CUDA_STATUS_H_

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include "absl/status/status.h"
#include "common/status.h"

namespace morphserve::kernels::cuda {

// OK for cudaSuccess; otherwise "CALL: message (cudaErrorName)", with
// RESOURCE_EXHAUSTED for out-of-memory, FAILED_PRECONDITION for a missing
// device or driver, INTERNAL for the rest.
absl::Status CudaStatus(cudaError_t error, const char* call);

// The same for cuBLAS (INVALID_ARGUMENT for CUBLAS_STATUS_INVALID_VALUE).
absl::Status CublasStatus(cublasStatus_t status, const char* call);

// The error of the last kernel launch on this thread (bad configuration, no
// device, a kernel image missing for this GPU), cleared once read. Called
// right after every <<<...>>> launch, naming the kernel.
absl::Status LaunchStatus(const char* kernel);

}  // namespace morphserve::kernels::cuda

// Returns the error of a CUDA runtime call from the enclosing function.
#define RETURN_IF_CUDA_ERROR(expr) \
  RETURN_IF_ERROR(::morphserve::kernels::cuda::CudaStatus((expr), #expr))

// Returns the error of a cuBLAS call from the enclosing function.
#define RETURN_IF_CUBLAS_ERROR(expr) \
  RETURN_IF_ERROR(::morphserve::kernels::cuda::CublasStatus((expr), #expr))

#endif  // MORPHSERVE_KERNELS_CUDA_CUDA_STATUS_H_
