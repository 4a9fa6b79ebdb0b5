#include "common/logging.h"

#include <cstdio>
#include <memory>
#include <string>

#include "common/strings.h"
#include "spdlog/details/fmt_helper.h"
#include "spdlog/formatter.h"
#include "spdlog/pattern_formatter.h"
#include "spdlog/sinks/stdout_sinks.h"
#include "spdlog/spdlog.h"

namespace morphserve {
namespace {

constexpr char kRequestLogger[] = "morphserve.request";

// The format chosen by InitLogging; plain until then.
LogFormat g_format = LogFormat::kPlain;

void AppendJsonString(std::string* out, std::string_view s) {
  out->push_back('"');
  for (const char c : s) {
    switch (c) {
      case '"':
        *out += "\\\"";
        break;
      case '\\':
        *out += "\\\\";
        break;
      case '\n':
        *out += "\\n";
        break;
      case '\r':
        *out += "\\r";
        break;
      case '\t':
        *out += "\\t";
        break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof(buf), "\\u%04x", c);
          *out += buf;
        } else {
          out->push_back(c);
        }
    }
  }
  out->push_back('"');
}

// One JSON object per line. A request's lines arrive already as JSON members
// (LogRequest builds them); every other message becomes "msg".
class JsonFormatter final : public spdlog::formatter {
 public:
  void format(const spdlog::details::log_msg& msg, spdlog::memory_buf_t& dest) override {
    time_.format(msg, dest);  // {"ts":"...","level":"...",
    const std::string_view payload(msg.payload.data(), msg.payload.size());
    if (std::string_view(msg.logger_name.data(), msg.logger_name.size()) == kRequestLogger) {
      dest.append(payload.data(), payload.data() + payload.size());
    } else {
      std::string escaped = "\"msg\":";
      AppendJsonString(&escaped, payload);
      dest.append(escaped.data(), escaped.data() + escaped.size());
    }
    constexpr std::string_view kEnd = "}\n";
    dest.append(kEnd.data(), kEnd.data() + kEnd.size());
  }
  std::unique_ptr<spdlog::formatter> clone() const override {
    return std::make_unique<JsonFormatter>();
  }

 private:
  spdlog::pattern_formatter time_{R"({"ts":"%Y-%m-%dT%H:%M:%S.%fZ","level":"%l",)",
                                  spdlog::pattern_time_type::utc, ""};
};

}  // namespace

LogField::LogField(std::string_view k, double v) : key(k), quoted(false) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.6g", v);
  value = buf;
}

absl::StatusOr<LogFormat> ParseLogFormat(std::string_view name) {
  if (name == "plain" || name == "text") return LogFormat::kPlain;
  if (name == "json") return LogFormat::kJson;
  return absl::InvalidArgumentError(StrCat("unknown log format '", name, "' (plain or json)"));
}

absl::Status InitLogging(std::string_view level, LogFormat format, spdlog::sink_ptr sink) {
  const spdlog::level::level_enum lvl = spdlog::level::from_str(std::string(level));
  if (lvl == spdlog::level::off && level != "off") {
    return absl::InvalidArgumentError(StrCat("unknown log level '", level, "'"));
  }
  if (sink == nullptr) sink = std::make_shared<spdlog::sinks::stderr_sink_mt>();
  auto logger = std::make_shared<spdlog::logger>("morphserve", sink);
  auto request_logger = std::make_shared<spdlog::logger>(kRequestLogger, sink);
  for (spdlog::logger* l : {logger.get(), request_logger.get()}) {
    if (format == LogFormat::kJson) {
      l->set_formatter(std::make_unique<JsonFormatter>());
    } else {
      l->set_pattern("%Y-%m-%d %H:%M:%S.%e %^%l%$ %v");
    }
    l->set_level(lvl);
  }
  g_format = format;
  spdlog::drop(kRequestLogger);
  spdlog::register_logger(request_logger);
  spdlog::set_default_logger(std::move(logger));
  return absl::OkStatus();
}

void LogRequest(spdlog::level::level_enum level, std::string_view request_id,
                std::string_view message, std::initializer_list<LogField> fields) {
  std::shared_ptr<spdlog::logger> logger = spdlog::get(kRequestLogger);
  if (logger == nullptr) logger = spdlog::default_logger();
  if (!logger->should_log(level)) return;
  std::string line;
  if (g_format == LogFormat::kJson && logger->name() == kRequestLogger) {
    line = "\"request_id\":";
    AppendJsonString(&line, request_id);
    line += ",\"msg\":";
    AppendJsonString(&line, message);
    for (const LogField& f : fields) {
      line.push_back(',');
      AppendJsonString(&line, f.key);
      line.push_back(':');
      if (f.quoted) {
        AppendJsonString(&line, f.value);
      } else {
        line += f.value;
      }
    }
  } else {
    line = StrCat("[", request_id, "] ", message);
    for (const LogField& f : fields) {
      StrAppend(&line, " ", f.key, "=",
                f.quoted && f.value.find(' ') != std::string::npos ? StrCat("\"", f.value, "\"")
                                                                   : f.value);
    }
  }
  logger->log(level, "{}", line);
}

}  // namespace morphserve
