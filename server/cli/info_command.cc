// `morphserve info`: what a model file holds.
#include <cstdio>
#include <map>
#include <string>

#include "common/strings.h"
#include "absl/strings/str_join.h"
#include "common/status.h"
#include "engine/chat/chat_template.h"
#include "engine/model/model.h"
#include "server/cli/arg_parser.h"
#include "server/cli/commands.h"

namespace morphserve::cli {
namespace {

void CountMatrix(const engine::Matrix& m, std::map<std::string, int64_t>* params) {
  if (!m.empty()) (*params)[std::string(DTypeName(m.dtype))] += m.rows * m.cols;
}

absl::Status Run(const std::string& path, const std::string& load_format, int64_t num_layers) {
  engine::ModelLoadOptions load;
  load.path = path;
  load.num_layers_override = num_layers;
  ASSIGN_OR_RETURN(load.format, engine::ParseLoadFormat(load_format));
  ASSIGN_OR_RETURN(std::unique_ptr<engine::Model> model, engine::LoadModel(load));
  const engine::ModelConfig& c = model->config;
  std::map<std::string, int64_t> params;
  CountMatrix(model->weights.token_embedding, &params);
  if (!c.tie_embeddings) CountMatrix(model->weights.output, &params);
  for (const engine::LayerWeights& l : model->weights.layers) {
    for (const engine::Matrix* m : {&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down}) {
      CountMatrix(*m, &params);
    }
  }
  int64_t total = 0;
  std::vector<std::string> dtypes;
  for (const auto& [dtype, n] : params) {
    total += n;
    dtypes.push_back(StrCat(dtype, " ", n));
  }
  const char* rope_scaling[] = {"none", "linear", "llama3"};
  std::printf("path:               %s (%s)\n", path.c_str(), model->format.c_str());
  std::printf("name:               %s\n", c.name.c_str());
  std::printf("architecture:       %s\n", c.architecture.c_str());
  std::printf("parameters:         %lld in matrices (%s)\n", static_cast<long long>(total),
              absl::StrJoin(dtypes, ", ").c_str());
  std::printf("layers:             %lld\n", static_cast<long long>(c.num_layers));
  std::printf("hidden size:        %lld\n", static_cast<long long>(c.hidden_size));
  std::printf("heads / kv heads:   %lld / %lld (head dim %lld)\n",
              static_cast<long long>(c.num_heads), static_cast<long long>(c.num_kv_heads),
              static_cast<long long>(c.head_dim));
  std::printf("ffn size:           %lld\n", static_cast<long long>(c.intermediate_size));
  std::printf("vocab size:         %lld\n", static_cast<long long>(c.vocab_size));
  std::printf("context length:     %lld\n", static_cast<long long>(c.context_length));
  std::printf("rope:               theta %g, %lld dims, %s pairs, scaling %s\n", c.rope_theta,
              static_cast<long long>(c.rope_dim),
              c.rope_style == kernels::RopeStyle::kAdjacent ? "adjacent" : "half-split",
              rope_scaling[static_cast<int>(c.rope_scaling.type)]);
  std::printf("rms norm eps:       %g\n", c.rms_norm_eps);
  std::printf("tied embeddings:    %s\n", c.tie_embeddings ? "yes" : "no");
  if (model->tokenizer != nullptr) {
    const engine::Tokenizer& t = *model->tokenizer;
    std::printf("tokenizer:          %s (pre-tokenizer %s), %d tokens, bos %d, eos %d\n",
                std::string(t.model_name()).c_str(), std::string(t.pre_tokenizer_name()).c_str(),
                static_cast<int>(t.vocab_size()), t.bos_id(), t.eos_id());
    absl::StatusOr<engine::ChatTemplate> tmpl = engine::ChatTemplate::FromModel(t);
    std::printf("chat template:      %s\n",
                tmpl.ok() ? std::string(tmpl->family_name()).c_str()
                          : std::string(tmpl.status().message()).c_str());
  } else {
    std::printf("tokenizer:          none\n");
  }
  return absl::OkStatus();
}

}  // namespace

int InfoCommand(int argc, char** argv, int first) {
  std::string model, load_format = "auto";
  int64_t num_layers = 0;
  ArgParser p("morphserve info --model PATH", "Describes a model: architecture, shapes, dtypes, "
                                              "tokenizer and chat template.");
  p.AddString("model", &model, "a .gguf file or a Hugging Face directory");
  p.AddString("load-format", &load_format, "auto, gguf, safetensors or dummy");
  p.AddInt("num-layers", &num_layers, "dummy weights only: keep this many layers (0: all)");
  return RunCommand("info", p, argc, argv, first, [&] {
    if (model.empty()) return absl::InvalidArgumentError("--model is required");
    return Run(model, load_format, num_layers);
  });
}

}  // namespace morphserve::cli
