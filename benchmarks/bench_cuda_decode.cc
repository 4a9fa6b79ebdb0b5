// Decode step time of the CUDA backend against batch size, and the share of
// the GPU's memory bandwidth it reaches:
//   bench_cuda_decode [--model DIR] [--context 1024] [--steps 20]
//                     [--batch-sizes 1,2,4,...] [--kv-policy full|morphkv]
//                     [--kv-window 32] [--cuda-graph-max-batch 64] [--json PATH]
// The model defaults to a Llama-3.1-8B-shaped config with dummy bf16
// weights (benchmarks/configs/llama-3.1-8b). Each batch size runs B
// sequences that each attend to `context` cached tokens plus the ones the
// run adds; the step time is the median over `steps` decode steps (the
// whole ForwardAndSample call: metadata upload, every kernel, greedy
// sampling on the device, the tokens back to the host). Bytes per step =
// every weight matrix once (bf16; the embedding gather aside) + the K and V
// every sequence attends to. The reference bandwidth is a device-to-device
// cudaMemcpy of 1 GiB (read + write counted), the best of 10.
//
// Batch sizes up to --cuda-graph-max-batch are timed twice: replaying CUDA
// graphs, and launching every kernel (the "eager" column), which shows what
// the graphs save.
//
// With --kv-policy morphkv (budget C = context, window W), each sequence is
// first prefilled with `context` tokens, so that every timed step attends to
// C+1 resident tokens, scores them against the window and evicts one per
// (layer, KV head): against `full` at the same context, the step time
// difference is the cost of MorphKV's scoring. Each batch size is then timed
// once more with the scoring's first pass run on its own instead of inside
// the decode attention (the "unfused" column), which shows what fusing saves.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <memory>
#include <numeric>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "common/kv_policy.h"
#include "common/status.h"
#include "common/sampling_params.h"
#include "engine/backend/backend_registry.h"
#include "engine/backend/cuda_backend.h"
#include "engine/kv/kv_sequence.h"
#include "engine/model/model.h"
#include "nlohmann/json.hpp"
#include "server/cli/arg_parser.h"

namespace morphserve {
namespace {

using Clock = std::chrono::steady_clock;

// Prompt tokens per prefill step (morphkv).
constexpr int64_t kPrefillChunk = 1024;

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Device-to-device copy bandwidth in bytes/s (read + write), or 0 on error.
double CopyBandwidth() {
  constexpr size_t kBytes = size_t{1} << 30;
  void* a = nullptr;
  void* b = nullptr;
  if (cudaMalloc(&a, kBytes) != cudaSuccess || cudaMalloc(&b, kBytes) != cudaSuccess) return 0;
  cudaEvent_t start, stop;
  cudaEventCreate(&start);
  cudaEventCreate(&stop);
  float best_ms = 1e30f;
  for (int i = 0; i < 10; ++i) {
    cudaEventRecord(start);
    cudaMemcpy(b, a, kBytes, cudaMemcpyDeviceToDevice);
    cudaEventRecord(stop);
    cudaEventSynchronize(stop);
    float ms = 0;
    cudaEventElapsedTime(&ms, start, stop);
    best_ms = std::min(best_ms, ms);
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  cudaFree(a);
  cudaFree(b);
  return 2.0 * static_cast<double>(kBytes) / (best_ms * 1e-3);
}

// Bytes of every weight matrix the decode step reads once (bf16).
double WeightBytes(const engine::ModelConfig& c) {
  const double per_layer = static_cast<double>(c.hidden_size) *
                           (c.q_dim() + 2 * c.kv_dim() + c.q_dim() + 3 * c.intermediate_size);
  return 2.0 * (per_layer * c.num_layers + static_cast<double>(c.vocab_size) * c.hidden_size);
}

int Main(int argc, char** argv) {
  std::string model_path = MORPHSERVE_SOURCE_DIR "/benchmarks/configs/llama-3.1-8b";
  std::string load_format = "dummy", batch_sizes = "1,2,4,8,16,32,64,128,256", json_path;
  std::string policy_name = "full";
  int64_t context = 1024, steps = 20, block_size = 16, window = 32, graph_max_batch = 64;
  cli::ArgParser p("bench_cuda_decode [options]",
                   "Decode step time of the CUDA backend against batch size.");
  p.AddString("model", &model_path, "model file or directory (default: Llama-3.1-8B shape)");
  p.AddString("load-format", &load_format, "auto, gguf, safetensors or dummy");
  p.AddInt("context", &context, "cached tokens each sequence attends to");
  p.AddInt("steps", &steps, "timed decode steps per batch size (median reported)");
  p.AddString("batch-sizes", &batch_sizes, "comma-separated batch sizes");
  p.AddInt("block-size", &block_size, "KV block size");
  p.AddString("kv-policy", &policy_name, "full, or morphkv (budget C = --context)");
  p.AddInt("kv-window", &window, "morphkv: the window W");
  p.AddInt("cuda-graph-max-batch", &graph_max_batch,
           "batch sizes up to this replay CUDA graphs (and are also timed without)");
  p.AddString("json", &json_path, "also write the results as JSON here");
  if (absl::Status s = p.Parse(argc, argv, 1); !s.ok() || p.help_requested()) {
    std::fputs(p.Help().c_str(), s.ok() ? stdout : stderr);
    return s.ok() ? 0 : 2;
  }
  std::vector<int64_t> batches;
  for (absl::string_view part : absl::StrSplit(batch_sizes, ',', absl::SkipEmpty())) {
    int64_t b = 0;
    if (!absl::SimpleAtoi(part, &b) || b < 1) {
      std::fprintf(stderr, "--batch-sizes: bad entry '%s'\n", std::string(part).c_str());
      return 2;
    }
    batches.push_back(b);
  }
  if (batches.empty() || context < 1 || steps < 1 || graph_max_batch < 0) {
    std::fprintf(stderr, "--batch-sizes, --context and --steps must be positive\n");
    return 2;
  }
  KvPolicyConfig policy;
  if (policy_name == "morphkv") {
    policy.kind = KvPolicyKind::kMorphKv;
    policy.window = window;
    policy.capacity = context;
  } else if (policy_name != "full") {
    std::fprintf(stderr, "--kv-policy: full or morphkv\n");
    return 2;
  }
  const bool morphkv = policy.kind == KvPolicyKind::kMorphKv;
  const double bandwidth = CopyBandwidth();
  if (bandwidth <= 0) {
    std::fprintf(stderr, "no usable GPU\n");
    return 1;
  }

  engine::ModelLoadOptions load{.path = model_path};
  auto format = engine::ParseLoadFormat(load_format);
  if (!format.ok()) {
    std::fprintf(stderr, "%s\n", std::string(format.status().message()).c_str());
    return 2;
  }
  load.format = *format;
  std::fprintf(stderr, "loading %s ...\n", model_path.c_str());
  auto model = engine::LoadModel(load);
  if (!model.ok()) {
    std::fprintf(stderr, "%s\n", std::string(model.status().message()).c_str());
    return 1;
  }
  const engine::ModelConfig& c = (*model)->config;
  if (morphkv) {
    if (absl::Status st = policy.Validate(c.context_length); !st.ok()) {
      std::fprintf(stderr, "%s\n", std::string(st.message()).c_str());
      return 2;
    }
  }
  const int64_t max_batch = *std::max_element(batches.begin(), batches.end());
  const int64_t warmup = 3;
  const int64_t total_steps = steps + warmup;
  const int64_t per_seq = (context + total_steps + block_size - 1) / block_size;
  engine::BackendOptions options;
  options.device = "cuda";
  options.block_size = block_size;
  options.num_blocks = max_batch * per_seq;
  options.max_step_tokens = std::max<int64_t>(kPrefillChunk, max_batch);
  options.cuda_graph_max_batch = graph_max_batch;
  std::fprintf(stderr, "uploading weights, %lld KV blocks ...\n",
               static_cast<long long>(options.num_blocks));
  auto backend = engine::CreateBackend(**model, options);
  if (!backend.ok()) {
    std::fprintf(stderr, "%s\n", std::string(backend.status().message()).c_str());
    return 1;
  }
  auto* cuda = dynamic_cast<engine::CudaBackend*>(backend->get());
  const double weight_bytes = WeightBytes(c);
  const double kv_bytes_per_token = 2.0 * 2.0 * c.num_layers * c.kv_dim();

  // The median decode step of `batch` sequences, with graphs for batches up
  // to `graphs` and MorphKV's scoring fused into the attention or not; or
  // the error.
  const auto time_batch = [&](int64_t batch, int64_t graphs,
                              bool fused = true) -> absl::StatusOr<double> {
    if (cuda != nullptr) {
      cuda->set_graph_max_batch(graphs);
      cuda->set_fused_scoring(fused);
    }
    std::vector<std::vector<int32_t>> tables(batch);
    std::vector<std::unique_ptr<engine::KvSequence>> kv(batch);
    std::vector<int32_t> tokens(batch);
    for (int64_t s = 0; s < batch; ++s) {
      tables[s].resize(per_seq);
      std::iota(tables[s].begin(), tables[s].end(), static_cast<int32_t>(s * per_seq));
      tokens[s] = static_cast<int32_t>((s * 7919) % c.vocab_size);
    }
    if (morphkv) {
      // Prefill `context` tokens per sequence, in chunks, one at a time.
      std::vector<int32_t> prompt(kPrefillChunk);
      std::vector<float> logits;
      for (int64_t s = 0; s < batch; ++s) {
        kv[s] = std::make_unique<engine::KvSequence>(policy, (*backend)->cache_shape(),
                                                     c.num_heads, per_seq * block_size);
        for (int64_t begin = 0; begin < context; begin += kPrefillChunk) {
          const int64_t n = std::min(kPrefillChunk, context - begin);
          for (int64_t i = 0; i < n; ++i) {
            prompt[i] = static_cast<int32_t>((s * 31 + begin + i) % c.vocab_size);
          }
          const std::vector<engine::SequenceInput> chunk = {
              {0, n, begin, tables[s], kv[s].get(), begin + n < context}};
          RETURN_IF_ERROR((*backend)->Forward(
              {std::span<const int32_t>(prompt.data(), n), chunk, false}, &logits));
        }
      }
    }
    std::vector<engine::SequenceInput> inputs(batch);
    std::vector<engine::SampleRow> rows(batch);
    SamplingParams greedy;
    greedy.temperature = 0.0f;
    for (int64_t s = 0; s < batch; ++s) {
      rows[s] = {s, true};
      RETURN_IF_ERROR((*backend)->AddRequest(s, greedy, {&tokens[s], 1}, total_steps));
    }
    std::vector<engine::SampleResult> sampled;
    std::vector<double> times;
    absl::Status status = absl::OkStatus();
    for (int64_t step = 0; step < total_steps && status.ok(); ++step) {
      for (int64_t s = 0; s < batch; ++s) {
        // Without a KvSequence, positions are slots: each sequence starts
        // `context` tokens in without a prefill (the cache's contents do
        // not change the work).
        inputs[s] = morphkv ? engine::SequenceInput{s, 1, kv[s]->num_tokens(), tables[s],
                                                    kv[s].get(), false}
                            : engine::SequenceInput{s, 1, context + step, tables[s], nullptr,
                                                    false};
      }
      const Clock::time_point t0 = Clock::now();
      status = (*backend)->ForwardAndSample({tokens, inputs}, rows, &sampled);
      const double seconds = std::chrono::duration<double>(Clock::now() - t0).count();
      if (step >= warmup) times.push_back(seconds);
      for (int64_t s = 0; s < batch && status.ok(); ++s) tokens[s] = sampled[s].token;
    }
    for (int64_t s = 0; s < batch; ++s) (*backend)->RemoveRequest(s);
    RETURN_IF_ERROR(status);
    return Median(times);
  };

  std::printf("| batch | step ms | eager step ms | unfused step ms | tokens/s | GB read per step | "
              "GB/s | share of copy bandwidth |\n|---:|---:|---:|---:|---:|---:|---:|---:|\n");
  nlohmann::json results = nlohmann::json::array();
  for (int64_t batch : batches) {
    absl::StatusOr<double> step_s = time_batch(batch, graph_max_batch);
    absl::StatusOr<double> eager_s = batch <= graph_max_batch ? time_batch(batch, 0) : step_s;
    absl::StatusOr<double> unfused_s =
        morphkv ? time_batch(batch, graph_max_batch, /*fused=*/false) : step_s;
    for (const absl::StatusOr<double>* t : {&step_s, &eager_s, &unfused_s}) {
      if (t->ok()) continue;
      const absl::Status& st = t->status();
      std::fprintf(stderr, "batch %lld: %s\n", static_cast<long long>(batch),
                   std::string(st.message()).c_str());
      return 1;
    }
    // Tokens each sequence attends to, on average over the timed steps.
    const double attended = morphkv ? static_cast<double>(context) + 1
                                    : static_cast<double>(context) + warmup + (steps - 1) / 2.0;
    const double bytes = weight_bytes + batch * attended * kv_bytes_per_token;
    const double share = bytes / *step_s / bandwidth;
    const std::string unfused = morphkv ? absl::StrFormat("%.3f", *unfused_s * 1e3) : "-";
    std::printf("| %lld | %.3f | %.3f | %s | %.1f | %.2f | %.0f | %.1f%% |\n",
                static_cast<long long>(batch), *step_s * 1e3, *eager_s * 1e3, unfused.c_str(),
                batch / *step_s, bytes * 1e-9, bytes / *step_s * 1e-9, 100 * share);
    std::fflush(stdout);
    results.push_back({{"batch", batch},
                       {"step_ms", *step_s * 1e3},
                       {"eager_step_ms", *eager_s * 1e3},
                       {"unfused_step_ms", morphkv ? nlohmann::json(*unfused_s * 1e3) : nullptr},
                       {"cuda_graphs", batch <= graph_max_batch},
                       {"tokens_per_s", batch / *step_s},
                       {"bytes_per_step", bytes},
                       {"bandwidth_share", share}});
  }
  std::printf("\ncopy bandwidth %.0f GB/s; weights %.2f GB; context %lld\n", bandwidth * 1e-9,
              weight_bytes * 1e-9, static_cast<long long>(context));
  if (!json_path.empty()) {
    nlohmann::json out = {{"model", model_path},
                          {"context", context},
                          {"kv_policy", policy_name},
                          {"kv_window", morphkv ? window : 0},
                          {"cuda_graph_max_batch", graph_max_batch},
                          {"copy_bandwidth_bytes_per_s", bandwidth},
                          {"weight_bytes", weight_bytes},
                          {"results", results}};
    std::ofstream(json_path) << out.dump(2) << "\n";
  }
  return 0;
}

}  // namespace
}  // namespace morphserve

int main(int argc, char** argv) { return morphserve::Main(argc, argv); }
