#include "server/metrics.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "absl/strings/ascii.h"
#include "absl/strings/str_format.h"
#include "common/finish_reason.h"
#include "common/kv_policy.h"
#include "common/strings.h"
#include "server/engine_loop.h"

namespace morphserve::server {
namespace {

void Header(std::string* out, std::string_view name, std::string_view type, std::string_view help) {
  absl::StrAppendFormat(out, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

void Metric(std::string* out, std::string_view name, std::string_view type, std::string_view help,
            double value) {
  Header(out, name, type, help);
  absl::StrAppendFormat(out, "%s %.17g\n", name, value);
}

void Gauge(std::string* out, std::string_view name, std::string_view help, double value) {
  Metric(out, name, "gauge", help, value);
}

void Counter(std::string* out, std::string_view name, std::string_view help, double value) {
  Metric(out, name, "counter", help, value);
}

// A label value with backslash, double quote and newline escaped.
std::string Label(std::string_view value) {
  std::string out;
  for (char c : value) {
    if (c == '\\' || c == '"') out += '\\';
    if (c == '\n') {
      out += "\\n";
      continue;
    }
    out += c;
  }
  return out;
}

void HistogramMetric(std::string* out, std::string_view name, std::string_view help,
                     const Histogram& h) {
  Header(out, name, "histogram", help);
  int64_t cumulative = 0;
  for (size_t i = 0; i < h.bounds().size(); ++i) {
    cumulative += h.counts()[i];
    absl::StrAppendFormat(out, "%s_bucket{le=\"%g\"} %d\n", name, h.bounds()[i], cumulative);
  }
  cumulative += h.counts().back();
  absl::StrAppendFormat(out, "%s_bucket{le=\"+Inf\"} %d\n%s_sum %.17g\n%s_count %d\n", name,
                        cumulative, name, h.sum(), name, h.count());
}

double Ratio(double part, double whole) { return whole > 0 ? part / whole : 0.0; }

}  // namespace

void Histogram::Observe(double value) {
  size_t i = 0;
  while (i < bounds_.size() && value > bounds_[i]) ++i;
  ++counts_[i];
  sum_ += value;
  ++count_;
}

std::string RenderMetrics(const ServerInfo& info, const EngineStats& s,
                          const Rejections& rejected) {
  std::string out;
  Header(&out, "morphserve_build_info", "gauge", "Build of the server (value 1).");
  absl::StrAppendFormat(&out,
                        "morphserve_build_info{version=\"%s\",commit=\"%s\",backend=\"%s\"} 1\n",
                        Label(info.version), Label(info.commit), Label(info.backend));
  Header(&out, "morphserve_model_info", "gauge", "The model being served (value 1).");
  absl::StrAppendFormat(
      &out, "morphserve_model_info{architecture=\"%s\",name=\"%s\",context_length=\"%d\"} 1\n",
      Label(info.architecture), Label(info.model), info.context_length);

  Gauge(&out, "morphserve_requests_running", "Requests being prefilled or decoded.",
        static_cast<double>(s.running));
  Gauge(&out, "morphserve_requests_waiting", "Requests queued for admission.",
        static_cast<double>(s.waiting));
  Header(&out, "morphserve_requests_finished_total", "counter",
         "Requests ended, by finish reason (failed: ended by an error).");
  const FinishReason reasons[] = {FinishReason::kLength, FinishReason::kStop, FinishReason::kEos,
                                  FinishReason::kCancelled};
  for (FinishReason r : reasons) {
    absl::StrAppendFormat(&out, "morphserve_requests_finished_total{reason=\"%s\"} %d\n",
                          std::string(FinishReasonName(r)),
                          s.requests_finished[static_cast<int>(r)]);
  }
  absl::StrAppendFormat(&out, "morphserve_requests_finished_total{reason=\"failed\"} %d\n",
                        s.requests_finished[static_cast<int>(FinishReason::kNone)]);
  Header(&out, "morphserve_requests_rejected_total", "counter",
         "Generate calls refused before they started, by gRPC status code.");
  const absl::StatusCode codes[] = {
      absl::StatusCode::kInvalidArgument,   absl::StatusCode::kOutOfRange,
      absl::StatusCode::kResourceExhausted, absl::StatusCode::kUnauthenticated,
      absl::StatusCode::kUnavailable,       absl::StatusCode::kAlreadyExists};
  for (absl::StatusCode code : codes) {
    absl::StrAppendFormat(&out, "morphserve_requests_rejected_total{reason=\"%s\"} %d\n",
                          absl::AsciiStrToLower(absl::StatusCodeToString(code)),
                          rejected[static_cast<size_t>(code)]);
  }
  Counter(&out, "morphserve_prompt_tokens_total", "Prompt tokens admitted.",
          static_cast<double>(s.prompt_tokens));
  Counter(&out, "morphserve_generation_tokens_total", "Tokens generated.",
          static_cast<double>(s.output_tokens));
  Counter(&out, "morphserve_engine_steps_total", "Engine steps run.", static_cast<double>(s.steps));
  Counter(&out, "morphserve_preemptions_total", "Full-cache sequences preempted for recomputation.",
          static_cast<double>(s.preemptions));

  Gauge(&out, "morphserve_kv_blocks_total", "KV pool size in blocks.",
        static_cast<double>(s.total_blocks));
  Gauge(&out, "morphserve_kv_blocks_used", "KV blocks holding tokens of live requests.",
        static_cast<double>(s.used_blocks));
  Gauge(&out, "morphserve_kv_blocks_free", "KV blocks not in use (reserved ones included).",
        static_cast<double>(s.free_blocks));
  Gauge(&out, "morphserve_kv_usage_ratio", "KV blocks used over the pool size.",
        Ratio(static_cast<double>(s.used_blocks), static_cast<double>(s.total_blocks)));
  Gauge(&out, "morphserve_kv_tokens_resident",
        "KV tokens held by live requests (per layer and KV head).",
        static_cast<double>(s.kv_tokens_resident));
  Gauge(&out, "morphserve_kv_tokens_full_equivalent",
        "KV tokens a full cache would hold for the same requests.",
        static_cast<double>(s.kv_tokens_full_equivalent));
  Gauge(&out, "morphserve_kv_bytes_resident", "KV bytes held by live requests.",
        static_cast<double>(s.kv_bytes_resident));
  Gauge(&out, "morphserve_kv_bytes_saved",
        "KV bytes the live requests' policies save against a full cache.",
        static_cast<double>(s.kv_bytes_saved));
  Gauge(&out, "morphserve_kv_savings_ratio",
        "KV bytes saved over what a full cache would hold, for the live requests.",
        Ratio(static_cast<double>(s.kv_bytes_saved),
              static_cast<double>(s.kv_bytes_saved + s.kv_bytes_resident)));
  Header(&out, "morphserve_kv_tokens_evicted_total", "counter",
         "KV tokens evicted (per layer and KV head), by the request's policy.");
  for (int k = 0; k < kNumKvPolicies; ++k) {
    absl::StrAppendFormat(&out, "morphserve_kv_tokens_evicted_total{policy=\"%s\"} %d\n",
                          std::string(KvPolicyName(static_cast<KvPolicyKind>(k))),
                          s.kv_tokens_evicted[k]);
  }
  Counter(&out, "morphserve_request_kv_bytes_saved_total",
          "KV bytes saved at the end of each request, summed over ended requests.",
          static_cast<double>(s.finished_kv_bytes_saved));
  Counter(&out, "morphserve_request_kv_bytes_full_equivalent_total",
          "KV bytes a full cache would have held at the end of each request, summed.",
          static_cast<double>(s.finished_kv_bytes_full_equivalent));

  HistogramMetric(&out, "morphserve_time_to_first_token_seconds", "Submission to first token.",
                  s.time_to_first_token);
  HistogramMetric(&out, "morphserve_inter_token_latency_seconds",
                  "Time between consecutive tokens of a request.", s.inter_token_latency);
  HistogramMetric(&out, "morphserve_queue_time_seconds", "Submission to first scheduled step.",
                  s.queue_time);
  HistogramMetric(&out, "morphserve_request_latency_seconds", "Submission to end.",
                  s.request_latency);
  HistogramMetric(&out, "morphserve_batch_size", "Sequences computed per engine step.",
                  s.batch_size);
  return out;
}

absl::StatusOr<std::unique_ptr<MetricsHttpServer>> MetricsHttpServer::Start(const std::string& host,
                                                                            int port,
                                                                            Handlers handlers) {
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
      new MetricsHttpServer(fd, ntohs(addr.sin_port), std::move(handlers)));
}

MetricsHttpServer::MetricsHttpServer(int fd, int port, Handlers handlers)
    : fd_(fd), port_(port), handlers_(std::move(handlers)) {
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
    const auto is = [&](std::string_view path) {
      const std::string line = StrCat("GET ", path);
      return request.rfind(line, 0) == 0 &&
             (request.size() == line.size() || request[line.size()] == ' ' ||
              request[line.size()] == '?');
    };
    if (is("/metrics")) {
      status = "200 OK";
      type = "text/plain; version=0.0.4; charset=utf-8";
      body = handlers_.render();
    } else if (is("/healthz")) {
      status = "200 OK";
      body = "ok\n";
    } else if (is("/readyz")) {
      const bool ready = handlers_.ready();
      status = ready ? "200 OK" : "503 Service Unavailable";
      body = ready ? "ready\n" : "not ready\n";
    } else if (is("/")) {
      status = "200 OK";
      body = "morphserve: /metrics, /healthz, /readyz\n";
    }
    const std::string response =
        StrCat("HTTP/1.1 ", status, "\r\nContent-Type: ", type, "\r\nContent-Length: ", body.size(),
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
