// The KV policies' choices on the GPU against KvSequence's comparator: the
// steady-state victim (SelectLowestCandidates) and the first selection's
// keep lists (SelectKeepLists), exactly, on tied, spread and absent scores
// with aligned and scrambled positions; outputs start poisoned, and a
// sequence left alone must keep its sentinel.

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

using testing::kPoisonInt;
using testing::Upload;

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
// Argument checks come before any CUDA call, so these need no GPU.

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

}  // namespace
}  // namespace morphserve::kernels::cuda
