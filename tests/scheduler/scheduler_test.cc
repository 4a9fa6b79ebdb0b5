// The scheduler against a fake executor: expected plans step by step for
// chunked prefill, mixed policies, preemption, cancellation, priority and
// deadlines, and the block accounting checked after every step of long
// randomized runs. No model, no engine.
#include "scheduler/scheduler.h"

#include <map>
#include <random>
#include <set>
#include <utility>
#include <vector>

#include "gtest/gtest.h"

namespace morphserve::scheduler {
namespace {

using Planned = std::vector<std::pair<int64_t, int64_t>>;  // (id, tokens)

// Samples a token for every sequence whose prompt is complete; the token
// depends only on the sequence and its position, so recomputation after a
// preemption is checkable. `eos_after[id] = k` ends a sequence at its k-th
// generated token.
class FakeExecutor {
 public:
  std::map<int64_t, int64_t> eos_after;

  StepResult Run(const Scheduler& s, const StepPlan& plan) {
    StepResult r;
    for (const ScheduledSequence& seq : plan.sequences) {
      SequenceOutput out{seq.seq_id, -1, FinishReason::kNone};
      if (!seq.prompt_pending) {
        const int64_t position = seq.start_position + static_cast<int64_t>(seq.tokens.size());
        out.token = static_cast<int32_t>(1000 * seq.seq_id + position);
        const Sequence* state = s.Find(seq.seq_id);
        const auto eos = eos_after.find(seq.seq_id);
        if (eos != eos_after.end() && state->num_generated + 1 == eos->second) {
          out.finish = FinishReason::kEos;
        }
      }
      r.outputs.push_back(out);
    }
    return r;
  }
};

SequenceRequest Request(int64_t id, int64_t prompt, int64_t max_new, int32_t priority = 0) {
  SequenceRequest r;
  r.id = id;
  r.prompt.assign(prompt, 7);
  r.max_new_tokens = max_new;
  r.priority = priority;
  return r;
}

SequenceRequest Bounded(int64_t id, int64_t prompt, int64_t max_new, int64_t window,
                        int64_t capacity) {
  SequenceRequest r = Request(id, prompt, max_new);
  r.kv.kind = KvPolicyKind::kMorphKv;
  r.kv.window = window;
  r.kv.capacity = capacity;
  return r;
}

class Harness {
 public:
  explicit Harness(SchedulerConfig config) : s(config) {}

  // One step: plan, check, execute, update, check. Returns the plan.
  Planned Step() {
    const StepPlan& plan = s.Schedule();
    EXPECT_TRUE(s.CheckInvariants().ok()) << s.CheckInvariants();
    Planned out;
    for (const ScheduledSequence& seq : plan.sequences) {
      out.emplace_back(seq.seq_id, static_cast<int64_t>(seq.tokens.size()));
    }
    last_preempted = plan.preempted;
    // A step that had to preempt admits nothing: the victim does not come
    // straight back into the blocks it gave up.
    if (!plan.preempted.empty()) {
      for (const ScheduledSequence& seq : plan.sequences) {
        EXPECT_FALSE(seq.fresh) << "sequence " << seq.seq_id << " admitted in a preempting step";
      }
    }
    for (const TokenEvent& e : s.Update(exec.Run(s, plan))) {
      if (e.token >= 0) tokens[e.seq_id].push_back(e.token);
      if (e.finish != FinishReason::kNone) {
        EXPECT_FALSE(finished.contains(e.seq_id)) << "sequence " << e.seq_id << " ended twice";
        finished[e.seq_id] = e.finish;
      }
    }
    EXPECT_TRUE(s.CheckInvariants().ok()) << s.CheckInvariants();
    return out;
  }

  Scheduler s;
  FakeExecutor exec;
  std::map<int64_t, std::vector<int32_t>> tokens;
  std::map<int64_t, FinishReason> finished;
  std::vector<int64_t> last_preempted;
};

TEST(SchedulerTest, ChunkedPrefillRunsBesideDecodesWithinTheTokenBudget) {
  Harness h({.num_blocks = 100, .block_size = 4, .max_num_seqs = 8, .max_num_batched_tokens = 8});
  ASSERT_TRUE(h.s.Add(Request(1, 3, 5)).ok());
  EXPECT_EQ(h.Step(), (Planned{{1, 3}}));
  ASSERT_TRUE(h.s.Add(Request(2, 20, 2)).ok());
  EXPECT_EQ(h.Step(), (Planned{{1, 1}, {2, 7}}));
  EXPECT_EQ(h.s.Find(2)->state, SequenceState::kPrefilling);
  EXPECT_EQ(h.Step(), (Planned{{1, 1}, {2, 7}}));
  EXPECT_EQ(h.Step(), (Planned{{1, 1}, {2, 6}}));  // the prompt completes: 2 samples
  EXPECT_EQ(h.tokens[2].size(), 1u);
  EXPECT_EQ(h.Step(), (Planned{{1, 1}, {2, 1}}));  // 1's fifth token, 2's second
  EXPECT_EQ(h.finished, (std::map<int64_t, FinishReason>{{1, FinishReason::kLength},
                                                         {2, FinishReason::kLength}}));
  EXPECT_EQ(h.tokens[1], (std::vector<int32_t>{1003, 1004, 1005, 1006, 1007}));
  EXPECT_EQ(h.s.Stats().used_blocks, 0);
}

TEST(SchedulerTest, BoundedPoliciesReserveTheirMostAndReturnTransientPages) {
  Harness h({.num_blocks = 12, .block_size = 4, .max_num_seqs = 8, .max_num_batched_tokens = 64});
  // MorphKV W2 C7, prompt 10: 3 blocks during prefill, 2 (8 slots) after.
  ASSERT_TRUE(h.s.Add(Bounded(1, 10, 50, 2, 7)).ok());
  EXPECT_EQ(h.Step(), (Planned{{1, 10}}));
  EXPECT_EQ(h.s.Find(1)->block_table.size(), 2u);
  EXPECT_EQ(h.s.Find(1)->reserved_blocks, 2);
  EXPECT_EQ(h.s.Stats().used_blocks, 2);
  // A full-cache request that fits alone (47 slots) grows into the rest and
  // is preempted (itself: it is the only full one) when the pool runs dry;
  // the MorphKV request is never touched.
  ASSERT_TRUE(h.s.Add(Request(2, 8, 40)).ok());
  int64_t steps = 0;
  bool preempted = false;
  while (h.finished.size() < 2 && steps++ < 500) {
    h.Step();
    if (!h.last_preempted.empty()) {
      EXPECT_EQ(h.last_preempted, std::vector<int64_t>{2});
      preempted = true;
    }
    if (const Sequence* b = h.s.Find(1)) {
      EXPECT_LE(b->block_table.size(), 2u);
    }
  }
  EXPECT_TRUE(preempted);
  EXPECT_EQ(h.finished[1], FinishReason::kLength);
  EXPECT_EQ(h.finished[2], FinishReason::kLength);
  EXPECT_EQ(h.tokens[1].size(), 50u);
  // Recomputed from scratch, yet every position's token came exactly once.
  ASSERT_EQ(h.tokens[2].size(), 40u);
  for (size_t i = 0; i < 40; ++i) EXPECT_EQ(h.tokens[2][i], 2000 + 8 + static_cast<int32_t>(i));
}

TEST(SchedulerTest, PreemptionTakesTheMostRecentlyAdmittedAndRecomputesIt) {
  Harness h({.num_blocks = 6, .block_size = 4, .max_num_seqs = 8, .max_num_batched_tokens = 64});
  ASSERT_TRUE(h.s.Add(Request(1, 4, 16)).ok());
  ASSERT_TRUE(h.s.Add(Request(2, 4, 16)).ok());
  EXPECT_EQ(h.Step(), (Planned{{1, 4}, {2, 4}}));
  // Each holds 2 blocks after 5 tokens; at 9 tokens they need 3 each: the
  // pool of 6 runs dry when the second grows, and 2 (admitted last) goes.
  std::vector<Planned> timeline;
  while (h.last_preempted.empty()) timeline.push_back(h.Step());
  EXPECT_EQ(h.last_preempted, std::vector<int64_t>{2});
  EXPECT_EQ(timeline.back(), (Planned{{1, 1}}));
  EXPECT_EQ(h.s.Find(2)->state, SequenceState::kQueued);
  EXPECT_EQ(h.s.Find(2)->preemptions, 1);
  while (h.finished.size() < 2) h.Step();
  EXPECT_EQ(h.s.Stats().preemptions, 1);
  for (int64_t id : {1, 2}) {
    ASSERT_EQ(h.tokens[id].size(), 16u);
    for (size_t i = 0; i < 16; ++i) {
      EXPECT_EQ(h.tokens[id][i], 1000 * id + 4 + static_cast<int32_t>(i));
    }
  }
}

// Guaranteed admission reserves a full-cache request's most blocks
// (prompt + max_new_tokens - 1 slots) up front: the pool that preempted in
// the test above now admits one request at a time and never preempts.
TEST(SchedulerTest, GuaranteedFullAdmissionReservesTheMostAndNeverPreempts) {
  Harness h({.num_blocks = 6,
             .block_size = 4,
             .max_num_seqs = 8,
             .max_num_batched_tokens = 64,
             .full_admission = FullAdmission::kGuaranteed});
  ASSERT_TRUE(h.s.Add(Request(1, 4, 16)).ok());  // 19 slots: 5 blocks
  ASSERT_TRUE(h.s.Add(Request(2, 4, 16)).ok());
  EXPECT_EQ(h.Step(), (Planned{{1, 4}}));  // 2 waits: 1 block would be left, it needs 5
  EXPECT_EQ(h.s.Find(1)->reserved_blocks, 5);
  EXPECT_EQ(h.s.Find(2)->state, SequenceState::kQueued);
  while (h.finished.size() < 2) {
    h.Step();
    EXPECT_TRUE(h.last_preempted.empty());
    EXPECT_LE(h.s.Stats().used_blocks + h.s.Stats().reserved_blocks, 6);
  }
  EXPECT_EQ(h.s.Stats().preemptions, 0);
  for (int64_t id : {1, 2}) {
    ASSERT_EQ(h.tokens[id].size(), 16u);
    EXPECT_EQ(h.tokens[id].back(), 1000 * id + 4 + 15);
  }
  // One that could never fit is still refused at once.
  EXPECT_EQ(h.s.Add(Request(3, 4, 40)).code(), absl::StatusCode::kResourceExhausted);
}

TEST(SchedulerTest, CancelMidDecodeReturnsBlocksAtOnce) {
  Harness h({.num_blocks = 40, .block_size = 4, .max_num_seqs = 8, .max_num_batched_tokens = 64});
  ASSERT_TRUE(h.s.Add(Request(1, 9, 100)).ok());
  ASSERT_TRUE(h.s.Add(Bounded(2, 9, 100, 2, 5)).ok());
  for (int i = 0; i < 4; ++i) h.Step();
  EXPECT_GT(h.s.Stats().used_blocks, 0);
  EXPECT_TRUE(h.s.Cancel(1));
  EXPECT_TRUE(h.s.Cancel(2));
  EXPECT_FALSE(h.s.Cancel(2));
  EXPECT_EQ(h.s.Stats().used_blocks, 0);
  EXPECT_EQ(h.s.Stats().reserved_blocks, 0);
  EXPECT_TRUE(h.s.CheckInvariants().ok());
  EXPECT_EQ(h.Step(), Planned{});
}

TEST(SchedulerTest, PriorityOrdersAdmissionAndPreemption) {
  Harness h({.num_blocks = 50, .block_size = 4, .max_num_seqs = 1, .max_num_batched_tokens = 64});
  ASSERT_TRUE(h.s.Add(Request(1, 4, 2, /*priority=*/0)).ok());
  ASSERT_TRUE(h.s.Add(Request(2, 4, 2, /*priority=*/5)).ok());
  EXPECT_EQ(h.Step(), (Planned{{2, 4}}));
  EXPECT_EQ(h.Step(), (Planned{{2, 1}}));
  EXPECT_EQ(h.Step(), (Planned{{1, 4}}));

  // With a dry pool the low-priority sequence goes, though admitted first.
  Harness p({.num_blocks = 5, .block_size = 4, .max_num_seqs = 8, .max_num_batched_tokens = 64});
  ASSERT_TRUE(p.s.Add(Request(1, 4, 12, 0)).ok());
  p.Step();
  ASSERT_TRUE(p.s.Add(Request(2, 4, 12, 3)).ok());
  while (p.last_preempted.empty() && p.finished.empty()) p.Step();
  EXPECT_EQ(p.last_preempted, std::vector<int64_t>{1});
}

TEST(SchedulerTest, ARequestEndsInTheStepAnotherIsAdmitted) {
  Harness h({.num_blocks = 50, .block_size = 4, .max_num_seqs = 2, .max_num_batched_tokens = 64});
  ASSERT_TRUE(h.s.Add(Request(1, 4, 2)).ok());
  EXPECT_EQ(h.Step(), (Planned{{1, 4}}));
  ASSERT_TRUE(h.s.Add(Request(2, 5, 3)).ok());
  EXPECT_EQ(h.Step(), (Planned{{1, 1}, {2, 5}}));
  EXPECT_EQ(h.finished.at(1), FinishReason::kLength);
  EXPECT_EQ(h.s.Find(1), nullptr);
  EXPECT_EQ(h.s.Find(2)->state, SequenceState::kDecoding);
  EXPECT_EQ(h.Step(), (Planned{{2, 1}}));
}

TEST(SchedulerTest, ExecutorStopsAndDeadlinesEndSequences) {
  Harness h({.num_blocks = 50, .block_size = 4, .max_num_seqs = 8, .max_num_batched_tokens = 64});
  h.exec.eos_after[1] = 3;
  SequenceRequest late = Request(2, 4, 100);
  const Clock::time_point now = Clock::now();
  late.deadline = now + std::chrono::seconds(5);
  ASSERT_TRUE(h.s.Add(Request(1, 4, 100)).ok());
  ASSERT_TRUE(h.s.Add(std::move(late)).ok());
  for (int i = 0; i < 3; ++i) h.Step();
  EXPECT_EQ(h.finished.at(1), FinishReason::kEos);
  EXPECT_EQ(h.tokens[1].size(), 3u);
  EXPECT_TRUE(h.s.ExpireDeadlines(now).empty());
  const std::vector<TokenEvent> expired = h.s.ExpireDeadlines(now + std::chrono::seconds(6));
  ASSERT_EQ(expired.size(), 1u);
  EXPECT_EQ(expired[0].seq_id, 2);
  EXPECT_EQ(expired[0].finish, FinishReason::kCancelled);
  EXPECT_EQ(h.s.Stats().used_blocks, 0);
}

TEST(SchedulerTest, RefusesWhatCouldNeverFitAndBadRequests) {
  Scheduler s({.num_blocks = 8, .block_size = 4});
  EXPECT_EQ(s.Add(Request(1, 10, 100)).code(), absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(s.Add(Bounded(2, 10, 1000, 4, 20)).ok());  // at most 21 slots: 6 blocks
  EXPECT_EQ(s.Add(Bounded(3, 40, 10, 4, 20)).code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(s.Add(Request(2, 1, 1)).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(s.Add(Request(4, 0, 1)).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(s.Add(Request(5, 1, 0)).code(), absl::StatusCode::kInvalidArgument);
}

// Random arrivals, policies, priorities, stops and cancellations over a
// small pool: the accounting holds after every step, every request ends
// exactly once, bounded requests are never preempted, nothing starves.
TEST(SchedulerTest, RandomizedRunsKeepTheAccounting) {
  int64_t preemptions = 0;
  // Seeds past 20 admit full-cache requests with guaranteed reservations.
  for (uint32_t seed = 1; seed <= 30; ++seed) {
    std::mt19937 rng(seed);
    const bool guaranteed = seed > 20;
    Harness h(
        {.num_blocks = 40,
         .block_size = 4,
         .max_num_seqs = 6,
         .max_num_batched_tokens = 24,
         .full_admission = guaranteed ? FullAdmission::kGuaranteed : FullAdmission::kOptimistic});
    std::set<int64_t> added, bounded;
    int64_t next_id = 1;
    for (int step = 0; step < 3000 && (next_id <= 60 || h.finished.size() < added.size()); ++step) {
      if (next_id <= 60 && rng() % 3 == 0) {
        const int64_t prompt = 1 + rng() % 30, max_new = 1 + rng() % 60;
        SequenceRequest r = Request(next_id, prompt, max_new, static_cast<int32_t>(rng() % 3));
        if (rng() % 2 == 0) {
          const KvPolicyKind kinds[] = {KvPolicyKind::kMorphKv, KvPolicyKind::kH2o,
                                        KvPolicyKind::kStreaming, KvPolicyKind::kSnapKv};
          r.kv.kind = kinds[rng() % 4];
          r.kv.window = 2;
          r.kv.capacity = r.kv.kind == KvPolicyKind::kSnapKv ? 33 + rng() % 8 : 5 + rng() % 12;
          r.kv.sinks = 1;
          bounded.insert(next_id);
        }
        if (rng() % 5 == 0) h.exec.eos_after[next_id] = 1 + rng() % 20;
        if (h.s.Add(std::move(r)).ok()) added.insert(next_id);
        ++next_id;
      }
      if (!added.empty() && rng() % 25 == 0) {
        const int64_t victim = 1 + rng() % (next_id - 1);
        if (h.s.Cancel(victim)) h.finished[victim] = FinishReason::kCancelled;
      }
      h.Step();
      for (int64_t id : h.last_preempted) {
        EXPECT_FALSE(guaranteed || bounded.contains(id)) << id;
      }
      if (HasFailure()) return;
    }
    EXPECT_EQ(h.finished.size(), added.size()) << "seed " << seed << ": some never finished";
    EXPECT_EQ(h.s.Stats().used_blocks, 0);
    EXPECT_EQ(h.s.Stats().reserved_blocks, 0);
    if (!guaranteed) preemptions += h.s.Stats().preemptions;
  }
  EXPECT_GT(preemptions, 0) << "the runs never exercised preemption";
}

}  // namespace
}  // namespace morphserve::scheduler
