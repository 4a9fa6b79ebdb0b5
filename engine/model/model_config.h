// The shape and hyper-parameters of a Llama-family decoder, whatever file it
// came from (GGUF metadata, a Hugging Face config.json, or a dummy config).
#ifndef MORPHSERVE_ENGINE_MODEL_MODEL_CONFIG_H_
#define MORPHSERVE_ENGINE_MODEL_MODEL_CONFIG_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "kernels/cpu/elementwise.h"

namespace morphserve::engine {

struct RopeScaling {
  enum class Type { kNone, kLinear, kLlama3 };
  Type type = Type::kNone;
  float factor = 1.0f;
  // llama3 only:
  float low_freq_factor = 1.0f;
  float high_freq_factor = 4.0f;
  int64_t original_max_position = 8192;
};

struct ModelConfig {
  std::string architecture;  // e.g. "llama", "qwen2", "phi3"
  std::string name;          // human-readable model name, when known
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t num_layers = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t intermediate_size = 0;
  int64_t context_length = 0;
  float rms_norm_eps = 1e-5f;
  float rope_theta = 10000.0f;
  int64_t rope_dim = 0;  // rotated dims per head (== head_dim for these families)
  kernels::RopeStyle rope_style = kernels::RopeStyle::kHalf;
  RopeScaling rope_scaling;
  // Per-pair frequency divisors stored with some checkpoints (GGUF
  // `rope_freqs.weight` for Llama 3.1); empty when absent.
  std::vector<float> rope_freq_factors;
  bool tie_embeddings = false;
  bool qkv_bias = false;

  int64_t q_dim() const { return num_heads * head_dim; }
  int64_t kv_dim() const { return num_kv_heads * head_dim; }

  // Checks that the numbers describe a model this engine can run.
  absl::Status Validate() const;
};

// Inverse rotary frequencies for each pair i < rope_dim/2, with the model's
// scaling folded in (linear divides, llama3 rescales by wavelength band).
std::vector<float> RopeInverseFrequencies(const ModelConfig& config);

}  // namespace morphserve::engine

#endif  // MORPHSERVE_ENGINE_MODEL_MODEL_CONFIG_H_
