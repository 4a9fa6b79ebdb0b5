// Single-sequence prefill and decode throughput of the CPU forward pass, the
// numbers llama-bench reports as pp<N> and tg<N>:
//   bench_forward --model PATH [--threads 2] [--prompt-tokens 512]
//                 [--gen-tokens 128] [--repeats 3] [--no-weight-packing] [--json]
// Prefill runs the prompt in one forward pass; decode runs tokens one at a
// time after a short prompt. Reports the median tokens/s and the peak
// resident memory of the process.
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "common/thread_pool.h"
#include "engine/kv/paged_kv_cache.h"
#include "engine/model/llama_forward.h"
#include "engine/model/model.h"
#include "server/cli/arg_parser.h"

namespace morphserve {
namespace {

using Clock = std::chrono::steady_clock;

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

int Main(int argc, char** argv) {
  std::string model_path, load_format = "auto";
  int64_t num_layers = 0;
  int64_t threads = 2, prompt_tokens = 512, gen_tokens = 128, repeats = 3;
  bool json = false;
  bool no_weight_packing = false;
  cli::ArgParser p("bench_forward --model PATH [options]",
                   "Measures single-sequence prefill and decode tokens/s.");
  p.AddString("model", &model_path, "model file or directory");
  p.AddString("load-format", &load_format, "auto, gguf, safetensors or dummy");
  p.AddInt("num-layers", &num_layers, "dummy weights only: keep this many layers (0: all)");
  p.AddInt("threads", &threads, "CPU threads");
  p.AddInt("prompt-tokens", &prompt_tokens, "tokens in the prefill measurement");
  p.AddInt("gen-tokens", &gen_tokens, "tokens in the decode measurement");
  p.AddInt("repeats", &repeats, "repetitions; the median is reported");
  p.AddFlag("no-weight-packing", &no_weight_packing,
            "read the weights in their row layout (see ForwardOptions::pack_weights)");
  p.AddFlag("json", &json, "print one JSON object");
  if (absl::Status s = p.Parse(argc, argv, 1); !s.ok() || p.help_requested() ||
                                                 model_path.empty()) {
    std::fputs(p.Help().c_str(), s.ok() ? stdout : stderr);
    return s.ok() && p.help_requested() ? 0 : 2;
  }
  engine::ModelLoadOptions load{.path = model_path};
  auto format = engine::ParseLoadFormat(load_format);
  if (!format.ok()) {
    std::fprintf(stderr, "%s\n", std::string(format.status().message()).c_str());
    return 2;
  }
  load.format = *format;
  load.num_layers_override = num_layers;
  auto model = engine::LoadModel(load);
  if (!model.ok()) {
    std::fprintf(stderr, "%s\n", std::string(model.status().message()).c_str());
    return 1;
  }
  const engine::ModelConfig& c = (*model)->config;
  const int64_t total = prompt_tokens + gen_tokens + 8;
  const int64_t block_size = 16;
  const int64_t blocks = (total + block_size - 1) / block_size;
  engine::PagedKvCache cache({c.num_layers, c.num_kv_heads, c.head_dim, block_size, blocks});
  std::vector<int32_t> table(blocks);
  for (int64_t b = 0; b < blocks; ++b) table[b] = static_cast<int32_t>(b);
  ThreadPool pool(static_cast<int>(threads));
  engine::LlamaForward forward(**model, &pool, {.pack_weights = !no_weight_packing});
  std::mt19937 rng(1);
  std::vector<int32_t> tokens(total);
  for (int32_t& t : tokens) t = static_cast<int32_t>(rng() % std::min<int64_t>(c.vocab_size, 32000));
  std::vector<float> logits;

  auto run = [&](int64_t begin, int64_t n) {
    const engine::SequenceInput seq{0, n, begin, table};
    const absl::Status s = forward.Forward(
        {std::span<const int32_t>(tokens).subspan(begin, n), {&seq, 1}, false}, cache, &logits);
    if (!s.ok()) std::fprintf(stderr, "forward failed: %s\n", std::string(s.message()).c_str());
  };
  run(0, 8);  // warm-up
  std::vector<double> prefill, decode;
  for (int64_t r = 0; r < repeats; ++r) {
    const Clock::time_point t0 = Clock::now();
    run(0, prompt_tokens);
    const Clock::time_point t1 = Clock::now();
    prefill.push_back(prompt_tokens / std::chrono::duration<double>(t1 - t0).count());
    run(0, 8);
    const Clock::time_point t2 = Clock::now();
    for (int64_t i = 0; i < gen_tokens; ++i) run(8 + i, 1);
    const Clock::time_point t3 = Clock::now();
    decode.push_back(gen_tokens / std::chrono::duration<double>(t3 - t2).count());
    std::fprintf(stderr, "repeat %lld/%lld: prefill %.1f tok/s, decode %.1f tok/s\n",
                 static_cast<long long>(r + 1), static_cast<long long>(repeats), prefill.back(),
                 decode.back());
  }
  struct rusage usage {};
  getrusage(RUSAGE_SELF, &usage);
  const double peak_mib = usage.ru_maxrss / 1024.0;
  if (json) {
    std::printf(
        "{\"model\": \"%s\", \"threads\": %lld, \"prompt_tokens\": %lld, \"gen_tokens\": %lld, "
        "\"prefill_tokens_per_s\": %.2f, \"decode_tokens_per_s\": %.2f, \"peak_rss_mib\": %.1f}\n",
        model_path.c_str(), static_cast<long long>(threads), static_cast<long long>(prompt_tokens),
        static_cast<long long>(gen_tokens), Median(prefill), Median(decode), peak_mib);
  } else {
    std::printf("pp%lld: %.1f tok/s  tg%lld: %.1f tok/s  peak RSS %.1f MiB  (%lld threads)\n",
                static_cast<long long>(prompt_tokens), Median(prefill),
                static_cast<long long>(gen_tokens), Median(decode), peak_mib,
                static_cast<long long>(threads));
  }
  return 0;
}

}  // namespace
}  // namespace morphserve

int main(int argc, char** argv) { return morphserve::Main(argc, argv); }
