#include "engine/generation/stop_checker.h"

#include <algorithm>

#include "common/strings.h"

namespace morphserve::engine {

absl::Status StopConditions::Validate() const {
  if (max_new_tokens <= 0) {
    return absl::InvalidArgumentError(
        StrCat("max_new_tokens must be positive, got ", max_new_tokens));
  }
  if (min_new_tokens < 0 || min_new_tokens > max_new_tokens) {
    return absl::InvalidArgumentError(StrCat(
        "min_new_tokens must be in [0, max_new_tokens], got ", min_new_tokens));
  }
  if (stop_strings.size() > kMaxStopStrings) {
    return absl::InvalidArgumentError(StrCat("at most ", kMaxStopStrings,
                                                   " stop strings are allowed, got ",
                                                   stop_strings.size()));
  }
  for (const std::string& s : stop_strings) {
    if (s.empty() || s.size() > kMaxStopStringBytes) {
      return absl::InvalidArgumentError(StrCat(
          "stop strings must be 1 to ", kMaxStopStringBytes, " bytes long"));
    }
  }
  return absl::OkStatus();
}

StopChecker::StopChecker(const Tokenizer& tokenizer, StopConditions conditions)
    : tokenizer_(tokenizer), conditions_(std::move(conditions)), detokenizer_(tokenizer) {}

void StopChecker::Release(std::string* out, bool everything) {
  size_t keep = 0;
  if (!everything) {
    // Hold back the longest suffix of pending_ that is a proper prefix of
    // some stop string.
    for (const std::string& stop : conditions_.stop_strings) {
      const size_t max_len = std::min(stop.size() - 1, pending_.size());
      for (size_t len = max_len; len > keep; --len) {
        if (std::string_view(pending_).substr(pending_.size() - len) ==
            std::string_view(stop).substr(0, len)) {
          keep = len;
          break;
        }
      }
    }
  }
  out->append(pending_, 0, pending_.size() - keep);
  pending_.erase(0, pending_.size() - keep);
}

StopChecker::Step StopChecker::Push(int32_t token) {
  Step step;
  ++num_tokens_;
  const bool may_stop = num_tokens_ > conditions_.min_new_tokens;
  if (may_stop && !conditions_.ignore_eos && tokenizer_.IsEndOfGeneration(token)) {
    pending_ += detokenizer_.Flush();
    Release(&step.text, true);
    step.finish = FinishReason::kEos;
    return step;
  }
  if (may_stop && std::find(conditions_.stop_token_ids.begin(), conditions_.stop_token_ids.end(),
                            token) != conditions_.stop_token_ids.end()) {
    pending_ += detokenizer_.Flush();
    Release(&step.text, true);
    step.finish = FinishReason::kStop;
    return step;
  }
  pending_ += detokenizer_.Push(token);
  if (may_stop) {
    size_t first = std::string::npos;
    for (const std::string& stop : conditions_.stop_strings) {
      first = std::min(first, pending_.find(stop));
    }
    if (first != std::string::npos) {
      pending_.resize(first);
      Release(&step.text, true);
      step.finish = FinishReason::kStop;
      return step;
    }
  }
  if (num_tokens_ >= conditions_.max_new_tokens) {
    pending_ += detokenizer_.Flush();
    Release(&step.text, true);
    step.finish = FinishReason::kLength;
    return step;
  }
  Release(&step.text, false);
  return step;
}

}  // namespace morphserve::engine
