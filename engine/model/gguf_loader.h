// Builds a Model from a GGUF file (llama, qwen2 and phi3 architectures).
#ifndef MORPHSERVE_ENGINE_MODEL_GGUF_LOADER_H_
#define MORPHSERVE_ENGINE_MODEL_GGUF_LOADER_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "engine/gguf/gguf_file.h"
#include "engine/model/model.h"

namespace morphserve::engine {

absl::StatusOr<ModelConfig> ModelConfigFromGguf(const GgufFile& file);

absl::StatusOr<std::unique_ptr<Model>> LoadGgufModel(const std::string& path);

}  // namespace morphserve::engine

#endif  // MORPHSERVE_ENGINE_MODEL_GGUF_LOADER_H_
