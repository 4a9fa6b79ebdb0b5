// The fidelity metrics on hand-computed cases.
#include "server/cli/fidelity.h"

#include <cmath>
#include <vector>

#include "gtest/gtest.h"

namespace morphserve::cli {
namespace {

TEST(FidelityTest, LogSoftmaxAndKl) {
  std::vector<float> p = {1.0f, 2.0f, 3.0f};
  LogSoftmax(p);
  double z = 0;
  for (float x : p) z += std::exp(x);
  EXPECT_NEAR(z, 1.0, 1e-6);
  EXPECT_NEAR(p[2] - p[1], 1.0f, 1e-6);
  EXPECT_NEAR(KlDivergence(p, p), 0.0, 1e-9);
  // KL([.5 .5] || [.25 .75]) = .5 ln 2 + .5 ln(2/3).
  const std::vector<float> a = {std::log(0.5f), std::log(0.5f)};
  const std::vector<float> b = {std::log(0.25f), std::log(0.75f)};
  EXPECT_NEAR(KlDivergence(a, b), 0.5 * std::log(2.0) + 0.5 * std::log(2.0 / 3.0), 1e-6);
  EXPECT_GT(KlDivergence(b, a), 0.0);
}

TEST(FidelityTest, GreedySkipsBannedTokensAndPrefersTheLowerId) {
  const std::vector<float> logits = {0.0f, 5.0f, 5.0f, 9.0f};
  EXPECT_EQ(GreedyToken(logits, {}), 3);
  const std::vector<int32_t> banned = {3};
  EXPECT_EQ(GreedyToken(logits, banned), 1);
}

TEST(FidelityTest, StatsCountTheFirstDivergencePerPrompt) {
  FidelityStats s;
  const std::vector<float> same = {std::log(0.9f), std::log(0.1f)};
  const std::vector<float> off = {std::log(0.4f), std::log(0.6f)};
  s.BeginPrompt();
  s.AddStep(same, same, 0, 0, 10, 20);
  s.AddStep(same, off, 0, 1, 10, 20);  // first divergence after 1 token
  s.AddStep(same, same, 0, 0, 10, 20);
  s.AddStep(same, off, 0, 1, 10, 20);
  s.EndPrompt(4);
  s.BeginPrompt();
  s.AddStep(same, same, 0, 0, 30, 30);
  s.EndPrompt(1);  // never diverged: the whole reference
  EXPECT_EQ(s.divergence, (std::vector<int64_t>{1, 1}));
  EXPECT_EQ(s.tokens, 5);
  EXPECT_NEAR(s.top1_agreement(), 3.0 / 5.0, 1e-12);
  EXPECT_NEAR(s.mean_kl(), 2.0 * KlDivergence(same, off) / 5.0, 1e-9);
  EXPECT_NEAR(s.perplexity(), std::exp((3 * -std::log(0.9) + 2 * -std::log(0.4)) / 5.0), 1e-4);
  EXPECT_NEAR(s.reference_perplexity(), std::exp(-std::log(0.9)), 1e-4);
  EXPECT_NEAR(s.kv_fraction(), 70.0 / 110.0, 1e-12);
  EXPECT_EQ(s.median_divergence(), 1.0);
}

}  // namespace
}  // namespace morphserve::cli
