// Runs the scheduler's step plans on a forward backend (CPU or CUDA): one
// batched forward over every scheduled sequence, each with its own KV policy
// state and stop checker (the backend keeps its sampling state, so that a GPU
// samples where the logits are); the scheduler never sees any of it.
//
// Owned by the engine loop's thread; not thread-safe.
#ifndef MORPHSERVE_ENGINE_EXECUTOR_EXECUTOR_H_
#define MORPHSERVE_ENGINE_EXECUTOR_EXECUTOR_H_

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "common/kv_policy.h"
#include "common/sampling_params.h"
#include "common/step_types.h"
#include "engine/backend/forward_backend.h"
#include "engine/generation/stop_checker.h"
#include "engine/kv/kv_sequence.h"
#include "engine/model/llama_forward.h"
#include "engine/model/model.h"
#include "engine/sampler/sampler.h"

namespace morphserve::engine {

// What one scheduled sequence produced in a step, beyond the scheduler's
// SequenceOutput: the text it may show now and the token's log-probabilities.
struct TokenOutput {
  int64_t seq_id = 0;
  int32_t token = -1;  // -1: the step sampled nothing (a prompt chunk)
  std::string text;
  float logprob = 0.0f;
  std::vector<TokenLogprob> top;
  FinishReason finish = FinishReason::kNone;
};

class Executor {
 public:
  // Runs on `backend`, whose KV pool the scheduler's block ids index;
  // `model` must outlive the executor.
  Executor(const Model& model, std::unique_ptr<ForwardBackend> backend);

  // Registers a sequence before the scheduler first plans it. The stop
  // conditions' max_new_tokens is the request's limit.
  absl::Status AddSequence(int64_t id, std::span<const int32_t> prompt,
                           const SamplingParams& sampling, const StopConditions& stop,
                           const KvPolicyConfig& kv);
  void RemoveSequence(int64_t id);

  // Runs `plan`; result->outputs and *outputs get one entry per planned
  // sequence, in plan order.
  absl::Status Execute(const StepPlan& plan, StepResult* result,
                       std::vector<TokenOutput>* outputs);

  // The sequence's KV figures (zero before its first step).
  KvUsage Usage(int64_t id) const;
  const KvCacheShape& cache_shape() const { return backend_->cache_shape(); }
  const ForwardBackend& backend() const { return *backend_; }

 private:
  struct State {
    KvPolicyConfig kv;
    int64_t prompt_tokens = 0;
    int64_t max_new_tokens = 0;
    int64_t generated = 0;
    std::optional<StopChecker> stop;  // with a tokenizer
    StopConditions conditions;
    std::unique_ptr<KvSequence> cache;
  };

  const Model& model_;
  std::unique_ptr<ForwardBackend> backend_;
  std::map<int64_t, State> states_;
  std::vector<SequenceInput> inputs_;
  std::vector<int32_t> tokens_;
  std::vector<SampleRow> rows_;
  std::vector<SampleResult> sampled_;
};

}  // namespace morphserve::engine

#endif  // MORPHSERVE_ENGINE_EXECUTOR_EXECUTOR_H_
