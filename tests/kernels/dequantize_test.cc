#include "kernels/cpu/dequantize.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "common/fp16.h"
#include "kernels/cpu/quant_blocks.h"
#include "tests/kernels/block_encoders.h"

namespace morphserve::kernels {
namespace {

constexpr DType kQuantTypes[] = {DType::kQ4_0, DType::kQ4_1, DType::kQ5_0, DType::kQ5_1,
                                 DType::kQ8_0, DType::kQ4_K, DType::kQ5_K, DType::kQ6_K};

TEST(DequantizeTest, BlockStructsMatchDTypeInfo) {
  EXPECT_EQ(sizeof(BlockQ4_0), static_cast<size_t>(GetDTypeInfo(DType::kQ4_0).block_bytes));
  EXPECT_EQ(sizeof(BlockQ4_1), static_cast<size_t>(GetDTypeInfo(DType::kQ4_1).block_bytes));
  EXPECT_EQ(sizeof(BlockQ5_0), static_cast<size_t>(GetDTypeInfo(DType::kQ5_0).block_bytes));
  EXPECT_EQ(sizeof(BlockQ5_1), static_cast<size_t>(GetDTypeInfo(DType::kQ5_1).block_bytes));
  EXPECT_EQ(sizeof(BlockQ8_0), static_cast<size_t>(GetDTypeInfo(DType::kQ8_0).block_bytes));
  EXPECT_EQ(sizeof(BlockQ4K), static_cast<size_t>(GetDTypeInfo(DType::kQ4_K).block_bytes));
  EXPECT_EQ(sizeof(BlockQ5K), static_cast<size_t>(GetDTypeInfo(DType::kQ5_K).block_bytes));
  EXPECT_EQ(sizeof(BlockQ6K), static_cast<size_t>(GetDTypeInfo(DType::kQ6_K).block_bytes));
  for (DType t : kQuantTypes) {
    const int expected = t == DType::kQ4_K || t == DType::kQ5_K || t == DType::kQ6_K ? kQKK : kQK;
    EXPECT_EQ(GetDTypeInfo(t).block_elems, expected) << DTypeName(t);
  }
}

TEST(DequantizeTest, SupportedTypes) {
  for (DType t : kQuantTypes) EXPECT_TRUE(IsSupportedWeightType(t)) << DTypeName(t);
  EXPECT_TRUE(IsSupportedWeightType(DType::kF32));
  EXPECT_TRUE(IsSupportedWeightType(DType::kF16));
  EXPECT_TRUE(IsSupportedWeightType(DType::kBF16));
  EXPECT_FALSE(IsSupportedWeightType(DType::kQ2_K));
  EXPECT_FALSE(IsSupportedWeightType(DType::kQ3_K));
  EXPECT_FALSE(IsSupportedWeightType(DType::kQ8_K));
}

TEST(DequantizeTest, PlainTypes) {
  const float f32[3] = {1.5f, -0.0f, 3e-8f};
  float out[3];
  DequantizeRow(DType::kF32, f32, out, 3);
  EXPECT_EQ(out[0], 1.5f);
  EXPECT_EQ(out[2], 3e-8f);

  const uint16_t f16[4] = {0x3C00, 0xC000, 0x3555, 0x0001};
  float h[4];
  DequantizeRow(DType::kF16, f16, h, 4);
  EXPECT_EQ(h[0], 1.0f);
  EXPECT_EQ(h[1], -2.0f);
  EXPECT_EQ(h[2], 0.333251953125f);
  EXPECT_EQ(h[3], std::ldexp(1.0f, -24));  // smallest subnormal

  const uint16_t bf16[3] = {0x3F80, 0xC0A0, 0x3E20};
  float b[3];
  DequantizeRow(DType::kBF16, bf16, b, 3);
  EXPECT_EQ(b[0], 1.0f);
  EXPECT_EQ(b[1], -5.0f);
  EXPECT_EQ(b[2], 0.15625f);
}

TEST(DequantizeTest, HandBuiltQ4_0) {
  BlockQ4_0 blk{};
  blk.d = 0x3800;  // 0.5
  for (int j = 0; j < 16; ++j) blk.qs[j] = static_cast<uint8_t>(j | ((15 - j) << 4));
  float y[32];
  DequantizeRow(DType::kQ4_0, &blk, y, 32);
  EXPECT_EQ(y[0], -4.0f);
  EXPECT_EQ(y[8], 0.0f);
  EXPECT_EQ(y[15], 3.5f);
  EXPECT_EQ(y[16], 3.5f);  // high nibble of qs[0] = 15
  EXPECT_EQ(y[31], -4.0f);
}

TEST(DequantizeTest, HandBuiltQ4_1) {
  BlockQ4_1 blk{};
  blk.d = 0x3400;  // 0.25
  blk.m = 0xBC00;  // -1
  for (int j = 0; j < 16; ++j) blk.qs[j] = static_cast<uint8_t>(j | (3 << 4));
  float y[32];
  DequantizeRow(DType::kQ4_1, &blk, y, 32);
  EXPECT_EQ(y[0], -1.0f);
  EXPECT_EQ(y[4], 0.0f);
  EXPECT_EQ(y[15], 2.75f);
  EXPECT_EQ(y[16], -0.25f);
  EXPECT_EQ(y[31], -0.25f);
}

TEST(DequantizeTest, HandBuiltQ5_0AndQ5_1) {
  BlockQ5_0 blk{};
  blk.d = 0x3C00;                                 // 1
  blk.qh[0] = 0x01;                               // element 0 gets bit 4
  blk.qh[2] = 0x80;                               // element 23
  for (int j = 0; j < 16; ++j) blk.qs[j] = 0x21;  // low 1, high 2
  float y[32];
  DequantizeRow(DType::kQ5_0, &blk, y, 32);
  EXPECT_EQ(y[0], 1.0f);     // 17 - 16
  EXPECT_EQ(y[1], -15.0f);   // 1 - 16
  EXPECT_EQ(y[16], -14.0f);  // 2 - 16
  EXPECT_EQ(y[23], 2.0f);    // 18 - 16

  BlockQ5_1 blk1{};
  blk1.d = 0x3800;    // 0.5
  blk1.m = 0x4000;    // 2
  blk1.qh[3] = 0x80;  // element 31
  for (int j = 0; j < 16; ++j) blk1.qs[j] = 0xF0;
  DequantizeRow(DType::kQ5_1, &blk1, y, 32);
  EXPECT_EQ(y[0], 2.0f);
  EXPECT_EQ(y[16], 9.5f);   // 15 * 0.5 + 2
  EXPECT_EQ(y[31], 17.5f);  // 31 * 0.5 + 2
}

TEST(DequantizeTest, HandBuiltQ8_0) {
  BlockQ8_0 blk{};
  blk.d = 0x3800;  // 0.5
  blk.qs[0] = -128;
  blk.qs[1] = 127;
  blk.qs[31] = -3;
  float y[32];
  DequantizeRow(DType::kQ8_0, &blk, y, 32);
  EXPECT_EQ(y[0], -64.0f);
  EXPECT_EQ(y[1], 63.5f);
  EXPECT_EQ(y[2], 0.0f);
  EXPECT_EQ(y[31], -1.5f);
}

TEST(DequantizeTest, HandBuiltQ4K) {
  BlockQ4K blk{};
  blk.d = 0x3C00;     // 1
  blk.dmin = 0x3800;  // 0.5
  // Sub-block 0: scale 3, min 4. Sub-block 5: scale 0b110001 = 49, min
  // 0b100010 = 34 (low nibbles in byte 9, top bits in bytes 1 and 5).
  blk.scales[0] = 3;
  blk.scales[4] = 4;
  blk.scales[9] = 0x21;
  blk.scales[1] = 0xC0;
  blk.scales[5] = 0x80;
  blk.qs[0] = 0x52;           // element 0: 2, element 32: 5
  blk.qs[2 * 32 + 7] = 0xA0;  // element 128 + 32 + 7 = 167 (sub-block 5): 10
  float y[256];
  DequantizeRow(DType::kQ4_K, &blk, y, 256);
  EXPECT_EQ(y[0], 3.0f * 2 - 0.5f * 4);
  EXPECT_EQ(y[1], -2.0f);
  EXPECT_EQ(y[32], 0.0f);  // sub-block 1 has scale 0, min 0
  EXPECT_EQ(y[167], 49.0f * 10 - 0.5f * 34);
  EXPECT_EQ(y[160], -17.0f);
}

TEST(DequantizeTest, HandBuiltQ6K) {
  BlockQ6K blk{};
  blk.d = 0x3800;  // 0.5
  blk.scales[0] = 2;
  blk.scales[4] = -3;
  blk.scales[14] = 4;
  blk.ql[0] = 0x1F;        // element 0 low 15, element 64 low 1
  blk.qh[0] = 0x12;        // element 0 top 2, element 64 top 1
  blk.ql[64 + 40] = 0x70;  // element 128 + 96 + 8 = 232 low 7 (scale 14)
  blk.qh[32 + 8] = 0xC0;   // element 232 top 3
  float y[256];
  DequantizeRow(DType::kQ6_K, &blk, y, 256);
  EXPECT_EQ(y[0], 0.5f * 2 * (47 - 32));
  EXPECT_EQ(y[1], 0.5f * 2 * -32);
  EXPECT_EQ(y[64], 0.5f * -3 * (17 - 32));
  EXPECT_EQ(y[232], 0.5f * 4 * (55 - 32));
}

// Expected values from an independent implementation (the gguf Python
// package) for the byte pattern (37 i + 11) mod 256 with fixed f16 fields.
std::vector<uint8_t> Pattern(size_t n) {
  std::vector<uint8_t> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = static_cast<uint8_t>((i * 37 + 11) & 255);
  return v;
}

void PutHalf(std::vector<uint8_t>& v, size_t offset, uint16_t h) {
  v[offset] = static_cast<uint8_t>(h & 255);
  v[offset + 1] = static_cast<uint8_t>(h >> 8);
}

struct Golden {
  DType type;
  std::vector<std::pair<size_t, uint16_t>> halves;  // (offset, f16 bits)
  std::vector<std::pair<int, float>> values;        // (element, value)
};

TEST(DequantizeTest, MatchesIndependentImplementation) {
  const std::vector<Golden> goldens = {
      {DType::kQ4_0,
       {{0, 0x3800}, {18, 0xB400}},
       {{0, -1.5f},
        {1, 1.0f},
        {5, 3.0f},
        {15, -4.0f},
        {16, -1.5f},
        {17, -0.5f},
        {30, -1.5f},
        {31, 0.0f},
        {32, -1.75f},
        {47, -0.5f},
        {48, -1.5f},
        {63, 1.75f}}},
      {DType::kQ4_1,
       {{0, 0x3800}, {2, 0xBC00}, {20, 0x3400}, {22, 0x3E00}},
       {{0, 6.5f},
        {1, 1.0f},
        {5, 3.0f},
        {15, 4.0f},
        {16, 3.5f},
        {17, 5.0f},
        {30, 4.0f},
        {31, 5.0f},
        {32, 2.25f},
        {47, 5.0f},
        {48, 3.5f},
        {63, 4.0f}}},
      {DType::kQ5_0,
       {{0, 0x3800}, {22, 0xB400}},
       {{0, 4.5f},
        {1, -1.0f},
        {5, -7.0f},
        {15, -6.0f},
        {16, 7.0f},
        {17, 0.0f},
        {30, 7.0f},
        {31, 0.5f},
        {32, -1.75f},
        {47, -0.5f},
        {48, -0.25f},
        {63, -1.0f}}},
      {DType::kQ5_1,
       {{0, 0x3800}, {2, 0xBC00}, {24, 0x3400}, {26, 0x3E00}},
       {{0, 8.5f},
        {1, 11.0f},
        {5, 5.0f},
        {15, 14.0f},
        {16, 8.5f},
        {17, 1.5f},
        {30, 0.5f},
        {31, 1.5f},
        {32, 8.25f},
        {47, 3.0f},
        {48, 8.0f},
        {63, 8.75f}}},
      {DType::kQ8_0,
       {{0, 0x3800}, {34, 0xB400}},
       {{0, 42.5f},
        {1, 61.0f},
        {5, 7.0f},
        {15, -64.0f},
        {16, -45.5f},
        {17, -27.0f},
        {30, -42.5f},
        {31, -24.0f},
        {32, -15.75f},
        {47, -26.5f},
        {48, 28.25f},
        {63, 17.5f}}},
      {DType::kQ4_K,
       {{0, 0x3000}, {2, 0x2C00}},
       {{0, 39.4375f},
        {1, -3.1875f},
        {17, -3.1875f},
        {31, 20.0625f},
        {32, 1.0f},
        {33, 2.5f},
        {63, 5.0f},
        {64, 52.5625f},
        {100, 11.875f},
        {127, 10.125f},
        {128, 52.875f},
        {150, 43.125f},
        {191, 5.625f},
        {192, 66.3125f},
        {200, 17.3125f},
        {255, 6.0625f}}},
      {DType::kQ5_K,
       {{0, 0x3000}, {2, 0x2C00}},
       {{0, 101.4375f},
        {1, -3.1875f},
        {17, -3.1875f},
        {31, 20.0625f},
        {32, 14.0f},
        {33, -0.5f},
        {63, 10.0f},
        {64, 52.5625f},
        {100, 29.375f},
        {127, -0.375f},
        {128, 130.875f},
        {150, 43.125f},
        {191, 80.625f},
        {192, 164.3125f},
        {200, 17.3125f},
        {255, 13.5625f}}},
      {DType::kQ6_K,
       {{208, 0x2800}},
       {{0, -44.71875f},
        {1, 53.0f},
        {17, 16.0f},
        {31, -3.0f},
        {32, 7.21875f},
        {33, -21.0f},
        {63, -18.125f},
        {64, -95.0f},
        {100, 78.84375f},
        {127, 46.875f},
        {128, -10.96875f},
        {150, -5.25f},
        {191, -30.625f},
        {192, -15.125f},
        {200, 34.03125f},
        {255, -1.875f}}},
  };
  for (const Golden& g : goldens) {
    const DTypeInfo& info = GetDTypeInfo(g.type);
    const int64_t n = info.block_elems == kQK ? 64 : 256;
    std::vector<uint8_t> bytes = Pattern(RowBytes(g.type, n));
    for (const auto& [offset, bits] : g.halves) PutHalf(bytes, offset, bits);
    std::vector<float> y(static_cast<size_t>(n));
    DequantizeRow(g.type, bytes.data(), y.data(), n);
    for (const auto& [i, value] : g.values) {
      EXPECT_EQ(y[static_cast<size_t>(i)], value) << DTypeName(g.type) << " element " << i;
    }
  }
}

// Random block contents, encoded by the test's own packer, come back as the
// format's formula says, for every field's full range.
TEST(DequantizeTest, EncodedBlocksRoundTrip) {
  std::mt19937 rng(7);
  for (DType t : kQuantTypes) {
    const DTypeInfo& info = GetDTypeInfo(t);
    for (int trial = 0; trial < 50; ++trial) {
      const int n_blocks = 1 + trial % 3;
      std::vector<uint8_t> bytes(static_cast<size_t>(n_blocks * info.block_bytes));
      std::vector<double> expected;
      for (int b = 0; b < n_blocks; ++b) {
        const testing::BlockContent c = testing::RandomBlock(t, 2.0f, rng);
        testing::EncodeBlock(t, c, bytes.data() + b * info.block_bytes);
        const std::vector<double> v = testing::BlockValues(t, c);
        expected.insert(expected.end(), v.begin(), v.end());
      }
      std::vector<float> y(expected.size());
      DequantizeRow(t, bytes.data(), y.data(), static_cast<int64_t>(y.size()));
      for (size_t j = 0; j < y.size(); ++j) {
        ASSERT_NEAR(y[j], expected[j], 1e-6 * (1.0 + std::fabs(expected[j])))
            << DTypeName(t) << " trial " << trial << " element " << j;
      }
    }
  }
}

// A lossy round trip through minimal quantizers for the simple types: the
// error stays within half a quantization step.
TEST(DequantizeTest, QuantizeDequantizeRoundTrip) {
  std::mt19937 rng(11);
  std::uniform_real_distribution<float> uniform(-3.0f, 3.0f);
  for (int trial = 0; trial < 20; ++trial) {
    float x[32];
    float lo = 1e9f;
    float hi = -1e9f;
    float amax = 0.0f;
    for (float& v : x) {
      v = uniform(rng);
      lo = std::min(lo, v);
      hi = std::max(hi, v);
      amax = std::max(amax, std::fabs(v));
    }
    // Q8_0: symmetric.
    BlockQ8_0 q8{};
    q8.d = FloatToHalf(amax / 127.0f);
    const float d8 = HalfToFloat(q8.d);
    for (int j = 0; j < 32; ++j) {
      q8.qs[j] = static_cast<int8_t>(std::clamp(std::lround(x[j] / d8), -127l, 127l));
    }
    // Q4_1: min + 15 steps.
    BlockQ4_1 q41{};
    q41.d = FloatToHalf((hi - lo) / 15.0f);
    q41.m = FloatToHalf(lo);
    const float d41 = HalfToFloat(q41.d);
    const float m41 = HalfToFloat(q41.m);
    int q[32];
    for (int j = 0; j < 32; ++j) {
      q[j] = static_cast<int>(std::clamp(std::lround((x[j] - m41) / d41), 0l, 15l));
    }
    for (int j = 0; j < 16; ++j) q41.qs[j] = static_cast<uint8_t>(q[j] | (q[j + 16] << 4));

    float y8[32];
    float y41[32];
    DequantizeRow(DType::kQ8_0, &q8, y8, 32);
    DequantizeRow(DType::kQ4_1, &q41, y41, 32);
    for (int j = 0; j < 32; ++j) {
      EXPECT_LE(std::fabs(y8[j] - x[j]), 0.5f * d8 + 1e-3f) << j;
      EXPECT_LE(std::fabs(y41[j] - x[j]), 0.5f * d41 + 1e-2f) << j;
    }
  }
}

}  // namespace
}  // namespace morphserve::kernels
