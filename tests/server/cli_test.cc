// Runs the real `morphserve` binary as a user would.
#include <sys/wait.h>

#include <array>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace morphserve {
namespace {

using ::testing::HasSubstr;

const std::string kBinary = std::string(MORPHSERVE_BINARY_DIR) + "/bin/morphserve";
const std::string kFixtures = MORPHSERVE_FIXTURES_DIR;
const std::string kTinyModel = kFixtures + "/models/llama-2-tiny-random.gguf";

struct Result {
  int exit_code;
  std::string out;
};

// Runs the binary with `args` (already shell-quoted), capturing stdout; stderr
// goes to stdout too when `merge_stderr`.
Result RunCli(const std::string& args, bool merge_stderr = false) {
  const std::string cmd = kBinary + " " + args + (merge_stderr ? " 2>&1" : " 2>/dev/null");
  FILE* pipe = popen(cmd.c_str(), "r");
  Result r{-1, ""};
  if (pipe == nullptr) return r;
  std::array<char, 4096> buf;
  size_t n;
  while ((n = fread(buf.data(), 1, buf.size(), pipe)) > 0) r.out.append(buf.data(), n);
  const int status = pclose(pipe);
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

std::string ReadFile(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

TEST(CliTest, VersionNamesCommitAndBackends) {
  const Result r = RunCli("--version");
  EXPECT_EQ(r.exit_code, 0);
  EXPECT_THAT(r.out, HasSubstr("morphserve "));
  EXPECT_THAT(r.out, HasSubstr("commit "));
  EXPECT_THAT(r.out, HasSubstr("backends: cpu"));
}

TEST(CliTest, EverySubcommandHasHelp) {
  for (const char* cmd : {"generate", "tokenize", "info"}) {
    const Result r = RunCli(std::string(cmd) + " --help");
    EXPECT_EQ(r.exit_code, 0) << cmd;
    EXPECT_THAT(r.out, HasSubstr("usage: morphserve " + std::string(cmd))) << cmd;
  }
  EXPECT_EQ(RunCli("--help").exit_code, 0);
}

TEST(CliTest, BadArgumentsGetAClearErrorAndExitCode) {
  Result r = RunCli("frobnicate", true);
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_THAT(r.out, HasSubstr("unknown command 'frobnicate'"));
  r = RunCli("generate --model " + kTinyModel + " --prompt hi --max-tokens", true);
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_THAT(r.out, HasSubstr("--max-tokens needs a value"));
  r = RunCli("generate --model " + kTinyModel + " --prompt hi --top-p 1.5", true);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.out, HasSubstr("top_p"));
  r = RunCli("generate --model /nonexistent.gguf --prompt hi", true);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.out, HasSubstr("/nonexistent.gguf"));
  r = RunCli("generate --model " + kTinyModel + " --prompt hi --max-tokens 5000", true);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.out, HasSubstr("context length"));
}

TEST(CliTest, VocabTestOutputMatchesTheFixturesByteForByte) {
  for (const char* vocab : {"llama-spm", "llama-bpe", "gpt-2"}) {
    const std::string base = kFixtures + "/tokenizer/ggml-vocab-" + std::string(vocab) + ".gguf";
    const Result r = RunCli("tokenize --model " + base + " --vocab-test " + base + ".inp");
    EXPECT_EQ(r.exit_code, 0) << vocab;
    EXPECT_EQ(r.out, ReadFile(base + ".out")) << vocab;
  }
}

TEST(CliTest, GenerateJsonReproducesTheGoldenGreedyTokens) {
  // Case 0 of the golden data: greedy continuation of a plain prompt. The
  // first steps have comfortable top-2 margins.
  std::ifstream f(kFixtures + "/golden/llama-2-tiny-random.golden.json");
  const nlohmann::json golden = nlohmann::json::parse(f);
  const auto& c = golden["cases"][0];
  const std::string prompt = c["prompt"];
  const Result r = RunCli("generate --json --ignore-eos --max-tokens 8 --temperature 0 --model " +
                       kTinyModel + " --prompt '" + prompt + "'");
  ASSERT_EQ(r.exit_code, 0) << r.out;
  const nlohmann::json out = nlohmann::json::parse(r.out);
  EXPECT_EQ(out["finish_reason"], "length");
  EXPECT_EQ(out["usage"]["prompt_tokens"], c["n_prompt_tokens"]);
  EXPECT_EQ(out["usage"]["completion_tokens"], 8);
  ASSERT_EQ(out["tokens"].size(), 8u);
  for (int k = 0; k < 4; ++k) EXPECT_EQ(out["tokens"][k], c["greedy_tokens"][k]) << "step " << k;
}

TEST(CliTest, SeededSamplingIsReproducibleAndLogprobsAreReported) {
  const std::string args = "generate --json --ignore-eos --max-tokens 12 --temperature 1.0 "
                           "--top-k 50 --seed 5 --logprobs 3 --model " + kTinyModel +
                           " --prompt 'Hello there'";
  const Result a = RunCli(args);
  const Result b = RunCli(args);
  ASSERT_EQ(a.exit_code, 0);
  EXPECT_EQ(nlohmann::json::parse(a.out)["tokens"], nlohmann::json::parse(b.out)["tokens"]);
  const nlohmann::json out = nlohmann::json::parse(a.out);
  ASSERT_EQ(out["logprobs"].size(), 12u);
  ASSERT_EQ(out["token_logprobs"].size(), 12u);
  const auto& first = out["logprobs"][0];
  ASSERT_EQ(first.size(), 3u);
  EXPECT_GE(first[0]["logprob"].get<double>(), first[1]["logprob"].get<double>());
  EXPECT_GE(first[1]["logprob"].get<double>(), first[2]["logprob"].get<double>());
  EXPECT_LE(first[0]["logprob"].get<double>(), 0.0);
  EXPECT_LE(out["token_logprobs"][0].get<double>(), first[0]["logprob"].get<double>());
}

TEST(CliTest, StopStringEndsGenerationWithoutItsText) {
  const Result full = RunCli("generate --json --ignore-eos --max-tokens 24 --temperature 0 --model " +
                          kTinyModel + " --prompt 'The quick brown fox'");
  ASSERT_EQ(full.exit_code, 0);
  const std::string text = nlohmann::json::parse(full.out)["text"];
  ASSERT_GE(text.size(), 8u);
  // Stop on a piece of the greedy text: the output must end right before it.
  const std::string stop = text.substr(text.size() / 2, 3);
  const Result r = RunCli("generate --json --ignore-eos --max-tokens 24 --temperature 0 --model " +
                       kTinyModel + " --prompt 'The quick brown fox' --stop '" + stop + "'");
  ASSERT_EQ(r.exit_code, 0);
  const nlohmann::json out = nlohmann::json::parse(r.out);
  EXPECT_EQ(out["finish_reason"], "stop");
  EXPECT_EQ(out["text"], text.substr(0, text.find(stop)));
}

std::string DefaultModelPath() {
  const char* dir = std::getenv("MORPHSERVE_MODELS_DIR");
  return std::string(dir != nullptr ? dir : MORPHSERVE_SOURCE_DIR "/models") +
         "/SmolLM2-135M-Instruct.Q4_1.gguf";
}

TEST(CliTest, DefaultModelAnswersTheCapitalOfFrance) {
  const std::string model = DefaultModelPath();
  if (!std::filesystem::exists(model)) {
    const char* require = std::getenv("MORPHSERVE_REQUIRE_MODELS");
    if (require != nullptr && std::string(require) == "1") FAIL() << "missing " << model;
    GTEST_SKIP() << "no " << model << "; run scripts/fetch_model.sh";
  }
  const Result r = RunCli("generate --json --max-tokens 48 --threads 2 --model " + model +
                          " --chat 'What is the capital of France?'");
  ASSERT_EQ(r.exit_code, 0) << r.out;
  const nlohmann::json out = nlohmann::json::parse(r.out);
  EXPECT_THAT(out["text"].get<std::string>(), HasSubstr("Paris"));
  EXPECT_EQ(out["finish_reason"], "eos");
}

TEST(CliTest, DummyWeightsFollowTheConfigAndTheLayerOverride) {
  const std::string dir = ::testing::TempDir() + "/cli_dummy_model";
  std::filesystem::create_directories(dir);
  std::ofstream(dir + "/config.json") << R"({
    "architectures": ["LlamaForCausalLM"], "hidden_size": 256, "intermediate_size": 512,
    "num_hidden_layers": 6, "num_attention_heads": 8, "num_key_value_heads": 2,
    "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "vocab_size": 1000, "tie_word_embeddings": false})";
  Result r = RunCli("info --load-format dummy --num-layers 2 --model " + dir);
  ASSERT_EQ(r.exit_code, 0) << r.out;
  EXPECT_THAT(r.out, HasSubstr("layers:             2"));
  EXPECT_THAT(r.out, HasSubstr("heads / kv heads:   8 / 2 (head dim 32)"));
  EXPECT_THAT(r.out, HasSubstr("BF16"));
  // Without a tokenizer.json, text generation is refused clearly.
  r = RunCli("generate --load-format dummy --model " + dir + " --prompt hi", true);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.out, HasSubstr("tokenizer"));
  r = RunCli("info --num-layers 2 --model " + kTinyModel, true);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.out, HasSubstr("dummy weights only"));
}

TEST(CliTest, InfoDescribesTheModel) {
  const Result r = RunCli("info --model " + kTinyModel);
  ASSERT_EQ(r.exit_code, 0);
  EXPECT_THAT(r.out, HasSubstr("architecture:       llama"));
  EXPECT_THAT(r.out, HasSubstr("heads / kv heads:   2 / 2 (head dim 4)"));
  EXPECT_THAT(r.out, HasSubstr("F16"));
}

}  // namespace
}  // namespace morphserve
