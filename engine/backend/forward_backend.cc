#include "engine/backend/forward_backend.h"

namespace morphserve::engine {

absl::Status CheckSampleArgs(const ForwardBatch& batch, std::span<const SampleRow> rows) {
  if (batch.all_logits) {
    return absl::InvalidArgumentError("sampling takes the logits of each sequence's last token");
  }
  if (rows.size() != batch.sequences.size()) {
    return absl::InvalidArgumentError("sampling needs one row per sequence");
  }
  return absl::OkStatus();
}

}  // namespace morphserve::engine
