#include "engine/gguf/gguf_file.h"

#include <cstring>
#include <fstream>
#include <iterator>
#include <random>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/gguf_builder.h"

namespace morphserve::engine {
namespace {

using ::testing::HasSubstr;
using morphserve::testing::GgufBuilder;

const std::string kFixtures = MORPHSERVE_FIXTURES_DIR;

std::vector<uint8_t> ReadAll(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

TEST(GgufFileTest, ReadsTinyLlamaFixture) {
  auto file = GgufFile::Open(kFixtures + "/models/llama-2-tiny-random.gguf");
  ASSERT_TRUE(file.ok()) << file.status();
  const GgufFile& f = **file;
  EXPECT_EQ(f.version(), 3u);
  EXPECT_EQ(f.alignment(), 32u);
  EXPECT_EQ(*f.GetString("general.architecture").value(), "llama");
  EXPECT_EQ(*f.GetInt("llama.embedding_length").value(), 8);
  EXPECT_EQ(*f.GetInt("llama.block_count").value(), 1);
  EXPECT_EQ(*f.GetInt("llama.attention.head_count").value(), 2);
  EXPECT_NEAR(*f.GetReal("llama.attention.layer_norm_rms_epsilon").value(), 1e-5, 1e-9);
  EXPECT_FALSE(f.GetReal("llama.rope.freq_base").value().has_value());
  EXPECT_EQ(f.GetStringArray("tokenizer.ggml.tokens").value()->size(), 32000u);
  EXPECT_EQ(f.GetRealArray("tokenizer.ggml.scores").value()->size(), 32000u);

  ASSERT_EQ(f.tensors().size(), 12u);
  const GgufTensor* emb = f.FindTensor("token_embd.weight");
  ASSERT_NE(emb, nullptr);
  EXPECT_EQ(emb->dtype, DType::kF16);
  EXPECT_THAT(emb->dims, ::testing::ElementsAre(8, 32000));
  EXPECT_EQ(emb->size_bytes, 8u * 32000u * 2u);
  const GgufTensor* norm = f.FindTensor("output_norm.weight");
  ASSERT_NE(norm, nullptr);
  EXPECT_EQ(norm->dtype, DType::kF32);
  EXPECT_EQ(f.FindTensor("no.such.tensor"), nullptr);
}

TEST(GgufFileTest, ReadsVocabOnlyFixtures) {
  for (const char* name : {"llama-spm", "llama-bpe", "gpt-2"}) {
    auto file = GgufFile::Open(kFixtures + "/tokenizer/ggml-vocab-" + name + ".gguf");
    ASSERT_TRUE(file.ok()) << name << ": " << file.status();
    EXPECT_TRUE((*file)->tensors().empty());
    EXPECT_TRUE((*file)->Find("tokenizer.ggml.model") != nullptr);
  }
}

TEST(GgufFileTest, TypedGettersRejectWrongTypes) {
  const std::vector<uint8_t> bytes =
      GgufBuilder().SetString("s", "x").SetU32("u", 7).SetF32Array("fa", {1.5f, 2.5f}).Build();
  auto file = GgufFile::Parse(bytes);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ(*(*file)->GetInt("u").value(), 7);
  EXPECT_EQ(*(*file)->GetReal("u").value(), 7.0);
  EXPECT_THAT((*file)->GetInt("s").status().message(), HasSubstr("'s' has type string"));
  EXPECT_FALSE((*file)->GetStringArray("fa").ok());
  EXPECT_THAT(*(*file)->GetRealArray("fa").value(), ::testing::ElementsAre(1.5f, 2.5f));
  EXPECT_FALSE((*file)->GetIntArray("fa").ok());
}

TEST(GgufFileTest, VersionTwoIsAccepted) {
  const std::vector<uint8_t> bytes = GgufBuilder(2).SetU32("k", 1).Build();
  auto file = GgufFile::Parse(bytes);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ((*file)->version(), 2u);
}

TEST(GgufFileTest, TensorDataIsAlignedAndAddressable) {
  const std::vector<uint8_t> bytes = GgufBuilder()
                                         .SetAlignment(64)
                                         .AddF32Tensor("a", {3}, {1, 2, 3})
                                         .AddF32Tensor("b", {2, 2}, {4, 5, 6, 7})
                                         .Build();
  auto file = GgufFile::Parse(bytes);
  ASSERT_TRUE(file.ok()) << file.status();
  const GgufTensor* b = (*file)->FindTensor("b");
  ASSERT_NE(b, nullptr);
  EXPECT_EQ(b->offset % 64, 0u);
  float v[4];
  std::memcpy(v, b->data, sizeof(v));
  EXPECT_EQ(v[0], 4);
  EXPECT_EQ(v[3], 7);
}

struct BadCase {
  const char* name;
  std::vector<uint8_t> bytes;
  const char* message;
};

TEST(GgufFileTest, HostileHeadersGetClearErrors) {
  std::vector<BadCase> cases;
  cases.push_back({"bad magic", {'G', 'G', 'M', 'L', 3, 0, 0, 0}, "bad magic"});
  {
    std::vector<uint8_t> b = GgufBuilder().Build();
    b[4] = 1;  // version 1
    cases.push_back({"version 1", b, "unsupported GGUF version 1"});
  }
  {
    std::vector<uint8_t> b = GgufBuilder().Build();
    const uint64_t huge = 1ull << 60;
    std::memcpy(b.data() + 16, &huge, 8);  // metadata count
    cases.push_back({"huge kv count", b, "metadata count"});
  }
  {
    std::vector<uint8_t> b = GgufBuilder().Build();
    const uint64_t huge = 1ull << 60;
    std::memcpy(b.data() + 8, &huge, 8);  // tensor count
    cases.push_back({"huge tensor count", b, "tensor count"});
  }
  cases.push_back({"bad alignment", GgufBuilder().SetU32("general.alignment", 48).Build(),
                   "power of two"});
  cases.push_back({"duplicate key", GgufBuilder().SetU32("a", 1).SetU32("a", 2).Build(),
                   "duplicate metadata key 'a'"});
  cases.push_back({"unknown tensor type",
                   GgufBuilder().AddTensor("t", {4}, 99, std::vector<uint8_t>(16)).Build(),
                   "unsupported tensor type id 99"});
  cases.push_back({"bad block multiple",
                   GgufBuilder().AddTensor("q", {33}, 8, std::vector<uint8_t>(34)).Build(),
                   "not a multiple of the Q8_0 block size 32"});
  cases.push_back({"zero dim", GgufBuilder().AddTensor("z", {0}, 0, {}).Build(),
                   "bad dimension 0"});
  cases.push_back({"five dims",
                   GgufBuilder().AddTensor("d", {1, 1, 1, 1, 1}, 0, std::vector<uint8_t>(4)).Build(),
                   "5 dimensions"});
  {
    // Data that claims more bytes than the file holds.
    std::vector<uint8_t> b = GgufBuilder().AddF32Tensor("t", {4}, {1, 2, 3, 4}).Build();
    b.resize(b.size() - 8);
    cases.push_back({"short data", b, "runs past the end"});
  }
  for (const BadCase& c : cases) {
    auto file = GgufFile::Parse(c.bytes);
    ASSERT_FALSE(file.ok()) << c.name;
    EXPECT_THAT(file.status().message(), HasSubstr(c.message)) << c.name;
  }
}

TEST(GgufFileTest, EveryTruncationIsAnErrorNotACrash) {
  const std::vector<uint8_t> full = GgufBuilder()
                                        .SetString("general.architecture", "llama")
                                        .SetStringArray("tokens", {"a", "bc", "def"})
                                        .SetF32Array("scores", {0.5f, 1.5f, 2.5f})
                                        .SetBool("flag", true)
                                        .AddF32Tensor("w", {2, 3}, {1, 2, 3, 4, 5, 6})
                                        .Build();
  ASSERT_TRUE(GgufFile::Parse(full).ok());
  for (size_t len = 0; len < full.size(); ++len) {
    // Copy so that reading one byte past `len` would be a real overflow.
    std::vector<uint8_t> prefix(full.begin(), full.begin() + len);
    auto file = GgufFile::Parse(prefix);
    EXPECT_FALSE(file.ok()) << "prefix of " << len << " bytes parsed";
  }
}

TEST(GgufFileTest, RandomCorruptionNeverCrashes) {
  const std::vector<uint8_t> base = ReadAll(kFixtures + "/tokenizer/ggml-vocab-gpt-2.gguf");
  ASSERT_FALSE(base.empty());
  std::mt19937 rng(1234);
  // Corrupt the header region, where lengths and counts live.
  const size_t region = std::min<size_t>(base.size(), 4096);
  int errors = 0;
  for (int iter = 0; iter < 300; ++iter) {
    std::vector<uint8_t> bytes(base.begin(), base.end());
    const int flips = 1 + static_cast<int>(rng() % 8);
    for (int i = 0; i < flips; ++i) bytes[rng() % region] = static_cast<uint8_t>(rng());
    bytes.resize(bytes.size() - rng() % 64);
    auto file = GgufFile::Parse(bytes);
    errors += file.ok() ? 0 : 1;
  }
  EXPECT_GT(errors, 0);
}

TEST(GgufFileTest, MissingFileNamesThePath) {
  auto file = GgufFile::Open("/nonexistent/model.gguf");
  ASSERT_FALSE(file.ok());
  EXPECT_THAT(file.status().message(), HasSubstr("/nonexistent/model.gguf"));
}

}  // namespace
}  // namespace morphserve::engine
