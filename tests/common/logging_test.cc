// JSON logs are one valid object per line, whatever the message holds, and a
// request's lines carry its id and fields; plain logs tag the id.
#include "common/logging.h"

#include <sstream>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "spdlog/sinks/ostream_sink.h"
#include "spdlog/spdlog.h"

namespace morphserve {
namespace {

std::vector<std::string> Lines(const std::string& s) {
  std::vector<std::string> out;
  std::istringstream in(s);
  for (std::string line; std::getline(in, line);) out.push_back(line);
  return out;
}

TEST(LoggingTest, JsonLinesAreObjectsWithTheRequestFields) {
  std::ostringstream out;
  ASSERT_TRUE(
      InitLogging("info", LogFormat::kJson, std::make_shared<spdlog::sinks::ostream_sink_mt>(out))
          .ok());
  spdlog::info("a \"quoted\" message\nover two lines\twith a tab and \\ a backslash");
  LogRequest(spdlog::level::info, "req-\"7\"", "Generate",
             {{"status", "OK"}, {"prompt_tokens", int64_t{12}}, {"ttft_s", 0.25}});
  LogRequest(spdlog::level::debug, "req-8", "below the level");
  const std::vector<std::string> lines = Lines(out.str());
  ASSERT_EQ(lines.size(), 2u) << out.str();
  const nlohmann::json plain = nlohmann::json::parse(lines[0]);
  EXPECT_EQ(plain["level"], "info");
  EXPECT_EQ(plain["msg"], "a \"quoted\" message\nover two lines\twith a tab and \\ a backslash");
  EXPECT_TRUE(plain.contains("ts"));
  const nlohmann::json request = nlohmann::json::parse(lines[1]);
  EXPECT_EQ(request["request_id"], "req-\"7\"");
  EXPECT_EQ(request["msg"], "Generate");
  EXPECT_EQ(request["status"], "OK");
  EXPECT_EQ(request["prompt_tokens"], 12);
  EXPECT_DOUBLE_EQ(request["ttft_s"].get<double>(), 0.25);
  spdlog::drop_all();
}

TEST(LoggingTest, PlainLinesTagTheRequest) {
  std::ostringstream out;
  ASSERT_TRUE(
      InitLogging("info", LogFormat::kPlain, std::make_shared<spdlog::sinks::ostream_sink_mt>(out))
          .ok());
  LogRequest(spdlog::level::warn, "req-3", "Generate", {{"status", "CANCELLED"}});
  EXPECT_NE(out.str().find("[req-3] Generate status=CANCELLED"), std::string::npos) << out.str();
  spdlog::drop_all();
}

TEST(LoggingTest, UnknownLevelAndFormatAreErrors) {
  EXPECT_FALSE(InitLogging("loud", LogFormat::kPlain).ok());
  EXPECT_FALSE(ParseLogFormat("xml").ok());
  EXPECT_EQ(*ParseLogFormat("json"), LogFormat::kJson);
}

}  // namespace
}  // namespace morphserve
