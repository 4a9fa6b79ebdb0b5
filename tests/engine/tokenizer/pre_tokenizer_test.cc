// The hand-written pre-tokenizers against the splits of the regular
// expressions they replace (as Hugging Face tokenizers produces them).
#include "engine/tokenizer/pre_tokenizer.h"

#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace morphserve::engine {
namespace {

using ::testing::ElementsAre;
using ::testing::IsEmpty;

std::vector<std::string> Split(PreTokenizerKind kind, std::string_view text) {
  return PreTokenize(kind, text);
}

TEST(PreTokenizerTest, Gpt2) {
  const auto k = PreTokenizerKind::kGpt2;
  EXPECT_THAT(Split(k, "Hello world's 123 !!x"),
              ElementsAre("Hello", " world", "'s", " 123", " !!", "x"));
  EXPECT_THAT(Split(k, "a   b\n\n c  "), ElementsAre("a", "  ", " b", "\n\n", " c", "  "));
  EXPECT_THAT(Split(k, "I'M"), ElementsAre("I", "'", "M"));  // case-sensitive contractions
  EXPECT_THAT(Split(k, ""), IsEmpty());
}

TEST(PreTokenizerTest, Llama3) {
  const auto k = PreTokenizerKind::kLlama3;
  EXPECT_THAT(Split(k, "Hello world's 1234567 !!\n\nx"),
              ElementsAre("Hello", " world", "'s", " ", "123", "456", "7", " !!\n\n", "x"));
  EXPECT_THAT(Split(k, "I'M (ok)"), ElementsAre("I", "'M", " (", "ok", ")"));
  EXPECT_THAT(Split(k, "a \n\n  b"), ElementsAre("a", " \n\n", " ", " b"));
  EXPECT_THAT(Split(k, "\tfoo"), ElementsAre("\tfoo"));
}

TEST(PreTokenizerTest, Qwen2SplitsEveryDigit) {
  EXPECT_THAT(Split(PreTokenizerKind::kQwen2, "x 2024!"),
              ElementsAre("x", " ", "2", "0", "2", "4", "!"));
}

TEST(PreTokenizerTest, DigitsThenGpt2) {
  EXPECT_THAT(Split(PreTokenizerKind::kDigitsThenGpt2, "abc 123def"),
              ElementsAre("abc", " ", "1", "2", "3", "def"));
}

TEST(PreTokenizerTest, DefaultSplitsPunctuationAndDigitTriples) {
  EXPECT_THAT(Split(PreTokenizerKind::kDefault, "a+b 12345"),
              ElementsAre("a", "+", "b", " ", "123", "45"));
}

TEST(PreTokenizerTest, UnicodeClasses) {
  // Cyrillic letters, a superscript digit (\p{N}) and a no-break space (\s).
  EXPECT_THAT(Split(PreTokenizerKind::kGpt2, "\xD0\x9F\xD1\x80\xC2\xB2\xC2\xA0x"),
              ElementsAre("\xD0\x9F\xD1\x80", "\xC2\xB2", "\xC2\xA0", "x"));
}

TEST(PreTokenizerTest, InvalidUtf8BecomesReplacementCharacters) {
  EXPECT_THAT(Split(PreTokenizerKind::kGpt2, "a\xFF\xC3"),
              ElementsAre("a", "\xEF\xBF\xBD\xEF\xBF\xBD"));
}

TEST(PreTokenizerTest, GgufNames) {
  EXPECT_EQ(PreTokenizerFromGgufName("llama-bpe"), PreTokenizerKind::kLlama3);
  EXPECT_EQ(PreTokenizerFromGgufName("llama3"), PreTokenizerKind::kLlama3);
  EXPECT_EQ(PreTokenizerFromGgufName("qwen2"), PreTokenizerKind::kQwen2);
  EXPECT_EQ(PreTokenizerFromGgufName("gpt-2"), PreTokenizerKind::kGpt2);
  EXPECT_EQ(PreTokenizerFromGgufName("smollm"), PreTokenizerKind::kDigitsThenGpt2);
  EXPECT_EQ(PreTokenizerFromGgufName("default"), PreTokenizerKind::kDefault);
  EXPECT_EQ(PreTokenizerFromGgufName("made-up"), std::nullopt);
}

}  // namespace
}  // namespace morphserve::engine
