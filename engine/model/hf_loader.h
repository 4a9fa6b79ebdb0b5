// Builds a Model from a Hugging Face directory (config.json, tokenizer.json,
// *.safetensors) or, for --load-format dummy, from config.json alone with
// deterministic random weights.
#ifndef MORPHSERVE_ENGINE_MODEL_HF_LOADER_H_
#define MORPHSERVE_ENGINE_MODEL_HF_LOADER_H_

#include <memory>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "engine/model/model.h"

namespace morphserve::engine {

// Parses a config.json text (LlamaForCausalLM, MistralForCausalLM,
// Qwen2ForCausalLM, Phi3ForCausalLM). Rotary embedding is half-split
// (RopeStyle::kHalf), as in every HF checkpoint; rope_scaling may be none,
// linear or llama3. A sliding window smaller than max_position_embeddings
// caps the context length (the engine attends over the full context).
absl::StatusOr<ModelConfig> ModelConfigFromHfJson(std::string_view json_text);

// `path` is the model directory: config.json, tokenizer files, and either
// model.safetensors or model.safetensors.index.json with its shards. Weight
// matrices (F32, F16 or BF16) point into the file mappings, which
// Model::keep_alive holds.
absl::StatusOr<std::unique_ptr<Model>> LoadHfModel(const std::string& path);

// `path` is a config.json or a directory holding one. Every weight gets the
// config's exact shape with pseudo-random BF16 values that depend only on
// `seed` and the tensor's HF name (so they are the same across runs, and a
// layer override keeps the first layers' values); norm weights are 1. The
// matrices are heap buffers held by Model::keep_alive (no f32 copies, so an
// 8B-shaped model takes 16 GB).
// num_layers_override > 0 keeps that many layers. The tokenizer comes from a
// tokenizer.json beside the config; without one Model::tokenizer is null and
// the model takes token ids only.
absl::StatusOr<std::unique_ptr<Model>> LoadDummyModel(const std::string& path,
                                                      int64_t num_layers_override, uint64_t seed);

}  // namespace morphserve::engine

#endif  // MORPHSERVE_ENGINE_MODEL_HF_LOADER_H_
