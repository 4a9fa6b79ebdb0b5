// GPU sampling against the CPU reference, engine::Sampler. Each row is a
// request: sampling parameters, a prompt and the tokens generated so far,
// recorded in the CPU sampler by forcing them and given to the GPU as a
// penalty list. Then, per row:
//   - greedy rows pick the CPU's token exactly (ties to the lower id);
//   - the chosen token's raw log-probability and the top-N raw tokens and
//     log-probabilities agree with the CPU's;
//   - the distribution the GPU drew from (its debug output) keeps exactly
//     the tokens the CPU keeps, with the same probabilities;
//   - a sampling row's token is the one the race picks over the CPU's
//     distribution with the same noise (SamplingNoise, computed here);
//   - every output is written (buffers start poisoned) and top-N entries
//     past N are not.
// Logits rows are padded with NaN past the vocabulary, and penalty lists
// are followed by spare entries that would change the result if read.
// Vocabularies of 128k and more are named "large" so that slow runs can
// leave them out (--gtest_filter=-*large*).
#include "kernels/cuda/sampling.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <map>
#include <ostream>
#include <random>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/sampling_params.h"
#include "engine/sampler/sampler.h"
#include "tests/kernels/cuda/cuda_test_util.h"

namespace morphserve::kernels::cuda {
namespace {

using engine::Sampler;
using engine::SampleResult;
using engine::TokenProb;
using testing::Poisoned;
using testing::Upload;

constexpr float kInf = std::numeric_limits<float>::infinity();
// Log-sum-exp in f32 over up to 2^18 terms against the CPU's double sum.
constexpr double kLogprobTol = 2e-4;
// Probabilities: exp in f32 on both sides, normalised in 2^-44 fixed point
// on the GPU and in double on the CPU.
constexpr double kProbAbsTol = 1e-6;
constexpr double kProbRelTol = 2e-3;
// A race score, log(prob) + noise: log and exp differ by ulps between the
// GPU and the host.
constexpr double kScoreTol = 1e-3;
constexpr int64_t kTopStride = kMaxLogprobs + 3;

// One request as the CPU sees it.
struct Request {
  SamplingParams params;
  std::vector<int32_t> prompt;
  std::vector<int32_t> generated;  // oldest first
  uint64_t seed = 0;
  uint64_t step = 0;
};

std::string Describe(const Request& q) {
  const SamplingParams& p = q.params;
  return absl::StrCat("t=", p.temperature, " k=", p.top_k, " p=", p.top_p, " min_p=", p.min_p,
                      " rep=", p.repetition_penalty, " pres=", p.presence_penalty,
                      " freq=", p.frequency_penalty, " logprobs=", p.logprobs,
                      " prompt=", q.prompt.size(), " generated=", q.generated.size(),
                      " seed=", q.seed, " step=", q.step);
}

// Logits from N(0, stddev^2), a few at -inf, and the largest copied to a
// lower and a higher id so that greedy and the top-N see a tie. `grid`
// rounds them to multiples of itself, so that cuts fall inside runs of
// equal values.
std::vector<float> RandomLogits(int64_t vocab, float stddev, float grid, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, stddev);
  std::vector<float> logits(vocab);
  for (float& l : logits) {
    l = normal(rng);
    if (grid > 0.0f) l = std::round(l / grid) * grid;
  }
  std::uniform_int_distribution<int64_t> any(0, vocab - 1);
  for (int64_t i = 0; i < vocab / 64; ++i) logits[any(rng)] = -kInf;
  if (vocab >= 8) {
    const int64_t top = std::max_element(logits.begin(), logits.end()) - logits.begin();
    logits[any(rng) % std::max<int64_t>(top, 1)] = logits[top];
    logits[top + (vocab - 1 - top) / 2] = logits[top];
  }
  return logits;
}

// A prompt of `n` ids drawn from the first `span` tokens (so that they
// repeat), plus one id past the vocabulary, which both sides ignore.
std::vector<int32_t> RandomPrompt(int n, int64_t span, int64_t vocab, std::mt19937& rng) {
  std::uniform_int_distribution<int32_t> any(0, static_cast<int32_t>(span - 1));
  std::vector<int32_t> prompt(n);
  for (int32_t& t : prompt) t = any(rng);
  if (n > 0) prompt.push_back(static_cast<int32_t>(vocab + 5));
  return prompt;
}

// The CPU sampler with the request's history recorded, each generated token
// forced by logits that leave no other choice.
Sampler CpuSampler(const Request& q, int64_t vocab) {
  Sampler s(q.params, q.prompt);
  std::vector<float> force(vocab);
  for (int32_t t : q.generated) {
    std::fill(force.begin(), force.end(), -1e4f);
    force[t] = 1e4f;
    const int32_t got = s.Sample(force).token;
    if (got != t) ADD_FAILURE() << "forcing " << t << " recorded " << got;
  }
  return s;
}

// Every distinct token of the prompt and of the output, with its output
// count, in a scrambled order.
std::vector<PenaltyEntry> PenaltyList(const Request& q, std::mt19937& rng) {
  std::map<int32_t, int32_t> counts;
  for (int32_t t : q.prompt) counts.emplace(t, 0);
  for (int32_t t : q.generated) ++counts[t];
  std::vector<PenaltyEntry> entries;
  for (const auto& [token, count] : counts) entries.push_back({token, count});
  std::shuffle(entries.begin(), entries.end(), rng);
  return entries;
}

double LogSumExp(std::span<const float> x) {
  double m = -kInf;
  for (float v : x) m = std::max<double>(m, v);
  if (!std::isfinite(m)) return m;
  double sum = 0.0;
  for (float v : x) sum += std::exp(v - m);
  return m + std::log(sum);
}

// One launch's inputs on the host.
struct Batch {
  int64_t vocab = 0;
  int64_t stride = 0;  // vocab + 3, NaN past the vocabulary
  std::vector<float> logits;
  std::vector<Request> requests;
  std::vector<SamplingRowParams> rows;
  std::vector<PenaltyEntry> entries;

  explicit Batch(int64_t v) : vocab(v), stride(v + 3) {}
  int64_t size() const { return static_cast<int64_t>(rows.size()); }
  std::span<const float> Logits(int64_t r) const {
    return std::span<const float>(logits).subspan(r * stride, vocab);
  }

  // Adds a row; its list has room for `spare` more entries, filled with
  // entries that would penalise heavily if read.
  void Add(const Request& q, std::span<const float> row_logits, std::mt19937& rng,
           int32_t spare = 0) {
    logits.insert(logits.end(), row_logits.begin(), row_logits.end());
    logits.insert(logits.end(), stride - vocab, std::nanf(""));
    SamplingRowParams row = ToSamplingRow(q.params, q.seed, q.step);
    const std::vector<PenaltyEntry> list = PenaltyList(q, rng);
    row.penalty_offset = static_cast<int64_t>(entries.size());
    row.penalty_size = static_cast<int32_t>(list.size());
    row.penalty_capacity = row.penalty_size + spare;
    entries.insert(entries.end(), list.begin(), list.end());
    std::uniform_int_distribution<int32_t> any(0, static_cast<int32_t>(vocab - 1));
    for (int32_t i = 0; i < spare; ++i) entries.push_back({any(rng), 1000});
    requests.push_back(q);
    rows.push_back(row);
  }
};

struct DeviceOut {
  std::vector<int32_t> tokens;
  std::vector<float> logprobs;
  std::vector<int32_t> top_ids;       // [row][kTopStride]
  std::vector<float> top_logprobs;    // [row][kTopStride]
  std::vector<float> probs;           // [row][vocab + 1], when asked for
  std::vector<PenaltyEntry> entries;  // the pool after the launch
};

// Whether got and expected are both the same infinity, or close.
::testing::AssertionResult Near(double got, double expected, double tol) {
  if (std::isinf(expected) && got == expected) return ::testing::AssertionSuccess();
  if (std::fabs(got - expected) <= tol) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "got " << got << ", expected " << expected;
}

// The GPU's distribution against the CPU's: exactly the CPU's kept tokens
// with a probability above 0 (a kept token whose probability underflows
// may read 0 on either side), nothing else, close probabilities.
::testing::AssertionResult SameDistribution(std::span<const float> got,
                                            const std::vector<TokenProb>& expected) {
  std::vector<double> want(got.size(), 0.0);
  std::vector<bool> kept(got.size(), false);
  for (const TokenProb& t : expected) {
    want[t.id] = t.prob;
    kept[t.id] = true;
  }
  int64_t bad = 0;
  int64_t first = -1;
  for (size_t i = 0; i < got.size(); ++i) {
    const bool ok = kept[i] ? (want[i] > 1e-12 ? got[i] > 0.0f : true) &&
                                  std::fabs(got[i] - want[i]) <= kProbAbsTol + kProbRelTol * want[i]
                            : got[i] == 0.0f;
    if (!ok && bad++ == 0) first = static_cast<int64_t>(i);
  }
  if (bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << bad << " tokens differ; first " << first << ": got " << got[first] << ", expected "
         << want[first] << (kept[first] ? " (kept)" : " (dropped)") << "; CPU keeps "
         << expected.size();
}

class SamplingTest : public testing::CudaTest {
 protected:
  // Runs the batch with every output poisoned first.
  absl::StatusOr<DeviceOut> Run(const Batch& b, bool with_probs, bool record = false) {
    const int64_t n = b.size();
    ASSIGN_OR_RETURN(DeviceBuffer logits, Upload(b.logits));
    ASSIGN_OR_RETURN(DeviceBuffer rows, Upload(b.rows));
    ASSIGN_OR_RETURN(DeviceBuffer entries, Upload(b.entries));
    ASSIGN_OR_RETURN(DeviceBuffer tokens, Poisoned<int32_t>(n));
    ASSIGN_OR_RETURN(DeviceBuffer logprobs, Poisoned<float>(n));
    ASSIGN_OR_RETURN(DeviceBuffer top_ids, Poisoned<int32_t>(n * kTopStride));
    ASSIGN_OR_RETURN(DeviceBuffer top_logprobs, Poisoned<float>(n * kTopStride));
    ASSIGN_OR_RETURN(DeviceBuffer probs, Poisoned<float>(with_probs ? n * (b.vocab + 1) : 0));
    SamplingArgs a;
    a.logits = logits.as<float>();
    a.logits_stride = b.stride;
    a.num_rows = n;
    a.vocab = b.vocab;
    a.rows = rows.as<SamplingRowParams>();
    a.penalty_entries = entries.as<PenaltyEntry>();
    a.record_tokens = record;
    a.tokens = tokens.as<int32_t>();
    a.logprobs = logprobs.as<float>();
    a.top_ids = top_ids.as<int32_t>();
    a.top_logprobs = top_logprobs.as<float>();
    a.top_stride = kTopStride;
    if (with_probs) {
      a.probs = probs.as<float>();
      a.probs_stride = b.vocab + 1;
    }
    RETURN_IF_ERROR(SampleTokens(a, stream_));
    RETURN_IF_ERROR(Sync());
    DeviceOut out;
    ASSIGN_OR_RETURN(out.tokens, tokens.ToHost<int32_t>());
    ASSIGN_OR_RETURN(out.logprobs, logprobs.ToHost<float>());
    ASSIGN_OR_RETURN(out.top_ids, top_ids.ToHost<int32_t>());
    ASSIGN_OR_RETURN(out.top_logprobs, top_logprobs.ToHost<float>());
    if (with_probs) {
      ASSIGN_OR_RETURN(out.probs, probs.ToHost<float>());
    }
    ASSIGN_OR_RETURN(out.entries, entries.ToHost<PenaltyEntry>());
    return out;
  }

  // Every check of the file's header comment for row r.
  void CheckRow(const Batch& b, const DeviceOut& out, int64_t r) {
    const Request& q = b.requests[r];
    SCOPED_TRACE(absl::StrCat("row ", r, ": ", Describe(q)));
    const std::span<const float> logits = b.Logits(r);
    Sampler cpu = CpuSampler(q, b.vocab);
    const std::vector<TokenProb> dist = cpu.Distribution(logits);
    std::vector<float> scratch(logits.begin(), logits.end());
    const SampleResult expected = cpu.Sample(scratch);
    const double lse = LogSumExp(logits);

    const int32_t token = out.tokens[r];
    ASSERT_TRUE(token >= 0 && token < b.vocab) << "token " << token;
    if (q.params.greedy()) {
      EXPECT_EQ(token, expected.token);
    } else {
      // The race over the CPU's distribution with the GPU's noise.
      double best = -kInf;
      double mine = -kInf;
      for (const TokenProb& t : dist) {
        if (t.prob <= 0.0) continue;
        const double score = std::log(t.prob) + SamplingNoise(q.seed, q.step, t.id);
        best = std::max(best, score);
        if (t.id == token) mine = score;
      }
      EXPECT_GE(mine, best - kScoreTol) << "token " << token << " is not the race's winner";
    }
    EXPECT_TRUE(Near(out.logprobs[r], logits[token] - lse, kLogprobTol)) << "token " << token;

    const size_t n = std::min<size_t>(q.params.logprobs, b.vocab);
    ASSERT_EQ(expected.top.size(), n);
    for (size_t i = 0; i < n; ++i) {
      EXPECT_EQ(out.top_ids[r * kTopStride + i], expected.top[i].id) << "top " << i;
      EXPECT_TRUE(Near(out.top_logprobs[r * kTopStride + i], expected.top[i].logprob, kLogprobTol))
          << "top " << i;
    }
    for (size_t i = n; i < static_cast<size_t>(kTopStride); ++i) {
      EXPECT_EQ(out.top_ids[r * kTopStride + i], -1) << "top " << i << " written";
      EXPECT_TRUE(std::isnan(out.top_logprobs[r * kTopStride + i])) << "top " << i << " written";
    }
    if (!out.probs.empty()) {
      const std::span<const float> probs =
          std::span<const float>(out.probs).subspan(r * (b.vocab + 1), b.vocab);
      EXPECT_TRUE(SameDistribution(probs, dist));
      EXPECT_TRUE(std::isnan(out.probs[r * (b.vocab + 1) + b.vocab])) << "written past vocab";
    }
  }

  void CheckAll(const Batch& b, bool with_probs) {
    ASSERT_OK_AND_ASSIGN(const DeviceOut out, Run(b, with_probs));
    for (int64_t r = 0; r < b.size(); ++r) CheckRow(b, out, r);
  }
};

struct VocabCase {
  int64_t vocab;
};
std::string VocabName(const ::testing::TestParamInfo<VocabCase>& info) {
  return absl::StrCat(info.param.vocab >= 100000 ? "large_" : "", "v", info.param.vocab);
}
void PrintTo(const VocabCase& c, std::ostream* os) { *os << "vocab " << c.vocab; }

class SamplingVocabTest : public SamplingTest, public ::testing::WithParamInterface<VocabCase> {};

SamplingParams Greedy(int32_t logprobs) {
  SamplingParams p;
  p.temperature = 0.0f;
  p.logprobs = logprobs;
  return p;
}

TEST_P(SamplingVocabTest, GreedyRowsPickTheCpuTokenWithTiesToTheLowerId) {
  const int64_t vocab = GetParam().vocab;
  std::mt19937 rng(static_cast<uint32_t>(vocab));
  Batch b(vocab);
  for (int32_t logprobs : {0, 1, 5, 20}) {
    Request q;
    q.params = Greedy(logprobs);
    b.Add(q, RandomLogits(vocab, 2.0f, 0.0f, rng), rng);
    b.Add(q, RandomLogits(vocab, 1.0f, 0.5f, rng), rng);
  }
  CheckAll(b, true);
}

// The configurations the truncation test runs, one row each.
std::vector<SamplingParams> TruncationConfigs() {
  std::vector<SamplingParams> configs;
  auto add = [&](float t, int32_t k, float p, float min_p, int32_t logprobs) {
    SamplingParams s;
    s.temperature = t;
    s.top_k = k;
    s.top_p = p;
    s.min_p = min_p;
    s.logprobs = logprobs;
    configs.push_back(s);
  };
  add(1.0f, 0, 1.0f, 0.0f, 0);        // everything
  add(0.7f, 1, 1.0f, 0.0f, 3);        // top-k 1
  add(1.0f, 7, 1.0f, 0.0f, 0);        // top-k
  add(1.3f, 64, 1.0f, 0.0f, 20);      // top-k
  add(1.0f, 1 << 30, 1.0f, 0.0f, 0);  // top-k past the vocabulary
  add(1.0f, 0, 0.05f, 0.0f, 0);       // top-p keeping one
  add(0.8f, 0, 0.5f, 0.0f, 2);        // top-p
  add(1.0f, 0, 0.9f, 0.0f, 0);        // top-p
  add(2.0f, 0, 0.99f, 0.0f, 0);       // top-p, wide
  add(1.0f, 0, 1.0f, 0.05f, 0);       // min-p
  add(0.5f, 0, 1.0f, 0.3f, 1);        // min-p
  add(1.0f, 40, 0.9f, 0.0f, 0);       // top-k and top-p
  add(1.5f, 20, 0.95f, 0.1f, 5);      // all three
  add(1.0f, 0, 0.8f, 0.02f, 0);       // top-p and min-p
  add(0.9f, 10, 1.0f, 0.2f, 0);       // top-k and min-p
  add(3.0f, 300, 0.7f, 0.0f, 0);      // top-k and top-p, flat
  return configs;
}

TEST_P(SamplingVocabTest, TruncationKeepsWhatTheCpuKeeps) {
  const int64_t vocab = GetParam().vocab;
  std::mt19937 rng(static_cast<uint32_t>(vocab) + 1);
  Batch b(vocab);
  uint64_t seed = 100;
  for (const SamplingParams& p : TruncationConfigs()) {
    for (float grid : {0.0f, 0.25f}) {
      Request q;
      q.params = p;
      q.seed = seed++;
      q.step = seed * 7;
      b.Add(q, RandomLogits(vocab, 2.0f, grid, rng), rng);
    }
  }
  CheckAll(b, true);
}

TEST_P(SamplingVocabTest, PenaltiesMatchTheCpu) {
  const int64_t vocab = GetParam().vocab;
  std::mt19937 rng(static_cast<uint32_t>(vocab) + 2);
  Batch b(vocab);
  struct Penalty {
    float repetition, presence, frequency;
  };
  uint64_t seed = 1;
  for (const Penalty& pen :
       {Penalty{1.3f, 0.0f, 0.0f}, Penalty{0.8f, 0.0f, 0.0f}, Penalty{1.0f, 0.7f, 0.0f},
        Penalty{1.0f, 0.0f, -0.4f}, Penalty{1.2f, 1.5f, 0.6f}, Penalty{1.0f, 0.0f, 0.0f}}) {
    for (float temperature : {0.0f, 0.8f}) {
      Request q;
      q.params.temperature = temperature;
      q.params.top_k = temperature > 0 ? 50 : 0;
      q.params.top_p = temperature > 0 ? 0.9f : 1.0f;
      q.params.repetition_penalty = pen.repetition;
      q.params.presence_penalty = pen.presence;
      q.params.frequency_penalty = pen.frequency;
      q.params.logprobs = 4;
      q.seed = seed++;
      q.step = 3;
      // Penalised tokens among the most likely, where they change the choice.
      std::vector<float> logits = RandomLogits(vocab, 1.0f, 0.0f, rng);
      const int64_t top = std::min<int64_t>(20, vocab);
      std::vector<int32_t> by_value(vocab);
      for (int32_t i = 0; i < vocab; ++i) by_value[i] = i;
      std::partial_sort(by_value.begin(), by_value.begin() + top, by_value.end(),
                        [&](int32_t x, int32_t y) { return logits[x] > logits[y]; });
      q.prompt = RandomPrompt(40, vocab, vocab, rng);
      for (int i = 0; i < 12; ++i) q.prompt.push_back(by_value[(2 * i) % top]);
      for (int i = 0; i < 15; ++i) q.generated.push_back(by_value[(5 * i) % top]);
      b.Add(q, logits, rng, /*spare=*/4);
    }
  }
  CheckAll(b, true);
}

// Vocabularies: small enough to emulate, odd, and the real ones.
INSTANTIATE_TEST_SUITE_P(Vocabularies, SamplingVocabTest,
                         ::testing::Values(VocabCase{1}, VocabCase{37}, VocabCase{1000},
                                           VocabCase{4099}, VocabCase{32000}, VocabCase{49153},
                                           VocabCase{128256}, VocabCase{kMaxSamplingVocab}),
                         VocabName);

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
}  // namespace morphserve::kernels::cuda
