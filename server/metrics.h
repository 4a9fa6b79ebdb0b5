// Prometheus text exposition of the server's figures, and the small HTTP
// server that serves it at /metrics with /healthz and /readyz beside it. The
// page is rendered at scrape time from EngineLoop::Stats() and the service's
// counters; nothing is done per token for it.
#ifndef MORPHSERVE_SERVER_METRICS_H_
#define MORPHSERVE_SERVER_METRICS_H_

#include <array>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"

namespace morphserve::server {

// Cumulative histogram over fixed upper bounds.
class Histogram {
 public:
  static constexpr std::array<double, 12> kSeconds = {0.005, 0.01, 0.025, 0.05, 0.1,  0.25,
                                                      0.5,   1.0,  2.5,   5.0,  10.0, 30.0};
  static constexpr std::array<double, 10> kBatchSizes = {1, 2, 4, 8, 16, 32, 64, 128, 256, 512};

  Histogram() : Histogram(kSeconds) {}
  explicit Histogram(std::span<const double> bounds)
      : bounds_(bounds), counts_(bounds.size() + 1) {}

  void Observe(double value);

  std::span<const double> bounds() const { return bounds_; }
  // Per bucket, not cumulative; the last is +Inf.
  const std::vector<int64_t>& counts() const { return counts_; }
  double sum() const { return sum_; }
  int64_t count() const { return count_; }

 private:
  std::span<const double> bounds_;
  std::vector<int64_t> counts_;
  double sum_ = 0.0;
  int64_t count_ = 0;
};

// Labels of the info metrics, fixed at start-up.
struct ServerInfo {
  std::string version;
  std::string commit;
  std::string backend;  // cpu or cuda
  std::string architecture;
  std::string model;
  int64_t context_length = 0;
};

// Generate calls refused before they reached the engine, by status code
// (gRPC's and Abseil's codes are the same numbers).
using Rejections = std::array<int64_t, 17>;

struct EngineStats;

// The Prometheus text format (version 0.0.4).
std::string RenderMetrics(const ServerInfo& info, const EngineStats& stats,
                          const Rejections& rejected);

// Serves GET /metrics, /healthz (the process is up) and /readyz (200 when
// `ready()`, else 503) on one port, one connection at a time, from its own
// thread.
class MetricsHttpServer {
 public:
  struct Handlers {
    std::function<std::string()> render;
    std::function<bool()> ready;
  };
  // Binds `host`:`port` (0: any free port) and starts serving.
  static absl::StatusOr<std::unique_ptr<MetricsHttpServer>> Start(const std::string& host, int port,
                                                                  Handlers handlers);
  ~MetricsHttpServer();

  int port() const { return port_; }

 private:
  MetricsHttpServer(int fd, int port, Handlers handlers);
  void Serve();

  int fd_;
  int port_;
  Handlers handlers_;
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

}  // namespace morphserve::server

#endif  // MORPHSERVE_SERVER_METRICS_H_
