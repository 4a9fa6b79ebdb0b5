// How faithful a KV policy is to the full cache, measured token by token on
// a greedy full-cache reference: KL(full || policy) of the next-token
// distributions, top-1 agreement, the policy's perplexity on the reference,
// and how many tokens a free-running greedy generation with the policy
// matches the reference before its first divergence.
//
// Teacher-forced and free-running share one pass: until a policy's greedy
// choice first differs from the reference, the free-running generation has
// fed exactly the reference tokens, so its first divergence is the first
// step whose teacher-forced top-1 disagrees.
#ifndef MORPHSERVE_SERVER_CLI_FIDELITY_H_
#define MORPHSERVE_SERVER_CLI_FIDELITY_H_

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "common/kv_policy.h"

namespace morphserve::cli {

// In place: logits -> log-probabilities (computed in double).
void LogSoftmax(std::span<float> logits);

// KL(p || q) in nats from log-probabilities.
double KlDivergence(std::span<const float> log_p, std::span<const float> log_q);

// The most likely token whose id is not in `banned` (ties: lowest id).
int32_t GreedyToken(std::span<const float> logits, std::span<const int32_t> banned);

// One policy configuration's figures over every evaluated prompt.
struct FidelityStats {
  std::string label;  // e.g. "morphkv W32"
  KvPolicyConfig policy;
  int64_t tokens = 0;
  double kl_sum = 0.0;
  int64_t top1_agree = 0;
  double nll_sum = 0.0;      // -log p_policy(reference token)
  double ref_nll_sum = 0.0;  // the full cache's, for comparison
  double resident_sum = 0.0;  // KV tokens resident, summed over steps
  double full_sum = 0.0;      // KV tokens a full cache holds, summed over steps
  std::vector<int64_t> divergence;  // per prompt: tokens matched before the first divergence
  int64_t prompt_steps = 0;
  bool diverged = false;  // in the current prompt

  void BeginPrompt();
  // One reference step: the full cache's and the policy's log-probabilities
  // and the reference token the full cache chose.
  void AddStep(std::span<const float> full_logprobs, std::span<const float> policy_logprobs,
               int32_t reference_token, int32_t policy_greedy, int64_t kv_resident,
               int64_t kv_full);
  // Closes the prompt; `steps` is the reference length.
  void EndPrompt(int64_t steps);

  double mean_kl() const;
  double top1_agreement() const;
  double perplexity() const;
  double reference_perplexity() const;
  double mean_divergence() const;
  double median_divergence() const;
  double kv_fraction() const;  // resident / full-cache tokens, averaged over steps
};

// Writes one row per configuration.
absl::Status WriteFidelityCsv(const std::vector<FidelityStats>& stats, const std::string& path);
std::string FidelityMarkdown(const std::vector<FidelityStats>& stats);

}  // namespace morphserve::cli

#endif  // MORPHSERVE_SERVER_CLI_FIDELITY_H_
