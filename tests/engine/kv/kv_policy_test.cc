// The paged KV policies (KvSequence over PagedKvCache) against the dense
// reference, on random query/key/value streams over hundreds of steps, with
// the invariants checked after every step; plus the spec's micro-trace.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "common/kv_policy.h"
#include "common/thread_pool.h"
#include "engine/kv/kv_sequence.h"
#include "engine/kv/paged_kv_cache.h"
#include "gtest/gtest.h"
#include "kernels/cpu/paged_attention.h"
#include "tests/engine/kv/dense_kv_reference.h"

namespace morphserve::engine {
namespace {

struct Dims {
  int64_t layers = 2, heads = 4, kv_heads = 2, head_dim = 16, block_size = 5;
};

// Drives one KvSequence through steps the way the forward pass does, over a
// pool of blocks handed out in scrambled order.
class PagedDriver {
 public:
  PagedDriver(const KvPolicyConfig& config, const Dims& dims, int64_t max_slots)
      : dims_(dims),
        shape_{dims.layers, dims.kv_heads, dims.head_dim, dims.block_size,
               (max_slots + dims.block_size - 1) / dims.block_size + 3},
        cache_(shape_),
        seq_(config, shape_, dims.heads, max_slots),
        pool_(2) {
    free_.resize(shape_.num_blocks);
    std::iota(free_.begin(), free_.end(), 0);
    std::shuffle(free_.begin(), free_.end(), std::mt19937(7));
  }

  KvSequence& seq() { return seq_; }
  const PagedKvCache& cache() const { return cache_; }
  const std::vector<int32_t>& table() const { return table_; }
  int64_t peak_blocks() const { return peak_blocks_; }

  // Makes the block table cover the step's slots.
  void BeginStep(int64_t n) {
    ASSERT_TRUE(seq_.CheckStep(n).ok()) << seq_.CheckStep(n);
    const int64_t blocks = (seq_.SlotsNeeded(n) + dims_.block_size - 1) / dims_.block_size;
    while (static_cast<int64_t>(table_.size()) < blocks) {
      ASSERT_FALSE(free_.empty());
      table_.push_back(free_.back());
      free_.pop_back();
    }
    peak_blocks_ = std::max<int64_t>(peak_blocks_, static_cast<int64_t>(table_.size()));
  }

  // Runs one layer of the step; `attended` gets, per KV head, the positions
  // the step's last token attended to (ascending).
  void Layer(int64_t layer, const float* q, const float* k, const float* v, int64_t n,
             bool prompt_pending, float* out, std::vector<std::vector<int64_t>>* attended) {
    const int64_t d = dims_.head_dim, bs = dims_.block_size;
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t h = 0; h < dims_.kv_heads; ++h) {
        const int64_t slot = seq_.WriteSlot(layer, h, i);
        const int64_t at = cache_.Index(table_[slot / bs], h, slot % bs);
        std::copy_n(k + (i * dims_.kv_heads + h) * d, d, cache_.keys(layer) + at);
        std::copy_n(v + (i * dims_.kv_heads + h) * d, d, cache_.values(layer) + at);
      }
    }
    kernels::PagedAttentionArgs args;
    args.k_cache = cache_.keys(layer);
    args.v_cache = cache_.values(layer);
    args.block_table = table_.data();
    args.block_size = bs;
    args.num_heads = dims_.heads;
    args.num_kv_heads = dims_.kv_heads;
    args.head_dim = d;
    args.scale = 1.0f / std::sqrt(static_cast<float>(d));
    for (int64_t i = 0; i < n; ++i) {
      args.context_len = seq_.ContextSlots(i);
      for (int64_t h = 0; h < dims_.heads; ++h) {
        kernels::PagedAttentionHead(args, q + (i * dims_.heads + h) * d, h,
                                    out + (i * dims_.heads + h) * d);
      }
    }
    attended->assign(dims_.kv_heads, {});
    for (int64_t h = 0; h < dims_.kv_heads; ++h) {
      for (int64_t s = 0; s < seq_.ContextSlots(n - 1); ++s) {
        (*attended)[h].push_back(seq_.SlotPosition(layer, h, s));
      }
      // The slots this step wrote still report what they held before.
      for (int64_t i = 0; i < n; ++i) {
        (*attended)[h][seq_.WriteSlot(layer, h, i)] = seq_.num_tokens() + i;
      }
      std::sort((*attended)[h].begin(), (*attended)[h].end());
    }
    seq_.AfterAttention(layer, q, dims_.heads * d, n, prompt_pending, cache_, table_, &pool_,
                        scratch_);
  }

  // Ends the step and returns the blocks past the sequence's slots.
  void EndStep(int64_t n, bool prompt_pending) {
    seq_.EndStep(n, prompt_pending);
    const int64_t blocks = (seq_.num_slots() + dims_.block_size - 1) / dims_.block_size;
    while (static_cast<int64_t>(table_.size()) > blocks) {
      free_.push_back(table_.back());
      table_.pop_back();
    }
  }

 private:
  Dims dims_;
  KvCacheShape shape_;
  PagedKvCache cache_;
  KvSequence seq_;
  ThreadPool pool_;
  std::vector<KvScratch> scratch_;
  std::vector<int32_t> table_, free_;
  int64_t peak_blocks_ = 0;
};

struct Case {
  std::string name;
  KvPolicyConfig config;
  Dims dims;
  int64_t prompt, chunk, steps;
};

std::string CaseName(const ::testing::TestParamInfo<Case>& info) { return info.param.name; }
void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }

KvPolicyConfig Policy(KvPolicyKind kind, int64_t w, int64_t c, KvFusion fusion = KvFusion::kSum,
                      MorphKvAggregation agg = MorphKvAggregation::kGroupLogitSum,
                      int64_t sinks = 4) {
  KvPolicyConfig p;
  p.kind = kind;
  p.window = w;
  p.capacity = c;
  p.fusion = fusion;
  p.aggregation = agg;
  p.sinks = sinks;
  return p;
}

class KvPolicyTest : public ::testing::TestWithParam<Case> {};

// Random streams through both implementations: the same tokens attended
// (kept sets) and the same attention outputs at every step, and the
// invariants of a bounded policy after every step.
TEST_P(KvPolicyTest, PagedMatchesDenseReference) {
  const Case& tc = GetParam();
  const Dims& dm = tc.dims;
  const KvPolicyConfig& cfg = tc.config;
  ASSERT_TRUE(cfg.Validate(1 << 20).ok()) << cfg.Validate(1 << 20);
  const int64_t max_slots = cfg.MaxSlots(tc.prompt, tc.steps + 1);
  PagedDriver paged(cfg, dm, max_slots);
  testing::DenseKvReference dense(cfg, dm.layers, dm.heads, dm.kv_heads, dm.head_dim);

  std::mt19937 rng(static_cast<uint32_t>(std::hash<std::string>()(tc.name)));
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const int64_t d = dm.head_dim;
  // Every key ever made, by (layer, position, kv head), to check that cached
  // keys are moved but never altered (RoPE positions are never rewritten).
  std::vector<std::vector<float>> keys_made(dm.layers);

  int64_t done = 0;
  const int64_t total = tc.prompt + tc.steps;
  while (done < total) {
    const bool decode = done >= tc.prompt;
    const int64_t n = decode ? 1 : std::min(tc.chunk, tc.prompt - done);
    const bool prompt_pending = !decode && done + n < tc.prompt;
    paged.BeginStep(n);
    if (HasFatalFailure()) return;
    for (int64_t layer = 0; layer < dm.layers; ++layer) {
      std::vector<float> q(n * dm.heads * d), k(n * dm.kv_heads * d), v(k.size());
      for (float& x : q) x = 2.0f * normal(rng);
      for (float& x : k) x = normal(rng);
      for (float& x : v) x = normal(rng);
      keys_made[layer].insert(keys_made[layer].end(), k.begin(), k.end());
      std::vector<float> out_paged(q.size(), std::nanf("")), out_dense(q.size());
      std::vector<std::vector<int64_t>> attended;
      paged.Layer(layer, q.data(), k.data(), v.data(), n, prompt_pending, out_paged.data(),
                  &attended);
      dense.Layer(layer, q.data(), k.data(), v.data(), n, decode, out_dense.data());
      for (int64_t h = 0; h < dm.kv_heads; ++h) {
        ASSERT_EQ(attended[h], dense.Positions(layer, h))
            << "position " << done << " layer " << layer << " kv head " << h;
      }
      for (size_t i = 0; i < q.size(); ++i) {
        ASSERT_NEAR(out_paged[i], out_dense[i], 2e-5)
            << "position " << done << " layer " << layer << " element " << i;
      }
    }
    paged.EndStep(n, prompt_pending);
    dense.EndStep(n);
    done += n;
    KvSequence& seq = paged.seq();
    ASSERT_EQ(seq.num_tokens(), done);

    // Invariants after every step.
    const int64_t resident = seq.num_slots();
    if (cfg.bounded() && !prompt_pending) {
      // Resident tokens: min(N, C+1) (the next token's victim still counts:
      // it is overwritten before anything attends again).
      ASSERT_EQ(resident, std::min(done, cfg.capacity + 1)) << "after position " << done;
      // Once the prompt is cut, the extra pages are back in the pool.
      ASSERT_EQ(static_cast<int64_t>(paged.table().size()),
                (resident + dm.block_size - 1) / dm.block_size);
    }
    ASSERT_LE(static_cast<int64_t>(paged.table().size()),
              (cfg.MaxSlots(tc.prompt, tc.steps + 1) + dm.block_size - 1) / dm.block_size);
    // The scheduler's arithmetic agrees with what the engine holds.
    ASSERT_EQ(resident, cfg.SlotsHeld(tc.prompt, done)) << "after position " << done;
    if (done < total) {
      const int64_t next = done >= tc.prompt ? 1 : std::min(tc.chunk, tc.prompt - done);
      ASSERT_EQ(seq.SlotsNeeded(next), cfg.SlotsForStep(tc.prompt, done, next));
    }
    const KvUsage usage = seq.Usage();
    ASSERT_EQ(usage.tokens_resident + usage.tokens_evicted, done);
    for (int64_t layer = 0; layer < dm.layers; ++layer) {
      for (int64_t h = 0; h < dm.kv_heads; ++h) {
        std::set<int64_t> held;
        const int64_t victim = seq.PendingVictim(layer, h);
        for (int64_t s = 0; s < resident; ++s) {
          const int64_t p = seq.SlotPosition(layer, h, s);
          ASSERT_TRUE(p >= 0 && p < done) << "slot " << s << " position " << p;
          ASSERT_TRUE(held.insert(p).second) << "position " << p << " held twice";
          const int64_t bs = dm.block_size;
          const float* cached =
              paged.cache().keys(layer) + paged.cache().Index(paged.table()[s / bs], h, s % bs);
          ASSERT_TRUE(std::equal(cached, cached + d,
                                 keys_made[layer].begin() + (p * dm.kv_heads + h) * d))
              << "slot " << s << " no longer holds the key of position " << p;
          if (s == victim) {
            // The victim is never one of the W most recent tokens or a sink.
            ASSERT_LT(p, done - cfg.window);
          }
        }
        if (cfg.bounded() && !prompt_pending && done > tc.prompt) {
          // The recent W tokens (plus the next one) are always kept.
          for (int64_t p = std::max<int64_t>(0, done - cfg.window); p < done; ++p) {
            ASSERT_TRUE(held.count(p)) << "recent position " << p << " was evicted";
          }
          if (cfg.kind == KvPolicyKind::kStreaming) {
            for (int64_t p = 0; p < std::min(cfg.sinks, done); ++p) {
              ASSERT_TRUE(held.count(p)) << "sink " << p << " was evicted";
            }
          }
        }
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Policies, KvPolicyTest,
    ::testing::Values(
        Case{"full", Policy(KvPolicyKind::kFull, 4, 32), Dims{}, 37, 16, 150},
        Case{"morphkv_sum_long_prompt", Policy(KvPolicyKind::kMorphKv, 8, 40), Dims{}, 97, 23,
             300},
        Case{"morphkv_max_short_prompt", Policy(KvPolicyKind::kMorphKv, 6, 50, KvFusion::kMax),
             Dims{2, 6, 2, 16, 7}, 11, 11, 300},
        Case{"morphkv_variant_a_sum",
             Policy(KvPolicyKind::kMorphKv, 5, 30, KvFusion::kSum,
                    MorphKvAggregation::kGroupMaxProb),
             Dims{2, 8, 2, 16, 4}, 60, 60, 250},
        Case{"morphkv_variant_a_max",
             Policy(KvPolicyKind::kMorphKv, 3, 24, KvFusion::kMax,
                    MorphKvAggregation::kGroupMaxProb),
             Dims{1, 3, 1, 64, 16}, 24, 5, 200},
        Case{"morphkv_mha_w1", Policy(KvPolicyKind::kMorphKv, 1, 17), Dims{2, 2, 2, 8, 16}, 40,
             40, 200},
        Case{"morphkv_prompt_exactly_c_plus_1", Policy(KvPolicyKind::kMorphKv, 4, 20), Dims{},
             21, 8, 100},
        Case{"h2o_long_prompt", Policy(KvPolicyKind::kH2o, 8, 40), Dims{}, 90, 32, 300},
        Case{"h2o_growth", Policy(KvPolicyKind::kH2o, 4, 33), Dims{2, 4, 1, 32, 6}, 5, 5, 250},
        Case{"streaming", Policy(KvPolicyKind::kStreaming, 8, 30), Dims{}, 50, 13, 200},
        Case{"streaming_no_sinks",
             Policy(KvPolicyKind::kStreaming, 2, 12, KvFusion::kSum,
                    MorphKvAggregation::kGroupLogitSum, 0),
             Dims{}, 3, 3, 100},
        Case{"snapkv_long_prompt", Policy(KvPolicyKind::kSnapKv, 8, 48), Dims{2, 4, 2, 16, 8},
             120, 50, 150},
        Case{"snapkv_short_prompt", Policy(KvPolicyKind::kSnapKv, 8, 64), Dims{}, 40, 40, 60}),
    CaseName);

}  // namespace
}  // namespace morphserve::engine
