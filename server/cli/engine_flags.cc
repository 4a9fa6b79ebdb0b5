#include "server/cli/engine_flags.h"

#include "common/status.h"
#include "common/strings.h"
#include "engine/backend/backend_registry.h"
#include "server/cli/kv_options.h"

namespace morphserve::cli {

void AddEngineFlags(ArgParser& p, EngineFlags* f) {
  p.AddString("device", &f->device, "auto, cpu or cuda");
  p.AddInt("max-num-seqs", &f->max_num_seqs, "most sequences in one step");
  p.AddInt("max-num-batched-tokens", &f->max_num_batched_tokens,
           "most tokens in one step (prompts are prefilled in chunks)");
  p.AddString("full-admission", &f->full_admission,
              "full-cache requests: optimistic (grow, preempt when the pool runs dry) or "
              "guaranteed (reserve prompt + max_new_tokens at admission, never preempted)");
  p.AddInt("block-size", &f->block_size, "KV cache block size in tokens");
  p.AddInt("kv-cache-blocks", &f->kv_cache_blocks, "KV pool size in blocks (overrides memory)");
  p.AddString("kv-cache-memory", &f->kv_cache_memory,
              "KV pool size, e.g. 1GiB or 512MiB (default: 1GiB on the CPU; on CUDA what "
              "--gpu-memory-utilization leaves)");
  p.AddFloat("gpu-memory-utilization", &f->gpu_memory_utilization,
             "CUDA: fraction of the GPU's memory for weights, activations and the KV pool");
  p.AddInt("cuda-graph-max-batch", &f->cuda_graph_max_batch,
           "CUDA: decode steps of up to this many sequences replay captured CUDA graphs "
           "(0: launch every kernel each step)");
  p.AddInt("threads", &f->threads, "CPU threads for the engine (0: all cores)");
  p.AddFlag("no-weight-packing", &f->no_weight_packing,
            "CPU: read Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 matrices in the file's row layout instead of "
            "packing them at load (half the matrix-product speed)");
}

absl::StatusOr<server::EngineOptions> EngineOptionsFromFlags(const EngineFlags& f) {
  if (!(f.gpu_memory_utilization > 0.0f && f.gpu_memory_utilization <= 1.0f)) {
    return absl::InvalidArgumentError("--gpu-memory-utilization must be in (0, 1]");
  }
  if (f.kv_cache_blocks < 0) return absl::InvalidArgumentError("--kv-cache-blocks must not be negative");
  if (f.max_num_seqs < 1 || f.max_num_batched_tokens < 1 || f.block_size < 1 || f.threads < 0 ||
      f.cuda_graph_max_batch < 0) {
    return absl::InvalidArgumentError(
        "--max-num-seqs, --max-num-batched-tokens and --block-size must be at least 1, "
        "--threads and --cuda-graph-max-batch at least 0");
  }
  server::EngineOptions o;
  ASSIGN_OR_RETURN(o.device, engine::ResolveDevice(f.device));
  o.block_size = f.block_size;
  o.max_num_seqs = f.max_num_seqs;
  o.max_num_batched_tokens = f.max_num_batched_tokens;
  if (f.full_admission == "guaranteed") {
    o.full_admission = scheduler::FullAdmission::kGuaranteed;
  } else if (f.full_admission != "optimistic") {
    return absl::InvalidArgumentError(
        StrCat("--full-admission: unknown '", f.full_admission, "' (optimistic or guaranteed)"));
  }
  o.threads = static_cast<int>(f.threads);
  o.pack_weights = !f.no_weight_packing;
  o.num_blocks = f.kv_cache_blocks;
  if (!f.kv_cache_memory.empty()) {
    ASSIGN_OR_RETURN(o.kv_cache_bytes, ParseByteSize(f.kv_cache_memory, "--kv-cache-memory"));
  }
  o.gpu_memory_utilization = f.gpu_memory_utilization;
  o.cuda_graph_max_batch = f.cuda_graph_max_batch;
  return o;
}

}  // namespace morphserve::cli
