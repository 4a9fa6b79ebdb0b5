#include "engine/backend/backend_registry.h"

#include <spdlog/spdlog.h>

#include "common/status.h"
#include "common/strings.h"
#include "engine/backend/cpu_backend.h"
#ifdef MORPHSERVE_WITH_CUDA
#include "engine/backend/cuda_backend.h"
#endif

namespace morphserve::engine {

std::vector<std::string> BuiltBackends() {
  std::vector<std::string> backends = {"cpu"};
#ifdef MORPHSERVE_WITH_CUDA
  backends.push_back("cuda");
#endif
  return backends;
}

absl::StatusOr<std::string> ResolveDevice(std::string_view requested) {
  if (requested == "cpu") return std::string("cpu");
  if (requested == "auto" || requested == "cuda") {
#ifdef MORPHSERVE_WITH_CUDA
    const absl::Status visible = CudaDeviceVisible();
    if (visible.ok()) return std::string(requested);
    if (requested == "cuda") return visible;
#else
    if (requested == "cuda") {
      return absl::FailedPreconditionError(
          "--device cuda: this binary was built without CUDA (it is built where nvcc is found)");
    }
#endif
    return std::string("cpu");
  }
  return absl::InvalidArgumentError(
      StrCat("--device: unknown device '", requested, "' (auto, cpu or cuda)"));
}

absl::StatusOr<std::unique_ptr<ForwardBackend>> CreateBackend(const Model& model,
                                                              const BackendOptions& options) {
  if (options.block_size < 1) return absl::InvalidArgumentError("--block-size must be at least 1");
  if (options.num_blocks < 0 || options.kv_cache_bytes < 0) {
    return absl::InvalidArgumentError("the KV pool size must not be negative");
  }
  const ModelConfig& c = model.config;
  // Blocks that `bytes` holds at `element_bytes` per K or V value.
  const auto blocks_in = [&](int64_t bytes, int64_t element_bytes) -> absl::StatusOr<int64_t> {
    KvCacheShape shape{c.num_layers, c.num_kv_heads, c.head_dim, options.block_size, 0};
    shape.element_bytes = element_bytes;
    const int64_t n = bytes / shape.BytesPerBlock();
    if (n < 1) {
      return absl::InvalidArgumentError(StrCat("a KV pool of ", bytes, " bytes holds no block of ",
                                               shape.BytesPerBlock(), " bytes"));
    }
    return n;
  };
  if (options.device == "cpu") {
    int64_t blocks = options.num_blocks;
    if (blocks == 0) {
      ASSIGN_OR_RETURN(blocks, blocks_in(options.kv_cache_bytes > 0 ? options.kv_cache_bytes
                                                                     : kDefaultCpuKvCacheBytes,
                                         sizeof(float)));
    }
    return std::make_unique<CpuBackend>(model, options.threads, blocks, options.block_size,
                                        options.forward);
  }
#ifdef MORPHSERVE_WITH_CUDA
  if (options.device == "cuda" || options.device == "auto") {
    CudaBackendOptions cuda{options.block_size, options.num_blocks,
                            options.gpu_memory_utilization, options.max_step_tokens,
                            options.max_step_sequences, options.cuda_graph_max_batch};
    if (cuda.num_blocks == 0 && options.kv_cache_bytes > 0) {
      ASSIGN_OR_RETURN(cuda.num_blocks, blocks_in(options.kv_cache_bytes, 2));
    }
    // The policies are checked before the weights go up, so that `auto`
    // falls back without uploading them for nothing.
    absl::Status fit = absl::OkStatus();
    for (const KvPolicyConfig& policy : options.policies) {
      if (fit.ok()) fit = CudaBackend::RunsPolicy(policy);
    }
    if (fit.ok()) {
      absl::StatusOr<std::unique_ptr<CudaBackend>> gpu = CudaBackend::Create(model, cuda);
      if (gpu.ok()) return std::unique_ptr<ForwardBackend>(std::move(gpu).value());
      fit = gpu.status();
    }
    if (options.device == "cuda") return fit;
    spdlog::warn("--device auto: running on the CPU ({})", ToStd(fit.message()));
    BackendOptions cpu = options;
    cpu.device = "cpu";
    return CreateBackend(model, cpu);
  }
#endif
  return absl::InvalidArgumentError(StrCat("no backend for device '", options.device, "'"));
}

}  // namespace morphserve::engine
