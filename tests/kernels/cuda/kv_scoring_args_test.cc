// MorphKV's GPU victim choice turns bad arguments away before any CUDA call
// (so these need no GPU), and sizes its device scratch and the statistics
// the decode attention gathers for it per partition.
#include <gtest/gtest.h>

#include <cstdint>

#include "absl/status/status.h"
#include "kernels/cuda/kv_scoring.h"
#include "kernels/cuda/paged_attention.h"

namespace morphserve::kernels::cuda {
namespace {

// Argument checks come before any CUDA call, so these need no GPU.
TEST(MorphKvScoringArgsTest, RejectsBadShapesWithoutLaunching) {
  alignas(16) static const __nv_bfloat16 cache[8] = {};
  alignas(16) static float scratch[4];
  MorphKvScoringArgs good;
  good.k_cache = cache;
  good.max_slots = 100;
  good.num_seqs = 1;
  good.block_size = 16;
  good.num_heads = 8;
  good.num_kv_heads = 2;
  good.head_dim = 128;
  good.window = 8;
  auto code = [](const MorphKvScoringArgs& a, int64_t q_row_stride, int64_t scores_stride,
                 void* scratch_ptr) {
    return MorphKvSelectVictims(a, nullptr, 8 * q_row_stride, q_row_stride, nullptr,
                                static_cast<float*>(scratch_ptr), scores_stride, scratch_ptr,
                                nullptr)
        .code();
  };
  MorphKvScoringArgs a = good;
  a.head_dim = 96;
  EXPECT_EQ(code(a, 8 * 128, 100, scratch), absl::StatusCode::kInvalidArgument);
  a = good;
  a.num_kv_heads = 3;
  EXPECT_EQ(code(a, 8 * 128, 100, scratch), absl::StatusCode::kInvalidArgument);
  a = good;
  a.window = 0;
  EXPECT_EQ(code(a, 8 * 128, 100, scratch), absl::StatusCode::kInvalidArgument);
  a = good;
  a.k_cache = cache + 1;
  EXPECT_EQ(code(a, 8 * 128, 100, scratch), absl::StatusCode::kInvalidArgument);
  a = good;
  a.positions = reinterpret_cast<const int32_t*>(scratch);
  a.positions_stride = 99;
  EXPECT_EQ(code(a, 8 * 128, 100, scratch), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(code(good, 8 * 128 - 1, 100, scratch), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(code(good, 8 * 128, 99, scratch), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(code(good, 8 * 128, 100, nullptr), absl::StatusCode::kInvalidArgument);
  // Group-max-prob scores (W-1) * G rows: at most 2^20.
  a = good;
  a.group_max_prob = true;
  a.window = (1 << 18) + 2;
  EXPECT_EQ(code(a, 8 * 128, 100, scratch), absl::StatusCode::kInvalidArgument);
  a = good;
  a.num_seqs = 0;
  EXPECT_TRUE(
      MorphKvSelectVictims(a, nullptr, 0, 8 * 128, nullptr, nullptr, 0, scratch, nullptr).ok());
}

// The first pass in the attention checks its settings before launching
// anything, as does the rest of the choice.
TEST(MorphKvScoringArgsTest, RejectsBadFusedStatsWithoutLaunching) {
  alignas(16) static const __nv_bfloat16 cache[8] = {};
  alignas(16) static float stats[8];
  static const int32_t index[1] = {0};
  PagedAttentionArgs attention;
  attention.k_cache = cache;
  attention.v_cache = cache;
  attention.max_context_len = 100;
  attention.num_seqs = 1;
  attention.block_size = 16;
  attention.num_heads = 8;
  attention.num_kv_heads = 2;
  attention.head_dim = 128;
  MorphKvFusedStats good;
  good.scored_as = index;
  good.recent_from = index;
  good.q = cache;
  good.q_row_stride = 8 * 128;
  good.window = 8;
  good.num_scored = 1;
  good.max_slots = 100;
  good.stats = stats;
  auto code = [&](const MorphKvFusedStats& f) {
    return PagedAttention(attention, cache, 8 * 128, nullptr, nullptr, nullptr, &f).code();
  };
  MorphKvFusedStats f = good;
  f.window = 0;
  EXPECT_EQ(code(f), absl::StatusCode::kInvalidArgument);
  f = good;
  f.q_row_stride = 8 * 128 - 1;
  EXPECT_EQ(code(f), absl::StatusCode::kInvalidArgument);
  f = good;
  f.stats = stats + 1;
  EXPECT_EQ(code(f), absl::StatusCode::kInvalidArgument);
  f = good;
  f.scored_as = nullptr;
  EXPECT_EQ(code(f), absl::StatusCode::kInvalidArgument);
  f = good;
  f.positions = index;
  f.positions_stride = 99;
  EXPECT_EQ(code(f), absl::StatusCode::kInvalidArgument);
  f = good;
  f.group_max_prob = true;
  f.window = (1 << 18) + 2;
  EXPECT_EQ(code(f), absl::StatusCode::kInvalidArgument);

  MorphKvScoringArgs args;
  args.k_cache = cache;
  args.max_slots = 100;
  args.num_seqs = 1;
  args.block_size = 16;
  args.num_heads = 8;
  args.num_kv_heads = 2;
  args.head_dim = 128;
  args.window = 8;
  EXPECT_EQ(MorphKvSelectVictimsFromStats(args, cache, 0, 8 * 128, nullptr, nullptr, nullptr, 0,
                                          stats, nullptr)
                .code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(MorphKvSelectVictimsFromStats(args, cache, 0, 8 * 128, stats + 1, nullptr, nullptr, 0,
                                          stats, nullptr)
                .code(),
            absl::StatusCode::kInvalidArgument);
}

// PagedAttention's partitions: per (scored sequence, KV head) and 512
// slots, the score rows' maxima and exp sums.
TEST(MorphKvScoringArgsTest, FusedStatsPerAttentionPartition) {
  EXPECT_EQ(MorphKvFusedStatsBytes(4, 8, 2, 8, kFusedStatsPartitionSize, false),
            4u * 2 * 2 * 8 * sizeof(float));
  EXPECT_EQ(MorphKvFusedStatsBytes(4, 8, 2, 8, 4 * kFusedStatsPartitionSize + 1, true),
            4u * 2 * 5 * 2 * 7 * 4 * sizeof(float));
  EXPECT_GT(MorphKvFusedStatsBytes(0, 8, 2, 1, 0, true), 0u);
}

TEST(MorphKvScoringArgsTest, ScratchPerPartition) {
  // One partition: per (sequence, KV head), W row maxima and W exp sums,
  // then the best score, position and slot.
  EXPECT_EQ(MorphKvScoringScratchBytes(4, 2, 8, kScoringPartitionSize),
            4u * 2 * (2 * 8 + 3) * sizeof(float));
  EXPECT_EQ(MorphKvScoringScratchBytes(4, 2, 8, 2 * kScoringPartitionSize + 1),
            4u * 2 * 3 * (2 * 8 + 3) * sizeof(float));
  EXPECT_GT(MorphKvScoringScratchBytes(0, 2, 8, 0), 0u);
  // Group-logit-sum needs no head count.
  EXPECT_EQ(MorphKvScoringScratchBytes(4, 8, 2, 8, kScoringPartitionSize, false),
            MorphKvScoringScratchBytes(4, 2, 8, kScoringPartitionSize));
  // Group-max-prob: (W-1) * G row maxima and exp sums, none for W = 1.
  EXPECT_EQ(MorphKvScoringScratchBytes(4, 8, 2, 8, kScoringPartitionSize, true),
            4u * 2 * (2 * 7 * 4 + 3) * sizeof(float));
  EXPECT_EQ(MorphKvScoringScratchBytes(4, 8, 2, 1, 2 * kScoringPartitionSize + 1, true),
            4u * 2 * 3 * 3 * sizeof(float));
  EXPECT_GT(MorphKvScoringScratchBytes(0, 8, 2, 8, 0, true), 0u);
}

}  // namespace
}  // namespace morphserve::kernels::cuda
