// GenerateRequest -> GenerationRequest on the tiny random Llama: fields are
// carried over, defaults fill the gaps, and every limit holds exactly at its
// boundary (the server test covers the error paths end to end).
#include "server/request_builder.h"

#include <memory>
#include <string>

#include "engine/generation/stop_checker.h"
#include "gtest/gtest.h"

namespace morphserve::server {
namespace {

class RequestBuilderTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto model = engine::LoadModel(
        {.path = std::string(MORPHSERVE_FIXTURES_DIR) + "/models/llama-2-tiny-random.gguf"});
    ASSERT_TRUE(model.ok()) << model.status();
    model_ = std::move(*model).release();
  }
  static void TearDownTestSuite() { delete model_; }

  // A request for `prompt` token ids (each 1).
  static v1::GenerateRequest Tokens(int prompt) {
    v1::GenerateRequest r;
    for (int i = 0; i < prompt; ++i) r.mutable_tokens()->add_ids(1);
    return r;
  }

  absl::StatusOr<GenerationRequest> Build(const v1::GenerateRequest& r) const {
    return BuildGenerationRequest(r, *model_, defaults_);
  }
  // The error's message, or "ok".
  std::string Error(const v1::GenerateRequest& r) const {
    auto built = Build(r);
    return built.ok() ? "ok" : std::string(built.status().message());
  }

  static engine::Model* model_;
  ServerDefaults defaults_;
};

engine::Model* RequestBuilderTest::model_ = nullptr;

TEST_F(RequestBuilderTest, CarriesEveryField) {
  v1::GenerateRequest r = Tokens(3);
  v1::SamplingParams* s = r.mutable_sampling();
  s->set_temperature(0.7f);
  s->set_top_k(40);
  s->set_top_p(0.9f);
  s->set_min_p(0.05f);
  s->set_repetition_penalty(1.1f);
  s->set_presence_penalty(0.5f);
  s->set_frequency_penalty(-0.5f);
  s->set_seed(7);
  r.set_top_logprobs(3);
  r.mutable_stopping()->set_max_new_tokens(20);
  r.mutable_stopping()->set_min_new_tokens(2);
  r.mutable_stopping()->add_stop("\n\n");
  r.mutable_stopping()->add_stop_token_ids(2);
  r.mutable_stopping()->set_ignore_eos(true);
  r.mutable_kv()->set_policy("morphkv");
  r.mutable_kv()->set_window(4);
  r.mutable_kv()->set_capacity(16);
  r.mutable_kv()->set_fusion("max");
  r.set_priority(5);
  r.set_request_id("chatcmpl-3f2a/1");
  auto built = Build(r);
  ASSERT_TRUE(built.ok()) << built.status();
  EXPECT_EQ(built->prompt, std::vector<int32_t>({1, 1, 1}));
  EXPECT_FLOAT_EQ(built->sampling.temperature, 0.7f);
  EXPECT_EQ(built->sampling.top_k, 40);
  EXPECT_FLOAT_EQ(built->sampling.top_p, 0.9f);
  EXPECT_FLOAT_EQ(built->sampling.min_p, 0.05f);
  EXPECT_FLOAT_EQ(built->sampling.repetition_penalty, 1.1f);
  EXPECT_FLOAT_EQ(built->sampling.presence_penalty, 0.5f);
  EXPECT_FLOAT_EQ(built->sampling.frequency_penalty, -0.5f);
  EXPECT_EQ(built->sampling.seed.value_or(0), 7u);
  EXPECT_EQ(built->sampling.logprobs, 3);
  EXPECT_EQ(built->stop.max_new_tokens, 20);
  EXPECT_EQ(built->stop.min_new_tokens, 2);
  EXPECT_EQ(built->stop.stop_strings, std::vector<std::string>({"\n\n"}));
  EXPECT_EQ(built->stop.stop_token_ids, std::vector<int32_t>({2}));
  EXPECT_TRUE(built->stop.ignore_eos);
  EXPECT_EQ(built->kv.kind, KvPolicyKind::kMorphKv);
  EXPECT_EQ(built->kv.window, 4);
  EXPECT_EQ(built->kv.capacity, 16);
  EXPECT_EQ(built->kv.fusion, KvFusion::kMax);
  EXPECT_EQ(built->kv.aggregation, defaults_.kv.aggregation);
  EXPECT_EQ(built->priority, 5);
}

TEST_F(RequestBuilderTest, UnsetMaxNewTokensIsTheDefaultCappedByTheContext) {
  const int64_t context = model_->config.context_length;
  auto built = Build(Tokens(5));
  ASSERT_TRUE(built.ok()) << built.status();
  EXPECT_EQ(built->stop.max_new_tokens, defaults_.max_new_tokens);
  built = Build(Tokens(static_cast<int>(context) - 10));
  ASSERT_TRUE(built.ok()) << built.status();
  EXPECT_EQ(built->stop.max_new_tokens, 10);
  EXPECT_EQ(Build(Tokens(static_cast<int>(context))).status().code(),
            absl::StatusCode::kOutOfRange);
}

TEST_F(RequestBuilderTest, LimitsHoldAtTheirBoundaries) {
  const int64_t context = model_->config.context_length;
  const int32_t vocab = model_->config.vocab_size;
  defaults_.max_new_tokens_limit = 100;
  v1::GenerateRequest r = Tokens(1);
  r.mutable_stopping()->set_max_new_tokens(100);
  EXPECT_EQ(Error(r), "ok");
  r.mutable_stopping()->set_max_new_tokens(101);
  EXPECT_EQ(Error(r), "stopping.max_new_tokens: 101 is outside [1, 100]");

  defaults_.max_new_tokens_limit = context;
  r = Tokens(static_cast<int>(context) - 100);
  r.mutable_stopping()->set_max_new_tokens(100);
  EXPECT_EQ(Error(r), "ok");
  r.mutable_stopping()->set_max_new_tokens(101);
  EXPECT_EQ(Build(r).status().code(), absl::StatusCode::kOutOfRange);

  r = Tokens(1);
  r.mutable_stopping()->set_max_new_tokens(4);
  r.mutable_stopping()->set_min_new_tokens(4);
  r.set_top_logprobs(20);
  r.set_request_id(std::string(256, '~'));
  for (size_t i = 0; i < engine::kMaxStopStrings; ++i) {
    r.mutable_stopping()->add_stop(
        std::string(engine::kMaxStopStringBytes, static_cast<char>('a' + i)));
  }
  for (size_t i = 0; i < kMaxStopTokenIds; ++i) {
    r.mutable_stopping()->add_stop_token_ids(vocab - 1);
  }
  EXPECT_EQ(Error(r), "ok");
  v1::GenerateRequest over = r;
  over.mutable_stopping()->set_min_new_tokens(5);
  EXPECT_EQ(Error(over), "stopping.min_new_tokens: 5 is above max_new_tokens (4)");
  over = r;
  over.set_top_logprobs(21);
  EXPECT_EQ(Error(over), "top_logprobs: 21 is above 20");
  over = r;
  over.set_request_id(std::string(257, '~'));
  EXPECT_EQ(Error(over), "request_id: longer than 256 bytes");
  over = r;
  over.mutable_stopping()->add_stop("b");
  EXPECT_EQ(Error(over), "stopping.stop: 17 strings; at most 16");
  over = r;
  over.mutable_stopping()->mutable_stop(3)->push_back('x');
  EXPECT_EQ(Error(over), "stopping.stop[3]: 257 bytes; at most 256");
  over = r;
  over.mutable_stopping()->add_stop_token_ids(0);
  EXPECT_EQ(Error(over), "stopping.stop_token_ids: 65 ids; at most 64");
  over = r;
  over.mutable_stopping()->set_stop_token_ids(2, vocab);
  EXPECT_EQ(Error(over), "stopping.stop_token_ids[2]: " + std::to_string(vocab) +
                             " is not a token id (vocabulary [0, " + std::to_string(vocab) + "))");
}

TEST_F(RequestBuilderTest, KvErrorsNameTheApiFields) {
  const int64_t context = model_->config.context_length;
  v1::KvParams kv;
  kv.set_policy("h2o");
  kv.set_window(0);
  EXPECT_EQ(KvPolicyFromProto(kv, defaults_.kv, context).status().message(),
            "kv.window must be at least 1 for h2o (got 0)");
  kv.set_policy("snapkv");
  kv.set_capacity(32);
  EXPECT_EQ(KvPolicyFromProto(kv, defaults_.kv, context).status().message(),
            "kv.capacity must be above snapkv's observation window of 32 (got 32)");
  kv.set_policy("lru");
  EXPECT_EQ(KvPolicyFromProto(kv, defaults_.kv, context).status().message(),
            "kv.policy: unknown kv_policy 'lru' (expected one of: full, morphkv, h2o, snapkv, "
            "streaming)");
  // Unset fields keep the defaults.
  auto c = KvPolicyFromProto({}, defaults_.kv, context);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->kind, defaults_.kv.kind);
  EXPECT_EQ(c->window, defaults_.kv.window);
  EXPECT_EQ(c->capacity, defaults_.kv.capacity);
}

TEST_F(RequestBuilderTest, RequestIdsArePrintableAscii) {
  v1::GenerateRequest r = Tokens(1);
  for (const char* id : {"a b", "tab\there", "caf\xC3\xA9", "new\nline"}) {
    r.set_request_id(id);
    EXPECT_EQ(Error(r), "request_id: only printable ASCII, no spaces") << id;
  }
}

TEST_F(RequestBuilderTest, TokenizeChecksChatInputAsGenerateDoes) {
  v1::TokenizeRequest t;
  v1::ChatMessage* m = t.mutable_chat()->add_messages();
  m->set_role("user");
  EXPECT_EQ(TokenizeInput(*model_, t).status().message(), "chat.messages[0].content: empty");
  m->set_content("Hello");
  m->set_role("User");
  EXPECT_EQ(TokenizeInput(*model_, t).status().message(),
            "chat.messages[0].role: must be system, user or assistant");
}

}  // namespace
}  // namespace morphserve::server
