// The KV policy kernels against the CPU path. H2O's accumulation and
// SnapKV's pooled scores against PagedKeyLogits, MaskedSoftmaxRows and
// FuseRows (kernels/cpu/kv_scoring.h) on the same bf16 values, used as
// KvSequence uses them; the victims, keep lists and compaction exactly
// against KvSequence's comparator and its sequential Compact; and the
// first selections of streaming and SnapKV end to end against KvSequence
// itself. Batches with scrambled block tables and positions; outputs start
// poisoned, and cache rows, query values and scores no kernel may read are
// NaN, so reading or writing the wrong one shows.

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

namespace morphserve::kernels::cuda {
namespace {

using testing::AllClose;
using testing::Bf16ToF32;
using testing::Poisoned;
using testing::RandomBf16;
using testing::ScrambleBlockTables;
using testing::ScrambledTables;
using testing::Upload;

// Same inputs on both sides and f32 after, so scores differ only by the
// order of operations and exp's accuracy (as in kv_scoring_test.cc).
constexpr double kScoreAbsTol = 1e-7;
constexpr double kScoreRelTol = 1e-4;
constexpr uint16_t kNanBf16 = 0xffff;
// What a poisoned int32 output holds until written.
constexpr int32_t kPoisonInt = 0x7f7f7f7f;

// One layer's paged cache for a batch, in the kernels' layout, with keys
// (and values) for the slots each sequence holds and NaN elsewhere.
struct Cache {
  int64_t block_size = 0, num_kv_heads = 0, head_dim = 0;
  std::vector<int32_t> tables;
  int64_t table_stride = 0;
  int64_t pool_blocks = 0;
  std::vector<uint16_t> k, v;

  size_t At(int64_t seq, int64_t kv_head, int64_t slot) const {
    const int64_t block = tables[seq * table_stride + slot / block_size];
    return ((block * num_kv_heads + kv_head) * block_size + slot % block_size) * head_dim;
  }
};

Cache MakeCache(const std::vector<int32_t>& slots, int64_t block_size, int64_t num_kv_heads,
                int64_t head_dim, std::mt19937& rng) {
  Cache c;
  c.block_size = block_size;
  c.num_kv_heads = num_kv_heads;
  c.head_dim = head_dim;
  ScrambledTables tables = ScrambleBlockTables(slots, block_size, rng);
  c.tables = std::move(tables.tables);
  c.table_stride = tables.stride;
  c.pool_blocks = tables.pool_blocks;
  const size_t elems = c.pool_blocks * num_kv_heads * block_size * head_dim;
  c.k.assign(elems, kNanBf16);
  c.v.assign(elems, kNanBf16);
  for (size_t seq = 0; seq < slots.size(); ++seq) {
    for (int64_t slot = 0; slot < slots[seq]; ++slot) {
      for (int64_t h = 0; h < num_kv_heads; ++h) {
        const std::vector<uint16_t> k = RandomBf16(head_dim, 1.0f, rng);
        const std::vector<uint16_t> v = RandomBf16(head_dim, 1.0f, rng);
        std::copy(k.begin(), k.end(), &c.k[c.At(seq, h, slot)]);
        std::copy(v.begin(), v.end(), &c.v[c.At(seq, h, slot)]);
      }
    }
  }
  return c;
}

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
// Candidates: the steady-state victim and the first selection's keep lists.

struct CandidateShape {
  std::vector<int32_t> slots;  // per sequence; 0 leaves it alone
  std::vector<int32_t> keep;   // candidates kept, per sequence
  int64_t num_kv_heads;
  bool scrambled;  // positions differ from slots
  int64_t sinks;
  // Scores drawn from a handful of values (many exact ties, -0 among
  // them), from N(0, 1), or absent (streaming).
  enum Scores { kTied, kSpread, kNone } scores;
};

std::string Describe(const CandidateShape& s) {
  std::string name;
  for (size_t i = 0; i < s.slots.size(); ++i) {
    absl::StrAppend(&name, "s", s.slots[i], "k", s.keep[i], "_");
  }
  absl::StrAppend(&name, "kv", s.num_kv_heads, s.scrambled ? "_scrambled" : "_aligned", "_sinks",
                  s.sinks,
                  s.scores == CandidateShape::kTied     ? "_tied"
                  : s.scores == CandidateShape::kSpread ? "_spread"
                                                        : "_positions");
  return name;
}
void PrintTo(const CandidateShape& s, std::ostream* os) { *os << Describe(s); }
std::string CandidateName(const ::testing::TestParamInfo<CandidateShape>& info) {
  return Describe(info.param);
}

struct CandidateCase {
  int64_t num_seqs, num_kv_heads, sinks, max_slots;
  std::vector<int32_t> slots, recent_from, keep;
  std::vector<int32_t> positions;  // empty while positions equal slots
  int64_t positions_stride;
  std::vector<float> scores;  // empty: none
  int64_t scores_stride;

  int32_t Position(int64_t seq, int64_t h, int64_t slot) const {
    if (positions.empty()) return static_cast<int32_t>(slot);
    return positions[(seq * num_kv_heads + h) * positions_stride + slot];
  }
  float Score(int64_t seq, int64_t h, int64_t slot) const {
    if (scores.empty()) return 0.0f;
    return scores[(seq * num_kv_heads + h) * scores_stride + slot];
  }
  bool Candidate(int64_t seq, int64_t h, int64_t slot) const {
    const int32_t p = Position(seq, h, slot);
    return p >= sinks && p < recent_from[seq];
  }
  // KvSequence::SelectVictim's order: a before b when a is kept first.
  bool Better(int64_t seq, int64_t h, int32_t a, int32_t b) const {
    if (Score(seq, h, a) != Score(seq, h, b)) return Score(seq, h, a) > Score(seq, h, b);
    return Position(seq, h, a) > Position(seq, h, b);
  }
};

CandidateCase MakeCandidateCase(const CandidateShape& s, std::mt19937& rng) {
  CandidateCase c;
  c.num_seqs = static_cast<int64_t>(s.slots.size());
  c.num_kv_heads = s.num_kv_heads;
  c.sinks = s.sinks;
  c.slots = s.slots;
  c.keep = s.keep;
  c.max_slots = *std::max_element(s.slots.begin(), s.slots.end()) + 3;
  c.positions_stride = c.max_slots + 1;
  c.scores_stride = c.max_slots + 2;
  if (s.scrambled) c.positions.assign(c.num_seqs * s.num_kv_heads * c.positions_stride, -7);
  for (int64_t seq = 0; seq < c.num_seqs; ++seq) {
    const int32_t n = s.slots[seq];
    // About an eighth of the slots are recent; scrambled, the positions are
    // a sample of twice as many, in a different order per KV head.
    c.recent_from.push_back(s.scrambled ? 2 * n - n / 8 : n - n / 8);
    if (!s.scrambled) continue;
    for (int64_t h = 0; h < s.num_kv_heads; ++h) {
      std::vector<int32_t> all(2 * n);
      std::iota(all.begin(), all.end(), 0);
      std::shuffle(all.begin(), all.end(), rng);
      std::copy_n(all.begin(), n, &c.positions[(seq * s.num_kv_heads + h) * c.positions_stride]);
    }
  }
  if (s.scores != CandidateShape::kNone) {
    c.scores.assign(c.num_seqs * s.num_kv_heads * c.scores_stride, NAN);
    const float tied[] = {-1.0f, -0.0f, 0.0f, 0.25f, 0.5f, 1.0f};
    std::uniform_int_distribution<int> pick(0, 5);
    std::normal_distribution<float> spread(0.0f, 1.0f);
    for (int64_t seq = 0; seq < c.num_seqs; ++seq) {
      for (int64_t h = 0; h < s.num_kv_heads; ++h) {
        for (int64_t j = 0; j < s.slots[seq]; ++j) {
          c.scores[(seq * s.num_kv_heads + h) * c.scores_stride + j] =
              s.scores == CandidateShape::kTied ? tied[pick(rng)] : spread(rng);
        }
      }
    }
  }
  return c;
}

CandidateArgs DeviceArgs(const CandidateCase& c, const DeviceBuffer& slots,
                         const DeviceBuffer& recent, const DeviceBuffer& positions) {
  CandidateArgs a;
  a.num_slots = slots.as<int32_t>();
  a.recent_from = recent.as<int32_t>();
  a.positions = positions.as<int32_t>();  // null when empty
  a.positions_stride = c.positions_stride;
  a.sinks = c.sinks;
  a.max_slots = c.max_slots;
  a.num_seqs = c.num_seqs;
  a.num_kv_heads = c.num_kv_heads;
  return a;
}

// What a sequence left alone (num_slots <= 0) finds in its victims after a
// launch: what they held before, never written.
constexpr int32_t kUntouched = 12345;

// KvSequence::SelectVictim in steady state: per (s, h) the lowest
// candidate, the older on a tie; -1 without candidates, kUntouched for a
// sequence left alone.
std::vector<int32_t> WantLowest(const CandidateCase& c) {
  std::vector<int32_t> want;
  for (int64_t seq = 0; seq < c.num_seqs; ++seq) {
    for (int64_t h = 0; h < c.num_kv_heads; ++h) {
      int32_t victim = c.slots[seq] <= 0 ? kUntouched : -1;
      for (int32_t j = 0; j < c.slots[seq]; ++j) {
        if (c.Candidate(seq, h, j) && (victim < 0 || c.Better(seq, h, victim, j))) victim = j;
      }
      want.push_back(victim);
    }
  }
  return want;
}

struct KeepListsWant {
  std::vector<int32_t> lists, counts, victims;
};

// KvSequence::SelectVictim while aligned: the best `keep` candidates and
// every other slot, ascending; the victim is the worst kept candidate's
// index in the list. A sequence left alone gets count -1, its lists
// kPoisonInt and its victims kUntouched (neither written).
KeepListsWant WantKeepLists(const CandidateCase& c, int64_t keep_stride) {
  const size_t units = c.num_seqs * c.num_kv_heads;
  KeepListsWant want{std::vector<int32_t>(units * keep_stride, kPoisonInt),
                     std::vector<int32_t>(units, -1), std::vector<int32_t>(units, kUntouched)};
  for (int64_t seq = 0; seq < c.num_seqs; ++seq) {
    for (int64_t h = 0; h < c.num_kv_heads; ++h) {
      const size_t unit = seq * c.num_kv_heads + h;
      if (c.slots[seq] <= 0) continue;
      const auto better = [&](int32_t a, int32_t b) { return c.Better(seq, h, a, b); };
      std::vector<int32_t> order;
      for (int32_t j = 0; j < c.slots[seq]; ++j) {
        if (c.Candidate(seq, h, j)) order.push_back(j);
      }
      const size_t keep = std::min<size_t>(std::max(c.keep[seq], 0), order.size());
      std::sort(order.begin(), order.end(), better);
      order.resize(keep);
      const int32_t victim = keep > 0 ? order.back() : -1;
      for (int32_t j = 0; j < c.slots[seq]; ++j) {
        if (!c.Candidate(seq, h, j)) order.push_back(j);
      }
      std::sort(order.begin(), order.end());
      std::copy(order.begin(), order.end(), &want.lists[unit * keep_stride]);
      want.counts[unit] = static_cast<int32_t>(order.size());
      want.victims[unit] =
          victim < 0 ? -1
                     : static_cast<int32_t>(std::lower_bound(order.begin(), order.end(), victim) -
                                            order.begin());
    }
  }
  return want;
}

class CandidateCudaTest : public testing::CudaTest,
                          public ::testing::WithParamInterface<CandidateShape> {};

TEST_P(CandidateCudaTest, LowestCandidateMatchesKvSequenceTieRule) {
  const CandidateShape& s = GetParam();
  std::mt19937 rng(static_cast<uint32_t>(s.slots[0] * 3 + s.num_kv_heads + s.sinks));
  const CandidateCase c = MakeCandidateCase(s, rng);
  const std::vector<int32_t> want = WantLowest(c);

  ASSERT_OK_AND_ASSIGN(DeviceBuffer d_slots, Upload(c.slots));
  ASSERT_OK_AND_ASSIGN(DeviceBuffer d_recent, Upload(c.recent_from));
  ASSERT_OK_AND_ASSIGN(DeviceBuffer d_positions, Upload(c.positions));
  ASSERT_OK_AND_ASSIGN(DeviceBuffer d_scores, Upload(c.scores));
  ASSERT_OK_AND_ASSIGN(DeviceBuffer d_victims,
                       Upload(std::vector<int32_t>(want.size(), kUntouched)));
  ASSERT_OK(SelectLowestCandidates(DeviceArgs(c, d_slots, d_recent, d_positions),
                                   d_scores.as<float>(), c.scores_stride, d_victims.as<int32_t>(),
                                   stream_));
  ASSERT_OK(Sync());
  ASSERT_OK_AND_ASSIGN(const std::vector<int32_t> got, d_victims.ToHost<int32_t>());
  EXPECT_EQ(got, want);
}

TEST_P(CandidateCudaTest, KeepListsMatchKvSequenceFirstSelection) {
  const CandidateShape& s = GetParam();
  std::mt19937 rng(static_cast<uint32_t>(s.slots[0] * 5 + s.num_kv_heads + s.sinks));
  const CandidateCase c = MakeCandidateCase(s, rng);
  const int64_t keep_stride = c.max_slots + 1;
  const size_t units = c.num_seqs * c.num_kv_heads;
  const KeepListsWant want = WantKeepLists(c, keep_stride);

  ASSERT_OK_AND_ASSIGN(DeviceBuffer d_slots, Upload(c.slots));
  ASSERT_OK_AND_ASSIGN(DeviceBuffer d_recent, Upload(c.recent_from));
  ASSERT_OK_AND_ASSIGN(DeviceBuffer d_positions, Upload(c.positions));
  ASSERT_OK_AND_ASSIGN(DeviceBuffer d_scores, Upload(c.scores));
  ASSERT_OK_AND_ASSIGN(DeviceBuffer d_keep, Upload(c.keep));
  ASSERT_OK_AND_ASSIGN(DeviceBuffer d_lists, DeviceBuffer::Allocate(want.lists.size() * 4));
  ASSERT_OK(d_lists.Fill(0x7f));
  ASSERT_OK_AND_ASSIGN(DeviceBuffer d_counts, Upload(std::vector<int32_t>(units, kPoisonInt)));
  ASSERT_OK_AND_ASSIGN(DeviceBuffer d_victims, Upload(std::vector<int32_t>(units, kUntouched)));
  const CandidateArgs args = DeviceArgs(c, d_slots, d_recent, d_positions);
  ASSERT_OK(SelectKeepLists(args, d_keep.as<int32_t>(), d_scores.as<float>(), c.scores_stride,
                            d_lists.as<int32_t>(), keep_stride, d_counts.as<int32_t>(),
                            d_victims.as<int32_t>(), stream_));
  ASSERT_OK(Sync());
  ASSERT_OK_AND_ASSIGN(const std::vector<int32_t> counts, d_counts.ToHost<int32_t>());
  ASSERT_OK_AND_ASSIGN(const std::vector<int32_t> victims, d_victims.ToHost<int32_t>());
  ASSERT_OK_AND_ASSIGN(const std::vector<int32_t> lists, d_lists.ToHost<int32_t>());
  EXPECT_EQ(counts, want.counts);
  EXPECT_EQ(victims, want.victims);
  for (size_t unit = 0; unit < units; ++unit) {
    EXPECT_TRUE(std::equal(lists.begin() + unit * keep_stride,
                           lists.begin() + (unit + 1) * keep_stride,
                           want.lists.begin() + unit * keep_stride))
        << "sequence " << unit / c.num_kv_heads << ", KV head " << unit % c.num_kv_heads;
  }

  // Without victims, the same lists.
  ASSERT_OK(d_lists.Fill(0x7f));
  ASSERT_OK(SelectKeepLists(args, d_keep.as<int32_t>(), d_scores.as<float>(), c.scores_stride,
                            d_lists.as<int32_t>(), keep_stride, d_counts.as<int32_t>(), nullptr,
                            stream_));
  ASSERT_OK(Sync());
  ASSERT_OK_AND_ASSIGN(const std::vector<int32_t> lists_again, d_lists.ToHost<int32_t>());
  EXPECT_EQ(lists_again, lists);
}

// Ties everywhere (and -0 against 0), spread scores, positions as scores;
// aligned and scrambled positions; sinks; keep 0, 1, some, all and more
// than the candidates; 1, 17 and up to 3000 slots (several scan tiles);
// a sequence left alone; a sequence with no candidate.
INSTANTIATE_TEST_SUITE_P(
    Shapes, CandidateCudaTest,
    ::testing::Values(CandidateShape{{1}, {1}, 1, false, 0, CandidateShape::kTied},
                      CandidateShape{{17, 0, 9}, {3, 2, 100}, 2, true, 0, CandidateShape::kTied},
                      CandidateShape{{600}, {200}, 3, true, 4, CandidateShape::kTied},
                      CandidateShape{{600, 300}, {500, 0}, 2, false, 4, CandidateShape::kSpread},
                      CandidateShape{{1000, 40}, {1, 33}, 1, true, 0, CandidateShape::kSpread},
                      CandidateShape{{3000}, {1500}, 2, false, 2, CandidateShape::kNone},
                      CandidateShape{{513, 17}, {400, 5}, 3, true, 5, CandidateShape::kNone},
                      CandidateShape{{3000}, {2999}, 1, true, 0, CandidateShape::kTied},
                      CandidateShape{{2}, {1}, 2, false, 2, CandidateShape::kTied}),
    CandidateName);

class CandidateSlabCudaTest : public testing::CudaTest {};

// One batch, two launches into one victims array: the first selection
// (SelectKeepLists) for some sequences, the steady state
// (SelectLowestCandidates) for the others, each launch seeing num_slots 0
// or below for the sequences it does not serve. Each launch leaves the
// other's victims alone, so after both every sequence holds its own
// answer; after the first, the second's still hold kUntouched.
TEST_F(CandidateSlabCudaTest, TwoLaunchesFillOneVictimsArray) {
  const CandidateShape s{{40, 30, 17, 25, 9, 12}, {10, 12, 4, 0, 3, 2}, 2, true, 1,
                         CandidateShape::kSpread};
  std::mt19937 rng(2024);
  const CandidateCase c = MakeCandidateCase(s, rng);
  const std::vector<bool> first_selection = {true, false, true, true, false, false};
  CandidateCase first = c;
  CandidateCase steady = c;
  for (int64_t seq = 0; seq < c.num_seqs; ++seq) {
    // 0 and a negative count alike leave a sequence alone.
    (first_selection[seq] ? steady : first).slots[seq] = seq % 2 == 0 ? 0 : -2;
  }
  const int64_t keep_stride = c.max_slots + 1;
  const size_t units = c.num_seqs * c.num_kv_heads;
  const KeepListsWant want_first = WantKeepLists(first, keep_stride);
  const std::vector<int32_t> want_steady = WantLowest(steady);
  std::vector<int32_t> want_both(units);
  for (size_t unit = 0; unit < units; ++unit) {
    want_both[unit] =
        first_selection[unit / c.num_kv_heads] ? want_first.victims[unit] : want_steady[unit];
    ASSERT_NE(want_both[unit], kUntouched);
  }

  ASSERT_OK_AND_ASSIGN(DeviceBuffer d_first_slots, Upload(first.slots));
  ASSERT_OK_AND_ASSIGN(DeviceBuffer d_steady_slots, Upload(steady.slots));
  ASSERT_OK_AND_ASSIGN(DeviceBuffer d_recent, Upload(c.recent_from));
  ASSERT_OK_AND_ASSIGN(DeviceBuffer d_positions, Upload(c.positions));
  ASSERT_OK_AND_ASSIGN(DeviceBuffer d_scores, Upload(c.scores));
  ASSERT_OK_AND_ASSIGN(DeviceBuffer d_keep, Upload(c.keep));
  ASSERT_OK_AND_ASSIGN(DeviceBuffer d_lists, DeviceBuffer::Allocate(want_first.lists.size() * 4));
  ASSERT_OK(d_lists.Fill(0x7f));
  ASSERT_OK_AND_ASSIGN(DeviceBuffer d_counts, Upload(std::vector<int32_t>(units, kPoisonInt)));
  ASSERT_OK_AND_ASSIGN(DeviceBuffer d_victims, Upload(std::vector<int32_t>(units, kUntouched)));

  ASSERT_OK(SelectKeepLists(DeviceArgs(first, d_first_slots, d_recent, d_positions),
                            d_keep.as<int32_t>(), d_scores.as<float>(), c.scores_stride,
                            d_lists.as<int32_t>(), keep_stride, d_counts.as<int32_t>(),
                            d_victims.as<int32_t>(), stream_));
  ASSERT_OK(Sync());
  ASSERT_OK_AND_ASSIGN(const std::vector<int32_t> counts, d_counts.ToHost<int32_t>());
  ASSERT_OK_AND_ASSIGN(const std::vector<int32_t> lists, d_lists.ToHost<int32_t>());
  ASSERT_OK_AND_ASSIGN(const std::vector<int32_t> after_first, d_victims.ToHost<int32_t>());
  EXPECT_EQ(counts, want_first.counts);
  EXPECT_EQ(lists, want_first.lists);
  EXPECT_EQ(after_first, want_first.victims);

  ASSERT_OK(SelectLowestCandidates(DeviceArgs(steady, d_steady_slots, d_recent, d_positions),
                                   d_scores.as<float>(), c.scores_stride, d_victims.as<int32_t>(),
                                   stream_));
  ASSERT_OK(Sync());
  ASSERT_OK_AND_ASSIGN(const std::vector<int32_t> after_both, d_victims.ToHost<int32_t>());
  EXPECT_EQ(after_both, want_both);
}

// ---------------------------------------------------------------------------
// Compaction.

struct CompactShape {
  std::vector<int32_t> slots;  // per sequence
  int64_t block_size, num_kv_heads, head_dim;
  // How much each keep list drops: none, a few early slots (rows move one
  // or two slots down, the most overlap), half at random, or everything.
  enum Drop { kNothing, kFew, kHalf, kAll, kSkip };
  std::vector<Drop> drop;  // per sequence (kSkip: count -1, left alone)
  enum Positions { kAligned, kSeparate, kInPlace } positions;
  bool scores;
};

std::string Describe(const CompactShape& s) {
  constexpr const char* kDrop[] = {"none", "few", "half", "all", "skip"};
  std::string name;
  for (size_t i = 0; i < s.slots.size(); ++i) {
    absl::StrAppend(&name, "s", s.slots[i], kDrop[s.drop[i]], "_");
  }
  absl::StrAppend(&name, "bs", s.block_size, "_kv", s.num_kv_heads, "_d", s.head_dim,
                  s.positions == CompactShape::kAligned    ? "_aligned"
                  : s.positions == CompactShape::kSeparate ? "_positions"
                                                           : "_inplace",
                  s.scores ? "_scores" : "");
  return name;
}
void PrintTo(const CompactShape& s, std::ostream* os) { *os << Describe(s); }
std::string CompactName(const ::testing::TestParamInfo<CompactShape>& info) {
  return Describe(info.param);
}

class CompactKvCudaTest : public testing::CudaTest,
                          public ::testing::WithParamInterface<CompactShape> {};

TEST_P(CompactKvCudaTest, MatchesSequentialCompaction) {
  const CompactShape& s = GetParam();
  std::mt19937 rng(static_cast<uint32_t>(s.slots[0] * 17 + s.head_dim + s.block_size));
  const int64_t num_seqs = static_cast<int64_t>(s.slots.size());
  const int64_t d = s.head_dim;
  Cache c = MakeCache(s.slots, s.block_size, s.num_kv_heads, d, rng);
  // Every row of the pool holds numbers, so that any stray write shows.
  for (std::vector<uint16_t>* cache : {&c.k, &c.v}) {
    for (uint16_t& x : *cache) {
      if (x == kNanBf16) x = RandomBf16(1, 1.0f, rng)[0];
    }
  }
  const int64_t max_slots = *std::max_element(s.slots.begin(), s.slots.end()) + 3;
  const int64_t stride = max_slots + 2;
  const size_t units = num_seqs * s.num_kv_heads;

  std::vector<int32_t> lists(units * stride, kPoisonInt);
  std::vector<int32_t> counts(units);
  std::vector<int32_t> positions(units * stride, kPoisonInt);
  std::vector<float> scores(units * stride, NAN);
  for (int64_t seq = 0; seq < num_seqs; ++seq) {
    const int32_t n = s.slots[seq];
    for (int64_t h = 0; h < s.num_kv_heads; ++h) {
      const size_t unit = seq * s.num_kv_heads + h;
      std::vector<int32_t> all(n);
      std::iota(all.begin(), all.end(), 0);
      std::vector<int32_t> keep;
      switch (s.drop[seq]) {
        case CompactShape::kNothing:
        case CompactShape::kSkip:
          keep = all;
          break;
        case CompactShape::kFew:
          keep = all;
          for (int i = 0; i < 3 && !keep.empty(); ++i) {
            keep.erase(keep.begin() + std::uniform_int_distribution<size_t>(
                                          0, std::min<size_t>(keep.size() - 1, 5))(rng));
          }
          break;
        case CompactShape::kHalf:
          std::shuffle(all.begin(), all.end(), rng);
          keep.assign(all.begin(), all.begin() + n / 2);
          std::sort(keep.begin(), keep.end());
          break;
        case CompactShape::kAll:
          break;
      }
      std::copy(keep.begin(), keep.end(), &lists[unit * stride]);
      counts[unit] = s.drop[seq] == CompactShape::kSkip ? -1 : static_cast<int32_t>(keep.size());
      // Distinct positions for the held slots; H2O scores for every slot
      // below max_slots (the padding past it must stay NaN).
      std::vector<int32_t> sample(3 * max_slots);
      std::iota(sample.begin(), sample.end(), 0);
      std::shuffle(sample.begin(), sample.end(), rng);
      std::copy_n(sample.begin(), n, &positions[unit * stride]);
      std::uniform_real_distribution<float> score(0.0f, 4.0f);
      for (int64_t j = 0; j < max_slots; ++j) scores[unit * stride + j] = score(rng);
    }
  }

  // KvSequence::Compact, one (sequence, KV head) at a time in ascending
  // order, in place.
  Cache want = c;
  std::vector<int32_t> want_positions = positions;
  std::vector<float> want_scores = scores;
  for (int64_t seq = 0; seq < num_seqs; ++seq) {
    for (int64_t h = 0; h < s.num_kv_heads; ++h) {
      const size_t unit = seq * s.num_kv_heads + h;
      if (counts[unit] < 0) continue;
      int32_t* pos = &want_positions[unit * stride];
      float* sc = &want_scores[unit * stride];
      for (int32_t i = 0; i < counts[unit]; ++i) {
        const int32_t from = lists[unit * stride + i];
        pos[i] = s.positions == CompactShape::kAligned ? from : positions[unit * stride + from];
        if (s.scores) sc[i] = sc[from];
        if (from == i) continue;
        std::copy_n(&want.k[want.At(seq, h, from)], d, &want.k[want.At(seq, h, i)]);
        std::copy_n(&want.v[want.At(seq, h, from)], d, &want.v[want.At(seq, h, i)]);
      }
      for (int64_t i = counts[unit]; i < max_slots; ++i) {
        pos[i] = -1;
        if (s.scores) sc[i] = 0.0f;
      }
    }
  }

  ASSERT_OK_AND_ASSIGN(DeviceBuffer d_k, Upload(c.k));
  ASSERT_OK_AND_ASSIGN(DeviceBuffer d_v, Upload(c.v));
  ASSERT_OK_AND_ASSIGN(DeviceBuffer d_tables, Upload(c.tables));
  ASSERT_OK_AND_ASSIGN(DeviceBuffer d_lists, Upload(lists));
  ASSERT_OK_AND_ASSIGN(DeviceBuffer d_counts, Upload(counts));
  ASSERT_OK_AND_ASSIGN(DeviceBuffer d_positions, Upload(positions));
  ASSERT_OK_AND_ASSIGN(DeviceBuffer d_scores, Upload(scores));
  // Separate: the output starts poisoned, and only its written part counts.
  ASSERT_OK_AND_ASSIGN(DeviceBuffer d_out, Upload(positions));
  ASSERT_OK(d_out.Fill(0x7f));
  CompactKvArgs args;
  args.k_cache = d_k.as<__nv_bfloat16>();
  args.v_cache = d_v.as<__nv_bfloat16>();
  args.block_tables = d_tables.as<int32_t>();
  args.block_table_stride = c.table_stride;
  args.max_slots = max_slots;
  args.num_seqs = num_seqs;
  args.block_size = s.block_size;
  args.num_kv_heads = s.num_kv_heads;
  args.head_dim = d;
  const int32_t* positions_in =
      s.positions == CompactShape::kAligned ? nullptr : d_positions.as<int32_t>();
  int32_t* positions_out =
      s.positions == CompactShape::kInPlace ? d_positions.as<int32_t>() : d_out.as<int32_t>();
  ASSERT_OK(CompactKv(args, d_lists.as<int32_t>(), stride, d_counts.as<int32_t>(), positions_in,
                      positions_out, stride, s.scores ? d_scores.as<float>() : nullptr, stride,
                      stream_));
  ASSERT_OK(Sync());

  ASSERT_OK_AND_ASSIGN(const std::vector<uint16_t> got_k, d_k.ToHost<uint16_t>());
  ASSERT_OK_AND_ASSIGN(const std::vector<uint16_t> got_v, d_v.ToHost<uint16_t>());
  EXPECT_TRUE(got_k == want.k) << "keys differ";
  EXPECT_TRUE(got_v == want.v) << "values differ";
  ASSERT_OK_AND_ASSIGN(const std::vector<float> got_scores, d_scores.ToHost<float>());
  for (size_t i = 0; i < got_scores.size(); ++i) {
    const bool same =
        std::isnan(want_scores[i]) ? std::isnan(got_scores[i]) : got_scores[i] == want_scores[i];
    ASSERT_TRUE(same) << "score " << i << ": " << got_scores[i] << " vs " << want_scores[i];
  }
  const DeviceBuffer& out = s.positions == CompactShape::kInPlace ? d_positions : d_out;
  ASSERT_OK_AND_ASSIGN(const std::vector<int32_t> got_positions, out.ToHost<int32_t>());
  for (size_t unit = 0; unit < units; ++unit) {
    const std::string where = absl::StrCat("unit ", unit);
    for (int64_t i = 0; i < stride; ++i) {
      const size_t at = unit * stride + i;
      if (counts[unit] >= 0 && i < max_slots) {
        ASSERT_EQ(got_positions[at], want_positions[at]) << where << ", slot " << i;
      } else if (s.positions == CompactShape::kInPlace) {
        ASSERT_EQ(got_positions[at], positions[at]) << where << ", slot " << i;
      } else {
        ASSERT_EQ(got_positions[at], kPoisonInt) << where << ", slot " << i;
      }
    }
  }
}

// Identity lists, rows moving a slot or two (overlapping sources and
// destinations across rounds), half kept, nothing kept, a sequence left
// alone; block sizes 1, 7, 16; head dims 8 (256 rows a round), 64, 128,
// 256; positions from slots, from an array, in place; with H2O scores.
INSTANTIATE_TEST_SUITE_P(
    Shapes, CompactKvCudaTest,
    ::testing::Values(
        CompactShape{{1}, 16, 1, 64, {CompactShape::kNothing}, CompactShape::kAligned, false},
        CompactShape{{17, 9},
                     7,
                     2,
                     128,
                     {CompactShape::kFew, CompactShape::kAll},
                     CompactShape::kSeparate,
                     true},
        CompactShape{{700}, 1, 1, 8, {CompactShape::kFew}, CompactShape::kInPlace, true},
        CompactShape{{1030, 40, 300},
                     16,
                     3,
                     64,
                     {CompactShape::kFew, CompactShape::kSkip, CompactShape::kHalf},
                     CompactShape::kAligned,
                     true},
        CompactShape{{500}, 7, 2, 256, {CompactShape::kHalf}, CompactShape::kInPlace, false},
        CompactShape{{260}, 16, 1, 128, {CompactShape::kFew}, CompactShape::kSeparate, false}),
    CompactName);

// ---------------------------------------------------------------------------
// PushQueryRing.

class PushQueryRingCudaTest : public testing::CudaTest {};

TEST_F(PushQueryRingCudaTest, KeepsTheLastRingSizeRowsAtPositionModRing) {
  std::mt19937 rng(5);
  const int64_t num_heads = 3, d = 64, ring_size = 8;
  const int64_t row = num_heads * d;
  const int64_t q_stride = row + 2 * d;  // fused QKV rows
  const int64_t ring_row_stride = row + 8;
  const int64_t ring_seq_stride = ring_size * ring_row_stride + 16;
  // Tokens this step and the first one's position: a chunk longer than
  // the ring that wraps, a decode token, nothing, a short chunk.
  const std::vector<int32_t> tokens = {21, 1, 0, 5};
  const std::vector<int32_t> first = {13, 40, 7, 0};
  const int64_t num_seqs = static_cast<int64_t>(tokens.size());
  std::vector<int32_t> query_start = {0};
  for (int32_t n : tokens) query_start.push_back(query_start.back() + n);
  const std::vector<uint16_t> q = RandomBf16(query_start.back() * q_stride, 1.0f, rng);
  std::vector<uint16_t> ring = RandomBf16(num_seqs * ring_seq_stride, 1.0f, rng);

  std::vector<uint16_t> want = ring;
  for (int64_t seq = 0; seq < num_seqs; ++seq) {
    for (int64_t i = 0; i < tokens[seq]; ++i) {
      const int64_t p = first[seq] + i;
      std::copy_n(&q[(query_start[seq] + i) * q_stride], row,
                  &want[seq * ring_seq_stride + (p % ring_size) * ring_row_stride]);
    }
  }

  ASSERT_OK_AND_ASSIGN(DeviceBuffer d_q, Upload(q));
  ASSERT_OK_AND_ASSIGN(DeviceBuffer d_start, Upload(query_start));
  ASSERT_OK_AND_ASSIGN(DeviceBuffer d_first, Upload(first));
  ASSERT_OK_AND_ASSIGN(DeviceBuffer d_ring, Upload(ring));
  ASSERT_OK(PushQueryRing(d_q.as<__nv_bfloat16>(), q_stride, d_start.as<int32_t>(),
                          d_first.as<int32_t>(), num_seqs, 24, row, d_ring.as<__nv_bfloat16>(),
                          ring_seq_stride, ring_row_stride, ring_size, stream_));
  ASSERT_OK(Sync());
  ASSERT_OK_AND_ASSIGN(const std::vector<uint16_t> got, d_ring.ToHost<uint16_t>());
  EXPECT_TRUE(got == want);
}

// ---------------------------------------------------------------------------
// First selections end to end against KvSequence.

// A prompt written to both a PagedKvCache (f32) and the kernels' bf16
// cache with the same block table.
struct Prompt {
  engine::KvCacheShape shape;
  std::vector<int32_t> table;
  std::unique_ptr<engine::PagedKvCache> cpu;
  std::vector<uint16_t> k, v;  // bf16, the same layout
};

Prompt MakePrompt(int64_t length, int64_t block_size, int64_t num_kv_heads, int64_t head_dim,
                  std::mt19937& rng) {
  Prompt p;
  const int64_t blocks = (length + block_size - 1) / block_size;
  p.shape = {1, num_kv_heads, head_dim, block_size, blocks + 3};
  p.table.resize(p.shape.num_blocks);
  std::iota(p.table.begin(), p.table.end(), 0);
  std::shuffle(p.table.begin(), p.table.end(), rng);
  p.table.resize(blocks);
  p.cpu = std::make_unique<engine::PagedKvCache>(p.shape);
  const size_t elems = p.shape.num_blocks * p.shape.ValuesPerBlock();
  p.k = RandomBf16(elems, 1.0f, rng);
  p.v = RandomBf16(elems, 1.0f, rng);
  const std::vector<float> k = Bf16ToF32(p.k);
  const std::vector<float> v = Bf16ToF32(p.v);
  std::copy(k.begin(), k.end(), p.cpu->keys(0));
  std::copy(v.begin(), v.end(), p.cpu->values(0));
  return p;
}

class FirstSelectionCudaTest : public testing::CudaTest {
 protected:
  // Compacts the device cache with SelectKeepLists and CompactKv and checks
  // it, its positions and the victims against `seq` after its selection.
  void CompactAndCompare(const Prompt& prompt, int64_t length, int64_t recent_from, int64_t sinks,
                         int64_t keep, const DeviceBuffer& scores, const engine::KvSequence& seq,
                         bool check_victims) {
    const int64_t kv = prompt.shape.num_kv_heads;
    const int64_t d = prompt.shape.head_dim;
    const std::vector<int32_t> slots = {static_cast<int32_t>(length)};
    const std::vector<int32_t> recent = {static_cast<int32_t>(recent_from)};
    const std::vector<int32_t> keeps = {static_cast<int32_t>(keep)};
    ASSERT_OK_AND_ASSIGN(DeviceBuffer d_slots, Upload(slots));
    ASSERT_OK_AND_ASSIGN(DeviceBuffer d_recent, Upload(recent));
    ASSERT_OK_AND_ASSIGN(DeviceBuffer d_keep, Upload(keeps));
    ASSERT_OK_AND_ASSIGN(DeviceBuffer d_table, Upload(prompt.table));
    ASSERT_OK_AND_ASSIGN(DeviceBuffer d_k, Upload(prompt.k));
    ASSERT_OK_AND_ASSIGN(DeviceBuffer d_v, Upload(prompt.v));
    ASSERT_OK_AND_ASSIGN(DeviceBuffer d_lists, Poisoned<int32_t>(kv * length));
    ASSERT_OK_AND_ASSIGN(DeviceBuffer d_counts, Poisoned<int32_t>(kv));
    ASSERT_OK_AND_ASSIGN(DeviceBuffer d_victims, Poisoned<int32_t>(kv));
    ASSERT_OK_AND_ASSIGN(DeviceBuffer d_positions, Poisoned<int32_t>(kv * length));
    CandidateArgs cand;
    cand.num_slots = d_slots.as<int32_t>();
    cand.recent_from = d_recent.as<int32_t>();
    cand.sinks = sinks;
    cand.max_slots = length;
    cand.num_seqs = 1;
    cand.num_kv_heads = kv;
    ASSERT_OK(SelectKeepLists(cand, d_keep.as<int32_t>(), scores.as<float>(), length,
                              d_lists.as<int32_t>(), length, d_counts.as<int32_t>(),
                              d_victims.as<int32_t>(), stream_));
    CompactKvArgs compact;
    compact.k_cache = d_k.as<__nv_bfloat16>();
    compact.v_cache = d_v.as<__nv_bfloat16>();
    compact.block_tables = d_table.as<int32_t>();
    compact.max_slots = length;
    compact.num_seqs = 1;
    compact.block_size = prompt.shape.block_size;
    compact.num_kv_heads = kv;
    compact.head_dim = d;
    ASSERT_OK(CompactKv(compact, d_lists.as<int32_t>(), length, d_counts.as<int32_t>(), nullptr,
                        d_positions.as<int32_t>(), length, nullptr, 0, stream_));
    ASSERT_OK(Sync());
    ASSERT_OK_AND_ASSIGN(const std::vector<int32_t> counts, d_counts.ToHost<int32_t>());
    ASSERT_OK_AND_ASSIGN(const std::vector<int32_t> victims, d_victims.ToHost<int32_t>());
    ASSERT_OK_AND_ASSIGN(const std::vector<int32_t> positions, d_positions.ToHost<int32_t>());
    ASSERT_OK_AND_ASSIGN(const std::vector<uint16_t> k, d_k.ToHost<uint16_t>());
    ASSERT_OK_AND_ASSIGN(const std::vector<uint16_t> v, d_v.ToHost<uint16_t>());
    const engine::PagedKvCache& c = *prompt.cpu;
    for (int64_t h = 0; h < kv; ++h) {
      ASSERT_EQ(counts[h], seq.num_slots()) << "KV head " << h;
      if (check_victims) {
        EXPECT_EQ(victims[h], seq.PendingVictim(0, h)) << "KV head " << h;
      }
      for (int64_t slot = 0; slot < seq.num_slots(); ++slot) {
        ASSERT_EQ(positions[h * length + slot], seq.SlotPosition(0, h, slot))
            << "KV head " << h << ", slot " << slot;
        const int64_t at = c.Index(prompt.table[slot / prompt.shape.block_size], h,
                                   slot % prompt.shape.block_size);
        for (int64_t e = 0; e < d; ++e) {
          ASSERT_EQ(BF16ToFloat(k[at + e]), c.keys(0)[at + e]) << "slot " << slot;
          ASSERT_EQ(BF16ToFloat(v[at + e]), c.values(0)[at + e]) << "slot " << slot;
        }
      }
    }
  }
};

TEST_F(FirstSelectionCudaTest, StreamingMatchesKvSequence) {
  std::mt19937 rng(11);
  KvPolicyConfig config;
  config.kind = KvPolicyKind::kStreaming;
  config.window = 4;
  config.capacity = 20;
  config.sinks = 3;
  const int64_t length = 50, kv = 2, d = 64, num_heads = 4;
  const Prompt prompt = MakePrompt(length, 7, kv, d, rng);

  engine::KvSequence seq(config, prompt.shape, num_heads, config.MaxSlots(length, 8));
  ASSERT_OK(seq.CheckStep(length));
  ThreadPool pool(1);
  std::vector<engine::KvScratch> scratch;
  const std::vector<float> q(length * num_heads * d, 0.0f);
  seq.AfterAttention(0, q.data(), num_heads * d, length, /*prompt_pending=*/false, *prompt.cpu,
                     prompt.table, &pool, scratch);
  seq.EndStep(length, /*prompt_pending=*/false);
  ASSERT_EQ(seq.num_slots(), config.capacity + 1);

  // Streaming ranks by position: no scores.
  const DeviceBuffer no_scores;
  CompactAndCompare(prompt, length, length - config.window, config.sinks,
                    config.capacity + 1 - config.window - config.sinks, no_scores, seq,
                    /*check_victims=*/true);
}

// The prompt in two chunks: the ring fills across them, the selection
// follows the last. Pooled scores come from the GPU, so a kept set could
// only differ if two of them at the cut were equal to within rounding.
TEST_F(FirstSelectionCudaTest, SnapKvMatchesKvSequence) {
  std::mt19937 rng(12);
  KvPolicyConfig config;
  config.kind = KvPolicyKind::kSnapKv;
  config.capacity = 60;
  const int64_t length = 150, chunk = 100, kv = 2, d = 64, num_heads = 6;
  const int64_t window = kSnapKvObservationWindow;
  const Prompt prompt = MakePrompt(length, 16, kv, d, rng);
  const std::vector<uint16_t> q = RandomBf16(length * num_heads * d, 1.0f, rng);
  const std::vector<float> q_f = Bf16ToF32(q);

  engine::KvSequence seq(config, prompt.shape, num_heads, config.MaxSlots(length, 8));
  ThreadPool pool(1);
  std::vector<engine::KvScratch> scratch;
  ASSERT_OK(seq.CheckStep(chunk));
  seq.AfterAttention(0, q_f.data(), num_heads * d, chunk, /*prompt_pending=*/true, *prompt.cpu,
                     prompt.table, &pool, scratch);
  seq.EndStep(chunk, /*prompt_pending=*/true);
  ASSERT_OK(seq.CheckStep(length - chunk));
  seq.AfterAttention(0, q_f.data() + chunk * num_heads * d, num_heads * d, length - chunk,
                     /*prompt_pending=*/false, *prompt.cpu, prompt.table, &pool, scratch);
  seq.EndStep(length - chunk, /*prompt_pending=*/false);
  ASSERT_EQ(seq.num_slots(), config.capacity);

  // The ring, filled chunk by chunk as the forward pass would.
  const int64_t row = num_heads * d;
  ASSERT_OK_AND_ASSIGN(DeviceBuffer d_q, Upload(q));
  ASSERT_OK_AND_ASSIGN(DeviceBuffer d_ring, Poisoned<uint16_t>(window * row));
  for (const int64_t first : {int64_t{0}, chunk}) {
    const int64_t n = first == 0 ? chunk : length - chunk;
    const std::vector<int32_t> start = {0, static_cast<int32_t>(n)};
    const std::vector<int32_t> position = {static_cast<int32_t>(first)};
    ASSERT_OK_AND_ASSIGN(DeviceBuffer d_start, Upload(start));
    ASSERT_OK_AND_ASSIGN(DeviceBuffer d_position, Upload(position));
    ASSERT_OK(PushQueryRing(d_q.as<__nv_bfloat16>() + first * row, row, d_start.as<int32_t>(),
                            d_position.as<int32_t>(), 1, n, row, d_ring.as<__nv_bfloat16>(), 0, row,
                            window, stream_));
    ASSERT_OK(Sync());  // before the host buffers go
  }

  const std::vector<int32_t> lengths = {static_cast<int32_t>(length)};
  ASSERT_OK_AND_ASSIGN(DeviceBuffer d_lengths, Upload(lengths));
  ASSERT_OK_AND_ASSIGN(DeviceBuffer d_table, Upload(prompt.table));
  ASSERT_OK_AND_ASSIGN(DeviceBuffer d_k, Upload(prompt.k));
  ASSERT_OK_AND_ASSIGN(DeviceBuffer d_pooled, Poisoned<float>(kv * length));
  ASSERT_OK_AND_ASSIGN(DeviceBuffer d_scratch, Poisoned<uint8_t>(SnapKvScoresScratchBytes(
                                                   1, num_heads, kv, window, length)));
  SnapKvScoresArgs args;
  args.k_cache = d_k.as<__nv_bfloat16>();
  args.block_tables = d_table.as<int32_t>();
  args.num_tokens = d_lengths.as<int32_t>();
  args.max_slots = length;
  args.num_seqs = 1;
  args.block_size = prompt.shape.block_size;
  args.num_heads = num_heads;
  args.num_kv_heads = kv;
  args.head_dim = d;
  args.scale = 1.0f / std::sqrt(static_cast<float>(d));
  ASSERT_OK(SnapKvScores(args, d_ring.as<__nv_bfloat16>(), 0, row, d_pooled.as<float>(), length,
                         d_scratch.data(), stream_));
  CompactAndCompare(prompt, length, length - window, 0, config.capacity - window, d_pooled, seq,
                    /*check_victims=*/false);
}

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

TEST(KvPolicyArgsTest, CandidatesRejectBadShapes) {
  CandidateArgs good;
  good.max_slots = 100;
  good.num_seqs = 2;
  good.num_kv_heads = 2;
  static const float scores[1] = {};
  static const int32_t positions[1] = {};
  constexpr auto kBad = absl::StatusCode::kInvalidArgument;
  const auto lowest = [](const CandidateArgs& a, int64_t scores_stride) {
    return SelectLowestCandidates(a, scores, scores_stride, nullptr, nullptr).code();
  };
  const auto keep = [](const CandidateArgs& a, int64_t scores_stride, int64_t keep_stride) {
    return SelectKeepLists(a, nullptr, scores, scores_stride, nullptr, keep_stride, nullptr,
                           nullptr, nullptr)
        .code();
  };
  EXPECT_EQ(lowest(good, 99), kBad);
  EXPECT_EQ(keep(good, 99, 100), kBad);
  EXPECT_EQ(keep(good, 100, 99), kBad);
  CandidateArgs a = good;
  a.positions = positions;
  a.positions_stride = 99;
  EXPECT_EQ(lowest(a, 100), kBad);
  EXPECT_EQ(keep(a, 100, 100), kBad);
  a = good;
  a.sinks = -1;
  EXPECT_EQ(lowest(a, 100), kBad);
  a = good;
  a.num_kv_heads = 0;
  EXPECT_EQ(keep(a, 100, 100), kBad);
  a = good;
  a.num_seqs = 0;
  EXPECT_TRUE(SelectLowestCandidates(a, nullptr, 0, nullptr, nullptr).ok());
  EXPECT_TRUE(
      SelectKeepLists(a, nullptr, nullptr, 0, nullptr, 100, nullptr, nullptr, nullptr).ok());
}

TEST(KvPolicyArgsTest, CompactAndRingRejectBadShapes) {
  alignas(16) static __nv_bfloat16 cache[8] = {};
  alignas(16) static int32_t positions[4];
  CompactKvArgs good;
  good.k_cache = cache;
  good.v_cache = cache;
  good.max_slots = 100;
  good.num_seqs = 1;
  good.block_size = 16;
  good.num_kv_heads = 2;
  good.head_dim = 64;
  const auto compact = [](const CompactKvArgs& a, int64_t keep_stride, int32_t* out,
                          int64_t positions_stride, float* scores, int64_t scores_stride) {
    return CompactKv(a, nullptr, keep_stride, nullptr, nullptr, out, positions_stride, scores,
                     scores_stride, nullptr)
        .code();
  };
  constexpr auto kBad = absl::StatusCode::kInvalidArgument;
  CompactKvArgs a = good;
  a.head_dim = 60;
  EXPECT_EQ(compact(a, 100, positions, 100, nullptr, 0), kBad);
  a = good;
  a.v_cache = cache + 1;
  EXPECT_EQ(compact(a, 100, positions, 100, nullptr, 0), kBad);
  EXPECT_EQ(compact(good, 99, positions, 100, nullptr, 0), kBad);
  EXPECT_EQ(compact(good, 100, nullptr, 100, nullptr, 0), kBad);
  EXPECT_EQ(compact(good, 100, positions, 99, nullptr, 0), kBad);
  EXPECT_EQ(compact(good, 100, positions, 100, reinterpret_cast<float*>(positions), 99), kBad);
  a = good;
  a.num_seqs = 0;
  EXPECT_TRUE(
      CompactKv(a, nullptr, 100, nullptr, nullptr, positions, 100, nullptr, 0, nullptr).ok());

  const auto ring = [](const __nv_bfloat16* q, int64_t q_stride, int64_t row, int64_t ring_row,
                       int64_t ring_size) {
    return PushQueryRing(q, q_stride, nullptr, nullptr, 1, 4, row, cache, 0, ring_row, ring_size,
                         nullptr)
        .code();
  };
  EXPECT_EQ(ring(cache, 512, 512, 512, 0), kBad);
  EXPECT_EQ(ring(cache, 511, 512, 512, 8), kBad);
  EXPECT_EQ(ring(cache, 512, 512, 511, 8), kBad);
  EXPECT_EQ(ring(cache, 516, 516, 520, 8), kBad);  // row not a multiple of 8
  EXPECT_EQ(ring(cache + 1, 512, 512, 512, 8), kBad);
  EXPECT_TRUE(
      PushQueryRing(cache, 512, nullptr, nullptr, 0, 4, 512, cache, 0, 512, 8, nullptr).ok());
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
