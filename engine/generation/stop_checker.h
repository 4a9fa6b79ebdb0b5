// Decides when a sequence stops and which text may be streamed so far.
//
// Fed one generated token at a time, it detokenizes incrementally and holds
// back any tail of the text that could still become a stop string, so the
// client never sees part of a stop string. The stop string itself is not
// emitted (as in vLLM's default). One instance per sequence, one thread.
#ifndef MORPHSERVE_ENGINE_GENERATION_STOP_CHECKER_H_
#define MORPHSERVE_ENGINE_GENERATION_STOP_CHECKER_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "common/finish_reason.h"
#include "engine/tokenizer/incremental_detokenizer.h"
#include "engine/tokenizer/tokenizer.h"

namespace morphserve::engine {

using ::morphserve::FinishReason;
using ::morphserve::FinishReasonName;

struct StopConditions {
  int64_t max_new_tokens = 256;
  int64_t min_new_tokens = 0;  // EOS and stops are ignored before this many
  bool ignore_eos = false;
  std::vector<std::string> stop_strings;
  std::vector<int32_t> stop_token_ids;

  absl::Status Validate() const;
};

inline constexpr size_t kMaxStopStrings = 16;
inline constexpr size_t kMaxStopStringBytes = 256;

class StopChecker {
 public:
  StopChecker(const Tokenizer& tokenizer, StopConditions conditions);

  struct Step {
    std::string text;  // text that may be shown now
    FinishReason finish = FinishReason::kNone;
  };

  // Accounts for one generated token. After a finishing step, no more
  // tokens may be pushed.
  Step Push(int32_t token);

  int64_t num_tokens() const { return num_tokens_; }

 private:
  // Moves the part of pending_ that cannot start a stop string to `out`.
  void Release(std::string* out, bool everything);

  const Tokenizer& tokenizer_;
  StopConditions conditions_;
  IncrementalDetokenizer detokenizer_;
  std::string pending_;
  int64_t num_tokens_ = 0;
};

}  // namespace morphserve::engine

#endif  // MORPHSERVE_ENGINE_GENERATION_STOP_CHECKER_H_
