// The eviction-scoring kernels against plain double-precision loops, on
// random inputs with scrambled block tables and awkward sizes.
#include "kernels/cpu/kv_scoring.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <vector>

#include "gtest/gtest.h"

namespace morphserve::kernels {
namespace {

struct LogitShape {
  int64_t num_slots, block_size, num_kv_heads, head_dim, rows;
};

class PagedKeyLogitsTest : public ::testing::TestWithParam<LogitShape> {};

TEST_P(PagedKeyLogitsTest, MatchesDotProducts) {
  const LogitShape s = GetParam();
  std::mt19937 rng(static_cast<uint32_t>(s.num_slots * 7 + s.rows));
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const int64_t blocks = (s.num_slots + s.block_size - 1) / s.block_size;
  const int64_t pool_blocks = blocks + 3;
  std::vector<int32_t> table(pool_blocks);
  std::iota(table.begin(), table.end(), 0);
  std::shuffle(table.begin(), table.end(), rng);
  table.resize(blocks);
  std::vector<float> k_cache(pool_blocks * s.num_kv_heads * s.block_size * s.head_dim);
  for (float& x : k_cache) x = normal(rng);
  std::vector<float> q(s.rows * (s.head_dim + 3));
  for (float& x : q) x = normal(rng);

  for (int64_t kvh = 0; kvh < s.num_kv_heads; ++kvh) {
    const PagedKeys keys{k_cache.data(), table.data(), s.block_size, s.num_kv_heads,
                         kvh,            s.head_dim,   s.num_slots};
    const int64_t ld = s.num_slots + 5;
    std::vector<float> out(s.rows * ld, std::nanf(""));
    const float scale = 0.125f;
    PagedKeyLogits(keys, q.data(), s.head_dim + 3, s.rows, scale, out.data(), ld);
    for (int64_t r = 0; r < s.rows; ++r) {
      for (int64_t j = 0; j < s.num_slots; ++j) {
        const float* k = &k_cache[((table[j / s.block_size] * s.num_kv_heads + kvh) *
                                       s.block_size +
                                   j % s.block_size) *
                                  s.head_dim];
        double dot = 0;
        for (int64_t d = 0; d < s.head_dim; ++d) {
          dot += static_cast<double>(q[r * (s.head_dim + 3) + d]) * k[d];
        }
        ASSERT_NEAR(out[r * ld + j], dot * scale, 1e-4 * std::sqrt(s.head_dim))
            << "row " << r << " slot " << j;
      }
      for (int64_t j = s.num_slots; j < ld; ++j) ASSERT_TRUE(std::isnan(out[r * ld + j]));
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, PagedKeyLogitsTest,
                         ::testing::Values(LogitShape{1, 16, 1, 64, 1},
                                           LogitShape{17, 16, 3, 64, 5},
                                           LogitShape{1000, 16, 2, 128, 33},
                                           LogitShape{250, 7, 4, 64, 8},
                                           LogitShape{37, 40, 1, 96, 3}));

TEST(MaskedSoftmaxRows, NormalisesOverMaskedPrefix) {
  std::mt19937 rng(3);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  for (int64_t n : {1, 17, 300, 1031}) {
    const int64_t rows = 6, ld = n + 2;
    std::vector<float> x(rows * ld);
    for (float& v : x) v = normal(rng);
    std::vector<uint8_t> mask(n);
    for (auto& m : mask) m = rng() % 4 != 0;
    std::vector<int64_t> row_len(rows);
    for (int64_t r = 0; r < rows; ++r) row_len[r] = r == 0 ? n : static_cast<int64_t>(rng() % (n + 1));
    const std::vector<float> in = x;
    MaskedSoftmaxRows(x.data(), rows, n, ld, mask.data(), row_len.data());
    for (int64_t r = 0; r < rows; ++r) {
      double m = -1e300, z = 0;
      for (int64_t j = 0; j < row_len[r]; ++j) {
        if (mask[j]) m = std::max<double>(m, in[r * ld + j]);
      }
      for (int64_t j = 0; j < row_len[r]; ++j) {
        if (mask[j]) z += std::exp(in[r * ld + j] - m);
      }
      for (int64_t j = 0; j < n; ++j) {
        const double want = j < row_len[r] && mask[j] ? std::exp(in[r * ld + j] - m) / z : 0.0;
        ASSERT_NEAR(x[r * ld + j], want, 1e-6 + 1e-5 * want) << "n " << n << " row " << r;
      }
    }
  }
}

TEST(MaskedSoftmaxRows, EmptyRowBecomesZero) {
  std::vector<float> x = {1.0f, 2.0f, 3.0f};
  const std::vector<uint8_t> mask = {0, 0, 0};
  MaskedSoftmaxRows(x.data(), 1, 3, 3, mask.data(), nullptr);
  EXPECT_EQ(x, std::vector<float>({0.0f, 0.0f, 0.0f}));
}

TEST(FuseRows, GroupMaxThenSumOrMax) {
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> uniform(0.0f, 1.0f);
  for (int64_t n : {1, 19, 700}) {
    for (int64_t group : {1, 3, 4}) {
      const int64_t rows = group * 5, ld = n + 1;
      std::vector<float> x(rows * ld);
      for (float& v : x) v = uniform(rng);
      for (bool max_fusion : {false, true}) {
        std::vector<float> got(n, std::nanf(""));
        FuseRows(x.data(), rows, group, n, ld, max_fusion, got.data());
        for (int64_t j = 0; j < n; ++j) {
          double want = 0;
          for (int64_t g = 0; g < rows; g += group) {
            double gm = 0;
            for (int64_t r = g; r < g + group; ++r) gm = std::max<double>(gm, x[r * ld + j]);
            want = max_fusion ? std::max(want, gm) : want + gm;
          }
          ASSERT_NEAR(got[j], want, 1e-5) << "n " << n << " group " << group;
        }
      }
    }
  }
}

TEST(Exp, MatchesStdExp) {
  std::vector<float> x;
  for (float v = -100.0f; v < 88.0f; v += 0.0137f) x.push_back(v);
  std::vector<float> y(x.size());
  Exp(x.data(), y.data(), static_cast<int64_t>(x.size()));
  for (size_t i = 0; i < x.size(); ++i) {
    if (x[i] < -87.0f) {
      ASSERT_EQ(y[i], 0.0f);
      continue;
    }
    const double want = std::exp(static_cast<double>(x[i]));
    ASSERT_NEAR(y[i], want, 4e-7 * want) << x[i];
  }
}

}  // namespace
}  // namespace morphserve::kernels
