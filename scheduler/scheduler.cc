#include "scheduler/scheduler.h"

#include <algorithm>
#include <set>

#include "common/strings.h"

namespace morphserve::scheduler {

std::string_view SequenceStateName(SequenceState state) {
  switch (state) {
    case SequenceState::kQueued: return "queued";
    case SequenceState::kPrefilling: return "prefilling";
    case SequenceState::kDecoding: return "decoding";
    case SequenceState::kFinished: return "finished";
    case SequenceState::kCancelled: return "cancelled";
    case SequenceState::kFailed: return "failed";
  }
  return "?";
}

Scheduler::Scheduler(const SchedulerConfig& config)
    : config_(config), blocks_(static_cast<int32_t>(config.num_blocks)) {}

bool Scheduler::Before(const Sequence& a, const Sequence& b) const {
  if (a.request.priority != b.request.priority) return a.request.priority > b.request.priority;
  return a.arrival < b.arrival;
}

void Scheduler::InsertWaiting(int64_t id) {
  const Sequence& seq = sequences_.at(id);
  const auto at = std::find_if(waiting_.begin(), waiting_.end(), [&](int64_t other) {
    return Before(seq, sequences_.at(other));
  });
  waiting_.insert(at, id);
}

int64_t Scheduler::FutureBlocks(const Sequence& seq) const {
  const KvPolicyConfig& kv = seq.request.kv;
  const int64_t left = seq.request.max_new_tokens - seq.num_generated;
  // The last token generated is never written to the cache.
  const int64_t last = static_cast<int64_t>(seq.tokens.size()) + std::max<int64_t>(left - 1, 0);
  if (seq.num_computed < seq.prompt_tokens) {
    return Blocks(kv.MaxSlots(seq.prompt_tokens, last - seq.prompt_tokens + 1));
  }
  return Blocks(kv.SlotsHeld(seq.prompt_tokens, last));
}

absl::Status Scheduler::Add(SequenceRequest request) {
  if (sequences_.contains(request.id)) {
    return absl::InvalidArgumentError(StrCat("request id ", request.id, " is already in use"));
  }
  if (request.prompt.empty()) return absl::InvalidArgumentError("the prompt is empty");
  if (request.max_new_tokens < 1) {
    return absl::InvalidArgumentError("max_new_tokens must be at least 1");
  }
  const int64_t prompt = static_cast<int64_t>(request.prompt.size());
  const int64_t most = Blocks(request.kv.MaxSlots(prompt, request.max_new_tokens));
  if (most > config_.num_blocks) {
    return absl::ResourceExhaustedError(
        StrCat("the request needs up to ", most, " KV blocks under its '",
               KvPolicyName(request.kv.kind), "' policy; the pool has ", config_.num_blocks));
  }
  Sequence seq;
  seq.tokens = request.prompt;
  seq.prompt_tokens = prompt;
  seq.reserve = request.kv.kind != KvPolicyKind::kFull ||
                config_.full_admission == FullAdmission::kGuaranteed;
  seq.request = std::move(request);
  seq.arrival = next_arrival_++;
  const int64_t id = seq.request.id;
  sequences_.emplace(id, std::move(seq));
  InsertWaiting(id);
  return absl::OkStatus();
}

void Scheduler::Release(Sequence& seq, SequenceState state, FinishReason finish) {
  blocks_.Free(seq.block_table);
  if (seq.running() && seq.reserves()) {
    reserved_outstanding_ -= seq.reserved_blocks - static_cast<int64_t>(seq.block_table.size());
  }
  const int64_t id = seq.request.id;
  running_.erase(std::remove(running_.begin(), running_.end(), id), running_.end());
  waiting_.erase(std::remove(waiting_.begin(), waiting_.end(), id), waiting_.end());
  seq.state = state;
  seq.finish = finish;
  sequences_.erase(id);
}

bool Scheduler::Cancel(int64_t id) {
  const auto it = sequences_.find(id);
  if (it == sequences_.end()) return false;
  Release(it->second, SequenceState::kCancelled, FinishReason::kCancelled);
  return true;
}

bool Scheduler::Fail(int64_t id) {
  const auto it = sequences_.find(id);
  if (it == sequences_.end()) return false;
  Release(it->second, SequenceState::kFailed, FinishReason::kNone);
  return true;
}

std::vector<TokenEvent> Scheduler::ExpireDeadlines(Clock::time_point now) {
  std::vector<int64_t> expired;
  for (const auto& [id, seq] : sequences_) {
    if (seq.request.deadline.has_value() && *seq.request.deadline <= now) expired.push_back(id);
  }
  std::vector<TokenEvent> events;
  for (int64_t id : expired) {
    Cancel(id);
    events.push_back({id, -1, FinishReason::kCancelled});
  }
  return events;
}

void Scheduler::Preempt(Sequence& seq) {
  blocks_.Free(seq.block_table);
  seq.block_table.clear();
  running_.erase(std::remove(running_.begin(), running_.end(), seq.request.id), running_.end());
  // Recomputed later from every token it has, as one prompt.
  seq.state = SequenceState::kQueued;
  seq.num_computed = 0;
  seq.prompt_tokens = static_cast<int64_t>(seq.tokens.size());
  ++seq.preemptions;
  ++preemptions_;
  InsertWaiting(seq.request.id);
  const auto planned = std::find_if(plan_.sequences.begin(), plan_.sequences.end(),
                                    [&](const ScheduledSequence& s) {
                                      return s.seq_id == seq.request.id;
                                    });
  if (planned != plan_.sequences.end()) {
    plan_.num_tokens -= static_cast<int64_t>(planned->tokens.size());
    plan_.sequences.erase(planned);
    planned_.erase(seq.request.id);
  }
  plan_.preempted.push_back(seq.request.id);
}

bool Scheduler::EnsureBlocks(Sequence& seq, int64_t n) {
  const int64_t need =
      Blocks(seq.request.kv.SlotsForStep(seq.prompt_tokens, seq.num_computed, n)) -
      static_cast<int64_t>(seq.block_table.size());
  if (need <= 0) return true;
  if (seq.reserves()) {
    // Within the reservation, which free blocks always cover.
    blocks_.Allocate(static_cast<int32_t>(need), &seq.block_table);
    reserved_outstanding_ -= need;
    return true;
  }
  while (Available() < need) {
    // The least important full-cache sequence, the most recently admitted
    // first; possibly `seq` itself.
    Sequence* victim = nullptr;
    for (int64_t id : running_) {
      Sequence& other = sequences_.at(id);
      if (other.reserves()) continue;
      if (victim == nullptr || other.request.priority < victim->request.priority ||
          (other.request.priority == victim->request.priority &&
           other.admitted > victim->admitted)) {
        victim = &other;
      }
    }
    if (victim == nullptr || victim == &seq) {
      Preempt(seq);
      return false;
    }
    Preempt(*victim);
  }
  blocks_.Allocate(static_cast<int32_t>(need), &seq.block_table);
  return true;
}

void Scheduler::Plan(Sequence& seq, int64_t n) {
  ScheduledSequence s;
  s.seq_id = seq.request.id;
  s.tokens = std::span<const int32_t>(seq.tokens).subspan(seq.num_computed, n);
  s.start_position = seq.num_computed;
  s.fresh = seq.num_computed == 0;
  s.prompt_pending = seq.num_computed + n < seq.prompt_tokens;
  s.block_table = seq.block_table;
  s.kv_policy = &seq.request.kv;
  plan_.sequences.push_back(s);
  plan_.num_tokens += n;
  planned_[seq.request.id] = n;
}

bool Scheduler::Admit(Sequence& seq) {
  const int64_t chunk = std::min(seq.prompt_tokens, config_.max_num_batched_tokens -
                                                        plan_.num_tokens);
  if (seq.reserves()) {
    const int64_t reserve = FutureBlocks(seq);
    if (reserve > Available()) return false;
    seq.reserved_blocks = reserve;
    reserved_outstanding_ += reserve;
  } else if (Blocks(seq.request.kv.SlotsForStep(seq.prompt_tokens, 0, chunk)) > Available()) {
    return false;
  }
  seq.state = SequenceState::kPrefilling;
  seq.admitted = next_admission_++;
  running_.push_back(seq.request.id);
  waiting_.erase(waiting_.begin());
  if (EnsureBlocks(seq, chunk)) Plan(seq, chunk);
  return true;
}

const StepPlan& Scheduler::Schedule() {
  plan_ = StepPlan{};
  planned_.clear();
  const int64_t max_tokens = config_.max_num_batched_tokens;
  const auto full = [&] {
    return static_cast<int64_t>(plan_.sequences.size()) >= config_.max_num_seqs ||
           plan_.num_tokens >= max_tokens;
  };
  std::vector<int64_t> order = running_;
  std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    return Before(sequences_.at(a), sequences_.at(b));
  });
  // Decodes first: one token each, so running requests keep streaming.
  for (int64_t id : order) {
    if (full()) break;
    const auto it = sequences_.find(id);
    if (it == sequences_.end() || it->second.state != SequenceState::kDecoding) continue;
    if (EnsureBlocks(it->second, 1)) Plan(it->second, 1);
  }
  // Then the next chunks of prompts already being prefilled.
  for (int64_t id : order) {
    if (full()) break;
    const auto it = sequences_.find(id);
    if (it == sequences_.end() || it->second.state != SequenceState::kPrefilling) continue;
    Sequence& seq = it->second;
    const int64_t n = std::min(seq.prompt_tokens - seq.num_computed, max_tokens - plan_.num_tokens);
    if (EnsureBlocks(seq, n)) Plan(seq, n);
  }
  // Then new (or preempted) requests, strictly in order; but not in a step
  // that had to preempt: the pool is short, and re-admitting the victim into
  // the blocks it just gave up would only recompute it again and again.
  while (plan_.preempted.empty() && !waiting_.empty() && !full()) {
    if (!Admit(sequences_.at(waiting_.front()))) break;
  }
  return plan_;
}

std::vector<TokenEvent> Scheduler::Update(const StepResult& result) {
  std::vector<TokenEvent> events;
  for (const SequenceOutput& out : result.outputs) {
    const auto it = sequences_.find(out.seq_id);
    const auto planned = planned_.find(out.seq_id);
    if (it == sequences_.end() || planned == planned_.end()) continue;
    Sequence& seq = it->second;
    seq.num_computed += planned->second;
    if (seq.num_computed < seq.prompt_tokens) continue;  // more prompt chunks to come
    seq.state = SequenceState::kDecoding;
    FinishReason finish = out.finish;
    if (out.token >= 0) {
      seq.tokens.push_back(out.token);
      ++seq.num_generated;
      if (finish == FinishReason::kNone && seq.num_generated >= seq.request.max_new_tokens) {
        finish = FinishReason::kLength;
      }
    }
    events.push_back({out.seq_id, out.token, finish});
    if (finish != FinishReason::kNone) {
      Release(seq, SequenceState::kFinished, finish);
      continue;
    }
    // A policy that cut its cache hands the pages back, and its reservation
    // shrinks to what it can still need.
    const int64_t before = static_cast<int64_t>(seq.block_table.size());
    const int64_t keep = Blocks(seq.request.kv.SlotsHeld(seq.prompt_tokens, seq.num_computed));
    if (before > keep) {
      blocks_.Free(std::span<const int32_t>(seq.block_table).subspan(keep));
      seq.block_table.resize(keep);
    }
    if (seq.reserves()) {
      const int64_t held = static_cast<int64_t>(seq.block_table.size());
      const int64_t reserve = std::max(FutureBlocks(seq), held);
      reserved_outstanding_ += (reserve - held) - (seq.reserved_blocks - before);
      seq.reserved_blocks = reserve;
    }
  }
  planned_.clear();
  return events;
}

const Sequence* Scheduler::Find(int64_t id) const {
  const auto it = sequences_.find(id);
  return it == sequences_.end() ? nullptr : &it->second;
}

SchedulerStats Scheduler::Stats() const {
  SchedulerStats s;
  s.running = static_cast<int64_t>(running_.size());
  s.waiting = static_cast<int64_t>(waiting_.size());
  s.free_blocks = blocks_.num_free();
  s.used_blocks = blocks_.num_used();
  s.reserved_blocks = reserved_outstanding_;
  s.preemptions = preemptions_;
  return s;
}

absl::Status Scheduler::CheckInvariants() const {
  std::set<int32_t> owned;
  int64_t outstanding = 0;
  for (const auto& [id, seq] : sequences_) {
    if (!seq.running() && !seq.block_table.empty()) {
      return absl::InternalError(StrCat("sequence ", id, " is not running but holds blocks"));
    }
    for (int32_t b : seq.block_table) {
      if (b < 0 || b >= config_.num_blocks || blocks_.IsFree(b) || !owned.insert(b).second) {
        return absl::InternalError(StrCat("block ", b, " of sequence ", id,
                                          " is invalid, free, or owned twice"));
      }
    }
    if (!seq.running()) continue;
    // Between steps a table covers what the sequence holds; while a step is
    // planned, what the step writes.
    const auto planned = planned_.find(id);
    const int64_t held =
        planned == planned_.end()
            ? Blocks(seq.request.kv.SlotsHeld(seq.prompt_tokens, seq.num_computed))
            : Blocks(seq.request.kv.SlotsForStep(seq.prompt_tokens, seq.num_computed,
                                                 planned->second));
    if (static_cast<int64_t>(seq.block_table.size()) != held) {
      return absl::InternalError(StrCat("sequence ", id, " holds ", seq.block_table.size(),
                                        " blocks for ", held, " blocks of tokens"));
    }
    if (seq.reserves()) {
      if (seq.reserved_blocks < static_cast<int64_t>(seq.block_table.size()) ||
          seq.reserved_blocks < FutureBlocks(seq)) {
        return absl::InternalError(StrCat("sequence ", id, " outgrew its reservation"));
      }
      outstanding += seq.reserved_blocks - static_cast<int64_t>(seq.block_table.size());
    }
  }
  if (static_cast<int64_t>(owned.size()) + blocks_.num_free() != config_.num_blocks) {
    return absl::InternalError(StrCat(owned.size(), " owned + ", blocks_.num_free(),
                                      " free blocks != ", config_.num_blocks));
  }
  if (outstanding != reserved_outstanding_ || outstanding > blocks_.num_free()) {
    return absl::InternalError(StrCat("reservations ", outstanding, " (tracked ",
                                      reserved_outstanding_, ") vs ", blocks_.num_free(),
                                      " free blocks"));
  }
  return absl::OkStatus();
}

}  // namespace morphserve::scheduler
