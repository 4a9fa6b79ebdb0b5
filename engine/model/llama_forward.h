// The Llama-family forward pass on CPU over a paged KV cache.
//
// One call computes every token of a step for every sequence together:
// projections and MLP as matrix products over all the step's tokens,
// attention per sequence over its own block table. Scratch buffers are kept
// between calls and only grow. Not thread-safe: the engine thread owns it.
#ifndef MORPHSERVE_ENGINE_MODEL_LLAMA_FORWARD_H_
#define MORPHSERVE_ENGINE_MODEL_LLAMA_FORWARD_H_

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "common/thread_pool.h"
#include "engine/kv/kv_sequence.h"
#include "engine/kv/paged_kv_cache.h"
#include "engine/model/model.h"
#include "kernels/cpu/matmul.h"

namespace morphserve::engine {

// The tokens [token_offset, token_offset + num_tokens) of the batch belong to
// one sequence and sit at positions start_position, start_position + 1, ...
// Without `kv`, positions are also cache slots and nothing is ever evicted.
// With `kv`, the sequence's KV policy decides the slots (start_position must
// be kv->num_tokens() and the block table must cover kv->SlotsNeeded()).
struct SequenceInput {
  int64_t token_offset = 0;
  int64_t num_tokens = 0;
  int64_t start_position = 0;
  std::span<const int32_t> block_table;
  KvSequence* kv = nullptr;
  // More prompt chunks follow this one: the policy must not select yet.
  bool prompt_pending = false;
};

struct ForwardBatch {
  std::span<const int32_t> tokens;
  std::span<const SequenceInput> sequences;
  // false: logits of each sequence's last token, [num_sequences, vocab].
  // true: logits of every token, [num_tokens, vocab].
  bool all_logits = false;
};

// Checks a batch against the model and the KV pool's shape: token ids in the
// vocabulary, sequences covering the tokens in order, positions within the
// context, each sequence's step allowed by its KvSequence, block tables
// covering the slots the step needs with blocks inside the pool. Every
// backend runs this before touching its pool.
absl::Status ValidateForwardBatch(const ModelConfig& config, const KvCacheShape& shape,
                                  const ForwardBatch& batch);

struct ForwardOptions {
  // Use the plain reference matrix product (f32 activations, double
  // accumulation) instead of the SIMD kernels: slow, for tests and audits.
  bool reference_kernels = false;
  // Copy the weight matrices whose type has a packed layout (Q4_0, Q4_1,
  // Q5_0, Q5_1, Q8_0) into it at construction: about twice the matrix
  // product speed. The model's pages of those matrices are then handed back
  // to the kernel (a tied embedding's lookups read the packed output head),
  // so a memory-mapped model's weights are held about once.
  bool pack_weights = true;
};

class LlamaForward {
 public:
  // `model` and `pool` must outlive this object. Packs the weights (see
  // ForwardOptions) on the pool's threads.
  LlamaForward(const Model& model, ThreadPool* pool, ForwardOptions options = {});

  // Bytes of packed weight copies this object holds.
  size_t packed_weight_bytes() const { return packed_bytes_; }

  // Runs the batch, writing K/V into `cache` and logits into `logits`, and
  // advances each sequence's KvSequence (which may move cache rows within
  // its own blocks). Invalid input (token ids, positions beyond the block
  // tables) is an error and leaves the cache and sequences untouched.
  absl::Status Forward(const ForwardBatch& batch, PagedKvCache& cache, std::vector<float>* logits);

 private:
  // A weight matrix as MatMul reads it: the model's rows, or a packed copy.
  struct CpuMatrix {
    const Matrix* matrix = nullptr;
    const void* data = nullptr;
    kernels::WeightLayout layout = kernels::WeightLayout::kRows;
  };
  struct CpuLayer {
    CpuMatrix wq, wk, wv, wo, w_gate, w_up, w_down;
  };

  CpuMatrix Prepare(const Matrix& m);
  absl::Status Validate(const ForwardBatch& batch, const PagedKvCache& cache) const;
  void MatMul(const CpuMatrix& w, const float* x, int64_t n_tokens, float* y);
  void Attention(const ForwardBatch& batch, PagedKvCache& cache, int64_t layer);
  // Each sequence's KV policy hook after the layer's attention.
  void RunPolicies(const ForwardBatch& batch, PagedKvCache& cache, int64_t layer);

  const Model& model_;
  ThreadPool* pool_;
  ForwardOptions options_;
  std::vector<std::unique_ptr<uint8_t[]>> packed_;  // what the CpuMatrix views point into
  size_t packed_bytes_ = 0;
  std::vector<CpuLayer> layers_;
  CpuMatrix output_;
  const void* packed_embedding_ = nullptr;  // a tied embedding's packed copy, for lookups
  std::vector<float> rope_inv_freq_;
  std::vector<int64_t> unit_end_;  // per sequence, in Attention
  std::vector<const SequenceInput*> policy_seqs_;  // in RunPolicies
  std::vector<int64_t> token_positions_;  // per batch token
  std::vector<float> x_, xn_, q_, k_, v_, attn_, gate_, up_;
  std::vector<uint8_t> matmul_scratch_;
  std::vector<KvScratch> kv_scratch_;
};

}  // namespace morphserve::engine

#endif  // MORPHSERVE_ENGINE_MODEL_LLAMA_FORWARD_H_
