// Special tokens, BOS/EOS rules, pieces and decoding on the fixture
// vocabularies.
#include <chrono>
#include <random>
#include <string>
#include <vector>

#include "engine/tokenizer/tokenizer.h"
#include "engine/tokenizer/unicode.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/engine/tokenizer/fixtures.h"

namespace morphserve::engine {
namespace {

using ::testing::ElementsAre;
using testing::FixtureTokenizer;
using ::testing::HasSubstr;
using ::testing::Not;

TEST(TokenizerApiTest, DescribesTheFixtureVocabularies) {
  const Tokenizer& spm = FixtureTokenizer("llama-spm");
  EXPECT_EQ(spm.model_name(), "llama");
  EXPECT_EQ(spm.vocab_size(), 32000);
  EXPECT_EQ(spm.bos_id(), 1);
  EXPECT_EQ(spm.eos_id(), 2);
  EXPECT_EQ(spm.unk_id(), 0);
  EXPECT_TRUE(spm.add_bos());
  EXPECT_FALSE(spm.add_eos());
  EXPECT_TRUE(spm.add_space_prefix());

  const Tokenizer& bpe = FixtureTokenizer("llama-bpe");
  EXPECT_EQ(bpe.model_name(), "gpt2");
  EXPECT_EQ(bpe.pre_tokenizer_name(), "llama-bpe");
  EXPECT_EQ(bpe.vocab_size(), 128256);
  EXPECT_EQ(bpe.bos_id(), 128000);
  EXPECT_EQ(bpe.eos_id(), 128001);
  EXPECT_TRUE(bpe.add_bos());  // forced for llama-bpe although absent from the file
  EXPECT_FALSE(bpe.add_space_prefix());

  const Tokenizer& gpt2 = FixtureTokenizer("gpt-2");
  EXPECT_EQ(gpt2.pre_tokenizer_name(), "gpt-2");
  EXPECT_EQ(gpt2.bos_id(), 50256);
  EXPECT_FALSE(gpt2.add_bos());
  EXPECT_TRUE(gpt2.chat_template().empty());
}

TEST(TokenizerApiTest, AddSpecialFollowsEachModel) {
  EXPECT_THAT(FixtureTokenizer("llama-spm").Encode("Hello world", true, false),
              ElementsAre(1, 15043, 3186));
  EXPECT_THAT(FixtureTokenizer("llama-spm").Encode("", true, false), ElementsAre(1));
  EXPECT_THAT(FixtureTokenizer("llama-bpe").Encode("Hello", true, false),
              ElementsAre(128000, 9906));
  EXPECT_THAT(FixtureTokenizer("gpt-2").Encode("Hello", true, false), ElementsAre(15496));
  EXPECT_THAT(FixtureTokenizer("gpt-2").Encode("", true, false), ElementsAre());
}

TEST(TokenizerApiTest, ParseSpecialControlsControlTokens) {
  const Tokenizer& spm = FixtureTokenizer("llama-spm");
  // A special token is followed by a fresh space prefix, as in llama.cpp.
  EXPECT_THAT(spm.Encode("<s>Hello", false, true), ElementsAre(1, 15043));
  EXPECT_THAT(spm.Encode("<s>Hello", false, false), Not(::testing::Contains(1)));

  const Tokenizer& bpe = FixtureTokenizer("llama-bpe");
  EXPECT_THAT(bpe.Encode("<|eot_id|>", false, true), ElementsAre(128009));
  EXPECT_THAT(bpe.Encode("Hello<|eot_id|> world", false, true), ElementsAre(9906, 128009, 1917));
  EXPECT_THAT(bpe.Encode("<|eot_id|>", false, false), Not(::testing::Contains(128009)));
  // With add_special and a BOS already in the text, BOS appears twice (as
  // llama.cpp does); callers use ChatTemplate::adds_bos_in_text to avoid it.
  EXPECT_THAT(bpe.Encode("<|begin_of_text|>Hi", true, true), ElementsAre(128000, 128000, 13347));

  const Tokenizer& gpt2 = FixtureTokenizer("gpt-2");
  EXPECT_THAT(gpt2.Encode("a<|endoftext|>b", false, true), ElementsAre(64, 50256, 65));
}

TEST(TokenizerApiTest, EndOfGenerationAndControl) {
  const Tokenizer& bpe = FixtureTokenizer("llama-bpe");
  EXPECT_TRUE(bpe.IsEndOfGeneration(128001));  // EOS
  EXPECT_TRUE(bpe.IsEndOfGeneration(128009));  // <|eot_id|>
  EXPECT_FALSE(bpe.IsEndOfGeneration(128000));
  EXPECT_FALSE(bpe.IsEndOfGeneration(9906));
  EXPECT_FALSE(bpe.IsEndOfGeneration(-1));
  EXPECT_THAT(bpe.end_of_generation_ids(), ElementsAre(128001, 128009));
  EXPECT_TRUE(bpe.IsControl(128006));
  EXPECT_FALSE(bpe.IsControl(9906));
  EXPECT_FALSE(bpe.IsControl(1 << 30));

  const Tokenizer& spm = FixtureTokenizer("llama-spm");
  EXPECT_THAT(spm.end_of_generation_ids(), ElementsAre(2));
  EXPECT_EQ(spm.GetTokenType(0), TokenType::kUnknown);
  EXPECT_EQ(spm.GetTokenType(13), TokenType::kByte);
}

TEST(TokenizerApiTest, PiecesAreRawBytes) {
  const Tokenizer& spm = FixtureTokenizer("llama-spm");
  EXPECT_EQ(spm.TokenToPiece(15043), " Hello");
  EXPECT_EQ(spm.TokenToPiece(13), "\n");
  EXPECT_EQ(spm.TokenToPiece(231), "\xE4");  // one byte of a UTF-8 character
  EXPECT_EQ(spm.TokenToPiece(1), "");
  EXPECT_EQ(spm.TokenToPiece(1, /*render_special=*/true), "<s>");
  EXPECT_EQ(spm.TokenToPiece(0), "");
  EXPECT_EQ(spm.TokenText(15043), "\xE2\x96\x81Hello");

  const Tokenizer& bpe = FixtureTokenizer("llama-bpe");
  EXPECT_EQ(bpe.TokenToPiece(1917), " world");
  EXPECT_EQ(bpe.TokenToPiece(128009), "");
  EXPECT_EQ(bpe.TokenToPiece(128009, true), "<|eot_id|>");
  EXPECT_EQ(bpe.TokenText(1917), "\xC4\xA0world");
}

TEST(TokenizerApiTest, DecodeHandlesTheSpacePrefix) {
  const Tokenizer& spm = FixtureTokenizer("llama-spm");
  const std::vector<int32_t> ids = {1, 15043, 3186};
  EXPECT_EQ(spm.Decode(ids), "Hello world");
  EXPECT_EQ(spm.Decode(ids, Tokenizer::LeadingSpace::kKeep), " Hello world");
  EXPECT_EQ(spm.Decode(spm.Encode("  two spaces", true, false)), "  two spaces");
  // Byte-level models never strip.
  const Tokenizer& bpe = FixtureTokenizer("llama-bpe");
  EXPECT_EQ(bpe.Decode(bpe.Encode(" world", true, false)), " world");
}

TEST(TokenizerApiTest, InvalidIdsNeverCrash) {
  for (const char* name : {"llama-spm", "llama-bpe", "gpt-2"}) {
    const Tokenizer& tok = FixtureTokenizer(name);
    const int32_t n = tok.vocab_size();
    EXPECT_EQ(tok.TokenToPiece(-1), "");
    EXPECT_EQ(tok.TokenToPiece(n), "");
    EXPECT_EQ(tok.TokenText(n), "");
    EXPECT_EQ(tok.GetTokenType(-7), TokenType::kUndefined);
    const std::vector<int32_t> bad = {-5, n, INT32_MAX, INT32_MIN};
    EXPECT_EQ(tok.Decode(bad), "");
    const absl::Status status = tok.ValidateIds(bad);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(status.message()), HasSubstr("-5"));
    const std::vector<int32_t> good = {0, n - 1};
    EXPECT_TRUE(tok.ValidateIds(good).ok());
  }
}

TEST(TokenizerApiTest, FindToken) {
  const Tokenizer& bpe = FixtureTokenizer("llama-bpe");
  EXPECT_EQ(bpe.FindToken("<|eot_id|>"), 128009);
  EXPECT_EQ(bpe.FindToken("\xC4\xA0world"), 1917);
  EXPECT_EQ(bpe.FindToken("no such token here"), std::nullopt);
}

// Random text, valid UTF-8 or not, never crashes, and valid UTF-8 survives
// the round trip exactly. (U+2581 is left out: SentencePiece-style models
// read it as a space by design.)
TEST(TokenizerApiTest, RandomInputRoundTrips) {
  // clang-format off
  const std::vector<std::string> alphabet = {
      "a", "Z", "7", " ", "  ", "\n", "\t", "\r\n", "'s", "!", "\xC3\xA9", "\xE4\xBD\xA0",
      "\xF0\x9F\xA6\x99", "<s>", "</s>", "<|eot_id|>", "<|endoftext|>", "\xC2\xA0",
      "\xE3\x80\x80", "\x80", "\xC3", "\xFF", "\xED\xA0\x80"};
  // clang-format on
  std::mt19937 rng(1234);
  for (const char* name : {"llama-spm", "llama-bpe", "gpt-2"}) {
    const Tokenizer& tok = FixtureTokenizer(name);
    for (int i = 0; i < 300; ++i) {
      std::string text;
      const int n = static_cast<int>(rng() % 24);
      for (int k = 0; k < n; ++k) text += alphabet[rng() % alphabet.size()];
      for (bool parse_special : {false, true}) {
        const std::vector<int32_t> ids = tok.Encode(text, /*add_special=*/true, parse_special);
        EXPECT_TRUE(tok.ValidateIds(ids).ok());
        const std::string decoded = tok.Decode(ids);
        if (!parse_special && unicode::IsValidUtf8(text)) {
          EXPECT_EQ(decoded, text) << name;
        }
      }
    }
  }
}

TEST(TokenizerApiTest, LongInputEncodesQuickly) {
  std::string text;
  while (text.size() < 60000) {
    text +=
        "The quick brown fox, 1234567 times! Привет 你好 🦙\n\tdef f(x): return x**2\n";
  }
  for (const char* name : {"llama-spm", "llama-bpe", "gpt-2"}) {
    const Tokenizer& tok = FixtureTokenizer(name);
    const auto start = std::chrono::steady_clock::now();
    const std::vector<int32_t> ids = tok.Encode(text, true, false);
    const double ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
    EXPECT_GT(ids.size(), 10000u);
    EXPECT_EQ(tok.Decode(ids), text);
    // Milliseconds in practice; the bound only catches quadratic behaviour.
    EXPECT_LT(ms, 2000.0) << name;
  }
}

}  // namespace
}  // namespace morphserve::engine
