// Prometheus text exposition of the engine's figures, and the small HTTP
// server that serves it at /metrics. The page is rendered at scrape time
// from EngineLoop::Stats(); nothing is done per token for it.
#ifndef MORPHSERVE_SERVER_METRICS_H_
#define MORPHSERVE_SERVER_METRICS_H_

#include <array>
#include <atomic>
#include <cstdint>
#include <functional>
#include <string>
#include <thread>

#include "absl/status/statusor.h"

namespace morphserve::server {

// Cumulative histogram with fixed bucket bounds (seconds).
struct LatencyHistogram {
  static constexpr std::array<double, 12> kBounds = {0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                                                     0.5,   1.0,  2.5,   5.0,  10.0, 30.0};
  std::array<int64_t, kBounds.size() + 1> counts{};  // the last is +Inf
  double sum = 0.0;
  int64_t count = 0;

  void Observe(double seconds);
};

struct EngineStats;

// The Prometheus text format (version 0.0.4) for `stats`.
std::string RenderMetrics(const EngineStats& stats);

// Serves GET /metrics (and / for a pointer to it) on one port, one
// connection at a time, from its own thread.
class MetricsHttpServer {
 public:
  // Binds `host`:`port` (0: any free port) and starts serving `render()`.
  static absl::StatusOr<std::unique_ptr<MetricsHttpServer>> Start(
      const std::string& host, int port, std::function<std::string()> render);
  ~MetricsHttpServer();

  int port() const { return port_; }

 private:
  MetricsHttpServer(int fd, int port, std::function<std::string()> render);
  void Serve();

  int fd_;
  int port_;
  std::function<std::string()> render_;
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

}  // namespace morphserve::server

#endif  // MORPHSERVE_SERVER_METRICS_H_
