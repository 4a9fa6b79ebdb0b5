#include "tests/kernels/cuda/cuda_test_util.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <numeric>
#include <string>

#include "common/fp16.h"
#include "kernels/cuda/cuda_status.h"

namespace morphserve::testing {

using kernels::cuda::CudaStatus;

void CudaTest::SetUp() {
  int devices = 0;
  const cudaError_t error = cudaGetDeviceCount(&devices);
  if (error != cudaSuccess || devices == 0) {
    const std::string reason = error != cudaSuccess
                                   ? std::string("cudaGetDeviceCount: ") + cudaGetErrorString(error)
                                   : std::string("cudaGetDeviceCount found 0 devices");
    const char* require = std::getenv("MORPHSERVE_REQUIRE_GPU");
    if (require != nullptr && std::string(require) == "1") {
      FAIL() << "no CUDA device visible (" << reason << ") and MORPHSERVE_REQUIRE_GPU=1";
    }
    GTEST_SKIP() << "no CUDA device visible (" << reason << ")";
  }
  ASSERT_OK(CudaStatus(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking),
                       "cudaStreamCreateWithFlags"));
}

void CudaTest::TearDown() {
  if (stream_ == nullptr) return;
  EXPECT_EQ(cudaStreamDestroy(stream_), cudaSuccess);
  stream_ = nullptr;
}

absl::Status CudaTest::Sync() {
  return CudaStatus(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
}

std::vector<uint16_t> RandomBf16(size_t n, float stddev, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, stddev);
  std::vector<uint16_t> bits(n);
  for (uint16_t& b : bits) b = FloatToBF16(normal(rng));
  return bits;
}

std::vector<float> RandomF32(size_t n, float stddev, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, stddev);
  std::vector<float> values(n);
  for (float& v : values) v = normal(rng);
  return values;
}

ScrambledTables ScrambleBlockTables(std::span<const int32_t> lengths, int64_t block_size,
                                    std::mt19937& rng) {
  int64_t max_blocks = 0;
  int64_t used_blocks = 0;
  for (int32_t len : lengths) {
    const int64_t blocks = (len + block_size - 1) / block_size;
    max_blocks = std::max(max_blocks, blocks);
    used_blocks += blocks;
  }
  ScrambledTables out;
  out.pool_blocks = used_blocks + 3;
  out.stride = max_blocks + 2;
  std::vector<int32_t> pool(out.pool_blocks);
  std::iota(pool.begin(), pool.end(), 0);
  std::shuffle(pool.begin(), pool.end(), rng);
  out.tables.assign(lengths.size() * out.stride, -1);
  int64_t next = 0;
  for (size_t seq = 0; seq < lengths.size(); ++seq) {
    const int64_t blocks = (lengths[seq] + block_size - 1) / block_size;
    for (int64_t b = 0; b < blocks; ++b) out.tables[seq * out.stride + b] = pool[next++];
  }
  return out;
}

std::vector<float> Bf16ToF32(std::span<const uint16_t> bits) {
  std::vector<float> values(bits.size());
  for (size_t i = 0; i < bits.size(); ++i) values[i] = BF16ToFloat(bits[i]);
  return values;
}

::testing::AssertionResult AllClose(std::span<const float> got, std::span<const float> expected,
                                    double abs_tol, double rel_tol) {
  if (got.size() != expected.size()) {
    return ::testing::AssertionFailure()
           << "sizes differ: " << got.size() << " vs " << expected.size();
  }
  size_t bad = 0;
  size_t first = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double tol = abs_tol + rel_tol * std::fabs(expected[i]);
    if (std::isnan(got[i]) || !(std::fabs(double{got[i]} - expected[i]) <= tol)) {
      if (bad++ == 0) first = i;
    }
  }
  if (bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << bad << " of " << got.size() << " elements off; first at " << first << ": got "
         << got[first] << (std::isnan(got[first]) ? " (never written)" : "") << ", expected "
         << expected[first] << " within " << abs_tol + rel_tol * std::fabs(expected[first]);
}

}  // namespace morphserve::testing
