// Runs the real `morphserve` binary as a user would.
#include <sys/wait.h>

#include <algorithm>
#include <array>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <utility>
#include <vector>

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
  for (const char* cmd : {"serve", "chat", "generate", "batch", "eval", "tokenize", "info"}) {
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
  const std::string args =
      "generate --json --ignore-eos --max-tokens 12 --temperature 1.0 "
      "--top-k 50 --seed 5 --logprobs 3 --model " +
      kTinyModel + " --prompt 'Hello there'";
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
  const Result full =
      RunCli("generate --json --ignore-eos --max-tokens 24 --temperature 0 --model " + kTinyModel +
             " --prompt 'The quick brown fox'");
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

// The default model's path, or skips (fails under MORPHSERVE_REQUIRE_MODELS=1)
// when it has not been fetched.
#define REQUIRE_DEFAULT_MODEL(model)                                                      \
  const std::string model = DefaultModelPath();                                           \
  if (!std::filesystem::exists(model)) {                                                  \
    const char* require = std::getenv("MORPHSERVE_REQUIRE_MODELS");                       \
    if (require != nullptr && std::string(require) == "1") FAIL() << "missing " << model; \
    GTEST_SKIP() << "no " << model << "; run scripts/fetch_model.sh";                     \
  }

TEST(CliTest, KvPolicyBoundsTheCacheAndReportsUsage) {
  REQUIRE_DEFAULT_MODEL(model);
  // On the CPU backend (f32 KV; every policy runs there), whatever the machine.
  const std::string common =
      "generate --device cpu --json --ignore-eos --max-tokens 150 --threads 2 --model " + model +
      " --chat 'Write a story about a robot who learns to paint.'";
  // SmolLM2-135M: 30 layers x 3 KV heads x 64 dims x (K + V) x 4 bytes per token.
  const int64_t bytes_per_token = 30 * 3 * 64 * 2 * 4;
  const Result full = RunCli(common);
  ASSERT_EQ(full.exit_code, 0) << full.out;
  const nlohmann::json fu = nlohmann::json::parse(full.out)["usage"];
  const int64_t written = fu["prompt_tokens"].get<int64_t>() + 149;
  EXPECT_EQ(fu["kv_tokens_full_equivalent"], written);
  EXPECT_EQ(fu["kv_tokens_resident"], written);
  EXPECT_EQ(fu["kv_tokens_evicted"], 0);
  EXPECT_EQ(fu["kv_bytes_saved"], 0);
  EXPECT_EQ(fu["kv_bytes_resident"], written * bytes_per_token);

  const Result morph = RunCli(common + " --kv-policy morphkv --kv-window 8 --kv-capacity 64");
  ASSERT_EQ(morph.exit_code, 0) << morph.out;
  const nlohmann::json mu = nlohmann::json::parse(morph.out)["usage"];
  const int64_t prompt = mu["prompt_tokens"].get<int64_t>();
  EXPECT_EQ(mu["kv_tokens_full_equivalent"], written);
  EXPECT_EQ(mu["kv_tokens_resident"], 65);
  EXPECT_EQ(mu["kv_tokens_evicted"], written - 65);
  EXPECT_EQ(mu["kv_bytes_resident"], 65 * bytes_per_token);
  EXPECT_EQ(mu["kv_bytes_saved"], (written - 65) * bytes_per_token);
  // Never more blocks than the prompt or the budget needs.
  EXPECT_LE(mu["kv_blocks_peak_used"].get<int64_t>(), (std::max<int64_t>(prompt, 65) + 15) / 16);

  for (const char* policy : {"h2o", "streaming", "snapkv"}) {
    const Result r = RunCli(common + " --kv-policy " + policy + " --kv-window 8 --kv-capacity 40");
    ASSERT_EQ(r.exit_code, 0) << policy << ": " << r.out;
    const nlohmann::json u = nlohmann::json::parse(r.out)["usage"];
    const int64_t want = std::string(policy) == "snapkv" ? std::min<int64_t>(prompt, 40) + 149 : 41;
    EXPECT_EQ(u["kv_tokens_resident"], want) << policy;
  }
}

// --device picks the backend; one this build cannot run is an error naming
// the flag, before anything is served. So is an unknown --full-admission.
TEST(CliTest, DeviceFlagSelectsABackendOrSaysWhyNot) {
  const std::string prompts = ::testing::TempDir() + "/device_prompts.txt";
  std::ofstream(prompts) << "hello\n";
  const std::string base =
      "batch --max-tokens 1 --model " + kTinyModel + " --prompts " + prompts + " ";
  for (const char* device : {"tpu", "cuda"}) {
    const Result r = RunCli(base + "--device " + device, true);
    EXPECT_EQ(r.exit_code, 1) << device;
    EXPECT_THAT(r.out, HasSubstr("--device")) << device;
  }
  const Result utilization = RunCli(base + "--gpu-memory-utilization 1.5", true);
  EXPECT_EQ(utilization.exit_code, 1);
  EXPECT_THAT(utilization.out, HasSubstr("--gpu-memory-utilization"));
  const Result memory = RunCli(base + "--kv-cache-memory lots", true);
  EXPECT_EQ(memory.exit_code, 1);
  EXPECT_THAT(memory.out, HasSubstr("--kv-cache-memory"));
  const Result admission = RunCli(base + "--full-admission sometimes", true);
  EXPECT_EQ(admission.exit_code, 1);
  EXPECT_THAT(admission.out, HasSubstr("--full-admission"));
  const Result serve =
      RunCli("serve --port 0 --metrics-port -1 --device tpu --model " + kTinyModel, true);
  EXPECT_EQ(serve.exit_code, 1);
  EXPECT_THAT(serve.out, HasSubstr("--device"));
}

TEST(CliTest, BadKvParametersNameTheParameter) {
  const std::string base = "generate --max-tokens 2 --model " + kTinyModel + " --prompt hi ";
  const std::pair<std::string, std::string> cases[] = {
      {"--kv-policy morphkv --kv-window 0", "kv_window"},
      {"--kv-policy h2o --kv-window 8 --kv-capacity 8", "kv_capacity"},
      {"--kv-policy morphkv --kv-capacity 5000", "context length"},
      {"--kv-policy lru", "kv_policy"},
      {"--kv-policy morphkv --kv-fusion mean", "kv_fusion"},
      {"--kv-policy streaming --kv-window 8 --kv-capacity 16 --kv-sinks 9", "kv_sinks"},
      {"--kv-policy morphkv --kv-aggregation mean", "kv_aggregation"},
  };
  for (const auto& [flags, field] : cases) {
    const Result r = RunCli(base + flags, true);
    EXPECT_EQ(r.exit_code, 1) << flags;
    EXPECT_THAT(r.out, HasSubstr(field)) << flags;
  }
}

// A quick eval run: the files it writes, and that its tokens-to-divergence is
// what a free-running greedy generation with the policy really does.
TEST(CliTest, EvalWritesResultsThatMatchFreeRunning) {
  REQUIRE_DEFAULT_MODEL(model);
  const std::string dir = ::testing::TempDir() + "/cli_eval";
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  const std::string prompts = dir + "/prompts.jsonl";
  std::ofstream(prompts)
      << R"({"id": "bread", "prompt": "Explain step by step how to bake bread."})"
      << "\n"
      << "Write a letter to a friend about your summer.\n";
  const Result r =
      RunCli("eval --threads 2 --model " + model + " --prompts " + prompts + " --out " + dir +
                 "/out --reference-tokens 64 --capacities 16,40 "
                 "--windows 4 --policies morphkv,h2o,snapkv,streaming",
             true);
  ASSERT_EQ(r.exit_code, 0) << r.out;
  EXPECT_THAT(r.out, HasSubstr("prompt 2/2 done"));
  const std::string csv = ReadFile(dir + "/out/fidelity.csv");
  // morphkv and h2o at 16 and 40, streaming at 16 and 40, snapkv at 40.
  EXPECT_EQ(std::count(csv.begin(), csv.end(), '\n'), 1 + 7) << csv;
  EXPECT_THAT(csv, HasSubstr("morphkv,4,16,sum,group-logit-sum"));
  EXPECT_THAT(ReadFile(dir + "/out/fidelity.md"), HasSubstr("| morphkv W4 | 16 |"));
  EXPECT_EQ(ReadFile(dir + "/out/fidelity.png").substr(1, 3), "PNG");

  std::ifstream refs(dir + "/out/reference.jsonl");
  std::string line;
  ASSERT_TRUE(std::getline(refs, line));
  const nlohmann::json ref = nlohmann::json::parse(line);
  EXPECT_EQ(ref["id"], "bread");
  const std::vector<int32_t> reference = ref["reference_tokens"].get<std::vector<int32_t>>();
  ASSERT_EQ(reference.size(), 64u);
  int64_t divergence = -1;
  std::ifstream div(dir + "/out/divergence.csv");
  while (std::getline(div, line)) {
    if (line.rfind("bread,morphkv,morphkv W4,4,16,", 0) == 0) {
      divergence = std::stoll(line.substr(line.rfind(',') + 1));
    }
  }
  ASSERT_GE(divergence, 0);
  const Result gen =
      RunCli("generate --json --ignore-eos --max-tokens 64 --threads 2 --model " + model +
             " --chat 'Explain step by step how to bake bread.' "
             "--kv-policy morphkv --kv-window 4 --kv-capacity 16");
  ASSERT_EQ(gen.exit_code, 0) << gen.out;
  const std::vector<int32_t> tokens =
      nlohmann::json::parse(gen.out)["tokens"].get<std::vector<int32_t>>();
  // The reference bans end-of-generation tokens; compare up to the first one
  // the free run chose (SmolLM2's are ids 0 and 2).
  size_t end = 0;
  while (end < tokens.size() && tokens[end] != 0 && tokens[end] != 2) ++end;
  const size_t same = std::min<size_t>(static_cast<size_t>(divergence), end);
  for (size_t i = 0; i < same; ++i) ASSERT_EQ(tokens[i], reference[i]) << "token " << i;
  if (static_cast<size_t>(divergence) < std::min<size_t>(end, 64)) {
    EXPECT_NE(tokens[divergence], reference[divergence]);
  }
}

TEST(CliTest, BatchRunsEveryPromptAndPrintsASummary) {
  const std::string prompts = ::testing::TempDir() + "/batch_prompts.txt";
  std::ofstream(prompts) << "Hello\nOnce upon a time\n\nThe sky is\nOne two three\nA B C\n";
  const std::string out = ::testing::TempDir() + "/batch_out.jsonl";
  const Result r = RunCli("batch --threads 2 --model " + kTinyModel + " --prompts " + prompts +
                          " --concurrency 3 --max-tokens 8 --ignore-eos --kv-cache-blocks 64 "
                          "--block-size 8 --output " +
                          out + " --json");
  ASSERT_EQ(r.exit_code, 0) << r.out;
  const nlohmann::json summary = nlohmann::json::parse(r.out);
  EXPECT_EQ(summary["requests"], 5);
  EXPECT_EQ(summary["failed"], 0);
  EXPECT_EQ(summary["output_tokens"], 40);
  EXPECT_EQ(summary["kv_blocks_total"], 64);
  EXPECT_LE(summary["peak_running"].get<int64_t>(), 3);
  EXPECT_GE(summary["mean_running"].get<double>(), 1.0);
  for (const char* key : {"output_tokens_per_s", "preemptions", "kv_blocks_peak_used"}) {
    EXPECT_TRUE(summary.contains(key)) << key;
  }
  std::ifstream lines(out);
  std::string line;
  int n = 0;
  while (std::getline(lines, line)) {
    const nlohmann::json j = nlohmann::json::parse(line);
    EXPECT_EQ(j["index"], n++);
    EXPECT_EQ(j["finish_reason"], "length");
    EXPECT_EQ(j["tokens"].size(), 8u);
  }
  EXPECT_EQ(n, 5);
  // A request that could never fit the pool fails alone; the rest still run.
  const Result small = RunCli("batch --threads 1 --model " + kTinyModel + " --prompts " + prompts +
                              " --max-tokens 200 --kv-cache-blocks 4 --json");
  ASSERT_EQ(small.exit_code, 0) << small.out;
  EXPECT_EQ(nlohmann::json::parse(small.out)["failed"], 5);
  // Each failure says why on stderr.
  const Result said = RunCli("batch --threads 1 --model " + kTinyModel + " --prompts " + prompts +
                                 " --max-tokens 200 --kv-cache-blocks 4",
                             /*merge_stderr=*/true);
  ASSERT_EQ(said.exit_code, 0) << said.out;
  EXPECT_THAT(said.out, HasSubstr("[batch] request 0 failed: "));
  EXPECT_THAT(said.out, HasSubstr("[batch] request 4 failed: "));
  EXPECT_THAT(said.out, HasSubstr("5 requests (5 failed)"));
  EXPECT_EQ(RunCli("batch --model " + kTinyModel + " --prompts " + prompts + " --concurrency 0")
                .exit_code,
            1);
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
