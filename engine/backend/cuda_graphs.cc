// CudaBackend's CUDA graphs of decode steps: the key of everything a step's
// launches take from the host, and running a step directly, capturing it or
// replaying its graph.
#include <algorithm>
#include <functional>
#include <vector>

#include <spdlog/spdlog.h>

#include "common/status.h"
#include "engine/backend/cuda_backend.h"
#include "kernels/cuda/cuda_status.h"

namespace morphserve::engine {

std::vector<int64_t> CudaBackend::GraphKey(int64_t mode) const {
  if (num_prefill_ > 0 || num_decode_ == 0 || num_decode_ > graph_max_batch_) return {};
  // Buffers (their addresses are baked into a graph), then every host-side
  // value the launches take: the step's shape, and each policy sequence's
  // settings, flags and device state.
  std::vector<int64_t> key = {buffers_generation_,
                              penalties_.generation(),
                              mode,
                              step_tokens_,
                              step_rows_,
                              step_all_logits_,
                              table_stride_,
                              static_cast<int64_t>(meta_at_.total)};
  for (const SlabStep& p : slab_steps_) {
    key.insert(key.end(), {p.slab->id, p.slab->generation, p.high_water, p.tokens, p.max_tokens,
                           p.max_slots, p.steady, p.first, p.snap, p.evict, p.scatter,
                           p.fused, static_cast<int64_t>(p.rows)});
  }
  return key;
}

void CudaBackend::GraphExecDeleter::operator()(cudaGraphExec_t exec) const {
  cudaGraphExecDestroy(exec);
}

absl::Status CudaBackend::RunStep(const std::vector<int64_t>& key,
                                  const std::function<absl::Status()>& queue) {
  // Graphs hold the launches of this many step shapes; shapes seen once are
  // remembered up to kMaxSeen.
  constexpr size_t kMaxGraphs = 64;
  constexpr size_t kMaxSeen = 1024;
  if (key.empty()) return queue();
  if (const auto it = graphs_.find(key); it != graphs_.end()) {
    it->second.last_use = ++graph_clock_;
    ++graph_replays_;
    RETURN_IF_CUDA_ERROR(cudaGraphLaunch(it->second.exec.get(), stream_));
    return absl::OkStatus();
  }
  // The first time, the step runs directly (which also lets cuBLAS and the
  // kernels settle anything they do once); a shape that recurs is captured.
  if (seen_keys_.size() >= kMaxSeen) seen_keys_.clear();
  if (seen_keys_.insert(key).second) return queue();
  RETURN_IF_CUDA_ERROR(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal));
  const absl::Status queued = queue();
  cudaGraph_t graph = nullptr;
  cudaError_t error = cudaStreamEndCapture(stream_, &graph);
  if (!queued.ok()) {
    if (graph != nullptr) cudaGraphDestroy(graph);
    return queued;
  }
  cudaGraphExec_t exec = nullptr;
  if (error == cudaSuccess) error = cudaGraphInstantiate(&exec, graph, 0);
  if (graph != nullptr) cudaGraphDestroy(graph);
  if (error != cudaSuccess) {
    // Serving goes on without graphs rather than failing the step.
    cudaGetLastError();
    spdlog::warn("CUDA graph capture failed ({}); decode steps run without graphs from now on",
                 cudaGetErrorString(error));
    graph_max_batch_ = 0;
    graphs_.clear();
    return queue();
  }
  if (graphs_.size() >= kMaxGraphs) {
    graphs_.erase(std::min_element(graphs_.begin(), graphs_.end(), [](const auto& a, const auto& b) {
      return a.second.last_use < b.second.last_use;
    }));
  }
  CachedGraph& cached = graphs_[key];
  cached.exec.reset(exec);
  cached.last_use = ++graph_clock_;
  ++graph_captures_;
  RETURN_IF_CUDA_ERROR(cudaGraphLaunch(exec, stream_));
  return absl::OkStatus();
}

}  // namespace morphserve::engine
