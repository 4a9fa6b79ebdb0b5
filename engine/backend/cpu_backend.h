// The CPU forward pass (LlamaForward) over an f32 paged KV pool in host
// memory, on its own worker threads: the reference backend, and the default
// where no GPU is visible.
#ifndef MORPHSERVE_ENGINE_BACKEND_CPU_BACKEND_H_
#define MORPHSERVE_ENGINE_BACKEND_CPU_BACKEND_H_

#include <cstdint>
#include <map>
#include <span>
#include <string_view>
#include <vector>

#include "common/thread_pool.h"
#include "engine/backend/forward_backend.h"
#include "engine/kv/paged_kv_cache.h"
#include "engine/model/llama_forward.h"
#include "engine/model/model.h"

namespace morphserve::engine {

class CpuBackend final : public ForwardBackend {
 public:
  // Allocates the pool of `num_blocks` blocks of `block_size` slots once and
  // starts `threads` workers (0: one per core). `model` must outlive the
  // backend.
  CpuBackend(const Model& model, int threads, int64_t num_blocks, int64_t block_size,
             ForwardOptions options = {});

  std::string_view device() const override { return "cpu"; }
  const KvCacheShape& cache_shape() const override { return cache_.shape(); }
  absl::Status SupportsPolicy(const KvPolicyConfig&) const override { return absl::OkStatus(); }
  absl::Status Forward(const ForwardBatch& batch, std::vector<float>* logits) override {
    return forward_.Forward(batch, cache_, logits);
  }
  absl::Status AddRequest(int64_t id, const SamplingParams& params,
                          std::span<const int32_t> prompt, int64_t max_new_tokens) override;
  void RemoveRequest(int64_t id) override { samplers_.erase(id); }
  absl::Status ForwardAndSample(const ForwardBatch& batch, std::span<const SampleRow> rows,
                                std::vector<SampleResult>* out) override;

 private:
  ThreadPool pool_;
  PagedKvCache cache_;
  LlamaForward forward_;
  std::map<int64_t, Sampler> samplers_;
  std::vector<Sampler*> row_samplers_;  // per sample row, in ForwardAndSample
  std::vector<float> logits_;
};

}  // namespace morphserve::engine

#endif  // MORPHSERVE_ENGINE_BACKEND_CPU_BACKEND_H_
