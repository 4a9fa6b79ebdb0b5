// `morphserve generate`: one sequence, prefill then decode, streamed to
// stdout. Drives the same forward pass, paged KV cache and KV policies, block
// pool, sampler and stop checker that the server uses.
#include <chrono>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "common/strings.h"
#include "common/logging.h"
#include "common/sampling_params.h"
#include "common/status.h"
#include "common/thread_pool.h"
#include "engine/chat/chat_template.h"
#include "engine/generation/stop_checker.h"
#include "engine/model/model.h"
#include "engine/sampler/sampler.h"
#include "nlohmann/json.hpp"
#include "server/cli/arg_parser.h"
#include "server/cli/commands.h"
#include "server/cli/generation_options.h"
#include "server/cli/kv_options.h"
#include "server/cli/sequence_set.h"
#include "spdlog/spdlog.h"

namespace morphserve::cli {
namespace {

using Clock = std::chrono::steady_clock;

struct GenerateOptions {
  std::string model;
  std::string load_format = "auto";
  int64_t num_layers = 0;
  std::string prompt;
  std::string chat;
  std::string system;
  GenerationFlags gen;
  std::string device = "auto";
  int64_t threads = 0;
  int64_t block_size = 16;
  int64_t prefill_chunk = 512;
  KvFlags kv;
  bool json = false;
  bool reference_kernels = false;
  std::string log_level = "warn";
};

double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }


// The top-N alternatives of one generated token, most likely first.
nlohmann::json TopLogprobsJson(const engine::SampleResult& r) {
  nlohmann::json top = nlohmann::json::array();
  for (const engine::TokenLogprob& t : r.top) top.push_back({{"id", t.id}, {"logprob", t.logprob}});
  return top;
}

absl::Status Run(const GenerateOptions& o) {
  SamplingParams sampling;
  engine::StopConditions stop;
  RETURN_IF_ERROR(GenerationParams(o.gen, &sampling, &stop));
  if (o.model.empty()) return absl::InvalidArgumentError("--model is required");
  if (o.prompt.empty() == o.chat.empty()) {
    return absl::InvalidArgumentError("give exactly one of --prompt and --chat");
  }
  if (o.block_size <= 0 || o.prefill_chunk <= 0) {
    return absl::InvalidArgumentError("--block-size and --prefill-chunk must be positive");
  }

  engine::ModelLoadOptions load;
  load.path = o.model;
  ASSIGN_OR_RETURN(load.format, engine::ParseLoadFormat(o.load_format));
  load.num_layers_override = o.num_layers;
  const Clock::time_point t_load = Clock::now();
  ASSIGN_OR_RETURN(std::unique_ptr<engine::Model> model, engine::LoadModel(load));
  if (model->tokenizer == nullptr) {
    return absl::FailedPreconditionError("the model has no tokenizer; text generation needs one");
  }
  const engine::Tokenizer& tokenizer = *model->tokenizer;
  const engine::ModelConfig& cfg = model->config;
  spdlog::info("loaded {} ({}) in {:.2f}s", o.model, model->format, Seconds(Clock::now() - t_load));

  const bool chat = !o.chat.empty();
  ASSIGN_OR_RETURN(std::vector<int32_t> prompt,
                   EncodePrompt(tokenizer, chat ? o.chat : o.prompt, chat, o.system));
  if (prompt.empty()) return absl::InvalidArgumentError("the prompt encodes to no tokens");
  const int64_t total = static_cast<int64_t>(prompt.size()) + o.gen.max_tokens;
  if (total > cfg.context_length) {
    return absl::OutOfRangeError(StrCat("prompt (", prompt.size(), " tokens) + max tokens (",
                                              o.gen.max_tokens, ") exceeds the context length ",
                                              cfg.context_length));
  }

  ASSIGN_OR_RETURN(const KvPolicyConfig kv_policy, KvPolicyFromFlags(o.kv, cfg.context_length));

  const int64_t prompt_tokens = static_cast<int64_t>(prompt.size());
  const int64_t blocks =
      SequenceSet::BlocksFor(kv_policy, prompt_tokens, o.gen.max_tokens, o.block_size);
  const KvPolicyConfig policies[] = {kv_policy};
  ASSIGN_OR_RETURN(const std::unique_ptr<engine::ForwardBackend> backend,
                   OfflineBackend(*model, o.device, o.threads, o.block_size, blocks,
                                  o.reference_kernels, policies));
  SequenceSet sequences(*model, backend.get());
  ASSIGN_OR_RETURN(const int id, sequences.Add(kv_policy, prompt_tokens, o.gen.max_tokens));
  engine::Sampler sampler(sampling, prompt);
  engine::StopChecker checker(tokenizer, stop);

  std::vector<float> logits;
  auto run = [&](std::span<const int32_t> tokens, bool prompt_pending) -> absl::Status {
    const SequenceSet::Work work{id, tokens, prompt_pending};
    return sequences.Step({&work, 1}, &logits);
  };

  const Clock::time_point t0 = Clock::now();
  for (size_t begin = 0; begin < prompt.size(); begin += o.prefill_chunk) {
    const size_t n = std::min<size_t>(o.prefill_chunk, prompt.size() - begin);
    RETURN_IF_ERROR(
        run(std::span<const int32_t>(prompt).subspan(begin, n), begin + n < prompt.size()));
  }
  const Clock::time_point t1 = Clock::now();

  std::vector<int32_t> generated;
  nlohmann::json logprobs = nlohmann::json::array();
  std::vector<float> token_logprobs;
  std::string text;
  engine::FinishReason finish = engine::FinishReason::kNone;
  while (finish == engine::FinishReason::kNone) {
    const engine::SampleResult r = sampler.Sample(std::span<float>(logits).first(cfg.vocab_size));
    generated.push_back(r.token);
    if (o.gen.logprobs > 0) {
      logprobs.push_back(TopLogprobsJson(r));
      token_logprobs.push_back(r.logprob);
    }
    const engine::StopChecker::Step step = checker.Push(r.token);
    finish = step.finish;
    text += step.text;
    if (!o.json && !step.text.empty()) {
      std::fwrite(step.text.data(), 1, step.text.size(), stdout);
      std::fflush(stdout);
    }
    if (finish == engine::FinishReason::kNone) {
      const int32_t next = r.token;
      RETURN_IF_ERROR(run({&next, 1}, false));
    }
  }
  const Clock::time_point t2 = Clock::now();

  const double prefill_s = Seconds(t1 - t0);
  const double decode_s = Seconds(t2 - t1);
  const size_t decode_steps = generated.size() > 0 ? generated.size() - 1 : 0;
  if (o.json) {
    nlohmann::json out = {
        {"tokens", generated},
        {"text", text},
        {"finish_reason", engine::FinishReasonName(finish)},
        {"usage",
         {{"prompt_tokens", prompt.size()},
          {"completion_tokens", generated.size()},
          {"prefill_seconds", prefill_s},
          {"decode_seconds", decode_s}}},
    };
    AddKvUsage(sequences.kv(id).Usage(), out["usage"]);
    out["usage"]["kv_blocks_peak_used"] = sequences.peak_blocks_used();
    if (o.gen.logprobs > 0) {
      out["logprobs"] = std::move(logprobs);
      out["token_logprobs"] = token_logprobs;
    }
    std::puts(out.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace).c_str());
  } else {
    std::puts("");
  }
  std::fprintf(stderr,
               "[prompt %zu tokens, %.1f tok/s | generated %zu tokens, %.1f tok/s | finish %s]\n",
               prompt.size(), prompt.size() / std::max(prefill_s, 1e-9), generated.size(),
               decode_steps / std::max(decode_s, 1e-9),
               std::string(engine::FinishReasonName(finish)).c_str());
  return absl::OkStatus();
}

}  // namespace

int GenerateCommand(int argc, char** argv, int first) {
  GenerateOptions o;
  ArgParser p("morphserve generate --model PATH (--prompt TEXT | --chat TEXT) [options]",
              "Generates text for one prompt and streams it to stdout.");
  p.AddString("model", &o.model, "model: a .gguf file or a Hugging Face directory");
  p.AddString("load-format", &o.load_format, "auto, gguf, safetensors or dummy");
  p.AddInt("num-layers", &o.num_layers, "dummy weights only: keep this many layers (0: all)");
  p.AddString("prompt", &o.prompt, "raw prompt text (BOS added as the model requires)");
  p.AddString("chat", &o.chat, "a user message, formatted with the model's chat template");
  p.AddString("system", &o.system, "system message for --chat");
  AddGenerationFlags(p, &o.gen);
  p.AddString("device", &o.device, "auto, cpu or cuda");
  p.AddInt("threads", &o.threads, "CPU threads (0: all cores)");
  p.AddInt("block-size", &o.block_size, "KV cache block size in tokens");
  p.AddInt("prefill-chunk", &o.prefill_chunk, "prompt tokens per forward pass");
  AddKvFlags(p, &o.kv);
  p.AddFlag("json", &o.json, "print one JSON object at the end instead of streaming text");
  p.AddFlag("reference-kernels", &o.reference_kernels,
            "use the slow, exact reference matrix products (for checking numerics)");
  p.AddString("log-level", &o.log_level, "trace, debug, info, warn, error or off");
  return RunCommand("generate", p, argc, argv, first, [&] { return Run(o); }, &o.log_level);
}

}  // namespace morphserve::cli
