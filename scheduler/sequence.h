// A request as the scheduler tracks it. Owned by the Scheduler; single
// thread (the engine loop's).
#ifndef MORPHSERVE_SCHEDULER_SEQUENCE_H_
#define MORPHSERVE_SCHEDULER_SEQUENCE_H_

#include <chrono>
#include <cstdint>
#include <optional>
#include <string_view>
#include <vector>

#include "common/finish_reason.h"
#include "common/kv_policy.h"

namespace morphserve::scheduler {

// Chronological, as a sequence moves through them; preemption sends a
// running sequence back to kQueued (and counts it).
enum class SequenceState { kQueued, kPrefilling, kDecoding, kFinished, kCancelled, kFailed };
std::string_view SequenceStateName(SequenceState state);

using Clock = std::chrono::steady_clock;

struct SequenceRequest {
  int64_t id = 0;
  std::vector<int32_t> prompt;
  int64_t max_new_tokens = 16;
  KvPolicyConfig kv;
  int32_t priority = 0;  // larger runs first and is preempted last
  std::optional<Clock::time_point> deadline;
};

struct Sequence {
  SequenceRequest request;
  SequenceState state = SequenceState::kQueued;
  int64_t arrival = 0;          // order of Add(): ties in priority go first-come first-served
  int64_t admitted = -1;        // order of the latest admission; preemption takes the latest
  std::vector<int32_t> tokens;  // prompt, then every generated token
  int64_t num_generated = 0;
  // Tokens whose KV is in the cache (positions [0, num_computed)).
  int64_t num_computed = 0;
  // What the KV policy treats as the prompt: the request's prompt, or
  // after a preemption everything recomputed in one go.
  int64_t prompt_tokens = 0;
  std::vector<int32_t> block_table;
  // Blocks reserved at admission (see `reserve`); others allocate as they
  // grow.
  int64_t reserved_blocks = 0;
  int64_t preemptions = 0;
  FinishReason finish = FinishReason::kNone;

  bool running() const {
    return state == SequenceState::kPrefilling || state == SequenceState::kDecoding;
  }
  bool terminal() const {
    return state == SequenceState::kFinished || state == SequenceState::kCancelled ||
           state == SequenceState::kFailed;
  }
  // Whether admission reserves the most blocks the sequence can ever hold
  // (bounded policies always; `full` under the guaranteed admission).
  bool reserve = false;
  bool reserves() const { return reserve; }
};

}  // namespace morphserve::scheduler

#endif  // MORPHSERVE_SCHEDULER_SEQUENCE_H_
