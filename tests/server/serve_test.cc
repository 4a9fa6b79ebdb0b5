// Starts the real `morphserve serve` on loopback and talks to it with a gRPC
// client: streaming generation equal to the CLI's, errors with the right
// status that leave the server serving, model info and load, cancellation
// and deadlines that free the KV blocks, and a clean exit on SIGTERM.
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "grpcpp/generic/generic_stub.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "morphserve/v1/generation.grpc.pb.h"
#include "nlohmann/json.hpp"
#include "tests/server/serve_util.h"

namespace morphserve {
namespace {

using testing::Connect;
using testing::Generate;
using testing::GenericUnary;
using testing::HealthStatus;
using testing::HttpGet;
using testing::kBinary;
using testing::kTinyModel;
using testing::MakeCertificates;
using testing::RunCli;
using testing::ServerProcess;
using testing::Streamed;
using testing::TinyServer;

// Protobuf may refuse to write invalid UTF-8 into a string field: such a
// request is written with kPlaceholder in the field (it must hold it), whose
// bytes are then overwritten with 0xFF, never valid in UTF-8.
constexpr std::string_view kPlaceholder = "<not UTF-8>";

std::string SerializeWithInvalidUtf8(const v1::GenerateRequest& request) {
  std::string bytes = request.SerializeAsString();
  bytes.replace(bytes.find(kPlaceholder), kPlaceholder.size(), kPlaceholder.size(), '\xFF');
  return bytes;
}

// Waits (briefly: figures are published once per step) until nothing runs
// and every KV block is free, and returns the last load seen.
v1::Load WaitUntilIdle(v1::Generation::Stub& stub) {
  v1::Load load;
  for (int i = 0; i < 250; ++i) {
    grpc::ClientContext context;
    if (!stub.GetLoad(&context, {}, &load).ok()) break;
    if (load.kv_blocks_free() == load.kv_blocks_total() && load.running() == 0 &&
        load.waiting() == 0) {
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return load;
}

TEST(ServeTest, StreamsTheSameTokensAsTheCliAndSurvivesBadRequests) {
  // One request at a time, so that a second one finds the queue full.
  ServerProcess server = TinyServer(64, {"--max-queue", "1", "--max-message-bytes", "65536"});
  ASSERT_GT(server.port(), 0) << "the server did not start";
  auto stub = Connect(server.port());
  // A request leaves the queue a moment after its last token (the warm-up
  // one here, the first one below).
  WaitUntilIdle(*stub);

  v1::GenerateRequest request;
  request.set_text("Once upon a time");
  request.mutable_sampling()->set_temperature(0.0f);
  request.mutable_stopping()->set_max_new_tokens(12);
  request.mutable_stopping()->set_ignore_eos(true);
  request.set_top_logprobs(2);
  const Streamed got = Generate(*stub, request);
  ASSERT_TRUE(got.status.ok()) << got.status.error_message();
  const nlohmann::json cli = nlohmann::json::parse(
      RunCli("generate --json --threads 1 --max-tokens 12 --ignore-eos --model " + kTinyModel +
             " --prompt 'Once upon a time'"));
  EXPECT_EQ(got.tokens, cli["tokens"].get<std::vector<int32_t>>());
  EXPECT_EQ(got.text, cli["text"].get<std::string>());
  EXPECT_EQ(got.last.finish_reason(), v1::FINISH_REASON_LENGTH);
  EXPECT_EQ(got.last.usage().completion_tokens(), 12u);
  EXPECT_GT(got.last.usage().prompt_tokens(), 0u);

  // Every kind of bad input gets its status and a message naming the field.
  constexpr auto kInvalid = grpc::StatusCode::INVALID_ARGUMENT;
  constexpr auto kOutOfRange = grpc::StatusCode::OUT_OF_RANGE;
  constexpr auto kExhausted = grpc::StatusCode::RESOURCE_EXHAUSTED;
  struct Bad {
    std::string what;
    grpc::StatusCode code;
    std::string field;
    std::string bytes;
  };
  std::vector<Bad> bad;
  const auto add = [&](std::string what, grpc::StatusCode code, std::string field,
                       const std::function<void(v1::GenerateRequest&)>& edit) {
    v1::GenerateRequest r = request;
    edit(r);
    bad.push_back({std::move(what), code, std::move(field), r.SerializeAsString()});
  };
  const auto add_invalid_utf8 = [&](std::string what, std::string field,
                                    const std::function<void(v1::GenerateRequest&)>& edit) {
    v1::GenerateRequest r = request;
    edit(r);
    bad.push_back({std::move(what), kInvalid, std::move(field), SerializeWithInvalidUtf8(r)});
  };
  const std::string placeholder(kPlaceholder);
  const auto add_user_message = [](v1::GenerateRequest& r, const std::string& content) {
    v1::ChatMessage* m = r.mutable_chat()->add_messages();
    m->set_role("user");
    m->set_content(content);
  };

  // Input.
  bad.push_back({"no input", kInvalid, "input", ""});
  add("empty text", kInvalid, "text", [](auto& r) { r.set_text(""); });
  add_invalid_utf8("invalid UTF-8 text", "text",
                   [&](auto& r) { r.set_text("Once upon " + placeholder); });
  add("no token ids", kInvalid, "tokens.ids", [](auto& r) { r.mutable_tokens(); });
  add("unknown token id", kInvalid, "tokens.ids[1]", [](auto& r) {
    r.mutable_tokens()->add_ids(1);
    r.mutable_tokens()->add_ids(999999);
  });
  add("negative token id", kInvalid, "tokens.ids[0]",
      [](auto& r) { r.mutable_tokens()->add_ids(-1); });
  add("no chat messages", kInvalid, "chat.messages", [](auto& r) { r.mutable_chat(); });
  add("unknown role", kInvalid, "chat.messages[1].role", [&](auto& r) {
    add_user_message(r, "Hello");
    v1::ChatMessage* m = r.mutable_chat()->add_messages();
    m->set_role("robot");
    m->set_content("Hi");
  });
  add("empty chat message", kInvalid, "chat.messages[0].content",
      [&](auto& r) { add_user_message(r, ""); });
  add_invalid_utf8("invalid UTF-8 chat message", "chat.messages[0].content",
                   [&](auto& r) { add_user_message(r, "Hello " + placeholder); });
  add("chat without a template", kInvalid, "chat:", [&](auto& r) { add_user_message(r, "Hello"); });
  add("prompt beyond the context", kOutOfRange, "tokens.ids", [](auto& r) {
    for (int i = 0; i < 4096; ++i) r.mutable_tokens()->add_ids(1);
    r.mutable_stopping()->set_max_new_tokens(1);
  });
  add("prompt beyond the KV pool", kExhausted, "KV blocks", [](auto& r) {
    for (int i = 0; i < 64 * 16 + 1; ++i) r.mutable_tokens()->add_ids(1);
    r.mutable_stopping()->set_max_new_tokens(1);
  });
  {
    v1::GenerateRequest r = request;
    r.set_text(std::string(200 * 1024, 'a'));
    bad.push_back({"oversized message", kExhausted, "larger than max", r.SerializeAsString()});
  }
  // Sampling.
  add("negative temperature", kInvalid, "sampling.temperature",
      [](auto& r) { r.mutable_sampling()->set_temperature(-0.5f); });
  add("NaN temperature", kInvalid, "sampling.temperature",
      [](auto& r) { r.mutable_sampling()->set_temperature(std::nanf("")); });
  add("top_p 0", kInvalid, "sampling.top_p",
      [](auto& r) { r.mutable_sampling()->set_top_p(0.0f); });
  add("top_p above 1", kInvalid, "sampling.top_p",
      [](auto& r) { r.mutable_sampling()->set_top_p(1.5f); });
  add("negative top_k", kInvalid, "sampling.top_k",
      [](auto& r) { r.mutable_sampling()->set_top_k(-1); });
  add("min_p above 1", kInvalid, "sampling.min_p",
      [](auto& r) { r.mutable_sampling()->set_min_p(1.5f); });
  add("repetition_penalty 0", kInvalid, "sampling.repetition_penalty",
      [](auto& r) { r.mutable_sampling()->set_repetition_penalty(0.0f); });
  add("infinite presence_penalty", kInvalid, "sampling.presence_penalty",
      [](auto& r) { r.mutable_sampling()->set_presence_penalty(INFINITY); });
  add("frequency_penalty below -2", kInvalid, "sampling.frequency_penalty",
      [](auto& r) { r.mutable_sampling()->set_frequency_penalty(-3.0f); });
  add("too many logprobs", kInvalid, "top_logprobs", [](auto& r) { r.set_top_logprobs(21); });
  // Stopping.
  add("max_new_tokens 0", kInvalid, "stopping.max_new_tokens",
      [](auto& r) { r.mutable_stopping()->set_max_new_tokens(0); });
  add("max_new_tokens beyond the limit", kInvalid, "stopping.max_new_tokens",
      [](auto& r) { r.mutable_stopping()->set_max_new_tokens(4097); });
  add("max_new_tokens beyond the context", kOutOfRange, "stopping.max_new_tokens",
      [](auto& r) { r.mutable_stopping()->set_max_new_tokens(4095); });
  add("max_new_tokens beyond the KV pool", kExhausted, "KV blocks",
      [](auto& r) { r.mutable_stopping()->set_max_new_tokens(2000); });
  add("min_new_tokens above max_new_tokens", kInvalid, "stopping.min_new_tokens",
      [](auto& r) { r.mutable_stopping()->set_min_new_tokens(13); });
  add("too many stop strings", kInvalid, "stopping.stop", [](auto& r) {
    for (int i = 0; i < 17; ++i) r.mutable_stopping()->add_stop("stop" + std::to_string(i));
  });
  add("stop string too long", kInvalid, "stopping.stop[0]",
      [](auto& r) { r.mutable_stopping()->add_stop(std::string(257, 'x')); });
  add("empty stop string", kInvalid, "stopping.stop[1]", [](auto& r) {
    r.mutable_stopping()->add_stop("end");
    r.mutable_stopping()->add_stop("");
  });
  add_invalid_utf8("invalid UTF-8 stop string", "stopping.stop[1]", [&](auto& r) {
    r.mutable_stopping()->add_stop("end");
    r.mutable_stopping()->add_stop(placeholder);
  });
  add("too many stop token ids", kInvalid, "stopping.stop_token_ids", [](auto& r) {
    for (int i = 0; i < 65; ++i) r.mutable_stopping()->add_stop_token_ids(i);
  });
  add("unknown stop token id", kInvalid, "stopping.stop_token_ids[0]",
      [](auto& r) { r.mutable_stopping()->add_stop_token_ids(999999); });
  // KV policy.
  add("unknown policy", kInvalid, "kv.policy", [](auto& r) { r.mutable_kv()->set_policy("lru"); });
  add("unknown fusion", kInvalid, "kv.fusion", [](auto& r) { r.mutable_kv()->set_fusion("avg"); });
  add("unknown aggregation", kInvalid, "kv.aggregation",
      [](auto& r) { r.mutable_kv()->set_aggregation("mean"); });
  add("C <= W", kInvalid, "kv.capacity", [](auto& r) {
    r.mutable_kv()->set_policy("morphkv");
    r.mutable_kv()->set_window(64);
    r.mutable_kv()->set_capacity(32);
  });
  add("window 0", kInvalid, "kv.window", [](auto& r) {
    r.mutable_kv()->set_policy("h2o");
    r.mutable_kv()->set_window(0);
  });
  add("capacity beyond the context", kInvalid, "kv.capacity", [](auto& r) {
    r.mutable_kv()->set_policy("morphkv");
    r.mutable_kv()->set_capacity(5000);
  });
  add("too many sinks", kInvalid, "kv.sinks", [](auto& r) {
    r.mutable_kv()->set_policy("streaming");
    r.mutable_kv()->set_window(4);
    r.mutable_kv()->set_capacity(8);
    r.mutable_kv()->set_sinks(5);
  });
  // Request id and server state.
  add("request_id too long", kInvalid, "request_id",
      [](auto& r) { r.set_request_id(std::string(257, 'x')); });
  add("request_id with a newline", kInvalid, "request_id",
      [](auto& r) { r.set_request_id("abc\nINFO forged log line"); });
  add("request_id in use", grpc::StatusCode::ALREADY_EXISTS, "request_id",
      [](auto& r) { r.set_request_id("long-one"); });
  add("queue full", kExhausted, "full", [](auto&) {});

  // A long request in flight for the duplicate id and the full queue; a
  // bounded KV policy keeps it to one block.
  v1::GenerateRequest long_one;
  long_one.set_request_id("long-one");
  long_one.mutable_tokens()->add_ids(1);
  long_one.mutable_stopping()->set_max_new_tokens(4000);
  long_one.mutable_stopping()->set_ignore_eos(true);
  long_one.mutable_kv()->set_policy("streaming");
  long_one.mutable_kv()->set_window(4);
  long_one.mutable_kv()->set_capacity(8);
  WaitUntilIdle(*stub);
  grpc::ClientContext long_context;
  auto long_reader = stub->Generate(&long_context, long_one);
  v1::GenerateResponse response;
  ASSERT_TRUE(long_reader->Read(&response));

  for (const Bad& b : bad) {
    const grpc::Status s =
        GenericUnary(server.port(), "/morphserve.v1.Generation/Generate", b.bytes, nullptr);
    EXPECT_EQ(s.error_code(), b.code) << b.what << ": " << s.error_message();
    EXPECT_NE(s.error_message().find(b.field), std::string::npos)
        << b.what << ": " << s.error_message();
  }
  EXPECT_GE(bad.size(), 25u);

  // The long request ran through all of it.
  long_context.TryCancel();
  while (long_reader->Read(&response)) {
  }
  EXPECT_EQ(long_reader->Finish().error_code(), grpc::StatusCode::CANCELLED)
      << "the long request ended before the bad ones were all sent";
  WaitUntilIdle(*stub);

  // Still serving, with the same answer.
  EXPECT_EQ(Generate(*stub, request).tokens, got.tokens);

  grpc::ClientContext info_context;
  v1::ModelInfo info;
  ASSERT_TRUE(stub->GetModelInfo(&info_context, {}, &info).ok());
  EXPECT_EQ(info.architecture(), "llama");
  EXPECT_EQ(info.context_length(), 4096u);
  EXPECT_EQ(info.default_kv_policy(), "full");
  const v1::Load load = WaitUntilIdle(*stub);
  EXPECT_EQ(load.kv_blocks_total(), 64u);
  EXPECT_EQ(load.kv_blocks_free(), 64u);
  grpc::ClientContext tokenize_context;
  v1::TokenizeRequest tokenize;
  tokenize.set_text("Once upon a time");
  tokenize.set_add_special_tokens(true);
  v1::TokenizeResponse ids;
  ASSERT_TRUE(stub->Tokenize(&tokenize_context, tokenize, &ids).ok());
  EXPECT_EQ(ids.ids_size(), static_cast<int>(got.last.usage().prompt_tokens()));

  EXPECT_EQ(server.Terminate(), 0);
}

// SIGTERM: health turns NOT_SERVING, new calls get UNAVAILABLE, the stream
// in flight still finishes, then the process exits 0.
TEST(ServeTest, SigtermDrainsInFlightStreams) {
  ServerProcess server = TinyServer(256);
  ASSERT_GT(server.port(), 0);
  EXPECT_EQ(HealthStatus(server.port()), 1);
  auto stub = Connect(server.port());
  v1::GenerateRequest request;
  request.mutable_tokens()->add_ids(1);
  request.mutable_stopping()->set_max_new_tokens(3000);
  request.mutable_stopping()->set_ignore_eos(true);
  grpc::ClientContext context;
  auto reader = stub->Generate(&context, request);
  v1::GenerateResponse response;
  ASSERT_TRUE(reader->Read(&response));
  int exit_code = -1;
  std::thread terminate([&] { exit_code = server.Terminate(); });
  int health = 1;
  for (int i = 0; i < 250 && health == 1; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    health = HealthStatus(server.port());
  }
  EXPECT_EQ(health, 2);
  v1::GenerateRequest another = request;
  another.mutable_stopping()->set_max_new_tokens(4);
  EXPECT_EQ(Generate(*stub, another).status.error_code(), grpc::StatusCode::UNAVAILABLE);
  size_t tokens = static_cast<size_t>(response.token_ids_size());
  while (reader->Read(&response)) tokens += static_cast<size_t>(response.token_ids_size());
  EXPECT_TRUE(reader->Finish().ok());
  EXPECT_EQ(tokens, 3000u);
  EXPECT_EQ(response.finish_reason(), v1::FINISH_REASON_LENGTH);
  terminate.join();
  EXPECT_EQ(exit_code, 0);
}

TEST(ServeTest, ApiKeysGuardEveryCallButHealth) {
  const std::string keys = ::testing::TempDir() + "/api_keys.txt";
  FILE* f = fopen(keys.c_str(), "w");
  fputs("# keys\nsecret-one\nsecret-two\n", f);
  fclose(f);
  ServerProcess server = TinyServer(64, {"--api-keys-file", keys});
  ASSERT_GT(server.port(), 0);
  auto stub = Connect(server.port());
  v1::GenerateRequest request;
  request.mutable_tokens()->add_ids(1);
  request.mutable_stopping()->set_max_new_tokens(2);
  EXPECT_EQ(Generate(*stub, request).status.error_code(), grpc::StatusCode::UNAUTHENTICATED);
  for (const char* header : {"Bearer wrong", "secret-one", "Bearer secret-two"}) {
    grpc::ClientContext context;
    context.AddMetadata("authorization", header);
    v1::Load load;
    const grpc::Status s = stub->GetLoad(&context, {}, &load);
    EXPECT_EQ(s.ok(), std::string(header) == "Bearer secret-two") << header;
    if (!s.ok()) {
      EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAUTHENTICATED) << header;
    }
  }
  EXPECT_EQ(HealthStatus(server.port()), 1);  // health needs no key
  EXPECT_EQ(server.Terminate(), 0);
}

TEST(ServeTest, PrometheusMetricsCountTokensAndRequests) {
  ServerProcess server = TinyServer(64);  // with a free metrics port
  ASSERT_GT(server.port(), 0);
  ASSERT_GT(server.metrics_port(), 0);
  auto stub = Connect(server.port());
  v1::GenerateRequest request;
  request.mutable_tokens()->add_ids(1);
  request.mutable_stopping()->set_max_new_tokens(7);
  request.mutable_stopping()->set_ignore_eos(true);
  request.mutable_kv()->set_policy("morphkv");
  request.mutable_kv()->set_window(2);
  request.mutable_kv()->set_capacity(4);
  ASSERT_TRUE(Generate(*stub, request).status.ok());
  std::string page;
  for (int i = 0; i < 250; ++i) {  // figures are published once per step
    page = HttpGet(server.metrics_port(), "/metrics");
    if (page.find("morphserve_requests_finished_total{reason=\"length\"} 2") != std::string::npos &&
        page.find("morphserve_generation_tokens_total 9") != std::string::npos) {
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_NE(page.find("HTTP/1.1 200 OK"), std::string::npos) << page;
  EXPECT_NE(page.find("morphserve_requests_finished_total{reason=\"length\"} 2"), std::string::npos)
      << page;
  // The warm-up request made 2 tokens, ours 7.
  EXPECT_NE(page.find("morphserve_generation_tokens_total 9"), std::string::npos) << page;
  EXPECT_NE(page.find("morphserve_kv_blocks_total 64"), std::string::npos) << page;
  EXPECT_NE(page.find("morphserve_time_to_first_token_seconds_count 2"), std::string::npos) << page;
  EXPECT_NE(page.find("# TYPE morphserve_kv_bytes_saved gauge"), std::string::npos) << page;
  EXPECT_NE(HttpGet(server.metrics_port(), "/nope").find("404"), std::string::npos);
  EXPECT_EQ(server.Terminate(), 0);
}

std::string Slurp(const std::string& path) {
  std::string out;
  FILE* f = fopen(path.c_str(), "rb");
  if (f == nullptr) return out;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof(buf), f)) > 0) out.append(buf, n);
  fclose(f);
  return out;
}

grpc::StatusCode TryLoad(const std::shared_ptr<grpc::ChannelCredentials>& credentials, int port) {
  auto stub = v1::Generation::NewStub(
      grpc::CreateChannel("localhost:" + std::to_string(port), credentials));
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  v1::Load load;
  return stub->GetLoad(&context, {}, &load).error_code();
}

TEST(ServeTest, TlsAndMutualTls) {
  const std::string dir = ::testing::TempDir() + "/serve_tls";
  std::filesystem::create_directories(dir);
  if (!MakeCertificates(dir)) GTEST_SKIP() << "the openssl tool is needed to make certificates";
  grpc::SslCredentialsOptions trust;
  trust.pem_root_certs = Slurp(dir + "/ca.pem");
  grpc::SslCredentialsOptions with_cert = trust;
  with_cert.pem_private_key = Slurp(dir + "/client.key");
  with_cert.pem_cert_chain = Slurp(dir + "/client.pem");
  {
    ServerProcess server =
        TinyServer(16, {"--tls-cert", dir + "/server.pem", "--tls-key", dir + "/server.key"});
    ASSERT_GT(server.port(), 0);
    EXPECT_EQ(TryLoad(grpc::SslCredentials(trust), server.port()), grpc::StatusCode::OK);
    EXPECT_NE(TryLoad(grpc::InsecureChannelCredentials(), server.port()), grpc::StatusCode::OK);
    EXPECT_EQ(server.Terminate(), 0);
  }
  ServerProcess server = TinyServer(16, {"--tls-cert", dir + "/server.pem", "--tls-key",
                                         dir + "/server.key", "--tls-client-ca", dir + "/ca.pem"});
  ASSERT_GT(server.port(), 0);
  EXPECT_NE(TryLoad(grpc::SslCredentials(trust), server.port()), grpc::StatusCode::OK);
  EXPECT_EQ(TryLoad(grpc::SslCredentials(with_cert), server.port()), grpc::StatusCode::OK);
  EXPECT_EQ(server.Terminate(), 0);
}

// The value of the sample `name` (labels included) on a /metrics page; -1
// when the page has none.
double MetricValue(const std::string& page, const std::string& name) {
  const size_t at = page.find("\n" + name + " ");
  if (at == std::string::npos) return -1;
  return std::strtod(page.c_str() + at + name.size() + 2, nullptr);
}

constexpr char kCancelledMetric[] = "morphserve_requests_finished_total{reason=\"cancelled\"}";

// After a call was cancelled or passed its deadline: one more request
// counted as cancelled, nothing running and every KV block free, through
// GetLoad and /metrics (both published once per step, so polled briefly).
void ExpectCancelledAndFreed(const ServerProcess& server, v1::Generation::Stub& stub,
                             double cancelled_before) {
  const v1::Load load = WaitUntilIdle(stub);
  EXPECT_EQ(load.kv_blocks_free(), load.kv_blocks_total());
  EXPECT_EQ(load.running(), 0u);
  std::string page;
  for (int i = 0; i < 250; ++i) {
    page = HttpGet(server.metrics_port(), "/metrics");
    if (MetricValue(page, kCancelledMetric) == cancelled_before + 1 &&
        MetricValue(page, "morphserve_kv_blocks_used") == 0) {
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_EQ(MetricValue(page, kCancelledMetric), cancelled_before + 1) << page;
  EXPECT_EQ(MetricValue(page, "morphserve_kv_blocks_used"), 0) << page;
}

// A request as long as the context allows, so that it is still decoding when
// the test stops it.
v1::GenerateRequest LongRequest() {
  v1::GenerateRequest request;
  request.mutable_tokens()->add_ids(1);
  request.mutable_stopping()->set_max_new_tokens(4000);
  request.mutable_stopping()->set_ignore_eos(true);
  return request;
}

TEST(ServeTest, CancellingTheCallStopsTheRequest) {
  ServerProcess server = TinyServer(256);
  ASSERT_GT(server.port(), 0);
  ASSERT_GT(server.metrics_port(), 0);
  auto stub = Connect(server.port());
  const double cancelled =
      MetricValue(HttpGet(server.metrics_port(), "/metrics"), kCancelledMetric);
  ASSERT_GE(cancelled, 0);
  grpc::ClientContext context;
  auto reader = stub->Generate(&context, LongRequest());
  v1::GenerateResponse response;
  ASSERT_TRUE(reader->Read(&response));  // it is decoding
  context.TryCancel();
  while (reader->Read(&response)) {
  }
  EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
  ExpectCancelledAndFreed(server, *stub, cancelled);
  EXPECT_EQ(server.Terminate(), 0);
}

TEST(ServeTest, ADeadlinePassingStopsTheRequest) {
  ServerProcess server = TinyServer(256);
  ASSERT_GT(server.port(), 0);
  ASSERT_GT(server.metrics_port(), 0);
  auto stub = Connect(server.port());
  const double cancelled =
      MetricValue(HttpGet(server.metrics_port(), "/metrics"), kCancelledMetric);
  ASSERT_GE(cancelled, 0);
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(300));
  auto reader = stub->Generate(&context, LongRequest());
  v1::GenerateResponse response;
  size_t tokens = 0;
  while (reader->Read(&response)) tokens += static_cast<size_t>(response.token_ids_size());
  EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  EXPECT_LT(tokens, 4000u);
  ExpectCancelledAndFreed(server, *stub, cancelled);
  EXPECT_EQ(server.Terminate(), 0);
}

}  // namespace
}  // namespace morphserve
