// The KV policies' compaction and query ring on the GPU: CompactKv against
// KvSequence's sequential Compact, PushQueryRing against the ring it keeps,
// and the first selections of streaming and SnapKV end to end against
// KvSequence itself. Batches with scrambled block tables and positions;
// outputs start poisoned, and cache rows no kernel may touch are NaN.

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

using testing::Bf16ToF32;
using testing::Cache;
using testing::kNanBf16;
using testing::kPoisonInt;
using testing::MakeCache;
using testing::Poisoned;
using testing::RandomBf16;
using testing::Upload;

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

}  // namespace
}  // namespace morphserve::kernels::cuda
