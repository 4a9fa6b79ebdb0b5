#include "engine/sampler/sampler.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "kernels/cpu/elementwise.h"

namespace morphserve::engine {
namespace {

bool Before(const std::pair<float, int32_t>& a, const std::pair<float, int32_t>& b) {
  return a.first > b.first || (a.first == b.first && a.second < b.second);
}

}  // namespace

int32_t ArgMax(std::span<const float> values) {
  return static_cast<int32_t>(
      kernels::ArgMax(values.data(), static_cast<int64_t>(values.size())));
}

Sampler::Sampler(const SamplingParams& params, std::span<const int32_t> prompt_tokens)
    : params_(params),
      rng_(params.seed.has_value() ? *params.seed : std::random_device{}()),
      prompt_tokens_(prompt_tokens.begin(), prompt_tokens.end()) {
  std::sort(prompt_tokens_.begin(), prompt_tokens_.end());
  prompt_tokens_.erase(std::unique(prompt_tokens_.begin(), prompt_tokens_.end()),
                       prompt_tokens_.end());
}

double Sampler::Uniform() { return static_cast<double>(rng_() >> 11) * 0x1.0p-53; }

void Sampler::ApplyPenalties(std::span<float> logits) const {
  const int64_t vocab = static_cast<int64_t>(logits.size());
  if (params_.repetition_penalty != 1.0f) {
    auto penalise = [&](int32_t id) {
      if (id < 0 || id >= vocab) return;
      float& l = logits[id];
      l = l > 0 ? l / params_.repetition_penalty : l * params_.repetition_penalty;
    };
    for (int32_t id : prompt_tokens_) penalise(id);
    for (const auto& [id, count] : output_counts_) {
      if (!std::binary_search(prompt_tokens_.begin(), prompt_tokens_.end(), id)) penalise(id);
    }
  }
  if (params_.presence_penalty != 0.0f || params_.frequency_penalty != 0.0f) {
    for (const auto& [id, count] : output_counts_) {
      if (id < 0 || id >= vocab) continue;
      logits[id] -= params_.presence_penalty + params_.frequency_penalty * count;
    }
  }
}

size_t Sampler::Truncate(std::span<const float> logits) {
  const int32_t vocab = static_cast<int32_t>(logits.size());
  const float inv_t = 1.0f / params_.temperature;
  candidates_.clear();
  for (int32_t i = 0; i < vocab; ++i) {
    if (logits[i] != -std::numeric_limits<float>::infinity()) {
      candidates_.emplace_back(logits[i] * inv_t, i);
    }
  }
  if (candidates_.empty()) return 0;
  if (params_.top_k > 0 && params_.top_k < static_cast<int32_t>(candidates_.size())) {
    std::nth_element(candidates_.begin(), candidates_.begin() + params_.top_k, candidates_.end(),
                     Before);
    candidates_.resize(params_.top_k);
  }
  const bool truncate = params_.top_p < 1.0f || params_.min_p > 0.0f;
  if (truncate) std::sort(candidates_.begin(), candidates_.end(), Before);

  float max_logit = -std::numeric_limits<float>::infinity();
  for (const auto& c : candidates_) max_logit = std::max(max_logit, c.first);
  double total = 0.0;
  for (auto& c : candidates_) {
    c.first = std::exp(c.first - max_logit);  // now an unnormalised probability
    total += c.first;
  }
  size_t keep = candidates_.size();
  if (params_.min_p > 0.0f) {
    // The most likely candidate is first and has weight 1 after the shift.
    const float threshold = params_.min_p;
    keep = 1;
    while (keep < candidates_.size() && candidates_[keep].first >= threshold) ++keep;
  }
  if (params_.top_p < 1.0f) {
    double cumulative = 0.0;
    size_t n = 0;
    while (n < keep) {
      cumulative += candidates_[n].first / total;
      ++n;
      if (cumulative >= params_.top_p) break;
    }
    keep = n;
  }
  return keep;
}

int32_t Sampler::Draw(std::span<float> logits) {
  const size_t keep = Truncate(logits);
  if (keep == 0) return ArgMax(logits);
  double kept_total = 0.0;
  for (size_t i = 0; i < keep; ++i) kept_total += candidates_[i].first;
  double u = Uniform() * kept_total;
  for (size_t i = 0; i < keep; ++i) {
    u -= candidates_[i].first;
    if (u < 0.0) return candidates_[i].second;
  }
  return candidates_[keep - 1].second;
}

std::vector<TokenProb> Sampler::Distribution(std::span<const float> logits) {
  std::vector<float> penalised(logits.begin(), logits.end());
  ApplyPenalties(penalised);
  const size_t keep = params_.greedy() ? 0 : Truncate(penalised);
  if (keep == 0) return {TokenProb{ArgMax(penalised), 1.0}};
  double kept_total = 0.0;
  for (size_t i = 0; i < keep; ++i) kept_total += candidates_[i].first;
  std::vector<TokenProb> out;
  out.reserve(keep);
  for (size_t i = 0; i < keep; ++i) {
    out.push_back({candidates_[i].second, candidates_[i].first / kept_total});
  }
  return out;
}

SampleResult Sampler::Sample(std::span<float> logits) {
  SampleResult result;
  const float lse =
      kernels::LogSumExp(logits.data(), static_cast<int64_t>(logits.size()));
  if (params_.logprobs > 0) {
    const size_t n = std::min<size_t>(params_.logprobs, logits.size());
    candidates_.clear();
    for (size_t i = 0; i < logits.size(); ++i) {
      candidates_.emplace_back(logits[i], static_cast<int32_t>(i));
    }
    std::partial_sort(candidates_.begin(), candidates_.begin() + n, candidates_.end(), Before);
    for (size_t i = 0; i < n; ++i) {
      result.top.push_back({candidates_[i].second, candidates_[i].first - lse});
    }
  }
  // Remember the raw logits the penalties touch, to report the raw logprob.
  float raw_chosen = 0.0f;
  if (params_.repetition_penalty == 1.0f && params_.presence_penalty == 0.0f &&
      params_.frequency_penalty == 0.0f) {
    result.token = params_.greedy() ? ArgMax(logits) : Draw(logits);
    raw_chosen = logits[result.token];
  } else {
    raw_logits_.assign(logits.begin(), logits.end());
    ApplyPenalties(logits);
    result.token = params_.greedy() ? ArgMax(logits) : Draw(logits);
    raw_chosen = raw_logits_[result.token];
  }
  result.logprob = raw_chosen - lse;
  ++output_counts_[result.token];
  return result;
}

}  // namespace morphserve::engine
