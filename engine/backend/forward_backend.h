// A device's forward pass together with the paged KV pool it owns: what the
// executor and the offline commands drive, whatever the hardware.
//
// Implementations: CpuBackend (engine/backend/cpu_backend.h, the reference)
// and CudaBackend (engine/backend/cuda_backend.h, built where nvcc is
// found). Only engine/backend/backend_registry.cc knows which exist; callers
// get one from CreateBackend. Owned and called by one thread.
#ifndef MORPHSERVE_ENGINE_BACKEND_FORWARD_BACKEND_H_
#define MORPHSERVE_ENGINE_BACKEND_FORWARD_BACKEND_H_

#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "common/kv_policy.h"
#include "common/sampling_params.h"
#include "engine/kv/paged_kv_cache.h"
#include "engine/model/llama_forward.h"
#include "engine/sampler/sampler.h"

namespace morphserve::engine {

// One sequence of a step, for ForwardAndSample.
struct SampleRow {
  int64_t id = 0;       // the request, as given to AddRequest
  bool sample = true;   // false: no token is drawn (nor recorded)
};

class ForwardBackend {
 public:
  virtual ~ForwardBackend() = default;

  // "cpu" or "cuda".
  virtual std::string_view device() const = 0;
  // The KV pool: its block count and block size are what the scheduler
  // hands out; element_bytes is the stored KV precision.
  virtual const KvCacheShape& cache_shape() const = 0;
  // Whether this backend can run sequences under `policy` (an error saying
  // why not otherwise), checked when a request is admitted.
  virtual absl::Status SupportsPolicy(const KvPolicyConfig& policy) const = 0;

  // Runs one step with LlamaForward::Forward's contract: K/V go into the
  // backend's pool, f32 logits into `logits` on the host, and each
  // sequence's KvSequence advances. Invalid input is an error that leaves
  // the pool and the sequences untouched.
  virtual absl::Status Forward(const ForwardBatch& batch, std::vector<float>* logits) = 0;

  // Sampling state per request (its seed, its token history for the
  // penalties), kept by the backend so that a GPU can choose tokens where
  // the logits are. AddRequest comes before the request's first step, with
  // the most tokens it may draw; RemoveRequest once it has ended (not when
  // it is preempted).
  virtual absl::Status AddRequest(int64_t id, const SamplingParams& params,
                                  std::span<const int32_t> prompt, int64_t max_new_tokens) = 0;
  virtual void RemoveRequest(int64_t id) = 0;

  // Runs the step (batch.all_logits must be false) and chooses the next
  // token of every sequence whose row says `sample`, as engine::Sampler
  // does: sequence i of the batch belongs to request rows[i].id; (*out)[i]
  // is its token, with the raw log-probabilities the request asked for
  // (left as it was where rows[i].sample is false: a prompt chunk with more
  // to come).
  virtual absl::Status ForwardAndSample(const ForwardBatch& batch, std::span<const SampleRow> rows,
                                        std::vector<SampleResult>* out) = 0;
};

// ForwardAndSample's argument checks, shared by the backends: one row per
// sequence, logits of the last tokens only.
absl::Status CheckSampleArgs(const ForwardBatch& batch, std::span<const SampleRow> rows);

}  // namespace morphserve::engine

#endif  // MORPHSERVE_ENGINE_BACKEND_FORWARD_BACKEND_H_
