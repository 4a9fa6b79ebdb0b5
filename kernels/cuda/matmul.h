// Matrix products of bf16 weights with bf16 activations through cuBLAS:
// every projection and MLP product of a step, over all its tokens at once.
#ifndef MORPHSERVE_KERNELS_CUDA_MATMUL_H_
#define MORPHSERVE_KERNELS_CUDA_MATMUL_H_

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/dtype.h"
#include "kernels/cuda/device_buffer.h"

namespace morphserve::kernels::cuda {

// Y[t * y_stride + r] = sum_k W[r, k] * X[t * x_stride + k]
//   for t in [0, n_tokens), r in [0, rows), k in [0, cols),
// as kernels/cpu/matmul.h, with the weights always bf16. W is dense
// [rows][cols]; Y is f32 (logits, a residual delta) or bf16 (what feeds the
// next kernel); products accumulate in f32. Device pointers.
struct MatMulArgs {
  const __nv_bfloat16* w = nullptr;
  int64_t rows = 0;
  int64_t cols = 0;
  const __nv_bfloat16* x = nullptr;
  int64_t x_stride = 0;
  int64_t n_tokens = 0;
  void* y = nullptr;
  int64_t y_stride = 0;
  DType y_type = DType::kF32;  // kF32 or kBF16
};

// A cuBLAS handle with its own workspace, so that cuBLAS never allocates
// after start-up (which CUDA graph capture also requires). Used by one
// thread at a time (the engine thread); move-only.
class Cublas {
 public:
  // What NVIDIA recommends for Hopper; older GPUs need less.
  static constexpr size_t kDefaultWorkspaceBytes = size_t{32} << 20;

  static absl::StatusOr<Cublas> Create(size_t workspace_bytes = kDefaultWorkspaceBytes);

  Cublas(Cublas&& other) noexcept;
  Cublas& operator=(Cublas&& other) noexcept;
  Cublas(const Cublas&) = delete;
  Cublas& operator=(const Cublas&) = delete;
  ~Cublas();

  // The handle, bound to `stream` and to the workspace.
  absl::StatusOr<cublasHandle_t> HandleFor(cudaStream_t stream);

 private:
  Cublas() = default;

  cublasHandle_t handle_ = nullptr;
  DeviceBuffer workspace_;
  cudaStream_t stream_ = nullptr;  // the stream handle_ is bound to
};

// Queues Y = X W^T on `stream` (cublasGemmEx, f32 compute).
absl::Status MatMul(const MatMulArgs& args, Cublas& cublas, cudaStream_t stream);

}  // namespace morphserve::kernels::cuda

#endif  // MORPHSERVE_KERNELS_CUDA_MATMUL_H_
