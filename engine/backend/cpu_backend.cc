#include "engine/backend/cpu_backend.h"

namespace morphserve::engine {

CpuBackend::CpuBackend(const Model& model, int threads, int64_t num_blocks, int64_t block_size,
                       ForwardOptions options)
    : pool_(threads > 0 ? threads : ThreadPool::DefaultThreads()),
      cache_({model.config.num_layers, model.config.num_kv_heads, model.config.head_dim,
              block_size, num_blocks}),
      forward_(model, &pool_, options) {}

}  // namespace morphserve::engine
