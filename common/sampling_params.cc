#include "common/sampling_params.h"

#include <cmath>

#include "common/strings.h"

namespace morphserve {

absl::Status SamplingParams::Validate() const {
  if (!std::isfinite(temperature) || temperature < 0.0f) {
    return absl::InvalidArgumentError(
        StrCat("temperature must be a finite number >= 0, got ", temperature));
  }
  if (top_k < 0) return absl::InvalidArgumentError(StrCat("top_k must be >= 0, got ", top_k));
  if (!(top_p > 0.0f && top_p <= 1.0f)) {
    return absl::InvalidArgumentError(StrCat("top_p must be in (0, 1], got ", top_p));
  }
  if (!(min_p >= 0.0f && min_p <= 1.0f)) {
    return absl::InvalidArgumentError(StrCat("min_p must be in [0, 1], got ", min_p));
  }
  if (!(std::isfinite(repetition_penalty) && repetition_penalty > 0.0f)) {
    return absl::InvalidArgumentError(
        StrCat("repetition_penalty must be > 0, got ", repetition_penalty));
  }
  if (!(std::isfinite(presence_penalty) && std::fabs(presence_penalty) <= 2.0f)) {
    return absl::InvalidArgumentError(
        StrCat("presence_penalty must be in [-2, 2], got ", presence_penalty));
  }
  if (!(std::isfinite(frequency_penalty) && std::fabs(frequency_penalty) <= 2.0f)) {
    return absl::InvalidArgumentError(
        StrCat("frequency_penalty must be in [-2, 2], got ", frequency_penalty));
  }
  if (logprobs < 0 || logprobs > kMaxLogprobs) {
    return absl::InvalidArgumentError(
        StrCat("logprobs must be in [0, ", kMaxLogprobs, "], got ", logprobs));
  }
  return absl::OkStatus();
}

}  // namespace morphserve
