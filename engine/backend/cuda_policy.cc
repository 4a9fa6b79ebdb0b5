// CudaBackend's KV policy work: which policies run on the device, each
// sequence's slot in its policy slab, and the scoring, selection and
// compaction queued after every layer's attention (kernels/cuda/kv_scoring.h
// and kv_policy.h), in the order KvSequence::AfterAttention runs them on the
// CPU. Every kernel runs once per layer and slab, over all its sequences;
// one MorphKV slab's first scoring pass runs inside the attention.
#include <algorithm>
#include <bit>
#include <cmath>
#include <map>
#include <optional>
#include <vector>

#include "common/status.h"
#include "engine/backend/cuda_backend.h"
#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/elementwise.h"
#include "kernels/cuda/kv_policy.h"
#include "kernels/cuda/kv_scoring.h"

namespace morphserve::engine {

namespace kc = kernels::cuda;

namespace {

constexpr int64_t kBf16Bytes = 2;

// Grows `buffer`, laid out [layer][slot][slot_bytes] for `old_slots`, to
// `new_slots` slots per layer, keeping each layer's slots in place.
absl::Status GrowSlabField(kc::DeviceBuffer& buffer, int64_t layers, int64_t slot_bytes,
                           int64_t old_slots, int64_t new_slots, cudaStream_t stream) {
  if (slot_bytes == 0) return absl::OkStatus();
  ASSIGN_OR_RETURN(kc::DeviceBuffer bigger,
                   kc::DeviceBuffer::Allocate(layers * new_slots * slot_bytes));
  if (old_slots > 0) {
    RETURN_IF_CUDA_ERROR(cudaMemcpy2DAsync(bigger.data(), new_slots * slot_bytes, buffer.data(),
                                           old_slots * slot_bytes, old_slots * slot_bytes, layers,
                                           cudaMemcpyDeviceToDevice, stream));
    // The old array is freed below, which waits for the copy.
    RETURN_IF_CUDA_ERROR(cudaStreamSynchronize(stream));
  }
  buffer = std::move(bigger);
  return absl::OkStatus();
}

}  // namespace

absl::Status CudaBackend::RunsPolicy(const KvPolicyConfig&) {
  // Every policy and aggregation has its device kernels.
  return absl::OkStatus();
}

bool CudaBackend::DeviceScored(const KvSequence* kv) {
  return kv != nullptr && kv->config().kind != KvPolicyKind::kFull;
}

int64_t CudaBackend::PolicySlab::HighWater() const {
  int64_t high = static_cast<int64_t>(used.size());
  while (high > 0 && !used[static_cast<size_t>(high - 1)]) --high;
  return high;
}

absl::StatusOr<CudaBackend::PolicySlab*> CudaBackend::SlabFor(const KvSequence& kv) {
  const KvPolicyConfig& p = kv.config();
  // H2O's scores cover the request's whole reservation, rounded up so that
  // requests of similar lengths share a slab.
  const int64_t score_slots =
      p.kind == KvPolicyKind::kH2o
          ? static_cast<int64_t>(std::bit_ceil(static_cast<uint64_t>(kv.max_slots())))
          : 0;
  const std::vector<int64_t> key = {static_cast<int64_t>(p.kind),
                                    p.window,
                                    p.capacity,
                                    static_cast<int64_t>(p.fusion),
                                    static_cast<int64_t>(p.aggregation),
                                    p.sinks,
                                    score_slots};
  std::unique_ptr<PolicySlab>& slab = slabs_[key];
  if (slab == nullptr) {
    slab = std::make_unique<PolicySlab>();
    slab->id = next_slab_id_++;
    slab->config = p;
    slab->ring_size = p.kind == KvPolicyKind::kMorphKv ? p.window
                      : p.kind == KvPolicyKind::kSnapKv ? kSnapKvObservationWindow
                                                        : 0;
    slab->kept = p.kind == KvPolicyKind::kSnapKv ? p.capacity : p.capacity + 1;
    slab->score_slots = score_slots;
  }
  return slab.get();
}

absl::StatusOr<size_t> CudaBackend::PlanPolicies(const ForwardBatch& batch, size_t at) {
  const ModelConfig& c = model_.config;
  const int64_t kv_heads = c.num_kv_heads;
  slab_steps_.clear();
  fused_step_ = nullptr;
  std::map<PolicySlab*, size_t> step_of;
  for (size_t i = 0; i < batch.sequences.size(); ++i) {
    const SequenceInput& seq = batch.sequences[i];
    if (!DeviceScored(seq.kv)) continue;
    // A sequence's first step takes the lowest free slot of its slab,
    // growing the slab when all are taken.
    if (seq.kv->device_state() == nullptr) {
      ASSIGN_OR_RETURN(PolicySlab* const slab, SlabFor(*seq.kv));
      const auto free = std::find(slab->used.begin(), slab->used.end(), false);
      const int64_t slot = free - slab->used.begin();
      if (slot == slab->capacity) {
        const int64_t grown = std::max<int64_t>(2 * slab->capacity, 8);
        const int64_t layers = c.num_layers;
        RETURN_IF_ERROR(GrowSlabField(slab->ring, layers, slab->ring_size * c.q_dim() * kBf16Bytes,
                                      slab->capacity, grown, stream_));
        RETURN_IF_ERROR(GrowSlabField(slab->positions, layers, kv_heads * slab->kept * 4,
                                      slab->capacity, grown, stream_));
        RETURN_IF_ERROR(GrowSlabField(slab->victims, layers, kv_heads * 4, slab->capacity, grown,
                                      stream_));
        RETURN_IF_ERROR(GrowSlabField(slab->scores, layers, kv_heads * slab->score_slots * 4,
                                      slab->capacity, grown, stream_));
        slab->capacity = grown;
        slab->used.resize(static_cast<size_t>(grown), false);
        ++slab->generation;
      }
      slab->used[static_cast<size_t>(slot)] = true;
      // No victim yet; H2O's running scores start from zero.
      const int64_t pitch = slab->capacity * kv_heads * 4;
      RETURN_IF_CUDA_ERROR(cudaMemset2DAsync(slab->victims.as<int32_t>() + slot * kv_heads, pitch,
                                             0xff, kv_heads * 4, c.num_layers, stream_));
      if (slab->score_slots > 0) {
        const int64_t bytes = kv_heads * slab->score_slots * 4;
        RETURN_IF_CUDA_ERROR(cudaMemset2DAsync(
            slab->scores.as<float>() + slot * kv_heads * slab->score_slots,
            slab->capacity * bytes, 0, bytes, c.num_layers, stream_));
      }
      seq.kv->set_device_state(std::make_unique<PolicyState>(slab, slot));
    }
    auto* state = static_cast<PolicyState*>(seq.kv->device_state());
    const auto [it, added] = step_of.emplace(state->slab, slab_steps_.size());
    if (added) {
      slab_steps_.emplace_back();
      slab_steps_.back().slab = state->slab;
    }
    SlabStep& step = slab_steps_[it->second];
    // As KvSequence::AfterAttention: a bounded policy's next token t keeps
    // t-W .. t and evicts from then on; SnapKV selects once, at the end of a
    // prompt longer than C, keeping its observation window.
    const KvPolicyConfig& config = seq.kv->config();
    const bool select = !seq.prompt_pending;
    const int64_t tokens = seq.start_position + seq.num_tokens;
    PolicyStep p;
    p.input = &seq;
    p.kv = seq.kv;
    p.slot = state->slot;
    p.first_row = first_rows_[i];
    p.n = seq.num_tokens;
    p.slots = seq.kv->ContextSlots(seq.num_tokens - 1);
    p.push = state->slab->ring_size > 0 && !state->snapped;
    p.evict = config.bounded() && select && tokens >= config.capacity + 1;
    p.first = p.evict && !seq.kv->compacted();
    p.snap = config.kind == KvPolicyKind::kSnapKv && select && !state->snapped &&
             tokens > config.capacity;
    if (config.kind == KvPolicyKind::kSnapKv && select) state->snapped = true;
    const bool gathers = p.push || config.kind == KvPolicyKind::kH2o;
    step.tokens += gathers ? p.n : 0;
    step.max_tokens = std::max(step.max_tokens, gathers ? p.n : 0);
    step.max_slots = std::max(step.max_slots, p.slots);
    step.steady += p.evict && !p.first;
    step.first += p.first;
    step.snap += p.snap;
    step.evict += p.evict;
    step.scatter += seq.kv->compacted() && config.bounded() ? kv_heads : 0;
    step.seqs.push_back(p);
  }
  // The fused slab: MorphKV, with the most steady evictions, all of them
  // decodes (so that the decode attention covers them).
  SlabStep* fused = nullptr;
  for (SlabStep& step : slab_steps_) {
    const bool decodes = std::all_of(step.seqs.begin(), step.seqs.end(), [](const PolicyStep& p) {
      return !p.evict || p.first || p.n == 1;
    });
    if (step.slab->config.kind == KvPolicyKind::kMorphKv && step.steady > 0 && decodes &&
        (fused == nullptr || step.steady > fused->steady)) {
      fused = &step;
    }
  }
  if (fused != nullptr && fused_scoring_) {
    fused->fused = true;
    fused_step_ = fused;
  }
  for (const SlabStep& step : slab_steps_) {
    if (step.slab->config.kind != KvPolicyKind::kMorphKv) continue;
    (step.fused ? fused_evictions_ : unfused_evictions_) += step.steady;
  }
  for (SlabStep& step : slab_steps_) {
    step.high_water = step.slab->HighWater();
    const int64_t hw = step.high_water;
    step.rows = at;
    step.query_start = step.rows + step.tokens;
    step.first_position = step.query_start + hw + 1;
    step.snap_tokens = step.first_position + hw;
    step.slots_all = step.snap_tokens + hw;
    step.slots_steady = step.slots_all + hw;
    step.slots_first = step.slots_steady + hw;
    step.recent_from = step.slots_first + hw;
    step.keep = step.recent_from + hw;
    step.tables = step.keep + hw;
    step.scatter_offsets = step.tables + hw * table_stride_;
    step.scatter_values = step.scatter_offsets + c.num_layers * step.scatter;
    step.scored_as = step.scatter_values + c.num_layers * step.scatter;
    step.end = step.scored_as + (step.fused ? num_decode_ : 0);
    at = step.end;
  }
  return at;
}

void CudaBackend::StagePolicies(int32_t* m) const {
  const ModelConfig& c = model_.config;
  const int64_t kv_heads = c.num_kv_heads;
  const auto i32 = [](int64_t v) { return static_cast<int32_t>(v); };
  for (const SlabStep& step : slab_steps_) {
    const PolicySlab& slab = *step.slab;
    const KvPolicyConfig& config = slab.config;
    const int64_t hw = step.high_water;
    // Slots without a sequence in this step take part in nothing; decodes
    // of other slabs are not scored by the attention.
    std::fill(m + step.query_start, m + step.scored_as, 0);
    std::fill(m + step.scored_as, m + step.end, -1);
    const int64_t sinks = config.kind == KvPolicyKind::kStreaming ? config.sinks : 0;
    std::vector<const PolicyStep*> by_slot(static_cast<size_t>(hw), nullptr);
    for (const PolicyStep& p : step.seqs) by_slot[static_cast<size_t>(p.slot)] = &p;
    int64_t row = 0;
    int64_t scatter = 0;
    for (int64_t s = 0; s < hw; ++s) {
      m[step.query_start + s] = i32(row);
      const PolicyStep* p = by_slot[static_cast<size_t>(s)];
      if (p == nullptr) continue;
      const SequenceInput& seq = *p->input;
      const int64_t tokens = seq.start_position + seq.num_tokens;
      if (p->push || config.kind == KvPolicyKind::kH2o) {
        for (int64_t i = 0; i < p->n; ++i) m[step.rows + row++] = i32(p->first_row + i);
      }
      m[step.first_position + s] = i32(seq.start_position);
      m[step.snap_tokens + s] = p->snap ? i32(tokens) : 0;
      m[step.slots_all + s] = i32(p->slots);
      m[step.slots_steady + s] = p->evict && !p->first ? i32(p->slots) : 0;
      // A decode's first row is its attention row.
      if (step.fused && p->evict && !p->first) m[step.scored_as + p->first_row] = i32(s);
      m[step.slots_first + s] = p->first || p->snap ? i32(p->slots) : 0;
      const int64_t window = p->snap ? kSnapKvObservationWindow : config.window;
      m[step.recent_from + s] = i32(tokens - window);
      m[step.keep + s] = i32(p->snap ? config.capacity - window
                                     : config.capacity + 1 - window - sinks);
      const int64_t len =
          std::min<int64_t>(static_cast<int64_t>(seq.block_table.size()), table_stride_);
      std::copy_n(seq.block_table.begin(), len, m + step.tables + s * table_stride_);
      // Once compacted, this step's token lands in a recycled slot: its
      // position goes there, in every (layer, KV head).
      if (seq.kv->compacted() && config.bounded()) {
        for (int64_t layer = 0; layer < c.num_layers; ++layer) {
          for (int64_t h = 0; h < kv_heads; ++h) {
            const size_t at = static_cast<size_t>(layer * step.scatter + scatter + h);
            m[step.scatter_offsets + at] =
                i32((s * kv_heads + h) * slab.kept + seq.kv->WriteSlot(layer, h, 0));
            m[step.scatter_values + at] = i32(seq.start_position);
          }
        }
        scatter += kv_heads;
      }
    }
    m[step.query_start + hw] = i32(row);
  }
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
  for (const SlabStep& step : slab_steps_) {
    const KvPolicyConfig& config = step.slab->config;
    const int64_t hw = step.high_water;
    size_t scratch = 0;
    if (config.kind == KvPolicyKind::kH2o) {
      scratch = kc::H2oAccumulateScratchBytes(hw, c.num_heads, step.max_tokens, step.max_slots);
    }
    const bool group_max_prob = config.aggregation == MorphKvAggregation::kGroupMaxProb;
    if (step.evict > 0 && config.kind == KvPolicyKind::kMorphKv) {
      scratch =
          std::max(scratch, kc::MorphKvScoringScratchBytes(hw, c.num_heads, kv_heads, config.window,
                                                           step.max_slots, group_max_prob));
    }
    if (step.fused) {
      RETURN_IF_ERROR(GrowScratch(
          fused_stats_, kc::MorphKvFusedStatsBytes(hw, c.num_heads, kv_heads, config.window,
                                                   step.slab->kept, group_max_prob)));
    }
    if (step.snap > 0) {
      scratch = std::max(scratch, kc::SnapKvScoresScratchBytes(hw, c.num_heads, kv_heads,
                                                               kSnapKvObservationWindow,
                                                               step.max_slots));
    }
    RETURN_IF_ERROR(GrowScratch(policy_scratch_, scratch));
    RETURN_IF_ERROR(GrowScratch(
        policy_q_, static_cast<size_t>(step.tokens * (c.q_dim() + 2 * c.kv_dim()) * kBf16Bytes)));
    if (step.evict > 0) victims += static_cast<size_t>(c.num_layers * hw * kv_heads);
    if (step.first + step.snap == 0) continue;
    const size_t entries = static_cast<size_t>(hw * kv_heads * step.max_slots);
    RETURN_IF_ERROR(GrowScratch(policy_scores_, entries * sizeof(float)));
    RETURN_IF_ERROR(GrowScratch(keep_lists_, entries * sizeof(int32_t)));
    RETURN_IF_ERROR(GrowScratch(keep_counts_, hw * kv_heads * sizeof(int32_t)));
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

absl::Status CudaBackend::QueueSlabInputs(const SlabStep& step, int64_t layer) {
  const ModelConfig& c = model_.config;
  const int32_t* meta = meta_.as<int32_t>();
  const PolicySlab& slab = *step.slab;
  const int64_t q_dim = c.q_dim();
  const int64_t qkv_dim = q_dim + 2 * c.kv_dim();
  const int64_t cap = slab.capacity;
  if (step.scatter > 0) {
    int32_t* positions = slab.positions.as<int32_t>() + layer * cap * c.num_kv_heads * slab.kept;
    RETURN_IF_ERROR(kc::ScatterInt32(positions, meta + step.scatter_offsets + layer * step.scatter,
                                     meta + step.scatter_values + layer * step.scatter,
                                     step.scatter, stream_));
  }
  if (step.tokens == 0) return absl::OkStatus();
  // The slab's query rows, in slot order.
  auto* q = policy_q_.as<__nv_bfloat16>();
  RETURN_IF_ERROR(
      kc::GatherRows(qkv_.as<__nv_bfloat16>(), qkv_dim, meta + step.rows, q, step.tokens, stream_));
  if (slab.ring_size == 0) return absl::OkStatus();
  // The step's queries join the rings, which score the candidates.
  __nv_bfloat16* ring = slab.ring.as<__nv_bfloat16>() + layer * cap * slab.ring_size * q_dim;
  return kc::PushQueryRing(q, qkv_dim, meta + step.query_start, meta + step.first_position,
                           step.high_water, step.max_tokens, q_dim, ring, slab.ring_size * q_dim,
                           q_dim, slab.ring_size, stream_);
}

std::optional<kc::MorphKvFusedStats> CudaBackend::FusedStats(int64_t layer) const {
  const SlabStep* step = fused_step_;
  if (step == nullptr) return std::nullopt;
  const ModelConfig& c = model_.config;
  const PolicySlab& slab = *step->slab;
  const int32_t* meta = meta_.as<int32_t>();
  const int64_t q_dim = c.q_dim();
  kc::MorphKvFusedStats stats;
  stats.scored_as = meta + step->scored_as;
  stats.recent_from = meta + step->recent_from;
  stats.positions =
      slab.positions.as<int32_t>() + layer * slab.capacity * c.num_kv_heads * slab.kept;
  stats.positions_stride = slab.kept;
  stats.q = slab.ring.as<__nv_bfloat16>() + layer * slab.capacity * slab.ring_size * q_dim;
  stats.q_seq_stride = slab.ring_size * q_dim;
  stats.q_row_stride = q_dim;
  stats.window = slab.config.window;
  stats.group_max_prob = slab.config.aggregation == MorphKvAggregation::kGroupMaxProb;
  stats.num_scored = step->high_water;
  stats.max_slots = slab.kept;  // a sequence in steady state holds exactly C + 1
  stats.stats = fused_stats_.as<float>();
  return stats;
}

absl::Status CudaBackend::RunPolicies(int64_t layer, __nv_bfloat16* k_cache,
                                      __nv_bfloat16* v_cache) {
  const ModelConfig& c = model_.config;
  const int32_t* meta = meta_.as<int32_t>();
  const int64_t kv_heads = c.num_kv_heads;
  const int64_t q_dim = c.q_dim();
  const int64_t qkv_dim = q_dim + 2 * c.kv_dim();
  const float scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
  for (const SlabStep& step : slab_steps_) {
    const PolicySlab& slab = *step.slab;
    const KvPolicyConfig& config = slab.config;
    const int64_t hw = step.high_water;
    const int64_t cap = slab.capacity;
    __nv_bfloat16* ring = slab.ring.as<__nv_bfloat16>() + layer * cap * slab.ring_size * q_dim;
    int32_t* positions = slab.positions.as<int32_t>() + layer * cap * kv_heads * slab.kept;
    int32_t* victims = slab.victims.as<int32_t>() + layer * cap * kv_heads;
    float* h2o = config.kind == KvPolicyKind::kH2o
                     ? slab.scores.as<float>() + layer * cap * kv_heads * slab.score_slots
                     : nullptr;
    // What the scoring kernels' arguments share: the layer's keys, the
    // slab's block tables and the model's shape.
    const auto shape = [&](auto& a) {
      a.k_cache = k_cache;
      a.block_tables = meta + step.tables;
      a.block_table_stride = table_stride_;
      a.max_slots = step.max_slots;
      a.num_seqs = hw;
      a.block_size = shape_.block_size;
      a.num_heads = c.num_heads;
      a.num_kv_heads = kv_heads;
      a.head_dim = c.head_dim;
      a.scale = scale;
    };
    if (!step.fused) RETURN_IF_ERROR(QueueSlabInputs(step, layer));
    const auto* q = policy_q_.as<__nv_bfloat16>();
    // H2O adds the step's attention to its running scores, restarting the
    // slot each token overwrote (its victim; -1 before the first).
    if (h2o != nullptr && step.tokens > 0) {
      kc::H2oAccumulateArgs acc;
      shape(acc);
      acc.num_slots = meta + step.slots_all;
      acc.query_start = meta + step.query_start;
      acc.reset_slots = victims;
      acc.max_tokens = step.max_tokens;
      RETURN_IF_ERROR(kc::H2oAccumulate(acc, q, qkv_dim, h2o, slab.score_slots,
                                        policy_scratch_.data(), stream_));
    }
    if (step.snap > 0) {
      kc::SnapKvScoresArgs snap;
      shape(snap);
      snap.num_tokens = meta + step.snap_tokens;
      snap.ring_size = slab.ring_size;
      RETURN_IF_ERROR(kc::SnapKvScores(snap, ring, slab.ring_size * q_dim, q_dim,
                                       policy_scores_.as<float>(), step.max_slots,
                                       policy_scratch_.data(), stream_));
      RETURN_IF_ERROR(SelectAndCompact(step, layer, policy_scores_.as<float>(), step.max_slots,
                                       nullptr, k_cache, v_cache));
    }
    if (step.evict == 0) continue;
    if (config.kind == KvPolicyKind::kMorphKv) {
      kc::MorphKvScoringArgs score;
      shape(score);
      score.recent_from = meta + step.recent_from;
      score.positions_stride = slab.kept;
      score.window = config.window;
      score.max_fusion = config.fusion == KvFusion::kMax;
      score.group_max_prob = config.aggregation == MorphKvAggregation::kGroupMaxProb;
      // In steady state the scorer picks the victims itself; a first
      // selection ranks its scores. Each launch leaves the other's
      // sequences alone (0 slots).
      if (step.steady > 0) {
        // A sequence in steady state holds exactly C + 1 slots.
        score.num_slots = meta + step.slots_steady;
        score.positions = positions;
        score.max_slots = slab.kept;
        if (step.fused) {
          RETURN_IF_ERROR(kc::MorphKvSelectVictimsFromStats(
              score, ring, slab.ring_size * q_dim, q_dim, fused_stats_.as<float>(), victims,
              nullptr, 0, policy_scratch_.data(), stream_));
        } else {
          RETURN_IF_ERROR(kc::MorphKvSelectVictims(score, ring, slab.ring_size * q_dim, q_dim,
                                                   victims, nullptr, 0, policy_scratch_.data(),
                                                   stream_));
        }
      }
      if (step.first > 0) {
        score.num_slots = meta + step.slots_first;
        score.positions = nullptr;
        score.max_slots = step.max_slots;
        float* scores = policy_scores_.as<float>();
        RETURN_IF_ERROR(kc::MorphKvSelectVictims(score, ring, slab.ring_size * q_dim, q_dim,
                                                 victims, scores, step.max_slots,
                                                 policy_scratch_.data(), stream_));
        RETURN_IF_ERROR(
            SelectAndCompact(step, layer, scores, step.max_slots, nullptr, k_cache, v_cache));
      }
      continue;
    }
    // H2O ranks by its running scores; streaming by position alone.
    if (step.first > 0) {
      RETURN_IF_ERROR(
          SelectAndCompact(step, layer, h2o, slab.score_slots, h2o, k_cache, v_cache));
    }
    if (step.steady > 0) {
      kc::CandidateArgs candidates;
      candidates.num_slots = meta + step.slots_steady;
      candidates.recent_from = meta + step.recent_from;
      candidates.positions = positions;
      candidates.positions_stride = slab.kept;
      candidates.sinks = config.kind == KvPolicyKind::kStreaming ? config.sinks : 0;
      candidates.max_slots = slab.kept;  // as in steady state
      candidates.num_seqs = hw;
      candidates.num_kv_heads = kv_heads;
      RETURN_IF_ERROR(
          kc::SelectLowestCandidates(candidates, h2o, slab.score_slots, victims, stream_));
    }
  }
  return absl::OkStatus();
}

absl::Status CudaBackend::SelectAndCompact(const SlabStep& step, int64_t layer,
                                           const float* scores, int64_t scores_stride,
                                           float* moved_scores, __nv_bfloat16* k_cache,
                                           __nv_bfloat16* v_cache) {
  const PolicySlab& slab = *step.slab;
  const KvPolicyConfig& config = slab.config;
  const int64_t kv_heads = model_.config.num_kv_heads;
  const int64_t cap = slab.capacity;
  const int32_t* meta = meta_.as<int32_t>();
  // SnapKV's selection feeds no victim: it grows again afterwards.
  int32_t* victims = config.kind == KvPolicyKind::kSnapKv
                         ? nullptr
                         : slab.victims.as<int32_t>() + layer * cap * kv_heads;
  kc::CandidateArgs candidates;
  candidates.num_slots = meta + step.slots_first;
  candidates.recent_from = meta + step.recent_from;
  candidates.sinks = config.kind == KvPolicyKind::kStreaming ? config.sinks : 0;
  candidates.max_slots = step.max_slots;
  candidates.num_seqs = step.high_water;
  candidates.num_kv_heads = kv_heads;
  RETURN_IF_ERROR(kc::SelectKeepLists(candidates, meta + step.keep, scores, scores_stride,
                                      keep_lists_.as<int32_t>(), step.max_slots,
                                      keep_counts_.as<int32_t>(), victims, stream_));
  kc::CompactKvArgs compact;
  compact.k_cache = k_cache;
  compact.v_cache = v_cache;
  compact.block_tables = meta + step.tables;
  compact.block_table_stride = table_stride_;
  compact.max_slots = slab.kept;
  compact.num_seqs = step.high_water;
  compact.block_size = shape_.block_size;
  compact.num_kv_heads = kv_heads;
  compact.head_dim = model_.config.head_dim;
  return kc::CompactKv(compact, keep_lists_.as<int32_t>(), step.max_slots,
                       keep_counts_.as<int32_t>(), nullptr,
                       slab.positions.as<int32_t>() + layer * cap * kv_heads * slab.kept,
                       slab.kept, moved_scores, scores_stride, stream_);
}

absl::Status CudaBackend::QueueVictimsBack() {
  const ModelConfig& c = model_.config;
  const int64_t kv_heads = c.num_kv_heads;
  auto* host = static_cast<int32_t*>(victims_host_.get());
  for (const SlabStep& step : slab_steps_) {
    if (step.evict == 0) continue;
    // [layer][slot][kv_head] for the covered slots, in one copy.
    const int64_t width = step.high_water * kv_heads * 4;
    RETURN_IF_CUDA_ERROR(cudaMemcpy2DAsync(host, width, step.slab->victims.data(),
                                           step.slab->capacity * kv_heads * 4, width,
                                           c.num_layers, cudaMemcpyDeviceToHost, stream_));
    host += c.num_layers * step.high_water * kv_heads;
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<int32_t>> CudaBackend::DevicePositions(const KvSequence& kv) {
  const auto* state = dynamic_cast<const PolicyState*>(kv.device_state());
  if (state == nullptr || !kv.compacted()) return std::vector<int32_t>();
  const PolicySlab& slab = *state->slab;
  const ModelConfig& c = model_.config;
  const int64_t per_slot = c.num_kv_heads * slab.kept;
  std::vector<int32_t> all(static_cast<size_t>(c.num_layers * slab.capacity * per_slot));
  RETURN_IF_CUDA_ERROR(cudaStreamSynchronize(stream_));
  RETURN_IF_CUDA_ERROR(cudaMemcpy(all.data(), slab.positions.data(), all.size() * sizeof(int32_t),
                                  cudaMemcpyDeviceToHost));
  const int64_t slots = std::min(kv.num_slots(), slab.kept);
  std::vector<int32_t> held;
  for (int64_t layer = 0; layer < c.num_layers; ++layer) {
    for (int64_t h = 0; h < c.num_kv_heads; ++h) {
      const auto first =
          all.begin() + (layer * slab.capacity + state->slot) * per_slot + h * slab.kept;
      held.insert(held.end(), first, first + slots);
    }
  }
  return held;
}

}  // namespace morphserve::engine
