#include "server/cli/kv_options.h"

#include "common/status.h"

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

void AddKvUsage(const engine::KvUsage& kv, nlohmann::json& usage) {
  usage["kv_tokens_resident"] = kv.tokens_resident;
  usage["kv_tokens_full_equivalent"] = kv.tokens_full_equivalent;
  usage["kv_bytes_resident"] = kv.bytes_resident;
  usage["kv_bytes_saved"] = kv.bytes_saved;
  usage["kv_tokens_evicted"] = kv.tokens_evicted;
}

}  // namespace morphserve::cli
