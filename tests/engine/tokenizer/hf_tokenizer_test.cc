// Tokenizer::FromHuggingFace on tokenizer.json files written by the test:
// small hand-made vocabularies, the three fixture vocabularies converted
// from GGUF (which must reproduce llama.cpp's test vectors), and broken
// files.
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <tuple>
#include <vector>

#include "engine/tokenizer/tokenizer.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/engine/tokenizer/fixtures.h"

namespace morphserve::engine {
namespace {

using ::testing::ElementsAre;
using ::testing::ElementsAreArray;
using ::testing::HasSubstr;
using Json = nlohmann::json;

constexpr char kSpace[] = "\xE2\x96\x81";  // U+2581
constexpr char kLlama3Regex[] =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|)"
    R"( ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

// A fresh directory per model, removed at the end of the test.
class ModelDir {
 public:
  ModelDir() {
    static std::atomic<int> counter{0};
    path_ = std::filesystem::path(::testing::TempDir()) /
            ("hf_tokenizer_test_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    std::filesystem::create_directories(path_);
  }
  ~ModelDir() { std::filesystem::remove_all(path_); }

  void Write(const std::string& name, const std::string& text) const {
    std::ofstream(path_ / name, std::ios::binary) << text;
  }
  void Write(const std::string& name, const Json& json) const { Write(name, json.dump()); }
  std::string path() const { return path_.string(); }

 private:
  std::filesystem::path path_;
};

Json ByteLevelPre() {
  return {{"type", "ByteLevel"},
          {"add_prefix_space", false},
          {"trim_offsets", true},
          {"use_regex", true}};
}

Json SmallByteLevel() {
  return {
      {"version", "1.0"},
      {"added_tokens", Json::array({{{"id", 7}, {"content", "<|endoftext|>"}, {"special", true}}})},
      {"normalizer", nullptr},
      {"pre_tokenizer", ByteLevelPre()},
      {"model",
       {{"type", "BPE"},
        {"vocab",
         {{"a", 0},
          {"b", 1},
          {"c", 2},
          {"\xC4\xA0", 3},
          {"ab", 4},
          {"abc", 5},
          {"\xC4\xA0"
           "a",
           6},
          {"<|endoftext|>", 7}}},
        {"merges", Json::array({"a b", Json::array({"ab", "c"}), "\xC4\xA0 a"})}}},
  };
}

// SentencePiece-style vocabulary as Llama 2's tokenizer.json spells it:
// <unk> <s> </s>, 256 byte tokens, then pieces.
Json SmallSentencePiece(const Json& normalizer, const Json& pre_tokenizer) {
  Json vocab = {{"<unk>", 0}, {"<s>", 1}, {"</s>", 2}};
  char name[8];
  for (int b = 0; b < 256; ++b) {
    std::snprintf(name, sizeof(name), "<0x%02X>", b);
    vocab[name] = 3 + b;
  }
  const std::string space = kSpace;
  vocab[space] = 259;
  vocab["a"] = 260;
  vocab[space + "a"] = 261;
  vocab["b"] = 262;
  return {
      {"added_tokens", Json::array({{{"id", 0}, {"content", "<unk>"}, {"special", true}},
                                    {{"id", 1}, {"content", "<s>"}, {"special", true}},
                                    {{"id", 2}, {"content", "</s>"}, {"special", true}}})},
      {"normalizer", normalizer},
      {"pre_tokenizer", pre_tokenizer},
      {"model",
       {{"type", "BPE"},
        {"byte_fallback", true},
        {"unk_token", "<unk>"},
        {"vocab", vocab},
        {"merges", Json::array({space + " a"})}}},
  };
}

Json LegacyLlamaNormalizer() {
  return {
      {"type", "Sequence"},
      {"normalizers",
       Json::array({{{"type", "Prepend"}, {"prepend", kSpace}},
                    {{"type", "Replace"}, {"pattern", {{"String", " "}}}, {"content", kSpace}}})}};
}

const Json kLlamaConfig = {{"bos_token", "<s>"},
                           {"eos_token", {{"content", "</s>"}, {"lstrip", false}}},
                           {"add_bos_token", true},
                           {"add_eos_token", false}};

absl::StatusOr<std::unique_ptr<Tokenizer>> Load(const Json& tokenizer, const Json& config = {}) {
  ModelDir dir;
  dir.Write("tokenizer.json", tokenizer);
  if (!config.is_null()) dir.Write("tokenizer_config.json", config);
  return Tokenizer::FromHuggingFace(dir.path());
}

std::string ErrorOf(const Json& tokenizer, const Json& config = {}) {
  auto tok = Load(tokenizer, config);
  EXPECT_FALSE(tok.ok());
  return tok.ok() ? "" : std::string(tok.status().message());
}

TEST(HfTokenizerTest, ByteLevelBpe) {
  auto tok = Load(SmallByteLevel());
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_EQ((*tok)->model_name(), "gpt2");
  EXPECT_EQ((*tok)->pre_tokenizer_name(), "gpt-2");
  EXPECT_THAT((*tok)->Encode("abc ab a", false, false), ElementsAre(5, 3, 4, 6));
  EXPECT_THAT((*tok)->Encode("a<|endoftext|>c", false, true), ElementsAre(0, 7, 2));
  EXPECT_TRUE((*tok)->IsControl(7));
  EXPECT_TRUE((*tok)->IsEndOfGeneration(7));
  EXPECT_FALSE((*tok)->add_bos());
  EXPECT_EQ((*tok)->Decode((*tok)->Encode("abc ab a", false, false)), "abc ab a");
}

TEST(HfTokenizerTest, ByteLevelPrefixSpace) {
  Json j = SmallByteLevel();
  j["pre_tokenizer"]["add_prefix_space"] = true;
  auto tok = Load(j);
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_THAT((*tok)->Encode("a", false, false), ElementsAre(6));
}

TEST(HfTokenizerTest, SentencePieceWithByteFallback) {
  auto tok = Load(SmallSentencePiece(LegacyLlamaNormalizer(), nullptr), kLlamaConfig);
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_EQ((*tok)->model_name(), "llama");
  EXPECT_TRUE((*tok)->add_bos());
  EXPECT_EQ((*tok)->bos_id(), 1);
  EXPECT_EQ((*tok)->eos_id(), 2);
  EXPECT_EQ((*tok)->unk_id(), 0);
  EXPECT_THAT((*tok)->Encode("a ab", true, false), ElementsAre(1, 261, 261, 262));
  // 'é' is not a piece: its two UTF-8 bytes become byte tokens.
  EXPECT_THAT((*tok)->Encode("\xC3\xA9", false, false), ElementsAre(259, 3 + 0xC3, 3 + 0xA9));
  EXPECT_EQ((*tok)->Decode((*tok)->Encode("\xC3\xA9 a", true, false)), "\xC3\xA9 a");
  // After a special token the text gets its own space prefix.
  EXPECT_THAT((*tok)->Encode("<s>a", false, true), ElementsAre(1, 261));
}

TEST(HfTokenizerTest, MetaspacePrependSchemes) {
  Json metaspace = {{"type", "Metaspace"},
                    {"replacement", kSpace},
                    {"prepend_scheme", "first"},
                    {"split", false}};
  auto first = Load(SmallSentencePiece(nullptr, metaspace), kLlamaConfig);
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_THAT((*first)->Encode("a", false, false), ElementsAre(261));
  EXPECT_THAT((*first)->Encode("<s>a", false, true), ElementsAre(1, 260));

  metaspace["prepend_scheme"] = "always";
  auto always = Load(SmallSentencePiece(nullptr, metaspace), kLlamaConfig);
  ASSERT_TRUE(always.ok()) << always.status();
  EXPECT_THAT((*always)->Encode("<s>a", false, true), ElementsAre(1, 261));

  metaspace["prepend_scheme"] = "never";
  auto never = Load(SmallSentencePiece(nullptr, metaspace), kLlamaConfig);
  ASSERT_TRUE(never.ok()) << never.status();
  EXPECT_THAT((*never)->Encode("a", false, false), ElementsAre(260));
  EXPECT_EQ((*never)->Decode((*never)->Encode(" a", false, false)), " a");
}

TEST(HfTokenizerTest, ConfigFilesAreRead) {
  ModelDir dir;
  dir.Write("tokenizer.json", SmallByteLevel());
  dir.Write("tokenizer_config.json",
            Json{{"bos_token", "ab"},
                 {"eos_token", "<|endoftext|>"},
                 {"add_bos_token", true},
                 {"chat_template", Json::array({{{"name", "tool_use"}, {"template", "T"}},
                                                {{"name", "default"}, {"template", "D"}}})}});
  dir.Write("generation_config.json", Json{{"eos_token_id", Json::array({7, 5})}});
  auto tok = Tokenizer::FromHuggingFace(dir.path());
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_EQ((*tok)->chat_template(), "D");
  EXPECT_THAT((*tok)->Encode("c", true, false), ElementsAre(4, 2));
  EXPECT_THAT((*tok)->end_of_generation_ids(), ElementsAre(5, 7));

  ModelDir jinja;
  jinja.Write("tokenizer.json", SmallByteLevel());
  jinja.Write("chat_template.jinja", std::string("{{ messages }}"));
  auto tok2 = Tokenizer::FromHuggingFace(jinja.path());
  ASSERT_TRUE(tok2.ok()) << tok2.status();
  EXPECT_EQ((*tok2)->chat_template(), "{{ messages }}");
}

TEST(HfTokenizerTest, PostProcessorImpliesBos) {
  Json j = SmallByteLevel();
  j["post_processor"] = {
      {"type", "Sequence"},
      {"processors",
       Json::array({{{"type", "ByteLevel"}},
                    {{"type", "TemplateProcessing"},
                     {"single", Json::array({{{"SpecialToken", {{"id", "<|endoftext|>"}}}},
                                             {{"Sequence", {{"id", "A"}}}}})}}})}};
  auto tok = Load(j);
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_TRUE((*tok)->add_bos());
  EXPECT_THAT((*tok)->Encode("c", true, false), ElementsAre(7, 2));
}

TEST(HfTokenizerTest, BrokenFilesAreReported) {
  EXPECT_EQ(Tokenizer::FromHuggingFace("/nonexistent/model").status().code(),
            absl::StatusCode::kNotFound);

  ModelDir not_json;
  not_json.Write("tokenizer.json", std::string("{\"model\": "));
  EXPECT_THAT(std::string(Tokenizer::FromHuggingFace(not_json.path()).status().message()),
              HasSubstr("not a JSON object"));

  Json word_piece = SmallByteLevel();
  word_piece["model"]["type"] = "WordPiece";
  EXPECT_THAT(ErrorOf(word_piece), HasSubstr("WordPiece"));

  Json whitespace = SmallByteLevel();
  whitespace["pre_tokenizer"] = {{"type", "Whitespace"}};
  EXPECT_THAT(ErrorOf(whitespace), HasSubstr("unsupported pre_tokenizer"));

  Json unknown_regex = SmallByteLevel();
  unknown_regex["pre_tokenizer"] = {
      {"type", "Sequence"},
      {"pretokenizers", Json::array({{{"type", "Split"},
                                      {"pattern", {{"Regex", "\\w+"}}},
                                      {"behavior", "Isolated"},
                                      {"invert", false}},
                                     {{"type", "ByteLevel"}, {"use_regex", false}}})}};
  EXPECT_THAT(ErrorOf(unknown_regex), HasSubstr("\\w+"));

  Json bad_merge = SmallByteLevel();
  bad_merge["model"]["merges"].push_back(5);
  EXPECT_THAT(ErrorOf(bad_merge), HasSubstr("model.merges[3]"));

  Json unknown_merge = SmallByteLevel();
  unknown_merge["model"]["merges"].push_back("x y");
  EXPECT_THAT(ErrorOf(unknown_merge), HasSubstr("not a token"));

  Json no_vocab = SmallByteLevel();
  no_vocab["model"].erase("vocab");
  EXPECT_THAT(ErrorOf(no_vocab), HasSubstr("model.vocab"));

  Json bad_added = SmallByteLevel();
  bad_added["added_tokens"].push_back({{"content", "<x>"}});
  EXPECT_THAT(ErrorOf(bad_added), HasSubstr("added_tokens"));

  Json reused_id = SmallByteLevel();
  reused_id["model"]["vocab"]["zz"] = 0;
  EXPECT_THAT(ErrorOf(reused_id), HasSubstr("reuses id 0"));

  EXPECT_THAT(ErrorOf(SmallByteLevel(), Json{{"bos_token", "<nope>"}}),
              HasSubstr("bos_token '<nope>'"));
  EXPECT_THAT(ErrorOf(SmallByteLevel(), Json{{"add_eos_token", true}}),
              HasSubstr("eos_token is not set"));
  EXPECT_THAT(ErrorOf(SmallByteLevel(), Json{{"add_bos_token", "yes"}}),
              HasSubstr("add_bos_token"));
}

// --- The fixture vocabularies as tokenizer.json ---

Json VocabJson(const GgufFile& file) {
  const auto tokens = testing::GgufStrings(file, "tokenizer.ggml.tokens");
  const auto types = testing::GgufNumbers(file, "tokenizer.ggml.token_type");
  Json vocab = Json::object();
  Json added = Json::array();
  for (size_t i = 0; i < tokens.size(); ++i) {
    vocab[std::string(tokens[i])] = i;
    if (types[i] == 2 || types[i] == 3) {
      added.push_back({{"id", i}, {"content", std::string(tokens[i])}, {"special", true}});
    }
  }
  return {{"vocab", vocab}, {"added", added}};
}

Json ByteLevelFromGguf(const std::string& name, const Json& pre_tokenizer, bool ignore_merges) {
  const GgufFile& file = testing::FixtureGguf(name);
  const Json v = VocabJson(file);
  Json merges = Json::array();
  for (std::string_view m : testing::GgufStrings(file, "tokenizer.ggml.merges")) {
    merges.push_back(std::string(m));
  }
  return {{"added_tokens", v["added"]},
          {"pre_tokenizer", pre_tokenizer},
          {"model",
           {{"type", "BPE"},
            {"ignore_merges", ignore_merges},
            {"vocab", v["vocab"]},
            {"merges", merges}}}};
}

// Merges derived from SentencePiece scores the way transformers'
// SentencePieceExtractor does: every split of a piece into two pieces,
// ordered by the merged piece's score, then by the parts' ids.
Json SentencePieceFromGguf() {
  const GgufFile& file = testing::FixtureGguf("llama-spm");
  const auto tokens = testing::GgufStrings(file, "tokenizer.ggml.tokens");
  const auto types = testing::GgufNumbers(file, "tokenizer.ggml.token_type");
  const auto scores = testing::GgufNumbers(file, "tokenizer.ggml.scores");
  std::map<std::string_view, int64_t> ids;
  for (size_t i = 0; i < tokens.size(); ++i) ids[tokens[i]] = i;
  std::vector<std::tuple<double, int64_t, int64_t, int64_t>> found;  // -score, id, left, right
  for (size_t i = 0; i < tokens.size(); ++i) {
    if (types[i] != 1) continue;
    const std::string_view t = tokens[i];
    for (size_t k = 1; k < t.size(); ++k) {
      if ((static_cast<uint8_t>(t[k]) & 0xC0) == 0x80) continue;  // inside a character
      auto l = ids.find(t.substr(0, k));
      auto r = ids.find(t.substr(k));
      if (l != ids.end() && r != ids.end()) found.emplace_back(-scores[i], i, l->second, r->second);
    }
  }
  std::sort(found.begin(), found.end());
  Json merges = Json::array();
  for (const auto& [neg_score, id, left, right] : found) {
    merges.push_back(Json::array({std::string(tokens[left]), std::string(tokens[right])}));
  }
  const Json v = VocabJson(file);
  return {{"added_tokens", v["added"]},
          {"normalizer", LegacyLlamaNormalizer()},
          {"model",
           {{"type", "BPE"},
            {"byte_fallback", true},
            {"unk_token", "<unk>"},
            {"vocab", v["vocab"]},
            {"merges", merges}}}};
}

void ExpectFixtureVectors(const std::string& name, const Json& tokenizer, const Json& config) {
  auto tok = Load(tokenizer, config);
  ASSERT_TRUE(tok.ok()) << tok.status();
  for (const testing::VocabCase& c : testing::LoadVocabCases(name)) {
    EXPECT_THAT((*tok)->Encode(c.text, false, false), ElementsAreArray(c.ids))
        << name << " text: '" << c.text << "'";
    EXPECT_EQ((*tok)->Decode(c.ids), c.text);
  }
}

TEST(HfTokenizerTest, Gpt2FixtureVocabulary) {
  ExpectFixtureVectors("gpt-2", ByteLevelFromGguf("gpt-2", ByteLevelPre(), false),
                       Json{{"bos_token", "<|endoftext|>"}, {"eos_token", "<|endoftext|>"}});
}

TEST(HfTokenizerTest, Llama3FixtureVocabulary) {
  const Json pre = {
      {"type", "Sequence"},
      {"pretokenizers",
       Json::array({{{"type", "Split"},
                     {"pattern", {{"Regex", kLlama3Regex}}},
                     {"behavior", "Isolated"},
                     {"invert", false}},
                    {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", false}}})}};
  ExpectFixtureVectors("llama-bpe", ByteLevelFromGguf("llama-bpe", pre, true),
                       Json{{"bos_token", "<|begin_of_text|>"}, {"eos_token", "<|end_of_text|>"}});
}

TEST(HfTokenizerTest, LlamaSentencePieceFixtureVocabulary) {
  ExpectFixtureVectors("llama-spm", SentencePieceFromGguf(), kLlamaConfig);
}

}  // namespace
}  // namespace morphserve::engine
