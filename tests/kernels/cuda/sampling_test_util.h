// What the GPU sampling tests (sampling_test.cc, sampling_draw_test.cc)
// share: requests as the CPU sampler sees them, batches in the kernel's
// layout, the CPU references and the fixture that runs a batch with every
// output poisoned and checks each row against engine::Sampler.
#ifndef MORPHSERVE_TESTS_KERNELS_CUDA_SAMPLING_TEST_UTIL_H_
#define MORPHSERVE_TESTS_KERNELS_CUDA_SAMPLING_TEST_UTIL_H_

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
#include "kernels/cuda/sampling.h"
#include "tests/kernels/cuda/cuda_test_util.h"

namespace morphserve::kernels::cuda::sampling_test {

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

inline std::string Describe(const Request& q) {
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
inline std::vector<float> RandomLogits(int64_t vocab, float stddev, float grid, std::mt19937& rng) {
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
inline std::vector<int32_t> RandomPrompt(int n, int64_t span, int64_t vocab, std::mt19937& rng) {
  std::uniform_int_distribution<int32_t> any(0, static_cast<int32_t>(span - 1));
  std::vector<int32_t> prompt(n);
  for (int32_t& t : prompt) t = any(rng);
  if (n > 0) prompt.push_back(static_cast<int32_t>(vocab + 5));
  return prompt;
}

// The CPU sampler with the request's history recorded, each generated token
// forced by logits that leave no other choice.
inline Sampler CpuSampler(const Request& q, int64_t vocab) {
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
inline std::vector<PenaltyEntry> PenaltyList(const Request& q, std::mt19937& rng) {
  std::map<int32_t, int32_t> counts;
  for (int32_t t : q.prompt) counts.emplace(t, 0);
  for (int32_t t : q.generated) ++counts[t];
  std::vector<PenaltyEntry> entries;
  for (const auto& [token, count] : counts) entries.push_back({token, count});
  std::shuffle(entries.begin(), entries.end(), rng);
  return entries;
}

inline double LogSumExp(std::span<const float> x) {
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
inline ::testing::AssertionResult Near(double got, double expected, double tol) {
  if (std::isinf(expected) && got == expected) return ::testing::AssertionSuccess();
  if (std::fabs(got - expected) <= tol) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "got " << got << ", expected " << expected;
}

// The GPU's distribution against the CPU's: exactly the CPU's kept tokens
// with a probability above 0 (a kept token whose probability underflows
// may read 0 on either side), nothing else, close probabilities.
inline ::testing::AssertionResult SameDistribution(std::span<const float> got,
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

inline SamplingParams Greedy(int32_t logprobs) {
  SamplingParams p;
  p.temperature = 0.0f;
  p.logprobs = logprobs;
  return p;
}

}  // namespace morphserve::kernels::cuda::sampling_test

#endif  // MORPHSERVE_TESTS_KERNELS_CUDA_SAMPLING_TEST_UTIL_H_
