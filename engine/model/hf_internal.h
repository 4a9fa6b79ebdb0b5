// Helpers shared by the Hugging Face and dummy-weight loaders.
#ifndef MORPHSERVE_ENGINE_MODEL_HF_INTERNAL_H_
#define MORPHSERVE_ENGINE_MODEL_HF_INTERNAL_H_

#include <string>

#include "absl/status/statusor.h"
#include "engine/model/model.h"

namespace morphserve::engine {

// The whole file; NotFound when it does not exist. Errors name the file.
absl::StatusOr<std::string> ReadTextFile(const std::string& path);

// ModelConfigFromHfJson on the file at `config_path`, errors prefixed by it.
absl::StatusOr<ModelConfig> ModelConfigFromHfFile(const std::string& config_path);

// Loads the tokenizer files of `dir` into `model`, checking that the
// tokenizer fits the model's vocabulary.
absl::Status AttachHfTokenizer(const std::string& dir, Model& model);

}  // namespace morphserve::engine

#endif  // MORPHSERVE_ENGINE_MODEL_HF_INTERNAL_H_
