// GPU prefill attention against the CPU's PagedAttentionHead on the same
// bf16 values (widened to f32), run once per query token with that token's
// causal context, for batches of chunks with scrambled block tables. Slots
// no chunk has written hold NaN, so reading one shows.
#include "kernels/cuda/prefill_attention.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <ostream>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kernels/cpu/paged_attention.h"
#include "tests/kernels/cuda/cuda_test_util.h"

namespace morphserve::kernels::cuda {
namespace {

using testing::Bf16ToF32;
using testing::Poisoned;
using testing::RandomBf16;
using testing::ScrambleBlockTables;
using testing::ScrambledTables;
using testing::Upload;

// One sequence's chunk: `len` query tokens at cache slots start .. start +
// len - 1, after `start` tokens cached by earlier steps.
struct Chunk {
  int32_t start = 0;
  int32_t len = 0;
};

struct Shape {
  std::vector<Chunk> chunks;
  int64_t block_size, num_heads, num_kv_heads, head_dim;
  int64_t extra_max_query = 0;  // max_query_len beyond the longest chunk
};

// "at0n17_at40n1_bs16_h8_kv2_d128", plus "_max<N>" for a raised
// max_query_len: the test's name and its parameter as ctest shows it.
std::string Describe(const Shape& s) {
  std::string name;
  for (const Chunk& c : s.chunks) absl::StrAppend(&name, "at", c.start, "n", c.len, "_");
  absl::StrAppend(&name, "bs", s.block_size, "_h", s.num_heads, "_kv", s.num_kv_heads, "_d",
                  s.head_dim);
  if (s.extra_max_query > 0) absl::StrAppend(&name, "_max", s.extra_max_query);
  return name;
}
void PrintTo(const Shape& s, std::ostream* os) { *os << Describe(s); }
std::string ShapeName(const ::testing::TestParamInfo<Shape>& info) { return Describe(info.param); }

// The kernel weighs the values with softmax weights rounded to bf16 (each
// off by up to 2^-9 of itself, and their sum with it) and rounds the output
// to bf16, so an element may move by 2^-9 of magnitude = sum_j w_j |v_j|
// (the same attention over |V|) plus 2 * 2^-9 of itself. Passes when
// got[i] is within twice that of expected[i]; a NaN (an element never
// written) fails.
::testing::AssertionResult WithinWeightRounding(std::span<const float> got,
                                                std::span<const float> expected,
                                                std::span<const float> magnitude) {
  size_t bad = 0;
  size_t first = 0;
  double first_tol = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double tol = 1e-5 + (magnitude[i] + 2 * std::fabs(expected[i])) / 256;
    if (std::isnan(got[i]) || !(std::fabs(double{got[i]} - expected[i]) <= tol)) {
      if (bad++ == 0) {
        first = i;
        first_tol = tol;
      }
    }
  }
  if (bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << bad << " of " << got.size() << " elements off; first at " << first << ": got "
         << got[first] << (std::isnan(got[first]) ? " (never written)" : "") << ", expected "
         << expected[first] << " within " << first_tol;
}

class PrefillAttentionCudaTest : public testing::CudaTest,
                                 public ::testing::WithParamInterface<Shape> {};

TEST_P(PrefillAttentionCudaTest, MatchesCpuReferencePerToken) {
  const Shape& s = GetParam();
  const int64_t num_seqs = static_cast<int64_t>(s.chunks.size());
  const int64_t hd = s.head_dim;
  std::mt19937 rng(static_cast<uint32_t>(s.chunks[0].len * 7 + s.num_heads * 3 + hd));

  // Each sequence's cache holds its earlier chunks and this one.
  std::vector<int32_t> cached(num_seqs);
  std::vector<int32_t> starts(num_seqs);
  std::vector<int32_t> offsets(num_seqs + 1, 0);
  for (int64_t seq = 0; seq < num_seqs; ++seq) {
    cached[seq] = s.chunks[seq].start + s.chunks[seq].len;
    starts[seq] = s.chunks[seq].start;
    offsets[seq + 1] = offsets[seq] + s.chunks[seq].len;
  }
  const int64_t n_tokens = offsets[num_seqs];
  const ScrambledTables scrambled = ScrambleBlockTables(cached, s.block_size, rng);
  const std::vector<int32_t>& tables = scrambled.tables;
  const int64_t table_stride = scrambled.stride;

  // Random keys and values in every cached slot, NaN elsewhere.
  const int64_t block_elems = s.num_kv_heads * s.block_size * hd;
  std::vector<uint16_t> k_cache(scrambled.pool_blocks * block_elems, 0xffff);
  std::vector<uint16_t> v_cache(k_cache.size(), 0xffff);
  for (int64_t seq = 0; seq < num_seqs; ++seq) {
    for (int64_t slot = 0; slot < cached[seq]; ++slot) {
      const int64_t block = tables[seq * table_stride + slot / s.block_size];
      for (int64_t h = 0; h < s.num_kv_heads; ++h) {
        const int64_t at = ((block * s.num_kv_heads + h) * s.block_size + slot % s.block_size) * hd;
        const std::vector<uint16_t> k = RandomBf16(hd, 1.0f, rng);
        const std::vector<uint16_t> v = RandomBf16(hd, 1.0f, rng);
        std::copy(k.begin(), k.end(), &k_cache[at]);
        std::copy(v.begin(), v.end(), &v_cache[at]);
      }
    }
  }
  // Queries inside fused QKV rows. A larger spread than the keys' makes the
  // softmax peaked, as trained models' often are.
  const int64_t q_stride = (s.num_heads + 2 * s.num_kv_heads) * hd;
  const std::vector<uint16_t> q = RandomBf16(n_tokens * q_stride, 2.0f, rng);

  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  const std::vector<float> k_f = Bf16ToF32(k_cache);
  const std::vector<float> v_f = Bf16ToF32(v_cache);
  std::vector<float> v_abs(v_f.size());  // for the tolerance's magnitude
  std::transform(v_f.begin(), v_f.end(), v_abs.begin(), [](float x) { return std::fabs(x); });
  const std::vector<float> q_f = Bf16ToF32(q);
  std::vector<float> expected(n_tokens * s.num_heads * hd);
  std::vector<float> magnitude(expected.size());
  for (int64_t seq = 0; seq < num_seqs; ++seq) {
    kernels::PagedAttentionArgs cpu;
    cpu.k_cache = k_f.data();
    cpu.v_cache = v_f.data();
    cpu.block_table = &tables[seq * table_stride];
    cpu.block_size = s.block_size;
    cpu.num_heads = s.num_heads;
    cpu.num_kv_heads = s.num_kv_heads;
    cpu.head_dim = hd;
    cpu.scale = scale;
    kernels::PagedAttentionArgs cpu_abs = cpu;
    cpu_abs.v_cache = v_abs.data();
    for (int64_t i = 0; i < s.chunks[seq].len; ++i) {
      // Query token i sees the earlier chunks and its own chunk up to itself.
      cpu.context_len = cpu_abs.context_len = s.chunks[seq].start + i + 1;
      const int64_t token = offsets[seq] + i;
      for (int64_t h = 0; h < s.num_heads; ++h) {
        const float* query = &q_f[token * q_stride + h * hd];
        const int64_t at = (token * s.num_heads + h) * hd;
        PagedAttentionHead(cpu, query, h, &expected[at]);
        PagedAttentionHead(cpu_abs, query, h, &magnitude[at]);
      }
    }
  }

  int32_t longest = 0;
  for (const Chunk& c : s.chunks) longest = std::max(longest, c.len);
  ASSERT_OK_AND_ASSIGN(DeviceBuffer d_k, Upload(k_cache));
  ASSERT_OK_AND_ASSIGN(DeviceBuffer d_v, Upload(v_cache));
  ASSERT_OK_AND_ASSIGN(DeviceBuffer d_tables, Upload(tables));
  ASSERT_OK_AND_ASSIGN(DeviceBuffer d_offsets, Upload(offsets));
  ASSERT_OK_AND_ASSIGN(DeviceBuffer d_starts, Upload(starts));
  ASSERT_OK_AND_ASSIGN(DeviceBuffer d_q, Upload(q));
  ASSERT_OK_AND_ASSIGN(DeviceBuffer d_out, Poisoned<uint16_t>(expected.size()));

  PrefillAttentionArgs args;
  args.k_cache = d_k.as<__nv_bfloat16>();
  args.v_cache = d_v.as<__nv_bfloat16>();
  args.block_tables = d_tables.as<int32_t>();
  args.block_table_stride = table_stride;
  args.query_offsets = d_offsets.as<int32_t>();
  args.chunk_starts = d_starts.as<int32_t>();
  args.max_query_len = longest + s.extra_max_query;
  args.num_seqs = num_seqs;
  args.block_size = s.block_size;
  args.num_heads = s.num_heads;
  args.num_kv_heads = s.num_kv_heads;
  args.head_dim = hd;
  args.scale = scale;
  ASSERT_OK(PrefillAttention(args, d_q.as<__nv_bfloat16>(), q_stride, d_out.as<__nv_bfloat16>(),
                             stream_));
  ASSERT_OK(Sync());
  ASSERT_OK_AND_ASSIGN(const std::vector<uint16_t> out, d_out.ToHost<uint16_t>());
  const std::vector<float> got = Bf16ToF32(out);
  const size_t token_elems = s.num_heads * hd;
  for (int64_t seq = 0; seq < num_seqs; ++seq) {
    for (int64_t i = 0; i < s.chunks[seq].len; ++i) {
      const size_t begin = (offsets[seq] + i) * token_elems;
      const ::testing::AssertionResult close =
          WithinWeightRounding(std::span(got).subspan(begin, token_elems),
                               std::span(expected).subspan(begin, token_elems),
                               std::span(magnitude).subspan(begin, token_elems));
      // One report per sequence: its first bad token.
      if (!close) {
        ADD_FAILURE() << close.message() << "\nsequence " << seq << ", query token " << i
                      << " at slot " << s.chunks[seq].start + i;
        break;
      }
    }
  }
}

// Chunks of 1, 17, 100+ and 1000+ tokens, first chunks (start 0) and later
// ones; several sequences of different lengths in one launch, an empty
// chunk among them; GQA groups 1, 2, 3, 4, 8 and 12; head dims 64, 128 and
// 256; block sizes 1, 7 and 16 with half-filled last blocks; max_query_len
// above every chunk, so that whole tiles have nothing to do.
INSTANTIATE_TEST_SUITE_P(Shapes, PrefillAttentionCudaTest,
                         ::testing::Values(Shape{{{0, 1}}, 16, 1, 1, 64},
                                           Shape{{{0, 17}}, 16, 3, 1, 64},
                                           Shape{{{0, 100}, {62, 17}, {5, 1}}, 7, 8, 2, 128},
                                           Shape{{{200, 33}, {0, 0}, {16, 40}}, 1, 8, 1, 128, 9},
                                           Shape{{{3, 20}, {50, 9}}, 16, 12, 1, 64},
                                           Shape{{{20, 70}, {0, 5}}, 16, 8, 2, 256},
                                           Shape{{{512, 130}, {1000, 64}, {63, 2}}, 16, 4, 1, 128},
                                           Shape{{{0, 1030}, {100, 3}}, 16, 2, 1, 64},
                                           Shape{{{40, 1100}}, 16, 4, 4, 128, 200}),
                         ShapeName);

// Argument checks come before any CUDA call, so these need no GPU.
TEST(PrefillAttentionArgsTest, RejectsBadShapesWithoutLaunching) {
  alignas(16) static const __nv_bfloat16 buffer[8] = {};
  PrefillAttentionArgs good;
  good.k_cache = buffer;
  good.v_cache = buffer;
  good.max_query_len = 100;
  good.num_seqs = 1;
  good.block_size = 16;
  good.num_heads = 8;
  good.num_kv_heads = 2;
  good.head_dim = 128;
  const int64_t stride = 12 * 128;
  auto code = [](const PrefillAttentionArgs& a, const __nv_bfloat16* q, int64_t q_stride) {
    return PrefillAttention(a, q, q_stride, nullptr, nullptr).code();
  };
  PrefillAttentionArgs a = good;
  a.head_dim = 96;
  EXPECT_EQ(code(a, buffer, stride), absl::StatusCode::kInvalidArgument);
  a = good;
  a.num_kv_heads = 3;
  EXPECT_EQ(code(a, buffer, stride), absl::StatusCode::kInvalidArgument);
  a = good;
  a.num_kv_heads = 0;
  EXPECT_EQ(code(a, buffer, stride), absl::StatusCode::kInvalidArgument);
  a = good;
  a.block_size = 0;
  EXPECT_EQ(code(a, buffer, stride), absl::StatusCode::kInvalidArgument);
  a = good;
  a.max_query_len = -1;
  EXPECT_EQ(code(a, buffer, stride), absl::StatusCode::kInvalidArgument);
  a = good;
  a.v_cache = buffer + 1;
  EXPECT_EQ(code(a, buffer, stride), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(code(good, buffer + 1, stride), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(code(good, buffer, 8 * 128 - 8), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(code(good, buffer, stride + 4), absl::StatusCode::kInvalidArgument);
  // Nothing to do: no launch, and no error from a missing GPU.
  a = good;
  a.num_seqs = 0;
  EXPECT_EQ(code(a, buffer, stride), absl::StatusCode::kOk);
  a = good;
  a.max_query_len = 0;
  EXPECT_EQ(code(a, buffer, stride), absl::StatusCode::kOk);
}

}  // namespace
}  // namespace morphserve::kernels::cuda
