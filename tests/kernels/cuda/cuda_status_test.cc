// Status conversion needs no device: these run everywhere CUDA is built.
#include "kernels/cuda/cuda_status.h"

#include <gtest/gtest.h>

#include <string>

namespace morphserve::kernels::cuda {
namespace {

absl::Status FailsAt(cudaError_t result) {
  RETURN_IF_CUDA_ERROR(result);
  return absl::OkStatus();
}

TEST(CudaStatusTest, NamesTheCallAndTheError) {
  EXPECT_TRUE(CudaStatus(cudaSuccess, "cudaMalloc").ok());
  const absl::Status oom = CudaStatus(cudaErrorMemoryAllocation, "cudaMalloc(&p, n)");
  EXPECT_EQ(oom.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(std::string(oom.message()).find("cudaMalloc(&p, n): "), std::string::npos) << oom;
  EXPECT_NE(std::string(oom.message()).find("cudaErrorMemoryAllocation"), std::string::npos) << oom;
  EXPECT_EQ(CudaStatus(cudaErrorNoDevice, "x").code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(CudaStatus(cudaErrorIllegalAddress, "x").code(), absl::StatusCode::kInternal);
}

TEST(CudaStatusTest, MacroReturnsTheExpressionText) {
  EXPECT_TRUE(FailsAt(cudaSuccess).ok());
  const absl::Status s = FailsAt(cudaErrorInvalidValue);
  EXPECT_EQ(s.code(), absl::StatusCode::kInternal);
  EXPECT_EQ(std::string(s.message()).rfind("result: ", 0), 0u) << s;
}

TEST(CudaStatusTest, CublasCodes) {
  EXPECT_TRUE(CublasStatus(CUBLAS_STATUS_SUCCESS, "cublasCreate").ok());
  const absl::Status bad = CublasStatus(CUBLAS_STATUS_INVALID_VALUE, "cublasGemmEx");
  EXPECT_EQ(bad.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(std::string(bad.message()).find("CUBLAS_STATUS_INVALID_VALUE"), std::string::npos)
      << bad;
  EXPECT_EQ(CublasStatus(CUBLAS_STATUS_ALLOC_FAILED, "x").code(),
            absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(CublasStatus(CUBLAS_STATUS_EXECUTION_FAILED, "x").code(), absl::StatusCode::kInternal);
}

}  // namespace
}  // namespace morphserve::kernels::cuda
