// MorphKV's GPU victim choice against the CPU path on the same bf16 values
// (widened to f32): KvSequence's score rows for either aggregation,
// PagedKeyLogits, MaskedSoftmaxRows and FuseRows from
// kernels/cpu/kv_scoring.h, then the lowest candidate with KvSequence's tie
// rule. Batches of sequences with scrambled block tables and, after the
// first eviction, scrambled positions; cache slots no sequence holds and
// query values outside the group's heads are NaN, so reading one shows.
#include "kernels/cuda/kv_scoring.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <ostream>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/fp16.h"
#include "kernels/cpu/kv_scoring.h"
#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/paged_attention.h"
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

// The inputs are the same bf16 on both sides and everything after is f32,
// so scores differ only by the order of operations and exp's accuracy: a
// logit off by e moves its probability by a factor of about 1 + e.
constexpr double kScoreAbsTol = 1e-7;
constexpr double kScoreRelTol = 1e-3;

struct Shape {
  std::vector<int32_t> candidates;  // per sequence
  int64_t window, block_size, num_heads, num_kv_heads, head_dim;
  bool max_fusion;
  bool scrambled;  // positions differ from slots, as after the first eviction
  int64_t sinks = 0;
  int64_t extra_max_slots = 0;  // max_slots beyond the largest sequence
  bool group_max_prob = false;
};

// "c_1_17_w8_bs16_h8_kv2_d128_sum_scrambled", plus "_sinks<N>",
// "_max<N>" and "_maxprob": the test's name and its parameter as ctest
// shows it.
std::string Describe(const Shape& s) {
  std::string name = "c";
  for (int32_t c : s.candidates) absl::StrAppend(&name, "_", c);
  absl::StrAppend(&name, "_w", s.window, "_bs", s.block_size, "_h", s.num_heads, "_kv",
                  s.num_kv_heads, "_d", s.head_dim, s.max_fusion ? "_max" : "_sum",
                  s.scrambled ? "_scrambled" : "_aligned");
  if (s.sinks > 0) absl::StrAppend(&name, "_sinks", s.sinks);
  if (s.extra_max_slots > 0) absl::StrAppend(&name, "_max", s.extra_max_slots);
  if (s.group_max_prob) absl::StrAppend(&name, "_maxprob");
  return name;
}
void PrintTo(const Shape& s, std::ostream* os) { *os << Describe(s); }
std::string ShapeName(const ::testing::TestParamInfo<Shape>& info) { return Describe(info.param); }

// One launch's inputs on the host, in the kernel's layout.
struct Case {
  int64_t num_seqs, window, block_size, num_heads, num_kv_heads, head_dim, sinks, max_slots;
  bool max_fusion, group_max_prob;
  float scale;
  std::vector<int32_t> tables;
  int64_t table_stride;
  std::vector<int32_t> num_slots, recent_from;
  std::vector<int32_t> positions;  // empty while positions equal slots
  int64_t positions_stride;
  std::vector<uint16_t> k_cache;
  std::vector<uint16_t> q;
  int64_t q_seq_stride, q_row_stride;

  int64_t Group() const { return num_heads / num_kv_heads; }
  int32_t Position(int64_t seq, int64_t kv_head, int64_t slot) const {
    if (positions.empty()) return static_cast<int32_t>(slot);
    return positions[(seq * num_kv_heads + kv_head) * positions_stride + slot];
  }
  bool Candidate(int64_t seq, int64_t kv_head, int64_t slot) const {
    const int32_t p = Position(seq, kv_head, slot);
    return p >= sinks && p < recent_from[seq];
  }
  // Element e of query head `head` in ring row r of sequence `seq`.
  size_t QueryAt(int64_t seq, int64_t r, int64_t head, int64_t e) const {
    return seq * q_seq_stride + r * q_row_stride + head * head_dim + e;
  }
  // The ring row holding the query of `position`, as in KvSequence.
  int64_t RingRow(int64_t position) const { return (position % window + window) % window; }
  size_t KeyAt(int64_t seq, int64_t kv_head, int64_t slot) const {
    const int64_t block = tables[seq * table_stride + slot / block_size];
    return ((block * num_kv_heads + kv_head) * block_size + slot % block_size) * head_dim;
  }
};

// Per sequence: `sinks` sink tokens, the candidates, and the W + 1 recent
// tokens t - W .. t. Scrambled, the candidates' positions are a sample of
// twice as many (the rest evicted) and every KV head orders its slots
// differently.
Case MakeCase(const Shape& s, std::mt19937& rng) {
  Case c;
  c.num_seqs = static_cast<int64_t>(s.candidates.size());
  c.window = s.window;
  c.block_size = s.block_size;
  c.num_heads = s.num_heads;
  c.num_kv_heads = s.num_kv_heads;
  c.head_dim = s.head_dim;
  c.sinks = s.sinks;
  c.max_fusion = s.max_fusion;
  c.group_max_prob = s.group_max_prob;
  c.scale = 1.0f / std::sqrt(static_cast<float>(s.head_dim));
  int64_t longest = 0;
  for (int32_t cand : s.candidates) {
    const int64_t slots = s.sinks + cand + s.window + 1;
    c.num_slots.push_back(static_cast<int32_t>(slots));
    c.recent_from.push_back(static_cast<int32_t>(s.sinks + (s.scrambled ? 2 * cand + 3 : cand)));
    longest = std::max(longest, slots);
  }
  c.max_slots = longest + s.extra_max_slots;

  ScrambledTables tables = ScrambleBlockTables(c.num_slots, s.block_size, rng);
  const int64_t pool_blocks = tables.pool_blocks;
  c.tables = std::move(tables.tables);
  c.table_stride = tables.stride;

  c.positions_stride = c.max_slots + 1;
  if (s.scrambled) {
    c.positions.assign(c.num_seqs * s.num_kv_heads * c.positions_stride, -5);
    for (int64_t seq = 0; seq < c.num_seqs; ++seq) {
      const int32_t cand = s.candidates[seq];
      const int32_t recent = c.recent_from[seq];
      for (int64_t h = 0; h < s.num_kv_heads; ++h) {
        std::vector<int32_t> older(recent - s.sinks);
        std::iota(older.begin(), older.end(), static_cast<int32_t>(s.sinks));
        std::shuffle(older.begin(), older.end(), rng);
        std::vector<int32_t> held(s.sinks);
        std::iota(held.begin(), held.end(), 0);
        held.insert(held.end(), older.begin(), older.begin() + cand);
        for (int64_t p = recent; p <= recent + s.window; ++p) {
          held.push_back(static_cast<int32_t>(p));
        }
        std::shuffle(held.begin(), held.end(), rng);
        std::copy(held.begin(), held.end(),
                  &c.positions[(seq * s.num_kv_heads + h) * c.positions_stride]);
      }
    }
  }

  const int64_t block_elems = s.num_kv_heads * s.block_size * s.head_dim;
  c.k_cache.assign(pool_blocks * block_elems, 0xffff);
  for (int64_t seq = 0; seq < c.num_seqs; ++seq) {
    for (int64_t slot = 0; slot < c.num_slots[seq]; ++slot) {
      for (int64_t h = 0; h < s.num_kv_heads; ++h) {
        const std::vector<uint16_t> k = RandomBf16(s.head_dim, 1.0f, rng);
        std::copy(k.begin(), k.end(), &c.k_cache[c.KeyAt(seq, h, slot)]);
      }
    }
  }
  // Ring rows inside fused QKV rows, sequences a head apart; only the
  // query heads hold numbers. Group-max-prob leaves out the ring row of
  // t - W, which holds a query all the same (a NaN row would vanish in its
  // max over heads, so reading it would not show).
  c.q_row_stride = (s.num_heads + 2 * s.num_kv_heads) * s.head_dim;
  c.q_seq_stride = s.window * c.q_row_stride + s.head_dim;
  c.q.assign(c.num_seqs * c.q_seq_stride, 0xffff);
  for (int64_t seq = 0; seq < c.num_seqs; ++seq) {
    for (int64_t r = 0; r < s.window; ++r) {
      const std::vector<uint16_t> row = RandomBf16(s.num_heads * s.head_dim, 1.0f, rng);
      std::copy(row.begin(), row.end(), &c.q[c.QueryAt(seq, r, 0, 0)]);
    }
  }
  return c;
}

// What the GPU's victims hold before a launch, and after it where nothing
// was written (four 0x7f bytes: no valid answer).
constexpr int32_t kUnwritten = 0x7f7f7f7f;

struct Result {
  std::vector<int32_t> victims;  // [seq][kv_head]
  std::vector<float> scores;     // [seq][kv_head][scores_stride]
  int64_t scores_stride = 0;
};

// KvSequence::MorphKvRows: the score rows' queries, [rows][head_dim].
// Group-logit-sum: per position t-W .. t-1 (t the next token), the sum of
// the group's heads. Group-max-prob: per position t-W+1 .. t-1, each head.
std::vector<float> ScoreRows(const Case& c, const std::vector<float>& q_f, int64_t seq,
                             int64_t kv_head) {
  const int64_t d = c.head_dim;
  const int64_t t = c.recent_from[seq] + c.window;
  std::vector<float> rows;
  if (!c.group_max_prob) {
    rows.assign(c.window * d, 0.0f);
    for (int64_t r = 0; r < c.window; ++r) {
      for (int64_t g = 0; g < c.Group(); ++g) {
        for (int64_t e = 0; e < d; ++e) {
          rows[r * d + e] +=
              q_f[c.QueryAt(seq, c.RingRow(t - c.window + r), kv_head * c.Group() + g, e)];
        }
      }
    }
    return rows;
  }
  for (int64_t position = t - c.window + 1; position < t; ++position) {
    for (int64_t g = 0; g < c.Group(); ++g) {
      const size_t at = c.QueryAt(seq, c.RingRow(position), kv_head * c.Group() + g, 0);
      rows.insert(rows.end(), q_f.begin() + at, q_f.begin() + at + d);
    }
  }
  return rows;
}

// What KvSequence computes for each (sequence, KV head).
Result RunCpu(const Case& c) {
  const std::vector<float> k_f = Bf16ToF32(c.k_cache);
  const std::vector<float> q_f = Bf16ToF32(c.q);
  const int64_t d = c.head_dim;
  Result out;
  out.scores_stride = c.max_slots;
  out.scores.assign(c.num_seqs * c.num_kv_heads * c.max_slots, 0.0f);
  for (int64_t seq = 0; seq < c.num_seqs; ++seq) {
    const int64_t n = c.num_slots[seq];
    if (n <= 0) {
      // Left alone: the GPU writes nothing of it.
      out.victims.insert(out.victims.end(), c.num_kv_heads, kUnwritten);
      continue;
    }
    for (int64_t h = 0; h < c.num_kv_heads; ++h) {
      const std::vector<float> rows = ScoreRows(c, q_f, seq, h);
      const int64_t num_rows = static_cast<int64_t>(rows.size()) / d;
      const kernels::PagedKeys keys{
          k_f.data(), &c.tables[seq * c.table_stride], c.block_size, c.num_kv_heads, h, d, n};
      std::vector<float> logits(num_rows * n);
      kernels::PagedKeyLogits(keys, rows.data(), d, num_rows, c.scale, logits.data(), n);
      std::vector<uint8_t> mask(n);
      for (int64_t j = 0; j < n; ++j) mask[j] = c.Candidate(seq, h, j);
      kernels::MaskedSoftmaxRows(logits.data(), num_rows, n, n, mask.data(), nullptr);
      float* scores = &out.scores[(seq * c.num_kv_heads + h) * c.max_slots];
      // Group-max-prob: each position's G heads by max first.
      kernels::FuseRows(logits.data(), num_rows, c.group_max_prob ? c.Group() : 1, n, n,
                        c.max_fusion, scores);
      int32_t victim = -1;
      for (int64_t j = 0; j < n; ++j) {
        if (!mask[j]) continue;
        if (victim < 0 || scores[j] < scores[victim] ||
            (scores[j] == scores[victim] && c.Position(seq, h, j) < c.Position(seq, h, victim))) {
          victim = static_cast<int32_t>(j);
        }
      }
      out.victims.push_back(victim);
    }
  }
  return out;
}

// Where the first pass (the row statistics) runs.
enum class Route {
  kAlone,        // MorphKvSelectVictims
  kInAttention,  // PagedAttention with MorphKvFusedStats, then ...FromStats
};

// The route through PagedAttention: the case's sequences in reverse order
// with their slots as contexts, after an unscored copy of the first, each
// with its own random query. Its statistics start as NaN; the attention
// output must be the same bits as without the statistics.
absl::Status RunFirstPassInAttention(const Case& c, const DeviceBuffer& d_k,
                                     const DeviceBuffer& d_recent, const DeviceBuffer& d_positions,
                                     const DeviceBuffer& d_q, float* stats, cudaStream_t stream) {
  const int64_t n = c.num_seqs + 1;
  const int64_t stride = c.table_stride;
  std::vector<int32_t> tables(n * stride), context(n), scored_as(n);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t seq = i == 0 ? 0 : c.num_seqs - i;
    std::copy_n(&c.tables[seq * stride], stride, &tables[i * stride]);
    context[i] = std::max(c.num_slots[seq], 0);
    scored_as[i] = i == 0 ? -1 : static_cast<int32_t>(seq);
  }
  std::mt19937 rng(static_cast<uint32_t>(n * 31 + c.head_dim));
  const int64_t q_stride = c.num_heads * c.head_dim;
  ASSIGN_OR_RETURN(DeviceBuffer d_tables, Upload(tables));
  ASSIGN_OR_RETURN(DeviceBuffer d_context, Upload(context));
  ASSIGN_OR_RETURN(DeviceBuffer d_scored_as, Upload(scored_as));
  ASSIGN_OR_RETURN(DeviceBuffer d_v, Upload(RandomBf16(c.k_cache.size(), 1.0f, rng)));
  ASSIGN_OR_RETURN(DeviceBuffer d_query, Upload(RandomBf16(n * q_stride, 1.0f, rng)));
  PagedAttentionArgs attention;
  attention.k_cache = d_k.as<__nv_bfloat16>();
  attention.v_cache = d_v.as<__nv_bfloat16>();
  attention.block_tables = d_tables.as<int32_t>();
  attention.block_table_stride = stride;
  attention.context_lens = d_context.as<int32_t>();
  attention.max_context_len = c.max_slots;
  attention.num_seqs = n;
  attention.block_size = c.block_size;
  attention.num_heads = c.num_heads;
  attention.num_kv_heads = c.num_kv_heads;
  attention.head_dim = c.head_dim;
  attention.scale = c.scale;
  ASSIGN_OR_RETURN(DeviceBuffer d_scratch, Poisoned<uint8_t>(PagedAttentionScratchBytes(
                                               n, c.num_heads, c.head_dim, c.max_slots)));
  ASSIGN_OR_RETURN(DeviceBuffer d_plain, Poisoned<uint16_t>(n * q_stride));
  ASSIGN_OR_RETURN(DeviceBuffer d_out, Poisoned<uint16_t>(n * q_stride));
  RETURN_IF_ERROR(PagedAttention(attention, d_query.as<__nv_bfloat16>(), q_stride,
                                 d_plain.as<__nv_bfloat16>(), d_scratch.data(), stream));
  MorphKvFusedStats fused;
  fused.scored_as = d_scored_as.as<int32_t>();
  fused.recent_from = d_recent.as<int32_t>();
  fused.positions = d_positions.as<int32_t>();
  fused.positions_stride = c.positions_stride;
  fused.sinks = c.sinks;
  fused.q = d_q.as<__nv_bfloat16>();
  fused.q_seq_stride = c.q_seq_stride;
  fused.q_row_stride = c.q_row_stride;
  fused.window = c.window;
  fused.group_max_prob = c.group_max_prob;
  fused.num_scored = c.num_seqs;
  fused.max_slots = c.max_slots;
  fused.stats = stats;
  RETURN_IF_ERROR(PagedAttention(attention, d_query.as<__nv_bfloat16>(), q_stride,
                                 d_out.as<__nv_bfloat16>(), d_scratch.data(), stream, &fused));
  RETURN_IF_ERROR(CudaStatus(cudaStreamSynchronize(stream), "cudaStreamSynchronize"));
  ASSIGN_OR_RETURN(const std::vector<uint16_t> plain, d_plain.ToHost<uint16_t>());
  ASSIGN_OR_RETURN(const std::vector<uint16_t> out, d_out.ToHost<uint16_t>());
  if (plain != out) return absl::InternalError("the scored attention changed its output");
  return absl::OkStatus();
}

// The GPU's answer, from poisoned outputs: victims start as kUnwritten,
// scores as NaN; scores only when `with_scores`.
absl::StatusOr<Result> RunGpu(const Case& c, bool with_scores, cudaStream_t stream,
                              Route route = Route::kAlone) {
  ASSIGN_OR_RETURN(DeviceBuffer d_k, Upload(c.k_cache));
  ASSIGN_OR_RETURN(DeviceBuffer d_tables, Upload(c.tables));
  ASSIGN_OR_RETURN(DeviceBuffer d_slots, Upload(c.num_slots));
  ASSIGN_OR_RETURN(DeviceBuffer d_recent, Upload(c.recent_from));
  ASSIGN_OR_RETURN(DeviceBuffer d_positions, Upload(c.positions));
  ASSIGN_OR_RETURN(DeviceBuffer d_q, Upload(c.q));
  Result out;
  out.scores_stride = c.max_slots + 3;
  const size_t units = c.num_seqs * c.num_kv_heads;
  ASSIGN_OR_RETURN(DeviceBuffer d_victims, DeviceBuffer::Allocate(units * sizeof(int32_t)));
  RETURN_IF_ERROR(d_victims.Fill(0x7f));
  ASSIGN_OR_RETURN(DeviceBuffer d_scores,
                   Poisoned<float>(with_scores ? units * out.scores_stride : 0));
  ASSIGN_OR_RETURN(DeviceBuffer d_scratch, Poisoned<uint8_t>(MorphKvScoringScratchBytes(
                                               c.num_seqs, c.num_heads, c.num_kv_heads, c.window,
                                               c.max_slots, c.group_max_prob)));
  MorphKvScoringArgs args;
  args.k_cache = d_k.as<__nv_bfloat16>();
  args.block_tables = d_tables.as<int32_t>();
  args.block_table_stride = c.table_stride;
  args.num_slots = d_slots.as<int32_t>();
  args.recent_from = d_recent.as<int32_t>();
  args.positions = d_positions.as<int32_t>();  // null when empty
  args.positions_stride = c.positions_stride;
  args.sinks = c.sinks;
  args.max_slots = c.max_slots;
  args.num_seqs = c.num_seqs;
  args.block_size = c.block_size;
  args.num_heads = c.num_heads;
  args.num_kv_heads = c.num_kv_heads;
  args.head_dim = c.head_dim;
  args.window = c.window;
  args.max_fusion = c.max_fusion;
  args.group_max_prob = c.group_max_prob;
  args.scale = c.scale;
  if (route == Route::kAlone) {
    RETURN_IF_ERROR(MorphKvSelectVictims(
        args, d_q.as<__nv_bfloat16>(), c.q_seq_stride, c.q_row_stride, d_victims.as<int32_t>(),
        d_scores.as<float>(), out.scores_stride, d_scratch.data(), stream));
  } else {
    ASSIGN_OR_RETURN(
        DeviceBuffer d_stats,
        Poisoned<float>(MorphKvFusedStatsBytes(c.num_seqs, c.num_heads, c.num_kv_heads, c.window,
                                               c.max_slots, c.group_max_prob) /
                        sizeof(float)));
    RETURN_IF_ERROR(
        RunFirstPassInAttention(c, d_k, d_recent, d_positions, d_q, d_stats.as<float>(), stream));
    RETURN_IF_ERROR(MorphKvSelectVictimsFromStats(args, d_q.as<__nv_bfloat16>(), c.q_seq_stride,
                                                  c.q_row_stride, d_stats.as<float>(),
                                                  d_victims.as<int32_t>(), d_scores.as<float>(),
                                                  out.scores_stride, d_scratch.data(), stream));
  }
  RETURN_IF_ERROR(CudaStatus(cudaStreamSynchronize(stream), "cudaStreamSynchronize"));
  ASSIGN_OR_RETURN(out.victims, d_victims.ToHost<int32_t>());
  ASSIGN_OR_RETURN(out.scores, d_scores.ToHost<float>());
  return out;
}

// Sequence s of the GPU's answer against the CPU's: scores to within the
// tolerances and nothing past its slots written; the same victim, or one
// the CPU scores as low. A sequence left alone keeps kUnwritten victims
// and NaN scores.
void ExpectSequenceMatches(const Case& c, const Result& want, const Result& got, int64_t seq,
                           const std::string& label) {
  const int64_t n = std::max<int64_t>(c.num_slots[seq], 0);
  for (int64_t h = 0; h < c.num_kv_heads; ++h) {
    const std::string where = absl::StrCat("sequence ", seq, ", KV head ", h, ", ", label);
    const std::span<const float> got_scores(
        &got.scores[(seq * c.num_kv_heads + h) * got.scores_stride], got.scores_stride);
    // Nothing past the sequence's slots is written.
    EXPECT_TRUE(std::all_of(got_scores.begin() + n, got_scores.end(), [](float x) {
      return std::isnan(x);
    })) << where;
    const int32_t want_victim = want.victims[seq * c.num_kv_heads + h];
    const int32_t got_victim = got.victims[seq * c.num_kv_heads + h];
    if (n == 0) {
      EXPECT_EQ(got_victim, kUnwritten) << where;
      continue;
    }
    const std::span<const float> want_scores(
        &want.scores[(seq * c.num_kv_heads + h) * want.scores_stride], n);
    EXPECT_TRUE(AllClose(got_scores.first(n), want_scores, kScoreAbsTol, kScoreRelTol)) << where;
    if (want_victim < 0 || got_victim == want_victim) {
      EXPECT_EQ(got_victim, want_victim) << where;
      continue;
    }
    // Another candidate is fine only if the CPU scores it as low, to
    // within the scores' tolerance.
    ASSERT_GE(got_victim, 0) << where;
    ASSERT_LT(got_victim, n) << where;
    EXPECT_TRUE(c.Candidate(seq, h, got_victim)) << where << ": victim " << got_victim;
    const double tol = kScoreAbsTol + kScoreRelTol * want_scores[want_victim];
    EXPECT_LE(want_scores[got_victim], want_scores[want_victim] + tol)
        << where << ": victim " << got_victim << " instead of " << want_victim;
  }
}

class MorphKvScoringCudaTest : public testing::CudaTest,
                               public ::testing::WithParamInterface<Shape> {};

TEST_P(MorphKvScoringCudaTest, MatchesCpuReference) {
  const Shape& s = GetParam();
  std::mt19937 rng(
      static_cast<uint32_t>(s.candidates[0] * 7 + s.window * 5 + s.num_heads * 3 + s.head_dim));
  const Case c = MakeCase(s, rng);
  const Result want = RunCpu(c);
  ASSERT_OK_AND_ASSIGN(const Result got, RunGpu(c, /*with_scores=*/true, stream_));

  for (int64_t seq = 0; seq < c.num_seqs; ++seq) {
    ExpectSequenceMatches(c, want, got, seq, absl::StrCat(s.candidates[seq], " candidates"));
  }

  // Without the scores, the same victims.
  ASSERT_OK_AND_ASSIGN(const Result victims_only, RunGpu(c, /*with_scores=*/false, stream_));
  EXPECT_EQ(victims_only.victims, got.victims);

  // With the first pass run by the decode attention: the same answer (to
  // within the tolerances: its partitions sum the exps in another order).
  ASSERT_OK_AND_ASSIGN(const Result fused,
                       RunGpu(c, /*with_scores=*/true, stream_, Route::kInAttention));
  for (int64_t seq = 0; seq < c.num_seqs; ++seq) {
    ExpectSequenceMatches(c, want, fused, seq,
                          absl::StrCat(s.candidates[seq], " candidates, in the attention"));
  }
}

// Windows of 1, 2, 8, 32 and 40 (two row chunks); 0, 1, 17 and over 1000
// candidates (several partitions); block sizes 1, 7, 16 with half-filled
// last blocks; groups 1, 3, 4, 8; head dims 64, 128, 256; both fusions;
// sinks; max_slots above every sequence, so that whole partitions have
// nothing to do.
INSTANTIATE_TEST_SUITE_P(Shapes, MorphKvScoringCudaTest,
                         ::testing::Values(Shape{{1}, 1, 16, 1, 1, 64, false, false},
                                           Shape{{17}, 2, 7, 3, 1, 64, true, true},
                                           Shape{{1, 17, 0}, 8, 16, 8, 2, 128, false, true},
                                           Shape{{1030, 5}, 32, 16, 16, 2, 128, true, false},
                                           Shape{{1200}, 32, 1, 4, 1, 64, false, true},
                                           Shape{{700, 300}, 40, 7, 12, 3, 128, false, true, 4},
                                           Shape{{513, 17}, 8, 16, 24, 3, 64, true, true, 0, 300},
                                           Shape{{300}, 2, 16, 8, 1, 256, false, false},
                                           Shape{{1025}, 1, 7, 6, 2, 128, true, true, 2},
                                           Shape{{0, 40}, 32, 16, 4, 4, 128, true, true}),
                         ShapeName);

// Group-max-prob: (W-1) * G score rows, so mostly shorter windows. Groups 1,
// 3, 4, 8 and 40 (over a row chunk, so a position's heads span chunks);
// 40 rows of G = 8 and 33 of G = 3 take two chunks; W = 1 has no rows at
// all; the rest as above.
INSTANTIATE_TEST_SUITE_P(
    GroupMaxProb, MorphKvScoringCudaTest,
    ::testing::Values(Shape{{1}, 2, 16, 1, 1, 64, false, false, 0, 0, true},
                      Shape{{17}, 5, 7, 3, 1, 64, true, true, 0, 0, true},
                      Shape{{1, 17, 0}, 8, 16, 8, 2, 128, false, true, 0, 0, true},
                      Shape{{1030, 5}, 6, 16, 16, 2, 128, true, false, 0, 0, true},
                      Shape{{1100}, 3, 1, 4, 1, 64, false, true, 0, 0, true},
                      Shape{{1030}, 4, 7, 8, 1, 128, true, true, 0, 0, true},
                      Shape{{700, 300}, 12, 7, 12, 4, 128, false, true, 4, 0, true},
                      Shape{{513, 17}, 5, 16, 24, 3, 64, true, true, 0, 300, true},
                      Shape{{300}, 2, 16, 8, 1, 256, false, false, 0, 0, true},
                      Shape{{40}, 1, 7, 6, 2, 128, true, true, 2, 0, true},
                      Shape{{0, 40}, 3, 16, 80, 2, 64, true, true, 0, 0, true},
                      Shape{{17, 300}, 3, 16, 40, 1, 128, false, true, 0, 0, true}),
    ShapeName);

class MorphKvIdleCudaTest : public testing::CudaTest {};

// A sequence with num_slots 0 or below is left alone: its victims and
// scores keep what they held (another launch over the same batch may have
// written them), while the others, one of them without candidates, get
// the CPU's answer as always.
TEST_F(MorphKvIdleCudaTest, SequencesWithoutSlotsAreLeftAlone) {
  for (const bool group_max_prob : {false, true}) {
    const Shape s{{17, 3, 0, 9, 5}, 4, 7, 4, 2, 64, false, true, 0, 0, group_max_prob};
    std::mt19937 rng(41);
    Case c = MakeCase(s, rng);
    c.num_slots[1] = 0;
    c.num_slots[4] = -3;
    const Result want = RunCpu(c);
    for (const Route route : {Route::kAlone, Route::kInAttention}) {
      ASSERT_OK_AND_ASSIGN(const Result got, RunGpu(c, /*with_scores=*/true, stream_, route));
      for (int64_t seq = 0; seq < c.num_seqs; ++seq) {
        ExpectSequenceMatches(
            c, want, got, seq,
            absl::StrCat(c.num_slots[seq], " slots", group_max_prob ? ", group-max-prob" : "",
                         route == Route::kAlone ? "" : ", in the attention"));
      }
    }
  }
}

class MorphKvTieCudaTest : public testing::CudaTest {};

// Three candidates share one key, far from every window query, so their
// scores are bit-identical and the lowest under either aggregation: the
// victim is whichever holds the smallest position, within a partition and
// across partitions.
TEST_F(MorphKvTieCudaTest, OlderTokenGoesFirstOnExactTie) {
  const Shape s{{600}, 3, 7, 8, 2, 64, false, true};
  std::mt19937 rng(99);
  Case c = MakeCase(s, rng);
  const int64_t d = c.head_dim;
  // The same query in every window row; for KV head h, tied slots get the
  // key -16 * (the group's summed query, normalised).
  for (int64_t r = 1; r < c.window; ++r) {
    std::copy_n(&c.q[c.QueryAt(0, 0, 0, 0)], c.num_heads * d, &c.q[c.QueryAt(0, r, 0, 0)]);
  }
  std::vector<std::vector<int64_t>> tied(c.num_kv_heads);
  for (int64_t h = 0; h < c.num_kv_heads; ++h) {
    std::vector<float> sum(d, 0.0f);
    for (int64_t g = 0; g < c.Group(); ++g) {
      for (int64_t e = 0; e < d; ++e) {
        sum[e] += BF16ToFloat(c.q[c.QueryAt(0, 0, h * c.Group() + g, e)]);
      }
    }
    const float norm = std::sqrt(std::inner_product(sum.begin(), sum.end(), sum.begin(), 0.0f));
    std::vector<uint16_t> key(d);
    for (int64_t e = 0; e < d; ++e) key[e] = FloatToBF16(-16.0f * sum[e] / norm);
    // The first candidate slot (partition 0), then the last two (both in
    // partition 2).
    std::vector<int64_t> candidates;
    for (int64_t j = 0; j < c.num_slots[0]; ++j) {
      if (c.Candidate(0, h, j)) candidates.push_back(j);
    }
    ASSERT_GE(candidates[candidates.size() - 2], 2 * kScoringPartitionSize);
    tied[h] = {candidates.front(), candidates[candidates.size() - 2], candidates.back()};
    for (int64_t slot : tied[h]) std::copy(key.begin(), key.end(), &c.k_cache[c.KeyAt(0, h, slot)]);
  }

  for (const bool group_max_prob : {false, true}) {
    c.group_max_prob = group_max_prob;
    for (const bool max_fusion : {false, true}) {
      c.max_fusion = max_fusion;
      // Each tied slot in turn gets the smallest of the three positions.
      for (int turn = 0; turn < 3; ++turn) {
        for (int64_t h = 0; h < c.num_kv_heads; ++h) {
          int32_t* pos[3];
          for (int i = 0; i < 3; ++i) pos[i] = &c.positions[h * c.positions_stride + tied[h][i]];
          std::sort(pos, pos + 3, [](const int32_t* a, const int32_t* b) { return *a < *b; });
          std::vector<int32_t> values = {*pos[0], *pos[1], *pos[2]};
          for (int i = 0; i < 3; ++i) {
            c.positions[h * c.positions_stride + tied[h][(turn + i) % 3]] = values[i];
          }
        }
        ASSERT_OK_AND_ASSIGN(const Result got, RunGpu(c, /*with_scores=*/true, stream_));
        // The first pass in the attention ties the same way.
        ASSERT_OK_AND_ASSIGN(const Result fused,
                             RunGpu(c, /*with_scores=*/false, stream_, Route::kInAttention));
        EXPECT_EQ(fused.victims, got.victims);
        for (int64_t h = 0; h < c.num_kv_heads; ++h) {
          const float* scores = &got.scores[h * got.scores_stride];
          const float tie = scores[tied[h][0]];
          EXPECT_EQ(scores[tied[h][1]], tie) << "KV head " << h;
          EXPECT_EQ(scores[tied[h][2]], tie) << "KV head " << h;
          for (int64_t j = 0; j < c.num_slots[0]; ++j) {
            if (c.Candidate(0, h, j) &&
                std::find(tied[h].begin(), tied[h].end(), j) == tied[h].end()) {
              ASSERT_GT(scores[j], tie) << "KV head " << h << ", slot " << j;
            }
          }
          EXPECT_EQ(got.victims[h], tied[h][turn])
              << "KV head " << h << ", fusion " << (max_fusion ? "max" : "sum")
              << (group_max_prob ? ", group-max-prob" : "");
        }
      }
    }
  }
}

}  // namespace
}  // namespace morphserve::kernels::cuda
