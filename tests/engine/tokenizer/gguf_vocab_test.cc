// Tokenizer::FromGguf on small hand-built vocabularies: metadata defaults,
// special-token handling and every kind of broken metadata.
#include <string>
#include <vector>

#include "engine/tokenizer/tokenizer.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/engine/tokenizer/fixtures.h"
#include "tests/testing/gguf_builder.h"

namespace morphserve::engine {
namespace {

using ::testing::ElementsAre;
using morphserve::testing::GgufBuilder;
using ::testing::HasSubstr;

// Byte-level alphabet entries used below: "Ġ" is the space byte.
const std::vector<std::string> kBpeTokens = {
    "a",
    "b",
    "c",
    "\xC4\xA0",
    "ab",
    "abc",
    "\xC4\xA0"
    "a",
    "<|endoftext|>",
    "<tool>",
    "<|user|>",
};
const std::vector<int32_t> kBpeTypes = {1, 1, 1, 1, 1, 1, 1, 3, 4, 3};

GgufBuilder BpeVocab() {
  GgufBuilder b;
  b.SetString("tokenizer.ggml.model", "gpt2")
      .SetString("tokenizer.ggml.pre", "gpt-2")
      .SetStringArray("tokenizer.ggml.tokens", kBpeTokens)
      .SetI32Array("tokenizer.ggml.token_type", kBpeTypes)
      .SetStringArray("tokenizer.ggml.merges", {"a b", "ab c", "\xC4\xA0 a"});
  return b;
}

absl::StatusOr<std::unique_ptr<Tokenizer>> Load(const GgufBuilder& builder) {
  const std::vector<uint8_t> bytes = builder.Build();
  auto file = GgufFile::Parse(bytes);
  if (!file.ok()) return file.status();
  return Tokenizer::FromGguf(**file);
}

std::string ErrorOf(GgufBuilder builder) {
  auto tok = Load(builder);
  EXPECT_FALSE(tok.ok());
  return tok.ok() ? "" : std::string(tok.status().message());
}

TEST(GgufVocabTest, BytePairMergesByRank) {
  GgufBuilder b = BpeVocab();
  auto tok = Load(b);
  ASSERT_TRUE(tok.ok()) << tok.status();
  // " ab": (a, b) outranks (Ġ, a), and (Ġ, ab) is no merge.
  EXPECT_THAT((*tok)->Encode("abc ab a", false, false), ElementsAre(5, 3, 4, 6));
  EXPECT_THAT((*tok)->Encode("cab", false, false), ElementsAre(2, 4));
  // Characters that are not tokens are dropped, as in llama.cpp.
  EXPECT_THAT((*tok)->Encode("ad", false, false), ElementsAre(0));
  EXPECT_EQ((*tok)->bos_id(), -1);
  EXPECT_FALSE((*tok)->add_bos());
  EXPECT_EQ((*tok)->Decode((*tok)->Encode("abc ab", false, false)), "abc ab");
}

TEST(GgufVocabTest, UserDefinedTokensAreAlwaysMatched) {
  GgufBuilder b = BpeVocab();
  auto tok = Load(b);
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_THAT((*tok)->Encode("a<tool>b", false, false), ElementsAre(0, 8, 1));
  EXPECT_THAT((*tok)->Encode("a<|user|>b", false, true), ElementsAre(0, 9, 1));
  // User-defined pieces render as their text; control pieces do not.
  EXPECT_EQ((*tok)->TokenToPiece(8), "<tool>");
  EXPECT_EQ((*tok)->TokenToPiece(9), "");
  EXPECT_TRUE((*tok)->IsEndOfGeneration(7));  // <|endoftext|>
}

TEST(GgufVocabTest, BosEosAndExtraEndOfGenerationKeys) {
  GgufBuilder b = BpeVocab();
  b.SetU32("tokenizer.ggml.bos_token_id", 7)
      .SetU32("tokenizer.ggml.eos_token_id", 7)
      .SetU32("tokenizer.ggml.eot_token_id", 9)
      .SetBool("tokenizer.ggml.add_bos_token", true)
      .SetBool("tokenizer.ggml.add_eos_token", true)
      .SetString("tokenizer.chat_template", "{{ messages }}");
  auto tok = Load(b);
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_THAT((*tok)->Encode("ab", true, false), ElementsAre(7, 4, 7));
  EXPECT_THAT((*tok)->end_of_generation_ids(), ElementsAre(7, 9));
  EXPECT_EQ((*tok)->chat_template(), "{{ messages }}");
}

TEST(GgufVocabTest, Phi3SpecialTokensSwallowFollowingWhitespace) {
  GgufBuilder b = BpeVocab();
  b.SetString("general.name", "Phi-3-mini-4k-instruct");
  auto tok = Load(b);
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_THAT((*tok)->Encode("<|user|>\n a", false, true), ElementsAre(9, 0));
  // <|endoftext|> keeps the whitespace after it.
  EXPECT_THAT((*tok)->Encode("<|endoftext|> a", false, true), ElementsAre(7, 6));
}

TEST(GgufVocabTest, SentencePieceDefaults) {
  GgufBuilder b;
  b.SetString("tokenizer.ggml.model", "llama")
      .SetStringArray("tokenizer.ggml.tokens", {"<unk>", "<s>", "</s>", "\xE2\x96\x81", "a",
                                             "\xE2\x96\x81"
                                             "a",
                                             "<0x62>"})
      .SetF32Array("tokenizer.ggml.scores", {0, 0, 0, -1, -2, -0.5f, 0})
      .SetI32Array("tokenizer.ggml.token_type", {2, 3, 3, 1, 1, 1, 6});
  auto tok = Load(b);
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_TRUE((*tok)->add_bos());
  EXPECT_TRUE((*tok)->add_space_prefix());
  EXPECT_THAT((*tok)->Encode("a b", true, false), ElementsAre(1, 5, 3, 6));
  EXPECT_EQ((*tok)->Decode((*tok)->Encode("a b", true, false)), "a b");
  // No byte token for 'z' and no single-byte token: the unknown token.
  EXPECT_THAT((*tok)->Encode("z", false, false), ElementsAre(3, 0));

  GgufBuilder no_prefix = b;
  no_prefix.SetBool("tokenizer.ggml.add_space_prefix", false)
      .SetBool("tokenizer.ggml.add_bos_token", false);
  auto tok2 = Load(no_prefix);
  ASSERT_TRUE(tok2.ok()) << tok2.status();
  EXPECT_THAT((*tok2)->Encode("a b", true, false), ElementsAre(4, 3, 6));
}

TEST(GgufVocabTest, BrokenMetadataIsReported) {
  EXPECT_THAT(ErrorOf(GgufBuilder()), HasSubstr("tokenizer.ggml.model"));

  GgufBuilder unknown_model;
  unknown_model.SetString("tokenizer.ggml.model", "bert").SetStringArray("tokenizer.ggml.tokens", {"a"});
  EXPECT_THAT(ErrorOf(unknown_model), HasSubstr("unsupported tokenizer model 'bert'"));

  GgufBuilder no_tokens;
  no_tokens.SetString("tokenizer.ggml.model", "llama");
  EXPECT_THAT(ErrorOf(no_tokens), HasSubstr("tokenizer.ggml.tokens"));

  GgufBuilder tokens_not_strings;
  tokens_not_strings.SetString("tokenizer.ggml.model", "llama")
      .SetI32Array("tokenizer.ggml.tokens", {1, 2});
  EXPECT_THAT(ErrorOf(tokens_not_strings), HasSubstr("tokenizer.ggml.tokens"));

  GgufBuilder short_scores;
  short_scores.SetString("tokenizer.ggml.model", "llama")
      .SetStringArray("tokenizer.ggml.tokens", {"a", "b"})
      .SetF32Array("tokenizer.ggml.scores", {0});
  EXPECT_THAT(ErrorOf(short_scores), HasSubstr("tokenizer.ggml.scores"));

  GgufBuilder short_types;
  short_types.SetString("tokenizer.ggml.model", "llama")
      .SetStringArray("tokenizer.ggml.tokens", {"a", "b"})
      .SetI32Array("tokenizer.ggml.token_type", {1, 1, 1});
  EXPECT_THAT(ErrorOf(short_types), HasSubstr("tokenizer.ggml.token_type"));

  GgufBuilder no_merges;
  no_merges.SetString("tokenizer.ggml.model", "gpt2").SetStringArray("tokenizer.ggml.tokens", {"a"});
  EXPECT_THAT(ErrorOf(no_merges), HasSubstr("tokenizer.ggml.merges"));

  GgufBuilder bad_merge = BpeVocab();
  bad_merge.SetStringArray("tokenizer.ggml.merges", {"ab"});
  // A second merges key is a duplicate, which the GGUF parser rejects; build
  // the vocabulary afresh instead.
  GgufBuilder bad_merge_line;
  bad_merge_line.SetString("tokenizer.ggml.model", "gpt2")
      .SetStringArray("tokenizer.ggml.tokens", {"a", "b", "ab"})
      .SetStringArray("tokenizer.ggml.merges", {"a b", "ab"});
  EXPECT_THAT(ErrorOf(bad_merge_line), HasSubstr("tokenizer.ggml.merges"));
  EXPECT_FALSE(Load(bad_merge).ok());

  GgufBuilder unknown_pre;
  unknown_pre.SetString("tokenizer.ggml.model", "gpt2")
      .SetString("tokenizer.ggml.pre", "no-such-pre")
      .SetStringArray("tokenizer.ggml.tokens", {"a"})
      .SetStringArray("tokenizer.ggml.merges", {});
  EXPECT_THAT(ErrorOf(unknown_pre), HasSubstr("unknown pre-tokenizer type 'no-such-pre'"));

  GgufBuilder bos_out_of_range = BpeVocab();
  bos_out_of_range.SetU32("tokenizer.ggml.bos_token_id", 1000);
  EXPECT_THAT(ErrorOf(bos_out_of_range), HasSubstr("tokenizer.ggml.bos_token_id"));

  GgufBuilder add_bos_without_bos = BpeVocab();
  add_bos_without_bos.SetBool("tokenizer.ggml.add_bos_token", true);
  EXPECT_THAT(ErrorOf(add_bos_without_bos), HasSubstr("bos_token_id is not set"));

  GgufBuilder duplicate;
  duplicate.SetString("tokenizer.ggml.model", "llama")
      .SetStringArray("tokenizer.ggml.tokens", {"a", "b", "a"});
  EXPECT_THAT(ErrorOf(duplicate), HasSubstr("duplicate token 'a'"));

  GgufBuilder wrong_type = BpeVocab();
  wrong_type.SetString("tokenizer.ggml.add_bos_token", "yes");
  EXPECT_THAT(ErrorOf(wrong_type), HasSubstr("tokenizer.ggml.add_bos_token"));
}

TEST(GgufVocabTest, TruncatedFilesNeverCrash) {
  const std::vector<uint8_t> bytes = BpeVocab().Build();
  for (size_t n = 0; n < bytes.size(); n += 7) {
    const std::vector<uint8_t> prefix(bytes.begin(), bytes.begin() + n);
    auto file = GgufFile::Parse(prefix);
    if (file.ok()) {
      EXPECT_FALSE(Tokenizer::FromGguf(**file).ok());
    }
  }
}

}  // namespace
}  // namespace morphserve::engine
