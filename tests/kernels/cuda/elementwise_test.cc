// The CUDA norms, SwiGLU and RoPE against the CPU kernels on the same
// (bf16-representable) inputs.
#include "kernels/cuda/elementwise.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "common/fp16.h"
#include "kernels/cpu/elementwise.h"
#include "tests/kernels/cuda/cuda_test_util.h"

namespace morphserve::kernels::cuda {
namespace {

using testing::AllClose;
using testing::Bf16ToF32;
using testing::kBf16RelTol;
using testing::Poisoned;
using testing::RandomBf16;
using testing::RandomF32;
using testing::Upload;

struct RowShape {
  int64_t n_tokens, n;
};
constexpr RowShape kRowShapes[] = {{1, 1}, {1, 64}, {17, 576}, {1031, 64}, {3, 1537}, {2, 8192}};

class ElementwiseCudaTest : public testing::CudaTest {};

TEST_F(ElementwiseCudaTest, RmsNormMatchesCpu) {
  std::mt19937 rng(11);
  for (const RowShape& s : kRowShapes) {
    const std::vector<float> x = RandomF32(s.n_tokens * s.n, 3.0f, rng);
    const std::vector<float> weight = RandomF32(s.n, 1.0f, rng);
    std::vector<float> expected(x.size());
    for (int64_t t = 0; t < s.n_tokens; ++t) {
      kernels::RmsNorm(&x[t * s.n], weight.data(), 1e-5f, s.n, &expected[t * s.n]);
    }
    ASSERT_OK_AND_ASSIGN(DeviceBuffer d_x, Upload(x));
    ASSERT_OK_AND_ASSIGN(DeviceBuffer d_weight, Upload(weight));
    ASSERT_OK_AND_ASSIGN(DeviceBuffer d_out, Poisoned<uint16_t>(x.size()));
    ASSERT_OK(RmsNorm(d_x.as<float>(), d_weight.as<float>(), 1e-5f, s.n, d_out.as<__nv_bfloat16>(),
                      s.n_tokens, stream_));
    ASSERT_OK(Sync());
    ASSERT_OK_AND_ASSIGN(const std::vector<uint16_t> out, d_out.ToHost<uint16_t>());
    EXPECT_TRUE(AllClose(Bf16ToF32(out), expected, 1e-7, kBf16RelTol))
        << "n_tokens=" << s.n_tokens << " n=" << s.n;
    // The input is left alone.
    ASSERT_OK_AND_ASSIGN(const std::vector<float> x_after, d_x.ToHost<float>());
    EXPECT_EQ(x_after, x);
  }
}

TEST_F(ElementwiseCudaTest, AddRmsNormUpdatesResidualExactly) {
  std::mt19937 rng(12);
  for (const RowShape& s : kRowShapes) {
    const std::vector<float> residual = RandomF32(s.n_tokens * s.n, 1.0f, rng);
    const std::vector<float> delta = RandomF32(residual.size(), 1.0f, rng);
    const std::vector<float> weight = RandomF32(s.n, 1.0f, rng);
    std::vector<float> expected_residual = residual;
    std::vector<float> expected(residual.size());
    for (int64_t t = 0; t < s.n_tokens; ++t) {
      kernels::AddRmsNorm(&expected_residual[t * s.n], &delta[t * s.n], weight.data(), 1e-6f, s.n,
                          &expected[t * s.n]);
    }
    ASSERT_OK_AND_ASSIGN(DeviceBuffer d_residual, Upload(residual));
    ASSERT_OK_AND_ASSIGN(DeviceBuffer d_delta, Upload(delta));
    ASSERT_OK_AND_ASSIGN(DeviceBuffer d_weight, Upload(weight));
    ASSERT_OK_AND_ASSIGN(DeviceBuffer d_out, Poisoned<uint16_t>(residual.size()));
    ASSERT_OK(AddRmsNorm(d_residual.as<float>(), d_delta.as<float>(), d_weight.as<float>(), 1e-6f,
                         s.n, d_out.as<__nv_bfloat16>(), s.n_tokens, stream_));
    ASSERT_OK(Sync());
    ASSERT_OK_AND_ASSIGN(const std::vector<float> residual_after, d_residual.ToHost<float>());
    EXPECT_EQ(residual_after, expected_residual) << "n_tokens=" << s.n_tokens << " n=" << s.n;
    ASSERT_OK_AND_ASSIGN(const std::vector<uint16_t> out, d_out.ToHost<uint16_t>());
    EXPECT_TRUE(AllClose(Bf16ToF32(out), expected, 1e-7, kBf16RelTol))
        << "n_tokens=" << s.n_tokens << " n=" << s.n;
  }
}

TEST_F(ElementwiseCudaTest, SiluMulMatchesCpu) {
  struct Shape {
    int64_t n_tokens, n, in_stride;
  };
  std::mt19937 rng(13);
  // in_stride 2n is the fused gate|up layout.
  for (const Shape& s :
       {Shape{1, 1, 1}, Shape{17, 577, 2 * 577}, Shape{1031, 64, 67}, Shape{4, 1000, 2000}}) {
    std::vector<uint16_t> gate_up = RandomBf16(s.n_tokens * s.in_stride, 6.0f, rng);
    // exp(-g) underflowing, overflowing and exactly 1.
    for (int64_t i = 0; i < std::min<int64_t>(4, s.n); ++i) {
      const float extremes[4] = {95.0f, -95.0f, 0.0f, -87.5f};
      gate_up[i] = FloatToBF16(extremes[i]);
    }
    const std::vector<float> gate_up_f = Bf16ToF32(gate_up);
    // With a fused layout up follows gate; otherwise both share the rows.
    const int64_t up_offset = s.in_stride >= 2 * s.n ? s.n : 0;
    std::vector<float> expected(s.n_tokens * s.n);
    for (int64_t t = 0; t < s.n_tokens; ++t) {
      kernels::SiluMul(&gate_up_f[t * s.in_stride], &gate_up_f[t * s.in_stride + up_offset], s.n,
                       &expected[t * s.n]);
    }
    ASSERT_OK_AND_ASSIGN(DeviceBuffer d_in, Upload(gate_up));
    // One row of slack past the output, which must stay poisoned.
    ASSERT_OK_AND_ASSIGN(DeviceBuffer d_out, Poisoned<uint16_t>(expected.size() + s.n));
    const auto* in = d_in.as<__nv_bfloat16>();
    ASSERT_OK(SiluMul(in, in + up_offset, s.n, d_out.as<__nv_bfloat16>(), s.n_tokens, s.in_stride,
                      stream_));
    ASSERT_OK(Sync());
    ASSERT_OK_AND_ASSIGN(std::vector<uint16_t> out, d_out.ToHost<uint16_t>());
    for (int64_t i = 0; i < s.n; ++i) {
      ASSERT_TRUE(std::isnan(BF16ToFloat(out[expected.size() + i]))) << "wrote past the end";
    }
    out.resize(expected.size());
    EXPECT_TRUE(AllClose(Bf16ToF32(out), expected, 1e-7, kBf16RelTol))
        << "n_tokens=" << s.n_tokens << " n=" << s.n;
  }
}

std::vector<float> InvFreq(int64_t rot_dim, double base) {
  std::vector<float> inv_freq(rot_dim / 2);
  for (size_t i = 0; i < inv_freq.size(); ++i) {
    inv_freq[i] = static_cast<float>(std::pow(base, -2.0 * static_cast<double>(i) / rot_dim));
  }
  return inv_freq;
}

TEST_F(ElementwiseCudaTest, RopeMatchesCpuInBothStyles) {
  struct Shape {
    int64_t n_tokens, n_heads, head_dim, rot_dim, x_stride;
  };
  std::mt19937 rng(14);
  // Strides wider than the heads stand for Q or K inside a fused QKV row.
  for (const Shape& s : {Shape{1, 1, 64, 64, 64}, Shape{17, 9, 64, 64, 9 * 64 + 2 * 3 * 64},
                         Shape{1031, 4, 128, 96, 4 * 128 + 8}, Shape{5, 32, 128, 128, 32 * 128},
                         Shape{3, 2, 64, 2, 130}}) {
    for (RopeStyle style : {RopeStyle::kAdjacent, RopeStyle::kHalf}) {
      const std::vector<float> inv_freq = InvFreq(s.rot_dim, 500000.0);
      std::vector<int32_t> positions(s.n_tokens);
      std::uniform_int_distribution<int32_t> any_position(0, 131071);
      for (int32_t& p : positions) p = any_position(rng);
      positions[0] = 0;
      if (s.n_tokens > 2) positions[1] = 1, positions[2] = 131071;
      const std::vector<uint16_t> x = RandomBf16(s.n_tokens * s.x_stride, 1.0f, rng);

      std::vector<float> expected = Bf16ToF32(x);
      for (int64_t t = 0; t < s.n_tokens; ++t) {
        kernels::ApplyRope(&expected[t * s.x_stride], s.n_heads, s.head_dim, s.rot_dim,
                           positions[t], inv_freq.data(), style);
      }
      ASSERT_OK_AND_ASSIGN(DeviceBuffer d_x, Upload(x));
      ASSERT_OK_AND_ASSIGN(DeviceBuffer d_positions, Upload(positions));
      ASSERT_OK_AND_ASSIGN(DeviceBuffer d_inv_freq, Upload(inv_freq));
      ASSERT_OK(ApplyRope(d_x.as<__nv_bfloat16>(), s.n_heads, s.head_dim, s.rot_dim,
                          d_positions.as<int32_t>(), d_inv_freq.as<float>(), style, s.n_tokens,
                          s.x_stride, stream_));
      ASSERT_OK(Sync());
      ASSERT_OK_AND_ASSIGN(const std::vector<uint16_t> out, d_x.ToHost<uint16_t>());
      const std::vector<float> got = Bf16ToF32(out);
      // Rotated dims within tolerance; everything else (dims past rot_dim,
      // the rest of the row) bit for bit unchanged.
      for (size_t i = 0; i < x.size(); ++i) {
        const int64_t in_row = static_cast<int64_t>(i) % s.x_stride;
        const bool rotated = in_row < s.n_heads * s.head_dim && in_row % s.head_dim < s.rot_dim;
        if (!rotated) {
          ASSERT_EQ(out[i], x[i]) << "changed element " << i;
        }
      }
      std::vector<float> rotated_got, rotated_expected;
      for (size_t i = 0; i < x.size(); ++i) {
        const int64_t in_row = static_cast<int64_t>(i) % s.x_stride;
        if (in_row < s.n_heads * s.head_dim && in_row % s.head_dim < s.rot_dim) {
          rotated_got.push_back(got[i]);
          rotated_expected.push_back(expected[i]);
        }
      }
      EXPECT_TRUE(AllClose(rotated_got, rotated_expected, 1e-5, kBf16RelTol))
          << "n_tokens=" << s.n_tokens << " heads=" << s.n_heads << " rot_dim=" << s.rot_dim
          << " style=" << static_cast<int>(style);
    }
  }
}

TEST_F(ElementwiseCudaTest, AddBiasRoundsOnceAndLeavesTheStrideGapAlone) {
  std::mt19937 rng(14);
  for (const RowShape& s : kRowShapes) {
    const int64_t stride = s.n + 5;  // a slice of a wider (fused) row
    const std::vector<uint16_t> x = RandomBf16(s.n_tokens * stride, 1.0f, rng);
    const std::vector<float> bias = RandomF32(s.n, 0.5f, rng);
    std::vector<uint16_t> expected = x;
    for (int64_t t = 0; t < s.n_tokens; ++t) {
      for (int64_t i = 0; i < s.n; ++i) {
        uint16_t& v = expected[t * stride + i];
        v = FloatToBF16(BF16ToFloat(v) + bias[i]);
      }
    }
    ASSERT_OK_AND_ASSIGN(DeviceBuffer d_x, Upload(x));
    ASSERT_OK_AND_ASSIGN(DeviceBuffer d_bias, Upload(bias));
    ASSERT_OK(AddBias(d_x.as<__nv_bfloat16>(), d_bias.as<float>(), s.n, s.n_tokens, stride,
                      stream_));
    ASSERT_OK(Sync());
    ASSERT_OK_AND_ASSIGN(const std::vector<uint16_t> got, d_x.ToHost<uint16_t>());
    EXPECT_EQ(got, expected) << "n_tokens=" << s.n_tokens << " n=" << s.n;
  }
}

TEST_F(ElementwiseCudaTest, GatherRowsCopiesTheChosenRows) {
  std::mt19937 rng(15);
  for (const RowShape& s : kRowShapes) {
    const std::vector<uint16_t> x = RandomBf16(s.n_tokens * s.n, 1.0f, rng);
    // Every other row, the last one, and one row twice.
    std::vector<int32_t> rows;
    for (int64_t t = 0; t < s.n_tokens; t += 2) rows.push_back(static_cast<int32_t>(t));
    rows.push_back(static_cast<int32_t>(s.n_tokens - 1));
    rows.push_back(0);
    std::vector<uint16_t> expected;
    for (int32_t r : rows) {
      expected.insert(expected.end(), x.begin() + r * s.n, x.begin() + (r + 1) * s.n);
    }
    ASSERT_OK_AND_ASSIGN(DeviceBuffer d_x, Upload(x));
    ASSERT_OK_AND_ASSIGN(DeviceBuffer d_rows, Upload(rows));
    ASSERT_OK_AND_ASSIGN(DeviceBuffer d_out, Poisoned<uint16_t>(expected.size()));
    ASSERT_OK(GatherRows(d_x.as<__nv_bfloat16>(), s.n, d_rows.as<int32_t>(),
                         d_out.as<__nv_bfloat16>(), static_cast<int64_t>(rows.size()), stream_));
    ASSERT_OK(Sync());
    ASSERT_OK_AND_ASSIGN(const std::vector<uint16_t> got, d_out.ToHost<uint16_t>());
    EXPECT_EQ(got, expected) << "n_tokens=" << s.n_tokens << " n=" << s.n;
  }
}

TEST_F(ElementwiseCudaTest, ScatterInt32WritesOnlyTheGivenEntries) {
  std::mt19937 rng(16);
  for (int64_t n : {1, 17, 1031}) {
    std::vector<int32_t> table(3 * n + 5);
    for (int32_t& v : table) v = static_cast<int32_t>(rng() % 1000);
    std::vector<int32_t> offsets(table.size());
    std::iota(offsets.begin(), offsets.end(), 0);
    std::shuffle(offsets.begin(), offsets.end(), rng);
    offsets.resize(n);
    std::vector<int32_t> values(n);
    for (int32_t& v : values) v = -static_cast<int32_t>(rng() % 1000) - 1;
    std::vector<int32_t> expected = table;
    for (int64_t i = 0; i < n; ++i) expected[offsets[i]] = values[i];
    ASSERT_OK_AND_ASSIGN(DeviceBuffer d_table, Upload(table));
    ASSERT_OK_AND_ASSIGN(DeviceBuffer d_offsets, Upload(offsets));
    ASSERT_OK_AND_ASSIGN(DeviceBuffer d_values, Upload(values));
    ASSERT_OK(ScatterInt32(d_table.as<int32_t>(), d_offsets.as<int32_t>(), d_values.as<int32_t>(),
                           n, stream_));
    ASSERT_OK(Sync());
    ASSERT_OK_AND_ASSIGN(const std::vector<int32_t> got, d_table.ToHost<int32_t>());
    EXPECT_EQ(got, expected) << "n=" << n;
  }
}

// Argument checks come before any CUDA call, so these need no GPU.
TEST(ElementwiseCudaArgsTest, RejectsBadShapesWithoutLaunching) {
  EXPECT_EQ(
      ApplyRope(nullptr, 2, 64, 63, nullptr, nullptr, RopeStyle::kHalf, 1, 128, nullptr).code(),
      absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(
      ApplyRope(nullptr, 2, 64, 66, nullptr, nullptr, RopeStyle::kHalf, 1, 128, nullptr).code(),
      absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(
      ApplyRope(nullptr, 2, 64, 64, nullptr, nullptr, RopeStyle::kHalf, 1, 127, nullptr).code(),
      absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(SiluMul(nullptr, nullptr, 64, nullptr, 1, 63, nullptr).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(RmsNorm(nullptr, nullptr, 1e-5f, 0, nullptr, 1, nullptr).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(AddBias(nullptr, nullptr, 64, 1, 63, nullptr).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(GatherRows(nullptr, 0, nullptr, nullptr, 1, nullptr).code(),
            absl::StatusCode::kInvalidArgument);
  // Nothing to do is not an error, and launches nothing.
  EXPECT_TRUE(AddBias(nullptr, nullptr, 64, 0, 64, nullptr).ok());
  EXPECT_TRUE(GatherRows(nullptr, 64, nullptr, nullptr, 0, nullptr).ok());
  EXPECT_TRUE(RmsNorm(nullptr, nullptr, 1e-5f, 64, nullptr, 0, nullptr).ok());
  EXPECT_TRUE(AddRmsNorm(nullptr, nullptr, nullptr, 1e-5f, 64, nullptr, 0, nullptr).ok());
  EXPECT_TRUE(SiluMul(nullptr, nullptr, 64, nullptr, 0, 64, nullptr).ok());
}

}  // namespace
}  // namespace morphserve::kernels::cuda
