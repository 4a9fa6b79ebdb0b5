// Picks the next token of one sequence from its logits.
//
// A Sampler holds one request's state: its random generator (seeded from
// SamplingParams::seed, so the same seed gives the same tokens) and the
// counts of tokens it has produced (for the penalties). Buffers are reused
// between calls. One thread at a time.
#ifndef MORPHSERVE_ENGINE_SAMPLER_SAMPLER_H_
#define MORPHSERVE_ENGINE_SAMPLER_SAMPLER_H_

#include <cstdint>
#include <random>
#include <span>
#include <unordered_map>
#include <vector>

#include "common/sampling_params.h"

namespace morphserve::engine {

struct TokenLogprob {
  int32_t id = 0;
  float logprob = 0.0f;
};

struct SampleResult {
  int32_t token = 0;
  float logprob = 0.0f;  // of `token` under the model's distribution
  std::vector<TokenLogprob> top;  // the N most likely tokens, most likely first
};

struct TokenProb {
  int32_t id = 0;
  double prob = 0.0;
};

class Sampler {
 public:
  // `params` must be valid (SamplingParams::Validate).
  Sampler(const SamplingParams& params, std::span<const int32_t> prompt_tokens);

  // Chooses a token from `logits` (vocab entries; modified in place) and
  // records it. Log-probabilities are those of the raw logits, before
  // penalties, temperature and truncation, as vLLM reports them by default.
  SampleResult Sample(std::span<float> logits);

  // The distribution Sample(logits) would draw from now, without drawing or
  // recording: the tokens kept after penalties, temperature and truncation,
  // with probabilities summing to 1, in no particular order. A greedy
  // request (or one with every logit at -inf) gets its one token with 1.
  // For checking other samplers against this one.
  std::vector<TokenProb> Distribution(std::span<const float> logits);

 private:
  void ApplyPenalties(std::span<float> logits) const;
  // Fills candidates_ so that its first `keep` entries, the returned count,
  // are the tokens a draw may pick with their unnormalised probabilities;
  // 0 when every logit is -inf.
  size_t Truncate(std::span<const float> logits);
  int32_t Draw(std::span<float> logits);
  double Uniform();

  SamplingParams params_;
  std::mt19937_64 rng_;
  std::unordered_map<int32_t, int32_t> output_counts_;
  std::vector<int32_t> prompt_tokens_;  // distinct prompt ids (repetition penalty)
  std::vector<std::pair<float, int32_t>> candidates_;
  std::vector<float> raw_logits_;
};

// Index of the largest value; ties go to the lower index.
int32_t ArgMax(std::span<const float> values);

}  // namespace morphserve::engine

#endif  // MORPHSERVE_ENGINE_SAMPLER_SAMPLER_H_
