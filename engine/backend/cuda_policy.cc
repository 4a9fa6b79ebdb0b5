// CudaBackend's KV policy work: which policies run on the device, each
// MorphKV sequence's device state, and the scoring, selection and compaction
// queued after every layer's attention.
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

absl::Status CudaBackend::RunsPolicy(const KvPolicyConfig& policy) {
  if (policy.kind == KvPolicyKind::kFull) return absl::OkStatus();
  if (policy.kind == KvPolicyKind::kMorphKv) {
    if (policy.aggregation == MorphKvAggregation::kGroupLogitSum) return absl::OkStatus();
    return absl::UnimplementedError(
        "kv aggregation 'group-max-prob' does not run on --device cuda yet; use "
        "group-logit-sum or --device cpu");
  }
  return absl::UnimplementedError(StrCat("KV policy '", KvPolicyName(policy.kind),
                                         "' does not run on --device cuda yet; use --device cpu, "
                                         "morphkv or full"));
}

absl::Status CudaBackend::EnsurePolicyState(const ForwardBatch& batch) {
  const ModelConfig& c = model_.config;
  for (const SequenceInput& seq : batch.sequences) {
    if (seq.kv == nullptr || seq.kv->config().kind != KvPolicyKind::kMorphKv ||
        seq.kv->device_state() != nullptr) {
      continue;
    }
    const KvPolicyConfig& p = seq.kv->config();
    const auto round4 = [](int64_t n) { return (n + 3) / 4 * 4; };
    const int64_t ring = round4(c.num_layers * p.window * c.q_dim() / 2);  // bf16 pairs
    const int64_t positions = round4(c.num_layers * c.num_kv_heads * (p.capacity + 1));
    const int64_t victims = round4(c.num_layers * c.num_kv_heads);
    ASSIGN_OR_RETURN(const int64_t offset, policy_pool_.Allocate(ring + positions + victims));
    auto state = std::make_unique<MorphState>(&policy_pool_, offset, ring + positions + victims);
    state->ring = offset;
    state->positions = offset + ring;
    state->victims = offset + ring + positions;
    seq.kv->set_device_state(std::move(state));
  }
  return absl::OkStatus();
}

absl::Status CudaBackend::GrowScratch(DeviceBuffer& buffer, size_t bytes) {
  if (buffer.size() >= bytes) return absl::OkStatus();
  ASSIGN_OR_RETURN(buffer, DeviceBuffer::Allocate(std::max(bytes, 2 * buffer.size())));
  return absl::OkStatus();
}

absl::Status CudaBackend::ReservePolicyScratch() {
  const int64_t kv_heads = model_.config.num_kv_heads;
  size_t victims = 0;
  for (const PolicyStep& p : policy_steps_) {
    if (!p.evict) continue;
    const int64_t w = p.kv->config().window;
    RETURN_IF_ERROR(GrowScratch(policy_scratch_,
                                kc::MorphKvScoringScratchBytes(1, kv_heads, w, p.slots)));
    victims += static_cast<size_t>(model_.config.num_layers * kv_heads);
    if (!p.first) continue;
    RETURN_IF_ERROR(GrowScratch(policy_scores_, kv_heads * p.slots * sizeof(float)));
    RETURN_IF_ERROR(GrowScratch(keep_lists_, kv_heads * p.slots * sizeof(int32_t)));
    RETURN_IF_ERROR(GrowScratch(keep_counts_, kv_heads * sizeof(int32_t)));
  }
  if (victims > victims_capacity_) {
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
  for (const PolicyStep& p : policy_steps_) {
    const KvPolicyConfig& config = p.kv->config();
    const int64_t w = config.window;
    const int64_t keep_slots = config.capacity + 1;
    const int32_t* ints = meta + p.meta;
    auto* ring = reinterpret_cast<__nv_bfloat16*>(pool + p.state->ring) + layer * w * c.q_dim();
    int32_t* positions = pool + p.state->positions + layer * kv_heads * keep_slots;
    int32_t* victims = pool + p.state->victims + layer * kv_heads;
    // The step's queries join the window, which then scores the candidates.
    RETURN_IF_ERROR(kc::PushQueryRing(qkv_.as<__nv_bfloat16>(), c.q_dim() + 2 * c.kv_dim(), ints, ints + 2, 1,
                                      p.n, c.q_dim(), ring, w * c.q_dim(), c.q_dim(), w,
                                      stream_));
    if (!p.evict) continue;
    kc::MorphKvScoringArgs score;
    score.k_cache = k_cache;
    score.block_tables = meta + p.table;
    score.block_table_stride = table_stride_;
    score.num_slots = ints + 3;
    score.recent_from = ints + 4;
    score.positions = p.first ? nullptr : positions;
    score.positions_stride = keep_slots;
    score.max_slots = p.slots;
    score.num_seqs = 1;
    score.block_size = shape_.block_size;
    score.num_heads = c.num_heads;
    score.num_kv_heads = kv_heads;
    score.head_dim = c.head_dim;
    score.window = w;
    score.max_fusion = config.fusion == KvFusion::kMax;
    score.scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
    if (!p.first) {
      RETURN_IF_ERROR(kc::MorphKvSelectVictims(score, ring, w * c.q_dim(), c.q_dim(), victims,
                                               nullptr, 0, policy_scratch_.data(), stream_));
      continue;
    }
    // The first selection keeps the best C+1-W candidates and the window,
    // gathered into the lowest slots; the worst kept one goes next.
    RETURN_IF_ERROR(kc::MorphKvSelectVictims(score, ring, w * c.q_dim(), c.q_dim(), victims,
                                             policy_scores_.as<float>(), p.slots,
                                             policy_scratch_.data(), stream_));
    kc::CandidateArgs candidates;
    candidates.num_slots = ints + 3;
    candidates.recent_from = ints + 4;
    candidates.max_slots = p.slots;
    candidates.num_seqs = 1;
    candidates.num_kv_heads = kv_heads;
    RETURN_IF_ERROR(kc::SelectKeepLists(candidates, ints + 5, policy_scores_.as<float>(), p.slots,
                                        keep_lists_.as<int32_t>(), p.slots,
                                        keep_counts_.as<int32_t>(), victims, stream_));
    kc::CompactKvArgs compact;
    compact.k_cache = k_cache;
    compact.v_cache = v_cache;
    compact.block_tables = meta + p.table;
    compact.block_table_stride = table_stride_;
    compact.max_slots = keep_slots;
    compact.num_seqs = 1;
    compact.block_size = shape_.block_size;
    compact.num_kv_heads = kv_heads;
    compact.head_dim = c.head_dim;
    RETURN_IF_ERROR(kc::CompactKv(compact, keep_lists_.as<int32_t>(), p.slots,
                                  keep_counts_.as<int32_t>(), nullptr, positions, keep_slots,
                                  nullptr, 0, stream_));
  }
  return absl::OkStatus();
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
