// The CPU forward pass against llama.cpp's recorded logits for the tiny
// fixture model (teacher-forced, as the fixture's README prescribes).
#include <cmath>
#include <fstream>
#include <iterator>
#include <numeric>
#include <random>

#include "common/thread_pool.h"
#include "engine/kv/paged_kv_cache.h"
#include "engine/model/llama_forward.h"
#include "engine/model/model.h"
#include "engine/sampler/sampler.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace morphserve::engine {
namespace {

const std::string kFixtures = MORPHSERVE_FIXTURES_DIR;

class GoldenTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto model = LoadModel({.path = kFixtures + "/models/llama-2-tiny-random.gguf"});
    ASSERT_TRUE(model.ok()) << model.status();
    model_ = std::move(*model).release();
    std::ifstream f(kFixtures + "/golden/llama-2-tiny-random.golden.json");
    golden_ = new nlohmann::json(nlohmann::json::parse(f));
  }
  static void TearDownTestSuite() {
    delete model_;
    delete golden_;
  }

  // Runs `tokens` through a fresh cache in chunks of `chunk` tokens and
  // returns the logits row after each token.
  std::vector<std::vector<float>> Run(const std::vector<int32_t>& tokens, size_t chunk,
                                      int threads = 1) {
    const ModelConfig& c = model_->config;
    const int64_t block_size = 16;
    const int64_t blocks = (static_cast<int64_t>(tokens.size()) + block_size - 1) / block_size;
    PagedKvCache cache({c.num_layers, c.num_kv_heads, c.head_dim, block_size, blocks + 3});
    // Deliberately scrambled block ids: paging must not depend on order.
    std::vector<int32_t> table(blocks + 3);
    std::iota(table.begin(), table.end(), 0);
    std::shuffle(table.begin(), table.end(), std::mt19937(static_cast<uint32_t>(tokens.size())));
    table.resize(blocks);
    ThreadPool pool(threads);
    LlamaForward forward(*model_, &pool);
    std::vector<std::vector<float>> rows;
    std::vector<float> logits;
    for (size_t begin = 0; begin < tokens.size(); begin += chunk) {
      const size_t n = std::min(chunk, tokens.size() - begin);
      const SequenceInput seq{0, static_cast<int64_t>(n), static_cast<int64_t>(begin), table};
      const std::span<const int32_t> part = std::span<const int32_t>(tokens).subspan(begin, n);
      const absl::Status s = forward.Forward({part, {&seq, 1}, true}, cache, &logits);
      EXPECT_TRUE(s.ok()) << s;
      for (size_t i = 0; i < n; ++i) {
        rows.emplace_back(logits.begin() + i * c.vocab_size,
                          logits.begin() + (i + 1) * c.vocab_size);
      }
    }
    return rows;
  }

  static Model* model_;
  static nlohmann::json* golden_;
};

Model* GoldenTest::model_ = nullptr;
nlohmann::json* GoldenTest::golden_ = nullptr;

double LogSumExp(const std::vector<float>& row) {
  double m = -1e30;
  for (float v : row) m = std::max(m, static_cast<double>(v));
  double s = 0;
  for (float v : row) s += std::exp(v - m);
  return m + std::log(s);
}

TEST_F(GoldenTest, FullLogitRowOfPromptZero) {
  std::ifstream f(kFixtures + "/golden/llama-2-tiny-random.prompt0.logits.f32", std::ios::binary);
  std::vector<float> expected(32000);
  f.read(reinterpret_cast<char*>(expected.data()), expected.size() * sizeof(float));
  ASSERT_TRUE(f.good());
  const auto& c0 = (*golden_)["cases"][0];
  const std::vector<int32_t> prompt = c0["prompt_tokens"].get<std::vector<int32_t>>();
  const std::vector<float> row = Run(prompt, prompt.size()).back();
  float scale = 0, worst = 0;
  for (size_t i = 0; i < row.size(); ++i) {
    scale = std::max(scale, std::fabs(expected[i]));
    worst = std::max(worst, std::fabs(row[i] - expected[i]));
  }
  EXPECT_LE(worst, 1e-2f * scale);
  // An f32 implementation lands far inside the tolerance (README: ~1e-4).
  EXPECT_LE(worst, 2e-4f) << "largest absolute difference";
  EXPECT_EQ(ArgMax(row), 6544);
}

TEST_F(GoldenTest, TeacherForcedLogitsAndGreedyTokensOfEveryCase) {
  int compared_tokens = 0;
  for (const auto& c : (*golden_)["cases"]) {
    const std::vector<int32_t> prompt = c["prompt_tokens"].get<std::vector<int32_t>>();
    const std::vector<int32_t> greedy = c["greedy_tokens"].get<std::vector<int32_t>>();
    std::vector<int32_t> tokens = prompt;
    tokens.insert(tokens.end(), greedy.begin(), greedy.end() - 1);
    const auto rows = Run(tokens, prompt.size());
    const auto& steps = c["steps"];
    ASSERT_EQ(steps.size(), greedy.size());
    for (size_t k = 0; k < steps.size(); ++k) {
      const std::vector<float>& row = rows[prompt.size() - 1 + k];
      const auto& step = steps[k];
      float scale = 0;
      for (const auto& pair : step["top"]) scale = std::max(scale, std::fabs(pair[1].get<float>()));
      const float tol = 1e-2f * scale;
      for (const auto& pair : step["top"]) {
        EXPECT_NEAR(row[pair[0].get<int>()], pair[1].get<float>(), tol)
            << "case " << c["index"] << " step " << k;
      }
      EXPECT_NEAR(LogSumExp(row), step["logsumexp"].get<double>(), 1e-4);
      const float margin = step["top"][0][1].get<float>() - step["top"][1][1].get<float>();
      if (margin > tol) {
        EXPECT_EQ(ArgMax(row), step["token"].get<int>()) << "case " << c["index"] << " step " << k;
        ++compared_tokens;
      }
    }
  }
  EXPECT_GT(compared_tokens, 200);
}

TEST_F(GoldenTest, ChunkedPrefillMatchesOneBatch) {
  const auto& c6 = (*golden_)["cases"][6];
  const std::vector<int32_t> prompt = c6["prompt_tokens"].get<std::vector<int32_t>>();
  const auto whole = Run(prompt, prompt.size());
  for (size_t chunk : {1u, 7u, 16u, 33u}) {
    const auto parts = Run(prompt, chunk, /*threads=*/3);
    ASSERT_EQ(parts.size(), whole.size());
    for (size_t i = 0; i < whole.size(); i += 13) {
      for (size_t v = 0; v < whole[i].size(); v += 97) {
        ASSERT_NEAR(parts[i][v], whole[i][v], 1e-5f) << "chunk " << chunk << " token " << i;
      }
    }
  }
}

TEST_F(GoldenTest, SequencesBatchedTogetherMatchEachAlone) {
  const ModelConfig& c = model_->config;
  std::vector<std::vector<int32_t>> prompts;
  for (int i : {0, 2, 3}) prompts.push_back((*golden_)["cases"][i]["prompt_tokens"]);
  PagedKvCache cache({c.num_layers, c.num_kv_heads, c.head_dim, 4, 64});
  std::vector<std::vector<int32_t>> tables = {{0, 1, 2, 3}, {10, 11}, {20, 21, 22, 23, 24}};
  std::vector<int32_t> tokens;
  std::vector<SequenceInput> seqs;
  for (size_t s = 0; s < prompts.size(); ++s) {
    seqs.push_back({static_cast<int64_t>(tokens.size()), static_cast<int64_t>(prompts[s].size()),
                    0, tables[s]});
    tokens.insert(tokens.end(), prompts[s].begin(), prompts[s].end());
  }
  ThreadPool pool(2);
  LlamaForward forward(*model_, &pool);
  std::vector<float> logits;
  ASSERT_TRUE(forward.Forward({tokens, seqs, false}, cache, &logits).ok());
  for (size_t s = 0; s < prompts.size(); ++s) {
    const std::vector<float> alone = Run(prompts[s], prompts[s].size()).back();
    for (int64_t v = 0; v < c.vocab_size; v += 31) {
      ASSERT_NEAR(logits[s * c.vocab_size + v], alone[v], 1e-5f) << "sequence " << s;
    }
  }
}

TEST_F(GoldenTest, BadBatchesAreRejectedNotRun) {
  const ModelConfig& c = model_->config;
  PagedKvCache cache({c.num_layers, c.num_kv_heads, c.head_dim, 16, 2});
  ThreadPool pool(1);
  LlamaForward forward(*model_, &pool);
  std::vector<float> logits;
  const std::vector<int32_t> table = {0, 1};
  const std::vector<int32_t> bad_token = {1, 32000};
  const SequenceInput seq{0, 2, 0, table};
  EXPECT_EQ(forward.Forward({bad_token, {&seq, 1}, false}, cache, &logits).code(),
            absl::StatusCode::kInvalidArgument);
  const std::vector<int32_t> ok_tokens = {1, 2};
  const SequenceInput beyond{0, 2, 31, table};  // slot 32 needs a third block
  EXPECT_EQ(forward.Forward({ok_tokens, {&beyond, 1}, false}, cache, &logits).code(),
            absl::StatusCode::kInvalidArgument);
  const std::vector<int32_t> bad_table = {0, 7};
  const SequenceInput bad_block{0, 2, 15, bad_table};
  EXPECT_EQ(forward.Forward({ok_tokens, {&bad_block, 1}, false}, cache, &logits).code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace morphserve::engine
