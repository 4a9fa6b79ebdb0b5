#include "server/cli/fidelity.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <limits>

#include "absl/strings/str_format.h"
#include "common/strings.h"

namespace morphserve::cli {

void LogSoftmax(std::span<float> logits) {
  float m = -std::numeric_limits<float>::infinity();
  for (float x : logits) m = std::max(m, x);
  double z = 0.0;
  for (float x : logits) z += std::exp(static_cast<double>(x) - m);
  const double log_z = m + std::log(z);
  for (float& x : logits) x = static_cast<float>(x - log_z);
}

double KlDivergence(std::span<const float> log_p, std::span<const float> log_q) {
  double kl = 0.0;
  for (size_t i = 0; i < log_p.size(); ++i) {
    const double p = std::exp(static_cast<double>(log_p[i]));
    if (p > 0.0) kl += p * (static_cast<double>(log_p[i]) - log_q[i]);
  }
  return std::max(kl, 0.0);  // rounding can leave a tiny negative sum
}

int32_t GreedyToken(std::span<const float> logits, std::span<const int32_t> banned) {
  int32_t best = -1;
  for (size_t i = 0; i < logits.size(); ++i) {
    const int32_t id = static_cast<int32_t>(i);
    if (std::find(banned.begin(), banned.end(), id) != banned.end()) continue;
    if (best < 0 || logits[i] > logits[best]) best = id;
  }
  return best;
}

void FidelityStats::BeginPrompt() {
  prompt_steps = 0;
  diverged = false;
}

void FidelityStats::AddStep(std::span<const float> full_logprobs,
                            std::span<const float> policy_logprobs, int32_t reference_token,
                            int32_t policy_greedy, int64_t kv_resident, int64_t kv_full) {
  kl_sum += KlDivergence(full_logprobs, policy_logprobs);
  const bool agree = policy_greedy == reference_token;
  top1_agree += agree ? 1 : 0;
  nll_sum -= policy_logprobs[reference_token];
  ref_nll_sum -= full_logprobs[reference_token];
  resident_sum += static_cast<double>(kv_resident);
  full_sum += static_cast<double>(kv_full);
  if (!agree && !diverged) {
    divergence.push_back(prompt_steps);
    diverged = true;
  }
  ++prompt_steps;
  ++tokens;
}

void FidelityStats::EndPrompt(int64_t steps) {
  if (!diverged) divergence.push_back(steps);
}

double FidelityStats::mean_kl() const { return tokens > 0 ? kl_sum / tokens : 0.0; }
double FidelityStats::top1_agreement() const {
  return tokens > 0 ? static_cast<double>(top1_agree) / tokens : 0.0;
}
double FidelityStats::perplexity() const { return tokens > 0 ? std::exp(nll_sum / tokens) : 0.0; }
double FidelityStats::reference_perplexity() const {
  return tokens > 0 ? std::exp(ref_nll_sum / tokens) : 0.0;
}
double FidelityStats::mean_divergence() const {
  if (divergence.empty()) return 0.0;
  double sum = 0.0;
  for (int64_t d : divergence) sum += static_cast<double>(d);
  return sum / static_cast<double>(divergence.size());
}
double FidelityStats::median_divergence() const {
  if (divergence.empty()) return 0.0;
  std::vector<int64_t> v = divergence;
  std::sort(v.begin(), v.end());
  const size_t mid = v.size() / 2;
  return v.size() % 2 == 1 ? static_cast<double>(v[mid])
                           : 0.5 * static_cast<double>(v[mid - 1] + v[mid]);
}
double FidelityStats::kv_fraction() const { return full_sum > 0.0 ? resident_sum / full_sum : 0.0; }

absl::Status WriteFidelityCsv(const std::vector<FidelityStats>& stats, const std::string& path) {
  std::ofstream out(path);
  if (!out) return absl::PermissionDeniedError(StrCat("cannot write ", path));
  out << "policy,window,capacity,fusion,aggregation,sinks,prompts,tokens,mean_kl,top1_agreement,"
         "perplexity,full_perplexity,mean_tokens_to_divergence,median_tokens_to_divergence,"
         "kv_fraction\n";
  for (const FidelityStats& s : stats) {
    out << absl::StrFormat("%s,%d,%d,%s,%s,%d,%d,%d,%.6g,%.6g,%.6g,%.6g,%.6g,%.6g,%.6g\n",
                           std::string(KvPolicyName(s.policy.kind)), s.policy.window,
                           s.policy.capacity, std::string(KvFusionName(s.policy.fusion)),
                           std::string(MorphKvAggregationName(s.policy.aggregation)),
                           s.policy.sinks, s.divergence.size(), s.tokens, s.mean_kl(),
                           s.top1_agreement(), s.perplexity(), s.reference_perplexity(),
                           s.mean_divergence(), s.median_divergence(), s.kv_fraction());
  }
  out.close();
  if (!out) return absl::DataLossError(StrCat("failed writing ", path));
  return absl::OkStatus();
}

std::string FidelityMarkdown(const std::vector<FidelityStats>& stats) {
  std::string md =
      "| policy | C | KV kept | mean KL (nats) | top-1 agreement | perplexity (full) | "
      "tokens to divergence (mean / median) |\n"
      "|---|---:|---:|---:|---:|---:|---:|\n";
  for (const FidelityStats& s : stats) {
    StrAppend(&md, absl::StrFormat("| %s | %d | %.1f%% | %.4f | %.3f | %.3f (%.3f) | %.0f / %.0f |\n",
                                   s.label, s.policy.capacity, 100.0 * s.kv_fraction(),
                                   s.mean_kl(), s.top1_agreement(), s.perplexity(),
                                   s.reference_perplexity(), s.mean_divergence(),
                                   s.median_divergence()));
  }
  return md;
}

}  // namespace morphserve::cli
