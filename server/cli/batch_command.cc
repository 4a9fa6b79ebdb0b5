// `morphserve batch`: runs many requests through the engine loop (the
// scheduler, the KV pool and the batched forward pass the server uses) and
// reports throughput and concurrency. One prompt per line of --prompts; at
// most --concurrency requests are in flight at once.
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "common/status.h"
#include "common/strings.h"
#include "engine/model/model.h"
#include "nlohmann/json.hpp"
#include "server/cli/arg_parser.h"
#include "server/cli/commands.h"
#include "server/cli/engine_flags.h"
#include "server/cli/generation_options.h"
#include "server/cli/kv_options.h"
#include "server/engine_loop.h"

namespace morphserve::cli {
namespace {

using Clock = std::chrono::steady_clock;

struct BatchOptions {
  std::string model;
  std::string load_format = "auto";
  int64_t num_layers = 0;
  std::string prompts;
  bool chat = false;
  int64_t concurrency = 16;
  int64_t repeat = 1;
  GenerationFlags gen;
  KvFlags kv;
  EngineFlags engine;
  std::string output;
  bool json = false;
  std::string log_level = "warn";
};

absl::StatusOr<std::vector<std::string>> ReadLines(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(StrCat("cannot read prompts file ", path));
  std::vector<std::string> lines;
  std::string line;
  while (std::getline(in, line)) {
    if (line.find_first_not_of(" \t\r") != std::string::npos) lines.push_back(line);
  }
  if (lines.empty()) return absl::InvalidArgumentError(StrCat(path, " holds no prompts"));
  return lines;
}

struct InFlight {
  size_t index;
  int64_t id;
  std::shared_ptr<server::TokenStream> stream;
  std::vector<int32_t> tokens;
  std::string text;
};

// Failed requests are counted, and the first few say why on stderr (all of
// them are in --output).
class Failures {
 public:
  void Add(size_t index, const absl::Status& why) {
    if (count_++ < kShown) {
      std::fprintf(stderr, "[batch] request %zu failed: %s\n", index,
                   std::string(why.message()).c_str());
    }
  }
  size_t count() const { return count_; }
  void PrintUnshown() const {
    if (count_ > kShown) {
      std::fprintf(stderr, "[batch] ... and %zu more failed requests (--output lists them)\n",
                   count_ - kShown);
    }
  }

 private:
  static constexpr size_t kShown = 10;
  size_t count_ = 0;
};

absl::Status Run(const BatchOptions& o) {
  if (o.model.empty()) return absl::InvalidArgumentError("--model is required");
  if (o.prompts.empty()) return absl::InvalidArgumentError("--prompts is required");
  if (o.concurrency < 1 || o.repeat < 1) {
    return absl::InvalidArgumentError("--concurrency and --repeat must be at least 1");
  }
  ASSIGN_OR_RETURN(const std::vector<std::string> lines, ReadLines(o.prompts));
  engine::ModelLoadOptions load;
  load.path = o.model;
  ASSIGN_OR_RETURN(load.format, engine::ParseLoadFormat(o.load_format));
  load.num_layers_override = o.num_layers;
  ASSIGN_OR_RETURN(std::unique_ptr<engine::Model> model, engine::LoadModel(load));
  const engine::ModelConfig& cfg = model->config;

  server::GenerationRequest base;
  RETURN_IF_ERROR(GenerationParams(o.gen, &base.sampling, &base.stop));
  ASSIGN_OR_RETURN(base.kv, KvPolicyFromFlags(o.kv, cfg.context_length));
  std::vector<std::vector<int32_t>> prompts;
  for (const std::string& line : lines) {
    if (model->tokenizer != nullptr) {
      ASSIGN_OR_RETURN(std::vector<int32_t> t, EncodePrompt(*model->tokenizer, line, o.chat));
      prompts.push_back(std::move(t));
    } else {
      // No tokenizer (dummy weights): each line is space-separated token ids.
      std::vector<int32_t> t;
      for (absl::string_view part : absl::StrSplit(line, ' ', absl::SkipEmpty())) {
        int32_t id = 0;
        if (!absl::SimpleAtoi(part, &id)) {
          return absl::InvalidArgumentError("a model without a tokenizer takes token ids");
        }
        t.push_back(id);
      }
      prompts.push_back(std::move(t));
    }
  }

  ASSIGN_OR_RETURN(server::EngineOptions engine_options, EngineOptionsFromFlags(o.engine));
  engine_options.policies = {base.kv};
  ASSIGN_OR_RETURN(const std::unique_ptr<server::EngineLoop> engine_loop,
                   server::EngineLoop::Create(*model, engine_options));
  server::EngineLoop& engine = *engine_loop;
  RETURN_IF_ERROR(engine.SupportsPolicy(base.kv));

  const size_t total = prompts.size() * static_cast<size_t>(o.repeat);
  std::vector<InFlight> flying;
  std::vector<nlohmann::json> results(total);
  size_t next = 0, done = 0;
  Failures failures;
  int64_t output_tokens = 0;
  const Clock::time_point start = Clock::now();
  Clock::time_point last_report = start;
  while (done < total) {
    while (next < total && static_cast<int64_t>(flying.size()) < o.concurrency) {
      server::GenerationRequest r = base;
      r.prompt = prompts[next % prompts.size()];
      auto submitted = engine.Submit(std::move(r));
      if (!submitted.ok()) {
        results[next] = {{"index", next}, {"error", std::string(submitted.status().message())}};
        failures.Add(next, submitted.status());
        ++done;
      } else {
        flying.push_back({next, submitted->first, submitted->second, {}, {}});
      }
      ++next;
    }
    bool progressed = false;
    for (size_t i = 0; i < flying.size();) {
      InFlight& f = flying[i];
      bool ended = false;
      while (auto e = f.stream->Pop(std::chrono::milliseconds(0))) {
        progressed = true;
        if (e->token >= 0) {
          f.tokens.push_back(e->token);
          ++output_tokens;
        }
        f.text += e->text;
        if (!e->last()) continue;
        nlohmann::json r = {{"index", f.index}, {"tokens", f.tokens}, {"text", f.text}};
        if (!e->error.ok()) {
          r["error"] = std::string(e->error.message());
          failures.Add(f.index, e->error);
        } else {
          r["finish_reason"] = std::string(FinishReasonName(e->finish));
          nlohmann::json usage = {{"prompt_tokens", e->usage.prompt_tokens},
                                  {"completion_tokens", e->usage.completion_tokens},
                                  {"queue_seconds", e->usage.queue_seconds},
                                  {"time_to_first_token_seconds",
                                   e->usage.time_to_first_token_seconds}};
          AddKvUsage(e->usage.kv, usage);
          r["usage"] = std::move(usage);
        }
        results[f.index] = std::move(r);
        ended = true;
        break;
      }
      if (ended) {
        ++done;
        flying.erase(flying.begin() + static_cast<std::ptrdiff_t>(i));
      } else {
        ++i;
      }
    }
    const Clock::time_point now = Clock::now();
    if (now - last_report > std::chrono::seconds(2)) {
      last_report = now;
      const server::EngineStats s = engine.Stats();
      std::fprintf(stderr, "[batch] %zu/%zu done, %lld running, %lld waiting, %.1f tok/s\n", done,
                   total, static_cast<long long>(s.running), static_cast<long long>(s.waiting),
                   output_tokens / std::chrono::duration<double>(now - start).count());
    }
    if (!progressed) std::this_thread::sleep_for(std::chrono::microseconds(500));
  }
  failures.PrintUnshown();
  const size_t failed = failures.count();
  const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
  const server::EngineStats s = engine.Stats();
  if (!o.output.empty()) {
    std::ofstream out(o.output);
    for (const nlohmann::json& r : results) {
      out << r.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) << "\n";
    }
    if (!out) return absl::DataLossError(StrCat("failed writing ", o.output));
  }
  const nlohmann::json summary = {
      {"requests", total},
      {"failed", failed},
      {"output_tokens", output_tokens},
      {"seconds", seconds},
      {"output_tokens_per_s", output_tokens / seconds},
      {"peak_running", s.peak_running},
      {"mean_running", s.decode_steps > 0 ? static_cast<double>(s.decoding_sum) /
                                                static_cast<double>(s.decode_steps)
                                          : 0.0},
      {"preemptions", s.preemptions},
      {"steps", s.steps},
      {"kv_blocks_total", s.total_blocks},
      {"kv_blocks_peak_used", s.peak_used_blocks},
      {"kv_policy", std::string(KvPolicyName(base.kv.kind))},
  };
  if (o.json) {
    std::puts(summary.dump().c_str());
  } else {
    std::printf("%zu requests (%zu failed), %lld output tokens in %.1fs: %.1f tok/s; "
                "running peak %lld, mean %.2f; %lld preemptions; KV blocks peak %lld of %lld\n",
                total, failed, static_cast<long long>(output_tokens), seconds,
                output_tokens / seconds, static_cast<long long>(s.peak_running),
                summary["mean_running"].get<double>(), static_cast<long long>(s.preemptions),
                static_cast<long long>(s.peak_used_blocks),
                static_cast<long long>(s.total_blocks));
  }
  return absl::OkStatus();
}

}  // namespace

int BatchCommand(int argc, char** argv, int first) {
  BatchOptions o;
  ArgParser p("morphserve batch --model PATH --prompts FILE [options]",
              "Runs every prompt (one per line) through the scheduler and the batched forward "
              "pass, at most --concurrency at once, and prints a throughput summary.");
  p.AddString("model", &o.model, "model: a .gguf file or a Hugging Face directory");
  p.AddString("load-format", &o.load_format, "auto, gguf, safetensors or dummy");
  p.AddInt("num-layers", &o.num_layers, "dummy weights only: keep this many layers (0: all)");
  p.AddString("prompts", &o.prompts,
              "one prompt per line (token ids separated by spaces for a model without tokenizer)");
  p.AddFlag("chat", &o.chat, "format each line as a user message with the chat template");
  p.AddInt("concurrency", &o.concurrency, "most requests in flight at once");
  p.AddInt("repeat", &o.repeat, "run the prompt list this many times");
  AddGenerationFlags(p, &o.gen);
  AddKvFlags(p, &o.kv);
  AddEngineFlags(p, &o.engine);
  p.AddString("output", &o.output, "write each request's result as a JSON line to this file");
  p.AddFlag("json", &o.json, "print the summary as one JSON object");
  p.AddString("log-level", &o.log_level, "trace, debug, info, warn, error or off");
  return RunCommand("batch", p, argc, argv, first, [&] { return Run(o); }, &o.log_level);
}

}  // namespace morphserve::cli
