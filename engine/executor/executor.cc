#include "engine/executor/executor.h"

#include <algorithm>

#include "common/status.h"
#include "common/strings.h"

namespace morphserve::engine {

Executor::Executor(const Model& model, std::unique_ptr<ForwardBackend> backend)
    : model_(model), backend_(std::move(backend)) {}

absl::Status Executor::AddSequence(int64_t id, std::span<const int32_t> prompt,
                                   const SamplingParams& sampling, const StopConditions& stop,
                                   const KvPolicyConfig& kv) {
  if (states_.contains(id)) return absl::InvalidArgumentError(StrCat("sequence ", id, " exists"));
  RETURN_IF_ERROR(backend_->AddRequest(id, sampling, prompt, stop.max_new_tokens));
  State state{kv, static_cast<int64_t>(prompt.size()), stop.max_new_tokens, 0, std::nullopt,
              stop, nullptr};
  if (model_.tokenizer != nullptr) state.stop.emplace(*model_.tokenizer, stop);
  states_.emplace(id, std::move(state));
  return absl::OkStatus();
}

void Executor::RemoveSequence(int64_t id) {
  if (states_.erase(id) > 0) backend_->RemoveRequest(id);
}

KvUsage Executor::Usage(int64_t id) const {
  const auto it = states_.find(id);
  if (it == states_.end() || it->second.cache == nullptr) return {};
  return it->second.cache->Usage();
}

absl::Status Executor::Execute(const StepPlan& plan, StepResult* result,
                               std::vector<TokenOutput>* outputs) {
  for (int64_t id : plan.preempted) {
    if (const auto it = states_.find(id); it != states_.end()) it->second.cache.reset();
  }
  inputs_.clear();
  tokens_.clear();
  rows_.clear();
  for (const ScheduledSequence& s : plan.sequences) {
    const auto it = states_.find(s.seq_id);
    if (it == states_.end()) {
      return absl::InternalError(StrCat("sequence ", s.seq_id, " was never added"));
    }
    State& state = it->second;
    if (s.fresh) {
      // A recomputed sequence treats everything so far as its prompt.
      const int64_t prompt = state.prompt_tokens + state.generated;
      const int64_t left = state.max_new_tokens - state.generated;
      state.cache = std::make_unique<KvSequence>(state.kv, backend_->cache_shape(),
                                                 model_.config.num_heads,
                                                 state.kv.MaxSlots(prompt, left));
    }
    const int64_t n = static_cast<int64_t>(s.tokens.size());
    inputs_.push_back({static_cast<int64_t>(tokens_.size()), n, s.start_position, s.block_table,
                       state.cache.get(), s.prompt_pending});
    tokens_.insert(tokens_.end(), s.tokens.begin(), s.tokens.end());
    rows_.push_back({s.seq_id, !s.prompt_pending});
  }
  result->outputs.clear();
  outputs->clear();
  if (plan.sequences.empty()) return absl::OkStatus();
  RETURN_IF_ERROR(
      backend_->ForwardAndSample({tokens_, inputs_, /*all_logits=*/false}, rows_, &sampled_));
  for (size_t i = 0; i < plan.sequences.size(); ++i) {
    const ScheduledSequence& s = plan.sequences[i];
    State& state = states_.at(s.seq_id);
    TokenOutput out;
    out.seq_id = s.seq_id;
    if (!s.prompt_pending) {
      const SampleResult& r = sampled_[i];
      ++state.generated;
      out.token = r.token;
      out.logprob = r.logprob;
      out.top = r.top;
      if (state.stop.has_value()) {
        StopChecker::Step step = state.stop->Push(r.token);
        out.text = std::move(step.text);
        out.finish = step.finish;
      } else {
        const auto& ids = state.conditions.stop_token_ids;
        if (std::find(ids.begin(), ids.end(), r.token) != ids.end()) {
          out.finish = FinishReason::kStop;
        } else if (state.generated >= state.max_new_tokens) {
          out.finish = FinishReason::kLength;
        }
      }
    }
    result->outputs.push_back({s.seq_id, out.token, out.finish});
    outputs->push_back(std::move(out));
  }
  return absl::OkStatus();
}

}  // namespace morphserve::engine
