// Process-wide logging set-up. Modules log through spdlog directly; this only
// configures the default logger once (plain or JSON lines, level).
#ifndef MORPHSERVE_COMMON_LOGGING_H_
#define MORPHSERVE_COMMON_LOGGING_H_

#include <string_view>

#include "absl/status/status.h"

namespace morphserve {

enum class LogFormat { kPlain, kJson };

// level: trace, debug, info, warn, error, off. Logs go to stderr so that
// stdout stays clean for generated text and JSON results.
absl::Status InitLogging(std::string_view level, LogFormat format);

}  // namespace morphserve

#endif  // MORPHSERVE_COMMON_LOGGING_H_
