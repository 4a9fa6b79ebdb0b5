// llama.cpp's tokenizer test vectors (test-tokenizer-0) for the three fixture
// vocabularies, plus decoding round trips over the same strings.
#include <string>
#include <vector>

#include "engine/tokenizer/incremental_detokenizer.h"
#include "engine/tokenizer/tokenizer.h"
#include "engine/tokenizer/unicode.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/engine/tokenizer/fixtures.h"

namespace morphserve::engine {
namespace {

using ::testing::ElementsAreArray;
using testing::FixtureTokenizer;
using testing::LoadVocabCases;

class FixtureVectorsTest : public ::testing::TestWithParam<std::string> {};

TEST_P(FixtureVectorsTest, AllVectorsMatchLlamaCpp) {
  const Tokenizer& tok = FixtureTokenizer(GetParam());
  const std::vector<testing::VocabCase> cases = LoadVocabCases(GetParam());
  ASSERT_EQ(cases.size(), 46u);
  int passed = 0;
  for (const testing::VocabCase& c : cases) {
    const std::vector<int32_t> ids = tok.Encode(c.text, /*add_special=*/false,
                                                /*parse_special=*/false);
    EXPECT_THAT(ids, ElementsAreArray(c.ids)) << "text: '" << c.text << "'";
    passed += ids == c.ids;
  }
  EXPECT_EQ(passed, 46) << GetParam();
}

TEST_P(FixtureVectorsTest, DecodeRestoresTheText) {
  const Tokenizer& tok = FixtureTokenizer(GetParam());
  for (const testing::VocabCase& c : LoadVocabCases(GetParam())) {
    EXPECT_EQ(tok.Decode(c.ids), c.text);
    // With BOS (and EOS where the model adds it) the text is the same.
    EXPECT_EQ(tok.Decode(tok.Encode(c.text, /*add_special=*/true, /*parse_special=*/false)),
              c.text);
  }
}

TEST_P(FixtureVectorsTest, IncrementalDecodingMatchesDecode) {
  const Tokenizer& tok = FixtureTokenizer(GetParam());
  for (const testing::VocabCase& c : LoadVocabCases(GetParam())) {
    IncrementalDetokenizer detok(tok);
    std::string streamed;
    for (int32_t id : c.ids) {
      const std::string chunk = detok.Push(id);
      EXPECT_TRUE(unicode::IsValidUtf8(chunk)) << "text: '" << c.text << "'";
      streamed += chunk;
    }
    const std::string tail = detok.Flush();
    EXPECT_TRUE(tail.empty());
    streamed += tail;
    EXPECT_EQ(streamed, tok.Decode(c.ids)) << "text: '" << c.text << "'";
  }
}

// The prompts of the greedy-decoding golden data were tokenized by llama.cpp
// with BOS, and its continuation pieces were rendered by token_to_piece.
TEST(GoldenPromptsTest, MatchLlamaCpp) {
  const std::string dir = MORPHSERVE_FIXTURES_DIR;
  auto file = GgufFile::Open(dir + "/models/llama-2-tiny-random.gguf");
  ASSERT_TRUE(file.ok()) << file.status();
  auto tok = Tokenizer::FromGguf(**file);
  ASSERT_TRUE(tok.ok()) << tok.status();
  const nlohmann::json golden = nlohmann::json::parse(
      testing::ReadFileOrDie(dir + "/golden/llama-2-tiny-random.golden.json"));
  ASSERT_EQ(golden["cases"].size(), 8u);
  for (const nlohmann::json& c : golden["cases"]) {
    const std::string prompt = c["prompt"].get<std::string>();
    EXPECT_EQ((*tok)->Encode(prompt, /*add_special=*/true, /*parse_special=*/false),
              c["prompt_tokens"].get<std::vector<int32_t>>())
        << prompt;
    std::string continuation;
    for (int32_t id : c["greedy_tokens"].get<std::vector<int32_t>>()) {
      continuation += (*tok)->TokenToPiece(id);
    }
    EXPECT_EQ(continuation, c["continuation_text"].get<std::string>());
  }
}

INSTANTIATE_TEST_SUITE_P(Vocabs, FixtureVectorsTest,
                         ::testing::Values("llama-spm", "llama-bpe", "gpt-2"),
                         [](const auto& param_info) {
                           std::string name = param_info.param;
                           for (char& ch : name) {
                             if (ch == '-') ch = '_';
                           }
                           return name;
                         });

}  // namespace
}  // namespace morphserve::engine
