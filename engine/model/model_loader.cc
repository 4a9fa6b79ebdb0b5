#include <filesystem>

#include "common/strings.h"
#include "common/status.h"
#include "engine/model/gguf_loader.h"
#include "engine/model/hf_loader.h"
#include "engine/model/model.h"

namespace morphserve::engine {

absl::StatusOr<LoadFormat> ParseLoadFormat(std::string_view name) {
  if (name == "auto") return LoadFormat::kAuto;
  if (name == "gguf") return LoadFormat::kGguf;
  if (name == "safetensors") return LoadFormat::kSafetensors;
  if (name == "dummy") return LoadFormat::kDummy;
  return absl::InvalidArgumentError(
      StrCat("unknown load format '", name, "' (auto, gguf, safetensors, dummy)"));
}

absl::StatusOr<std::unique_ptr<Model>> LoadModel(const ModelLoadOptions& options) {
  std::error_code ec;
  const std::filesystem::path path(options.path);
  if (options.path.empty()) return absl::InvalidArgumentError("no model path given");
  if (!std::filesystem::exists(path, ec)) {
    return absl::NotFoundError(StrCat(options.path, ": no such file or directory"));
  }
  LoadFormat format = options.format;
  if (format == LoadFormat::kAuto) {
    format = std::filesystem::is_directory(path, ec) ? LoadFormat::kSafetensors : LoadFormat::kGguf;
  }
  if (options.num_layers_override != 0 && format != LoadFormat::kDummy) {
    return absl::InvalidArgumentError("a layer-count override applies to dummy weights only");
  }
  switch (format) {
    case LoadFormat::kGguf:
      return LoadGgufModel(options.path);
    case LoadFormat::kSafetensors:
      return LoadHfModel(options.path);
    case LoadFormat::kDummy:
      return LoadDummyModel(options.path, options.num_layers_override, options.dummy_seed);
    case LoadFormat::kAuto:
      break;
  }
  return absl::InternalError("unreachable load format");
}

absl::StatusOr<std::unique_ptr<Tokenizer>> LoadTokenizer(const std::string& path) {
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec)) return Tokenizer::FromHuggingFace(path);
  ASSIGN_OR_RETURN(std::unique_ptr<GgufFile> file, GgufFile::Open(path));
  absl::StatusOr<std::unique_ptr<Tokenizer>> tokenizer = Tokenizer::FromGguf(*file);
  if (!tokenizer.ok()) {
    return absl::Status(tokenizer.status().code(),
                        StrCat(path, ": ", tokenizer.status().message()));
  }
  return tokenizer;
}

}  // namespace morphserve::engine
