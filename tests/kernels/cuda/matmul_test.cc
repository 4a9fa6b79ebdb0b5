// cuBLAS products against the CPU reference matmul on the same bf16 values,
// with strided inputs and outputs: the output's stride padding must stay
// poisoned, everything else written.
#include "kernels/cuda/matmul.h"

#include <gtest/gtest.h>

#include <cmath>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/fp16.h"
#include "kernels/cpu/matmul.h"
#include "kernels/cuda/cuda_status.h"
#include "tests/kernels/cuda/cuda_test_util.h"

namespace morphserve::kernels::cuda {
namespace {

using testing::Bf16ToF32;
using testing::kBf16RelTol;
using testing::Poisoned;
using testing::RandomBf16;
using testing::Upload;

struct Shape {
  int64_t n_tokens, rows, cols, x_pad, y_pad;
};

std::string Describe(const Shape& s) {
  return absl::StrCat("t", s.n_tokens, "_rows", s.rows, "_cols", s.cols, "_xpad", s.x_pad, "_ypad",
                      s.y_pad);
}
void PrintTo(const Shape& s, std::ostream* os) { *os << Describe(s); }
std::string ShapeName(const ::testing::TestParamInfo<Shape>& info) { return Describe(info.param); }

class MatMulCudaTest : public testing::CudaTest, public ::testing::WithParamInterface<Shape> {};

TEST_P(MatMulCudaTest, MatchesCpuReference) {
  const Shape s = GetParam();
  std::mt19937 rng(static_cast<uint32_t>(s.rows * 13 + s.cols + s.n_tokens));
  const int64_t x_stride = s.cols + s.x_pad;
  const int64_t y_stride = s.rows + s.y_pad;
  const std::vector<uint16_t> w = RandomBf16(s.rows * s.cols, 0.05f, rng);
  const std::vector<uint16_t> x = RandomBf16(s.n_tokens * x_stride, 1.0f, rng);

  const std::vector<float> x_f = Bf16ToF32(x);
  std::vector<float> expected(s.n_tokens * y_stride);
  const kernels::MatMulArgs cpu{DType::kBF16, w.data(),   static_cast<size_t>(s.cols) * 2,
                                s.rows,       s.cols,     x_f.data(),
                                x_stride,     s.n_tokens, expected.data(),
                                y_stride};
  MatMulReference(cpu);
  // f32 accumulation over `cols` products: allow a small multiple of the
  // rounding of the sum of the products' magnitudes.
  std::vector<double> magnitude(expected.size());
  const std::vector<float> w_f = Bf16ToF32(w);
  for (int64_t t = 0; t < s.n_tokens; ++t) {
    for (int64_t r = 0; r < s.rows; ++r) {
      double sum = 0.0;
      for (int64_t k = 0; k < s.cols; ++k) {
        sum += std::fabs(double{w_f[r * s.cols + k]} * x_f[t * x_stride + k]);
      }
      magnitude[t * y_stride + r] = sum;
    }
  }

  ASSERT_OK_AND_ASSIGN(Cublas cublas, Cublas::Create());
  ASSERT_OK_AND_ASSIGN(DeviceBuffer d_w, Upload(w));
  ASSERT_OK_AND_ASSIGN(DeviceBuffer d_x, Upload(x));
  for (DType y_type : {DType::kF32, DType::kBF16}) {
    const bool f32 = y_type == DType::kF32;
    // Run on the test's stream, then on the legacy default stream, so the
    // handle is rebound (with its workspace) in between.
    for (cudaStream_t stream : {stream_, cudaStream_t{nullptr}}) {
      ASSERT_OK_AND_ASSIGN(DeviceBuffer d_y, f32 ? Poisoned<float>(expected.size())
                                                 : Poisoned<uint16_t>(expected.size()));
      MatMulArgs args;
      args.w = d_w.as<__nv_bfloat16>();
      args.rows = s.rows;
      args.cols = s.cols;
      args.x = d_x.as<__nv_bfloat16>();
      args.x_stride = x_stride;
      args.n_tokens = s.n_tokens;
      args.y = d_y.data();
      args.y_stride = y_stride;
      args.y_type = y_type;
      ASSERT_OK(MatMul(args, cublas, stream));
      ASSERT_OK(CudaStatus(cudaStreamSynchronize(stream), "cudaStreamSynchronize"));
      std::vector<float> got(expected.size());
      if (f32) {
        ASSERT_OK_AND_ASSIGN(got, d_y.ToHost<float>());
      } else {
        ASSERT_OK_AND_ASSIGN(const std::vector<uint16_t> bits, d_y.ToHost<uint16_t>());
        got = Bf16ToF32(bits);
      }
      size_t bad = 0;
      for (int64_t t = 0; t < s.n_tokens; ++t) {
        for (int64_t r = 0; r < y_stride; ++r) {
          const size_t i = t * y_stride + r;
          if (r >= s.rows) {
            if (!std::isnan(got[i])) ++bad;  // padding must stay untouched
            continue;
          }
          const double tol =
              1e-4 * magnitude[i] + (f32 ? 0.0 : kBf16RelTol * std::fabs(expected[i]));
          if (!(std::fabs(double{got[i]} - expected[i]) <= tol)) {
            if (bad++ == 0) {
              ADD_FAILURE() << "token " << t << " row " << r << ": got " << got[i] << ", expected "
                            << expected[i] << " within " << tol;
            }
          }
        }
      }
      EXPECT_EQ(bad, 0u) << (f32 ? "f32" : "bf16") << " output, "
                         << (stream == nullptr ? "default" : "test") << " stream";
    }
  }
}

// Token counts 1, 17 and 1000+; sizes off every multiple of 8; padded
// strides (odd leading dimensions) and a vocabulary-sized product.
INSTANTIATE_TEST_SUITE_P(Shapes, MatMulCudaTest,
                         ::testing::Values(Shape{1, 1, 1, 0, 0}, Shape{17, 576, 576, 3, 5},
                                           Shape{1031, 64, 1537, 1, 0}, Shape{3, 1000, 4096, 0, 7},
                                           Shape{1, 49152, 576, 0, 0}, Shape{129, 1536, 576, 8, 8}),
                         ShapeName);

}  // namespace
}  // namespace morphserve::kernels::cuda
