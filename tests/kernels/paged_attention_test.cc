// Paged attention against plain attention over a contiguous copy of the
// same keys and values, with scrambled block tables and awkward sizes.
#include "kernels/cpu/paged_attention.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <vector>

#include "gtest/gtest.h"

namespace morphserve::kernels {
namespace {

struct Shape {
  int64_t context_len, block_size, num_heads, num_kv_heads, head_dim;
};

class PagedAttentionTest : public ::testing::TestWithParam<Shape> {};

TEST_P(PagedAttentionTest, MatchesContiguousReference) {
  const Shape s = GetParam();
  std::mt19937 rng(static_cast<uint32_t>(s.context_len * 131 + s.num_heads));
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const int64_t blocks = (s.context_len + s.block_size - 1) / s.block_size;
  const int64_t pool_blocks = blocks + 5;
  std::vector<int32_t> table(pool_blocks);
  std::iota(table.begin(), table.end(), 0);
  std::shuffle(table.begin(), table.end(), rng);
  table.resize(blocks);

  const int64_t per_block = s.num_kv_heads * s.block_size * s.head_dim;
  std::vector<float> k_cache(pool_blocks * per_block, std::nanf(""));
  std::vector<float> v_cache(pool_blocks * per_block, std::nanf(""));
  // Contiguous reference copies: [kv_head][pos][dim].
  std::vector<float> k_ref(s.num_kv_heads * s.context_len * s.head_dim);
  std::vector<float> v_ref(k_ref.size());
  for (int64_t pos = 0; pos < s.context_len; ++pos) {
    for (int64_t h = 0; h < s.num_kv_heads; ++h) {
      for (int64_t d = 0; d < s.head_dim; ++d) {
        const float k = normal(rng), v = normal(rng);
        const int64_t at =
            ((table[pos / s.block_size] * s.num_kv_heads + h) * s.block_size + pos % s.block_size) *
                s.head_dim +
            d;
        k_cache[at] = k;
        v_cache[at] = v;
        k_ref[(h * s.context_len + pos) * s.head_dim + d] = k;
        v_ref[(h * s.context_len + pos) * s.head_dim + d] = v;
      }
    }
  }
  std::vector<float> q(s.num_heads * s.head_dim);
  for (float& x : q) x = normal(rng);

  PagedAttentionArgs args;
  args.k_cache = k_cache.data();
  args.v_cache = v_cache.data();
  args.block_table = table.data();
  args.context_len = s.context_len;
  args.block_size = s.block_size;
  args.num_heads = s.num_heads;
  args.num_kv_heads = s.num_kv_heads;
  args.head_dim = s.head_dim;
  args.scale = 1.0f / std::sqrt(static_cast<float>(s.head_dim));

  const int64_t group = s.num_heads / s.num_kv_heads;
  // The grouped kernel, every query head of a KV head at once; poisoned so
  // that every output element must be written.
  std::vector<float> group_out(s.num_heads * s.head_dim, std::nanf(""));
  for (int64_t kvh = 0; kvh < s.num_kv_heads; ++kvh) {
    PagedAttentionGroup(args, &q[kvh * group * s.head_dim], kvh,
                        &group_out[kvh * group * s.head_dim]);
  }
  for (int64_t h = 0; h < s.num_heads; ++h) {
    std::vector<float> out(s.head_dim, std::nanf(""));
    PagedAttentionHead(args, &q[h * s.head_dim], h, out.data());
    const int64_t kvh = h / group;
    std::vector<double> scores(s.context_len);
    double m = -1e300;
    for (int64_t pos = 0; pos < s.context_len; ++pos) {
      double dot = 0;
      for (int64_t d = 0; d < s.head_dim; ++d) {
        dot += static_cast<double>(q[h * s.head_dim + d]) *
               k_ref[(kvh * s.context_len + pos) * s.head_dim + d];
      }
      scores[pos] = dot * args.scale;
      m = std::max(m, scores[pos]);
    }
    double sum = 0;
    for (double& x : scores) sum += (x = std::exp(x - m));
    for (int64_t d = 0; d < s.head_dim; ++d) {
      double expected = 0;
      for (int64_t pos = 0; pos < s.context_len; ++pos) {
        expected += scores[pos] / sum * v_ref[(kvh * s.context_len + pos) * s.head_dim + d];
      }
      ASSERT_NEAR(out[d], expected, 1e-4) << "head " << h << " dim " << d;
      ASSERT_NEAR(group_out[h * s.head_dim + d], expected, 1e-4)
          << "grouped, head " << h << " dim " << d;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, PagedAttentionTest,
                         ::testing::Values(Shape{1, 16, 1, 1, 64}, Shape{17, 16, 3, 1, 64},
                                           Shape{33, 16, 4, 4, 4}, Shape{1000, 16, 8, 2, 128},
                                           Shape{250, 7, 9, 3, 64}, Shape{300, 256, 6, 2, 32},
                                           Shape{5, 1, 2, 2, 8}, Shape{1031, 16, 24, 3, 64},
                                           Shape{77, 5, 32, 4, 128}, Shape{18, 32, 20, 1, 64}));

}  // namespace
}  // namespace morphserve::kernels
