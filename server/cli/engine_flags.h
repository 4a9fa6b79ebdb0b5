// The engine and scheduler flags shared by `serve` and `batch`: device, KV
// pool size, block size, step limits, threads.
#ifndef MORPHSERVE_SERVER_CLI_ENGINE_FLAGS_H_
#define MORPHSERVE_SERVER_CLI_ENGINE_FLAGS_H_

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "engine/model/model_config.h"
#include "server/cli/arg_parser.h"
#include "server/engine_loop.h"

namespace morphserve::cli {

struct EngineFlags {
  std::string device = "auto";
  int64_t max_num_seqs = 256;
  int64_t max_num_batched_tokens = 2048;
  std::string full_admission = "optimistic";
  int64_t block_size = 16;
  int64_t kv_cache_blocks = 0;
  std::string kv_cache_memory;  // empty: the device's default
  float gpu_memory_utilization = 0.9f;
  int64_t cuda_graph_max_batch = 64;
  int64_t threads = 0;
  bool no_weight_packing = false;
};

void AddEngineFlags(ArgParser& parser, EngineFlags* flags);

// Validates the flags and resolves the device.
absl::StatusOr<server::EngineOptions> EngineOptionsFromFlags(const EngineFlags& flags);

}  // namespace morphserve::cli

#endif  // MORPHSERVE_SERVER_CLI_ENGINE_FLAGS_H_
