// The contract between the scheduler and the executor, as plain structs so
// that neither depends on the other: the scheduler plans a step (which
// sequences run which tokens over which blocks), the executor runs it and
// reports what each sequence produced.
#ifndef MORPHSERVE_COMMON_STEP_TYPES_H_
#define MORPHSERVE_COMMON_STEP_TYPES_H_

#include <cstdint>
#include <span>
#include <vector>

#include "common/finish_reason.h"
#include "common/kv_policy.h"

namespace morphserve {

struct ScheduledSequence {
  int64_t seq_id = 0;
  // The tokens to run and the position of the first one. A sequence that was
  // preempted and is recomputed starts again at position 0.
  std::span<const int32_t> tokens;
  int64_t start_position = 0;
  // Starts from an empty cache: the executor must (re)create the
  // sequence's KV state.
  bool fresh = false;
  // More prompt chunks follow: the KV policy must not select yet, and no
  // token is sampled.
  bool prompt_pending = false;
  // Valid until the next Schedule(); covers KvPolicyConfig::SlotsForStep.
  std::span<const int32_t> block_table;
  const KvPolicyConfig* kv_policy = nullptr;
};

struct StepPlan {
  std::vector<ScheduledSequence> sequences;
  int64_t num_tokens = 0;
  // Sequences preempted while planning this step: their blocks are already
  // back in the pool and the executor must drop their KV state.
  std::vector<int64_t> preempted;
};

struct SequenceOutput {
  int64_t seq_id = 0;
  int32_t token = -1;  // the sampled token; -1 when the step sampled nothing
  // Set by the executor when a stop condition it checks (end of sequence,
  // stop string or token) ended the sequence with this token.
  FinishReason finish = FinishReason::kNone;
};

struct StepResult {
  std::vector<SequenceOutput> outputs;  // one per scheduled sequence
};

}  // namespace morphserve

#endif  // MORPHSERVE_COMMON_STEP_TYPES_H_
