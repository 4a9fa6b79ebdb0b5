// Starts the real `morphserve serve` on loopback and talks to it with a gRPC
// client: streaming generation equal to the CLI's, errors with the right
// status that leave the server serving, model info and load, and a clean
// exit on SIGTERM.
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "morphserve/v1/generation.grpc.pb.h"
#include "nlohmann/json.hpp"
#include "tests/server/serve_util.h"

namespace morphserve {
namespace {

using testing::Connect;
using testing::Generate;
using testing::HealthStatus;
using testing::HttpGet;
using testing::kBinary;
using testing::kTinyModel;
using testing::RunCli;
using testing::ServerProcess;
using testing::Streamed;

TEST(ServeTest, StreamsTheSameTokensAsTheCliAndSurvivesBadRequests) {
  ServerProcess server({"--model", kTinyModel, "--port", "0", "--host", "127.0.0.1", "--threads",
                        "1", "--kv-cache-blocks", "64", "--log-level", "warn"});
  ASSERT_GT(server.port(), 0) << "the server did not start";
  auto stub = Connect(server.port());

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
  struct Bad {
    std::string what, field;
    grpc::StatusCode code;
    v1::GenerateRequest request;
  };
  std::vector<Bad> bad;
  bad.push_back({"no input", "input", grpc::StatusCode::INVALID_ARGUMENT, {}});
  v1::GenerateRequest r = request;
  r.mutable_sampling()->set_top_p(1.5f);
  bad.push_back({"top_p", "top_p", grpc::StatusCode::INVALID_ARGUMENT, r});
  r = request;
  r.mutable_sampling()->set_temperature(std::nanf(""));
  bad.push_back({"NaN temperature", "temperature", grpc::StatusCode::INVALID_ARGUMENT, r});
  r = request;
  r.mutable_stopping()->set_max_new_tokens(0);
  bad.push_back({"max_new_tokens 0", "max_new_tokens", grpc::StatusCode::INVALID_ARGUMENT, r});
  r = request;
  r.mutable_tokens()->add_ids(999999);
  bad.push_back({"unknown token", "tokens.ids", grpc::StatusCode::INVALID_ARGUMENT, r});
  r = request;
  r.mutable_chat()->add_messages()->set_role("user");
  bad.push_back({"chat without a template", "chat template", grpc::StatusCode::INVALID_ARGUMENT,
                 r});
  r = request;
  r.mutable_kv()->set_policy("lru");
  bad.push_back({"unknown policy", "kv_policy", grpc::StatusCode::INVALID_ARGUMENT, r});
  r = request;
  r.mutable_kv()->set_policy("morphkv");
  r.mutable_kv()->set_window(64);
  r.mutable_kv()->set_capacity(32);
  bad.push_back({"C <= W", "kv_capacity", grpc::StatusCode::INVALID_ARGUMENT, r});
  r = request;
  r.mutable_stopping()->set_max_new_tokens(4095);
  bad.push_back({"beyond the context", "context", grpc::StatusCode::OUT_OF_RANGE, r});
  r = request;
  r.mutable_stopping()->set_max_new_tokens(2000);
  bad.push_back({"never fits", "KV blocks", grpc::StatusCode::RESOURCE_EXHAUSTED, r});
  for (const Bad& b : bad) {
    const Streamed s = Generate(*stub, b.request);
    EXPECT_EQ(s.status.error_code(), b.code) << b.what << ": " << s.status.error_message();
    EXPECT_NE(s.status.error_message().find(b.field), std::string::npos)
        << b.what << ": " << s.status.error_message();
  }
  // Still serving, with the same answer.
  EXPECT_EQ(Generate(*stub, request).tokens, got.tokens);

  grpc::ClientContext info_context;
  v1::ModelInfo info;
  ASSERT_TRUE(stub->GetModelInfo(&info_context, {}, &info).ok());
  EXPECT_EQ(info.architecture(), "llama");
  EXPECT_EQ(info.context_length(), 4096u);
  EXPECT_EQ(info.default_kv_policy(), "full");
  // Load figures are published after each step, so the last request's
  // blocks may show for a moment.
  v1::Load load;
  for (int i = 0; i < 250; ++i) {
    grpc::ClientContext load_context;
    ASSERT_TRUE(stub->GetLoad(&load_context, {}, &load).ok());
    if (load.kv_blocks_free() == load.kv_blocks_total()) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
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
  ServerProcess server({"--model", kTinyModel, "--port", "0", "--host", "127.0.0.1", "--threads",
                        "1", "--kv-cache-blocks", "256", "--log-level", "warn"});
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
  ServerProcess server({"--model", kTinyModel, "--port", "0", "--host", "127.0.0.1", "--threads",
                        "1", "--kv-cache-blocks", "64", "--log-level", "warn", "--api-keys-file",
                        keys});
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
  ServerProcess server({"--model", kTinyModel, "--port", "0", "--metrics-port", "0", "--host",
                        "127.0.0.1", "--threads", "1", "--kv-cache-blocks", "64",
                        "--log-level", "warn"});
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
    if (page.find("morphserve_requests_finished_total{reason=\"length\"} 2") !=
            std::string::npos &&
        page.find("morphserve_generation_tokens_total 9") != std::string::npos) {
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_NE(page.find("HTTP/1.1 200 OK"), std::string::npos) << page;
  EXPECT_NE(page.find("morphserve_requests_finished_total{reason=\"length\"} 2"),
            std::string::npos) << page;
  // The warm-up request made 2 tokens, ours 7.
  EXPECT_NE(page.find("morphserve_generation_tokens_total 9"), std::string::npos) << page;
  EXPECT_NE(page.find("morphserve_kv_blocks_total 64"), std::string::npos) << page;
  EXPECT_NE(page.find("morphserve_time_to_first_token_seconds_count 2"), std::string::npos)
      << page;
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

// A CA, a server certificate for localhost / 127.0.0.1 and a client
// certificate, made with the openssl tool.
bool MakeCertificates(const std::string& dir) {
  const std::string cmd =
      "cd " + dir + " && "
      "openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 "
      "-subj /CN=test-ca && "
      "openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj /CN=localhost"
      " && printf 'subjectAltName=DNS:localhost,IP:127.0.0.1' > san.ext && "
      "openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem "
      "-days 2 -extfile san.ext && "
      "openssl req -newkey rsa:2048 -nodes -keyout client.key -out client.csr -subj /CN=client && "
      "openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out client.pem "
      "-days 2";
  return std::system((cmd + " >/dev/null 2>&1").c_str()) == 0;
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
    ServerProcess server({"--model", kTinyModel, "--port", "0", "--host", "127.0.0.1",
                          "--threads", "1", "--kv-cache-blocks", "16", "--log-level", "warn",
                          "--tls-cert", dir + "/server.pem", "--tls-key", dir + "/server.key"});
    ASSERT_GT(server.port(), 0);
    EXPECT_EQ(TryLoad(grpc::SslCredentials(trust), server.port()), grpc::StatusCode::OK);
    EXPECT_NE(TryLoad(grpc::InsecureChannelCredentials(), server.port()), grpc::StatusCode::OK);
    EXPECT_EQ(server.Terminate(), 0);
  }
  ServerProcess server({"--model", kTinyModel, "--port", "0", "--host", "127.0.0.1", "--threads",
                        "1", "--kv-cache-blocks", "16", "--log-level", "warn", "--tls-cert",
                        dir + "/server.pem", "--tls-key", dir + "/server.key", "--tls-client-ca",
                        dir + "/ca.pem"});
  ASSERT_GT(server.port(), 0);
  EXPECT_NE(TryLoad(grpc::SslCredentials(trust), server.port()), grpc::StatusCode::OK);
  EXPECT_EQ(TryLoad(grpc::SslCredentials(with_cert), server.port()), grpc::StatusCode::OK);
  EXPECT_EQ(server.Terminate(), 0);
}

TEST(ServeTest, CancellingTheCallStopsTheRequest) {
  ServerProcess server({"--model", kTinyModel, "--port", "0", "--host", "127.0.0.1", "--threads",
                        "1", "--kv-cache-blocks", "256", "--log-level", "warn"});
  ASSERT_GT(server.port(), 0);
  auto stub = Connect(server.port());
  v1::GenerateRequest request;
  request.mutable_tokens()->add_ids(1);
  request.mutable_stopping()->set_max_new_tokens(3000);
  request.mutable_stopping()->set_ignore_eos(true);
  grpc::ClientContext context;
  auto reader = stub->Generate(&context, request);
  v1::GenerateResponse response;
  ASSERT_TRUE(reader->Read(&response));  // it is decoding
  context.TryCancel();
  while (reader->Read(&response)) {
  }
  EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
  // The sequence's blocks come back within a step or so.
  v1::Load load;
  for (int i = 0; i < 250; ++i) {
    grpc::ClientContext c;
    ASSERT_TRUE(stub->GetLoad(&c, {}, &load).ok());
    if (load.kv_blocks_free() == load.kv_blocks_total() && load.running() == 0) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_EQ(load.kv_blocks_free(), load.kv_blocks_total());
  EXPECT_EQ(server.Terminate(), 0);
}

}  // namespace
}  // namespace morphserve
