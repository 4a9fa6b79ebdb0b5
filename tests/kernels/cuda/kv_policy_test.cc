// The KV policy kernels that sum attention, against the CPU path: H2O's
// accumulation and SnapKV's pooled scores against PagedKeyLogits,
// MaskedSoftmaxRows and FuseRows (kernels/cpu/kv_scoring.h) on the same bf16
// values, used as KvSequence uses them. Batches with scrambled block tables;
// outputs start poisoned, and cache rows and query values no kernel may read
// are NaN, so reading or writing the wrong one shows. The selection and the
// compaction are in kv_selection_test.cc and kv_compaction_test.cc.

#include "kernels/cuda/kv_policy.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <numeric>
#include <ostream>
#include <random>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/fp16.h"
#include "common/kv_policy.h"
#include "common/thread_pool.h"
#include "engine/kv/kv_sequence.h"
#include "engine/kv/paged_kv_cache.h"
#include "kernels/cpu/kv_scoring.h"
#include "kernels/cuda/cuda_status.h"
#include "tests/kernels/cuda/cuda_test_util.h"
#include "tests/kernels/cuda/kv_policy_test_util.h"

namespace morphserve::kernels::cuda {
namespace {

using testing::AllClose;
using testing::Bf16ToF32;
using testing::Cache;
using testing::kNanBf16;
using testing::MakeCache;
using testing::Poisoned;
using testing::RandomBf16;
using testing::Upload;

// Same inputs on both sides and f32 after, so scores differ only by the
// order of operations and exp's accuracy (as in kv_scoring_test.cc).
constexpr double kScoreAbsTol = 1e-7;
constexpr double kScoreRelTol = 1e-4;

// What KvSequence does with the CPU kernels for one KV head: each row's
// softmax over its first row_len[r] slots, summed per slot.
std::vector<float> CpuRowSums(const std::vector<float>& k_f, const Cache& c, int64_t seq,
                              int64_t kv_head, int64_t slots, const std::vector<float>& rows,
                              const std::vector<int64_t>& row_len, float scale) {
  const int64_t num_rows = static_cast<int64_t>(row_len.size());
  const kernels::PagedKeys keys{k_f.data(),   &c.tables[seq * c.table_stride],
                                c.block_size, c.num_kv_heads,
                                kv_head,      c.head_dim,
                                slots};
  std::vector<float> logits(std::max<int64_t>(num_rows * slots, 1));
  std::vector<float> sums(std::max<int64_t>(slots, 1));
  kernels::PagedKeyLogits(keys, rows.data(), c.head_dim, num_rows, scale, logits.data(), slots);
  kernels::MaskedSoftmaxRows(logits.data(), num_rows, slots, slots, nullptr, row_len.data());
  kernels::FuseRows(logits.data(), num_rows, 1, slots, slots, /*max_fusion=*/false, sums.data());
  sums.resize(slots);
  return sums;
}

// ---------------------------------------------------------------------------
// H2O.

struct H2oShape {
  std::vector<int32_t> slots;   // per sequence, after the step
  std::vector<int32_t> tokens;  // per sequence, this step
  int64_t block_size, num_heads, num_kv_heads, head_dim;
  bool reset;
};

std::string Describe(const H2oShape& s) {
  std::string name;
  for (size_t i = 0; i < s.slots.size(); ++i) {
    absl::StrAppend(&name, "s", s.slots[i], "n", s.tokens[i], "_");
  }
  absl::StrAppend(&name, "bs", s.block_size, "_h", s.num_heads, "_kv", s.num_kv_heads, "_d",
                  s.head_dim, s.reset ? "_reset" : "");
  return name;
}
void PrintTo(const H2oShape& s, std::ostream* os) { *os << Describe(s); }
std::string H2oName(const ::testing::TestParamInfo<H2oShape>& info) { return Describe(info.param); }

class H2oAccumulateCudaTest : public testing::CudaTest,
                              public ::testing::WithParamInterface<H2oShape> {};

TEST_P(H2oAccumulateCudaTest, AddsCausalSoftmaxSumsLikeKvSequence) {
  const H2oShape& s = GetParam();
  std::mt19937 rng(static_cast<uint32_t>(s.slots[0] * 13 + s.tokens[0] * 7 + s.num_heads * 3 +
                                         s.head_dim + s.block_size));
  const int64_t num_seqs = static_cast<int64_t>(s.slots.size());
  const int64_t d = s.head_dim;
  const int64_t group = s.num_heads / s.num_kv_heads;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  const Cache c = MakeCache(s.slots, s.block_size, s.num_kv_heads, d, rng);
  const int64_t max_slots = *std::max_element(s.slots.begin(), s.slots.end()) + 5;
  const int64_t max_tokens = *std::max_element(s.tokens.begin(), s.tokens.end()) + 2;

  // The step's queries inside fused QKV rows, sequence after sequence, and
  // a spare row at the end; only the query heads of real tokens hold
  // numbers.
  const int64_t q_stride = (s.num_heads + 2 * s.num_kv_heads) * d;
  std::vector<int32_t> query_start = {0};
  for (int32_t n : s.tokens) query_start.push_back(query_start.back() + n);
  std::vector<uint16_t> q((query_start.back() + 1) * q_stride, kNanBf16);
  for (int64_t t = 0; t < query_start.back(); ++t) {
    const std::vector<uint16_t> row = RandomBf16(s.num_heads * d, 1.0f, rng);
    std::copy(row.begin(), row.end(), &q[t * q_stride]);
  }

  // Running scores: small, so that a probability missing or added shows;
  // NaN past each sequence's slots, which must stay so.
  const int64_t scores_stride = max_slots + 3;
  std::vector<float> scores(num_seqs * s.num_kv_heads * scores_stride, NAN);
  std::vector<int32_t> reset(num_seqs * s.num_kv_heads, -1);
  std::uniform_real_distribution<float> small(0.0f, 0.01f);
  for (int64_t seq = 0; seq < num_seqs; ++seq) {
    for (int64_t h = 0; h < s.num_kv_heads; ++h) {
      float* row = &scores[(seq * s.num_kv_heads + h) * scores_stride];
      for (int64_t j = 0; j < s.slots[seq]; ++j) row[j] = small(rng);
      if (s.reset && s.slots[seq] > 0) {
        reset[seq * s.num_kv_heads + h] =
            std::uniform_int_distribution<int32_t>(0, s.slots[seq] - 1)(rng);
      }
    }
  }

  // The CPU: KvSequence::AccumulateH2o's rows and row lengths.
  const std::vector<float> k_f = Bf16ToF32(c.k);
  const std::vector<float> q_f = Bf16ToF32(q);
  std::vector<float> want = scores;
  for (int64_t seq = 0; seq < num_seqs; ++seq) {
    const int64_t slots = s.slots[seq];
    const int64_t n = s.tokens[seq];
    if (slots == 0) continue;
    for (int64_t h = 0; h < s.num_kv_heads; ++h) {
      std::vector<float> rows(std::max<int64_t>(n * group * d, 1));
      std::vector<int64_t> row_len(n * group);
      for (int64_t i = 0; i < n; ++i) {
        for (int64_t g = 0; g < group; ++g) {
          std::copy_n(&q_f[(query_start[seq] + i) * q_stride + (h * group + g) * d], d,
                      &rows[(i * group + g) * d]);
          row_len[i * group + g] = slots - n + i + 1;
        }
      }
      const std::vector<float> sums = CpuRowSums(k_f, c, seq, h, slots, rows, row_len, scale);
      float* out = &want[(seq * s.num_kv_heads + h) * scores_stride];
      const int32_t r = reset[seq * s.num_kv_heads + h];
      if (r >= 0) out[r] = 0.0f;
      for (int64_t j = 0; j < slots; ++j) out[j] += sums[j];
    }
  }

  ASSERT_OK_AND_ASSIGN(DeviceBuffer d_k, Upload(c.k));
  ASSERT_OK_AND_ASSIGN(DeviceBuffer d_tables, Upload(c.tables));
  ASSERT_OK_AND_ASSIGN(DeviceBuffer d_slots, Upload(s.slots));
  ASSERT_OK_AND_ASSIGN(DeviceBuffer d_start, Upload(query_start));
  ASSERT_OK_AND_ASSIGN(DeviceBuffer d_reset, Upload(reset));
  ASSERT_OK_AND_ASSIGN(DeviceBuffer d_q, Upload(q));
  ASSERT_OK_AND_ASSIGN(DeviceBuffer d_scores, Upload(scores));
  ASSERT_OK_AND_ASSIGN(DeviceBuffer d_scratch, Poisoned<uint8_t>(H2oAccumulateScratchBytes(
                                                   num_seqs, s.num_heads, max_tokens, max_slots)));
  H2oAccumulateArgs args;
  args.k_cache = d_k.as<__nv_bfloat16>();
  args.block_tables = d_tables.as<int32_t>();
  args.block_table_stride = c.table_stride;
  args.num_slots = d_slots.as<int32_t>();
  args.query_start = d_start.as<int32_t>();
  args.reset_slots = d_reset.as<int32_t>();
  args.max_slots = max_slots;
  args.max_tokens = max_tokens;
  args.num_seqs = num_seqs;
  args.block_size = s.block_size;
  args.num_heads = s.num_heads;
  args.num_kv_heads = s.num_kv_heads;
  args.head_dim = d;
  args.scale = scale;
  ASSERT_OK(H2oAccumulate(args, d_q.as<__nv_bfloat16>(), q_stride, d_scores.as<float>(),
                          scores_stride, d_scratch.data(), stream_));
  ASSERT_OK(Sync());
  ASSERT_OK_AND_ASSIGN(const std::vector<float> got, d_scores.ToHost<float>());

  for (int64_t seq = 0; seq < num_seqs; ++seq) {
    for (int64_t h = 0; h < s.num_kv_heads; ++h) {
      const std::string where = absl::StrCat("sequence ", seq, ", KV head ", h);
      const int64_t at = (seq * s.num_kv_heads + h) * scores_stride;
      const std::span<const float> got_row(&got[at], scores_stride);
      const std::span<const float> want_row(&want[at], scores_stride);
      EXPECT_TRUE(AllClose(got_row.first(s.slots[seq]), want_row.first(s.slots[seq]), kScoreAbsTol,
                           kScoreRelTol))
          << where;
      EXPECT_TRUE(std::all_of(got_row.begin() + s.slots[seq], got_row.end(), [](float x) {
        return std::isnan(x);
      })) << where;
    }
  }
}

// Decode tokens (one token, every slot), prefill chunks from slot 0 and
// after earlier chunks (causal), one whose first rows stop short of the
// second partition, a sequence left alone; lengths 1, 17 and over 1000
// (several partitions); block sizes 1, 7, 16; groups 1, 2, 3, 4, 8; head
// dims 64, 128, 256.
INSTANTIATE_TEST_SUITE_P(Shapes, H2oAccumulateCudaTest,
                         ::testing::Values(H2oShape{{1}, {1}, 16, 1, 1, 64, false},
                                           H2oShape{{17}, {17}, 7, 3, 1, 64, true},
                                           H2oShape{{17, 40, 0}, {12, 1, 0}, 16, 8, 2, 128, true},
                                           H2oShape{{300}, {1}, 1, 8, 1, 64, true},
                                           H2oShape{{20}, {3}, 16, 4, 4, 256, false},
                                           H2oShape{{280}, {40}, 7, 2, 1, 64, true},
                                           H2oShape{{1030, 5}, {1, 5}, 16, 8, 2, 128, true}),
                         H2oName);
// Long prefill chunks: many row chunks per partition.
INSTANTIATE_TEST_SUITE_P(Large, H2oAccumulateCudaTest,
                         ::testing::Values(H2oShape{{1100, 9}, {300, 9}, 16, 12, 4, 128, true},
                                           H2oShape{{1000}, {1000}, 7, 8, 1, 64, false}),
                         H2oName);

// ---------------------------------------------------------------------------
// SnapKV.

struct SnapShape {
  std::vector<int32_t> lengths;  // prompt lengths
  int64_t window, ring_size, block_size, num_heads, num_kv_heads, head_dim;
};

std::string Describe(const SnapShape& s) {
  std::string name = "L";
  for (int32_t n : s.lengths) absl::StrAppend(&name, "_", n);
  absl::StrAppend(&name, "_w", s.window, "_ring", s.ring_size, "_bs", s.block_size, "_h",
                  s.num_heads, "_kv", s.num_kv_heads, "_d", s.head_dim);
  return name;
}
void PrintTo(const SnapShape& s, std::ostream* os) { *os << Describe(s); }
std::string SnapName(const ::testing::TestParamInfo<SnapShape>& info) {
  return Describe(info.param);
}

// SnapKvSelect's pooling of `sums` over the prefix.
std::vector<float> CpuPool(const std::vector<float>& sums, int64_t prefix) {
  const int64_t half = kSnapKvPoolKernel / 2;
  std::vector<float> pooled(prefix);
  for (int64_t j = 0; j < prefix; ++j) {
    float sum = 0.0f;
    for (int64_t k = std::max<int64_t>(0, j - half); k <= std::min(prefix - 1, j + half); ++k) {
      sum += sums[k];
    }
    pooled[j] = sum / static_cast<float>(kSnapKvPoolKernel);
  }
  return pooled;
}

class SnapKvScoresCudaTest : public testing::CudaTest,
                             public ::testing::WithParamInterface<SnapShape> {};

TEST_P(SnapKvScoresCudaTest, PoolsWindowAttentionLikeKvSequence) {
  const SnapShape& s = GetParam();
  std::mt19937 rng(
      static_cast<uint32_t>(s.lengths[0] * 11 + s.window * 5 + s.num_heads * 3 + s.head_dim));
  const int64_t num_seqs = static_cast<int64_t>(s.lengths.size());
  const int64_t d = s.head_dim;
  const int64_t group = s.num_heads / s.num_kv_heads;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  const Cache c = MakeCache(s.lengths, s.block_size, s.num_kv_heads, d, rng);
  const int64_t max_slots = *std::max_element(s.lengths.begin(), s.lengths.end()) + 4;

  // Rings of ring_size query rows per sequence, each row padded by a NaN
  // head, sequences a row apart.
  const int64_t row_stride = (s.num_heads + 1) * d;
  const int64_t seq_stride = (s.ring_size + 1) * row_stride;
  std::vector<uint16_t> ring(num_seqs * seq_stride, kNanBf16);
  for (int64_t seq = 0; seq < num_seqs; ++seq) {
    for (int64_t r = 0; r < s.ring_size; ++r) {
      const std::vector<uint16_t> row = RandomBf16(s.num_heads * d, 1.0f, rng);
      std::copy(row.begin(), row.end(), &ring[seq * seq_stride + r * row_stride]);
    }
  }

  const int64_t pooled_stride = max_slots + 2;
  std::vector<float> want(num_seqs * s.num_kv_heads * pooled_stride, NAN);
  const std::vector<float> k_f = Bf16ToF32(c.k);
  const std::vector<float> ring_f = Bf16ToF32(ring);
  for (int64_t seq = 0; seq < num_seqs; ++seq) {
    const int64_t len = s.lengths[seq];
    if (len <= s.window) continue;
    const int64_t prefix = len - s.window;
    for (int64_t h = 0; h < s.num_kv_heads; ++h) {
      std::vector<float> rows(s.window * group * d);
      std::vector<int64_t> row_len(s.window * group);
      for (int64_t r = 0; r < s.window; ++r) {
        const int64_t p = prefix + r;
        for (int64_t g = 0; g < group; ++g) {
          std::copy_n(
              &ring_f[seq * seq_stride + (p % s.ring_size) * row_stride + (h * group + g) * d], d,
              &rows[(r * group + g) * d]);
          row_len[r * group + g] = p + 1;
        }
      }
      const std::vector<float> pooled =
          CpuPool(CpuRowSums(k_f, c, seq, h, len, rows, row_len, scale), prefix);
      std::copy(pooled.begin(), pooled.end(), &want[(seq * s.num_kv_heads + h) * pooled_stride]);
    }
  }

  std::vector<int32_t> lengths = s.lengths;
  ASSERT_OK_AND_ASSIGN(DeviceBuffer d_k, Upload(c.k));
  ASSERT_OK_AND_ASSIGN(DeviceBuffer d_tables, Upload(c.tables));
  ASSERT_OK_AND_ASSIGN(DeviceBuffer d_lengths, Upload(lengths));
  ASSERT_OK_AND_ASSIGN(DeviceBuffer d_ring, Upload(ring));
  ASSERT_OK_AND_ASSIGN(DeviceBuffer d_pooled, Poisoned<float>(want.size()));
  ASSERT_OK_AND_ASSIGN(DeviceBuffer d_scratch,
                       Poisoned<uint8_t>(SnapKvScoresScratchBytes(
                           num_seqs, s.num_heads, s.num_kv_heads, s.window, max_slots)));
  SnapKvScoresArgs args;
  args.k_cache = d_k.as<__nv_bfloat16>();
  args.block_tables = d_tables.as<int32_t>();
  args.block_table_stride = c.table_stride;
  args.num_tokens = d_lengths.as<int32_t>();
  args.max_slots = max_slots;
  args.num_seqs = num_seqs;
  args.block_size = s.block_size;
  args.num_heads = s.num_heads;
  args.num_kv_heads = s.num_kv_heads;
  args.head_dim = d;
  args.window = s.window;
  args.ring_size = s.ring_size;
  args.scale = scale;
  ASSERT_OK(SnapKvScores(args, d_ring.as<__nv_bfloat16>(), seq_stride, row_stride,
                         d_pooled.as<float>(), pooled_stride, d_scratch.data(), stream_));
  ASSERT_OK(Sync());
  ASSERT_OK_AND_ASSIGN(const std::vector<float> got, d_pooled.ToHost<float>());

  for (int64_t seq = 0; seq < num_seqs; ++seq) {
    const int64_t prefix = std::max<int64_t>(s.lengths[seq] - s.window, 0);
    for (int64_t h = 0; h < s.num_kv_heads; ++h) {
      const std::string where = absl::StrCat("sequence ", seq, ", KV head ", h);
      const int64_t at = (seq * s.num_kv_heads + h) * pooled_stride;
      const std::span<const float> got_row(&got[at], pooled_stride);
      const std::span<const float> want_row(&want[at], pooled_stride);
      EXPECT_TRUE(
          AllClose(got_row.first(prefix), want_row.first(prefix), kScoreAbsTol, kScoreRelTol))
          << where;
      // The window and everything after it stay unwritten.
      EXPECT_TRUE(std::all_of(got_row.begin() + prefix, got_row.end(), [](float x) {
        return std::isnan(x);
      })) << where;
    }
  }
}

// The default window and ring, a prefix of one token, a small window in a
// larger ring that wraps, prompts no longer than the window (left alone),
// over 1000 slots, groups 1, 3, 4, 8, head dims 64, 128, 256.
INSTANTIATE_TEST_SUITE_P(Shapes, SnapKvScoresCudaTest,
                         ::testing::Values(SnapShape{{33}, 32, 32, 16, 1, 1, 64},
                                           SnapShape{{50, 5, 17, 3}, 5, 8, 7, 6, 2, 128},
                                           SnapShape{{45}, 32, 32, 1, 3, 1, 64},
                                           SnapShape{{160, 70}, 6, 40, 16, 12, 3, 256},
                                           SnapShape{{1043}, 3, 4, 16, 4, 1, 128}),
                         SnapName);
INSTANTIATE_TEST_SUITE_P(Large, SnapKvScoresCudaTest,
                         ::testing::Values(SnapShape{{1043, 200}, 32, 32, 16, 8, 1, 64},
                                           SnapShape{{2100}, 32, 32, 7, 32, 8, 128}),
                         SnapName);

// ---------------------------------------------------------------------------
// Argument checks come before any CUDA call, so these need no GPU.

TEST(KvPolicyArgsTest, H2oRejectsBadShapes) {
  alignas(16) static const __nv_bfloat16 cache[8] = {};
  alignas(16) static float scratch[4];
  H2oAccumulateArgs good;
  good.k_cache = cache;
  good.max_slots = 100;
  good.max_tokens = 4;
  good.num_seqs = 1;
  good.block_size = 16;
  good.num_heads = 8;
  good.num_kv_heads = 2;
  good.head_dim = 128;
  const auto code = [](const H2oAccumulateArgs& a, int64_t q_stride, int64_t scores_stride,
                       void* scratch_ptr) {
    return H2oAccumulate(a, nullptr, q_stride, nullptr, scores_stride, scratch_ptr, nullptr).code();
  };
  constexpr auto kBad = absl::StatusCode::kInvalidArgument;
  H2oAccumulateArgs a = good;
  a.head_dim = 96;
  EXPECT_EQ(code(a, 1024, 100, scratch), kBad);
  a = good;
  a.num_kv_heads = 3;
  EXPECT_EQ(code(a, 1024, 100, scratch), kBad);
  a = good;
  a.block_size = 0;
  EXPECT_EQ(code(a, 1024, 100, scratch), kBad);
  a = good;
  a.max_tokens = -1;
  EXPECT_EQ(code(a, 1024, 100, scratch), kBad);
  a = good;
  a.k_cache = cache + 1;
  EXPECT_EQ(code(a, 1024, 100, scratch), kBad);
  a = good;
  a.num_seqs = 70000;
  EXPECT_EQ(code(a, 1024, 100, scratch), kBad);
  EXPECT_EQ(code(good, 1023, 100, scratch), kBad);
  EXPECT_EQ(code(good, 1024, 99, scratch), kBad);
  EXPECT_EQ(code(good, 1024, 100, nullptr), kBad);
  a = good;
  a.num_seqs = 0;
  EXPECT_TRUE(H2oAccumulate(a, nullptr, 1024, nullptr, 100, scratch, nullptr).ok());
}

TEST(KvPolicyArgsTest, SnapKvRejectsBadShapes) {
  alignas(16) static const __nv_bfloat16 cache[8] = {};
  alignas(16) static float scratch[4];
  SnapKvScoresArgs good;
  good.k_cache = cache;
  good.max_slots = 100;
  good.num_seqs = 1;
  good.block_size = 16;
  good.num_heads = 8;
  good.num_kv_heads = 2;
  good.head_dim = 64;
  const auto code = [](const SnapKvScoresArgs& a, int64_t row_stride, int64_t pooled_stride) {
    return SnapKvScores(a, nullptr, 0, row_stride, nullptr, pooled_stride, scratch, nullptr).code();
  };
  constexpr auto kBad = absl::StatusCode::kInvalidArgument;
  SnapKvScoresArgs a = good;
  a.window = 33;  // beyond the ring
  EXPECT_EQ(code(a, 512, 100), kBad);
  a = good;
  a.window = 0;
  EXPECT_EQ(code(a, 512, 100), kBad);
  a = good;
  a.head_dim = 32;
  EXPECT_EQ(code(a, 512, 100), kBad);
  EXPECT_EQ(code(good, 511, 100), kBad);
  EXPECT_EQ(code(good, 512, 99), kBad);
  a = good;
  a.num_seqs = 0;
  EXPECT_TRUE(SnapKvScores(a, nullptr, 0, 512, nullptr, 100, scratch, nullptr).ok());
}

TEST(KvPolicyArgsTest, ScratchGrowsWithRowsAndPartitions) {
  // H2O: a maximum and a sum per (sequence, partition, token, query head).
  EXPECT_EQ(H2oAccumulateScratchBytes(2, 8, 3, kPolicyPartitionSize),
            2u * 2 * 1 * 3 * 8 * sizeof(float));
  EXPECT_EQ(H2oAccumulateScratchBytes(2, 8, 3, 2 * kPolicyPartitionSize + 1),
            2u * 2 * 3 * 3 * 8 * sizeof(float));
  EXPECT_GT(H2oAccumulateScratchBytes(0, 8, 0, 0), 0u);
  // SnapKV: the same for the window's rows, plus the unpooled sums.
  EXPECT_EQ(SnapKvScoresScratchBytes(2, 8, 2, 32, 100),
            (2u * 2 * 1 * 32 * 8 + 2 * 2 * 100) * sizeof(float));
  EXPECT_GT(SnapKvScoresScratchBytes(0, 8, 2, 32, 0), 0u);
}

}  // namespace
}  // namespace morphserve::kernels::cuda
