#include "engine/kv/kv_sequence.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <functional>

#include "common/strings.h"
#include "kernels/cpu/kv_scoring.h"

namespace morphserve::engine {
namespace {

// Rows of query-key logits scored at once, to bound scratch memory.
constexpr int64_t kRowBlock = 64;

template <typename T>
void Grow(std::vector<T>& v, size_t n) {
  if (v.size() < n) v.resize(n);
}

}  // namespace

KvSequence::KvSequence(const KvPolicyConfig& config, const KvCacheShape& shape,
                       int64_t num_heads, int64_t max_slots)
    : config_(config), shape_(shape), num_heads_(num_heads), max_slots_(max_slots) {
  const int64_t heads = shape_.num_layers * shape_.num_kv_heads;
  victim_.assign(heads, -1);
  positions_.resize(heads);
  if (config_.kind == KvPolicyKind::kMorphKv) ring_size_ = config_.window;
  if (config_.kind == KvPolicyKind::kSnapKv) ring_size_ = kSnapKvObservationWindow;
  if (ring_size_ > 0) {
    ring_.assign(shape_.num_layers,
                 std::vector<float>(ring_size_ * num_heads_ * shape_.head_dim, 0.0f));
  }
  if (config_.kind == KvPolicyKind::kH2o) {
    h2o_scores_.assign(heads, std::vector<float>(max_slots_, 0.0f));
  }
}

int64_t KvSequence::SlotsNeeded(int64_t n) const {
  return overwrite_ ? num_slots_ : num_slots_ + n;
}

absl::Status KvSequence::CheckStep(int64_t n) const {
  if (n < 1) return absl::InvalidArgumentError("a step needs at least one token");
  if (n > 1 && !aligned_) {
    return absl::FailedPreconditionError(
        "only one token per step once the KV policy has dropped tokens");
  }
  if (overwrite_ && n > 1) {
    return absl::FailedPreconditionError(
        "only one token per step once the KV policy evicts on every step");
  }
  if (SlotsNeeded(n) > max_slots_) {
    return absl::OutOfRangeError(StrCat("the step needs ", SlotsNeeded(n),
                                        " KV slots, beyond the request's reservation of ",
                                        max_slots_));
  }
  return absl::OkStatus();
}

int64_t KvSequence::WriteSlot(int64_t layer, int64_t kv_head, int64_t i) const {
  if (overwrite_) return victim_[layer * shape_.num_kv_heads + kv_head];
  return num_slots_ + i;
}

int64_t KvSequence::ContextSlots(int64_t i) const {
  return overwrite_ ? num_slots_ : num_slots_ + i + 1;
}

int64_t KvSequence::Position(int64_t index, int64_t slot) const {
  return aligned_ ? slot : positions_[index][slot];
}

int64_t KvSequence::SlotPosition(int64_t layer, int64_t kv_head, int64_t slot) const {
  return Position(layer * shape_.num_kv_heads + kv_head, slot);
}

int64_t KvSequence::PendingVictim(int64_t layer, int64_t kv_head) const {
  return overwrite_ ? victim_[layer * shape_.num_kv_heads + kv_head] : -1;
}

KvUsage KvSequence::Usage() const {
  const int64_t per_token = shape_.BytesPerBlock() / shape_.block_size;
  KvUsage u;
  u.tokens_resident = num_slots_;
  u.tokens_full_equivalent = num_tokens_;
  u.tokens_evicted = num_tokens_ - num_slots_;
  u.bytes_resident = num_slots_ * per_token;
  u.bytes_saved = u.tokens_evicted * per_token;
  return u;
}

void KvSequence::SetVictims(std::span<const int32_t> victims) {
  std::copy(victims.begin(), victims.end(), victim_.begin());
}

void KvSequence::PushQueries(int64_t layer, const float* q, int64_t q_stride, int64_t n) {
  const int64_t row = num_heads_ * shape_.head_dim;
  for (int64_t i = std::max<int64_t>(0, n - ring_size_); i < n; ++i) {
    const int64_t p = num_tokens_ + i;
    std::memcpy(&ring_[layer][(p % ring_size_) * row], q + i * q_stride, row * sizeof(float));
  }
}

void KvSequence::AfterAttention(int64_t layer, const float* q, int64_t q_stride, int64_t n,
                                bool prompt_pending, PagedKvCache& cache,
                                std::span<const int32_t> block_table, ThreadPool* pool,
                                std::vector<KvScratch>& scratch) {
  const auto start = std::chrono::steady_clock::now();
  if (ring_size_ > 0) PushQueries(layer, q, q_stride, n);
  const int64_t tokens = num_tokens_ + n;
  const bool select = !prompt_pending;
  const bool evict = config_.bounded() && select && tokens >= config_.capacity + 1;
  const bool snap = config_.kind == KvPolicyKind::kSnapKv && select && !selected_ &&
                    tokens > config_.capacity;
  Grow(scratch, static_cast<size_t>(shape_.num_kv_heads));
  morph_rows_.assign(shape_.num_kv_heads, 0);
  // What the parallel tasks need, in one struct: each task captures two
  // pointers, which std::function stores without allocating.
  struct Step {
    int64_t layer, n, tokens, slots;
    bool evict, snap, morph;
    const float* q;
    int64_t q_stride;
    PagedKvCache* cache;
    std::span<const int32_t> table;
    std::vector<KvScratch>* scratch;
    int64_t chunk = 0, chunks = 0;  // MorphKV's slot chunks per head
    int64_t kv_heads;
    HeadStep Head(int64_t kv_head) const {
      return {layer, kv_head, n, tokens, slots, layer * kv_heads + kv_head};
    }
  } st{layer, n, tokens, ContextSlots(n - 1), evict, snap,
       evict && config_.kind == KvPolicyKind::kMorphKv, q, q_stride, &cache, block_table,
       &scratch, 0, 0, shape_.num_kv_heads};
  const std::function<void(int64_t, int64_t)> prepare = [this, &st](int64_t begin, int64_t end) {
    for (int64_t kv_head = begin; kv_head < end; ++kv_head) {
      const HeadStep h = st.Head(kv_head);
      KvScratch& s = (*st.scratch)[kv_head];
      if (!aligned_) {
        for (int64_t i = 0; i < st.n; ++i) {
          positions_[h.index][WriteSlot(st.layer, kv_head, i)] =
              static_cast<int32_t>(num_tokens_ + i);
        }
      }
      if (config_.kind == KvPolicyKind::kH2o) {
        if (overwrite_) h2o_scores_[h.index][victim_[h.index]] = 0.0f;
        AccumulateH2o(h, st.q, st.q_stride, *st.cache, st.table, s);
      }
      if (st.snap) SnapKvSelect(h, *st.cache, st.table, s);
      if (!st.evict) continue;
      BuildCandidateMask(h, s);
      Grow(s.scores, h.slots);
      if (st.morph) {
        morph_rows_[kv_head] = MorphKvRows(h, s);
        Grow(s.logits, morph_rows_[kv_head] * h.slots);
      } else if (config_.kind == KvPolicyKind::kH2o) {
        std::copy_n(h2o_scores_[h.index].begin(), h.slots, s.scores.begin());
      } else {  // streaming: the oldest candidate goes first
        for (int64_t j = 0; j < h.slots; ++j) {
          s.scores[j] = static_cast<float>(Position(h.index, j));
        }
      }
    }
  };
  ParallelFor(pool, shape_.num_kv_heads, 1, prepare);
  if (st.morph) {
    // The window logits are most of the work: split every head's slots into
    // block-aligned chunks so that all threads share it.
    const int64_t bs = shape_.block_size;
    st.chunk = std::max<int64_t>(bs, (st.slots + 4 * bs - 1) / (4 * bs) * bs);
    st.chunks = (st.slots + st.chunk - 1) / st.chunk;
    const std::function<void(int64_t, int64_t)> logits = [this, &st](int64_t begin,
                                                                      int64_t end) {
      for (int64_t u = begin; u < end; ++u) {
        const int64_t kv_head = u / st.chunks;
        const int64_t first = (u % st.chunks) * st.chunk;
        MorphKvLogits(st.Head(kv_head), *st.cache, st.table, morph_rows_[kv_head], first,
                      std::min(st.slots, first + st.chunk), (*st.scratch)[kv_head]);
      }
    };
    ParallelFor(pool, shape_.num_kv_heads * st.chunks, 1, logits);
  }
  if (st.evict) {
    const std::function<void(int64_t, int64_t)> choose = [this, &st](int64_t begin,
                                                                      int64_t end) {
      for (int64_t kv_head = begin; kv_head < end; ++kv_head) {
        const HeadStep h = st.Head(kv_head);
        if (st.morph) MorphKvFuse(h, morph_rows_[kv_head], (*st.scratch)[kv_head]);
        SelectVictim(h, *st.cache, st.table, (*st.scratch)[kv_head]);
      }
    };
    ParallelFor(pool, shape_.num_kv_heads, 1, choose);
  }
  policy_nanos_ += std::chrono::duration_cast<std::chrono::nanoseconds>(
                       std::chrono::steady_clock::now() - start)
                       .count();
}

void KvSequence::EndStep(int64_t n, bool prompt_pending) {
  if (!overwrite_) num_slots_ += n;
  num_tokens_ += n;
  const bool select = !prompt_pending;
  overwrite_ = config_.bounded() && select && num_tokens_ >= config_.capacity + 1;
  if (overwrite_ && aligned_) {
    num_slots_ = config_.capacity + 1;
    aligned_ = false;
  }
  if (config_.kind == KvPolicyKind::kSnapKv && select && !selected_) {
    selected_ = true;
    if (num_tokens_ > config_.capacity) {
      num_slots_ = config_.capacity;
      aligned_ = false;
    }
  }
}

void KvSequence::BuildCandidateMask(const HeadStep& h, KvScratch& s) const {
  // The next token t = h.tokens keeps t-W .. t; sinks are never candidates.
  const int64_t recent_from = h.tokens - config_.window;
  const int64_t sinks = config_.kind == KvPolicyKind::kStreaming ? config_.sinks : 0;
  Grow(s.mask, h.slots);
  for (int64_t j = 0; j < h.slots; ++j) {
    const int64_t p = Position(h.index, j);
    s.mask[j] = p < recent_from && p >= sinks;
  }
}

int64_t KvSequence::MorphKvRows(const HeadStep& h, KvScratch& s) const {
  const int64_t d = shape_.head_dim;
  const int64_t group = num_heads_ / shape_.num_kv_heads;
  const int64_t w = config_.window;
  const float* ring = ring_[h.layer].data();
  const int64_t ring_row = num_heads_ * d;
  const auto query = [&](int64_t position, int64_t head) {
    return ring + (position % ring_size_) * ring_row + head * d;
  };
  if (config_.aggregation == MorphKvAggregation::kGroupLogitSum) {
    // Rows t-W .. t-1; the group's logits are summed, which is the logit of
    // the summed query.
    Grow(s.rows, w * d);
    for (int64_t r = 0; r < w; ++r) {
      float* row = &s.rows[r * d];
      std::fill(row, row + d, 0.0f);
      for (int64_t g = 0; g < group; ++g) {
        const float* qh = query(h.tokens - w + r, h.kv_head * group + g);
        for (int64_t e = 0; e < d; ++e) row[e] += qh[e];
      }
    }
    return w;
  }
  // Rows t-W+1 .. t-1, every head of the group; max over the group later.
  Grow(s.rows, (w - 1) * group * d);
  for (int64_t r = 0; r < w - 1; ++r) {
    for (int64_t g = 0; g < group; ++g) {
      std::memcpy(&s.rows[(r * group + g) * d], query(h.tokens - w + 1 + r, h.kv_head * group + g),
                  d * sizeof(float));
    }
  }
  return (w - 1) * group;
}

void KvSequence::MorphKvLogits(const HeadStep& h, const PagedKvCache& cache,
                               std::span<const int32_t> table, int64_t rows, int64_t begin,
                               int64_t end, KvScratch& s) const {
  // `begin` is a multiple of the block size, so the chunk starts a block.
  const int64_t d = shape_.head_dim;
  const kernels::PagedKeys keys{cache.keys(h.layer),
                                table.data() + begin / shape_.block_size,
                                shape_.block_size,
                                shape_.num_kv_heads,
                                h.kv_head,
                                d,
                                end - begin};
  kernels::PagedKeyLogits(keys, s.rows.data(), d, rows, 1.0f / std::sqrt(static_cast<float>(d)),
                          s.logits.data() + begin, h.slots);
}

void KvSequence::MorphKvFuse(const HeadStep& h, int64_t rows, KvScratch& s) const {
  const int64_t group = num_heads_ / shape_.num_kv_heads;
  const bool per_head = config_.aggregation == MorphKvAggregation::kGroupMaxProb;
  kernels::MaskedSoftmaxRows(s.logits.data(), rows, h.slots, h.slots, s.mask.data(), nullptr);
  kernels::FuseRows(s.logits.data(), rows, per_head ? group : 1, h.slots, h.slots,
                    config_.fusion == KvFusion::kMax, s.scores.data());
}

void KvSequence::AccumulateH2o(const HeadStep& h, const float* q, int64_t q_stride,
                               const PagedKvCache& cache, std::span<const int32_t> table,
                               KvScratch& s) {
  const int64_t d = shape_.head_dim;
  const int64_t group = num_heads_ / shape_.num_kv_heads;
  const kernels::PagedKeys keys{cache.keys(h.layer), table.data(), shape_.block_size,
                                shape_.num_kv_heads, h.kv_head,   d,
                                h.slots};
  // Up to kRowBlock query rows at a time, and no more than the step has: a
  // decode step's scratch holds one token's rows.
  const int64_t tokens_per_block = std::max<int64_t>(1, std::min(kRowBlock / group, h.n));
  Grow(s.rows, tokens_per_block * group * d);
  Grow(s.row_len, tokens_per_block * group);
  Grow(s.logits, tokens_per_block * group * h.slots);
  Grow(s.pooled, h.slots);
  float* scores = h2o_scores_[h.index].data();
  for (int64_t i0 = 0; i0 < h.n; i0 += tokens_per_block) {
    const int64_t count = std::min(tokens_per_block, h.n - i0);
    const int64_t rows = count * group;
    for (int64_t i = 0; i < count; ++i) {
      for (int64_t g = 0; g < group; ++g) {
        std::memcpy(&s.rows[(i * group + g) * d], q + (i0 + i) * q_stride + (h.kv_head * group + g) * d,
                    d * sizeof(float));
        s.row_len[i * group + g] = ContextSlots(i0 + i);
      }
    }
    kernels::PagedKeyLogits(keys, s.rows.data(), d, rows, 1.0f / std::sqrt(static_cast<float>(d)),
                            s.logits.data(), h.slots);
    kernels::MaskedSoftmaxRows(s.logits.data(), rows, h.slots, h.slots, nullptr,
                               s.row_len.data());
    kernels::FuseRows(s.logits.data(), rows, 1, h.slots, h.slots, /*max_fusion=*/false,
                      s.pooled.data());
    for (int64_t j = 0; j < h.slots; ++j) scores[j] += s.pooled[j];
  }
}

void KvSequence::SelectVictim(const HeadStep& h, PagedKvCache& cache,
                              std::span<const int32_t> table, KvScratch& s) {
  // Rank candidates best first: higher score, then newer (so that on a tie
  // the older token is evicted).
  const auto better = [&](int32_t a, int32_t b) {
    if (s.scores[a] != s.scores[b]) return s.scores[a] > s.scores[b];
    return Position(h.index, a) > Position(h.index, b);
  };
  s.order.clear();
  for (int64_t j = 0; j < h.slots; ++j) {
    if (s.mask[j]) s.order.push_back(static_cast<int32_t>(j));
  }
  if (!aligned_) {
    victim_[h.index] = *std::min_element(s.order.begin(), s.order.end(),
                                         [&](int32_t a, int32_t b) { return better(b, a); });
    return;
  }
  // First selection: keep the best C+1-W-sinks candidates (the worst of them
  // is the victim), every recent token and every sink.
  const int64_t sinks = config_.kind == KvPolicyKind::kStreaming ? config_.sinks : 0;
  const int64_t keep = config_.capacity + 1 - config_.window - sinks;
  if (static_cast<int64_t>(s.order.size()) > keep) {
    std::nth_element(s.order.begin(), s.order.begin() + keep - 1, s.order.end(), better);
    s.order.resize(keep);
  }
  const int32_t victim =
      *std::min_element(s.order.begin(), s.order.end(), [&](int32_t a, int32_t b) { return better(b, a); });
  for (int64_t j = 0; j < h.slots; ++j) {
    if (!s.mask[j]) s.order.push_back(static_cast<int32_t>(j));
  }
  std::sort(s.order.begin(), s.order.end());
  victim_[h.index] = static_cast<int32_t>(
      std::lower_bound(s.order.begin(), s.order.end(), victim) - s.order.begin());
  Compact(h, s.order, cache, table);
}

void KvSequence::SnapKvSelect(const HeadStep& h, PagedKvCache& cache,
                              std::span<const int32_t> table, KvScratch& s) {
  const int64_t d = shape_.head_dim;
  const int64_t group = num_heads_ / shape_.num_kv_heads;
  const int64_t window = kSnapKvObservationWindow;
  const int64_t prefix = h.tokens - window;
  const float* ring = ring_[h.layer].data();
  // The window's queries (every head of the group) against every prompt key,
  // causal, softmax over all keys; probabilities summed over rows and heads.
  const int64_t rows = window * group;
  Grow(s.rows, rows * d);
  Grow(s.row_len, rows);
  Grow(s.logits, rows * h.slots);
  Grow(s.scores, h.slots);
  for (int64_t r = 0; r < window; ++r) {
    const int64_t p = prefix + r;
    for (int64_t g = 0; g < group; ++g) {
      std::memcpy(&s.rows[(r * group + g) * d],
                  ring + (p % ring_size_) * num_heads_ * d + (h.kv_head * group + g) * d,
                  d * sizeof(float));
      s.row_len[r * group + g] = p + 1;
    }
  }
  const kernels::PagedKeys keys{cache.keys(h.layer), table.data(), shape_.block_size,
                                shape_.num_kv_heads, h.kv_head,   d,
                                h.slots};
  kernels::PagedKeyLogits(keys, s.rows.data(), d, rows, 1.0f / std::sqrt(static_cast<float>(d)),
                          s.logits.data(), h.slots);
  kernels::MaskedSoftmaxRows(s.logits.data(), rows, h.slots, h.slots, nullptr, s.row_len.data());
  kernels::FuseRows(s.logits.data(), rows, 1, h.slots, h.slots, /*max_fusion=*/false,
                    s.scores.data());
  // Average pooling over the prefix columns: kernel 5, stride 1, zero
  // padding of 2 counted in the average.
  const int64_t half = kSnapKvPoolKernel / 2;
  Grow(s.pooled, prefix);
  for (int64_t j = 0; j < prefix; ++j) {
    float sum = 0.0f;
    for (int64_t k = std::max<int64_t>(0, j - half); k <= std::min(prefix - 1, j + half); ++k) {
      sum += s.scores[k];
    }
    s.pooled[j] = sum / static_cast<float>(kSnapKvPoolKernel);
  }
  const int64_t keep = config_.capacity - window;
  s.order.resize(prefix);
  for (int64_t j = 0; j < prefix; ++j) s.order[j] = static_cast<int32_t>(j);
  std::nth_element(s.order.begin(), s.order.begin() + keep - 1, s.order.end(),
                   [&](int32_t a, int32_t b) {
                     if (s.pooled[a] != s.pooled[b]) return s.pooled[a] > s.pooled[b];
                     return a > b;
                   });
  s.order.resize(keep);
  for (int64_t j = prefix; j < h.tokens; ++j) s.order.push_back(static_cast<int32_t>(j));
  std::sort(s.order.begin(), s.order.end());
  Compact(h, s.order, cache, table);
}

void KvSequence::Compact(const HeadStep& h, std::span<const int32_t> keep, PagedKvCache& cache,
                         std::span<const int32_t> table) {
  // Only the first selection compacts, while slots are still positions.
  std::vector<int32_t>& positions = positions_[h.index];
  positions.assign(max_slots_, -1);
  float* k = cache.keys(h.layer);
  float* v = cache.values(h.layer);
  const int64_t bs = shape_.block_size;
  const size_t row_bytes = shape_.head_dim * sizeof(float);
  float* h2o = h2o_scores_.empty() ? nullptr : h2o_scores_[h.index].data();
  for (size_t i = 0; i < keep.size(); ++i) {
    const int64_t from = keep[i];
    positions[i] = static_cast<int32_t>(from);
    if (from == static_cast<int64_t>(i)) continue;
    const int64_t src = cache.Index(table[from / bs], h.kv_head, from % bs);
    const int64_t dst = cache.Index(table[i / bs], h.kv_head, static_cast<int64_t>(i) % bs);
    std::memcpy(k + dst, k + src, row_bytes);
    std::memcpy(v + dst, v + src, row_bytes);
    if (h2o != nullptr) h2o[i] = h2o[from];
  }
  if (h2o != nullptr) std::fill(h2o + keep.size(), h2o + max_slots_, 0.0f);
}

}  // namespace morphserve::engine
