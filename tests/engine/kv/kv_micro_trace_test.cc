// The spec's worked micro-trace (MorphKV, W = 2, C = 5, prompt of 8) and
// the tie rule, on hand-made keys and queries.
#include <algorithm>
#include <vector>

#include "common/kv_policy.h"
#include "common/thread_pool.h"
#include "engine/kv/kv_sequence.h"
#include "engine/kv/paged_kv_cache.h"
#include "gtest/gtest.h"

namespace morphserve::engine {
namespace {

constexpr int64_t kDim = 4;

// One layer, one KV head, one query head: token t has key keys[t] and query
// queries[t] (values do not matter for selection).
class SingleHead {
 public:
  SingleHead(const KvPolicyConfig& config, int64_t max_slots)
      : cache_({1, 1, kDim, 4, (max_slots + 3) / 4}),
        seq_(config, cache_.shape(), 1, max_slots),
        pool_(1),
        table_(cache_.shape().num_blocks) {
    for (size_t i = 0; i < table_.size(); ++i) table_[i] = static_cast<int32_t>(table_.size() - 1 - i);
  }

  void Step(const std::vector<std::vector<float>>& keys,
            const std::vector<std::vector<float>>& queries) {
    const int64_t n = static_cast<int64_t>(keys.size());
    ASSERT_TRUE(seq_.CheckStep(n).ok());
    std::vector<float> q;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t slot = seq_.WriteSlot(0, 0, i);
      std::copy_n(keys[i].begin(), kDim, cache_.keys(0) + cache_.Index(table_[slot / 4], 0, slot % 4));
      q.insert(q.end(), queries[i].begin(), queries[i].end());
    }
    seq_.AfterAttention(0, q.data(), kDim, n, false, cache_, table_, &pool_, scratch_);
    seq_.EndStep(n, false);
  }

  // Positions held, ascending, and the position the next token replaces.
  std::vector<int64_t> Held() const {
    std::vector<int64_t> out;
    for (int64_t s = 0; s < seq_.num_slots(); ++s) out.push_back(seq_.SlotPosition(0, 0, s));
    std::sort(out.begin(), out.end());
    return out;
  }
  int64_t NextEvicted() const {
    const int64_t slot = seq_.PendingVictim(0, 0);
    return slot < 0 ? -1 : seq_.SlotPosition(0, 0, slot);
  }
  const KvSequence& seq() const { return seq_; }

 private:
  PagedKvCache cache_;
  KvSequence seq_;
  ThreadPool pool_;
  std::vector<int32_t> table_;
  std::vector<KvScratch> scratch_;
};

const std::vector<float> kZero = {0, 0, 0, 0};
const std::vector<float> kE0 = {1, 0, 0, 0};
const std::vector<float> kE1 = {0, 1, 0, 0};
const std::vector<float> kStrongE0 = {10, 0, 0, 0};

KvPolicyConfig MicroTrace(MorphKvAggregation aggregation) {
  KvPolicyConfig c;
  c.kind = KvPolicyKind::kMorphKv;
  c.window = 2;
  c.capacity = 5;
  c.aggregation = aggregation;
  return c;
}

class MicroTraceTest : public ::testing::TestWithParam<MorphKvAggregation> {};

// Positions 1, 4 and 5 have keys the window queries attend to; 0, 2, 3 do
// not (equal scores: the tie keeps the newest, 3, as next victim); 6's key is
// orthogonal to the queries.
TEST_P(MicroTraceTest, FollowsTheSpec) {
  SingleHead head(MicroTrace(GetParam()), 8);
  head.Step({kZero, kE0, kZero, kZero, kE0, kE0, kE1, kE1},
            {kZero, kZero, kZero, kZero, kZero, kZero, kStrongE0, kStrongE0});
  // After prefill: cut to C+1 = 6 at once. Candidates 0..5 were scored by
  // q6, q7 (variant a: q7 only); {1, 4, 5} win; 3 is kept as the slot that
  // token 8 overwrites.
  EXPECT_EQ(head.Held(), std::vector<int64_t>({1, 3, 4, 5, 6, 7}));
  EXPECT_EQ(head.NextEvicted(), 3);
  EXPECT_EQ(head.seq().num_tokens(), 8);

  // t = 8: q8 attends to {1, 4, 5, 6, 7, 8}. Deciding for t = 9: candidates
  // {1, 4, 5, 6}, rows q7, q8 (variant a: q8); 6 scores lowest.
  head.Step({kE1}, {kStrongE0});
  EXPECT_EQ(head.Held(), std::vector<int64_t>({1, 4, 5, 6, 7, 8}));
  EXPECT_EQ(head.NextEvicted(), 6);

  head.Step({kE1}, {kStrongE0});
  EXPECT_EQ(head.Held(), std::vector<int64_t>({1, 4, 5, 7, 8, 9}));
  const KvUsage usage = head.seq().Usage();
  EXPECT_EQ(usage.tokens_resident, 6);
  EXPECT_EQ(usage.tokens_full_equivalent, 10);
  EXPECT_EQ(usage.tokens_evicted, 4);
}

INSTANTIATE_TEST_SUITE_P(Variants, MicroTraceTest,
                         ::testing::Values(MorphKvAggregation::kGroupLogitSum,
                                           MorphKvAggregation::kGroupMaxProb));

// With every MorphKV score equal, each step evicts the oldest candidate, so
// the cache is always the newest C+1 tokens. (H2O's accumulated scores are
// not tied on such input: older tokens have been attended more often.)
TEST(KvTies, EvictTheOlderToken) {
  for (MorphKvAggregation aggregation :
       {MorphKvAggregation::kGroupLogitSum, MorphKvAggregation::kGroupMaxProb}) {
    SingleHead head(MicroTrace(aggregation), 12);
    head.Step(std::vector<std::vector<float>>(12, kE0), std::vector<std::vector<float>>(12, kE0));
    for (int64_t t = 12; t < 40; ++t) {
      std::vector<int64_t> newest;
      for (int64_t p = t - 5; p < t; ++p) newest.push_back(p);
      std::vector<int64_t> held = head.Held();
      // The next victim is still held; it is the oldest.
      ASSERT_EQ(head.NextEvicted(), held.front()) << "t " << t;
      held.erase(held.begin());
      ASSERT_EQ(held, newest) << "t " << t;
      head.Step({kE0}, {kE0});
    }
  }
}

}  // namespace
}  // namespace morphserve::engine
