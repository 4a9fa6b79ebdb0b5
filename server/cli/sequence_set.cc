#include "server/cli/sequence_set.h"

#include <algorithm>

#include "common/status.h"
#include "common/strings.h"
#include "engine/backend/backend_registry.h"

namespace morphserve::cli {

SequenceSet::SequenceSet(const engine::Model& model, engine::ForwardBackend* backend)
    : model_(model),
      backend_(backend),
      block_size_(backend->cache_shape().block_size),
      blocks_(static_cast<int32_t>(backend->cache_shape().num_blocks)) {}

absl::StatusOr<std::unique_ptr<engine::ForwardBackend>> OfflineBackend(
    const engine::Model& model, const std::string& device, int64_t threads, int64_t block_size,
    int64_t num_blocks, bool reference_kernels, std::span<const KvPolicyConfig> policies) {
  if (threads < 0) return absl::InvalidArgumentError("--threads must be at least 0");
  engine::BackendOptions options;
  ASSIGN_OR_RETURN(options.device, engine::ResolveDevice(device));
  options.block_size = block_size;
  options.num_blocks = num_blocks;
  options.threads = static_cast<int>(threads);
  options.forward.reference_kernels = reference_kernels;
  options.policies.assign(policies.begin(), policies.end());
  ASSIGN_OR_RETURN(std::unique_ptr<engine::ForwardBackend> backend,
                   engine::CreateBackend(model, options));
  for (const KvPolicyConfig& policy : policies) RETURN_IF_ERROR(backend->SupportsPolicy(policy));
  return backend;
}

int64_t SequenceSet::BlocksFor(const KvPolicyConfig& policy, int64_t prompt_tokens,
                               int64_t max_new_tokens, int64_t block_size) {
  return (policy.MaxSlots(prompt_tokens, max_new_tokens) + block_size - 1) / block_size;
}

absl::StatusOr<int> SequenceSet::Add(const KvPolicyConfig& policy, int64_t prompt_tokens,
                                     int64_t max_new_tokens) {
  auto seq = std::make_unique<Sequence>();
  const int64_t max_slots = policy.MaxSlots(prompt_tokens, max_new_tokens);
  seq->reserved_blocks = BlocksFor(policy, prompt_tokens, max_new_tokens, block_size_);
  if (reserved_blocks_ + seq->reserved_blocks > blocks_.num_blocks()) {
    return absl::ResourceExhaustedError(
        StrCat("the sequence needs ", seq->reserved_blocks, " KV blocks; ",
               blocks_.num_blocks() - reserved_blocks_, " of ", blocks_.num_blocks(),
               " are unreserved"));
  }
  reserved_blocks_ += seq->reserved_blocks;
  seq->kv = std::make_unique<engine::KvSequence>(policy, backend_->cache_shape(),
                                                 model_.config.num_heads,
                                                 max_slots);
  sequences_.push_back(std::move(seq));
  return static_cast<int>(sequences_.size() - 1);
}

void SequenceSet::Remove(int id) {
  Sequence& seq = *sequences_[id];
  blocks_.Free(seq.table);
  reserved_blocks_ -= seq.reserved_blocks;
  sequences_[id].reset();
}

absl::Status SequenceSet::Step(std::span<const Work> work, std::vector<float>* logits) {
  inputs_.clear();
  tokens_.clear();
  for (const Work& w : work) {
    if (w.id < 0 || w.id >= static_cast<int>(sequences_.size()) || sequences_[w.id] == nullptr) {
      return absl::InvalidArgumentError(StrCat("no sequence ", w.id));
    }
    Sequence& seq = *sequences_[w.id];
    const int64_t n = static_cast<int64_t>(w.tokens.size());
    if (absl::Status s = seq.kv->CheckStep(n); !s.ok()) return s;
    // Within the reservation, so the pool has the blocks.
    const int64_t missing = Blocks(seq.kv->SlotsNeeded(n)) - static_cast<int64_t>(seq.table.size());
    if (missing > 0 && !blocks_.Allocate(static_cast<int32_t>(missing), &seq.table)) {
      return absl::InternalError("KV block reservation exceeded");
    }
    inputs_.push_back({static_cast<int64_t>(tokens_.size()), n, seq.kv->num_tokens(), seq.table,
                       seq.kv.get(), w.prompt_pending});
    tokens_.insert(tokens_.end(), w.tokens.begin(), w.tokens.end());
  }
  peak_blocks_used_ = std::max<int64_t>(peak_blocks_used_, blocks_.num_used());
  const absl::Status s = backend_->Forward({tokens_, inputs_, /*all_logits=*/false}, logits);
  // Blocks past the slots still in use go back at once (a policy's first
  // selection gathers what it keeps into the first blocks).
  for (const Work& w : work) {
    Sequence& seq = *sequences_[w.id];
    const size_t keep = static_cast<size_t>(Blocks(seq.kv->num_slots()));
    if (seq.table.size() > keep) {
      blocks_.Free(std::span<const int32_t>(seq.table).subspan(keep));
      seq.table.resize(keep);
    }
  }
  return s;
}

}  // namespace morphserve::cli
