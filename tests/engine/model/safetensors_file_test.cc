#include "engine/model/safetensors_file.h"

#include <cstring>
#include <random>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/engine/model/hf_test_util.h"

namespace morphserve::engine {
namespace {

using morphserve::testing::EncodeFloats;
using morphserve::testing::RawTensor;
using morphserve::testing::SafetensorsBytes;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

std::string ParseError(const std::vector<uint8_t>& bytes) {
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> f = SafetensorsFile::Parse(bytes, "x.st");
  EXPECT_FALSE(f.ok());
  return std::string(f.status().message());
}

std::vector<uint8_t> Data(size_t n) { return std::vector<uint8_t>(n, 0x3c); }

TEST(SafetensorsFileTest, ParsesTensorsOfEachFloatType) {
  const std::vector<uint8_t> bytes = SafetensorsBytes(
      std::vector<RawTensor>{{"a", "F32", {2, 3}, EncodeFloats({1, 2, 3, 4, 5, 6}, "F32")},
                             {"b", "BF16", {4}, EncodeFloats({1.5f, -2, 0, 8}, "BF16")},
                             {"c", "F16", {1, 1, 2}, EncodeFloats({0.5f, 3}, "F16")},
                             {"ids", "I64", {2}, std::vector<uint8_t>(16, 0)},
                             {"scalar", "F32", {}, EncodeFloats({7}, "F32")},
                             {"empty", "F32", {0, 5}, {}}});
  auto file = SafetensorsFile::Parse(bytes, "x.st");
  ASSERT_TRUE(file.ok()) << file.status();
  const SafetensorsFile& f = **file;
  EXPECT_EQ(f.tensors().size(), 6u);  // __metadata__ is not a tensor
  EXPECT_EQ(f.Find("__metadata__"), nullptr);
  EXPECT_EQ(f.Find("nope"), nullptr);

  const SafetensorsTensor* a = f.Find("a");
  ASSERT_NE(a, nullptr);
  EXPECT_EQ(a->dtype, DType::kF32);
  EXPECT_THAT(a->shape, ElementsAre(2, 3));
  EXPECT_EQ(a->size_bytes, 24u);
  float a5;
  std::memcpy(&a5, a->data + 20, 4);
  EXPECT_EQ(a5, 6.0f);

  EXPECT_EQ(f.Find("b")->dtype, DType::kBF16);
  EXPECT_EQ(f.Find("b")->data, a->data + 24);
  EXPECT_EQ(f.Find("c")->dtype, DType::kF16);
  EXPECT_EQ(f.Find("c")->NumElements(), 2);
  EXPECT_FALSE(f.Find("ids")->dtype.has_value());  // parsed, refused by the loader
  EXPECT_EQ(f.Find("ids")->dtype_name, "I64");
  EXPECT_EQ(f.Find("scalar")->NumElements(), 1);
  EXPECT_EQ(f.Find("empty")->size_bytes, 0u);
}

TEST(SafetensorsFileTest, UnpaddedHeaderLeavesDataUnaligned) {
  const std::string header = R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})";
  ASSERT_NE(header.size() % 4, 0u);
  const std::vector<uint8_t> bytes = SafetensorsBytes(header, EncodeFloats({1.5f, -3}, "F32"));
  auto file = SafetensorsFile::Parse(bytes, "x.st");
  ASSERT_TRUE(file.ok()) << file.status();
  const SafetensorsTensor* a = (*file)->Find("a");
  ASSERT_NE(a, nullptr);
  EXPECT_EQ(a->data, bytes.data() + 8 + header.size());
  float v[2];
  std::memcpy(v, a->data, 8);
  EXPECT_EQ(v[1], -3.0f);
}

TEST(SafetensorsFileTest, ErrorsNameTheFile) {
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> missing =
      SafetensorsFile::Open("/nonexistent/model.safetensors");
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(missing.status().message()), HasSubstr("/nonexistent/model.safetensors"));
  EXPECT_THAT(ParseError({1, 2, 3}), HasSubstr("x.st: truncated file: 3 bytes"));
}

TEST(SafetensorsFileTest, HeaderLengthBeyondFile) {
  std::vector<uint8_t> bytes = SafetensorsBytes("{}", Data(0));
  const uint64_t huge = 1ull << 40;
  std::memcpy(bytes.data(), &huge, 8);
  EXPECT_THAT(ParseError(bytes), HasSubstr("header length 1099511627776 exceeds the file size"));
  const uint64_t all_ones = ~0ull;  // would overflow 8 + length
  std::memcpy(bytes.data(), &all_ones, 8);
  EXPECT_THAT(ParseError(bytes), HasSubstr("exceeds the file size"));
}

TEST(SafetensorsFileTest, BadHeaders) {
  EXPECT_THAT(ParseError(SafetensorsBytes("{\"a\": ", Data(0))), HasSubstr("not valid JSON"));
  EXPECT_THAT(ParseError(SafetensorsBytes("[1, 2]", Data(0))), HasSubstr("not a JSON object"));
  EXPECT_THAT(ParseError(SafetensorsBytes(R"({"a": 3})", Data(0))),
              HasSubstr("tensor 'a': header entry is not an object"));
  EXPECT_THAT(
      ParseError(SafetensorsBytes(R"({"a": {"shape": [1], "data_offsets": [0, 4]}})", Data(4))),
      HasSubstr("tensor 'a': missing dtype"));
  EXPECT_THAT(ParseError(SafetensorsBytes(
                  R"({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}})", Data(4))),
              HasSubstr("shape entries must be non-negative integers"));
  EXPECT_THAT(ParseError(SafetensorsBytes(R"({"a": {"dtype": "F32", "shape": [1]}})", Data(4))),
              HasSubstr("data_offsets must be two non-negative integers"));
  EXPECT_THAT(
      ParseError(SafetensorsBytes(
          R"({"a": {"dtype": "F32", "shape": [4294967296, 4294967296], "data_offsets": [0, 4]}})",
          Data(4))),
      HasSubstr("shape is too large"));
}

TEST(SafetensorsFileTest, UnknownDTypeIsUnimplemented) {
  auto f = SafetensorsFile::Parse(
      SafetensorsBytes(R"({"w": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 1]}})", Data(1)),
      "x.st");
  EXPECT_EQ(f.status().code(), absl::StatusCode::kUnimplemented);
  EXPECT_THAT(std::string(f.status().message()), HasSubstr("tensor 'w': dtype 'Q4'"));
}

TEST(SafetensorsFileTest, OffsetsOutOfRange) {
  EXPECT_THAT(ParseError(SafetensorsBytes(
                  R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})", Data(7))),
              HasSubstr("tensor 'a': data_offsets [0, 8] are out of range (the data section is 7 "
                        "bytes)"));
  EXPECT_THAT(ParseError(SafetensorsBytes(
                  R"({"a": {"dtype": "F32", "shape": [0], "data_offsets": [9, 4]}})", Data(16))),
              HasSubstr("out of range"));
  EXPECT_THAT(ParseError(SafetensorsBytes(
                  R"({"a": {"dtype": "F32", "shape": [1],
                     "data_offsets": [18446744073709551612, 18446744073709551616]}})",
                  Data(16))),
              HasSubstr("data_offsets"));
}

TEST(SafetensorsFileTest, OffsetsMustMatchShape) {
  EXPECT_THAT(
      ParseError(SafetensorsBytes(
          R"({"a": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 24]}})", Data(24))),
      HasSubstr("tensor 'a': data_offsets [0, 24] hold 24 bytes, but BF16 shape [2, 3] "
                "needs 12"));
}

TEST(SafetensorsFileTest, OverlappingTensors) {
  EXPECT_THAT(ParseError(SafetensorsBytes(
                  R"({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                      "e": {"dtype": "F32", "shape": [0], "data_offsets": [8, 8]},
                      "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}})",
                  Data(16))),
              HasSubstr("tensors 'a' and 'b' overlap"));
}

// Corrupted files must give an error or a valid parse, never a crash or an
// out-of-bounds tensor (run under sanitizers to catch the latter).
TEST(SafetensorsFileTest, SurvivesRandomCorruption) {
  const std::vector<uint8_t> good = SafetensorsBytes(std::vector<RawTensor>{
      {"model.embed_tokens.weight", "F32", {4, 3}, EncodeFloats(std::vector<float>(12, 1), "F32")},
      {"model.norm.weight", "BF16", {3}, EncodeFloats({1, 1, 1}, "BF16")}});
  std::mt19937 rng(42);
  for (int iter = 0; iter < 3000; ++iter) {
    std::vector<uint8_t> bytes = good;
    const int edits = 1 + static_cast<int>(rng() % 4);
    for (int e = 0; e < edits; ++e) {
      const size_t at = rng() % bytes.size();
      switch (rng() % 3) {
        case 0:
          bytes[at] = static_cast<uint8_t>(rng());
          break;
        case 1:
          bytes.resize(at);
          break;
        default:
          bytes[at] = static_cast<uint8_t>("0123456789[]{}\",:"[rng() % 17]);
          break;
      }
      if (bytes.empty()) break;
    }
    auto f = SafetensorsFile::Parse(bytes, "fuzz");
    if (!f.ok()) continue;
    for (const SafetensorsTensor& t : (*f)->tensors()) {
      ASSERT_GE(t.data, bytes.data());
      ASSERT_LE(t.data + t.size_bytes, bytes.data() + bytes.size());
    }
  }
}

}  // namespace
}  // namespace morphserve::engine
