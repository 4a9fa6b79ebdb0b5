// `morphserve serve`: the gRPC server. Loads the model, starts the engine
// loop, warms it up, then serves morphserve.v1.Generation, grpc.health.v1
// and reflection. SIGTERM / SIGINT drain it: health turns NOT_SERVING, new
// Generate calls get UNAVAILABLE, streams in flight finish (up to
// --drain-timeout), and the process exits 0.
#include <chrono>
#include <csignal>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <memory>
#include <string>
#include <thread>

#include "common/logging.h"
#include "common/status.h"
#include "common/strings.h"
#include "engine/model/model.h"
#include "google/protobuf/stubs/logging.h"
#include "grpc/support/log.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/grpcpp.h"
#include "grpcpp/health_check_service_interface.h"
#include "server/cli/arg_parser.h"
#include "server/cli/commands.h"
#include "server/cli/engine_flags.h"
#include "server/cli/kv_options.h"
#include "server/engine_loop.h"
#include "server/generation_service.h"
#include "server/metrics.h"
#include "server/version.h"
#include "spdlog/spdlog.h"

namespace morphserve::cli {
namespace {

using Clock = std::chrono::steady_clock;

std::atomic<bool> g_stop{false};

extern "C" void OnStopSignal(int) { g_stop.store(true); }

// gRPC's and protobuf's own messages go through our logger, so that a JSON
// log stays one object per line.
void LogFromGrpc(gpr_log_func_args* args) {
  spdlog::level::level_enum level = spdlog::level::debug;
  if (args->severity == GPR_LOG_SEVERITY_ERROR) level = spdlog::level::err;
  if (args->severity == GPR_LOG_SEVERITY_INFO) level = spdlog::level::info;
  spdlog::log(level, "grpc: {} ({}:{})", args->message, args->file, args->line);
}

void LogFromProtobuf(google::protobuf::LogLevel level, const char* file, int line,
                     const std::string& message) {
  // Parse errors are answered to the client; they are not the server's.
  spdlog::log(
      level >= google::protobuf::LOGLEVEL_FATAL ? spdlog::level::critical : spdlog::level::debug,
      "protobuf: {} ({}:{})", message, file, line);
}

struct ServeOptions {
  std::string model;
  std::string load_format = "auto";
  int64_t num_layers = 0;
  std::string host = "0.0.0.0";
  int64_t port = 50051;
  int64_t metrics_port = 9464;
  EngineFlags engine;
  KvFlags kv;
  int64_t max_new_tokens = 256;
  int64_t max_new_tokens_limit = 0;
  int64_t max_queue = 1024;
  int64_t drain_timeout = 30;
  std::string api_keys_file;
  std::string tls_cert;
  std::string tls_key;
  std::string tls_client_ca;
  int64_t max_message_bytes = 4 << 20;
  std::string log_level = "info";
  std::string log_format = "plain";
  bool log_prompts = false;
};

// Plain TCP, TLS (--tls-cert, --tls-key) or mutual TLS (plus --tls-client-ca).
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> Credentials(const ServeOptions& o) {
  if (o.tls_cert.empty() != o.tls_key.empty()) {
    return absl::InvalidArgumentError("--tls-cert and --tls-key go together");
  }
  if (o.tls_cert.empty()) {
    if (!o.tls_client_ca.empty()) {
      return absl::InvalidArgumentError("--tls-client-ca needs --tls-cert and --tls-key");
    }
    return grpc::InsecureServerCredentials();
  }
  grpc::SslServerCredentialsOptions options(
      o.tls_client_ca.empty() ? GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE
                              : GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  grpc::SslServerCredentialsOptions::PemKeyCertPair pair;
  ASSIGN_OR_RETURN(pair.private_key, ReadFlagFile(o.tls_key, "tls-key"));
  ASSIGN_OR_RETURN(pair.cert_chain, ReadFlagFile(o.tls_cert, "tls-cert"));
  options.pem_key_cert_pairs.push_back(std::move(pair));
  if (!o.tls_client_ca.empty()) {
    ASSIGN_OR_RETURN(options.pem_root_certs, ReadFlagFile(o.tls_client_ca, "tls-client-ca"));
  }
  return grpc::SslServerCredentials(options);
}

// One short generation through the whole engine before reporting SERVING.
absl::Status WarmUp(server::EngineLoop& engine) {
  server::GenerationRequest r;
  r.prompt = {0};
  r.sampling.temperature = 0.0f;
  r.stop.max_new_tokens = 2;
  r.stop.ignore_eos = true;
  ASSIGN_OR_RETURN(auto submitted, engine.Submit(std::move(r)));
  for (;;) {
    auto e = submitted.second->Pop(std::chrono::seconds(120));
    if (!e.has_value()) return absl::DeadlineExceededError("the warm-up generation stalled");
    if (!e->error.ok()) return e->error;
    if (e->last()) return absl::OkStatus();
  }
}

absl::Status Run(const ServeOptions& o) {
  ASSIGN_OR_RETURN(const LogFormat log_format, ParseLogFormat(o.log_format));
  RETURN_IF_ERROR(InitLogging(o.log_level, log_format));
  gpr_set_log_function(LogFromGrpc);
  google::protobuf::SetLogHandler(LogFromProtobuf);
  if (o.model.empty()) return absl::InvalidArgumentError("--model is required");
  if (o.port < 0 || o.port > 65535) return absl::InvalidArgumentError("--port must be 0..65535");
  if (o.max_queue < 0 || o.drain_timeout < 0) {
    return absl::InvalidArgumentError("--max-queue and --drain-timeout must be at least 0");
  }
  if (o.max_message_bytes < 1024 || o.max_message_bytes > (int64_t{1} << 30)) {
    return absl::InvalidArgumentError("--max-message-bytes must be 1024..1073741824");
  }
  engine::ModelLoadOptions load;
  load.path = o.model;
  ASSIGN_OR_RETURN(load.format, engine::ParseLoadFormat(o.load_format));
  load.num_layers_override = o.num_layers;
  const Clock::time_point t0 = Clock::now();
  ASSIGN_OR_RETURN(std::unique_ptr<engine::Model> model, engine::LoadModel(load));
  const engine::ModelConfig& cfg = model->config;
  spdlog::info("loaded {} ({}) in {:.2f}s", o.model, model->format,
               std::chrono::duration<double>(Clock::now() - t0).count());

  server::ServerDefaults defaults;
  if (!o.api_keys_file.empty()) {
    std::ifstream keys(o.api_keys_file);
    if (!keys) return absl::NotFoundError(StrCat("cannot read --api-keys-file ", o.api_keys_file));
    for (std::string line; std::getline(keys, line);) {
      while (!line.empty() && (line.back() == '\r' || line.back() == ' ')) line.pop_back();
      if (!line.empty() && line.front() != '#') defaults.api_keys.push_back(line);
    }
    if (defaults.api_keys.empty()) {
      return absl::InvalidArgumentError(StrCat(o.api_keys_file, " holds no API key"));
    }
  }
  ASSIGN_OR_RETURN(defaults.kv, KvPolicyFromFlags(o.kv, cfg.context_length));
  defaults.max_new_tokens_limit =
      o.max_new_tokens_limit > 0 ? o.max_new_tokens_limit : cfg.context_length;
  defaults.max_new_tokens = std::min(o.max_new_tokens, defaults.max_new_tokens_limit);
  ASSIGN_OR_RETURN(server::EngineOptions engine_options, EngineOptionsFromFlags(o.engine));
  engine_options.max_queue = o.max_queue;
  engine_options.policies = {defaults.kv};
  ASSIGN_OR_RETURN(const std::unique_ptr<server::EngineLoop> engine_loop,
                   server::EngineLoop::Create(*model, engine_options));
  server::EngineLoop& engine = *engine_loop;
  RETURN_IF_ERROR(engine.SupportsPolicy(defaults.kv));
  server::GenerationService service(*model, &engine, defaults);
  service.set_log_prompts(o.log_prompts);

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  int port = 0;
  ASSIGN_OR_RETURN(const std::shared_ptr<grpc::ServerCredentials> credentials, Credentials(o));
  builder.AddListeningPort(StrCat(o.host, ":", o.port), credentials, &port);
  builder.RegisterService(service.grpc_service());
  builder.SetMaxReceiveMessageSize(static_cast<int>(o.max_message_bytes));
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || port == 0) {
    return absl::UnavailableError(StrCat("cannot listen on ", o.host, ":", o.port));
  }
  const server::ServerInfo info{kVersion,         kGitCommit, engine.options().device,
                                cfg.architecture, o.model,    cfg.context_length};
  std::atomic<bool> ready{false};  // what health and /readyz report
  std::unique_ptr<server::MetricsHttpServer> metrics;
  if (o.metrics_port >= 0) {
    server::MetricsHttpServer::Handlers handlers;
    handlers.render = [&] {
      return server::RenderMetrics(info, engine.Stats(), service.rejections());
    };
    handlers.ready = [&ready] { return ready.load(); };
    ASSIGN_OR_RETURN(metrics, server::MetricsHttpServer::Start(
                                  o.host, static_cast<int>(o.metrics_port), std::move(handlers)));
  }
  grpc::HealthCheckServiceInterface* health = server->GetHealthCheckService();
  health->SetServingStatus(false);
  RETURN_IF_ERROR(WarmUp(engine));
  health->SetServingStatus(true);
  ready = true;
  std::printf(
      "morphserve: serving %s on %s:%d (%lld KV blocks of %lld tokens), metrics on %d\n",
      o.model.c_str(), o.host.c_str(), port, static_cast<long long>(engine.options().num_blocks),
      static_cast<long long>(engine.options().block_size), metrics != nullptr ? metrics->port() : -1);
  std::fflush(stdout);

  std::signal(SIGTERM, OnStopSignal);
  std::signal(SIGINT, OnStopSignal);
  while (!g_stop.load()) std::this_thread::sleep_for(std::chrono::milliseconds(100));

  spdlog::info("draining: {} streams in flight", service.active_streams());
  ready = false;
  health->SetServingStatus(false);
  service.StartDraining();
  const Clock::time_point deadline = Clock::now() + std::chrono::seconds(o.drain_timeout);
  while (service.active_streams() > 0 && Clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  // Streams still open past the timeout are cancelled by the shutdown.
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1));
  spdlog::info("stopped");
  return absl::OkStatus();
}

}  // namespace

int ServeCommand(int argc, char** argv, int first) {
  ServeOptions o;
  ArgParser p("morphserve serve --model PATH [options]",
              "Serves the model over gRPC (morphserve.v1.Generation, health, reflection).");
  p.AddString("model", &o.model, "model: a .gguf file or a Hugging Face directory");
  p.AddString("load-format", &o.load_format, "auto, gguf, safetensors or dummy");
  p.AddInt("num-layers", &o.num_layers, "dummy weights only: keep this many layers (0: all)");
  p.AddString("host", &o.host, "address to listen on");
  p.AddInt("port", &o.port, "gRPC port (0: any free port)");
  p.AddInt("metrics-port", &o.metrics_port, "Prometheus /metrics port (0: any free port, -1: off)");
  AddEngineFlags(p, &o.engine);
  AddKvFlags(p, &o.kv);
  p.AddInt("max-new-tokens", &o.max_new_tokens, "default max_new_tokens of a request");
  p.AddInt("max-new-tokens-limit", &o.max_new_tokens_limit,
           "most tokens a request may ask for (0: the context length)");
  p.AddInt("max-queue", &o.max_queue,
           "most requests queued or running; beyond, RESOURCE_EXHAUSTED (0: no limit)");
  p.AddInt("drain-timeout", &o.drain_timeout, "seconds streams may take to finish on SIGTERM");
  p.AddString("api-keys-file", &o.api_keys_file,
              "accept only calls with `authorization: Bearer KEY`, one KEY per line (health is "
              "exempt)");
  p.AddString("tls-cert", &o.tls_cert, "PEM certificate chain: serve over TLS");
  p.AddString("tls-key", &o.tls_key, "PEM private key of --tls-cert");
  p.AddString("tls-client-ca", &o.tls_client_ca,
              "PEM CA bundle: require client certificates it signed (mutual TLS)");
  p.AddInt("max-message-bytes", &o.max_message_bytes,
           "largest request accepted; beyond, RESOURCE_EXHAUSTED");
  p.AddString("log-level", &o.log_level, "trace, debug, info, warn, error or off");
  p.AddString("log-format", &o.log_format, "plain or json (one object per line)");
  p.AddFlag("log-prompts", &o.log_prompts,
            "log each request's prompt and reply text (off: only sizes and timings)");
  return RunCommand(
      "serve", p, argc, argv, first, [&] { return Run(o); }, &o.log_level);
}

}  // namespace morphserve::cli
