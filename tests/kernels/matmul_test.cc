#include "kernels/cpu/matmul.h"

#include <gtest/gtest.h>

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "common/fp16.h"
#include "kernels/cpu/dequantize.h"
#include "kernels/cpu/matmul_internal.h"
#include "kernels/cpu/packed_blocks.h"
#include "kernels/cpu/quant_blocks.h"
#include "tests/kernels/block_encoders.h"

// Counts heap allocations, to check that MatMul makes none.
std::atomic<int64_t> g_allocations{0};

void* operator new(std::size_t n) {
  g_allocations.fetch_add(1, std::memory_order_relaxed);
  if (void* p = std::malloc(n == 0 ? 1 : n)) return p;
  throw std::bad_alloc();
}
// GCC flags free() on memory from operator new even in the replacement
// operator delete, which is where that pairing is correct.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
#endif
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

namespace morphserve {

// Readable names for the parameterized tests' failure messages.
void PrintTo(DType type, std::ostream* os) { *os << DTypeName(type); }

namespace kernels {
namespace {

using internal::Isa;

constexpr float kGapSentinel = 1234.5f;
constexpr uint8_t kGuardByte = 0xA5;
constexpr size_t kGuardBytes = 64;

std::vector<Isa> SupportedIsas() {
  std::vector<Isa> isas;
  for (Isa isa : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512}) {
    if (internal::IsaSupported(isa)) isas.push_back(isa);
  }
  return isas;
}

ThreadPool* Pool(int threads) {
  static ThreadPool one(1);
  static ThreadPool two(2);
  static ThreadPool three(3);
  return threads == 1 ? &one : threads == 2 ? &two : &three;
}

bool IsBlock32(DType t) {
  return t == DType::kQ4_0 || t == DType::kQ4_1 || t == DType::kQ5_0 || t == DType::kQ5_1 ||
         t == DType::kQ8_0;
}
bool IsFloat(DType t) { return t == DType::kF32 || t == DType::kF16 || t == DType::kBF16; }

// The layouts MatMul reads `type` in.
std::vector<WeightLayout> LayoutsOf(DType type) {
  if (CanPackWeights(type)) return {WeightLayout::kRows, WeightLayout::kPacked};
  return {WeightLayout::kRows};
}

const char* LayoutName(WeightLayout layout) {
  return layout == WeightLayout::kPacked ? "packed" : "rows";
}

// A weight matrix and activations with padded strides: the x padding holds
// NaN so that reading past `cols` shows up in the results.
struct Problem {
  DType type;
  int64_t rows;
  int64_t cols;
  int64_t n_tokens;
  int64_t x_stride;
  int64_t y_stride;
  std::vector<uint8_t> w;
  std::vector<uint8_t> packed;  // w in the packed layout, where the type has one
  std::vector<float> w_f32;     // dequantized, for error bounds
  std::vector<float> x;

  // Refreshes `packed` from `w`.
  void Pack() {
    if (!CanPackWeights(type)) return;
    packed.assign(PackedWeightBytes(type, rows, cols), 0xEE);
    PackWeights(type, w.data(), RowBytes(type, cols), rows, cols, packed.data());
  }

  MatMulArgs Args(float* y, WeightLayout layout = WeightLayout::kRows) const {
    return MatMulArgs{.w_type = type,
                      .w = layout == WeightLayout::kPacked ? packed.data() : w.data(),
                      .w_row_bytes = RowBytes(type, cols),
                      .rows = rows,
                      .cols = cols,
                      .x = x.data(),
                      .x_stride = x_stride,
                      .n_tokens = n_tokens,
                      .y = y,
                      .y_stride = y_stride,
                      .w_layout = layout};
  }
};

// With `exact`, each block of 32 activations holds integers times 2^-15 with
// one at +-32767: 16-bit activation quantization then loses nothing.
Problem MakeProblem(DType type, int64_t rows, int64_t cols, int64_t n_tokens, bool exact,
                    std::mt19937& rng) {
  Problem p{type, rows, cols, n_tokens, cols + 3, rows + 2, {}, {}, {}, {}};
  p.w = testing::RandomMatrix(type, rows, cols, rng);
  p.w_f32.resize(static_cast<size_t>(rows * cols));
  for (int64_t r = 0; r < rows; ++r) {
    DequantizeRow(type, p.w.data() + r * RowBytes(type, cols), p.w_f32.data() + r * cols, cols);
  }
  p.x.assign(static_cast<size_t>(n_tokens * p.x_stride), std::numeric_limits<float>::quiet_NaN());
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  std::uniform_int_distribution<int> small_int(-kActMax, kActMax);
  for (int64_t t = 0; t < n_tokens; ++t) {
    float* x = p.x.data() + t * p.x_stride;
    for (int64_t k = 0; k < cols; ++k) {
      if (exact) {
        x[k] = static_cast<float>(k % 32 == 0 ? ((k / 32) % 2 ? -kActMax : kActMax)
                                              : small_int(rng)) /
               32768.0f;
      } else {
        x[k] = uniform(rng) * (k % 97 == 5 ? 8.0f : 1.0f);  // some outliers
      }
    }
  }
  p.Pack();
  return p;
}

// Relative f32 rounding allowed for the sum of |w x|.
constexpr double kF32Rounding = 1e-6;

// Worst-case error of 16-bit symmetric activation quantization (half a step
// of each activation block, plus the rounding of x / d, times |w|) plus f32
// rounding.
double ErrorBound(const Problem& p, int64_t r, int64_t t, bool quantized) {
  const float* w = p.w_f32.data() + r * p.cols;
  const float* x = p.x.data() + t * p.x_stride;
  const int64_t block = !quantized ? 1 : IsBlock32(p.type) ? kQK : kQKK;
  double bound = 0.0;
  double magnitude = 0.0;
  for (int64_t k0 = 0; k0 < p.cols; k0 += block) {
    double amax = 0.0;
    for (int64_t k = k0; k < k0 + block; ++k) amax = std::max(amax, std::fabs(double{x[k]}));
    for (int64_t k = k0; k < k0 + block; ++k) {
      if (quantized) bound += std::fabs(double{w[k]}) * amax * 0.51 / kActMax;
      magnitude += std::fabs(double{w[k]} * x[k]);
    }
  }
  return bound + kF32Rounding * magnitude + 1e-7;
}

std::vector<float> PoisonedY(const Problem& p) {
  std::vector<float> y(static_cast<size_t>(p.n_tokens * p.y_stride), kGapSentinel);
  for (int64_t t = 0; t < p.n_tokens; ++t) {
    for (int64_t r = 0; r < p.rows; ++r) {
      y[t * p.y_stride + r] = std::numeric_limits<float>::quiet_NaN();
    }
  }
  return y;
}

// Runs MatMul on `isa`; checks the y gaps and the scratch guard bytes.
std::vector<float> RunMatMul(const Problem& p, Isa isa, ThreadPool* pool,
                             WeightLayout layout = WeightLayout::kRows) {
  std::vector<float> y = PoisonedY(p);
  const size_t scratch_bytes = MatMulScratchBytes(p.type, p.cols, p.n_tokens);
  // Offset by one byte: MatMul must not rely on the scratch alignment.
  std::vector<uint8_t> scratch(scratch_bytes + 1 + kGuardBytes, kGuardByte);
  internal::MatMulWithIsa(p.Args(y.data(), layout), scratch.data() + 1, pool, isa);
  EXPECT_EQ(scratch[0], kGuardByte);
  for (size_t i = scratch_bytes + 1; i < scratch.size(); ++i) {
    EXPECT_EQ(scratch[i], kGuardByte) << "scratch overrun at " << i - 1;
  }
  for (int64_t t = 0; t < p.n_tokens; ++t) {
    for (int64_t r = p.rows; r < p.y_stride; ++r) {
      EXPECT_EQ(y[t * p.y_stride + r], kGapSentinel) << "gap written at t=" << t << " r=" << r;
    }
  }
  return y;
}

std::string Describe(const Problem& p, Isa isa, int threads,
                     WeightLayout layout = WeightLayout::kRows) {
  return std::string(DTypeName(p.type)) + " rows=" + std::to_string(p.rows) +
         " cols=" + std::to_string(p.cols) + " tokens=" + std::to_string(p.n_tokens) +
         " isa=" + internal::IsaName(isa) + " threads=" + std::to_string(threads) +
         " layout=" + LayoutName(layout);
}

std::vector<int64_t> ColsFor(DType t) {
  if (IsFloat(t)) return {1, 13, 67, 576};
  if (IsBlock32(t)) return {32, 96, 608};
  return {256, 768};
}

class MatMulTypeTest : public ::testing::TestWithParam<DType> {};

TEST_P(MatMulTypeTest, MatchesReferenceWithinActivationQuantization) {
  const DType type = GetParam();
  std::mt19937 rng(static_cast<unsigned>(type) + 100);
  for (int64_t rows : {1, 3, 17, 100}) {
    for (int64_t cols : ColsFor(type)) {
      for (int64_t n_tokens : {1, 2, 5, 33}) {
        const Problem p = MakeProblem(type, rows, cols, n_tokens, /*exact=*/false, rng);
        std::vector<float> ref = PoisonedY(p);
        MatMulReference(p.Args(ref.data()));
        for (Isa isa : SupportedIsas()) {
          for (WeightLayout layout : LayoutsOf(type)) {
            for (int threads : {1, 2, 3}) {
              const std::vector<float> y = RunMatMul(p, isa, Pool(threads), layout);
              for (int64_t t = 0; t < n_tokens; ++t) {
                for (int64_t r = 0; r < rows; ++r) {
                  const size_t i = static_cast<size_t>(t * p.y_stride + r);
                  ASSERT_TRUE(std::isfinite(y[i]))
                      << Describe(p, isa, threads, layout) << " t=" << t << " r=" << r;
                  ASSERT_NEAR(y[i], ref[i], ErrorBound(p, r, t, !IsFloat(type)))
                      << Describe(p, isa, threads, layout) << " t=" << t << " r=" << r;
                }
              }
            }
          }
        }
      }
    }
  }
}

// With activations that 16-bit quantization represents exactly, the integer
// dot products must reproduce the reference up to f32 rounding.
TEST_P(MatMulTypeTest, ExactActivationsMatchReferenceTightly) {
  const DType type = GetParam();
  std::mt19937 rng(static_cast<unsigned>(type) + 200);
  for (int64_t n_tokens : {1, 3, 6}) {
    const Problem p =
        MakeProblem(type, 19, IsFloat(type) ? 64 : 512, n_tokens, /*exact=*/true, rng);
    std::vector<float> ref = PoisonedY(p);
    MatMulReference(p.Args(ref.data()));
    for (Isa isa : SupportedIsas()) {
      for (WeightLayout layout : LayoutsOf(type)) {
        const std::vector<float> y = RunMatMul(p, isa, Pool(2), layout);
        for (int64_t t = 0; t < n_tokens; ++t) {
          for (int64_t r = 0; r < p.rows; ++r) {
            const size_t i = static_cast<size_t>(t * p.y_stride + r);
            ASSERT_NEAR(y[i], ref[i], ErrorBound(p, r, t, /*quantized=*/false))
                << Describe(p, isa, 2, layout) << " t=" << t << " r=" << r;
          }
        }
      }
    }
  }
}

// The SIMD kernels see the same quantized activations as the scalar ones,
// so they differ only in the order of f32 additions; the packed kernels do
// the same f32 operations in the same order on every ISA, so they agree
// bit for bit.
TEST_P(MatMulTypeTest, SimdMatchesScalar) {
  const DType type = GetParam();
  std::mt19937 rng(static_cast<unsigned>(type) + 300);
  for (int64_t n_tokens : {1, 4, 7}) {
    const int64_t cols = ColsFor(type).back();
    const Problem p = MakeProblem(type, 37, cols, n_tokens, /*exact=*/false, rng);
    for (WeightLayout layout : LayoutsOf(type)) {
      const std::vector<float> scalar = RunMatMul(p, Isa::kScalar, Pool(1), layout);
      for (Isa isa : SupportedIsas()) {
        if (isa == Isa::kScalar) continue;
        const std::vector<float> y = RunMatMul(p, isa, Pool(3), layout);
        for (int64_t t = 0; t < n_tokens; ++t) {
          for (int64_t r = 0; r < p.rows; ++r) {
            const size_t i = static_cast<size_t>(t * p.y_stride + r);
            if (layout == WeightLayout::kPacked) {
              ASSERT_EQ(y[i], scalar[i]) << Describe(p, isa, 3, layout) << " t=" << t << " r=" << r;
            } else {
              ASSERT_NEAR(y[i], scalar[i], ErrorBound(p, r, t, /*quantized=*/false))
                  << Describe(p, isa, 3, layout) << " t=" << t << " r=" << r;
            }
          }
        }
      }
    }
  }
}

TEST_P(MatMulTypeTest, DefaultEntryPointWithAndWithoutPool) {
  const DType type = GetParam();
  std::mt19937 rng(static_cast<unsigned>(type) + 400);
  const Problem p = MakeProblem(type, 40, ColsFor(type).back(), 3, /*exact=*/false, rng);
  std::vector<float> ref = PoisonedY(p);
  MatMulReference(p.Args(ref.data()));
  std::vector<uint8_t> scratch(MatMulScratchBytes(type, p.cols, p.n_tokens));
  for (ThreadPool* pool : {Pool(2), static_cast<ThreadPool*>(nullptr)}) {
    std::vector<float> y = PoisonedY(p);
    MatMul(p.Args(y.data()), scratch.data(), pool);
    for (int64_t t = 0; t < p.n_tokens; ++t) {
      for (int64_t r = 0; r < p.rows; ++r) {
        const size_t i = static_cast<size_t>(t * p.y_stride + r);
        ASSERT_NEAR(y[i], ref[i], ErrorBound(p, r, t, !IsFloat(type))) << "t=" << t << " r=" << r;
      }
    }
  }
}

// A token's outputs are bit-identical whether it is computed alone, in a
// small batch or in a large one, on any thread count: the kernels sum each
// (row, token) product in one order whatever the tiling.
TEST_P(MatMulTypeTest, OutputsDoNotDependOnTheBatch) {
  const DType type = GetParam();
  std::mt19937 rng(static_cast<unsigned>(type) + 500);
  const int64_t cols = ColsFor(type).back();
  const Problem p = MakeProblem(type, 21, cols, 38, /*exact=*/false, rng);
  for (Isa isa : SupportedIsas()) {
    for (WeightLayout layout : LayoutsOf(type)) {
      const std::vector<float> batch = RunMatMul(p, isa, Pool(3), layout);
      // Sub-batches of 1, 2, 3, 5 and 7 tokens at every offset.
      for (int64_t n : {1, 2, 3, 5, 7}) {
        for (int64_t t0 = 0; t0 + n <= p.n_tokens; t0 += n) {
          std::vector<float> y(static_cast<size_t>(n * p.y_stride));
          std::vector<uint8_t> scratch(MatMulScratchBytes(type, cols, n));
          MatMulArgs args = p.Args(y.data(), layout);
          args.x = p.x.data() + t0 * p.x_stride;
          args.n_tokens = n;
          internal::MatMulWithIsa(args, scratch.data(), Pool(n % 2 + 1), isa);
          for (int64_t t = 0; t < n; ++t) {
            ASSERT_EQ(std::memcmp(y.data() + t * p.y_stride, batch.data() + (t0 + t) * p.y_stride,
                                  static_cast<size_t>(p.rows) * sizeof(float)),
                      0)
                << Describe(p, isa, 3, layout) << " token " << t0 + t << " in a batch of " << n;
          }
        }
      }
    }
  }
}

// Weights and activations at the extremes of their ranges, signs aligned so
// that every product adds up: the int32 sums must not overflow.
TEST_P(MatMulTypeTest, ExtremeValuesDoNotOverflow) {
  const DType type = GetParam();
  if (IsFloat(type)) GTEST_SKIP();
  const DTypeInfo& info = GetDTypeInfo(type);
  testing::BlockContent c;
  c.d = FloatToHalf(1.0f);
  c.m = FloatToHalf(type == DType::kQ4_1 || type == DType::kQ5_1 ? 0.5f : 1.0f);
  // The quant whose integer factor is largest (negative where signed).
  const int q = type == DType::kQ8_0                            ? -128
                : type == DType::kQ4_0 || type == DType::kQ5_0 ? 0
                : type == DType::kQ4_1 || type == DType::kQ4_K ? 15
                : type == DType::kQ6_K                          ? 0
                                                                : 31;
  c.q.assign(static_cast<size_t>(info.block_elems), q);
  if (type == DType::kQ4_K || type == DType::kQ5_K) {
    c.sc.assign(8, 63);
    c.mins.assign(8, 63);
  }
  if (type == DType::kQ6_K) c.sc.assign(16, -128);
  std::mt19937 rng(7);
  Problem p = MakeProblem(type, 3, 4 * kQKK, 5, /*exact=*/false, rng);
  for (size_t i = 0; i < p.w.size(); i += static_cast<size_t>(info.block_bytes)) {
    testing::EncodeBlock(type, c, p.w.data() + i);
  }
  for (int64_t r = 0; r < p.rows; ++r) {
    DequantizeRow(type, p.w.data() + r * RowBytes(type, p.cols), p.w_f32.data() + r * p.cols,
                  p.cols);
  }
  p.Pack();
  for (int64_t t = 0; t < p.n_tokens; ++t) {
    for (int64_t k = 0; k < p.cols; ++k) {
      p.x[static_cast<size_t>(t * p.x_stride + k)] = p.w_f32[k] < 0 ? -1.0f : 1.0f;
    }
  }
  std::vector<float> ref = PoisonedY(p);
  MatMulReference(p.Args(ref.data()));
  for (Isa isa : SupportedIsas()) {
    for (WeightLayout layout : LayoutsOf(type)) {
      const std::vector<float> y = RunMatMul(p, isa, Pool(2), layout);
      for (int64_t t = 0; t < p.n_tokens; ++t) {
        for (int64_t r = 0; r < p.rows; ++r) {
          const size_t i = static_cast<size_t>(t * p.y_stride + r);
          ASSERT_NEAR(y[i], ref[i], ErrorBound(p, r, t, /*quantized=*/true))
              << Describe(p, isa, 2, layout) << " t=" << t << " r=" << r;
        }
      }
    }
  }
}

// Reads a packed matrix back through PackedQuant: every row's scales and
// quants where packed_blocks.h puts them, zeros past the last row.
template <typename Block>
void ExpectPackedHoldsRows(const Problem& p) {
  using Tile = typename PackedOf<Block>::Tile;
  const int64_t nb = p.cols / kQK;
  const auto* tiles = reinterpret_cast<const Tile*>(p.packed.data());
  for (int64_t g = 0; g * kPackRows < p.rows; ++g) {
    for (int64_t b = 0; b < nb; ++b) {
      const Tile& tile = tiles[g * nb + b];
      for (int i = 0; i < kPackGroup; ++i) {
        const int64_t r = g * kPackRows + i;
        const float d = HalfToFloat(tile.d[i]);
        float m = 0.0f;
        if constexpr (kTileHasMin<Tile>) m = HalfToFloat(tile.m[i]);
        for (int k = 0; k < kQK; ++k) {
          const int q = PackedQuant(tile, i, k);
          if (r >= p.rows) {
            ASSERT_EQ(q, 0) << "padding row " << i << " k=" << k;
            ASSERT_EQ(d, 0.0f);
            ASSERT_EQ(m, 0.0f);
            continue;
          }
          const float value = d * static_cast<float>(q - PackedOf<Block>::kOffset) + m;
          ASSERT_FLOAT_EQ(value, p.w_f32[static_cast<size_t>(r * p.cols + kQK * b + k)])
              << "row " << r << " column " << kQK * b + k;
        }
      }
    }
  }
}

TEST_P(MatMulTypeTest, PackedTilesHoldEveryRow) {
  const DType type = GetParam();
  if (!CanPackWeights(type)) {
    EXPECT_FALSE(IsBlock32(type));
    GTEST_SKIP() << "no packed layout";
  }
  std::mt19937 rng(static_cast<unsigned>(type) + 600);
  // Two groups, the second with three rows of padding.
  const Problem p = MakeProblem(type, 13, 96, 1, /*exact=*/false, rng);
  ASSERT_EQ(p.packed.size(), 2u * 3u * static_cast<size_t>(kPackRows) *
                                 static_cast<size_t>(GetDTypeInfo(type).block_bytes));
  // Each row read back from the tiles is bit-identical to the dequantized row.
  std::vector<float> row(static_cast<size_t>(p.cols));
  for (int64_t r = 0; r < p.rows; ++r) {
    DequantizePackedRow(type, p.packed.data(), p.cols, r, row.data());
    ASSERT_EQ(std::memcmp(row.data(), p.w_f32.data() + r * p.cols, row.size() * sizeof(float)), 0)
        << "row " << r;
  }
  switch (type) {
    case DType::kQ4_0:
      return ExpectPackedHoldsRows<BlockQ4_0>(p);
    case DType::kQ4_1:
      return ExpectPackedHoldsRows<BlockQ4_1>(p);
    case DType::kQ5_0:
      return ExpectPackedHoldsRows<BlockQ5_0>(p);
    case DType::kQ5_1:
      return ExpectPackedHoldsRows<BlockQ5_1>(p);
    case DType::kQ8_0:
      return ExpectPackedHoldsRows<BlockQ8_0>(p);
    default:
      FAIL() << "packed without a tile type";
  }
}

INSTANTIATE_TEST_SUITE_P(AllWeightTypes, MatMulTypeTest,
                         ::testing::Values(DType::kF32, DType::kF16, DType::kBF16, DType::kQ4_0,
                                           DType::kQ4_1, DType::kQ5_0, DType::kQ5_1, DType::kQ8_0,
                                           DType::kQ4_K, DType::kQ5_K, DType::kQ6_K),
                         [](const ::testing::TestParamInfo<DType>& param) {
                           return std::string(DTypeName(param.param));
                         });

TEST(MatMulTest, ReferenceOnHandComputedCase) {
  // W = [[1, 2, 3], [-1, 0.5, 0]], two tokens with padded strides.
  const float w[6] = {1.0f, 2.0f, 3.0f, -1.0f, 0.5f, 0.0f};
  const float x[8] = {1.0f, 1.0f, 1.0f, 99.0f, 2.0f, -4.0f, 0.5f, 99.0f};
  float y[6] = {0.0f, 0.0f, kGapSentinel, 0.0f, 0.0f, kGapSentinel};
  MatMulReference(MatMulArgs{DType::kF32, w, 3 * sizeof(float), 2, 3, x, 4, 2, y, 3});
  EXPECT_EQ(y[0], 6.0f);
  EXPECT_EQ(y[1], -0.5f);
  EXPECT_EQ(y[2], kGapSentinel);
  EXPECT_EQ(y[3], 2.0f - 8.0f + 1.5f);
  EXPECT_EQ(y[4], -2.0f - 2.0f);
  EXPECT_EQ(y[5], kGapSentinel);
}

TEST(MatMulTest, ScratchSize) {
  EXPECT_EQ(MatMulScratchBytes(DType::kF32, 576, 8), 0u);
  EXPECT_EQ(MatMulScratchBytes(DType::kF16, 576, 8), 0u);
  EXPECT_GE(MatMulScratchBytes(DType::kQ4_1, 576, 8),
            8u * (576 * sizeof(int16_t) + 18 * sizeof(ActScale32)));
  EXPECT_GE(MatMulScratchBytes(DType::kQ6_K, 512, 3),
            3u * (512 * sizeof(int16_t) + 2 * sizeof(ActScaleK)));
}

TEST(MatMulTest, EmptyShapesWriteNothing) {
  std::mt19937 rng(5);
  Problem p = MakeProblem(DType::kQ8_0, 4, 64, 2, /*exact=*/false, rng);
  std::vector<float> y(16, kGapSentinel);
  std::vector<uint8_t> scratch(MatMulScratchBytes(DType::kQ8_0, 64, 2));
  MatMulArgs args = p.Args(y.data());
  args.n_tokens = 0;
  MatMul(args, scratch.data(), Pool(2));
  args.n_tokens = 2;
  args.rows = 0;
  MatMul(args, scratch.data(), Pool(2));
  for (float v : y) EXPECT_EQ(v, kGapSentinel);
}

TEST(MatMulTest, AllocatesNothing) {
  std::mt19937 rng(6);
  for (DType type : {DType::kQ4_1, DType::kQ6_K, DType::kF16}) {
    const Problem p = MakeProblem(type, 64, ColsFor(type).back(), 3, /*exact=*/false, rng);
    std::vector<float> y = PoisonedY(p);
    std::vector<uint8_t> scratch(MatMulScratchBytes(type, p.cols, p.n_tokens));
    for (WeightLayout layout : LayoutsOf(type)) {
      MatMul(p.Args(y.data(), layout), scratch.data(), Pool(2));  // the first call picks the ISA
      const int64_t before = g_allocations.load();
      MatMul(p.Args(y.data(), layout), scratch.data(), Pool(2));
      EXPECT_EQ(g_allocations.load(), before) << DTypeName(type) << " " << LayoutName(layout);
    }
  }
}

TEST(MatMulTest, BestIsaIsSupported) {
  EXPECT_TRUE(internal::IsaSupported(Isa::kScalar));
  EXPECT_TRUE(internal::IsaSupported(internal::BestIsa()));
}

// Every ISA's activation quantizer yields byte-identical rows, each value
// within half a step (plus the rounding of x / d) of its input, with
// consistent sums.
TEST(MatMulTest, ActivationQuantizersAgree) {
  std::mt19937 rng(9);
  std::uniform_real_distribution<float> uniform(-5.0f, 5.0f);
  constexpr int64_t kN = 768;
  std::vector<float> x(kN);
  for (float& v : x) v = uniform(rng);
  for (int k = 64; k < 96; ++k) x[k] = 0.0f;  // an all-zero block
  x[200] = 1e4f;
  for (int k = 512; k < 768; ++k) x[k] *= 1e-37f;  // too small to scale

  const size_t bytes32 = kN * sizeof(int16_t) + kN / kQK * sizeof(ActScale32);
  const size_t bytes_k = kN * sizeof(int16_t) + kN / kQKK * sizeof(ActScaleK);
  std::vector<int16_t> scalar32(bytes32 / sizeof(int16_t));
  std::vector<int16_t> scalar_k(bytes_k / sizeof(int16_t));
  internal::ScalarKernels().quantize_block32(x.data(), kN, scalar32.data());
  internal::ScalarKernels().quantize_superblock(x.data(), kN, scalar_k.data());
  const ActScale32* s32 = ActScales<ActScale32>(scalar32.data(), kN);
  const ActScaleK* sk = ActScales<ActScaleK>(scalar_k.data(), kN);
  for (int64_t b = 0; b < kN / kQK; ++b) {
    int sum = 0;
    for (int64_t k = kQK * b; k < kQK * (b + 1); ++k) {
      if (k >= 512) {
        EXPECT_EQ(scalar32[k], 0) << k;
      } else {
        EXPECT_LE(std::fabs(s32[b].d * scalar32[k] - x[k]), 0.51f * s32[b].d) << k;
      }
      sum += scalar32[k];
    }
    EXPECT_FLOAT_EQ(s32[b].sum, s32[b].d * static_cast<float>(sum));
  }
  EXPECT_EQ(s32[2].d, 0.0f);
  for (int64_t b = 0; b < kN / kQKK; ++b) {
    for (int s = 0; s < kQKK / kQK; ++s) {
      int sum = 0;
      for (int64_t k = kQKK * b + kQK * s; k < kQKK * b + kQK * (s + 1); ++k) {
        if (k < 512) {
          EXPECT_LE(std::fabs(sk[b].d * scalar_k[k] - x[k]), 0.51f * sk[b].d) << k;
        }
        sum += scalar_k[k];
      }
      EXPECT_EQ(sk[b].sums[s], sum);
    }
  }

  for (Isa isa : SupportedIsas()) {
    const internal::KernelTable& table = internal::KernelsFor(isa);
    std::vector<int16_t> q32(scalar32.size());
    std::vector<int16_t> qk(scalar_k.size());
    table.quantize_block32(x.data(), kN, q32.data());
    table.quantize_superblock(x.data(), kN, qk.data());
    EXPECT_EQ(std::memcmp(q32.data(), scalar32.data(), bytes32), 0) << internal::IsaName(isa);
    EXPECT_EQ(std::memcmp(qk.data(), scalar_k.data(), bytes_k), 0) << internal::IsaName(isa);
  }
}

}  // namespace
}  // namespace kernels
}  // namespace morphserve
