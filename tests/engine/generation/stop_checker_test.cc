#include "engine/generation/stop_checker.h"

#include "engine/model/model.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace morphserve::engine {
namespace {

using ::testing::HasSubstr;

class StopCheckerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto t = LoadTokenizer(std::string(MORPHSERVE_FIXTURES_DIR) +
                           "/tokenizer/ggml-vocab-gpt-2.gguf");
    ASSERT_TRUE(t.ok()) << t.status();
    tokenizer_ = std::move(*t);
  }

  // Pushes the tokens of `text`; returns the concatenated output and the
  // finish reason, and checks that nothing is pushed after a finish.
  std::pair<std::string, FinishReason> Feed(const std::string& text, StopConditions cond,
                                            std::vector<std::string>* chunks = nullptr) {
    StopChecker checker(*tokenizer_, std::move(cond));
    std::string out;
    for (int32_t id : tokenizer_->Encode(text, false, false)) {
      StopChecker::Step step = checker.Push(id);
      out += step.text;
      if (chunks != nullptr) chunks->push_back(step.text);
      if (step.finish != FinishReason::kNone) return {out, step.finish};
    }
    return {out, FinishReason::kNone};
  }

  std::unique_ptr<Tokenizer> tokenizer_;
};

TEST_F(StopCheckerTest, StopStringIsCutAndNeverPartlyShown) {
  StopConditions cond;
  cond.stop_strings = {"STOP here"};
  std::vector<std::string> chunks;
  auto [text, finish] = Feed("Hello world, this is a test. STOP here and more", cond, &chunks);
  EXPECT_EQ(finish, FinishReason::kStop);
  EXPECT_EQ(text, "Hello world, this is a test. ");
  for (const std::string& c : chunks) EXPECT_THAT(c, ::testing::Not(HasSubstr("STOP")));
}

TEST_F(StopCheckerTest, HeldBackPrefixIsReleasedWhenItDoesNotMatch) {
  StopConditions cond;
  cond.stop_strings = {"cat dog"};
  cond.max_new_tokens = 100;
  auto [text, finish] = Feed("the cat sat on the mat", cond);
  EXPECT_EQ(finish, FinishReason::kNone);
  // Everything but a possible "cat" prefix tail is out; nothing was lost.
  EXPECT_EQ(text, "the cat sat on the mat");
}

TEST_F(StopCheckerTest, LengthLimitFlushesEverything) {
  StopConditions cond;
  cond.max_new_tokens = 3;
  cond.stop_strings = {"xyz"};
  const std::vector<int32_t> ids = tokenizer_->Encode("one two three four", false, false);
  auto [text, finish] = Feed("one two three four", cond);
  EXPECT_EQ(finish, FinishReason::kLength);
  EXPECT_EQ(text, tokenizer_->Decode(std::span<const int32_t>(ids).first(3)));
}

TEST_F(StopCheckerTest, EosRespectsIgnoreEosAndMinTokens) {
  const int32_t eos = tokenizer_->eos_id();
  {
    StopChecker checker(*tokenizer_, StopConditions{});
    EXPECT_EQ(checker.Push(eos).finish, FinishReason::kEos);
  }
  {
    StopConditions cond;
    cond.ignore_eos = true;
    StopChecker checker(*tokenizer_, cond);
    EXPECT_EQ(checker.Push(eos).finish, FinishReason::kNone);
  }
  {
    StopConditions cond;
    cond.min_new_tokens = 2;
    StopChecker checker(*tokenizer_, cond);
    EXPECT_EQ(checker.Push(eos).finish, FinishReason::kNone);
    EXPECT_EQ(checker.Push(eos).finish, FinishReason::kNone);
    EXPECT_EQ(checker.Push(eos).finish, FinishReason::kEos);
  }
}

TEST_F(StopCheckerTest, StopTokenIds) {
  const std::vector<int32_t> ids = tokenizer_->Encode("alpha beta gamma", false, false);
  ASSERT_GE(ids.size(), 3u);
  StopConditions cond;
  cond.stop_token_ids = {ids[2]};
  StopChecker checker(*tokenizer_, cond);
  EXPECT_EQ(checker.Push(ids[0]).finish, FinishReason::kNone);
  EXPECT_EQ(checker.Push(ids[1]).finish, FinishReason::kNone);
  EXPECT_EQ(checker.Push(ids[2]).finish, FinishReason::kStop);
}

TEST(StopConditionsTest, ValidationNamesTheField) {
  StopConditions c;
  c.max_new_tokens = 0;
  EXPECT_THAT(c.Validate().message(), HasSubstr("max_new_tokens"));
  c = {};
  c.min_new_tokens = 1000;
  EXPECT_THAT(c.Validate().message(), HasSubstr("min_new_tokens"));
  c = {};
  c.stop_strings.assign(kMaxStopStrings + 1, "x");
  EXPECT_THAT(c.Validate().message(), HasSubstr("stop strings"));
  c = {};
  c.stop_strings = {""};
  EXPECT_THAT(c.Validate().message(), HasSubstr("stop strings"));
  EXPECT_TRUE(StopConditions{}.Validate().ok());
}

}  // namespace
}  // namespace morphserve::engine
