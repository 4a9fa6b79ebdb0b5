#include "engine/backend/cpu_backend.h"

#include <spdlog/spdlog.h>

#include "common/status.h"
#include "common/strings.h"

namespace morphserve::engine {

CpuBackend::CpuBackend(const Model& model, int threads, int64_t num_blocks, int64_t block_size,
                       ForwardOptions options)
    : pool_(threads > 0 ? threads : ThreadPool::DefaultThreads()),
      cache_({model.config.num_layers, model.config.num_kv_heads, model.config.head_dim,
              block_size, num_blocks}),
      forward_(model, &pool_, options) {
  if (forward_.packed_weight_bytes() > 0) {
    spdlog::info("CPU: packed {} MiB of weights for the matrix kernels",
                 forward_.packed_weight_bytes() >> 20);
  }
}

absl::Status CpuBackend::AddRequest(int64_t id, const SamplingParams& params,
                                    std::span<const int32_t> prompt, int64_t) {
  if (!samplers_.try_emplace(id, params, prompt).second) {
    return absl::InvalidArgumentError(StrCat("request ", id, " exists"));
  }
  return absl::OkStatus();
}

absl::Status CpuBackend::ForwardAndSample(const ForwardBatch& batch,
                                          std::span<const SampleRow> rows,
                                          std::vector<SampleResult>* out) {
  RETURN_IF_ERROR(CheckSampleArgs(batch, rows));
  RETURN_IF_ERROR(forward_.Forward(batch, cache_, &logits_));
  if (rows.empty()) return absl::OkStatus();
  const size_t vocab = logits_.size() / rows.size();
  out->resize(rows.size());
  row_samplers_.assign(rows.size(), nullptr);
  for (size_t i = 0; i < rows.size(); ++i) {
    if (!rows[i].sample) continue;
    const auto it = samplers_.find(rows[i].id);
    if (it == samplers_.end()) {
      return absl::InternalError(StrCat("request ", rows[i].id, " was never added"));
    }
    row_samplers_[i] = &it->second;
  }
  // Each row has its own sampler (and random stream), so rows sample in
  // parallel with the same results as one after another.
  pool_.ParallelFor(static_cast<int64_t>(rows.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      if (Sampler* sampler = row_samplers_[i]; sampler != nullptr) {
        (*out)[i] = sampler->Sample(std::span<float>(logits_).subspan(i * vocab, vocab));
      }
    }
  });
  return absl::OkStatus();
}

}  // namespace morphserve::engine
