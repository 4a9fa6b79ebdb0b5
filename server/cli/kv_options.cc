#include "server/cli/kv_options.h"

#include "absl/strings/numbers.h"
#include "common/status.h"
#include "common/strings.h"

namespace morphserve::cli {

void AddKvFlags(ArgParser& p, KvFlags* f) {
  p.AddString("kv-policy", &f->policy,
              "KV cache policy: full, morphkv, h2o, snapkv or streaming");
  p.AddInt("kv-window", &f->window,
           "W: recent tokens always kept (morphkv: their queries score the others)");
  p.AddInt("kv-capacity", &f->capacity,
           "C: morphkv, h2o and streaming keep C+1 tokens; snapkv's prompt budget");
  p.AddString("kv-fusion", &f->fusion, "morphkv: fuse window rows by sum or max");
  p.AddInt("kv-sinks", &f->sinks, "streaming: first tokens always kept");
  p.AddString("kv-aggregation", &f->aggregation,
              "morphkv GQA scoring: group-logit-sum (W rows, summed group logits) or "
              "group-max-prob (W-1 rows, max of per-head probabilities)");
}

absl::StatusOr<KvPolicyConfig> KvPolicyFromFlags(const KvFlags& f, int64_t context_length) {
  KvPolicyConfig c;
  ASSIGN_OR_RETURN(c.kind, ParseKvPolicyKind(f.policy));
  ASSIGN_OR_RETURN(c.fusion, ParseKvFusion(f.fusion));
  ASSIGN_OR_RETURN(c.aggregation, ParseMorphKvAggregation(f.aggregation));
  c.window = f.window;
  c.capacity = f.capacity;
  c.sinks = f.sinks;
  RETURN_IF_ERROR(c.Validate(context_length));
  return c;
}

absl::StatusOr<int64_t> ParseByteSize(const std::string& text, std::string_view flag) {
  static constexpr std::pair<const char*, int64_t> kUnits[] = {
      {"GiB", 1LL << 30}, {"MiB", 1LL << 20}, {"KiB", 1LL << 10}, {"GB", 1000000000LL},
      {"MB", 1000000LL},  {"KB", 1000LL},     {"", 1}};
  for (const auto& [suffix, scale] : kUnits) {
    const std::string unit(suffix);
    if (text.size() <= unit.size() ||
        text.compare(text.size() - unit.size(), unit.size(), unit) != 0) {
      continue;
    }
    double v = 0;
    if (!absl::SimpleAtod(text.substr(0, text.size() - unit.size()), &v) || !(v >= 1) ||
        v * static_cast<double>(scale) > 9e18) {
      break;
    }
    return static_cast<int64_t>(v * static_cast<double>(scale));
  }
  return absl::InvalidArgumentError(
      StrCat(flag, ": cannot read '", text, "' (examples: 2GiB, 512MiB, 1000000)"));
}

void AddKvUsage(const engine::KvUsage& kv, nlohmann::json& usage) {
  usage["kv_tokens_resident"] = kv.tokens_resident;
  usage["kv_tokens_full_equivalent"] = kv.tokens_full_equivalent;
  usage["kv_bytes_resident"] = kv.bytes_resident;
  usage["kv_bytes_saved"] = kv.bytes_saved;
  usage["kv_tokens_evicted"] = kv.tokens_evicted;
}

}  // namespace morphserve::cli
