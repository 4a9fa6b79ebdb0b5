// Continuous batching under a fixed KV pool: `full` against `morphkv` on the
// same requests and the same pool, and the batched forward pass's output
// tokens/s against batch size.
//   bench_batching --model PATH [--threads 2] [--requests 64] [--prompt-tokens 128]
//                  [--gen-tokens 512] [--pool-seqs 16] [--window 16] [--capacity 128]
//                  [--batch-sizes 1,2,4,8,16,32,64] [--device cpu|cuda]
//                  [--load-format dummy] [--out DIR]
// The pool holds --pool-seqs full-length sequences (prompt + generated). All
// requests arrive at once, greedy, end-of-sequence ignored. Writes
// DIR/batching.md (tables) and DIR/batching.png (KV blocks and decoding
// sequences over time; tokens/s against batch size). With --device cuda and
// a dummy Llama-3.1-8B-shaped model it is the GPU throughput comparison:
//   bench_batching --device cuda --load-format dummy
//       --model benchmarks/configs/llama-3.1-8b --prompt-tokens 1024
//       --gen-tokens 8192 --window 32 --capacity 2048 --pool-seqs 32 ...
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "common/kv_policy.h"
#include "common/strings.h"
#include "engine/model/model.h"
#include "server/cli/arg_parser.h"
#include "server/engine_loop.h"
#include "tools/plot/line_plot.h"

namespace morphserve {
namespace {

using Clock = std::chrono::steady_clock;

struct RunResult {
  std::string label;
  server::EngineStats stats;
  std::vector<server::StepSample> timeline;
  double seconds = 0.0;
  int64_t output_tokens = 0;
  double mean_decoding() const {
    return stats.decode_steps > 0
               ? static_cast<double>(stats.decoding_sum) / static_cast<double>(stats.decode_steps)
               : 0.0;
  }
};

// Submits `requests` prompts at once and reads every stream to its end.
RunResult Run(const engine::Model& model, const server::EngineOptions& options,
              const KvPolicyConfig& kv, int64_t requests, int64_t prompt_tokens, int64_t gen_tokens,
              const std::string& label) {
  auto created = server::EngineLoop::Create(model, options);
  if (!created.ok()) {
    std::fprintf(stderr, "%s: %s\n", label.c_str(), std::string(created.status().message()).c_str());
    std::exit(1);
  }
  server::EngineLoop& engine = **created;
  std::mt19937 rng(7);
  std::vector<std::shared_ptr<server::TokenStream>> streams;
  for (int64_t i = 0; i < requests; ++i) {
    server::GenerationRequest r;
    r.prompt.resize(prompt_tokens);
    for (int32_t& t : r.prompt) {
      t = static_cast<int32_t>(rng() % std::min<int64_t>(model.config.vocab_size, 32000));
    }
    r.sampling.temperature = 0.0f;
    r.stop.max_new_tokens = gen_tokens;
    r.stop.ignore_eos = true;
    r.kv = kv;
    auto s = engine.Submit(std::move(r));
    if (!s.ok()) {
      std::fprintf(stderr, "%s: %s\n", label.c_str(), std::string(s.status().message()).c_str());
      std::exit(1);
    }
    streams.push_back(s->second);
  }
  const Clock::time_point start = Clock::now();
  Clock::time_point report = start;
  RunResult result{label, {}, {}, 0.0, 0};
  size_t done = 0;
  std::vector<bool> ended(streams.size(), false);
  while (done < streams.size()) {
    bool progressed = false;
    for (size_t i = 0; i < streams.size(); ++i) {
      if (ended[i]) continue;
      while (auto e = streams[i]->Pop(std::chrono::milliseconds(0))) {
        progressed = true;
        if (e->token >= 0) ++result.output_tokens;
        if (e->last()) {
          ended[i] = true;
          ++done;
          break;
        }
      }
    }
    if (Clock::now() - report > std::chrono::seconds(5)) {
      report = Clock::now();
      const server::EngineStats s = engine.Stats();
      std::fprintf(stderr, "[%s] %zu/%zu requests done, %lld running, %lld tokens\n", label.c_str(),
                   done, streams.size(), static_cast<long long>(s.running),
                   static_cast<long long>(result.output_tokens));
    }
    if (!progressed) std::this_thread::sleep_for(std::chrono::microseconds(500));
  }
  result.seconds = std::chrono::duration<double>(Clock::now() - start).count();
  result.stats = engine.Stats();
  result.timeline = engine.Timeline();
  return result;
}

int Main(int argc, char** argv) {
  std::string model_path, batch_sizes = "1,2,4,8,16,32,64", out = "bench-out";
  std::string device = "cpu", load_format = "auto";
  int64_t threads = 2, requests = 64, prompt_tokens = 128, gen_tokens = 512, pool_seqs = 16;
  int64_t window = 16, capacity = 128, sweep_tokens = 64;
  bool full_guaranteed = false;
  cli::ArgParser p("bench_batching --model PATH [options]",
                   "full vs morphkv under one KV pool, and tokens/s against batch size.");
  p.AddString("model", &model_path, "model file or directory");
  p.AddInt("threads", &threads, "CPU threads");
  p.AddInt("requests", &requests, "requests in the policy comparison");
  p.AddInt("prompt-tokens", &prompt_tokens, "prompt length");
  p.AddInt("gen-tokens", &gen_tokens, "tokens generated per request");
  p.AddInt("pool-seqs", &pool_seqs, "KV pool size in full-length sequences");
  p.AddInt("window", &window, "morphkv W");
  p.AddInt("capacity", &capacity, "morphkv C");
  p.AddFlag("full-guaranteed", &full_guaranteed,
            "also run `full` with guaranteed admission (reserved at its maximum)");
  p.AddString("batch-sizes", &batch_sizes, "batch sizes for the throughput sweep (empty: skip)");
  p.AddInt("sweep-tokens", &sweep_tokens, "tokens generated per request in the sweep");
  p.AddString("out", &out, "output directory");
  p.AddString("device", &device, "cpu or cuda");
  p.AddString("load-format", &load_format, "auto, gguf, safetensors or dummy");
  if (absl::Status s = p.Parse(argc, argv, 1);
      !s.ok() || p.help_requested() || model_path.empty()) {
    std::fputs(p.Help().c_str(), s.ok() ? stdout : stderr);
    return s.ok() && p.help_requested() ? 0 : 2;
  }
  auto format = engine::ParseLoadFormat(load_format);
  if (!format.ok()) {
    std::fprintf(stderr, "%s\n", std::string(format.status().message()).c_str());
    return 2;
  }
  auto loaded = engine::LoadModel({.path = model_path, .format = *format});
  if (!loaded.ok()) {
    std::fprintf(stderr, "%s\n", std::string(loaded.status().message()).c_str());
    return 1;
  }
  const engine::Model& model = **loaded;
  std::filesystem::create_directories(out);

  const int64_t block_size = 16;
  server::EngineOptions options;
  options.device = device;
  options.block_size = block_size;
  options.threads = static_cast<int>(threads);
  options.record_timeline = true;
  options.num_blocks = pool_seqs * ((prompt_tokens + gen_tokens + block_size - 1) / block_size);
  KvPolicyConfig full;
  KvPolicyConfig morph;
  morph.kind = KvPolicyKind::kMorphKv;
  morph.window = window;
  morph.capacity = capacity;
  std::vector<RunResult> runs;
  runs.push_back(Run(model, options, full, requests, prompt_tokens, gen_tokens, "full"));
  runs.push_back(Run(model, options, morph, requests, prompt_tokens, gen_tokens,
                     absl::StrFormat("morphkv W%d C%d", window, capacity)));
  if (full_guaranteed) {
    server::EngineOptions guaranteed = options;
    guaranteed.full_admission = scheduler::FullAdmission::kGuaranteed;
    runs.push_back(Run(model, guaranteed, full, requests, prompt_tokens, gen_tokens,
                       "full, guaranteed admission"));
  }

  std::string md = absl::StrFormat(
      "%d requests (prompt %d, %d generated, EOS ignored), KV pool of %d blocks of %d tokens "
      "(%d full-length sequences), %d threads.\n\n"
      "| policy | mean decoding / step | peak decoding | output tok/s | preemptions | peak KV "
      "blocks used | seconds |\n|---|---:|---:|---:|---:|---:|---:|\n",
      requests, prompt_tokens, gen_tokens, options.num_blocks, block_size, pool_seqs, threads);
  for (const RunResult& r : runs) {
    md += absl::StrFormat("| %s | %.1f | %d | %.1f | %d | %d of %d | %.1f |\n", r.label,
                          r.mean_decoding(), r.stats.peak_running, r.output_tokens / r.seconds,
                          r.stats.preemptions, r.stats.peak_used_blocks, r.stats.total_blocks,
                          r.seconds);
  }

  std::vector<plot::LinePlot> panels(2);
  panels[0] = {"KV blocks in use", "seconds", "blocks", false, 0.0, std::nullopt, {}};
  panels[1] = {"Sequences decoding per step", "seconds", "sequences", false, 0.0, std::nullopt, {}};
  for (const RunResult& r : runs) {
    plot::Series blocks{r.label, {}, {}}, decoding{r.label, {}, {}};
    for (const server::StepSample& s : r.timeline) {
      blocks.x.push_back(s.seconds);
      blocks.y.push_back(static_cast<double>(s.used_blocks));
      decoding.x.push_back(s.seconds);
      decoding.y.push_back(static_cast<double>(s.decoding));
    }
    panels[0].series.push_back(std::move(blocks));
    panels[1].series.push_back(std::move(decoding));
  }

  if (!batch_sizes.empty()) {
    md += absl::StrFormat(
        "\nBatched forward pass: B requests at once (prompt 16, %d generated each), pool large "
        "enough for all, `full` policy.\n\n| batch size | output tok/s | mean decoding / step "
        "|\n|---:|---:|---:|\n",
        sweep_tokens);
    plot::LinePlot sweep{"Output tokens/s against batch size",
                         "batch size",
                         "tokens/s",
                         true,
                         0.0,
                         std::nullopt,
                         {}};
    plot::Series series{"full", {}, {}};
    for (absl::string_view part : absl::StrSplit(batch_sizes, ',', absl::SkipEmpty())) {
      int64_t b = 0;
      if (!absl::SimpleAtoi(part, &b) || b < 1) continue;
      server::EngineOptions o = options;
      o.record_timeline = false;
      o.num_blocks = b * ((16 + sweep_tokens + block_size - 1) / block_size);
      const RunResult r = Run(model, o, full, b, 16, sweep_tokens, absl::StrFormat("batch %d", b));
      md += absl::StrFormat("| %d | %.1f | %.1f |\n", b, r.output_tokens / r.seconds,
                            r.mean_decoding());
      series.x.push_back(static_cast<double>(b));
      series.y.push_back(r.output_tokens / r.seconds);
    }
    sweep.series.push_back(std::move(series));
    panels.push_back(std::move(sweep));
  }
  std::ofstream(out + "/batching.md") << md;
  if (absl::Status s =
          plot::WritePlotGridPng(panels, static_cast<int>(panels.size()),
                                 600 * static_cast<int>(panels.size()), 500, out + "/batching.png");
      !s.ok()) {
    std::fprintf(stderr, "%s\n", std::string(s.message()).c_str());
    return 1;
  }
  std::fputs(md.c_str(), stdout);
  return 0;
}

}  // namespace
}  // namespace morphserve

int main(int argc, char** argv) { return morphserve::Main(argc, argv); }
