// Which tokens a request keeps in its KV cache, per request.
//
// Shared by the scheduler (which only needs the most slots a request can
// ever hold, to reserve blocks at admission) and the engine (which runs the
// policy). The algorithms are described in docs/kv_policies.md.
#ifndef MORPHSERVE_COMMON_KV_POLICY_H_
#define MORPHSERVE_COMMON_KV_POLICY_H_

#include <cstdint>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace morphserve {

enum class KvPolicyKind {
  kFull,       // nothing is evicted
  kMorphKv,    // W recent + C-W chosen by the recent window's queries, every step
  kH2o,        // W+1 recent + C-W heavy hitters by accumulated attention
  kSnapKv,     // one prompt selection after prefill (budget C), then growth
  kStreaming,  // S sinks + the most recent tokens, original positions kept
};

enum class KvFusion { kSum, kMax };

// How MorphKV collapses the G query heads of a KV group into one score.
enum class MorphKvAggregation {
  // The spec's variant (b): W window rows t-W..t-1; the group's logits are
  // summed before the softmax over the candidates.
  kGroupLogitSum,
  // Variant (a): W-1 rows t-W+1..t-1; per-head probabilities, max over the
  // group.
  kGroupMaxProb,
};

struct KvPolicyConfig {
  KvPolicyKind kind = KvPolicyKind::kFull;
  int64_t window = 32;     // W
  int64_t capacity = 512;  // C: bounded policies keep C+1 tokens; SnapKV's prompt budget
  KvFusion fusion = KvFusion::kSum;
  MorphKvAggregation aggregation = MorphKvAggregation::kGroupLogitSum;
  int64_t sinks = 4;  // streaming only

  // A bounded policy's cache stops growing: it holds at most C+1 tokens per
  // (layer, KV head) once the prompt has been cut.
  bool bounded() const {
    return kind == KvPolicyKind::kMorphKv || kind == KvPolicyKind::kH2o ||
           kind == KvPolicyKind::kStreaming;
  }

  // Checks every parameter the policy uses; the message names it.
  // `context_length` is the model's.
  absl::Status Validate(int64_t context_length) const;

  // The most cache slots the request can occupy at any moment (per layer and
  // KV head; every head of every layer holds the same count), for a prompt of
  // `prompt_tokens` followed by up to `max_new_tokens` generated tokens. The
  // prompt is held whole during prefill.
  int64_t MaxSlots(int64_t prompt_tokens, int64_t max_new_tokens) const;

  // Slots held once `tokens` tokens of a sequence with a prompt of
  // `prompt_tokens` have been processed (the prompt is complete once tokens
  // reaches prompt_tokens, and selections happen then).
  int64_t SlotsHeld(int64_t prompt_tokens, int64_t tokens) const;
  // Slots a step needs while it writes `n` tokens after `tokens`: the
  // prompt is held whole until it is complete; a full bounded cache writes
  // into the slot it frees.
  int64_t SlotsForStep(int64_t prompt_tokens, int64_t tokens, int64_t n) const;
};

// SnapKV's fixed observation window and pooling kernel (the official defaults).
inline constexpr int64_t kSnapKvObservationWindow = 32;
inline constexpr int64_t kSnapKvPoolKernel = 5;

absl::StatusOr<KvPolicyKind> ParseKvPolicyKind(std::string_view name);
absl::StatusOr<KvFusion> ParseKvFusion(std::string_view name);
absl::StatusOr<MorphKvAggregation> ParseMorphKvAggregation(std::string_view name);
std::string_view KvPolicyName(KvPolicyKind kind);
std::string_view KvFusionName(KvFusion fusion);
std::string_view MorphKvAggregationName(MorphKvAggregation aggregation);

}  // namespace morphserve

#endif  // MORPHSERVE_COMMON_KV_POLICY_H_
