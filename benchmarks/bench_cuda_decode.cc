// Decode step time of the CUDA backend against batch size, and the share of
// the GPU's memory bandwidth it reaches:
//   bench_cuda_decode [--model DIR] [--context 1024] [--steps 20]
//                     [--batch-sizes 1,2,4,...] [--json PATH]
// The model defaults to a Llama-3.1-8B-shaped config with dummy bf16
// weights (benchmarks/configs/llama-3.1-8b). Each batch size runs B
// sequences that each attend to `context` cached tokens plus the ones the
// run adds; the step time is the median over `steps` decode steps (the
// whole ForwardAndSample call: metadata upload, every kernel, greedy
// sampling on the device, the tokens back to the host). Bytes per step = every weight matrix once (bf16; the embedding
// gather aside) + the K and V every sequence reads. The reference
// bandwidth is a device-to-device cudaMemcpy of 1 GiB (read + write
// counted), the best of 10.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <memory>
#include <numeric>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "common/sampling_params.h"
#include "engine/backend/backend_registry.h"
#include "engine/model/model.h"
#include "nlohmann/json.hpp"
#include "server/cli/arg_parser.h"

namespace morphserve {
namespace {

using Clock = std::chrono::steady_clock;

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
  int64_t context = 1024, steps = 20, block_size = 16;
  cli::ArgParser p("bench_cuda_decode [options]",
                   "Decode step time of the CUDA backend against batch size.");
  p.AddString("model", &model_path, "model file or directory (default: Llama-3.1-8B shape)");
  p.AddString("load-format", &load_format, "auto, gguf, safetensors or dummy");
  p.AddInt("context", &context, "cached tokens each sequence attends to");
  p.AddInt("steps", &steps, "timed decode steps per batch size (median reported)");
  p.AddString("batch-sizes", &batch_sizes, "comma-separated batch sizes");
  p.AddInt("block-size", &block_size, "KV block size");
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
  if (batches.empty() || context < 1 || steps < 1) {
    std::fprintf(stderr, "--batch-sizes, --context and --steps must be positive\n");
    return 2;
  }
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
  const int64_t max_batch = *std::max_element(batches.begin(), batches.end());
  const int64_t total_steps = steps + 3;
  const int64_t per_seq = (context + total_steps + block_size - 1) / block_size;
  engine::BackendOptions options;
  options.device = "cuda";
  options.block_size = block_size;
  options.num_blocks = max_batch * per_seq;
  std::fprintf(stderr, "uploading weights, %lld KV blocks ...\n",
               static_cast<long long>(options.num_blocks));
  auto backend = engine::CreateBackend(**model, options);
  if (!backend.ok()) {
    std::fprintf(stderr, "%s\n", std::string(backend.status().message()).c_str());
    return 1;
  }
  const double weight_bytes = WeightBytes(c);
  const double kv_bytes_per_token = 2.0 * 2.0 * c.num_layers * c.kv_dim();
  std::printf("| batch | step ms | tokens/s | GB read per step | GB/s | share of copy bandwidth |\n"
              "|---:|---:|---:|---:|---:|---:|\n");
  nlohmann::json results = nlohmann::json::array();
  for (int64_t batch : batches) {
    // Sequences without a KvSequence: positions are slots, so each starts
    // `context` tokens in without a prefill (the cache's contents do not
    // change the work).
    std::vector<std::vector<int32_t>> tables(batch);
    for (int64_t s = 0; s < batch; ++s) {
      tables[s].resize(per_seq);
      std::iota(tables[s].begin(), tables[s].end(), static_cast<int32_t>(s * per_seq));
    }
    std::vector<int32_t> tokens(batch);
    for (int64_t s = 0; s < batch; ++s) tokens[s] = static_cast<int32_t>((s * 7919) % c.vocab_size);
    std::vector<engine::SequenceInput> inputs(batch);
    std::vector<engine::SampleRow> rows(batch);
    SamplingParams greedy;
    greedy.temperature = 0.0f;
    for (int64_t s = 0; s < batch; ++s) {
      rows[s] = {s, true};
      if (absl::Status st = (*backend)->AddRequest(s, greedy, {&tokens[s], 1}, total_steps);
          !st.ok()) {
        std::fprintf(stderr, "%s\n", std::string(st.message()).c_str());
        return 1;
      }
    }
    std::vector<engine::SampleResult> sampled;
    std::vector<double> times;
    for (int64_t step = 0; step < total_steps; ++step) {
      for (int64_t s = 0; s < batch; ++s) inputs[s] = {s, 1, context + step, tables[s], nullptr, false};
      const Clock::time_point t0 = Clock::now();
      const absl::Status st = (*backend)->ForwardAndSample({tokens, inputs}, rows, &sampled);
      const double seconds = std::chrono::duration<double>(Clock::now() - t0).count();
      if (!st.ok()) {
        std::fprintf(stderr, "batch %lld: %s\n", static_cast<long long>(batch),
                     std::string(st.message()).c_str());
        return 1;
      }
      if (step >= 3) times.push_back(seconds);
      for (int64_t s = 0; s < batch; ++s) tokens[s] = sampled[s].token;
    }
    for (int64_t s = 0; s < batch; ++s) (*backend)->RemoveRequest(s);
    const double step_s = Median(times);
    const double mean_context = static_cast<double>(context) + 3 + (steps - 1) / 2.0;
    const double bytes = weight_bytes + batch * mean_context * kv_bytes_per_token;
    const double share = bytes / step_s / bandwidth;
    std::printf("| %lld | %.3f | %.1f | %.2f | %.0f | %.1f%% |\n", static_cast<long long>(batch),
                step_s * 1e3, batch / step_s, bytes * 1e-9, bytes / step_s * 1e-9, 100 * share);
    std::fflush(stdout);
    results.push_back({{"batch", batch},
                       {"step_ms", step_s * 1e3},
                       {"tokens_per_s", batch / step_s},
                       {"bytes_per_step", bytes},
                       {"bandwidth_share", share}});
  }
  std::printf("\ncopy bandwidth %.0f GB/s; weights %.2f GB; context %lld\n", bandwidth * 1e-9,
              weight_bytes * 1e-9, static_cast<long long>(context));
  if (!json_path.empty()) {
    nlohmann::json out = {{"model", model_path},
                          {"context", context},
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
