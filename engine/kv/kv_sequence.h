// One request's KV bookkeeping under its KV policy: which slot of the
// request's block table each token occupies, per layer and KV head, and the
// state the policy scores with (MorphKV's query ring, H2O's accumulated
// attention). Owned by the engine thread; the forward pass drives it.
//
// Slots. Until a policy first drops tokens, slot == position for every
// (layer, KV head) ("aligned"). Policies that drop tokens do it in one place:
// at the end of a step, per layer and KV head, they choose the slot that the
// next token will overwrite (the victim). The victim stays in the cache, but
// is never attended again, because the next step writes its token there
// before attention. So every (layer, KV head) holds the same number of
// tokens, and the block table is shared by all of them. The first selection
// after a long prompt (morphkv, h2o, streaming: C+1 tokens; snapkv: C)
// gathers the kept tokens into slots [0, kept) and the caller frees the
// blocks past num_slots(). RoPE is applied before caching, so moving a key
// never changes its position.
#ifndef MORPHSERVE_ENGINE_KV_KV_SEQUENCE_H_
#define MORPHSERVE_ENGINE_KV_KV_SEQUENCE_H_

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "common/kv_policy.h"
#include "common/thread_pool.h"
#include "engine/kv/paged_kv_cache.h"

namespace morphserve::engine {

// Per-request KV figures. Token counts are per (layer, KV head): every
// (layer, KV head) of a request holds the same number.
struct KvUsage {
  int64_t tokens_resident = 0;
  int64_t tokens_full_equivalent = 0;  // what a full cache would hold
  int64_t tokens_evicted = 0;
  int64_t bytes_resident = 0;  // K and V over all layers and KV heads
  int64_t bytes_saved = 0;     // against a full cache
};

// Working memory for scoring one KV head; the forward pass keeps one per KV
// head and reuses it across steps.
struct KvScratch {
  std::vector<float> rows, logits, scores, pooled;
  std::vector<uint8_t> mask;
  std::vector<int64_t> row_len;
  std::vector<int32_t> order;
};

class KvSequence {
 public:
  // `max_slots` bounds the slots the request may use
  // (KvPolicyConfig::MaxSlots of its prompt and token limit); the config must
  // be valid (KvPolicyConfig::Validate).
  KvSequence(const KvPolicyConfig& config, const KvCacheShape& shape, int64_t num_heads,
             int64_t max_slots);

  const KvPolicyConfig& config() const { return config_; }
  // Tokens written so far: the position of the next token.
  int64_t num_tokens() const { return num_tokens_; }
  // The block table must cover slots [0, num_slots()).
  int64_t num_slots() const { return num_slots_; }
  // The most slots the request may ever use (its reservation).
  int64_t max_slots() const { return max_slots_; }
  // Slots the block table must cover for a step of `n` tokens.
  int64_t SlotsNeeded(int64_t n) const;
  // Whether a step of `n` tokens is allowed: several tokens at once only
  // while slots are aligned with positions (prefill).
  absl::Status CheckStep(int64_t n) const;

  // Slot of token i of the current step, for (layer, KV head).
  int64_t WriteSlot(int64_t layer, int64_t kv_head, int64_t i) const;
  // Number of slots token i of the current step attends to (its own
  // included): causal while aligned, every slot once compacted.
  int64_t ContextSlots(int64_t i) const;
  // Original position of the token in `slot` for (layer, KV head).
  int64_t SlotPosition(int64_t layer, int64_t kv_head, int64_t slot) const;
  // The victim chosen for the next token (-1 when the next token gets a new
  // slot instead).
  int64_t PendingVictim(int64_t layer, int64_t kv_head) const;

  KvUsage Usage() const;

  // Whether a selection has dropped tokens (slots no longer equal
  // positions).
  bool compacted() const { return !aligned_; }

  // For a backend that scores on its own device instead of through
  // AfterAttention: the slot the next token overwrites in each (layer, KV
  // head), victims[layer * num_kv_heads + kv_head], set after EndStep of a
  // step that selected. The backend keeps the positions and the policy's
  // scoring state itself, in a DeviceState that lives as long as this
  // sequence.
  void SetVictims(std::span<const int32_t> victims);
  struct DeviceState {
    virtual ~DeviceState() = default;
  };
  DeviceState* device_state() const { return device_state_.get(); }
  void set_device_state(std::unique_ptr<DeviceState> state) { device_state_ = std::move(state); }
  // Wall time spent in AfterAttention (scoring, selection, compaction).
  double policy_seconds() const { return static_cast<double>(policy_nanos_) * 1e-9; }

  // Forward-pass hook, called once per layer after the step's keys and values
  // were written and its attention ran. `q` holds the step's post-RoPE
  // queries (`n` rows, q_stride apart). `prompt_pending`: more prompt chunks
  // follow, so no selection may happen yet. `scratch` has one entry per KV
  // head. `pool` splits the work over its threads; null runs it all on the
  // calling thread (as when sequences run their hooks side by side).
  void AfterAttention(int64_t layer, const float* q, int64_t q_stride, int64_t n,
                      bool prompt_pending, PagedKvCache& cache,
                      std::span<const int32_t> block_table, ThreadPool* pool,
                      std::vector<KvScratch>& scratch);
  // Ends a step of `n` tokens (after every layer).
  void EndStep(int64_t n, bool prompt_pending);

 private:
  // One (layer, KV head) during the current step of `n` tokens, after which
  // `tokens` are written and `slots` slots hold one each.
  struct HeadStep {
    int64_t layer, kv_head, n, tokens, slots;
    int64_t index;  // layer * num_kv_heads + kv_head
  };
  void PushQueries(int64_t layer, const float* q, int64_t q_stride, int64_t n);
  void AccumulateH2o(const HeadStep& h, const float* q, int64_t q_stride,
                     const PagedKvCache& cache, std::span<const int32_t> table, KvScratch& s);
  // MorphKV's scores in three parts, so that the logits can be split over
  // threads: the window rows (returns their count), the logits of slots
  // [begin, end), then the softmax over the candidates and the fusion.
  int64_t MorphKvRows(const HeadStep& h, KvScratch& s) const;
  void MorphKvLogits(const HeadStep& h, const PagedKvCache& cache,
                     std::span<const int32_t> table, int64_t rows, int64_t begin, int64_t end,
                     KvScratch& s) const;
  void MorphKvFuse(const HeadStep& h, int64_t rows, KvScratch& s) const;
  void SnapKvSelect(const HeadStep& h, PagedKvCache& cache, std::span<const int32_t> table,
                    KvScratch& s);
  // Picks the next token's victim from s.scores over the candidate slots in
  // s.mask; on the first selection also drops the lowest-ranked candidates.
  void SelectVictim(const HeadStep& h, PagedKvCache& cache, std::span<const int32_t> table,
                    KvScratch& s);
  // Keeps the slots in `keep` (ascending), gathered into [0, keep.size()).
  void Compact(const HeadStep& h, std::span<const int32_t> keep, PagedKvCache& cache,
               std::span<const int32_t> table);
  void BuildCandidateMask(const HeadStep& h, KvScratch& s) const;
  int64_t Position(int64_t index, int64_t slot) const;

  KvPolicyConfig config_;
  KvCacheShape shape_;
  int64_t num_heads_;
  int64_t max_slots_;
  int64_t ring_size_ = 0;  // queries kept per layer (MorphKV: W; SnapKV: its window)

  int64_t num_tokens_ = 0;
  int64_t num_slots_ = 0;
  bool aligned_ = true;     // slot == position everywhere
  bool overwrite_ = false;  // this step's token goes into victim_ slots
  bool selected_ = false;   // SnapKV's one selection is done
  int64_t policy_nanos_ = 0;
  std::vector<int64_t> morph_rows_;  // per KV head, during AfterAttention

  // Indexed [layer * num_kv_heads + kv_head].
  std::vector<std::vector<int32_t>> positions_;  // per slot; empty while aligned
  std::vector<std::vector<float>> h2o_scores_;   // per slot
  std::vector<int32_t> victim_;                  // next token's slot when overwrite_
  std::vector<std::vector<float>> ring_;         // per layer: [ring_size][num_heads][head_dim]
  std::unique_ptr<DeviceState> device_state_;
};

}  // namespace morphserve::engine

#endif  // MORPHSERVE_ENGINE_KV_KV_SEQUENCE_H_
