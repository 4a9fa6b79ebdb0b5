#include "kernels/cuda/matmul.h"

#include <cstdint>
#include <utility>

#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/launch_internal.h"

namespace morphserve::kernels::cuda {

absl::StatusOr<Cublas> Cublas::Create(size_t workspace_bytes) {
  Cublas cublas;
  ASSIGN_OR_RETURN(cublas.workspace_, DeviceBuffer::Allocate(workspace_bytes));
  RETURN_IF_CUBLAS_ERROR(cublasCreate(&cublas.handle_));
  // Split-K partial sums stay f32 even when the output is bf16.
  RETURN_IF_CUBLAS_ERROR(cublasSetMathMode(
      cublas.handle_, static_cast<cublasMath_t>(CUBLAS_DEFAULT_MATH |
                                                CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION)));
  RETURN_IF_CUBLAS_ERROR(
      cublasSetWorkspace(cublas.handle_, cublas.workspace_.data(), cublas.workspace_.size()));
  return cublas;
}

Cublas::Cublas(Cublas&& other) noexcept
    : handle_(std::exchange(other.handle_, nullptr)),
      workspace_(std::move(other.workspace_)),
      stream_(std::exchange(other.stream_, nullptr)) {}

Cublas& Cublas::operator=(Cublas&& other) noexcept {
  if (this != &other) {
    if (handle_ != nullptr) cublasDestroy(handle_);
    handle_ = std::exchange(other.handle_, nullptr);
    workspace_ = std::move(other.workspace_);
    stream_ = std::exchange(other.stream_, nullptr);
  }
  return *this;
}

Cublas::~Cublas() {
  if (handle_ != nullptr) cublasDestroy(handle_);
}

absl::StatusOr<cublasHandle_t> Cublas::HandleFor(cudaStream_t stream) {
  if (stream != stream_) {
    RETURN_IF_CUBLAS_ERROR(cublasSetStream(handle_, stream));
    // cublasSetStream puts the handle back on cuBLAS's own workspace pool.
    RETURN_IF_CUBLAS_ERROR(cublasSetWorkspace(handle_, workspace_.data(), workspace_.size()));
    stream_ = stream;
  }
  return handle_;
}

absl::Status MatMul(const MatMulArgs& a, Cublas& cublas, cudaStream_t stream) {
  using internal::Require;
  constexpr const char* kName = "MatMul";
  RETURN_IF_ERROR(Require(a.rows > 0 && a.cols > 0 && a.n_tokens >= 0, kName,
                          "rows > 0, cols > 0 and n_tokens >= 0"));
  RETURN_IF_ERROR(Require(a.x_stride >= a.cols && a.y_stride >= a.rows, kName,
                          "x_stride >= cols and y_stride >= rows"));
  // cuBLAS takes sizes and leading dimensions as int.
  RETURN_IF_ERROR(Require(a.rows <= INT32_MAX && a.n_tokens <= INT32_MAX &&
                              a.x_stride <= INT32_MAX && a.y_stride <= INT32_MAX,
                          kName, "sizes and strides below 2^31"));
  RETURN_IF_ERROR(
      Require(a.y_type == DType::kF32 || a.y_type == DType::kBF16, kName, "an f32 or bf16 output"));
  if (a.n_tokens == 0) return absl::OkStatus();
  ASSIGN_OR_RETURN(cublasHandle_t handle, cublas.HandleFor(stream));
  // cuBLAS is column-major: the row-major [n_tokens][y_stride] Y is the
  // column-major rows x n_tokens matrix Y^T = W X^T, with W^T stored as a
  // column-major cols x rows matrix (lda = cols) and X^T as a column-major
  // cols x n_tokens matrix (ldb = x_stride).
  const float alpha = 1.0f;
  const float beta = 0.0f;
  return CublasStatus(
      cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(a.rows),
                   static_cast<int>(a.n_tokens), static_cast<int>(a.cols), &alpha, a.w, CUDA_R_16BF,
                   static_cast<int>(a.cols), a.x, CUDA_R_16BF, static_cast<int>(a.x_stride), &beta,
                   a.y, a.y_type == DType::kF32 ? CUDA_R_32F : CUDA_R_16BF,
                   static_cast<int>(a.y_stride), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
      "cublasGemmEx");
}

}  // namespace morphserve::kernels::cuda
