// The engine loop end to end on a random model: many requests with mixed KV
// policies, staggered arrivals, chunked prefill and a pool small enough to
// force preemptions give exactly the greedy tokens each request gets alone.
#include "server/engine_loop.h"

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <map>
#include <memory>
#include <random>
#include <thread>
#include <vector>

#include "engine/model/model.h"
#include "gtest/gtest.h"
#include "tests/engine/model/hf_test_util.h"

namespace morphserve::server {
namespace {

struct Job {
  GenerationRequest request;
  std::vector<int32_t> tokens;
};

// Collects every stream to its end.
std::vector<int32_t> Drain(TokenStream& stream, FinishReason* finish) {
  std::vector<int32_t> tokens;
  for (;;) {
    auto e = stream.Pop(std::chrono::seconds(60));
    if (!e.has_value()) {
      ADD_FAILURE() << "stream stalled";
      return tokens;
    }
    EXPECT_TRUE(e->error.ok()) << e->error;
    if (e->token >= 0) tokens.push_back(e->token);
    if (e->last()) {
      *finish = e->finish;
      return tokens;
    }
  }
}

class EngineLoopTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new testing::TempDir();
    testing::TinySpec spec;
    spec.context = 1024;
    testing::WriteHfCheckpoint(dir_->path(), testing::TinyConfigJson(spec, "LlamaForCausalLM"),
                               testing::RandomTinyWeights(spec, 21), "F32");
    auto model = engine::LoadModel({.path = dir_->path()});
    ASSERT_TRUE(model.ok()) << model.status();
    model_ = std::move(*model).release();
  }
  static void TearDownTestSuite() {
    delete model_;
    delete dir_;
  }
  static testing::TempDir* dir_;
  static engine::Model* model_;
};

testing::TempDir* EngineLoopTest::dir_ = nullptr;
engine::Model* EngineLoopTest::model_ = nullptr;

std::vector<Job> MakeJobs(int n, int32_t vocab) {
  std::mt19937 rng(3);
  std::vector<Job> jobs(n);
  for (int i = 0; i < n; ++i) {
    GenerationRequest& r = jobs[i].request;
    r.prompt.resize(5 + rng() % 60);
    for (int32_t& t : r.prompt) t = static_cast<int32_t>(rng() % vocab);
    r.sampling.temperature = 0.0f;
    r.stop.max_new_tokens = 30 + static_cast<int64_t>(rng() % 50);
    r.stop.ignore_eos = true;
    switch (i % 5) {
      case 0: break;  // full
      case 1: r.kv = {KvPolicyKind::kMorphKv, 4, 24}; break;
      case 2: r.kv = {KvPolicyKind::kH2o, 4, 24}; break;
      case 3: r.kv = {KvPolicyKind::kStreaming, 4, 24}; r.kv.sinks = 2; break;
      default: r.kv = {KvPolicyKind::kSnapKv, 4, 40}; break;
    }
    r.priority = static_cast<int32_t>(rng() % 2);
  }
  return jobs;
}

TEST_F(EngineLoopTest, ConcurrentRunsMatchEachRequestAlone) {
  std::vector<Job> jobs = MakeJobs(15, static_cast<int32_t>(model_->config.vocab_size));
  {
    EngineLoop alone(*model_, {.num_blocks = 64, .block_size = 8, .threads = 2});
    for (Job& job : jobs) {
      auto s = alone.Submit(job.request);
      ASSERT_TRUE(s.ok()) << s.status();
      FinishReason finish;
      job.tokens = Drain(*s->second, &finish);
      EXPECT_EQ(finish, FinishReason::kLength);
      EXPECT_EQ(static_cast<int64_t>(job.tokens.size()), job.request.stop.max_new_tokens);
    }
  }
  // A pool of 20 blocks of 8 and 32 tokens per step: prompts are chunked
  // and full-cache requests get preempted and recomputed.
  EngineLoop together(*model_, {.num_blocks = 20, .block_size = 8, .max_num_seqs = 8,
                                .max_num_batched_tokens = 32, .threads = 2});
  std::vector<std::shared_ptr<TokenStream>> streams;
  for (size_t i = 0; i < jobs.size(); ++i) {
    auto s = together.Submit(jobs[i].request);
    ASSERT_TRUE(s.ok()) << s.status();
    streams.push_back(s->second);
    if (i % 4 == 3) std::this_thread::sleep_for(std::chrono::milliseconds(20));  // staggered
  }
  for (size_t i = 0; i < jobs.size(); ++i) {
    FinishReason finish;
    EXPECT_EQ(Drain(*streams[i], &finish), jobs[i].tokens) << "request " << i;
  }
  // Stats are published after the step that ended the last stream.
  for (int i = 0; i < 100 && together.Stats().free_blocks != 20; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  const EngineStats stats = together.Stats();
  EXPECT_GT(stats.peak_running, 1);
  EXPECT_EQ(stats.free_blocks, stats.total_blocks);
}

// Two full-cache requests that fit the pool alone but not together: the one
// admitted last is preempted and recomputed, and still produces its tokens.
TEST_F(EngineLoopTest, PreemptedRequestsRecomputeToTheSameTokens) {
  std::vector<Job> jobs = MakeJobs(2, static_cast<int32_t>(model_->config.vocab_size));
  for (Job& job : jobs) {
    job.request.kv = {};
    job.request.prompt.resize(40, 3);
    job.request.stop.max_new_tokens = 60;  // 99 slots: 13 blocks of 8 each
  }
  {
    EngineLoop alone(*model_, {.num_blocks = 16, .block_size = 8, .threads = 2});
    for (Job& job : jobs) {
      auto s = alone.Submit(job.request);
      ASSERT_TRUE(s.ok()) << s.status();
      FinishReason finish;
      job.tokens = Drain(*s->second, &finish);
    }
  }
  EngineLoop together(*model_, {.num_blocks = 16, .block_size = 8, .threads = 2});
  auto a = together.Submit(jobs[0].request);
  auto b = together.Submit(jobs[1].request);
  ASSERT_TRUE(a.ok() && b.ok());
  FinishReason finish;
  EXPECT_EQ(Drain(*a->second, &finish), jobs[0].tokens);
  EXPECT_EQ(Drain(*b->second, &finish), jobs[1].tokens);
  EXPECT_GT(together.Stats().preemptions, 0);
}

// The same on the default model (SmolLM2-135M), when it has been fetched.
TEST(EngineLoopDefaultModelTest, ConcurrentRunsMatchEachRequestAlone) {
  const char* dir = std::getenv("MORPHSERVE_MODELS_DIR");
  const std::string path = std::string(dir != nullptr ? dir : MORPHSERVE_SOURCE_DIR "/models") +
                           "/SmolLM2-135M-Instruct.Q4_1.gguf";
  if (!std::filesystem::exists(path)) {
    const char* require = std::getenv("MORPHSERVE_REQUIRE_MODELS");
    if (require != nullptr && std::string(require) == "1") FAIL() << "missing " << path;
    GTEST_SKIP() << "no " << path << "; run scripts/fetch_model.sh";
  }
  auto model = engine::LoadModel({.path = path});
  ASSERT_TRUE(model.ok()) << model.status();
  std::vector<Job> jobs = MakeJobs(10, 32000);
  for (Job& job : jobs) job.request.stop.max_new_tokens = 24 + job.request.stop.max_new_tokens % 16;
  {
    EngineLoop alone(**model, {.num_blocks = 64, .block_size = 8, .threads = 2});
    for (Job& job : jobs) {
      auto s = alone.Submit(job.request);
      ASSERT_TRUE(s.ok()) << s.status();
      FinishReason finish;
      job.tokens = Drain(*s->second, &finish);
    }
  }
  EngineLoop together(**model, {.num_blocks = 24, .block_size = 8, .max_num_seqs = 6,
                                .max_num_batched_tokens = 48, .threads = 2});
  std::vector<std::shared_ptr<TokenStream>> streams;
  for (size_t i = 0; i < jobs.size(); ++i) {
    auto s = together.Submit(jobs[i].request);
    ASSERT_TRUE(s.ok()) << s.status();
    streams.push_back(s->second);
    if (i % 3 == 2) std::this_thread::sleep_for(std::chrono::milliseconds(30));
  }
  for (size_t i = 0; i < jobs.size(); ++i) {
    FinishReason finish;
    EXPECT_EQ(Drain(*streams[i], &finish), jobs[i].tokens) << "request " << i;
  }
}

TEST_F(EngineLoopTest, BadRequestsAreRefusedAndTheLoopKeepsServing) {
  EngineLoop engine(*model_, {.num_blocks = 16, .block_size = 8, .threads = 1});
  GenerationRequest ok;
  ok.prompt = {1, 2, 3};
  ok.sampling.temperature = 0.0f;
  ok.stop.max_new_tokens = 4;
  GenerationRequest bad = ok;
  bad.prompt = {};
  EXPECT_EQ(engine.Submit(bad).status().code(), absl::StatusCode::kInvalidArgument);
  bad = ok;
  bad.prompt = {1, 100000};
  EXPECT_EQ(engine.Submit(bad).status().code(), absl::StatusCode::kInvalidArgument);
  bad = ok;
  bad.stop.max_new_tokens = 500;  // 503 slots: more than 16 blocks of 8
  EXPECT_EQ(engine.Submit(bad).status().code(), absl::StatusCode::kResourceExhausted);
  bad.kv = {KvPolicyKind::kMorphKv, 4, 24};  // bounded: fits
  EXPECT_TRUE(engine.Submit(bad).ok());
  bad = ok;
  bad.kv = {KvPolicyKind::kMorphKv, 8, 8};
  EXPECT_EQ(engine.Submit(bad).status().code(), absl::StatusCode::kInvalidArgument);
  bad = ok;
  bad.sampling.top_p = 0.0f;
  EXPECT_EQ(engine.Submit(bad).status().code(), absl::StatusCode::kInvalidArgument);
  auto s = engine.Submit(ok);
  ASSERT_TRUE(s.ok());
  FinishReason finish;
  EXPECT_EQ(Drain(*s->second, &finish).size(), 4u);
}

TEST_F(EngineLoopTest, CancelEndsTheStreamAndFreesItsBlocks) {
  EngineLoop engine(*model_, {.num_blocks = 64, .block_size = 8, .threads = 1});
  GenerationRequest r;
  r.prompt = {5, 6, 7, 8};
  r.stop.max_new_tokens = 500;
  r.stop.ignore_eos = true;
  auto s = engine.Submit(r);
  ASSERT_TRUE(s.ok());
  ASSERT_TRUE(s->second->Pop(std::chrono::seconds(30)).has_value());  // it is decoding
  engine.Cancel(s->first);
  FinishReason finish = FinishReason::kNone;
  Drain(*s->second, &finish);
  EXPECT_EQ(finish, FinishReason::kCancelled);
  for (int i = 0; i < 100 && engine.Stats().free_blocks != 64; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_EQ(engine.Stats().free_blocks, 64);
}

}  // namespace
}  // namespace morphserve::server
