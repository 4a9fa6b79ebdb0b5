#include "tests/server/serve_util.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <mutex>

#include "grpcpp/generic/generic_stub.h"

extern char** environ;

namespace morphserve::testing {

const std::string kBinary = std::string(MORPHSERVE_BINARY_DIR) + "/bin/morphserve";
const std::string kTinyModel =
    std::string(MORPHSERVE_FIXTURES_DIR) + "/models/llama-2-tiny-random.gguf";

pid_t SpawnMorphserve(std::vector<std::string> args, const posix_spawn_file_actions_t* actions) {
  args.insert(args.begin(), kBinary);
  std::vector<char*> argv;
  for (std::string& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  pid_t pid = -1;
  if (posix_spawn(&pid, kBinary.c_str(), actions, nullptr, argv.data(), environ) != 0) return -1;
  return pid;
}

ServerProcess::ServerProcess(std::vector<std::string> args) {
  int out[2];
  if (pipe(out) != 0) return;
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, out[1], STDOUT_FILENO);
  posix_spawn_file_actions_addclose(&actions, out[0]);
  // A free metrics port unless the test names one, so that servers
  // started side by side (ctest -j) never collide on the default.
  if (std::find(args.begin(), args.end(), "--metrics-port") == args.end()) {
    args.insert(args.end(), {"--metrics-port", "0"});
  }
  args.insert(args.begin(), "serve");
  pid_ = SpawnMorphserve(std::move(args), &actions);
  posix_spawn_file_actions_destroy(&actions);
  close(out[1]);
  out_ = fdopen(out[0], "r");
  char line[1024];
  while (out_ != nullptr && fgets(line, sizeof(line), out_) != nullptr) {
    const std::string s(line);
    const size_t at = s.rfind(':', s.find(" (") == std::string::npos ? s.size() : s.find(" ("));
    if (s.rfind("morphserve: serving", 0) == 0 && at != std::string::npos) {
      port_ = std::stoi(s.substr(at + 1));
      const size_t metrics = s.rfind("metrics on ");
      if (metrics != std::string::npos) metrics_port_ = std::stoi(s.substr(metrics + 11));
      break;
    }
  }
}

ServerProcess::~ServerProcess() {
  if (pid_ > 0 && !waited_) {
    kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
  }
  if (out_ != nullptr) fclose(out_);
}

int ServerProcess::Terminate() {
  kill(pid_, SIGTERM);
  int status = 0;
  waitpid(pid_, &status, 0);
  waited_ = true;
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

ServerProcess TinyServer(int64_t kv_cache_blocks, std::vector<std::string> extra) {
  // clang-format off
  std::vector<std::string> args = {"--model", kTinyModel, "--port", "0", "--host", "127.0.0.1",
                                   "--threads", "1",
                                   "--kv-cache-blocks", std::to_string(kv_cache_blocks),
                                   "--log-level", "warn"};
  // clang-format on
  args.insert(args.end(), extra.begin(), extra.end());
  return ServerProcess(std::move(args));
}

std::unique_ptr<v1::Generation::Stub> Connect(int port) {
  return v1::Generation::NewStub(
      grpc::CreateChannel("127.0.0.1:" + std::to_string(port), grpc::InsecureChannelCredentials()));
}

Streamed Generate(v1::Generation::Stub& stub, const v1::GenerateRequest& request) {
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
  Streamed out;
  auto reader = stub.Generate(&context, request);
  v1::GenerateResponse response;
  while (reader->Read(&response)) {
    out.tokens.insert(out.tokens.end(), response.token_ids().begin(), response.token_ids().end());
    out.text += response.text();
    out.last = response;
  }
  out.status = reader->Finish();
  return out;
}

std::string RunCli(const std::string& args) {
  FILE* pipe = popen((kBinary + " " + args + " 2>/dev/null").c_str(), "r");
  std::string out;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof(buf), pipe)) > 0) out.append(buf, n);
  pclose(pipe);
  return out;
}

// GET `path` from 127.0.0.1:`port`; the whole response, headers included.
std::string HttpGet(int port, const std::string& path) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  inet_pton(AF_INET, "127.0.0.1", &addr.sin_addr);
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    close(fd);
    return "";
  }
  const std::string request = "GET " + path + " HTTP/1.1\r\nHost: localhost\r\n\r\n";
  if (write(fd, request.data(), request.size()) < 0) return "";
  std::string out;
  char buf[4096];
  ssize_t n;
  while ((n = read(fd, buf, sizeof(buf))) > 0) out.append(buf, static_cast<size_t>(n));
  close(fd);
  return out;
}

grpc::Status GenericUnary(int port, const std::string& method, const std::string& request_bytes,
                          std::string* response_bytes) {
  grpc::GenericStub stub(
      grpc::CreateChannel("127.0.0.1:" + std::to_string(port), grpc::InsecureChannelCredentials()));
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
  grpc::Slice slice(request_bytes);
  const grpc::ByteBuffer request(&slice, 1);
  grpc::ByteBuffer response;
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  grpc::Status status;
  stub.UnaryCall(&context, method, grpc::StubOptions(), &request, &response, [&](grpc::Status s) {
    std::lock_guard<std::mutex> lock(mu);
    status = std::move(s);
    done = true;
    cv.notify_all();
  });
  std::unique_lock<std::mutex> lock(mu);
  cv.wait(lock, [&] { return done; });
  if (status.ok() && response_bytes != nullptr) {
    std::vector<grpc::Slice> slices;
    response_bytes->clear();
    if (response.Dump(&slices).ok()) {
      for (const grpc::Slice& s : slices) {
        response_bytes->append(reinterpret_cast<const char*>(s.begin()), s.size());
      }
    }
  }
  return status;
}

// HealthCheckResponse is `status = 1`: SERVING = 1, NOT_SERVING = 2.
int HealthStatus(int port) {
  std::string bytes;
  const grpc::Status status = GenericUnary(port, "/grpc.health.v1.Health/Check", "", &bytes);
  if (!status.ok()) return -static_cast<int>(status.error_code());
  return bytes.size() == 2 && bytes[0] == 0x08 ? bytes[1] : 0;
}

bool MakeCertificates(const std::string& dir) {
  const std::string cmd =
      "cd " + dir +
      " && "
      "openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 "
      "-subj /CN=test-ca && "
      "openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj /CN=localhost"
      " && printf 'subjectAltName=DNS:localhost,IP:127.0.0.1' > san.ext && "
      "openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem "
      "-days 2 -extfile san.ext && "
      "openssl req -newkey rsa:2048 -nodes -keyout client.key -out client.csr -subj /CN=client && "
      "openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out client.pem "
      "-days 2";
  return std::system(("(" + cmd + ") >/dev/null 2>&1").c_str()) == 0;
}

}  // namespace morphserve::testing
