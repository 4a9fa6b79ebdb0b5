// GPU decode attention against the CPU's PagedAttentionHead on the same
// bf16 values (widened to f32), for batches of sequences with scrambled
// block tables. Slots outside every context hold NaN, so reading one shows.
#include "kernels/cuda/paged_attention.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kernels/cpu/paged_attention.h"
#include "tests/kernels/cuda/cuda_test_util.h"

namespace morphserve::kernels::cuda {
namespace {

using testing::AllClose;
using testing::Bf16ToF32;
using testing::kBf16RelTol;
using testing::Poisoned;
using testing::RandomBf16;
using testing::ScrambleBlockTables;
using testing::ScrambledTables;
using testing::Upload;

struct Shape {
  std::vector<int32_t> context_lens;
  int64_t block_size, num_heads, num_kv_heads, head_dim;
  int64_t extra_max_context = 0;  // max_context_len beyond the longest context
};

// "ctx_1_17_bs16_h8_kv2_d128", plus "_max<N>" for a raised max_context_len:
// the test's name and its parameter as ctest shows it.
std::string Describe(const Shape& s) {
  std::string name = "ctx";
  for (int32_t len : s.context_lens) absl::StrAppend(&name, "_", len);
  absl::StrAppend(&name, "_bs", s.block_size, "_h", s.num_heads, "_kv", s.num_kv_heads, "_d",
                  s.head_dim);
  if (s.extra_max_context > 0) absl::StrAppend(&name, "_max", s.extra_max_context);
  return name;
}
void PrintTo(const Shape& s, std::ostream* os) { *os << Describe(s); }
std::string ShapeName(const ::testing::TestParamInfo<Shape>& info) { return Describe(info.param); }

class PagedAttentionCudaTest : public testing::CudaTest,
                               public ::testing::WithParamInterface<Shape> {};

TEST_P(PagedAttentionCudaTest, MatchesCpuReference) {
  const Shape& s = GetParam();
  const int64_t num_seqs = static_cast<int64_t>(s.context_lens.size());
  const int64_t hd = s.head_dim;
  std::mt19937 rng(static_cast<uint32_t>(s.context_lens[0] * 7 + s.num_heads * 3 + hd));

  const ScrambledTables scrambled = ScrambleBlockTables(s.context_lens, s.block_size, rng);
  const std::vector<int32_t>& tables = scrambled.tables;
  const int64_t table_stride = scrambled.stride;
  const int64_t pool_blocks = scrambled.pool_blocks;

  // Random keys and values in every slot some context covers, NaN elsewhere.
  const int64_t block_elems = s.num_kv_heads * s.block_size * hd;
  std::vector<uint16_t> k_cache(pool_blocks * block_elems, 0xffff);
  std::vector<uint16_t> v_cache(k_cache.size(), 0xffff);
  for (int64_t q = 0; q < num_seqs; ++q) {
    for (int64_t slot = 0; slot < s.context_lens[q]; ++slot) {
      const int64_t block = tables[q * table_stride + slot / s.block_size];
      for (int64_t h = 0; h < s.num_kv_heads; ++h) {
        const int64_t at = ((block * s.num_kv_heads + h) * s.block_size + slot % s.block_size) * hd;
        const std::vector<uint16_t> k = RandomBf16(hd, 1.0f, rng);
        const std::vector<uint16_t> v = RandomBf16(hd, 1.0f, rng);
        std::copy(k.begin(), k.end(), &k_cache[at]);
        std::copy(v.begin(), v.end(), &v_cache[at]);
      }
    }
  }
  // Queries inside fused QKV rows.
  const int64_t q_stride = (s.num_heads + 2 * s.num_kv_heads) * hd;
  const std::vector<uint16_t> q = RandomBf16(num_seqs * q_stride, 1.0f, rng);

  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  const std::vector<float> k_f = Bf16ToF32(k_cache);
  const std::vector<float> v_f = Bf16ToF32(v_cache);
  const std::vector<float> q_f = Bf16ToF32(q);
  std::vector<float> expected(num_seqs * s.num_heads * hd);
  for (int64_t seq = 0; seq < num_seqs; ++seq) {
    kernels::PagedAttentionArgs cpu;
    cpu.k_cache = k_f.data();
    cpu.v_cache = v_f.data();
    cpu.block_table = &tables[seq * table_stride];
    cpu.context_len = s.context_lens[seq];
    cpu.block_size = s.block_size;
    cpu.num_heads = s.num_heads;
    cpu.num_kv_heads = s.num_kv_heads;
    cpu.head_dim = hd;
    cpu.scale = scale;
    for (int64_t h = 0; h < s.num_heads; ++h) {
      PagedAttentionHead(cpu, &q_f[seq * q_stride + h * hd], h,
                         &expected[(seq * s.num_heads + h) * hd]);
    }
  }

  const int64_t max_context =
      *std::max_element(s.context_lens.begin(), s.context_lens.end()) + s.extra_max_context;
  const size_t scratch_bytes = PagedAttentionScratchBytes(num_seqs, s.num_heads, hd, max_context);
  ASSERT_EQ(scratch_bytes == 0, max_context <= kPartitionSize);
  ASSERT_OK_AND_ASSIGN(DeviceBuffer d_k, Upload(k_cache));
  ASSERT_OK_AND_ASSIGN(DeviceBuffer d_v, Upload(v_cache));
  ASSERT_OK_AND_ASSIGN(DeviceBuffer d_tables, Upload(tables));
  ASSERT_OK_AND_ASSIGN(DeviceBuffer d_lens, Upload(s.context_lens));
  ASSERT_OK_AND_ASSIGN(DeviceBuffer d_q, Upload(q));
  ASSERT_OK_AND_ASSIGN(DeviceBuffer d_out, Poisoned<uint16_t>(expected.size()));
  ASSERT_OK_AND_ASSIGN(DeviceBuffer d_scratch, Poisoned<uint8_t>(scratch_bytes));

  PagedAttentionArgs args;
  args.k_cache = d_k.as<__nv_bfloat16>();
  args.v_cache = d_v.as<__nv_bfloat16>();
  args.block_tables = d_tables.as<int32_t>();
  args.block_table_stride = table_stride;
  args.context_lens = d_lens.as<int32_t>();
  args.max_context_len = max_context;
  args.num_seqs = num_seqs;
  args.block_size = s.block_size;
  args.num_heads = s.num_heads;
  args.num_kv_heads = s.num_kv_heads;
  args.head_dim = hd;
  args.scale = scale;
  ASSERT_OK(PagedAttention(args, d_q.as<__nv_bfloat16>(), q_stride, d_out.as<__nv_bfloat16>(),
                           d_scratch.data(), stream_));
  ASSERT_OK(Sync());
  ASSERT_OK_AND_ASSIGN(const std::vector<uint16_t> out, d_out.ToHost<uint16_t>());
  const std::vector<float> got = Bf16ToF32(out);
  for (int64_t seq = 0; seq < num_seqs; ++seq) {
    const size_t begin = seq * s.num_heads * hd;
    const size_t n = s.num_heads * hd;
    EXPECT_TRUE(AllClose(std::span(got).subspan(begin, n), std::span(expected).subspan(begin, n),
                         5e-5, kBf16RelTol))
        << "sequence " << seq << " of context " << s.context_lens[seq];
  }
}

// Group sizes 1, 3, 4, 8 and 12 (two blocks of heads per KV head); head
// dims 64, 128, 256; contexts of 0, 1, 17 and past several partitions,
// half-filled last blocks, odd block sizes; max_context_len above every
// context, so that whole partitions have nothing to do.
INSTANTIATE_TEST_SUITE_P(
    Shapes, PagedAttentionCudaTest,
    ::testing::Values(Shape{{1}, 16, 1, 1, 64}, Shape{{17}, 16, 3, 1, 64},
                      Shape{{1, 17, 33}, 16, 8, 2, 128}, Shape{{1031, 5, 600}, 16, 16, 2, 128},
                      Shape{{2500, 1}, 16, 4, 4, 64, 700}, Shape{{513, 512, 1024}, 7, 9, 3, 64},
                      Shape{{0, 40}, 16, 12, 1, 128}, Shape{{1000}, 32, 24, 3, 256},
                      Shape{{300, 77}, 16, 32, 4, 128, 300}, Shape{{1500}, 16, 12, 4, 128},
                      Shape{{4097, 2, 511}, 16, 24, 3, 64}),
    ShapeName);

// Argument checks come before any CUDA call, so these need no GPU.
TEST(PagedAttentionArgsTest, RejectsBadShapesWithoutLaunching) {
  alignas(16) static const __nv_bfloat16 cache[8] = {};
  PagedAttentionArgs good;
  good.k_cache = cache;
  good.v_cache = cache;
  good.max_context_len = 100;
  good.num_seqs = 1;
  good.block_size = 16;
  good.num_heads = 8;
  good.num_kv_heads = 2;
  good.head_dim = 128;
  auto code = [](const PagedAttentionArgs& a, int64_t q_stride, void* scratch) {
    return PagedAttention(a, nullptr, q_stride, nullptr, scratch, nullptr).code();
  };
  PagedAttentionArgs a = good;
  a.head_dim = 96;
  EXPECT_EQ(code(a, 8 * 128, nullptr), absl::StatusCode::kInvalidArgument);
  a = good;
  a.num_kv_heads = 3;
  EXPECT_EQ(code(a, 8 * 128, nullptr), absl::StatusCode::kInvalidArgument);
  a = good;
  a.k_cache = cache + 1;
  EXPECT_EQ(code(a, 8 * 128, nullptr), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(code(good, 8 * 128 - 1, nullptr), absl::StatusCode::kInvalidArgument);
  a = good;
  a.max_context_len = kPartitionSize + 1;  // needs scratch
  EXPECT_EQ(code(a, 8 * 128, nullptr), absl::StatusCode::kInvalidArgument);
  a = good;
  a.num_seqs = 0;
  EXPECT_TRUE(PagedAttention(a, nullptr, 8 * 128, nullptr, nullptr, nullptr).ok());
}

TEST(PagedAttentionArgsTest, ScratchOnlyForSplitContexts) {
  EXPECT_EQ(PagedAttentionScratchBytes(4, 8, 128, 0), 0u);
  EXPECT_EQ(PagedAttentionScratchBytes(4, 8, 128, kPartitionSize), 0u);
  // Two partitions: their outputs, maxima and exp sums, per sequence and head.
  EXPECT_EQ(PagedAttentionScratchBytes(4, 8, 128, kPartitionSize + 1),
            4u * 8 * 2 * (128 + 2) * sizeof(float));
}

}  // namespace
}  // namespace morphserve::kernels::cuda
