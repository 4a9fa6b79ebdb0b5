// `morphserve chat`: an interactive client of a running server. Reads lines
// from stdin and streams each reply to stdout as it is generated; the prompt,
// the model line, usage and errors go to stderr, so stdout holds only the
// replies. The conversation is sent whole each turn (the server keeps no
// state); with --raw each line is a plain prompt of its own.
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <iterator>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <thread>
#include <type_traits>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "common/status.h"
#include "common/strings.h"
#include "grpcpp/grpcpp.h"
#include "morphserve/v1/generation.grpc.pb.h"
#include "server/cli/arg_parser.h"
#include "server/cli/commands.h"

namespace morphserve::cli {
namespace {

struct ChatOptions {
  std::string server;
  std::string api_key;
  bool tls = false;
  std::string tls_ca;
  std::string tls_cert;
  std::string tls_key;
  int64_t connect_timeout = 5;
  std::string system;
  bool raw = false;
  bool show_usage = false;
  // Request parameters as given; empty ones take the server's defaults.
  std::string max_tokens;
  std::string temperature;
  std::string top_p;
  std::string top_k;
  std::string seed;
  std::string kv_policy;
  std::string kv_window;
  std::string kv_capacity;
};

constexpr std::string_view kCommands =
    "/reset  start a new conversation\n"
    "/quit   end the session (also /exit, Ctrl-D, or Ctrl-C at the prompt)\n"
    "/help   show this\n"
    "Ctrl-C while a reply streams stops that reply.\n";

// Plain TCP, TLS (--tls or --tls-ca) or mutual TLS (plus --tls-cert, --tls-key).
absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> Credentials(const ChatOptions& o) {
  if (o.tls_cert.empty() != o.tls_key.empty()) {
    return absl::InvalidArgumentError("--tls-cert and --tls-key go together");
  }
  if (!o.tls && o.tls_ca.empty() && o.tls_cert.empty()) return grpc::InsecureChannelCredentials();
  grpc::SslCredentialsOptions options;  // no CA bundle: the system's root certificates
  if (!o.tls_ca.empty()) {
    ASSIGN_OR_RETURN(options.pem_root_certs, ReadFlagFile(o.tls_ca, "tls-ca"));
  }
  if (!o.tls_cert.empty()) {
    ASSIGN_OR_RETURN(options.pem_cert_chain, ReadFlagFile(o.tls_cert, "tls-cert"));
    ASSIGN_OR_RETURN(options.pem_private_key, ReadFlagFile(o.tls_key, "tls-key"));
  }
  return grpc::SslCredentials(options);
}

// Parses `text` and passes it to `set`, unless it is empty (the server's
// default then applies).
template <typename T, typename Setter>
absl::Status SetIfGiven(const std::string& text, std::string_view flag, Setter set) {
  if (text.empty()) return absl::OkStatus();
  T value;
  bool ok;
  if constexpr (std::is_floating_point_v<T>) {
    ok = absl::SimpleAtof(text, &value);
  } else {
    ok = absl::SimpleAtoi(text, &value);
  }
  if (!ok) return absl::InvalidArgumentError(StrCat("--", flag, ": bad value '", text, "'"));
  set(value);
  return absl::OkStatus();
}

// The parameters every request of the session carries; ranges are checked by
// the server, whose error names the field.
absl::StatusOr<v1::GenerateRequest> RequestTemplate(const ChatOptions& o) {
  v1::GenerateRequest r;
  v1::SamplingParams* sampling = r.mutable_sampling();
  v1::KvParams* kv = r.mutable_kv();
  RETURN_IF_ERROR(SetIfGiven<uint32_t>(o.max_tokens, "max-tokens", [&](uint32_t v) {
    r.mutable_stopping()->set_max_new_tokens(v);
  }));
  RETURN_IF_ERROR(SetIfGiven<float>(o.temperature, "temperature",
                                    [&](float v) { sampling->set_temperature(v); }));
  RETURN_IF_ERROR(SetIfGiven<float>(o.top_p, "top-p", [&](float v) { sampling->set_top_p(v); }));
  RETURN_IF_ERROR(
      SetIfGiven<int32_t>(o.top_k, "top-k", [&](int32_t v) { sampling->set_top_k(v); }));
  RETURN_IF_ERROR(SetIfGiven<uint64_t>(o.seed, "seed", [&](uint64_t v) { sampling->set_seed(v); }));
  kv->set_policy(o.kv_policy);
  RETURN_IF_ERROR(
      SetIfGiven<uint32_t>(o.kv_window, "kv-window", [&](uint32_t v) { kv->set_window(v); }));
  RETURN_IF_ERROR(
      SetIfGiven<uint32_t>(o.kv_capacity, "kv-capacity", [&](uint32_t v) { kv->set_capacity(v); }));
  return r;
}

// Ctrl-C stops the reply in flight, or ends the session at the prompt. The
// signal handler only writes a byte to a pipe, all it may safely do; a
// watcher thread reads it and cancels the call. (Blocking SIGINT and waiting
// for it would not do: gRPC starts threads before main.)
int g_interrupt_pipe[2] = {-1, -1};

extern "C" void OnInterrupt(int) {
  const char byte = 0;
  if (write(g_interrupt_pipe[1], &byte, 1) < 0) return;
}

class InterruptWatcher {
 public:
  InterruptWatcher() {
    if (pipe(g_interrupt_pipe) != 0) return;  // Ctrl-C keeps its default: it ends the process
    std::signal(SIGINT, OnInterrupt);
    thread_ = std::thread([this] { Watch(); });
  }
  ~InterruptWatcher() {
    if (!thread_.joinable()) return;
    std::signal(SIGINT, SIG_DFL);
    stop_ = true;
    OnInterrupt(0);
    thread_.join();
    close(g_interrupt_pipe[0]);
    close(g_interrupt_pipe[1]);
  }
  InterruptWatcher(const InterruptWatcher&) = delete;
  InterruptWatcher& operator=(const InterruptWatcher&) = delete;

  // The call that Ctrl-C cancels until EndCall, which says whether it did.
  void BeginCall(grpc::ClientContext* call) {
    std::lock_guard<std::mutex> lock(mu_);
    call_ = call;
    cancelled_ = false;
  }
  bool EndCall() {
    std::lock_guard<std::mutex> lock(mu_);
    call_ = nullptr;
    return cancelled_;
  }

 private:
  void Watch() {
    char byte;
    while (read(g_interrupt_pipe[0], &byte, 1) == 1 && !stop_) {
      std::lock_guard<std::mutex> lock(mu_);
      if (call_ == nullptr) {
        std::fflush(stdout);
        std::fputs("\n", stderr);
        std::_Exit(130);  // the shell's code for an interrupted program
      }
      call_->TryCancel();
      cancelled_ = true;
    }
  }

  std::atomic<bool> stop_{false};
  std::mutex mu_;
  grpc::ClientContext* call_ = nullptr;
  bool cancelled_ = false;
  std::thread thread_;
};

std::string StatusText(const grpc::Status& s) {
  return StrCat(absl::StatusCodeToString(static_cast<absl::StatusCode>(s.error_code())), ": ",
                s.error_message());
}

void Authorize(grpc::ClientContext& context, const std::string& api_key) {
  if (!api_key.empty()) context.AddMetadata("authorization", StrCat("Bearer ", api_key));
}

// The first call: proves the server is there and takes the key.
absl::StatusOr<v1::ModelInfo> FetchModelInfo(v1::Generation::Stub& stub, const ChatOptions& o,
                                             const std::string& api_key) {
  grpc::ClientContext context;
  Authorize(context, api_key);
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(o.connect_timeout));
  v1::ModelInfo info;
  const grpc::Status s = stub.GetModelInfo(&context, {}, &info);
  if (s.ok()) return info;
  switch (s.error_code()) {
    case grpc::StatusCode::UNAUTHENTICATED:
      return absl::UnauthenticatedError(
          api_key.empty()
              ? StrCat(o.server, " needs an API key: pass --api-key KEY or set MORPHSERVE_API_KEY")
              : StrCat(o.server, " refused the API key: ", s.error_message()));
    case grpc::StatusCode::DEADLINE_EXCEEDED:
      return absl::DeadlineExceededError(StrCat("no answer from ", o.server, " within ",
                                                o.connect_timeout, " s (--connect-timeout)"));
    default:
      return absl::UnavailableError(StrCat("cannot reach ", o.server, ": ", StatusText(s)));
  }
}

std::string Bytes(uint64_t n) {
  if (n < 1024) return StrCat(n, " B");
  if (n < 1024 * 1024) return absl::StrFormat("%.1f KiB", n / 1024.0);
  return absl::StrFormat("%.1f MiB", n / (1024.0 * 1024.0));
}

std::string_view FinishName(v1::FinishReason f) {
  switch (f) {
    case v1::FINISH_REASON_LENGTH:
      return "length";
    case v1::FINISH_REASON_STOP:
      return "stop";
    case v1::FINISH_REASON_EOS:
      return "eos";
    case v1::FINISH_REASON_CANCELLED:
      return "cancelled";
    default:
      return "unspecified";
  }
}

void PrintUsage(const v1::GenerateResponse& last) {
  const v1::Usage& u = last.usage();
  std::fprintf(stderr,
               "[prompt %u tokens | completion %u tokens | TTFT %.1f ms | KV %llu of %llu tokens "
               "resident, %s saved | finish %s]\n",
               u.prompt_tokens(), u.completion_tokens(), u.time_to_first_token_seconds() * 1e3,
               static_cast<unsigned long long>(u.kv_tokens_resident()),
               static_cast<unsigned long long>(u.kv_tokens_full_equivalent()),
               Bytes(u.kv_bytes_saved()).c_str(),
               std::string(FinishName(last.finish_reason())).c_str());
}

struct Reply {
  grpc::Status status;
  std::string text;
  v1::GenerateResponse last;
  bool interrupted = false;  // by Ctrl-C
};

// One Generate call, its text streamed to stdout as it arrives and the line
// ended when any was written (or the call succeeded).
Reply Stream(v1::Generation::Stub& stub, const v1::GenerateRequest& request,
             const std::string& api_key, InterruptWatcher& interrupts) {
  Reply reply;
  grpc::ClientContext context;
  Authorize(context, api_key);
  interrupts.BeginCall(&context);
  std::unique_ptr<grpc::ClientReader<v1::GenerateResponse>> reader =
      stub.Generate(&context, request);
  v1::GenerateResponse response;
  while (reader->Read(&response)) {
    std::fwrite(response.text().data(), 1, response.text().size(), stdout);
    std::fflush(stdout);
    reply.text += response.text();
    reply.last = response;
  }
  reply.status = reader->Finish();
  reply.interrupted = interrupts.EndCall();
  if (reply.status.ok() || !reply.text.empty()) std::fputs("\n", stdout);
  std::fflush(stdout);
  return reply;
}

absl::Status Run(const ChatOptions& o) {
  if (o.server.empty()) return absl::InvalidArgumentError("--server HOST:PORT is required");
  if (o.connect_timeout <= 0) return absl::InvalidArgumentError("--connect-timeout must be > 0");
  ASSIGN_OR_RETURN(const v1::GenerateRequest request_template, RequestTemplate(o));
  ASSIGN_OR_RETURN(const std::shared_ptr<grpc::ChannelCredentials> credentials, Credentials(o));
  const char* env_key = std::getenv("MORPHSERVE_API_KEY");
  const std::string api_key = !o.api_key.empty() ? o.api_key : env_key != nullptr ? env_key : "";

  InterruptWatcher interrupts;
  const std::unique_ptr<v1::Generation::Stub> stub =
      v1::Generation::NewStub(grpc::CreateChannel(o.server, credentials));
  ASSIGN_OR_RETURN(const v1::ModelInfo info, FetchModelInfo(*stub, o, api_key));
  const bool has_template = !info.chat_template().empty();
  std::fprintf(stderr,
               "connected to %s: %s (%s, context %u, chat template %s, KV policy %s); /help for "
               "commands\n",
               o.server.c_str(), info.name().c_str(), info.architecture().c_str(),
               info.context_length(), has_template ? info.chat_template().c_str() : "none",
               info.default_kv_policy().c_str());

  v1::ChatInput new_conversation;
  if (!o.system.empty()) {
    v1::ChatMessage* m = new_conversation.add_messages();
    m->set_role("system");
    m->set_content(o.system);
  }
  v1::ChatInput conversation = new_conversation;
  const bool interactive = isatty(STDIN_FILENO) != 0;
  std::string line;
  for (;;) {
    if (interactive) std::fputs("> ", stderr);
    if (!std::getline(std::cin, line)) break;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.empty()) continue;
    if (line == "/quit" || line == "/exit") return absl::OkStatus();
    if (line == "/reset") {
      conversation = new_conversation;
      std::fputs("(new conversation)\n", stderr);
      continue;
    }
    if (line == "/help") {
      std::fputs(kCommands.data(), stderr);
      continue;
    }
    if (line.front() == '/') {
      std::fprintf(stderr, "unknown command %s; /help lists them\n", line.c_str());
      continue;
    }

    v1::GenerateRequest request = request_template;
    v1::ChatMessage user;
    user.set_role("user");
    user.set_content(line);
    if (o.raw) {
      request.set_text(line);
    } else {
      *request.mutable_chat() = conversation;
      *request.mutable_chat()->add_messages() = user;
    }
    const Reply reply = Stream(*stub, request, api_key, interrupts);
    if (reply.interrupted) {
      // The turn is dropped, so the next one is asked as if it never was.
      std::fputs("(stopped; this turn is not kept)\n", stderr);
      continue;
    }
    if (!reply.status.ok()) {
      std::fprintf(stderr, "error: %s\n", StatusText(reply.status).c_str());
      const grpc::StatusCode code = reply.status.error_code();
      if (code == grpc::StatusCode::INVALID_ARGUMENT && !o.raw && !has_template) {
        std::fputs(
            "the model has no chat template: run chat with --raw to send each line as a "
            "plain prompt\n",
            stderr);
      } else if (code == grpc::StatusCode::OUT_OF_RANGE && !o.raw) {
        std::fputs("the conversation no longer fits the context: /reset starts a new one\n",
                   stderr);
      }
      continue;
    }
    if (o.show_usage) PrintUsage(reply.last);
    if (!o.raw) {
      *conversation.add_messages() = user;
      v1::ChatMessage* assistant = conversation.add_messages();
      assistant->set_role("assistant");
      assistant->set_content(reply.text);
    }
  }
  if (interactive) std::fputs("\n", stderr);
  return absl::OkStatus();
}

}  // namespace

int ChatCommand(int argc, char** argv, int first) {
  ChatOptions o;
  ArgParser p("morphserve chat --server HOST:PORT [options]",
              "Chats with a running server: each line of stdin is a user message, each reply\n"
              "streams to stdout. Request options left out take the server's defaults.\n"
              "At the prompt: /reset, /quit (or /exit), /help. Ctrl-C stops a reply.");
  p.AddString("server", &o.server, "the server's gRPC address, HOST:PORT");
  p.AddString("api-key", &o.api_key,
              "sent as `authorization: Bearer KEY` (default: $MORPHSERVE_API_KEY)");
  p.AddFlag("tls", &o.tls, "use TLS, trusting the system's root certificates");
  p.AddString("tls-ca", &o.tls_ca, "PEM CA bundle to trust instead: use TLS");
  p.AddString("tls-cert", &o.tls_cert, "PEM client certificate chain (mutual TLS)");
  p.AddString("tls-key", &o.tls_key, "PEM private key of --tls-cert");
  p.AddInt("connect-timeout", &o.connect_timeout, "seconds to wait for the server at start");
  p.AddString("system", &o.system, "system message opening each conversation");
  p.AddFlag("raw", &o.raw,
            "no chat template: send each line alone as a plain text prompt (no history)");
  p.AddString("max-tokens", &o.max_tokens, "most tokens per reply");
  p.AddString("temperature", &o.temperature, "sampling temperature; 0 is greedy");
  p.AddString("top-p", &o.top_p, "nucleus sampling mass in (0, 1]");
  p.AddString("top-k", &o.top_k, "keep the k most likely tokens; 0 is off");
  p.AddString("seed", &o.seed, "random seed; same seed, same output");
  p.AddString("kv-policy", &o.kv_policy, "full, morphkv, h2o, snapkv or streaming");
  p.AddString("kv-window", &o.kv_window,
              "W: recent tokens always kept (morphkv: their queries score the others)");
  p.AddString("kv-capacity", &o.kv_capacity,
              "C: morphkv, h2o and streaming keep C+1 tokens; snapkv's prompt budget");
  p.AddFlag("show-usage", &o.show_usage,
            "after each reply, print tokens, time to first token and KV use to stderr");
  return RunCommand("chat", p, argc, argv, first, [&] { return Run(o); });
}

}  // namespace morphserve::cli
