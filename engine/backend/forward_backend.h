// A device's forward pass together with the paged KV pool it owns: what the
// executor and the offline commands drive, whatever the hardware.
//
// Implementations: CpuBackend (engine/backend/cpu_backend.h, the reference)
// and CudaBackend (engine/backend/cuda_backend.h, built where nvcc is
// found). Only engine/backend/backend_registry.cc knows which exist; callers
// get one from CreateBackend. Owned and called by one thread.
#ifndef MORPHSERVE_ENGINE_BACKEND_FORWARD_BACKEND_H_
#define MORPHSERVE_ENGINE_BACKEND_FORWARD_BACKEND_H_

#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "common/kv_policy.h"
#include "engine/kv/paged_kv_cache.h"
#include "engine/model/llama_forward.h"

namespace morphserve::engine {

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
  virtual absl::Status SupportsPolicy(KvPolicyKind policy) const = 0;

  // Runs one step with LlamaForward::Forward's contract: K/V go into the
  // backend's pool, f32 logits into `logits` on the host, and each
  // sequence's KvSequence advances. Invalid input is an error that leaves
  // the pool and the sequences untouched.
  virtual absl::Status Forward(const ForwardBatch& batch, std::vector<float>* logits) = 0;
};

}  // namespace morphserve::engine

#endif  // MORPHSERVE_ENGINE_BACKEND_FORWARD_BACKEND_H_
