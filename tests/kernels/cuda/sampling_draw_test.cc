// GPU sampling beyond the per-vocabulary checks of sampling_test.cc: cuts
// inside runs of equal logits, seeds that give a row the same token
// anywhere in a batch, draw frequencies against the CPU's probabilities
// (a chi-squared test), recorded tokens driving the penalties as on the
// CPU, rows of -inf, the race's noise, and the argument checks.
#include <gtest/gtest.h>

#include "kernels/cuda/sampling.h"
#include "tests/kernels/cuda/sampling_test_util.h"

namespace morphserve::kernels::cuda::sampling_test {
namespace {

TEST_F(SamplingTest, CutsInsideRunsOfEqualValuesGoToTheLowerIds) {
  // Eight candidates of equal value at scattered ids, the rest at -inf:
  // each filter's cut falls inside the run, exactly on a boundary of
  // top_p's mass or of min_p's threshold.
  const int64_t vocab = 777;
  std::mt19937 rng(11);
  std::vector<float> logits(vocab, -kInf);
  for (int64_t id : {3, 40, 41, 200, 333, 500, 640, 776}) logits[id] = 1.5f;
  Batch b(vocab);
  auto add = [&](int32_t k, float p, float min_p) {
    Request q;
    q.params.temperature = 0.7f;
    q.params.top_k = k;
    q.params.top_p = p;
    q.params.min_p = min_p;
    q.params.logprobs = 10;
    q.seed = 3;
    b.Add(q, logits, rng);
  };
  add(3, 1.0f, 0.0f);   // the three lowest ids
  add(0, 0.5f, 0.0f);   // mass before the fifth is exactly half: four kept
  add(0, 0.25f, 0.0f);  // two kept
  add(0, 1.0f, 1.0f);   // every token tied with the best: all eight
  add(6, 0.5f, 1.0f);   // half the top-6 mass: three
  ASSERT_OK_AND_ASSIGN(const DeviceOut out, Run(b, true));
  const std::vector<int> kept = {3, 4, 2, 8, 3};
  for (int64_t r = 0; r < b.size(); ++r) {
    CheckRow(b, out, r);
    const std::span<const float> probs =
        std::span<const float>(out.probs).subspan(r * (vocab + 1), vocab);
    EXPECT_EQ(std::count_if(probs.begin(), probs.end(), [](float x) { return x > 0.0f; }), kept[r])
        << "row " << r;
  }
}

TEST_F(SamplingTest, SameSeedAndStepGiveTheSameTokenAnywhereInTheBatch) {
  const int64_t vocab = 3001;
  std::mt19937 rng(5);
  Request q;
  q.params.temperature = 1.2f;
  q.params.top_p = 0.97f;
  q.seed = 0x0123456789abcdefull;
  const std::vector<float> logits = RandomLogits(vocab, 1.0f, 0.0f, rng);
  std::vector<int32_t> tokens;
  for (uint64_t step = 0; step < 6; ++step) {
    q.step = step;
    // Alone, then at rows 0, 3 and 6 of a batch of others.
    Batch alone(vocab);
    alone.Add(q, logits, rng);
    ASSERT_OK_AND_ASSIGN(const DeviceOut one, Run(alone, false));
    Batch mixed(vocab);
    for (int r = 0; r < 7; ++r) {
      if (r % 3 == 0) {
        mixed.Add(q, logits, rng);
        continue;
      }
      Request other;
      other.params.temperature = r % 2 == 0 ? 0.0f : 0.9f;
      other.params.top_k = 5;
      other.seed = q.seed + r;
      other.step = step;
      mixed.Add(other, RandomLogits(vocab, 1.0f, 0.0f, rng), rng);
    }
    ASSERT_OK_AND_ASSIGN(const DeviceOut many, Run(mixed, false));
    EXPECT_EQ(many.tokens[0], one.tokens[0]) << "step " << step;
    EXPECT_EQ(many.tokens[3], one.tokens[0]) << "step " << step;
    EXPECT_EQ(many.tokens[6], one.tokens[0]) << "step " << step;
    tokens.push_back(one.tokens[0]);
    for (int64_t r = 0; r < mixed.size(); ++r) CheckRow(mixed, many, r);
  }
  // The steps draw afresh: six draws from a wide distribution differ.
  std::sort(tokens.begin(), tokens.end());
  EXPECT_GT(std::unique(tokens.begin(), tokens.end()) - tokens.begin(), 3);
}

TEST_F(SamplingTest, DrawFrequenciesFollowTheCpuProbabilities) {
  // One request drawn at 1500 steps; the counts against the CPU's
  // probabilities by a chi-square bound. The seed is fixed, so this is
  // deterministic; a correct sampler lands far inside the bound.
  const int64_t vocab = 211;
  std::mt19937 rng(8);
  Request q;
  q.params.temperature = 1.3f;
  q.params.top_k = 12;
  q.params.top_p = 0.95f;
  q.params.min_p = 0.02f;
  q.seed = 77;
  const std::vector<float> logits = RandomLogits(vocab, 1.0f, 0.0f, rng);
  Batch b(vocab);
  const int draws = 1500;
  for (int i = 0; i < draws; ++i) {
    q.step = 1000 + i;
    b.Add(q, logits, rng);
  }
  ASSERT_OK_AND_ASSIGN(const DeviceOut out, Run(b, false));
  Sampler cpu = CpuSampler(q, vocab);
  std::map<int32_t, double> probs;
  for (const TokenProb& t : cpu.Distribution(logits)) probs[t.id] = t.prob;
  ASSERT_GE(probs.size(), 4u);
  std::map<int32_t, int> counts;
  for (int32_t t : out.tokens) {
    ASSERT_TRUE(probs.count(t)) << "token " << t << " is not kept";
    ++counts[t];
  }
  double chi2 = 0.0;
  for (const auto& [id, p] : probs) {
    const double e = p * draws;
    chi2 += (counts[id] - e) * (counts[id] - e) / e;
  }
  // At most 11 degrees of freedom: 45 is beyond p = 1e-5.
  EXPECT_LT(chi2, 45.0) << probs.size() << " kept";
}

// The host side of recording: what the header says the host mirrors.
void MirrorRecord(std::vector<PenaltyEntry>& pool, SamplingRowParams& row, int32_t token) {
  for (int32_t i = 0; i < row.penalty_size; ++i) {
    if (pool[row.penalty_offset + i].token == token) {
      ++pool[row.penalty_offset + i].output_count;
      return;
    }
  }
  if (row.penalty_size < row.penalty_capacity) {
    pool[row.penalty_offset + row.penalty_size] = {token, 1};
    ++row.penalty_size;
  }
}

TEST_F(SamplingTest, RecordedTokensDrivePenaltiesAsOnTheCpu) {
  // Twelve steps with recording on. Greedy rows must follow the CPU token
  // for token; sampling rows must draw from the CPU's distribution, and
  // their tokens are forced into the CPU's history. The last row has no
  // room: its new tokens are dropped, as the host mirror expects.
  const int64_t vocab = 1031;
  const int steps = 12;
  std::mt19937 rng(9);
  std::vector<Request> requests(5);
  requests[0].params = Greedy(2);
  requests[0].params.repetition_penalty = 1.3f;
  requests[0].params.presence_penalty = 0.2f;
  requests[0].params.frequency_penalty = 0.3f;
  requests[0].prompt = RandomPrompt(20, 12, vocab, rng);
  requests[1].params = Greedy(0);
  requests[1].params.frequency_penalty = 0.25f;
  requests[2].params.temperature = 0.7f;
  requests[2].params.top_k = 6;
  requests[2].params.repetition_penalty = 1.5f;
  requests[2].params.presence_penalty = 0.5f;
  requests[2].prompt = RandomPrompt(10, 10, vocab, rng);
  requests[3].params.temperature = 1.0f;
  requests[3].params.top_p = 0.8f;
  requests[4].params = Greedy(0);
  requests[4].params.repetition_penalty = 1.4f;
  requests[4].prompt = RandomPrompt(5, 8, vocab, rng);
  for (size_t i = 0; i < requests.size(); ++i) requests[i].seed = 500 + i;

  // Logits where a handful of tokens are close, so that penalties matter.
  auto step_logits = [&]() {
    std::vector<float> l = RandomLogits(vocab, 0.5f, 0.0f, rng);
    for (int i = 0; i < 12; ++i) l[i] += 3.0f - 0.1f * static_cast<float>(i);
    return l;
  };
  Batch b(vocab);
  for (size_t i = 0; i < requests.size(); ++i) {
    b.Add(requests[i], step_logits(), rng, i + 1 == requests.size() ? 0 : steps);
  }
  std::vector<Sampler> cpu;
  for (const Request& q : requests) cpu.push_back(CpuSampler(q, vocab));
  std::vector<PenaltyEntry> mirror = b.entries;

  for (int step = 0; step < steps; ++step) {
    SCOPED_TRACE(absl::StrCat("step ", step));
    for (int64_t r = 0; r < b.size(); ++r) {
      const std::vector<float> l = step_logits();
      std::copy(l.begin(), l.end(), b.logits.begin() + r * b.stride);
      b.rows[r].step = static_cast<uint64_t>(step);
    }
    b.entries = mirror;
    ASSERT_OK_AND_ASSIGN(const DeviceOut out, Run(b, true, /*record=*/true));
    for (int64_t r = 0; r < b.size(); ++r) {
      SCOPED_TRACE(absl::StrCat("row ", r));
      const std::span<const float> logits = b.Logits(r);
      const int32_t token = out.tokens[r];
      ASSERT_TRUE(token >= 0 && token < vocab);
      if (r + 1 < b.size()) {
        EXPECT_TRUE(
            SameDistribution(std::span<const float>(out.probs).subspan(r * (vocab + 1), vocab),
                             cpu[r].Distribution(logits)));
        std::vector<float> scratch(logits.begin(), logits.end());
        if (requests[r].params.greedy()) {
          EXPECT_EQ(token, cpu[r].Sample(scratch).token);
        } else {
          std::fill(scratch.begin(), scratch.end(), -1e4f);
          scratch[token] = 1e4f;
          EXPECT_EQ(cpu[r].Sample(scratch).token, token);
        }
      }
      MirrorRecord(mirror, b.rows[r], token);
    }
    ASSERT_EQ(out.entries.size(), mirror.size());
    for (size_t i = 0; i < mirror.size(); ++i) {
      EXPECT_EQ(out.entries[i].token, mirror[i].token) << "entry " << i;
      EXPECT_EQ(out.entries[i].output_count, mirror[i].output_count) << "entry " << i;
    }
  }
  // The penalised greedy rows did not just repeat one token.
  EXPECT_GT(b.rows[0].penalty_size, static_cast<int32_t>(PenaltyList(requests[0], rng).size()));
}

TEST_F(SamplingTest, RowsWithEveryLogitAtMinusInfinityPickTokenZero) {
  const int64_t vocab = 300;
  std::mt19937 rng(10);
  Batch b(vocab);
  const std::vector<float> logits(vocab, -kInf);
  for (float temperature : {0.0f, 1.0f}) {
    Request q;
    q.params.temperature = temperature;
    q.params.top_p = 0.5f;
    b.Add(q, logits, rng);
  }
  ASSERT_OK_AND_ASSIGN(const DeviceOut out, Run(b, true));
  EXPECT_EQ(out.tokens, (std::vector<int32_t>{0, 0}));
  EXPECT_EQ(out.probs[0], 1.0f);
  EXPECT_EQ(out.probs[vocab + 1], 1.0f);
}

TEST(SamplingNoiseTest, RacesFollowTheProbabilities) {
  // The race with this noise over fixed log-probabilities, on the host:
  // frequencies by a chi-square bound over 60000 deterministic draws.
  const std::vector<double> p = {0.4, 0.25, 0.15, 0.1, 0.06, 0.03, 0.01};
  const int draws = 60000;
  std::vector<int> counts(p.size());
  for (int i = 0; i < draws; ++i) {
    const uint64_t seed = 12345 + static_cast<uint64_t>(i % 3);
    const uint64_t step = static_cast<uint64_t>(i / 3);
    int best = 0;
    double best_score = -kInf;
    for (size_t t = 0; t < p.size(); ++t) {
      const double score = std::log(p[t]) + SamplingNoise(seed, step, static_cast<int32_t>(t));
      if (score > best_score) {
        best_score = score;
        best = static_cast<int>(t);
      }
    }
    ++counts[best];
  }
  double chi2 = 0.0;
  for (size_t t = 0; t < p.size(); ++t) {
    const double e = p[t] * draws;
    chi2 += (counts[t] - e) * (counts[t] - e) / e;
  }
  EXPECT_LT(chi2, 30.0);  // 6 degrees of freedom: p < 1e-4 for a fair race
  // Seeds, steps and tokens all change the noise.
  EXPECT_NE(SamplingNoise(1, 2, 3), SamplingNoise(2, 2, 3));
  EXPECT_NE(SamplingNoise(1, 2, 3), SamplingNoise(1, 3, 3));
  EXPECT_NE(SamplingNoise(1, 2, 3), SamplingNoise(1, 2, 4));
  EXPECT_NE(SamplingNoise(1, uint64_t{2} << 32, 3), SamplingNoise(1, 2 + (uint64_t{2} << 32), 3));
}

TEST(SampleTokensArgsTest, RejectsBadArgumentsBeforeTouchingTheDevice) {
  // Fake device pointers: each call must fail before any launch.
  float* const f = reinterpret_cast<float*>(uintptr_t{256});
  int32_t* const i = reinterpret_cast<int32_t*>(uintptr_t{512});
  const auto* rows = reinterpret_cast<const SamplingRowParams*>(uintptr_t{1024});
  SamplingArgs good;
  good.logits = f;
  good.logits_stride = 100;
  good.num_rows = 2;
  good.vocab = 100;
  good.rows = rows;
  good.tokens = i;
  good.logprobs = f;
  struct Case {
    const char* what;
    SamplingArgs args;
  };
  std::vector<Case> cases;
  auto bad = [&](const char* what, auto&& change) {
    SamplingArgs a = good;
    change(a);
    cases.push_back({what, a});
  };
  bad("vocab", [](SamplingArgs& a) { a.vocab = 0; });
  bad("vocab", [](SamplingArgs& a) { a.vocab = kMaxSamplingVocab + 1; });
  bad("num_rows", [](SamplingArgs& a) { a.num_rows = -1; });
  bad("logits_stride", [](SamplingArgs& a) { a.logits_stride = 99; });
  bad("top_ids and top_logprobs", [&](SamplingArgs& a) { a.top_ids = i; });
  bad("top_stride", [&](SamplingArgs& a) {
    a.top_ids = i;
    a.top_logprobs = f;
    a.top_stride = kMaxLogprobs - 1;
  });
  bad("probs_stride", [&](SamplingArgs& a) {
    a.probs = f;
    a.probs_stride = 50;
  });
  bad("penalty_entries", [](SamplingArgs& a) { a.record_tokens = true; });
  bad("logits, rows", [](SamplingArgs& a) { a.logits = nullptr; });
  bad("logits, rows", [](SamplingArgs& a) { a.rows = nullptr; });
  bad("logits, rows", [](SamplingArgs& a) { a.tokens = nullptr; });
  bad("logits, rows", [](SamplingArgs& a) { a.logprobs = nullptr; });
  for (const Case& c : cases) {
    const absl::Status s = SampleTokens(c.args, nullptr);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << c.what << ": " << s;
    EXPECT_NE(s.message().find(c.what), std::string_view::npos) << s;
  }
  // No rows: nothing to check the pointers of, nothing launched.
  SamplingArgs empty;
  empty.vocab = 10;
  empty.logits_stride = 10;
  EXPECT_TRUE(SampleTokens(empty, nullptr).ok());
}

}  // namespace
}  // namespace morphserve::kernels::cuda::sampling_test
