// Iteration-level scheduling over the paged KV pool.
//
// Every step runs all decoding sequences (one token each) and prefill chunks
// of the others, within max_num_seqs sequences and max_num_batched_tokens
// tokens, most important first (priority, then arrival). Block accounting
// follows each request's KV policy: a policy with a known maximum (every one
// but `full`) reserves its most blocks at admission and never needs more;
// `full` allocates as it grows and, when the pool runs dry, the
// lowest-priority, most recently admitted full-cache sequence is preempted
// (its blocks freed; it is recomputed from its tokens later). Waiting
// requests are admitted strictly in order, so none waits behind later
// arrivals. A request that could never fit is refused at Add().
//
// FullAdmission::kGuaranteed makes `full` reserve its most blocks too
// (prompt + max_new_tokens, TensorRT-LLM's "guaranteed no evict"): no
// preemption ever, at the price of fewer sequences at once.
//
// Protocol, on one thread: Add / Cancel / ExpireDeadlines between steps;
// Schedule() -> StepPlan; the executor runs it; Update(StepResult).
// Includes no engine or kernel header.
#ifndef MORPHSERVE_SCHEDULER_SCHEDULER_H_
#define MORPHSERVE_SCHEDULER_SCHEDULER_H_

#include <cstdint>
#include <map>
#include <vector>

#include "absl/status/status.h"
#include "common/step_types.h"
#include "scheduler/block_pool.h"
#include "scheduler/sequence.h"

namespace morphserve::scheduler {

// How full-cache requests are admitted.
enum class FullAdmission {
  kOptimistic,  // allocate as they grow; preempt and recompute when the pool runs dry
  kGuaranteed,  // reserve prompt + max_new_tokens at admission; never preempted
};

struct SchedulerConfig {
  int64_t num_blocks = 0;
  int64_t block_size = 16;
  int64_t max_num_seqs = 256;
  int64_t max_num_batched_tokens = 2048;
  FullAdmission full_admission = FullAdmission::kOptimistic;
};

// A sequence's new token, its end, or both.
struct TokenEvent {
  int64_t seq_id = 0;
  int32_t token = -1;  // -1: no token (cancelled, deadline)
  FinishReason finish = FinishReason::kNone;
};

struct SchedulerStats {
  int64_t running = 0;
  int64_t waiting = 0;
  int64_t free_blocks = 0;
  int64_t used_blocks = 0;
  int64_t reserved_blocks = 0;  // reserved by running sequences, not yet taken
  int64_t preemptions = 0;      // since construction
};

class Scheduler {
 public:
  explicit Scheduler(const SchedulerConfig& config);

  const SchedulerConfig& config() const { return config_; }

  // Queues a request. InvalidArgument for a duplicate id, an empty prompt or
  // max_new_tokens < 1; ResourceExhausted when the request could never fit
  // the pool, even alone.
  absl::Status Add(SequenceRequest request);
  // Ends the sequence wherever it is and returns its blocks at once. False
  // when the id is unknown or already ended.
  bool Cancel(int64_t id);
  // Ends the sequence as failed (its step could not run); same otherwise.
  bool Fail(int64_t id);
  // Cancels every sequence whose deadline is at or before `now`.
  std::vector<TokenEvent> ExpireDeadlines(Clock::time_point now);

  // Plans the next step. The plan's spans stay valid until the next call.
  const StepPlan& Schedule();
  // Applies the executor's outputs for the last plan: appends tokens, ends
  // sequences (a stop the executor saw, or max_new_tokens) and frees their
  // blocks, returns blocks a KV policy no longer needs.
  std::vector<TokenEvent> Update(const StepResult& result);

  // Sequences not yet ended; null when unknown or ended.
  const Sequence* Find(int64_t id) const;
  SchedulerStats Stats() const;
  // Checks the accounting: every block either free or owned by exactly one
  // running sequence, tables sized to what each sequence holds,
  // reservations covered by free blocks. For tests.
  absl::Status CheckInvariants() const;

 private:
  int64_t Blocks(int64_t slots) const {
    return (slots + config_.block_size - 1) / config_.block_size;
  }
  // The most blocks the sequence can still need, from now on.
  int64_t FutureBlocks(const Sequence& seq) const;
  int64_t Available() const { return blocks_.num_free() - reserved_outstanding_; }
  bool Before(const Sequence& a, const Sequence& b) const;
  void InsertWaiting(int64_t id);
  // Gives `seq` the blocks for `n` more tokens, preempting full-cache
  // sequences when needed. False when `seq` itself had to be preempted.
  bool EnsureBlocks(Sequence& seq, int64_t n);
  void Preempt(Sequence& seq);
  // Frees blocks and reservation and forgets the sequence.
  void Release(Sequence& seq, SequenceState state, FinishReason finish);
  void Plan(Sequence& seq, int64_t n);
  bool Admit(Sequence& seq);

  SchedulerConfig config_;
  BlockPool blocks_;
  std::map<int64_t, Sequence> sequences_;  // not yet ended
  std::vector<int64_t> waiting_;           // in admission order
  std::vector<int64_t> running_;
  int64_t reserved_outstanding_ = 0;
  int64_t next_arrival_ = 0;
  int64_t next_admission_ = 0;
  int64_t preemptions_ = 0;
  StepPlan plan_;
  std::map<int64_t, int64_t> planned_;  // id -> tokens in the last plan
};

}  // namespace morphserve::scheduler

#endif  // MORPHSERVE_SCHEDULER_SCHEDULER_H_
