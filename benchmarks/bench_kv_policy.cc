// Per-step decode cost of each KV policy on CPU at equal context: every
// configuration prefills the same prompt, then decodes the same number of
// tokens one at a time, so all attend at the same positions.
//   bench_kv_policy --model PATH [--threads 2] [--prompt-tokens 1024]
//                   [--gen-tokens 128] [--configs full,morphkv:8:128,...] [--json]
// A config is POLICY[:W:C]. Reports decode tokens/s, the KV tokens attended
// per (layer, KV head) at the end, and the share of the step spent in the
// policy (scoring, selection), as a markdown table or JSON lines.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "common/kv_policy.h"
#include "common/strings.h"
#include "engine/backend/cpu_backend.h"
#include "engine/model/model.h"
#include "server/cli/arg_parser.h"
#include "server/cli/sequence_set.h"

namespace morphserve {
namespace {

using Clock = std::chrono::steady_clock;

absl::StatusOr<KvPolicyConfig> ParseConfig(absl::string_view spec) {
  const std::vector<std::string> parts = absl::StrSplit(spec, ':');
  KvPolicyConfig c;
  auto kind = ParseKvPolicyKind(parts[0]);
  if (!kind.ok()) return kind.status();
  c.kind = *kind;
  if (parts.size() == 3) {
    if (!absl::SimpleAtoi(parts[1], &c.window) || !absl::SimpleAtoi(parts[2], &c.capacity)) {
      return absl::InvalidArgumentError(StrCat("bad config '", parts[0], "...'"));
    }
  } else if (parts.size() != 1) {
    return absl::InvalidArgumentError("a config is POLICY or POLICY:W:C");
  }
  return c;
}

int Main(int argc, char** argv) {
  std::string model_path, configs = "full,morphkv:8:128,morphkv:32:128,morphkv:8:512,morphkv:32:512";
  int64_t threads = 2, prompt_tokens = 1024, gen_tokens = 128;
  bool json = false;
  cli::ArgParser p("bench_kv_policy --model PATH [options]",
                   "Decode tokens/s per KV policy at equal context, and the policy's share.");
  p.AddString("model", &model_path, "model file or directory");
  p.AddInt("threads", &threads, "CPU threads");
  p.AddInt("prompt-tokens", &prompt_tokens, "prompt length before decoding");
  p.AddInt("gen-tokens", &gen_tokens, "decode steps measured");
  p.AddString("configs", &configs, "comma-separated POLICY[:W:C]");
  p.AddFlag("json", &json, "print one JSON object per config");
  if (absl::Status s = p.Parse(argc, argv, 1); !s.ok() || p.help_requested() ||
                                                 model_path.empty()) {
    std::fputs(p.Help().c_str(), s.ok() ? stdout : stderr);
    return s.ok() && p.help_requested() ? 0 : 2;
  }
  auto model = engine::LoadModel({.path = model_path});
  if (!model.ok()) {
    std::fprintf(stderr, "%s\n", std::string(model.status().message()).c_str());
    return 1;
  }
  const engine::ModelConfig& c = (*model)->config;
  std::mt19937 rng(1);
  std::vector<int32_t> tokens(prompt_tokens + gen_tokens);
  for (int32_t& t : tokens) t = static_cast<int32_t>(rng() % std::min<int64_t>(c.vocab_size, 32000));

  if (!json) {
    std::printf("| policy | W | C | decode tok/s | KV tokens attended | policy share of step |\n"
                "|---|---:|---:|---:|---:|---:|\n");
  }
  for (absl::string_view spec : absl::StrSplit(configs, ',', absl::SkipEmpty())) {
    auto policy = ParseConfig(spec);
    if (policy.ok()) {
      if (absl::Status s = policy->Validate(c.context_length); !s.ok()) policy = s;
    }
    if (!policy.ok()) {
      std::fprintf(stderr, "%s\n", std::string(policy.status().message()).c_str());
      return 2;
    }
    const int64_t block_size = 16;
    engine::CpuBackend backend(
        **model, static_cast<int>(threads),
        cli::SequenceSet::BlocksFor(*policy, prompt_tokens, gen_tokens + 1, block_size),
        block_size);
    cli::SequenceSet set(**model, &backend);
    const int id = *set.Add(*policy, prompt_tokens, gen_tokens + 1);
    std::vector<float> logits;
    for (int64_t begin = 0; begin < prompt_tokens; begin += 512) {
      const int64_t n = std::min<int64_t>(512, prompt_tokens - begin);
      const cli::SequenceSet::Work w{id, std::span<const int32_t>(tokens).subspan(begin, n),
                                     begin + n < prompt_tokens};
      if (absl::Status s = set.Step({&w, 1}, &logits); !s.ok()) {
        std::fprintf(stderr, "%s\n", std::string(s.message()).c_str());
        return 1;
      }
    }
    const double policy_before = set.kv(id).policy_seconds();
    const Clock::time_point t0 = Clock::now();
    for (int64_t i = 0; i < gen_tokens; ++i) {
      const cli::SequenceSet::Work w{
          id, std::span<const int32_t>(tokens).subspan(prompt_tokens + i, 1), false};
      if (absl::Status s = set.Step({&w, 1}, &logits); !s.ok()) {
        std::fprintf(stderr, "%s\n", std::string(s.message()).c_str());
        return 1;
      }
    }
    const double seconds = std::chrono::duration<double>(Clock::now() - t0).count();
    const double share = (set.kv(id).policy_seconds() - policy_before) / seconds;
    const double tok_s = static_cast<double>(gen_tokens) / seconds;
    const std::string name(KvPolicyName(policy->kind));
    const bool has_budget = policy->kind != KvPolicyKind::kFull;
    const long long resident = static_cast<long long>(set.kv(id).num_slots());
    if (json) {
      std::printf("{\"policy\": \"%s\", \"window\": %lld, \"capacity\": %lld, \"threads\": %lld, "
                  "\"context\": %lld, \"decode_tokens_per_s\": %.2f, \"kv_tokens_attended\": "
                  "%lld, \"policy_share\": %.4f}\n",
                  name.c_str(), static_cast<long long>(has_budget ? policy->window : 0),
                  static_cast<long long>(has_budget ? policy->capacity : 0),
                  static_cast<long long>(threads),
                  static_cast<long long>(prompt_tokens + gen_tokens), tok_s, resident, share);
    } else {
      std::printf("| %s | %s | %s | %.1f | %lld | %.1f%% |\n", name.c_str(),
                  has_budget ? std::to_string(policy->window).c_str() : "-",
                  has_budget ? std::to_string(policy->capacity).c_str() : "-", tok_s, resident,
                  100.0 * share);
    }
    std::fflush(stdout);
  }
  return 0;
}

}  // namespace
}  // namespace morphserve

int main(int argc, char** argv) { return morphserve::Main(argc, argv); }
