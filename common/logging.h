// Process-wide logging set-up. Modules log through spdlog directly; lines
// about one request go through LogRequest so that they carry its id (a JSON
// member, or a `[id]` tag in plain text).
#ifndef MORPHSERVE_COMMON_LOGGING_H_
#define MORPHSERVE_COMMON_LOGGING_H_

#include <cstdint>
#include <initializer_list>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "spdlog/common.h"

namespace morphserve {

enum class LogFormat { kPlain, kJson };

absl::StatusOr<LogFormat> ParseLogFormat(std::string_view name);  // plain or json

// level: trace, debug, info, warn, error, off. Logs go to stderr so that
// stdout stays clean for generated text and JSON results. In JSON every line
// is one object: ts, level, msg, and a request's fields.
// `sink` replaces stderr (tests).
absl::Status InitLogging(std::string_view level, LogFormat format, spdlog::sink_ptr sink = nullptr);

// A named value on a request's log line.
struct LogField {
  LogField(std::string_view k, std::string_view v) : key(k), value(v), quoted(true) {}
  LogField(std::string_view k, const char* v) : key(k), value(v), quoted(true) {}
  LogField(std::string_view k, int64_t v) : key(k), value(std::to_string(v)), quoted(false) {}
  LogField(std::string_view k, double v);

  std::string_view key;
  std::string value;
  bool quoted;  // a string; otherwise a number
};

// One line about request `request_id`.
void LogRequest(spdlog::level::level_enum level, std::string_view request_id,
                std::string_view message, std::initializer_list<LogField> fields = {});

}  // namespace morphserve

#endif  // MORPHSERVE_COMMON_LOGGING_H_
