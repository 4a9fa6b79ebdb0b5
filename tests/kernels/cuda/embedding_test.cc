// Embedding rows gathered on the GPU against the CPU's row conversion.
#include "kernels/cuda/embedding.h"

#include <gtest/gtest.h>

#include <random>
#include <vector>

#include "common/dtype.h"
#include "kernels/cpu/dequantize.h"
#include "tests/kernels/cuda/cuda_test_util.h"

namespace morphserve::kernels::cuda {
namespace {

using testing::Poisoned;
using testing::RandomBf16;
using testing::Upload;

class EmbeddingCudaTest : public testing::CudaTest {};

TEST_F(EmbeddingCudaTest, GathersRowsExactly) {
  struct Shape {
    int64_t vocab_size, dim, n_tokens;
  };
  std::mt19937 rng(21);
  for (const Shape& s :
       {Shape{1, 1, 1}, Shape{997, 17, 17}, Shape{5000, 576, 1031}, Shape{300, 1537, 3}}) {
    const std::vector<uint16_t> table = RandomBf16(s.vocab_size * s.dim, 1.0f, rng);
    std::uniform_int_distribution<int32_t> any_id(0, static_cast<int32_t>(s.vocab_size - 1));
    std::vector<int32_t> ids(s.n_tokens);
    for (int32_t& id : ids) id = any_id(rng);
    ids.back() = static_cast<int32_t>(s.vocab_size - 1);
    std::vector<float> expected(s.n_tokens * s.dim);
    for (int64_t t = 0; t < s.n_tokens; ++t) {
      DequantizeRow(DType::kBF16, &table[ids[t] * s.dim], &expected[t * s.dim], s.dim);
    }
    ASSERT_OK_AND_ASSIGN(DeviceBuffer d_table, Upload(table));
    ASSERT_OK_AND_ASSIGN(DeviceBuffer d_ids, Upload(ids));
    ASSERT_OK_AND_ASSIGN(DeviceBuffer d_out, Poisoned<float>(expected.size()));
    ASSERT_OK(EmbeddingGather(d_table.as<__nv_bfloat16>(), s.vocab_size, s.dim, d_ids.as<int32_t>(),
                              d_out.as<float>(), s.n_tokens, stream_));
    ASSERT_OK(Sync());
    ASSERT_OK_AND_ASSIGN(const std::vector<float> out, d_out.ToHost<float>());
    // Widening bf16 to f32 is exact.
    EXPECT_EQ(out, expected) << "vocab=" << s.vocab_size << " dim=" << s.dim;
  }
}

TEST_F(EmbeddingCudaTest, OutOfRangeIdsGiveZeros) {
  std::mt19937 rng(22);
  const int64_t vocab = 10, dim = 33;
  const std::vector<uint16_t> table = RandomBf16(vocab * dim, 1.0f, rng);
  const std::vector<int32_t> ids = {-1, 10, 3, 1 << 30};
  ASSERT_OK_AND_ASSIGN(DeviceBuffer d_table, Upload(table));
  ASSERT_OK_AND_ASSIGN(DeviceBuffer d_ids, Upload(ids));
  ASSERT_OK_AND_ASSIGN(DeviceBuffer d_out, Poisoned<float>(ids.size() * dim));
  ASSERT_OK(EmbeddingGather(d_table.as<__nv_bfloat16>(), vocab, dim, d_ids.as<int32_t>(),
                            d_out.as<float>(), static_cast<int64_t>(ids.size()), stream_));
  ASSERT_OK(Sync());
  ASSERT_OK_AND_ASSIGN(const std::vector<float> out, d_out.ToHost<float>());
  std::vector<float> row3(dim);
  DequantizeRow(DType::kBF16, &table[3 * dim], row3.data(), dim);
  for (int64_t t = 0; t < static_cast<int64_t>(ids.size()); ++t) {
    for (int64_t i = 0; i < dim; ++i) {
      ASSERT_EQ(out[t * dim + i], t == 2 ? row3[i] : 0.0f) << "token " << t << " dim " << i;
    }
  }
}

}  // namespace
}  // namespace morphserve::kernels::cuda
