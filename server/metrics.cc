#include "server/metrics.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "absl/strings/str_format.h"
#include "common/finish_reason.h"
#include "common/strings.h"
#include "server/engine_loop.h"

namespace morphserve::server {
namespace {

void Metric(std::string* out, const char* name, const char* type, const char* help,
            double value) {
  absl::StrAppendFormat(out, "# HELP %s %s\n# TYPE %s %s\n%s %.17g\n", name, help, name, type,
                        name, value);
}

void Histogram(std::string* out, const char* name, const char* help, const LatencyHistogram& h) {
  absl::StrAppendFormat(out, "# HELP %s %s\n# TYPE %s histogram\n", name, help, name);
  int64_t cumulative = 0;
  for (size_t i = 0; i < LatencyHistogram::kBounds.size(); ++i) {
    cumulative += h.counts[i];
    absl::StrAppendFormat(out, "%s_bucket{le=\"%g\"} %d\n", name, LatencyHistogram::kBounds[i],
                          cumulative);
  }
  cumulative += h.counts.back();
  absl::StrAppendFormat(out, "%s_bucket{le=\"+Inf\"} %d\n%s_sum %.17g\n%s_count %d\n", name,
                        cumulative, name, h.sum, name, h.count);
}

}  // namespace

void LatencyHistogram::Observe(double seconds) {
  size_t i = 0;
  while (i < kBounds.size() && seconds > kBounds[i]) ++i;
  ++counts[i];
  sum += seconds;
  ++count;
}

std::string RenderMetrics(const EngineStats& s) {
  std::string out;
  Metric(&out, "morphserve_requests_running", "gauge", "Requests being prefilled or decoded.",
         static_cast<double>(s.running));
  Metric(&out, "morphserve_requests_waiting", "gauge", "Requests queued for admission.",
         static_cast<double>(s.waiting));
  out += "# HELP morphserve_requests_finished_total Requests ended, by finish reason.\n"
         "# TYPE morphserve_requests_finished_total counter\n";
  const FinishReason reasons[] = {FinishReason::kLength, FinishReason::kStop, FinishReason::kEos,
                                  FinishReason::kCancelled};
  for (FinishReason r : reasons) {
    absl::StrAppendFormat(&out, "morphserve_requests_finished_total{reason=\"%s\"} %d\n",
                          std::string(FinishReasonName(r)),
                          s.requests_finished[static_cast<int>(r)]);
  }
  absl::StrAppendFormat(&out, "morphserve_requests_finished_total{reason=\"failed\"} %d\n",
                        s.requests_finished[static_cast<int>(FinishReason::kNone)]);
  Metric(&out, "morphserve_prompt_tokens_total", "counter", "Prompt tokens admitted.",
         static_cast<double>(s.prompt_tokens));
  Metric(&out, "morphserve_generation_tokens_total", "counter", "Tokens generated.",
         static_cast<double>(s.output_tokens));
  Metric(&out, "morphserve_engine_steps_total", "counter", "Engine steps run.",
         static_cast<double>(s.steps));
  Metric(&out, "morphserve_preemptions_total", "counter",
         "Full-cache sequences preempted for recomputation.", static_cast<double>(s.preemptions));
  Metric(&out, "morphserve_kv_blocks_total", "gauge", "KV pool size in blocks.",
         static_cast<double>(s.total_blocks));
  Metric(&out, "morphserve_kv_blocks_free", "gauge", "KV blocks neither used nor reserved.",
         static_cast<double>(s.free_blocks));
  Metric(&out, "morphserve_kv_tokens_resident", "gauge",
         "KV tokens held by live requests (per layer and KV head).",
         static_cast<double>(s.kv_tokens_resident));
  Metric(&out, "morphserve_kv_tokens_full_equivalent", "gauge",
         "KV tokens a full cache would hold for the same requests.",
         static_cast<double>(s.kv_tokens_full_equivalent));
  Metric(&out, "morphserve_kv_bytes_resident", "gauge", "KV bytes held by live requests.",
         static_cast<double>(s.kv_bytes_resident));
  Metric(&out, "morphserve_kv_bytes_saved", "gauge",
         "KV bytes the requests' policies save against a full cache, right now.",
         static_cast<double>(s.kv_bytes_saved));
  Histogram(&out, "morphserve_time_to_first_token_seconds", "Submission to first token.",
            s.time_to_first_token);
  Histogram(&out, "morphserve_queue_time_seconds", "Submission to first scheduled step.",
            s.queue_time);
  Histogram(&out, "morphserve_request_latency_seconds", "Submission to end.", s.request_latency);
  return out;
}

absl::StatusOr<std::unique_ptr<MetricsHttpServer>> MetricsHttpServer::Start(
    const std::string& host, int port, std::function<std::string()> render) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return absl::InternalError(StrCat("socket: ", std::strerror(errno)));
  const int one = 1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  if (inet_pton(AF_INET, host.c_str(), &addr.sin_addr) != 1) {
    close(fd);
    return absl::InvalidArgumentError(StrCat("metrics host '", host, "' is not an IPv4 address"));
  }
  if (bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 || listen(fd, 16) != 0) {
    const std::string error = std::strerror(errno);
    close(fd);
    return absl::UnavailableError(StrCat("cannot listen on ", host, ":", port, ": ", error));
  }
  socklen_t len = sizeof(addr);
  getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  return std::unique_ptr<MetricsHttpServer>(
      new MetricsHttpServer(fd, ntohs(addr.sin_port), std::move(render)));
}

MetricsHttpServer::MetricsHttpServer(int fd, int port, std::function<std::string()> render)
    : fd_(fd), port_(port), render_(std::move(render)) {
  thread_ = std::thread([this] { Serve(); });
}

MetricsHttpServer::~MetricsHttpServer() {
  stop_ = true;
  thread_.join();
  close(fd_);
}

void MetricsHttpServer::Serve() {
  while (!stop_) {
    pollfd p{fd_, POLLIN, 0};
    if (poll(&p, 1, 100) <= 0) continue;
    const int conn = accept(fd_, nullptr, nullptr);
    if (conn < 0) continue;
    // Only the request line matters; headers and body are ignored.
    char buf[2048];
    pollfd c{conn, POLLIN, 0};
    const ssize_t n = poll(&c, 1, 1000) > 0 ? read(conn, buf, sizeof(buf) - 1) : 0;
    const std::string request(buf, n > 0 ? static_cast<size_t>(n) : 0);
    std::string status = "404 Not Found", type = "text/plain", body = "not found\n";
    if (request.rfind("GET /metrics", 0) == 0) {
      status = "200 OK";
      type = "text/plain; version=0.0.4; charset=utf-8";
      body = render_();
    } else if (request.rfind("GET / ", 0) == 0) {
      status = "200 OK";
      body = "morphserve metrics: /metrics\n";
    }
    const std::string response = StrCat("HTTP/1.1 ", status, "\r\nContent-Type: ", type,
                                         "\r\nContent-Length: ", body.size(),
                                         "\r\nConnection: close\r\n\r\n", body);
    size_t sent = 0;
    while (sent < response.size()) {
      const ssize_t w = write(conn, response.data() + sent, response.size() - sent);
      if (w <= 0) break;
      sent += static_cast<size_t>(w);
    }
    close(conn);
  }
}

}  // namespace morphserve::server
