#include "kernels/cpu/elementwise.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <vector>

namespace morphserve::kernels {
namespace {

constexpr int64_t kSizes[] = {1, 2, 7, 8, 9, 31, 576, 1537};

std::vector<float> RandomVector(int64_t n, float scale, std::mt19937& rng) {
  std::uniform_real_distribution<float> uniform(-scale, scale);
  std::vector<float> v(static_cast<size_t>(n));
  for (float& x : v) x = uniform(rng);
  return v;
}

std::vector<double> RmsNormDouble(const std::vector<float>& x, const std::vector<float>& w,
                                  double eps) {
  double ss = 0.0;
  for (float v : x) ss += double{v} * v;
  const double scale = 1.0 / std::sqrt(ss / static_cast<double>(x.size()) + eps);
  std::vector<double> out(x.size());
  for (size_t i = 0; i < x.size(); ++i) out[i] = x[i] * scale * w[i];
  return out;
}

TEST(ElementwiseTest, RmsNormMatchesDouble) {
  std::mt19937 rng(1);
  for (int64_t n : kSizes) {
    const std::vector<float> x = RandomVector(n, 3.0f, rng);
    const std::vector<float> w = RandomVector(n, 2.0f, rng);
    const std::vector<double> expected = RmsNormDouble(x, w, 1e-5);
    std::vector<float> out(x.size());
    RmsNorm(x.data(), w.data(), 1e-5f, n, out.data());
    for (int64_t i = 0; i < n; ++i) {
      EXPECT_NEAR(out[i], expected[i], 1e-5 * (1.0 + std::fabs(expected[i])))
          << "n=" << n << " i=" << i;
    }
    // In place.
    std::vector<float> inplace = x;
    RmsNorm(inplace.data(), w.data(), 1e-5f, n, inplace.data());
    EXPECT_EQ(inplace, out) << "n=" << n;
  }
}

TEST(ElementwiseTest, RmsNormEpsilonDominatesZeroInput) {
  const std::vector<float> x(5, 0.0f);
  const std::vector<float> w(5, 1.0f);
  std::vector<float> out(5, 1.0f);
  RmsNorm(x.data(), w.data(), 1e-6f, 5, out.data());
  for (float v : out) EXPECT_EQ(v, 0.0f);
}

TEST(ElementwiseTest, AddRmsNormUpdatesResidual) {
  std::mt19937 rng(2);
  for (int64_t n : kSizes) {
    std::vector<float> residual = RandomVector(n, 1.0f, rng);
    const std::vector<float> delta = RandomVector(n, 1.0f, rng);
    const std::vector<float> w = RandomVector(n, 1.0f, rng);
    std::vector<float> sum(residual.size());
    for (size_t i = 0; i < sum.size(); ++i) sum[i] = residual[i] + delta[i];
    const std::vector<double> expected = RmsNormDouble(sum, w, 1e-6);
    std::vector<float> out(residual.size());
    AddRmsNorm(residual.data(), delta.data(), w.data(), 1e-6f, n, out.data());
    EXPECT_EQ(residual, sum);
    for (int64_t i = 0; i < n; ++i) {
      EXPECT_NEAR(out[i], expected[i], 1e-5 * (1.0 + std::fabs(expected[i]))) << "n=" << n;
    }
  }
}

TEST(ElementwiseTest, SiluMulMatchesDouble) {
  std::mt19937 rng(3);
  for (int64_t n : kSizes) {
    std::vector<float> gate = RandomVector(n, 12.0f, rng);
    const std::vector<float> up = RandomVector(n, 2.0f, rng);
    if (n > 4) {
      gate[0] = 95.0f;   // exp(-g) underflows
      gate[1] = -95.0f;  // exp(-g) overflows
      gate[2] = 0.0f;
      gate[3] = -87.5f;
    }
    std::vector<float> out(gate.size());
    SiluMul(gate.data(), up.data(), n, out.data());
    for (int64_t i = 0; i < n; ++i) {
      const double g = gate[i];
      const double expected = g / (1.0 + std::exp(-g)) * up[i];
      EXPECT_NEAR(out[i], expected, 2e-6 * (1.0 + std::fabs(expected))) << "g=" << g;
    }
    // Aliasing the output with either input.
    std::vector<float> alias_gate = gate;
    SiluMul(alias_gate.data(), up.data(), n, alias_gate.data());
    EXPECT_EQ(alias_gate, out);
    std::vector<float> alias_up = up;
    SiluMul(gate.data(), alias_up.data(), n, alias_up.data());
    EXPECT_EQ(alias_up, out);
  }
}

TEST(ElementwiseTest, Add) {
  std::mt19937 rng(4);
  for (int64_t n : kSizes) {
    std::vector<float> x = RandomVector(n, 1.0f, rng);
    const std::vector<float> y = RandomVector(n, 1.0f, rng);
    const std::vector<float> x0 = x;
    Add(x.data(), y.data(), n);
    for (int64_t i = 0; i < n; ++i) EXPECT_EQ(x[i], x0[i] + y[i]);
  }
}

TEST(ElementwiseTest, SoftmaxMatchesDoubleAndReturnsLogSumExp) {
  std::mt19937 rng(5);
  for (int64_t n : kSizes) {
    std::vector<float> x = RandomVector(n, 20.0f, rng);
    const std::vector<float> x0 = x;
    double max = -1e300;
    for (float v : x0) max = std::max(max, double{v});
    double sum = 0.0;
    for (float v : x0) sum += std::exp(v - max);
    const double lse = max + std::log(sum);
    const float result = SoftmaxInPlace(x.data(), n);
    EXPECT_NEAR(result, lse, 1e-5 * (1.0 + std::fabs(lse))) << "n=" << n;
    double total = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      const double expected = std::exp(x0[i] - lse);
      EXPECT_NEAR(x[i], expected, 1e-6 + 1e-5 * expected) << "n=" << n << " i=" << i;
      total += x[i];
    }
    EXPECT_NEAR(total, 1.0, 1e-5);
  }
}

TEST(ElementwiseTest, SoftmaxHandlesNegativeInfinity) {
  const float inf = std::numeric_limits<float>::infinity();
  std::vector<float> x = {-inf, 1.0f, -inf, 1.0f, -inf, -inf, -inf, -inf, -inf, 0.5f};
  const float lse = SoftmaxInPlace(x.data(), static_cast<int64_t>(x.size()));
  const double expected_lse = 1.0 + std::log(2.0 + std::exp(-0.5));
  EXPECT_NEAR(lse, expected_lse, 1e-6);
  for (size_t i : {0u, 2u, 4u, 5u, 6u, 7u, 8u}) EXPECT_EQ(x[i], 0.0f) << i;
  EXPECT_NEAR(x[1], std::exp(1.0 - expected_lse), 1e-7);
  EXPECT_EQ(x[1], x[3]);
  EXPECT_NEAR(x[9], std::exp(0.5 - expected_lse), 1e-7);

  // Large logits: no overflow.
  std::vector<float> big = {1000.0f, 999.0f, -1000.0f};
  const float big_lse = SoftmaxInPlace(big.data(), 3);
  EXPECT_NEAR(big_lse, 1000.0 + std::log(1.0 + std::exp(-1.0)), 1e-3);
  EXPECT_NEAR(big[0] + big[1], 1.0f, 1e-6);
  EXPECT_EQ(big[2], 0.0f);
}

TEST(ElementwiseTest, SoftmaxOfOnlyNegativeInfinityIsUniform) {
  const float inf = std::numeric_limits<float>::infinity();
  std::vector<float> x(3, -inf);
  EXPECT_EQ(SoftmaxInPlace(x.data(), 3), -inf);
  for (float v : x) EXPECT_FLOAT_EQ(v, 1.0f / 3.0f);
}

TEST(ElementwiseTest, LogSumExpMatchesDoubleAndLeavesInputAlone) {
  std::mt19937 rng(6);
  for (int64_t n : {1, 2, 7, 8, 9, 31, 576, 1537, 49157}) {
    const std::vector<float> x = RandomVector(n, 30.0f, rng);
    double max = -1e300;
    for (float v : x) max = std::max(max, double{v});
    double sum = 0.0;
    for (float v : x) sum += std::exp(v - max);
    const double lse = max + std::log(sum);
    const std::vector<float> before = x;
    EXPECT_NEAR(LogSumExp(x.data(), n), lse, 1e-6 * (1.0 + std::fabs(lse))) << "n=" << n;
    EXPECT_EQ(x, before);
  }
  const float inf = std::numeric_limits<float>::infinity();
  const std::vector<float> all_neg_inf(9, -inf);
  EXPECT_EQ(LogSumExp(all_neg_inf.data(), 9), -inf);
  const std::vector<float> with_inf = {0.0f, inf, 1.0f};
  EXPECT_EQ(LogSumExp(with_inf.data(), 3), inf);
  const std::vector<float> big = {1000.0f, 999.0f, -1000.0f, -inf};
  EXPECT_NEAR(LogSumExp(big.data(), 4), 1000.0 + std::log(1.0 + std::exp(-1.0)), 1e-3);
}

TEST(ElementwiseTest, ArgMaxIsTheFirstLargestIgnoringNan) {
  std::mt19937 rng(7);
  for (int64_t n : {1, 2, 7, 8, 9, 31, 576, 1537, 49157}) {
    std::vector<float> x = RandomVector(n, 10.0f, rng);
    // The maximum at a random place, repeated later: the first one wins.
    std::uniform_int_distribution<int64_t> at(0, n - 1);
    const int64_t i = at(rng);
    x[static_cast<size_t>(i)] = 11.0f;
    for (int64_t j = i + 1; j < n; j += 3) x[static_cast<size_t>(j)] = 11.0f;
    EXPECT_EQ(ArgMax(x.data(), n), i) << "n=" << n;
  }
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  const std::vector<float> with_nan = {nan, 1.0f, nan, 3.0f, 2.0f, nan, 3.0f, 0.0f, nan, -1.0f};
  EXPECT_EQ(ArgMax(with_nan.data(), 10), 3);
  const std::vector<float> neg_inf = {-inf, -inf, -inf};
  EXPECT_EQ(ArgMax(neg_inf.data(), 3), 0);
  const std::vector<float> only_nan = {nan, nan};
  EXPECT_EQ(ArgMax(only_nan.data(), 2), 0);
  EXPECT_EQ(ArgMax(nullptr, 0), 0);
}

// Reference rotation written directly from the definition.
void RopeReference(std::vector<double>& x, int64_t n_heads, int64_t head_dim, int64_t rot_dim,
                   int64_t pos, const std::vector<float>& inv_freq, RopeStyle style) {
  for (int64_t h = 0; h < n_heads; ++h) {
    double* v = x.data() + h * head_dim;
    for (int64_t i = 0; i < rot_dim / 2; ++i) {
      const double theta = static_cast<float>(pos) * inv_freq[static_cast<size_t>(i)];
      const int64_t a = style == RopeStyle::kAdjacent ? 2 * i : i;
      const int64_t b = style == RopeStyle::kAdjacent ? 2 * i + 1 : i + rot_dim / 2;
      const double xa = v[a];
      const double xb = v[b];
      v[a] = xa * std::cos(theta) - xb * std::sin(theta);
      v[b] = xa * std::sin(theta) + xb * std::cos(theta);
    }
  }
}

TEST(ElementwiseTest, RopeBothStylesMatchReference) {
  std::mt19937 rng(6);
  struct Shape {
    int64_t n_heads, head_dim, rot_dim;
  };
  for (const Shape& s : {Shape{1, 2, 2}, Shape{3, 64, 64}, Shape{9, 64, 32}, Shape{2, 128, 96}}) {
    std::vector<float> inv_freq(static_cast<size_t>(s.rot_dim / 2));
    for (size_t i = 0; i < inv_freq.size(); ++i) {
      inv_freq[i] =
          static_cast<float>(std::pow(10000.0, -2.0 * static_cast<double>(i) / s.rot_dim));
    }
    for (RopeStyle style : {RopeStyle::kAdjacent, RopeStyle::kHalf}) {
      for (int64_t pos : {0, 1, 17, 4095}) {
        const std::vector<float> x0 = RandomVector(s.n_heads * s.head_dim, 1.0f, rng);
        std::vector<float> x = x0;
        ApplyRope(x.data(), s.n_heads, s.head_dim, s.rot_dim, pos, inv_freq.data(), style);
        std::vector<double> expected(x0.begin(), x0.end());
        RopeReference(expected, s.n_heads, s.head_dim, s.rot_dim, pos, inv_freq, style);
        for (size_t i = 0; i < x.size(); ++i) {
          const int64_t dim = static_cast<int64_t>(i) % s.head_dim;
          if (dim >= s.rot_dim) {
            EXPECT_EQ(x[i], x0[i]) << "tail changed at " << i;
          } else {
            EXPECT_NEAR(x[i], expected[i], 2e-6) << "pos=" << pos << " i=" << i;
          }
        }
      }
    }
  }
}

TEST(ElementwiseTest, RopeStylesPairDifferentElements) {
  // One head of 4 with only x[1] set, rotated by 90 degrees.
  const float inv_freq[2] = {1.0f, 1.0f};
  const int64_t pos = 0;
  std::vector<float> adjacent = {0.0f, 1.0f, 0.0f, 0.0f};
  std::vector<float> half = adjacent;
  const float quarter[2] = {static_cast<float>(M_PI / 2), static_cast<float>(M_PI / 2)};
  ApplyRope(adjacent.data(), 1, 4, 4, 1, quarter, RopeStyle::kAdjacent);
  ApplyRope(half.data(), 1, 4, 4, 1, quarter, RopeStyle::kHalf);
  // Adjacent: (x0, x1) = (0, 1) -> (-1, 0).
  EXPECT_NEAR(adjacent[0], -1.0f, 1e-6);
  EXPECT_NEAR(adjacent[1], 0.0f, 1e-6);
  // Half: (x1, x3) = (1, 0) -> (0, 1).
  EXPECT_NEAR(half[1], 0.0f, 1e-6);
  EXPECT_NEAR(half[3], 1.0f, 1e-6);
  // Position 0 is the identity.
  std::vector<float> same = {0.3f, -0.7f, 1.5f, 2.0f};
  const std::vector<float> before = same;
  ApplyRope(same.data(), 1, 4, 4, pos, inv_freq, RopeStyle::kHalf);
  EXPECT_EQ(same, before);
}

}  // namespace
}  // namespace morphserve::kernels
