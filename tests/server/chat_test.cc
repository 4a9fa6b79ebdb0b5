// Runs `morphserve chat` against the real server: replies equal to the
// generate CLI's, the conversation kept between turns, errors that leave the
// session going, connection and key failures that end it, and Ctrl-C.
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/server/serve_util.h"

namespace morphserve {
namespace {

using ::testing::HasSubstr;
using testing::kBinary;
using testing::kTinyModel;
using testing::RunCli;
using testing::ServerProcess;
using testing::TinyServer;

std::string ReadFile(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

// A directory of the running test's own, so that tests run side by side
// (ctest -j) never share files.
std::string TestDir() {
  const std::string dir = ::testing::TempDir() + "/chat_test_" +
                          ::testing::UnitTest::GetInstance()->current_test_info()->name() + "_" +
                          std::to_string(getpid());
  std::filesystem::create_directories(dir);
  return dir;
}

struct Result {
  int exit_code;
  std::string out;
  std::string err;
};

// Runs `morphserve chat ARGS` with `input` on stdin. MORPHSERVE_API_KEY is
// unset unless `env` sets it ("NAME=VALUE ...").
Result Chat(const std::string& args, const std::string& input, const std::string& env = "") {
  const std::string dir = TestDir();
  std::ofstream(dir + "/chat_in") << input;
  const std::string cmd = "env -u MORPHSERVE_API_KEY " + env + " " + kBinary + " chat " + args +
                          " <" + dir + "/chat_in >" + dir + "/chat_out 2>" + dir + "/chat_err";
  const int status = std::system(cmd.c_str());
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, ReadFile(dir + "/chat_out"),
          ReadFile(dir + "/chat_err")};
}

std::string Address(const ServerProcess& server) {
  return "127.0.0.1:" + std::to_string(server.port());
}

// The figure after `label` in each --show-usage line of `err`.
std::vector<int> UsageFigures(const std::string& err, const std::string& label) {
  std::vector<int> out;
  std::istringstream in(err);
  for (std::string line; std::getline(in, line);) {
    const size_t at = line.find(label + " ");
    if (line.rfind("[prompt ", 0) == 0 && at != std::string::npos) {
      out.push_back(std::stoi(line.substr(at + label.size() + 1)));
    }
  }
  return out;
}

int Count(const std::string& text, const std::string& part) {
  int n = 0;
  for (size_t at = text.find(part); at != std::string::npos; at = text.find(part, at + 1)) ++n;
  return n;
}

// Polls `done` for up to 60 s.
bool WaitUntil(const std::function<bool()>& done) {
  for (int i = 0; i < 6000; ++i) {
    if (done()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return false;
}

TEST(ChatTest, RawRepliesEqualTheGenerateCli) {
  ServerProcess server = TinyServer(256);
  ASSERT_GT(server.port(), 0) << "the server did not start";
  const std::vector<std::string> prompts = {"Once upon a time", "The quick brown fox"};
  std::string expected;
  std::vector<int> completion;
  for (const std::string& prompt : prompts) {
    const nlohmann::json cli = nlohmann::json::parse(
        RunCli("generate --json --threads 1 --temperature 0 --max-tokens 8 --model " + kTinyModel +
               " --prompt '" + prompt + "'"));
    expected += cli["text"].get<std::string>() + "\n";
    completion.push_back(cli["usage"]["completion_tokens"].get<int>());
  }
  const Result r =
      Chat("--server " + Address(server) + " --raw --temperature 0 --max-tokens 8 --show-usage",
           prompts[0] + "\n" + prompts[1] + "\n");
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, expected);
  EXPECT_THAT(r.err, HasSubstr("connected to " + Address(server)));
  EXPECT_THAT(r.err, HasSubstr("llama"));
  EXPECT_EQ(UsageFigures(r.err, "completion"), completion) << r.err;
  EXPECT_EQ(server.Terminate(), 0);
}

TEST(ChatTest, ChatInputOnAModelWithoutTemplateSuggestsRawAndGoesOn) {
  ServerProcess server = TinyServer(256);
  ASSERT_GT(server.port(), 0);
  const Result r = Chat("--server " + Address(server), "hello\n/help\nagain\n");
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, "");
  EXPECT_EQ(Count(r.err, "error: INVALID_ARGUMENT: "), 2) << r.err;
  EXPECT_EQ(Count(r.err, "--raw"), 2) << r.err;
  EXPECT_THAT(r.err, HasSubstr("/reset"));  // /help was answered
  EXPECT_EQ(server.Terminate(), 0);
}

TEST(ChatTest, RequestErrorsArePrintedAndTheSessionGoesOn) {
  ServerProcess server = TinyServer(256);
  ASSERT_GT(server.port(), 0);
  const Result r =
      Chat("--server " + Address(server) + " --raw --kv-policy lru", "hi\n/quit\nhi\n");
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, "");
  EXPECT_THAT(r.err, HasSubstr("error: INVALID_ARGUMENT: "));
  EXPECT_THAT(r.err, HasSubstr("kv_policy"));
  EXPECT_EQ(Count(r.err, "error: "), 1) << r.err;  // /quit ended it
  EXPECT_EQ(server.Terminate(), 0);
}

TEST(ChatTest, AnUnreachableServerIsAClearErrorAndExitCodeOne) {
  Result r = Chat("--server 127.0.0.1:1", "hello\n");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.err, HasSubstr("morphserve chat: cannot reach 127.0.0.1:1"));

  // A socket that accepts connections but never speaks gRPC: the connect
  // deadline ends the wait.
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(addr);
  ASSERT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&addr), len), 0);
  ASSERT_EQ(listen(fd, 4), 0);
  ASSERT_EQ(getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len), 0);
  const std::string silent = "127.0.0.1:" + std::to_string(ntohs(addr.sin_port));
  const auto t0 = std::chrono::steady_clock::now();
  r = Chat("--server " + silent + " --connect-timeout 1", "hello\n");
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  close(fd);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.err, HasSubstr("no answer from " + silent + " within 1 s"));
  EXPECT_LT(seconds, 10.0);
}

TEST(ChatTest, ApiKeysFromTheFlagOrTheEnvironment) {
  const std::string keys = TestDir() + "/api_keys.txt";
  std::ofstream(keys) << "secret-one\n";
  ServerProcess server = TinyServer(256, {"--api-keys-file", keys});
  ASSERT_GT(server.port(), 0);
  const std::string args = "--server " + Address(server) + " --raw --max-tokens 4 ";
  Result r = Chat(args, "hello\n");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.err, HasSubstr("needs an API key"));
  r = Chat(args + "--api-key wrong", "hello\n");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.err, HasSubstr("refused the API key"));
  r = Chat(args + "--api-key secret-one", "hello\n");
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out, "");
  r = Chat(args, "hello\n", "MORPHSERVE_API_KEY=secret-one");
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out, "");
  EXPECT_EQ(server.Terminate(), 0);
}

TEST(ChatTest, MutualTls) {
  const std::string dir = TestDir();
  if (!testing::MakeCertificates(dir)) {
    GTEST_SKIP() << "the openssl tool is needed to make certificates";
  }
  ServerProcess server = TinyServer(256, {"--tls-cert", dir + "/server.pem", "--tls-key",
                                          dir + "/server.key", "--tls-client-ca", dir + "/ca.pem"});
  ASSERT_GT(server.port(), 0);
  const std::string args = "--server " + Address(server) + " --raw --max-tokens 4 ";
  Result r = Chat(args, "hello\n");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.err, HasSubstr("cannot reach"));
  r = Chat(args + "--tls-ca " + dir + "/ca.pem", "hello\n");
  EXPECT_EQ(r.exit_code, 1);  // no client certificate
  r = Chat(args + "--tls-ca " + dir + "/ca.pem --tls-cert " + dir + "/client.pem --tls-key " + dir +
               "/client.key",
           "hello\n");
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out, "");
  EXPECT_EQ(server.Terminate(), 0);
}

// `morphserve chat` as a child process with a pipe on stdin and its stdout
// and stderr in files, for the Ctrl-C tests.
class ChatChild {
 public:
  explicit ChatChild(std::vector<std::string> args)
      : out_(TestDir() + "/chat_out"), err_(TestDir() + "/chat_err") {
    int in[2];
    if (pipe(in) != 0) return;
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_adddup2(&actions, in[0], STDIN_FILENO);
    posix_spawn_file_actions_addclose(&actions, in[1]);
    posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, out_.c_str(),
                                     O_WRONLY | O_CREAT | O_TRUNC, 0644);
    posix_spawn_file_actions_addopen(&actions, STDERR_FILENO, err_.c_str(),
                                     O_WRONLY | O_CREAT | O_TRUNC, 0644);
    args.insert(args.begin(), "chat");
    pid_ = testing::SpawnMorphserve(std::move(args), &actions);
    posix_spawn_file_actions_destroy(&actions);
    close(in[0]);
    input_ = in[1];
  }
  ~ChatChild() {
    if (input_ >= 0) close(input_);
    if (pid_ > 0) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
  }

  void Send(const std::string& text) {
    ASSERT_EQ(write(input_, text.data(), text.size()), static_cast<ssize_t>(text.size()));
  }
  void Interrupt() { kill(pid_, SIGINT); }
  std::string out() const { return ReadFile(out_); }
  std::string err() const { return ReadFile(err_); }
  // Closes stdin and returns the exit code.
  int Wait() {
    close(input_);
    input_ = -1;
    int status = 0;
    waitpid(pid_, &status, 0);
    pid_ = -1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  }

 private:
  std::string out_;
  std::string err_;
  pid_t pid_ = -1;
  int input_ = -1;
};

TEST(ChatTest, CtrlCStopsTheReplyAndTheSessionGoesOn) {
  ServerProcess server = TinyServer(256);
  ASSERT_GT(server.port(), 0);
  ChatChild chat({"--server", Address(server), "--raw", "--temperature", "0", "--max-tokens",
                  "4000", "--show-usage"});
  chat.Send("1\n");
  // Part of the reply has arrived: it is streaming.
  ASSERT_TRUE(WaitUntil([&] { return !chat.out().empty(); })) << chat.err();
  chat.Interrupt();
  ASSERT_TRUE(WaitUntil([&] { return Count(chat.err(), "(stopped") == 1; })) << chat.err();
  const std::string first = chat.out();
  EXPECT_EQ(first.back(), '\n');  // the stopped reply's line is ended
  // The next request streams too, and can be stopped in turn.
  chat.Send("2\n");
  ASSERT_TRUE(WaitUntil([&] { return chat.out().size() > first.size(); })) << chat.err();
  chat.Interrupt();
  ASSERT_TRUE(WaitUntil([&] { return Count(chat.err(), "(stopped") == 2; })) << chat.err();
  EXPECT_EQ(Count(chat.err(), "[prompt "), 0);  // no usage: neither reply finished
  EXPECT_EQ(chat.Wait(), 0);
  EXPECT_EQ(server.Terminate(), 0);
}

TEST(ChatTest, CtrlCAtThePromptEndsTheSession) {
  ServerProcess server = TinyServer(256);
  ASSERT_GT(server.port(), 0);
  ChatChild chat({"--server", Address(server), "--raw"});
  ASSERT_TRUE(WaitUntil([&] { return Count(chat.err(), "connected to") == 1; })) << chat.err();
  chat.Interrupt();
  EXPECT_EQ(chat.Wait(), 130);
  EXPECT_EQ(server.Terminate(), 0);
}

std::string DefaultModelPath() {
  const char* dir = std::getenv("MORPHSERVE_MODELS_DIR");
  return std::string(dir != nullptr ? dir : MORPHSERVE_SOURCE_DIR "/models") +
         "/SmolLM2-135M-Instruct.Q4_1.gguf";
}

TEST(ChatTest, ChatKeepsTheConversationUntilReset) {
  const std::string model = DefaultModelPath();
  if (!std::filesystem::exists(model)) {
    const char* require = std::getenv("MORPHSERVE_REQUIRE_MODELS");
    if (require != nullptr && std::string(require) == "1") FAIL() << "missing " << model;
    GTEST_SKIP() << "no " << model << "; run scripts/fetch_model.sh";
  }
  ServerProcess server({"--model", model, "--port", "0", "--host", "127.0.0.1", "--threads", "2",
                        "--kv-cache-blocks", "128", "--log-level", "warn"});
  ASSERT_GT(server.port(), 0);
  const std::string question = "What is the capital of France?";
  const Result r =
      Chat("--server " + Address(server) + " --temperature 0 --max-tokens 12 --show-usage",
           question + "\nAnd of Germany?\n/reset\n" + question + "\n");
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("Paris"));
  EXPECT_THAT(r.out, HasSubstr("Berlin"));  // "And of Germany?" was understood
  const std::vector<int> prompt = UsageFigures(r.err, "prompt");
  const std::vector<int> completion = UsageFigures(r.err, "completion");
  ASSERT_EQ(prompt.size(), 3u) << r.err;
  // The second turn carries the first question and its answer.
  EXPECT_GT(prompt[1], prompt[0] + completion[0]) << r.err;
  // After /reset the same question is asked alone again.
  EXPECT_EQ(prompt[2], prompt[0]) << r.err;
  EXPECT_EQ(server.Terminate(), 0);
}

}  // namespace
}  // namespace morphserve
