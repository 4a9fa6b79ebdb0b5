// The Prometheus page: families, label escaping, cumulative histograms and
// the ratios; and the HTTP endpoints beside it.
#include "server/metrics.h"

#include <atomic>
#include <map>
#include <sstream>
#include <string>

#include "gtest/gtest.h"
#include "server/engine_loop.h"
#include "tests/server/serve_util.h"

namespace morphserve::server {
namespace {

// name{labels} -> value, for the sample lines of a page.
std::map<std::string, double> Samples(const std::string& page) {
  std::map<std::string, double> out;
  std::istringstream in(page);
  for (std::string line; std::getline(in, line);) {
    if (line.empty() || line[0] == '#') continue;
    const size_t space = line.rfind(' ');
    out[line.substr(0, space)] = std::stod(line.substr(space + 1));
  }
  return out;
}

TEST(MetricsTest, RendersEveryFamilyWithEscapedLabelsAndConsistentRatios) {
  EngineStats s;
  s.total_blocks = 100;
  s.used_blocks = 25;
  s.free_blocks = 75;
  s.kv_bytes_resident = 300;
  s.kv_bytes_saved = 900;
  s.kv_tokens_evicted[static_cast<int>(KvPolicyKind::kMorphKv)] = 42;
  s.requests_finished[static_cast<int>(FinishReason::kCancelled)] = 3;
  for (double v : {0.001, 0.02, 0.02, 7.0, 100.0}) s.inter_token_latency.Observe(v);
  for (double v : {1.0, 3.0, 64.0, 1000.0}) s.batch_size.Observe(v);
  Rejections rejected{};
  rejected[static_cast<size_t>(absl::StatusCode::kInvalidArgument)] = 5;
  const ServerInfo info{"1.2.3", "abc", "cpu", "llama", "/models/a \"b\"\\c", 4096};
  const std::string page = RenderMetrics(info, s, rejected);
  const std::map<std::string, double> m = Samples(page);

  EXPECT_EQ(m.at("morphserve_build_info{version=\"1.2.3\",commit=\"abc\",backend=\"cpu\"}"), 1);
  EXPECT_EQ(m.at("morphserve_model_info{architecture=\"llama\",name=\"/models/a \\\"b\\\"\\\\c\","
                 "context_length=\"4096\"}"),
            1);
  EXPECT_DOUBLE_EQ(m.at("morphserve_kv_usage_ratio"), 0.25);
  EXPECT_DOUBLE_EQ(m.at("morphserve_kv_savings_ratio"), 0.75);
  EXPECT_EQ(m.at("morphserve_kv_tokens_evicted_total{policy=\"morphkv\"}"), 42);
  EXPECT_EQ(m.at("morphserve_requests_finished_total{reason=\"cancelled\"}"), 3);
  EXPECT_EQ(m.at("morphserve_requests_rejected_total{reason=\"invalid_argument\"}"), 5);
  EXPECT_EQ(m.at("morphserve_requests_rejected_total{reason=\"resource_exhausted\"}"), 0);
  // Cumulative buckets, +Inf equal to the count.
  EXPECT_EQ(m.at("morphserve_inter_token_latency_seconds_bucket{le=\"0.005\"}"), 1);
  EXPECT_EQ(m.at("morphserve_inter_token_latency_seconds_bucket{le=\"0.025\"}"), 3);
  EXPECT_EQ(m.at("morphserve_inter_token_latency_seconds_bucket{le=\"10\"}"), 4);
  EXPECT_EQ(m.at("morphserve_inter_token_latency_seconds_bucket{le=\"+Inf\"}"), 5);
  EXPECT_EQ(m.at("morphserve_inter_token_latency_seconds_count"), 5);
  EXPECT_EQ(m.at("morphserve_batch_size_bucket{le=\"1\"}"), 1);
  EXPECT_EQ(m.at("morphserve_batch_size_bucket{le=\"4\"}"), 2);
  EXPECT_EQ(m.at("morphserve_batch_size_bucket{le=\"64\"}"), 3);
  EXPECT_EQ(m.at("morphserve_batch_size_bucket{le=\"+Inf\"}"), 4);
  EXPECT_DOUBLE_EQ(m.at("morphserve_batch_size_sum"), 1068);
  // Every sample's family is declared once, with a type.
  for (const auto& [name, value] : m) {
    std::string family = name.substr(0, name.find('{'));
    for (const char* suffix : {"_bucket", "_sum", "_count"}) {
      const std::string sfx = suffix;
      if (family.size() > sfx.size() &&
          family.compare(family.size() - sfx.size(), sfx.size(), sfx) == 0 &&
          page.find("# TYPE " + family.substr(0, family.size() - sfx.size()) + " histogram") !=
              std::string::npos) {
        family.resize(family.size() - sfx.size());
      }
    }
    EXPECT_NE(page.find("# TYPE " + family + " "), std::string::npos) << name;
  }
}

TEST(MetricsTest, ServesMetricsHealthAndReadiness) {
  std::atomic<bool> ready{false};
  MetricsHttpServer::Handlers handlers;
  handlers.render = [] { return std::string("morphserve_up 1\n"); };
  handlers.ready = [&] { return ready.load(); };
  auto server = MetricsHttpServer::Start("127.0.0.1", 0, std::move(handlers));
  ASSERT_TRUE(server.ok()) << server.status();
  const int port = (*server)->port();
  EXPECT_EQ(testing::HttpGet(port, "/healthz").rfind("HTTP/1.1 200", 0), 0u);
  EXPECT_EQ(testing::HttpGet(port, "/readyz").rfind("HTTP/1.1 503", 0), 0u);
  ready = true;
  EXPECT_EQ(testing::HttpGet(port, "/readyz").rfind("HTTP/1.1 200", 0), 0u);
  const std::string metrics = testing::HttpGet(port, "/metrics");
  EXPECT_EQ(metrics.rfind("HTTP/1.1 200", 0), 0u);
  EXPECT_NE(metrics.find("text/plain; version=0.0.4"), std::string::npos);
  EXPECT_NE(metrics.find("morphserve_up 1"), std::string::npos);
  EXPECT_EQ(testing::HttpGet(port, "/metricsx").rfind("HTTP/1.1 404", 0), 0u);
}

}  // namespace
}  // namespace morphserve::server
