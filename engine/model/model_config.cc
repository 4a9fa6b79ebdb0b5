#include "engine/model/model_config.h"

#include <cmath>
#include <numbers>

#include "common/strings.h"

namespace morphserve::engine {

absl::Status ModelConfig::Validate() const {
  auto positive = [](int64_t v, std::string_view what) -> absl::Status {
    if (v <= 0) return absl::InvalidArgumentError(StrCat(what, " must be positive, got ", v));
    return absl::OkStatus();
  };
  for (auto [v, what] : {std::pair{vocab_size, "vocab_size"}, {hidden_size, "hidden_size"},
                         {num_layers, "num_layers"}, {num_heads, "num_heads"},
                         {num_kv_heads, "num_kv_heads"}, {head_dim, "head_dim"},
                         {intermediate_size, "intermediate_size"},
                         {context_length, "context_length"}}) {
    if (absl::Status s = positive(v, what); !s.ok()) return s;
  }
  if (num_heads % num_kv_heads != 0) {
    return absl::InvalidArgumentError(StrCat("num_heads (", num_heads,
                                                   ") is not a multiple of num_kv_heads (",
                                                   num_kv_heads, ")"));
  }
  if (rope_dim <= 0 || rope_dim > head_dim || rope_dim % 2 != 0) {
    return absl::InvalidArgumentError(
        StrCat("rope dimension ", rope_dim, " must be even and at most head_dim ", head_dim));
  }
  if (!(rms_norm_eps > 0) || !(rope_theta > 0)) {
    return absl::InvalidArgumentError("rms_norm_eps and rope_theta must be positive");
  }
  if (rope_scaling.type != RopeScaling::Type::kNone && !(rope_scaling.factor > 0)) {
    return absl::InvalidArgumentError("rope_scaling.factor must be positive");
  }
  if (!rope_freq_factors.empty() &&
      static_cast<int64_t>(rope_freq_factors.size()) != rope_dim / 2) {
    return absl::InvalidArgumentError(StrCat("rope frequency factors: expected ",
                                                   rope_dim / 2, " values, got ",
                                                   rope_freq_factors.size()));
  }
  return absl::OkStatus();
}

std::vector<float> RopeInverseFrequencies(const ModelConfig& config) {
  const int64_t half = config.rope_dim / 2;
  std::vector<float> inv(half);
  const RopeScaling& s = config.rope_scaling;
  for (int64_t i = 0; i < half; ++i) {
    double f = std::pow(static_cast<double>(config.rope_theta),
                        -2.0 * static_cast<double>(i) / static_cast<double>(config.rope_dim));
    if (s.type == RopeScaling::Type::kLinear) {
      f /= s.factor;
    } else if (s.type == RopeScaling::Type::kLlama3) {
      // Llama 3.1: long wavelengths are slowed by `factor`, short ones kept,
      // and the band between is interpolated smoothly.
      const double old_ctx = static_cast<double>(s.original_max_position);
      const double low_wavelen = old_ctx / s.low_freq_factor;
      const double high_wavelen = old_ctx / s.high_freq_factor;
      const double wavelen = 2.0 * std::numbers::pi / f;
      if (wavelen > low_wavelen) {
        f /= s.factor;
      } else if (wavelen >= high_wavelen) {
        const double smooth =
            (old_ctx / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
        f = (1.0 - smooth) * f / s.factor + smooth * f;
      }
    }
    if (!config.rope_freq_factors.empty()) f /= config.rope_freq_factors[i];
    inv[i] = static_cast<float>(f);
  }
  return inv;
}

}  // namespace morphserve::engine
