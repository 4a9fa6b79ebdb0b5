// Shared pieces of the CUDA kernel tests: a fixture that skips without a
// GPU, bf16 data on the host (as bits), and tolerance checks that also
// catch outputs left unwritten (buffers are poisoned with NaN first).
#ifndef MORPHSERVE_TESTS_KERNELS_CUDA_CUDA_TEST_UTIL_H_
#define MORPHSERVE_TESTS_KERNELS_CUDA_CUDA_TEST_UTIL_H_

#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <random>
#include <span>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/status.h"
#include "kernels/cuda/device_buffer.h"

#define ASSERT_OK(expr)                                                   \
  do {                                                                    \
    const ::absl::Status _morphserve_test_status = (expr);                \
    ASSERT_TRUE(_morphserve_test_status.ok()) << _morphserve_test_status; \
  } while (0)

#define ASSERT_OK_AND_ASSIGN(lhs, expr) \
  ASSERT_OK_AND_ASSIGN_IMPL_(MORPHSERVE_CONCAT_(_morphserve_test_or_, __LINE__), lhs, expr)
#define ASSERT_OK_AND_ASSIGN_IMPL_(tmp, lhs, expr) \
  auto tmp = (expr);                               \
  ASSERT_TRUE(tmp.ok()) << tmp.status();           \
  lhs = std::move(tmp).value()

namespace morphserve::testing {

using kernels::cuda::DeviceBuffer;

// Skips the test when no CUDA device is visible, or fails it when
// MORPHSERVE_REQUIRE_GPU=1 (scripts/gpu-check.sh sets it, so that a GPU
// machine cannot pass by skipping). Tests queue work on stream_, a
// non-blocking stream as the engine will use.
class CudaTest : public ::testing::Test {
 protected:
  void SetUp() override;
  void TearDown() override;

  // Waits for stream_; the error of anything that failed while running.
  absl::Status Sync();

  cudaStream_t stream_ = nullptr;
};

// bf16 keeps 8 significant bits, so rounding an f32 result moves it by up
// to 2^-9 of itself; twice that leaves room for f32 differences in the
// order of operations between the GPU and the CPU reference.
inline constexpr double kBf16RelTol = 1.0 / 256;

// Random bf16 values (as bits) drawn from N(0, stddev^2).
std::vector<uint16_t> RandomBf16(size_t n, float stddev, std::mt19937& rng);
std::vector<float> RandomF32(size_t n, float stddev, std::mt19937& rng);
std::vector<float> Bf16ToF32(std::span<const uint16_t> bits);

// Passes when got[i] is within abs_tol + rel_tol * |expected[i]| of
// expected[i] for every i; a NaN in got (a poisoned element never written)
// fails. The message names the first bad index and the count of bad ones.
::testing::AssertionResult AllClose(std::span<const float> got, std::span<const float> expected,
                                    double abs_tol, double rel_tol);

// Block tables for sequences of `lengths` cache slots: blocks drawn from one
// shuffled pool with 3 spare blocks, each row padded with -1 to 2 columns
// past the longest.
struct ScrambledTables {
  std::vector<int32_t> tables;  // [sequence][stride]
  int64_t stride = 0;
  int64_t pool_blocks = 0;
};
ScrambledTables ScrambleBlockTables(std::span<const int32_t> lengths, int64_t block_size,
                                    std::mt19937& rng);

// A device copy of `host`.
template <typename T>
absl::StatusOr<DeviceBuffer> Upload(const std::vector<T>& host) {
  return DeviceBuffer::FromHost(std::span<const T>(host));
}

// A device buffer of `count` elements of T, every byte 0xff (NaN in f32
// and bf16).
template <typename T>
absl::StatusOr<DeviceBuffer> Poisoned(size_t count) {
  ASSIGN_OR_RETURN(DeviceBuffer buffer, DeviceBuffer::Allocate(count * sizeof(T)));
  RETURN_IF_ERROR(buffer.Fill(0xff));
  return buffer;
}

}  // namespace morphserve::testing

#endif  // MORPHSERVE_TESTS_KERNELS_CUDA_CUDA_TEST_UTIL_H_
