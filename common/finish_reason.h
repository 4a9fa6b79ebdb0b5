// Why a sequence stopped generating; shared by the engine's stop checker,
// the scheduler and the API.
#ifndef MORPHSERVE_COMMON_FINISH_REASON_H_
#define MORPHSERVE_COMMON_FINISH_REASON_H_

#include <string_view>

namespace morphserve {

enum class FinishReason { kNone, kLength, kStop, kEos, kCancelled };

inline std::string_view FinishReasonName(FinishReason reason) {
  switch (reason) {
    case FinishReason::kNone: return "none";
    case FinishReason::kLength: return "length";
    case FinishReason::kStop: return "stop";
    case FinishReason::kEos: return "eos";
    case FinishReason::kCancelled: return "cancelled";
  }
  return "none";
}

}  // namespace morphserve

#endif  // MORPHSERVE_COMMON_FINISH_REASON_H_
