// Test helpers for the server's integration tests: the real `morphserve
// serve` started on loopback, a gRPC client for it, and plain HTTP for its
// metrics port.
#ifndef MORPHSERVE_TESTS_SERVER_SERVE_UTIL_H_
#define MORPHSERVE_TESTS_SERVER_SERVE_UTIL_H_

#include <spawn.h>
#include <sys/types.h>

#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "grpcpp/grpcpp.h"
#include "morphserve/v1/generation.grpc.pb.h"

namespace morphserve::testing {

extern const std::string kBinary;     // build/bin/morphserve
extern const std::string kTinyModel;  // the fixtures' tiny random Llama

// Starts `morphserve ARGS...` with `actions` (may be null); its pid, or -1.
pid_t SpawnMorphserve(std::vector<std::string> args, const posix_spawn_file_actions_t* actions);

// The server process; its stdout is read until it says where it listens.
// A free metrics port is used unless the arguments name one.
class ServerProcess {
 public:
  explicit ServerProcess(std::vector<std::string> args);
  ~ServerProcess();
  ServerProcess(const ServerProcess&) = delete;
  ServerProcess& operator=(const ServerProcess&) = delete;

  int port() const { return port_; }
  int metrics_port() const { return metrics_port_; }
  pid_t pid() const { return pid_; }
  // Sends SIGTERM and returns the exit code.
  int Terminate();

 private:
  pid_t pid_ = -1;
  FILE* out_ = nullptr;
  int port_ = 0;
  int metrics_port_ = -1;
  bool waited_ = false;
};

// `morphserve serve` on the tiny model on loopback: one thread, a pool of
// `kv_cache_blocks`, warnings only, plus `extra` flags.
ServerProcess TinyServer(int64_t kv_cache_blocks, std::vector<std::string> extra = {});

std::unique_ptr<v1::Generation::Stub> Connect(int port);

struct Streamed {
  grpc::Status status;
  std::vector<int32_t> tokens;
  std::string text;
  v1::GenerateResponse last;
};

// One whole Generate stream (60 s deadline).
Streamed Generate(v1::Generation::Stub& stub, const v1::GenerateRequest& request);

// Runs `morphserve ARGS` and returns its stdout.
std::string RunCli(const std::string& args);

// GET `path` from 127.0.0.1:`port`; the whole response, headers included.
std::string HttpGet(int port, const std::string& path);

// One unary call of `method` (e.g. "/grpc.health.v1.Health/Check") with a
// serialized request, through the generic stub; the response's bytes go to
// `response_bytes` when not null.
grpc::Status GenericUnary(int port, const std::string& method, const std::string& request_bytes,
                          std::string* response_bytes);

// A CA (ca.pem), a server certificate for localhost / 127.0.0.1
// (server.pem, server.key) and a client certificate (client.pem,
// client.key) in `dir`, made with the openssl tool; false without it.
bool MakeCertificates(const std::string& dir);

// grpc.health.v1.Health/Check for the whole server: 1 SERVING, 2 NOT_SERVING,
// minus the status code when the call fails.
int HealthStatus(int port);

}  // namespace morphserve::testing

#endif  // MORPHSERVE_TESTS_SERVER_SERVE_UTIL_H_
