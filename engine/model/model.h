// A loaded model: configuration, weights and tokenizer, immutable after
// loading and shared read-only by every thread.
#ifndef MORPHSERVE_ENGINE_MODEL_MODEL_H_
#define MORPHSERVE_ENGINE_MODEL_MODEL_H_

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/model/model_config.h"
#include "engine/model/weights.h"
#include "engine/tokenizer/tokenizer.h"

namespace morphserve::engine {

enum class LoadFormat { kAuto, kGguf, kSafetensors, kDummy };

struct ModelLoadOptions {
  std::string path;  // a .gguf file, or a directory with config.json
  LoadFormat format = LoadFormat::kAuto;
  // Dummy weights only: keep this many layers (0: as the config says).
  int64_t num_layers_override = 0;
  uint64_t dummy_seed = 0;
};

struct Model {
  ModelConfig config;
  LlamaWeights weights;
  std::unique_ptr<Tokenizer> tokenizer;
  std::string format;  // "gguf", "safetensors" or "dummy"
  std::string path;
  // Keeps what `weights` points into alive: memory mappings, generated
  // buffers. Models without a tokenizer (dummy weights and no
  // tokenizer.json) take token ids only.
  std::vector<std::shared_ptr<const void>> keep_alive;
};

absl::StatusOr<LoadFormat> ParseLoadFormat(std::string_view name);

// Loads the model described by `options`. Errors name the file and what is
// wrong with it; nothing here aborts on bad input.
absl::StatusOr<std::unique_ptr<Model>> LoadModel(const ModelLoadOptions& options);

// Loads only the tokenizer: from a GGUF file (vocab-only files included) or
// from a Hugging Face directory's tokenizer.json.
absl::StatusOr<std::unique_ptr<Tokenizer>> LoadTokenizer(const std::string& path);

}  // namespace morphserve::engine

#endif  // MORPHSERVE_ENGINE_MODEL_MODEL_H_
