#include "engine/sampler/sampler.h"

#include <cmath>
#include <map>
#include <set>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace morphserve::engine {
namespace {

using ::testing::HasSubstr;

SamplingParams Seeded(float temperature, uint64_t seed = 42) {
  SamplingParams p;
  p.temperature = temperature;
  p.seed = seed;
  return p;
}

std::vector<double> Softmax(const std::vector<float>& logits, float temperature) {
  double m = -1e30;
  for (float l : logits) m = std::max(m, static_cast<double>(l) / temperature);
  std::vector<double> p;
  double sum = 0;
  for (float l : logits) sum += std::exp(l / temperature - m);
  for (float l : logits) p.push_back(std::exp(l / temperature - m) / sum);
  return p;
}

TEST(SamplerTest, GreedyPicksTheLargestAndTheLowerIdOnTies) {
  SamplingParams p;
  p.temperature = 0;
  Sampler s(p, {});
  std::vector<float> logits = {0.1f, 2.0f, -1.0f, 2.0f};
  EXPECT_EQ(s.Sample(logits).token, 1);
}

TEST(SamplerTest, SameSeedSameTokensDifferentSeedDifferentTokens) {
  const std::vector<float> base = {0.5f, 0.4f, 0.3f, 0.2f, 0.1f, 0.0f, -0.1f, -0.2f};
  auto draw = [&](uint64_t seed) {
    Sampler s(Seeded(1.0f, seed), {});
    std::vector<int32_t> out;
    for (int i = 0; i < 64; ++i) {
      std::vector<float> l = base;
      out.push_back(s.Sample(l).token);
    }
    return out;
  };
  EXPECT_EQ(draw(7), draw(7));
  EXPECT_NE(draw(7), draw(8));
}

TEST(SamplerTest, FrequenciesFollowTheTemperedSoftmax) {
  const std::vector<float> base = {1.0f, 0.5f, 0.0f, -0.5f, -3.0f};
  const float temperature = 0.7f;
  const std::vector<double> p = Softmax(base, temperature);
  Sampler s(Seeded(temperature, 3), {});
  const int n = 40000;
  std::vector<int> counts(base.size());
  for (int i = 0; i < n; ++i) {
    std::vector<float> l = base;
    ++counts[s.Sample(l).token];
  }
  double chi2 = 0;
  for (size_t i = 0; i < base.size(); ++i) {
    const double e = p[i] * n;
    chi2 += (counts[i] - e) * (counts[i] - e) / e;
  }
  EXPECT_LT(chi2, 20.5);  // 4 degrees of freedom: p < 0.0005 for a correct sampler
}

TEST(SamplerTest, TopKKeepsOnlyTheKMostLikely) {
  SamplingParams p = Seeded(5.0f);
  p.top_k = 3;
  Sampler s(p, {});
  std::set<int32_t> seen;
  for (int i = 0; i < 2000; ++i) {
    std::vector<float> l = {0.0f, 3.0f, 1.0f, 2.9f, 2.8f, -1.0f};
    seen.insert(s.Sample(l).token);
  }
  EXPECT_EQ(seen, (std::set<int32_t>{1, 3, 4}));
}

TEST(SamplerTest, TopPKeepsTheSmallestNucleus) {
  // Probabilities 0.5, 0.3, 0.15, 0.05 (temperature 1): top_p 0.75 keeps two.
  const std::vector<float> base = {std::log(0.5f), std::log(0.3f), std::log(0.15f),
                                   std::log(0.05f)};
  SamplingParams p = Seeded(1.0f);
  p.top_p = 0.75f;
  Sampler s(p, {});
  std::map<int32_t, int> counts;
  for (int i = 0; i < 4000; ++i) {
    std::vector<float> l = base;
    ++counts[s.Sample(l).token];
  }
  EXPECT_EQ(counts.size(), 2u);
  EXPECT_NEAR(counts[0] / 4000.0, 0.5 / 0.8, 0.03);
}

TEST(SamplerTest, MinPDropsTokensBelowTheFractionOfTheBest) {
  const std::vector<float> base = {std::log(0.6f), std::log(0.25f), std::log(0.1f),
                                   std::log(0.05f)};
  SamplingParams p = Seeded(1.0f);
  p.min_p = 0.2f;  // threshold 0.12: keeps ids 0 and 1
  Sampler s(p, {});
  std::set<int32_t> seen;
  for (int i = 0; i < 3000; ++i) {
    std::vector<float> l = base;
    seen.insert(s.Sample(l).token);
  }
  EXPECT_EQ(seen, (std::set<int32_t>{0, 1}));
}

TEST(SamplerTest, RepetitionPenaltyCoversPromptAndOutput) {
  SamplingParams p;
  p.temperature = 0;
  p.repetition_penalty = 2.0f;
  const std::vector<int32_t> prompt = {0};
  Sampler s(p, prompt);
  std::vector<float> l = {3.0f, 2.0f, 1.0f};  // 0 is penalised to 1.5
  EXPECT_EQ(s.Sample(l).token, 1);
  l = {3.0f, 2.0f, 1.2f};  // now 0 -> 1.5, 1 -> 1.0
  EXPECT_EQ(s.Sample(l).token, 0);
  // Negative logits are multiplied, pushing them further down.
  SamplingParams q;
  q.temperature = 0;
  q.repetition_penalty = 2.0f;
  const std::vector<int32_t> prompt2 = {1};
  Sampler s2(q, prompt2);
  std::vector<float> neg = {-1.5f, -1.0f};
  EXPECT_EQ(s2.Sample(neg).token, 0);
}

TEST(SamplerTest, PresenceAndFrequencyPenaltiesCountOutputTokens) {
  SamplingParams p;
  p.temperature = 0;
  p.frequency_penalty = 0.4f;
  Sampler s(p, {});
  std::vector<int32_t> out;
  for (int i = 0; i < 6; ++i) {
    std::vector<float> l = {1.0f, 0.5f};
    out.push_back(s.Sample(l).token);
  }
  // Token 0 is chosen until 1.0 - 0.4 * count drops below 0.5, and so on.
  EXPECT_EQ(out, (std::vector<int32_t>{0, 0, 1, 0, 1, 0}));
  SamplingParams q;
  q.temperature = 0;
  q.presence_penalty = 1.0f;
  Sampler s2(q, {});
  std::vector<float> l1 = {1.0f, 0.5f};
  std::vector<float> l2 = {1.0f, 0.5f};
  EXPECT_EQ(s2.Sample(l1).token, 0);
  EXPECT_EQ(s2.Sample(l2).token, 1);
}

TEST(SamplerTest, LogprobsAreThoseOfTheRawDistribution) {
  SamplingParams p;
  p.temperature = 0;
  p.logprobs = 3;
  p.repetition_penalty = 1.5f;
  const std::vector<int32_t> prompt = {2};
  Sampler s(p, prompt);
  const std::vector<float> raw = {0.1f, 1.0f, 2.0f, 0.5f};
  std::vector<float> l = raw;
  const SampleResult r = s.Sample(l);
  double lse = 0;
  for (float v : raw) lse += std::exp(v);
  lse = std::log(lse);
  EXPECT_EQ(r.token, 2);  // 2.0 / 1.5 = 1.33 still the largest
  EXPECT_NEAR(r.logprob, 2.0 - lse, 1e-5);
  ASSERT_EQ(r.top.size(), 3u);
  EXPECT_EQ(r.top[0].id, 2);
  EXPECT_EQ(r.top[1].id, 1);
  EXPECT_EQ(r.top[2].id, 3);
  EXPECT_NEAR(r.top[1].logprob, 1.0 - lse, 1e-5);
}

TEST(SamplerTest, DistributionIsWhatSampleDrawsFrom) {
  // Probabilities 0.5, 0.3, 0.15, 0.05 at temperature 1; top_p 0.9 keeps
  // three, 0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95.
  const std::vector<float> base = {std::log(0.15f), std::log(0.5f), std::log(0.05f),
                                   std::log(0.3f)};
  SamplingParams p = Seeded(1.0f);
  p.top_p = 0.9f;
  Sampler s(p, {});
  std::map<int32_t, double> dist;
  for (const TokenProb& t : s.Distribution(base)) dist[t.id] = t.prob;
  ASSERT_EQ(dist.size(), 3u);
  EXPECT_NEAR(dist[1], 0.5 / 0.95, 1e-6);
  EXPECT_NEAR(dist[3], 0.3 / 0.95, 1e-6);
  EXPECT_NEAR(dist[0], 0.15 / 0.95, 1e-6);
  std::map<int32_t, int> counts;
  for (int i = 0; i < 4000; ++i) {
    std::vector<float> l = base;
    ++counts[s.Sample(l).token];
  }
  for (const auto& [id, n] : counts) EXPECT_NEAR(n / 4000.0, dist[id], 0.03) << id;

  // Greedy, and the output penalties of what Sample recorded.
  SamplingParams g;
  g.temperature = 0;
  g.presence_penalty = 1.0f;
  Sampler greedy(g, {});
  std::vector<float> l = {1.0f, 0.5f};
  EXPECT_EQ(greedy.Sample(l).token, 0);
  const std::vector<TokenProb> next = greedy.Distribution(std::vector<float>{1.0f, 0.5f});
  ASSERT_EQ(next.size(), 1u);
  EXPECT_EQ(next[0].id, 1);
  EXPECT_EQ(next[0].prob, 1.0);
}

TEST(SamplingParamsTest, ValidationNamesTheField) {
  SamplingParams p;
  p.temperature = -1;
  EXPECT_THAT(p.Validate().message(), HasSubstr("temperature"));
  p = {};
  p.temperature = std::nanf("");
  EXPECT_THAT(p.Validate().message(), HasSubstr("temperature"));
  p = {};
  p.top_p = 0;
  EXPECT_THAT(p.Validate().message(), HasSubstr("top_p"));
  p = {};
  p.top_p = 1.5f;
  EXPECT_THAT(p.Validate().message(), HasSubstr("top_p"));
  p = {};
  p.top_k = -2;
  EXPECT_THAT(p.Validate().message(), HasSubstr("top_k"));
  p = {};
  p.min_p = 2;
  EXPECT_THAT(p.Validate().message(), HasSubstr("min_p"));
  p = {};
  p.repetition_penalty = 0;
  EXPECT_THAT(p.Validate().message(), HasSubstr("repetition_penalty"));
  p = {};
  p.logprobs = 100;
  EXPECT_THAT(p.Validate().message(), HasSubstr("logprobs"));
  EXPECT_TRUE(SamplingParams{}.Validate().ok());
}

}  // namespace
}  // namespace morphserve::engine
