// `morphserve eval`: how faithful each KV policy is to the full cache on a
// real model, over a set of long-response prompts (see fidelity.h for the
// metrics). Every configuration of a prompt runs in one batch next to the
// full-cache reference, so each step reads the weights once for all of them.
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "common/kv_policy.h"
#include "common/logging.h"
#include "common/status.h"
#include "common/strings.h"
#include "common/thread_pool.h"
#include "engine/chat/chat_template.h"
#include "engine/model/model.h"
#include "nlohmann/json.hpp"
#include "server/cli/arg_parser.h"
#include "server/cli/commands.h"
#include "server/cli/fidelity.h"
#include "server/cli/generation_options.h"
#include "server/cli/sequence_set.h"
#include "tools/plot/line_plot.h"

namespace morphserve::cli {
namespace {

using Clock = std::chrono::steady_clock;

struct EvalOptions {
  std::string model;
  std::string load_format = "auto";
  std::string prompts = "tools/eval/prompts/long_response.jsonl";
  std::string out = "eval-out";
  int64_t max_prompts = 0;
  int64_t reference_tokens = 1024;
  std::string policies = "morphkv,h2o,snapkv,streaming";
  std::string capacities = "64,128,256,512";
  std::string windows = "8,32";
  std::string fusion = "sum";
  std::string aggregation = "group-logit-sum";
  int64_t sinks = 4;
  std::string device = "auto";
  int64_t threads = 0;
  int64_t block_size = 16;
  int64_t prefill_chunk = 512;
  std::string log_level = "warn";
};

struct EvalPrompt {
  std::string id;
  std::string text;
};

absl::StatusOr<std::vector<int64_t>> ParseIntList(const std::string& list, std::string_view flag) {
  std::vector<int64_t> out;
  for (absl::string_view part : absl::StrSplit(list, ',', absl::SkipEmpty())) {
    int64_t v = 0;
    if (!absl::SimpleAtoi(part, &v) || v <= 0) {
      return absl::InvalidArgumentError(
          StrCat("--", flag, ": '", ToStd(part), "' is not a positive integer"));
    }
    out.push_back(v);
  }
  if (out.empty()) return absl::InvalidArgumentError(StrCat("--", flag, " is empty"));
  return out;
}

// One prompt per line: a JSON object with "prompt" (and optionally "id"), or
// plain text.
absl::StatusOr<std::vector<EvalPrompt>> ReadPrompts(const std::string& path, int64_t limit) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(StrCat("cannot read prompts file ", path));
  std::vector<EvalPrompt> prompts;
  std::string line;
  for (int64_t number = 1; std::getline(in, line); ++number) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    EvalPrompt p{StrCat("line", number), line};
    if (line.front() == '{') {
      const nlohmann::json j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
      if (j.is_discarded() || !j.contains("prompt") || !j["prompt"].is_string()) {
        return absl::InvalidArgumentError(
            StrCat(path, ":", number, ": expected a JSON object with a string \"prompt\""));
      }
      p.text = j["prompt"].get<std::string>();
      if (j.contains("id") && j["id"].is_string()) p.id = j["id"].get<std::string>();
    }
    prompts.push_back(std::move(p));
    if (limit > 0 && static_cast<int64_t>(prompts.size()) == limit) break;
  }
  if (prompts.empty()) return absl::InvalidArgumentError(StrCat(path, " holds no prompts"));
  return prompts;
}

// Every configuration to compare. Streaming does not depend on W and SnapKV
// uses its own observation window, so each gets one line per budget.
absl::StatusOr<std::vector<FidelityStats>> BuildConfigs(const EvalOptions& o,
                                                        int64_t context_length) {
  ASSIGN_OR_RETURN(const std::vector<int64_t> capacities, ParseIntList(o.capacities, "capacities"));
  ASSIGN_OR_RETURN(const std::vector<int64_t> windows, ParseIntList(o.windows, "windows"));
  ASSIGN_OR_RETURN(const KvFusion fusion, ParseKvFusion(o.fusion));
  ASSIGN_OR_RETURN(const MorphKvAggregation aggregation, ParseMorphKvAggregation(o.aggregation));
  std::vector<FidelityStats> configs;
  for (absl::string_view name : absl::StrSplit(o.policies, ',', absl::SkipEmpty())) {
    ASSIGN_OR_RETURN(const KvPolicyKind kind, ParseKvPolicyKind(ToStd(name)));
    if (kind == KvPolicyKind::kFull) continue;  // the reference runs anyway
    const bool per_window = kind == KvPolicyKind::kMorphKv || kind == KvPolicyKind::kH2o;
    const std::vector<int64_t> ws =
        per_window ? windows : std::vector<int64_t>{*std::min_element(windows.begin(), windows.end())};
    for (int64_t w : ws) {
      for (int64_t c : capacities) {
        FidelityStats s;
        s.policy.kind = kind;
        s.policy.window = w;
        s.policy.capacity = c;
        s.policy.fusion = fusion;
        s.policy.aggregation = aggregation;
        s.policy.sinks = o.sinks;
        if (!s.policy.Validate(context_length).ok()) continue;  // e.g. C <= W
        s.label = std::string(KvPolicyName(kind));
        if (per_window) StrAppend(&s.label, " W", w);
        if (kind == KvPolicyKind::kStreaming) StrAppend(&s.label, " S", o.sinks);
        configs.push_back(std::move(s));
      }
    }
  }
  if (configs.empty()) {
    return absl::InvalidArgumentError("no valid policy configuration to evaluate");
  }
  return configs;
}

// The fidelity figures against the budget, one line per policy label.
absl::Status WritePlot(const std::vector<FidelityStats>& stats, const std::string& path) {
  std::vector<std::string> labels;
  for (const FidelityStats& s : stats) {
    if (std::find(labels.begin(), labels.end(), s.label) == labels.end()) labels.push_back(s.label);
  }
  struct Metric {
    const char* title;
    const char* y_label;
    double (FidelityStats::*value)() const;
  };
  const Metric metrics[] = {
      {"Mean KL(full || policy) per token", "nats", &FidelityStats::mean_kl},
      {"Top-1 agreement with the full cache", "fraction", &FidelityStats::top1_agreement},
      {"Tokens until the first divergence", "tokens (mean)", &FidelityStats::mean_divergence},
  };
  std::vector<plot::LinePlot> panels;
  for (const Metric& m : metrics) {
    plot::LinePlot p;
    p.title = m.title;
    p.x_label = "KV budget C (tokens)";
    p.y_label = m.y_label;
    p.log2_x = true;
    for (const std::string& label : labels) {
      plot::Series series{label, {}, {}};
      for (const FidelityStats& s : stats) {
        if (s.label != label) continue;
        series.x.push_back(static_cast<double>(s.policy.capacity));
        series.y.push_back((s.*m.value)());
      }
      p.series.push_back(std::move(series));
    }
    panels.push_back(std::move(p));
  }
  return plot::WritePlotGridPng(panels, 3, 1800, 560, path);
}

absl::Status Run(const EvalOptions& o, const std::string& command_line) {
  if (o.model.empty()) return absl::InvalidArgumentError("--model is required");
  if (o.reference_tokens < 2) return absl::InvalidArgumentError("--reference-tokens must be >= 2");
  if (o.block_size <= 0 || o.prefill_chunk <= 0) {
    return absl::InvalidArgumentError("--block-size and --prefill-chunk must be positive");
  }
  ASSIGN_OR_RETURN(const std::vector<EvalPrompt> prompts, ReadPrompts(o.prompts, o.max_prompts));
  engine::ModelLoadOptions load;
  load.path = o.model;
  ASSIGN_OR_RETURN(load.format, engine::ParseLoadFormat(o.load_format));
  ASSIGN_OR_RETURN(std::unique_ptr<engine::Model> model, engine::LoadModel(load));
  if (model->tokenizer == nullptr) {
    return absl::FailedPreconditionError("eval needs a model with a tokenizer");
  }
  const engine::Tokenizer& tokenizer = *model->tokenizer;
  const engine::ModelConfig& cfg = model->config;
  // Fails early, before any work, when the model has no chat template.
  RETURN_IF_ERROR(engine::ChatTemplate::FromModel(tokenizer).status());
  ASSIGN_OR_RETURN(std::vector<FidelityStats> stats, BuildConfigs(o, cfg.context_length));
  std::error_code ec;
  std::filesystem::create_directories(o.out, ec);
  if (ec) return absl::PermissionDeniedError(StrCat("cannot create ", o.out, ": ", ec.message()));

  // Members of a prompt's set: 0 is the full-cache reference, then one per
  // configuration. The backend's pool fits the largest prompt's set.
  std::vector<std::vector<int32_t>> encoded;
  std::vector<KvPolicyConfig> configs = {KvPolicyConfig{}};
  int64_t pool_blocks = 0;
  for (const EvalPrompt& prompt : prompts) {
    ASSIGN_OR_RETURN(std::vector<int32_t> tokens,
                     EncodePrompt(tokenizer, prompt.text, /*chat=*/true));
    const int64_t prompt_len = static_cast<int64_t>(tokens.size());
    if (prompt_len + o.reference_tokens > cfg.context_length) {
      return absl::OutOfRangeError(StrCat("prompt ", prompt.id, " plus the reference exceeds the ",
                                          "context length ", cfg.context_length));
    }
    int64_t blocks =
        SequenceSet::BlocksFor(KvPolicyConfig{}, prompt_len, o.reference_tokens, o.block_size);
    for (const FidelityStats& s : stats) {
      blocks += SequenceSet::BlocksFor(s.policy, prompt_len, o.reference_tokens, o.block_size);
    }
    pool_blocks = std::max(pool_blocks, blocks);
    encoded.push_back(std::move(tokens));
  }
  for (const FidelityStats& s : stats) configs.push_back(s.policy);
  ASSIGN_OR_RETURN(const std::unique_ptr<engine::ForwardBackend> backend,
                   OfflineBackend(*model, o.device, o.threads, o.block_size, pool_blocks,
                                  /*reference_kernels=*/false, configs));
  // The reference never ends early: end-of-generation tokens are banned from
  // every greedy choice, the policies' included.
  const std::vector<int32_t>& banned = tokenizer.end_of_generation_ids();
  const int64_t vocab = cfg.vocab_size;
  std::ofstream references(o.out + "/reference.jsonl");
  std::ofstream divergence(o.out + "/divergence.csv");
  divergence << "prompt,policy,label,window,capacity,tokens_to_divergence\n";
  std::fprintf(stderr, "eval: %zu prompts x %zu configurations, %lld reference tokens each\n",
               prompts.size(), stats.size(), static_cast<long long>(o.reference_tokens));
  const Clock::time_point start = Clock::now();

  for (size_t pi = 0; pi < prompts.size(); ++pi) {
    const EvalPrompt& prompt = prompts[pi];
    const std::vector<int32_t>& tokens = encoded[pi];
    const int64_t prompt_len = static_cast<int64_t>(tokens.size());
    const KvPolicyConfig full;
    const int64_t max_new = o.reference_tokens;
    SequenceSet set(*model, backend.get());
    std::vector<int> ids;
    ASSIGN_OR_RETURN(const int full_id, set.Add(full, prompt_len, max_new));
    ids.push_back(full_id);
    for (FidelityStats& s : stats) {
      ASSIGN_OR_RETURN(const int id, set.Add(s.policy, prompt_len, max_new));
      ids.push_back(id);
      s.BeginPrompt();
    }
    std::vector<SequenceSet::Work> work(ids.size());
    std::vector<float> logits;
    for (int64_t begin = 0; begin < prompt_len; begin += o.prefill_chunk) {
      const int64_t n = std::min(o.prefill_chunk, prompt_len - begin);
      for (size_t m = 0; m < ids.size(); ++m) {
        work[m] = {ids[m], std::span<const int32_t>(tokens).subspan(begin, n),
                   begin + n < prompt_len};
      }
      RETURN_IF_ERROR(set.Step(work, &logits));
    }
    std::vector<int32_t> reference;
    std::vector<float> full_logprobs(vocab);
    for (int64_t step = 0; step < o.reference_tokens; ++step) {
      const std::span<float> full_row(logits.data(), vocab);
      const int32_t next = GreedyToken(full_row, banned);
      std::copy(full_row.begin(), full_row.end(), full_logprobs.begin());
      LogSoftmax(full_logprobs);
      const int64_t full_tokens = set.kv(full_id).num_tokens();
      for (size_t c = 0; c < stats.size(); ++c) {
        const std::span<float> row(logits.data() + (c + 1) * vocab, vocab);
        const int32_t greedy = GreedyToken(row, banned);
        LogSoftmax(row);
        stats[c].AddStep(full_logprobs, row, next, greedy, set.kv(ids[c + 1]).num_slots(),
                         full_tokens);
      }
      reference.push_back(next);
      if (step + 1 == o.reference_tokens) break;
      for (size_t m = 0; m < ids.size(); ++m) work[m] = {ids[m], {&reference.back(), 1}, false};
      RETURN_IF_ERROR(set.Step(work, &logits));
      if ((step + 1) % 128 == 0) {
        const double elapsed = std::chrono::duration<double>(Clock::now() - start).count();
        const double done = static_cast<double>(pi) + static_cast<double>(step + 1) /
                                                          static_cast<double>(o.reference_tokens);
        std::fprintf(stderr, "  prompt %zu/%zu (%s): %lld/%lld tokens, %.0fs elapsed, ~%.0fs left\n",
                     pi + 1, prompts.size(), prompt.id.c_str(), static_cast<long long>(step + 1),
                     static_cast<long long>(o.reference_tokens), elapsed,
                     elapsed / done * (static_cast<double>(prompts.size()) - done));
      }
    }
    for (FidelityStats& s : stats) {
      s.EndPrompt(o.reference_tokens);
      divergence << prompt.id << "," << KvPolicyName(s.policy.kind) << "," << s.label << ","
                 << s.policy.window << "," << s.policy.capacity << "," << s.divergence.back()
                 << "\n";
    }
    references << nlohmann::json({{"id", prompt.id},
                                  {"prompt_tokens", tokens},
                                  {"reference_tokens", reference}})
                      .dump()
               << "\n";
    std::fprintf(stderr, "prompt %zu/%zu done (%s, %lld prompt tokens)\n", pi + 1, prompts.size(),
                 prompt.id.c_str(), static_cast<long long>(prompt_len));
  }

  RETURN_IF_ERROR(WriteFidelityCsv(stats, o.out + "/fidelity.csv"));
  const std::string md = StrCat(
      "# KV policy fidelity\n\nModel: `", o.model, "`; ", prompts.size(), " prompts from `",
      o.prompts, "`; greedy full-cache reference of ", o.reference_tokens,
      " tokens per prompt (end-of-generation tokens banned).\n\nCommand: `", command_line,
      "`\n\n", FidelityMarkdown(stats));
  std::ofstream(o.out + "/fidelity.md") << md;
  RETURN_IF_ERROR(WritePlot(stats, o.out + "/fidelity.png"));
  std::fputs(md.c_str(), stdout);
  std::fprintf(stderr, "wrote %s/{fidelity.csv, fidelity.md, fidelity.png, reference.jsonl, "
               "divergence.csv}\n", o.out.c_str());
  return absl::OkStatus();
}

}  // namespace

int EvalCommand(int argc, char** argv, int first) {
  EvalOptions o;
  ArgParser p("morphserve eval --model PATH [options]",
              "Measures how faithful each KV policy is to the full cache: KL, top-1 agreement "
              "and perplexity teacher-forced on a greedy full-cache reference, and tokens until "
              "the first divergence. Writes CSV, markdown and a PNG plot.");
  p.AddString("model", &o.model, "model: a .gguf file or a Hugging Face directory");
  p.AddString("load-format", &o.load_format, "auto, gguf or safetensors");
  p.AddString("prompts", &o.prompts, "prompt file: JSON lines with \"prompt\" (or plain lines)");
  p.AddString("out", &o.out, "output directory");
  p.AddInt("max-prompts", &o.max_prompts, "evaluate only the first N prompts (0: all)");
  p.AddInt("reference-tokens", &o.reference_tokens, "tokens in each greedy reference");
  p.AddString("policies", &o.policies, "comma-separated: morphkv, h2o, snapkv, streaming");
  p.AddString("capacities", &o.capacities, "comma-separated budgets C");
  p.AddString("windows", &o.windows, "comma-separated windows W (morphkv and h2o)");
  p.AddString("kv-fusion", &o.fusion, "morphkv fusion: sum or max");
  p.AddString("kv-aggregation", &o.aggregation, "morphkv GQA scoring: group-logit-sum or "
                                                "group-max-prob");
  p.AddInt("kv-sinks", &o.sinks, "streaming sink tokens");
  p.AddString("device", &o.device, "auto, cpu or cuda");
  p.AddInt("threads", &o.threads, "CPU threads (0: all cores)");
  p.AddInt("block-size", &o.block_size, "KV cache block size in tokens");
  p.AddInt("prefill-chunk", &o.prefill_chunk, "prompt tokens per forward pass");
  p.AddString("log-level", &o.log_level, "trace, debug, info, warn, error or off");
  return RunCommand(
      "eval", p, argc, argv, first,
      [&] {
        std::string command_line = "morphserve";
        for (int i = 1; i < argc; ++i) StrAppend(&command_line, " ", argv[i]);
        return Run(o, command_line);
      },
      &o.log_level);
}

}  // namespace morphserve::cli
