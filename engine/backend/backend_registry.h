// Which compute backends this binary was built with, which one a `--device`
// flag selects, and the factory that builds it. The one place that knows
// whether CUDA was compiled in.
#ifndef MORPHSERVE_ENGINE_BACKEND_BACKEND_REGISTRY_H_
#define MORPHSERVE_ENGINE_BACKEND_BACKEND_REGISTRY_H_

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/backend/forward_backend.h"
#include "engine/model/llama_forward.h"
#include "engine/model/model.h"

namespace morphserve::engine {

// e.g. {"cpu"} or {"cpu", "cuda"}.
std::vector<std::string> BuiltBackends();

// Checks `--device requested` (auto, cpu or cuda) against this binary and
// machine: "cpu", "cuda", or "auto" when CUDA was built and a GPU is
// visible (CreateBackend then decides); `auto` without a GPU is "cpu".
// `cuda` without either is an error saying which is missing.
absl::StatusOr<std::string> ResolveDevice(std::string_view requested);

// The KV pool when no size is given: 1 GiB on the CPU; on CUDA, what
// gpu_memory_utilization leaves after the weights and activations.
inline constexpr int64_t kDefaultCpuKvCacheBytes = int64_t{1} << 30;

struct BackendOptions {
  // A device ResolveDevice returned. "auto" takes the GPU when the model
  // and every policy in `policies` run there, else the CPU (with a warning
  // saying why).
  std::string device = "cpu";
  std::vector<KvPolicyConfig> policies = {};
  int64_t block_size = 16;
  // Pool size: num_blocks when positive, else as many blocks as
  // kv_cache_bytes holds when positive, else the device's default.
  int64_t num_blocks = 0;
  int64_t kv_cache_bytes = 0;
  // CUDA: the fraction of the GPU's memory the process may fill (weights,
  // activations and the KV pool), as vLLM's flag of the same name.
  double gpu_memory_utilization = 0.9;
  int threads = 0;  // CPU worker threads (0: one per core)
  // The largest step the scheduler plans (CUDA sizes its working memory
  // for it at start-up).
  int64_t max_step_tokens = 2048;
  int64_t max_step_sequences = 256;
  // CUDA: decode steps of up to this many sequences run as CUDA graphs (0:
  // never), as CudaBackendOptions::cuda_graph_max_batch.
  int64_t cuda_graph_max_batch = 64;
  ForwardOptions forward;  // CPU only
};

// The backend for options.device with its KV pool allocated (and, on CUDA,
// the weights uploaded). Errors say what does not fit or is missing.
absl::StatusOr<std::unique_ptr<ForwardBackend>> CreateBackend(const Model& model,
                                                              const BackendOptions& options);

}  // namespace morphserve::engine

#endif  // MORPHSERVE_ENGINE_BACKEND_BACKEND_REGISTRY_H_
