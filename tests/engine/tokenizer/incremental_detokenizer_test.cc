#include "engine/tokenizer/incremental_detokenizer.h"

#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/engine/tokenizer/fixtures.h"

namespace morphserve::engine {
namespace {

using ::testing::ElementsAre;
using testing::FixtureTokenizer;

// llama-spm byte tokens are <0xNN> at id 3 + NN.
constexpr int32_t Byte(int b) { return 3 + b; }

std::vector<std::string> PushAll(IncrementalDetokenizer& detok, const std::vector<int32_t>& ids) {
  std::vector<std::string> chunks;
  for (int32_t id : ids) chunks.push_back(detok.Push(id));
  chunks.push_back(detok.Flush());
  return chunks;
}

TEST(IncrementalDetokenizerTest, HoldsBackPartialCharacters) {
  IncrementalDetokenizer detok(FixtureTokenizer("llama-spm"));
  // "你" (E4 BD A0) arrives one byte token at a time.
  EXPECT_THAT(PushAll(detok, {Byte(0xE4), Byte(0xBD), Byte(0xA0), Byte('!')}),
              ElementsAre("", "", "\xE4\xBD\xA0", "!", ""));
}

TEST(IncrementalDetokenizerTest, InvalidBytesBecomeReplacementCharacters) {
  IncrementalDetokenizer detok(FixtureTokenizer("llama-spm"));
  // E4 BD then 'x': the broken character is replaced as soon as 'x' shows it
  // cannot complete; a lone continuation byte is replaced at once.
  EXPECT_THAT(PushAll(detok, {Byte(0xE4), Byte(0xBD), Byte('x'), Byte(0x80)}),
              ElementsAre("", "", "\xEF\xBF\xBDx", "\xEF\xBF\xBD", ""));
}

TEST(IncrementalDetokenizerTest, FlushReplacesAnUnfinishedCharacter) {
  IncrementalDetokenizer detok(FixtureTokenizer("llama-spm"));
  EXPECT_THAT(PushAll(detok, {Byte('a'), Byte(0xF0), Byte(0x9F)}),
              ElementsAre("a", "", "", "\xEF\xBF\xBD"));
}

TEST(IncrementalDetokenizerTest, LeadingSpaceMatchesDecode) {
  const Tokenizer& tok = FixtureTokenizer("llama-spm");
  const std::vector<int32_t> ids = {1, 15043, 3186};  // <s> Hello world
  IncrementalDetokenizer strip(tok);
  EXPECT_THAT(PushAll(strip, ids), ElementsAre("", "Hello", " world", ""));
  IncrementalDetokenizer keep(tok, Tokenizer::LeadingSpace::kKeep);
  EXPECT_THAT(PushAll(keep, ids), ElementsAre("", " Hello", " world", ""));
}

TEST(IncrementalDetokenizerTest, ByteLevelPiecesSplitInsideCharacters) {
  const Tokenizer& tok = FixtureTokenizer("gpt-2");
  // GPT-2 spells the llama emoji with byte-level tokens that end mid-character.
  const std::vector<int32_t> ids = tok.Encode("\xF0\x9F\xA6\x99 ok", false, false);
  ASSERT_GT(ids.size(), 2u);
  IncrementalDetokenizer detok(tok);
  std::string all;
  for (int32_t id : ids) {
    const std::string chunk = detok.Push(id);
    if (all.empty()) {
      EXPECT_TRUE(chunk.empty() || chunk == "\xF0\x9F\xA6\x99");
    }
    all += chunk;
  }
  all += detok.Flush();
  EXPECT_EQ(all, "\xF0\x9F\xA6\x99 ok");
}

TEST(IncrementalDetokenizerTest, InvalidIdsAddNothing) {
  IncrementalDetokenizer detok(FixtureTokenizer("llama-bpe"));
  EXPECT_EQ(detok.Push(-1), "");
  EXPECT_EQ(detok.Push(1 << 30), "");
  EXPECT_EQ(detok.Flush(), "");
}

}  // namespace
}  // namespace morphserve::engine
