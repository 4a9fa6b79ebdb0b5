// CudaBackend's KV policy work: which policies run on the device, each
// sequence's device policy state, and the scoring, selection and compaction
// queued after every layer's attention (kernels/cuda/kv_scoring.h and
// kv_policy.h), in the order KvSequence::AfterAttention runs them.
#include <algorithm>
#include <cmath>

#include "common/status.h"
#include "common/strings.h"
#include "engine/backend/cuda_backend.h"
#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/kv_policy.h"
#include "kernels/cuda/kv_scoring.h"

namespace morphserve::engine {

namespace kc = kernels::cuda;

absl::Status CudaBackend::RunsPolicy(const KvPolicyConfig&) {
  // Every policy and aggregation has its device kernels.
  return absl::OkStatus();
}

bool CudaBackend::DeviceScored(const KvSequence* kv) {
  return kv != nullptr && kv->config().kind != KvPolicyKind::kFull;
}

absl::Status CudaBackend::EnsurePolicyState(const ForwardBatch& batch) {
  const ModelConfig& c = model_.config;
  const auto round4 = [](int64_t n) { return (n + 3) / 4 * 4; };
  for (const SequenceInput& seq : batch.sequences) {
    if (!DeviceScored(seq.kv) || seq.kv->device_state() != nullptr) continue;
    const KvPolicyConfig& p = seq.kv->config();
    const bool snapkv = p.kind == KvPolicyKind::kSnapKv;
    const int64_t ring_size = p.kind == KvPolicyKind::kMorphKv ? p.window
                              : snapkv                        ? kSnapKvObservationWindow
                                                              : 0;
    const int64_t kept = snapkv ? p.capacity : p.capacity + 1;
    const int64_t max_slots = seq.kv->max_slots();
    const int64_t heads = c.num_layers * c.num_kv_heads;
    const int64_t ring = round4(c.num_layers * ring_size * c.q_dim() / 2);  // bf16 pairs
    const int64_t positions = round4(heads * kept);
    const int64_t victims = snapkv ? 0 : round4(heads);
    const int64_t scores = p.kind == KvPolicyKind::kH2o ? round4(heads * max_slots) : 0;
    const int64_t size = ring + positions + victims + scores;
    ASSIGN_OR_RETURN(const int64_t offset, policy_pool_.Allocate(size));
    auto state = std::make_unique<PolicyState>(&policy_pool_, offset, size);
    state->ring = offset;
    state->positions = offset + ring;
    state->victims = state->positions + positions;
    state->scores = state->victims + victims;
    state->ring_size = ring_size;
    state->kept = kept;
    state->max_slots = max_slots;
    // H2O's running scores start from zero; everything else is written
    // before it is read.
    if (scores > 0) {
      RETURN_IF_CUDA_ERROR(cudaMemsetAsync(policy_pool_.as<int32_t>() + state->scores, 0,
                                           scores * sizeof(int32_t), stream_));
    }
    seq.kv->set_device_state(std::move(state));
  }
  return absl::OkStatus();
}

void CudaBackend::PlanPolicyStep(const SequenceInput& seq, PolicyStep& p, int32_t* ints) {
  const KvPolicyConfig& config = seq.kv->config();
  const bool select = !seq.prompt_pending;
  const int64_t tokens = seq.start_position + seq.num_tokens;
  p.n = seq.num_tokens;
  p.slots = seq.kv->ContextSlots(seq.num_tokens - 1);
  p.push = p.state->ring_size > 0 && !p.state->snapped;
  // As KvSequence::AfterAttention: a bounded policy's next token t keeps
  // t-W .. t and evicts from then on; SnapKV selects once, at the end of a
  // prompt longer than C, keeping its observation window.
  p.evict = config.bounded() && select && tokens >= config.capacity + 1;
  p.first = p.evict && !seq.kv->compacted();
  p.snap = config.kind == KvPolicyKind::kSnapKv && select && !p.state->snapped &&
           tokens > config.capacity;
  if (config.kind == KvPolicyKind::kSnapKv && select) p.state->snapped = true;
  const int64_t sinks = config.kind == KvPolicyKind::kStreaming ? config.sinks : 0;
  const int64_t window = p.snap ? kSnapKvObservationWindow : config.window;
  ints[2] = static_cast<int32_t>(seq.start_position);
  ints[3] = static_cast<int32_t>(p.slots);
  ints[4] = static_cast<int32_t>(tokens - window);
  ints[5] = static_cast<int32_t>(p.snap ? config.capacity - window
                                        : config.capacity + 1 - window - sinks);
  ints[6] = static_cast<int32_t>(tokens);
}

absl::Status CudaBackend::GrowScratch(DeviceBuffer& buffer, size_t bytes) {
  if (buffer.size() >= bytes) return absl::OkStatus();
  BuffersMoved();
  ASSIGN_OR_RETURN(buffer, DeviceBuffer::Allocate(std::max(bytes, 2 * buffer.size())));
  return absl::OkStatus();
}

absl::Status CudaBackend::ReservePolicyScratch() {
  const ModelConfig& c = model_.config;
  const int64_t kv_heads = c.num_kv_heads;
  size_t victims = 0;
  for (const PolicyStep& p : policy_steps_) {
    const KvPolicyConfig& config = p.kv->config();
    size_t scratch = 0;
    if (config.kind == KvPolicyKind::kH2o) {
      scratch = kc::H2oAccumulateScratchBytes(1, c.num_heads, p.n, p.slots);
    }
    if (p.evict && config.kind == KvPolicyKind::kMorphKv) {
      scratch = std::max(scratch, kc::MorphKvScoringScratchBytes(
                                      1, c.num_heads, kv_heads, config.window, p.slots,
                                      config.aggregation == MorphKvAggregation::kGroupMaxProb));
    }
    if (p.snap) {
      scratch = std::max(scratch, kc::SnapKvScoresScratchBytes(1, c.num_heads, kv_heads,
                                                               kSnapKvObservationWindow, p.slots));
    }
    RETURN_IF_ERROR(GrowScratch(policy_scratch_, scratch));
    if (p.evict) victims += static_cast<size_t>(c.num_layers * kv_heads);
    if (!p.first && !p.snap) continue;
    RETURN_IF_ERROR(GrowScratch(policy_scores_, kv_heads * p.slots * sizeof(float)));
    RETURN_IF_ERROR(GrowScratch(keep_lists_, kv_heads * p.slots * sizeof(int32_t)));
    RETURN_IF_ERROR(GrowScratch(keep_counts_, kv_heads * sizeof(int32_t)));
  }
  if (victims > victims_capacity_) {
    BuffersMoved();
    void* pinned = nullptr;
    RETURN_IF_CUDA_ERROR(cudaMallocHost(&pinned, victims * sizeof(int32_t)));
    victims_host_.reset(pinned);
    victims_capacity_ = victims;
  }
  return absl::OkStatus();
}

absl::Status CudaBackend::RunPolicies(int64_t layer, __nv_bfloat16* k_cache,
                                      __nv_bfloat16* v_cache) {
  if (policy_steps_.empty()) return absl::OkStatus();
  const ModelConfig& c = model_.config;
  const int32_t* meta = meta_.as<int32_t>();
  int32_t* pool = policy_pool_.as<int32_t>();
  const int64_t kv_heads = c.num_kv_heads;
  const int64_t q_dim = c.q_dim();
  const int64_t qkv_dim = q_dim + 2 * c.kv_dim();
  const float scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
  for (const PolicyStep& p : policy_steps_) {
    const KvPolicyConfig& config = p.kv->config();
    const PolicyState& state = *p.state;
    const int32_t* ints = meta + p.meta;
    auto* ring = reinterpret_cast<__nv_bfloat16*>(pool + state.ring) +
                 layer * state.ring_size * q_dim;
    int32_t* positions = pool + state.positions + layer * kv_heads * state.kept;
    int32_t* victims = pool + state.victims + layer * kv_heads;
    float* h2o = config.kind == KvPolicyKind::kH2o
                     ? reinterpret_cast<float*>(pool + state.scores) +
                           layer * kv_heads * state.max_slots
                     : nullptr;
    // The step's queries join the ring, which scores the candidates.
    if (p.push) {
      RETURN_IF_ERROR(kc::PushQueryRing(qkv_.as<__nv_bfloat16>(), qkv_dim, ints, ints + 2, 1,
                                        p.n, q_dim, ring, state.ring_size * q_dim, q_dim,
                                        state.ring_size, stream_));
    }
    // H2O adds the step's attention to its running scores, restarting the
    // slot the step's token overwrote.
    if (h2o != nullptr) {
      kc::H2oAccumulateArgs acc;
      acc.k_cache = k_cache;
      acc.block_tables = meta + p.table;
      acc.block_table_stride = table_stride_;
      acc.num_slots = ints + 3;
      acc.query_start = ints;
      acc.reset_slots = p.kv->compacted() ? victims : nullptr;
      acc.max_slots = p.slots;
      acc.max_tokens = p.n;
      acc.num_seqs = 1;
      acc.block_size = shape_.block_size;
      acc.num_heads = c.num_heads;
      acc.num_kv_heads = kv_heads;
      acc.head_dim = c.head_dim;
      acc.scale = scale;
      RETURN_IF_ERROR(kc::H2oAccumulate(acc, qkv_.as<__nv_bfloat16>(), qkv_dim, h2o,
                                        state.max_slots, policy_scratch_.data(), stream_));
    }
    if (p.snap) {
      kc::SnapKvScoresArgs snap;
      snap.k_cache = k_cache;
      snap.block_tables = meta + p.table;
      snap.block_table_stride = table_stride_;
      snap.num_tokens = ints + 6;
      snap.max_slots = p.slots;
      snap.num_seqs = 1;
      snap.block_size = shape_.block_size;
      snap.num_heads = c.num_heads;
      snap.num_kv_heads = kv_heads;
      snap.head_dim = c.head_dim;
      snap.ring_size = state.ring_size;
      snap.scale = scale;
      RETURN_IF_ERROR(kc::SnapKvScores(snap, ring, state.ring_size * q_dim, q_dim,
                                       policy_scores_.as<float>(), p.slots,
                                       policy_scratch_.data(), stream_));
      RETURN_IF_ERROR(SelectAndCompact(p, layer, policy_scores_.as<float>(), p.slots, nullptr,
                                       k_cache, v_cache));
      continue;
    }
    if (!p.evict) continue;
    if (config.kind == KvPolicyKind::kMorphKv) {
      kc::MorphKvScoringArgs score;
      score.k_cache = k_cache;
      score.block_tables = meta + p.table;
      score.block_table_stride = table_stride_;
      score.num_slots = ints + 3;
      score.recent_from = ints + 4;
      score.positions = p.first ? nullptr : positions;
      score.positions_stride = state.kept;
      score.max_slots = p.slots;
      score.num_seqs = 1;
      score.block_size = shape_.block_size;
      score.num_heads = c.num_heads;
      score.num_kv_heads = kv_heads;
      score.head_dim = c.head_dim;
      score.window = config.window;
      score.max_fusion = config.fusion == KvFusion::kMax;
      score.group_max_prob = config.aggregation == MorphKvAggregation::kGroupMaxProb;
      score.scale = scale;
      // In steady state the scorer picks the victims itself; the first
      // selection ranks its scores.
      float* scores = p.first ? policy_scores_.as<float>() : nullptr;
      RETURN_IF_ERROR(kc::MorphKvSelectVictims(score, ring, state.ring_size * q_dim, q_dim,
                                               victims, scores, p.slots,
                                               policy_scratch_.data(), stream_));
      if (p.first) {
        RETURN_IF_ERROR(
            SelectAndCompact(p, layer, scores, p.slots, nullptr, k_cache, v_cache));
      }
      continue;
    }
    // H2O ranks by its running scores; streaming by position alone.
    if (p.first) {
      RETURN_IF_ERROR(
          SelectAndCompact(p, layer, h2o, state.max_slots, h2o, k_cache, v_cache));
      continue;
    }
    kc::CandidateArgs candidates;
    candidates.num_slots = ints + 3;
    candidates.recent_from = ints + 4;
    candidates.positions = positions;
    candidates.positions_stride = state.kept;
    candidates.sinks = config.kind == KvPolicyKind::kStreaming ? config.sinks : 0;
    candidates.max_slots = p.slots;
    candidates.num_seqs = 1;
    candidates.num_kv_heads = kv_heads;
    RETURN_IF_ERROR(
        kc::SelectLowestCandidates(candidates, h2o, state.max_slots, victims, stream_));
  }
  return absl::OkStatus();
}

absl::Status CudaBackend::SelectAndCompact(const PolicyStep& p, int64_t layer,
                                           const float* scores, int64_t scores_stride,
                                           float* moved_scores, __nv_bfloat16* k_cache,
                                           __nv_bfloat16* v_cache) {
  const KvPolicyConfig& config = p.kv->config();
  const PolicyState& state = *p.state;
  const int64_t kv_heads = model_.config.num_kv_heads;
  const int32_t* ints = meta_.as<int32_t>() + p.meta;
  int32_t* pool = policy_pool_.as<int32_t>();
  // SnapKV's selection feeds no victim: it grows again afterwards.
  int32_t* victims = p.snap ? nullptr : pool + state.victims + layer * kv_heads;
  kc::CandidateArgs candidates;
  candidates.num_slots = ints + 3;
  candidates.recent_from = ints + 4;
  candidates.sinks = config.kind == KvPolicyKind::kStreaming ? config.sinks : 0;
  candidates.max_slots = p.slots;
  candidates.num_seqs = 1;
  candidates.num_kv_heads = kv_heads;
  RETURN_IF_ERROR(kc::SelectKeepLists(candidates, ints + 5, scores, scores_stride,
                                      keep_lists_.as<int32_t>(), p.slots,
                                      keep_counts_.as<int32_t>(), victims, stream_));
  kc::CompactKvArgs compact;
  compact.k_cache = k_cache;
  compact.v_cache = v_cache;
  compact.block_tables = meta_.as<int32_t>() + p.table;
  compact.block_table_stride = table_stride_;
  compact.max_slots = state.kept;
  compact.num_seqs = 1;
  compact.block_size = shape_.block_size;
  compact.num_kv_heads = kv_heads;
  compact.head_dim = model_.config.head_dim;
  return kc::CompactKv(compact, keep_lists_.as<int32_t>(), p.slots, keep_counts_.as<int32_t>(),
                       nullptr, pool + state.positions + layer * kv_heads * state.kept,
                       state.kept, moved_scores, scores_stride, stream_);
}

absl::StatusOr<std::vector<int32_t>> CudaBackend::DevicePositions(const KvSequence& kv) {
  const auto* state = dynamic_cast<const PolicyState*>(kv.device_state());
  if (state == nullptr || !kv.compacted()) return std::vector<int32_t>();
  const int64_t heads = model_.config.num_layers * model_.config.num_kv_heads;
  std::vector<int32_t> all(static_cast<size_t>(heads * state->kept));
  RETURN_IF_CUDA_ERROR(cudaStreamSynchronize(stream_));
  RETURN_IF_CUDA_ERROR(cudaMemcpy(all.data(), policy_pool_.as<int32_t>() + state->positions,
                                  all.size() * sizeof(int32_t), cudaMemcpyDeviceToHost));
  const int64_t slots = std::min(kv.num_slots(), state->kept);
  std::vector<int32_t> held;
  for (int64_t h = 0; h < heads; ++h) {
    held.insert(held.end(), all.begin() + h * state->kept, all.begin() + h * state->kept + slots);
  }
  return held;
}

absl::StatusOr<int64_t> CudaBackend::DevicePool::Allocate(int64_t n) {
  n = (n + 3) / 4 * 4;
  for (auto it = free_.begin(); it != free_.end(); ++it) {
    if (it->second < n) continue;
    const int64_t offset = it->first;
    const int64_t rest = it->second - n;
    free_.erase(it);
    if (rest > 0) free_.emplace(offset + n, rest);
    return offset;
  }
  // Grow: at least double, and enough for `n` past the end.
  const int64_t grown = std::max<int64_t>({2 * capacity_, capacity_ + n, 1 << 16});
  ASSIGN_OR_RETURN(DeviceBuffer bigger, DeviceBuffer::Allocate(grown * element_bytes_));
  ++generation_;
  if (capacity_ > 0) {
    RETURN_IF_CUDA_ERROR(cudaMemcpy(bigger.data(), buffer_.data(), capacity_ * element_bytes_,
                                    cudaMemcpyDeviceToDevice));
  }
  buffer_ = std::move(bigger);
  Free(capacity_, grown - capacity_);
  capacity_ = grown;
  return Allocate(n);
}

void CudaBackend::DevicePool::Free(int64_t offset, int64_t n) {
  n = (n + 3) / 4 * 4;
  auto [it, inserted] = free_.emplace(offset, n);
  if (!inserted) return;
  // Merge with the following range, then with the preceding one.
  if (auto next = std::next(it); next != free_.end() && offset + n == next->first) {
    it->second += next->second;
    free_.erase(next);
  }
  if (it != free_.begin()) {
    auto prev = std::prev(it);
    if (prev->first + prev->second == offset) {
      prev->second += it->second;
      free_.erase(it);
    }
  }
}

}  // namespace morphserve::engine
