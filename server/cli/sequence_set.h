// Sequences run together through the forward pass, each with its own KV
// policy, over one paged KV pool. Each sequence reserves at Add the most
// blocks its policy can ever hold, so a step never runs out of blocks; the
// blocks are taken as the sequence grows and returned as soon as its policy
// drops tokens. For the offline commands (generate, eval); the server's
// scheduler does the same bookkeeping with admission and preemption.
// Single-threaded.
#ifndef MORPHSERVE_SERVER_CLI_SEQUENCE_SET_H_
#define MORPHSERVE_SERVER_CLI_SEQUENCE_SET_H_

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/kv_policy.h"
#include "engine/backend/forward_backend.h"
#include "engine/kv/kv_sequence.h"
#include "engine/model/model.h"
#include "scheduler/block_pool.h"

namespace morphserve::cli {

class SequenceSet {
 public:
  // Runs on `backend`, whose whole KV pool it hands out; `model` and
  // `backend` must outlive it (several sets may use one backend in turn).
  SequenceSet(const engine::Model& model, engine::ForwardBackend* backend);

  // Blocks of `block_size` that a sequence with this policy and these lengths
  // reserves.
  static int64_t BlocksFor(const KvPolicyConfig& policy, int64_t prompt_tokens,
                           int64_t max_new_tokens, int64_t block_size);

  // Adds a sequence and returns its id; ResourceExhausted when its
  // reservation does not fit next to the others'.
  absl::StatusOr<int> Add(const KvPolicyConfig& policy, int64_t prompt_tokens,
                          int64_t max_new_tokens);
  // Returns the sequence's blocks and reservation.
  void Remove(int id);

  struct Work {
    int id;
    std::span<const int32_t> tokens;  // the sequence's next tokens
    bool prompt_pending = false;      // more prompt chunks follow
  };
  // One forward step over `work` (each sequence at most once). `logits` gets
  // one row per work item: the logits after its last token.
  absl::Status Step(std::span<const Work> work, std::vector<float>* logits);

  const engine::KvSequence& kv(int id) const { return *sequences_[id]->kv; }
  int64_t blocks_used() const { return blocks_.num_used(); }
  int64_t peak_blocks_used() const { return peak_blocks_used_; }
  int64_t num_blocks() const { return blocks_.num_blocks(); }

 private:
  struct Sequence {
    std::unique_ptr<engine::KvSequence> kv;
    std::vector<int32_t> table;
    int64_t reserved_blocks = 0;
  };
  int64_t Blocks(int64_t slots) const { return (slots + block_size_ - 1) / block_size_; }

  const engine::Model& model_;
  engine::ForwardBackend* backend_;
  int64_t block_size_;
  scheduler::BlockPool blocks_;
  int64_t reserved_blocks_ = 0;
  int64_t peak_blocks_used_ = 0;
  std::vector<std::unique_ptr<Sequence>> sequences_;  // index = id; null once removed
  std::vector<engine::SequenceInput> inputs_;
  std::vector<int32_t> tokens_;
};

// The backend an offline command runs on: `device` as --device takes it,
// with a pool of exactly `num_blocks` blocks; refuses `policies` the device
// does not run.
absl::StatusOr<std::unique_ptr<engine::ForwardBackend>> OfflineBackend(
    const engine::Model& model, const std::string& device, int64_t threads, int64_t block_size,
    int64_t num_blocks, bool reference_kernels, std::span<const KvPolicyConfig> policies);

}  // namespace morphserve::cli

#endif  // MORPHSERVE_SERVER_CLI_SEQUENCE_SET_H_
