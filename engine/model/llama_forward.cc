#include "engine/model/llama_forward.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>

#include "common/strings.h"
#include "kernels/cpu/dequantize.h"
#include "kernels/cpu/elementwise.h"
#include "kernels/cpu/matmul.h"
#include "kernels/cpu/paged_attention.h"

namespace morphserve::engine {
namespace {

void Resize(std::vector<float>& v, size_t n) {
  if (v.size() < n) v.resize(n);
}

size_t MatrixBytes(const Matrix& m) { return static_cast<size_t>(m.rows) * m.row_bytes; }

bool SameMatrix(const Matrix& a, const Matrix& b) {
  return a.dtype == b.dtype && a.data == b.data && a.rows == b.rows && a.cols == b.cols &&
         a.row_bytes == b.row_bytes;
}

bool Overlap(const Matrix& a, const Matrix& b) {
  const auto* a0 = static_cast<const uint8_t*>(a.data);
  const auto* b0 = static_cast<const uint8_t*>(b.data);
  return a0 < b0 + MatrixBytes(b) && b0 < a0 + MatrixBytes(a);
}

// Asks the kernel to reclaim the whole pages of [p, p + n) now. Their
// contents stay (file pages are read back, anonymous ones swapped in, if
// touched again), so this is safe on any memory; it is what keeps a
// memory-mapped model from holding its weights twice once they are packed.
// Kernels before 5.4 lack MADV_PAGEOUT and keep the pages.
void ReclaimPages(const void* p, size_t n) {
#ifdef MADV_PAGEOUT
  const auto page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const auto begin = (reinterpret_cast<uintptr_t>(p) + page - 1) / page * page;
  const auto end = (reinterpret_cast<uintptr_t>(p) + n) / page * page;
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_PAGEOUT);
#else
  (void)p;
  (void)n;
#endif
}

}  // namespace

LlamaForward::LlamaForward(const Model& model, ThreadPool* pool, ForwardOptions options)
    : model_(model),
      pool_(pool),
      options_(options),
      rope_inv_freq_(RopeInverseFrequencies(model.config)) {
  for (const LayerWeights& l : model.weights.layers) {
    layers_.push_back({Prepare(l.wq), Prepare(l.wk), Prepare(l.wv), Prepare(l.wo),
                       Prepare(l.w_gate), Prepare(l.w_up), Prepare(l.w_down)});
  }
  output_ = Prepare(model.weights.output);
  // A tied embedding is looked up in the output head's packed copy.
  if (output_.layout == kernels::WeightLayout::kPacked &&
      SameMatrix(model.weights.output, model.weights.token_embedding)) {
    packed_embedding_ = output_.data;
  }
}

LlamaForward::CpuMatrix LlamaForward::Prepare(const Matrix& m) {
  if (options_.reference_kernels || !options_.pack_weights || !kernels::CanPackWeights(m.dtype)) {
    return {&m, m.data, kernels::WeightLayout::kRows};
  }
  const size_t bytes = kernels::PackedWeightBytes(m.dtype, m.rows, m.cols);
  auto& packed = packed_.emplace_back(std::make_unique_for_overwrite<uint8_t[]>(bytes));
  kernels::PackWeights(m.dtype, m.data, m.row_bytes, m.rows, m.cols, packed.get(), pool_);
  packed_bytes_ += bytes;
  // Only the packed copy is read from now on: a tied embedding's lookups
  // read it too (the constructor sees to that). Pages shared with the
  // embedding in any other way are left alone.
  const Matrix& embedding = model_.weights.token_embedding;
  if (SameMatrix(m, embedding) || !Overlap(m, embedding)) ReclaimPages(m.data, MatrixBytes(m));
  return {&m, packed.get(), kernels::WeightLayout::kPacked};
}

absl::Status ValidateForwardBatch(const ModelConfig& c, const KvCacheShape& s,
                                  const ForwardBatch& batch) {
  if (s.num_layers != c.num_layers || s.num_kv_heads != c.num_kv_heads ||
      s.head_dim != c.head_dim) {
    return absl::InvalidArgumentError("KV cache shape does not match the model");
  }
  for (int32_t t : batch.tokens) {
    if (t < 0 || t >= c.vocab_size) {
      return absl::InvalidArgumentError(
          StrCat("token id ", t, " is outside the vocabulary [0, ", c.vocab_size, ")"));
    }
  }
  int64_t covered = 0;
  for (const SequenceInput& seq : batch.sequences) {
    if (seq.num_tokens <= 0 || seq.token_offset != covered || seq.start_position < 0) {
      return absl::InvalidArgumentError("sequences must cover the batch tokens in order");
    }
    covered += seq.num_tokens;
    const int64_t end = seq.start_position + seq.num_tokens;
    int64_t slots = end;
    if (seq.kv != nullptr) {
      if (seq.start_position != seq.kv->num_tokens()) {
        return absl::InvalidArgumentError(StrCat("start position ", seq.start_position,
                                                 " is not the sequence's next position ",
                                                 seq.kv->num_tokens()));
      }
      if (absl::Status st = seq.kv->CheckStep(seq.num_tokens); !st.ok()) return st;
      slots = seq.kv->SlotsNeeded(seq.num_tokens);
    }
    if (end > c.context_length) {
      return absl::OutOfRangeError(StrCat("position ", end - 1,
                                                " is beyond the model's context length ",
                                                c.context_length));
    }
    const int64_t blocks_needed = (slots + s.block_size - 1) / s.block_size;
    if (static_cast<int64_t>(seq.block_table.size()) < blocks_needed) {
      return absl::InvalidArgumentError(StrCat("block table holds ", seq.block_table.size(),
                                                     " blocks, ", blocks_needed, " needed"));
    }
    for (int64_t b = 0; b < blocks_needed; ++b) {
      if (seq.block_table[b] < 0 || seq.block_table[b] >= s.num_blocks) {
        return absl::InvalidArgumentError(
            StrCat("block id ", seq.block_table[b], " is outside the pool"));
      }
    }
  }
  if (covered != static_cast<int64_t>(batch.tokens.size())) {
    return absl::InvalidArgumentError("sequences must cover the batch tokens in order");
  }
  return absl::OkStatus();
}

absl::Status LlamaForward::Validate(const ForwardBatch& batch, const PagedKvCache& cache) const {
  if (model_.config.head_dim > kernels::kMaxHeadDim) {
    return absl::InvalidArgumentError(
        StrCat("head_dim ", model_.config.head_dim, " is above ", kernels::kMaxHeadDim));
  }
  return ValidateForwardBatch(model_.config, cache.shape(), batch);
}

void LlamaForward::MatMul(const CpuMatrix& cm, const float* x, int64_t n_tokens, float* y) {
  const Matrix& w = *cm.matrix;
  const kernels::MatMulArgs args{w.dtype, cm.data, w.row_bytes, w.rows, w.cols,   x,
                                 w.cols,  n_tokens, y,          w.rows, cm.layout};
  if (options_.reference_kernels) {
    kernels::MatMulReference(args);
    return;
  }
  const size_t need = kernels::MatMulScratchBytes(w.dtype, w.cols, n_tokens);
  if (matmul_scratch_.size() < need) matmul_scratch_.resize(need);
  kernels::MatMul(args, matmul_scratch_.data(), pool_);
}

void LlamaForward::Attention(const ForwardBatch& batch, PagedKvCache& cache, int64_t layer) {
  const ModelConfig& c = model_.config;
  const int64_t bs = cache.shape().block_size;
  const int64_t hd = c.head_dim;
  // Write this step's keys and values into their slots first, so that each
  // token attends to itself and to earlier tokens of the same chunk.
  float* kc = cache.keys(layer);
  float* vc = cache.values(layer);
  for (const SequenceInput& seq : batch.sequences) {
    for (int64_t i = 0; i < seq.num_tokens; ++i) {
      const int64_t t = seq.token_offset + i;
      for (int64_t h = 0; h < c.num_kv_heads; ++h) {
        const int64_t slot =
            seq.kv != nullptr ? seq.kv->WriteSlot(layer, h, i) : seq.start_position + i;
        const int64_t at = cache.Index(seq.block_table[slot / bs], h, slot % bs);
        std::memcpy(kc + at, &k_[t * c.kv_dim() + h * hd], hd * sizeof(float));
        std::memcpy(vc + at, &v_[t * c.kv_dim() + h * hd], hd * sizeof(float));
      }
    }
  }
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  // Everything the workers need sits in one struct, so the task captures one
  // pointer and std::function stores it without allocating.
  struct Task {
    kernels::PagedAttentionArgs args;
    std::span<const SequenceInput> seqs;
    const int64_t* unit_end;  // per sequence: its units end here
    const float* q;
    float* out;
    int64_t q_dim;
  } task;
  task.args.k_cache = kc;
  task.args.v_cache = vc;
  task.args.block_size = bs;
  task.args.num_heads = c.num_heads;
  task.args.num_kv_heads = c.num_kv_heads;
  task.args.head_dim = hd;
  task.args.scale = scale;
  task.seqs = batch.sequences;
  task.q = q_.data();
  task.out = attn_.data();
  task.q_dim = c.q_dim();
  // One unit per (sequence, token, KV head), all sequences in one parallel
  // loop: the group's query heads share each key, and a decode step of many
  // short sequences is one dispatch, not one per sequence.
  unit_end_.resize(batch.sequences.size());
  int64_t units = 0;
  for (size_t s = 0; s < batch.sequences.size(); ++s) {
    units += batch.sequences[s].num_tokens * c.num_kv_heads;
    unit_end_[s] = units;
  }
  task.unit_end = unit_end_.data();
  const std::function<void(int64_t, int64_t)> run = [&task](int64_t begin, int64_t end) {
    kernels::PagedAttentionArgs local = task.args;
    const int64_t kv_heads = local.num_kv_heads;
    const int64_t group_dim = local.num_heads / kv_heads * local.head_dim;
    const int64_t* ends = task.unit_end;
    size_t s = static_cast<size_t>(std::upper_bound(ends, ends + task.seqs.size(), begin) - ends);
    for (int64_t u = begin; u < end; ++u) {
      while (u >= ends[s]) ++s;
      const SequenceInput& seq = task.seqs[s];
      const int64_t local_unit = u - (ends[s] - seq.num_tokens * kv_heads);
      const int64_t i = local_unit / kv_heads;
      const int64_t g = local_unit % kv_heads;
      const int64_t t = seq.token_offset + i;
      local.block_table = seq.block_table.data();
      local.context_len = seq.kv != nullptr ? seq.kv->ContextSlots(i) : seq.start_position + i + 1;
      kernels::PagedAttentionGroup(local, task.q + t * task.q_dim + g * group_dim, g,
                                   task.out + t * task.q_dim + g * group_dim);
    }
  };
  pool_->ParallelFor(units, 1, run);
  RunPolicies(batch, cache, layer);
}

void LlamaForward::RunPolicies(const ForwardBatch& batch, PagedKvCache& cache, int64_t layer) {
  // Policies run after every sequence has attended: each touches only its
  // own KvSequence and blocks, which no other sequence reads.
  const int64_t q_dim = model_.config.q_dim();
  const auto run = [&](const SequenceInput& seq, ThreadPool* pool,
                       std::vector<KvScratch>& scratch) {
    seq.kv->AfterAttention(layer, q_.data() + seq.token_offset * q_dim, q_dim, seq.num_tokens,
                           seq.prompt_pending, cache, seq.block_table, pool, scratch);
  };
  // Prompt chunks (the heavy hooks: H2O's and SnapKV's rows for every prompt
  // token) split their heads and slots over the pool.
  policy_seqs_.clear();
  for (const SequenceInput& seq : batch.sequences) {
    if (seq.kv == nullptr) continue;
    if (seq.num_tokens > 1) {
      run(seq, pool_, kv_scratch_);
    } else {
      policy_seqs_.push_back(&seq);
    }
  }
  if (static_cast<int64_t>(policy_seqs_.size()) < pool_->num_threads()) {
    // Few decodes: each hook splits its own heads and slots over the pool.
    for (const SequenceInput* seq : policy_seqs_) run(*seq, pool_, kv_scratch_);
    return;
  }
  // Many decodes: one dispatch for all of them, each hook on one thread with
  // that thread's scratch (one token's worth), instead of three small
  // dispatches per sequence and layer.
  pool_->ParallelFor(static_cast<int64_t>(policy_seqs_.size()), 1,
                     [&](int64_t begin, int64_t end) {
                       thread_local std::vector<KvScratch> scratch;
                       for (int64_t i = begin; i < end; ++i) run(*policy_seqs_[i], nullptr, scratch);
                     });
}

absl::Status LlamaForward::Forward(const ForwardBatch& batch, PagedKvCache& cache,
                                   std::vector<float>* logits) {
  if (absl::Status s = Validate(batch, cache); !s.ok()) return s;
  const ModelConfig& c = model_.config;
  const LlamaWeights& w = model_.weights;
  const int64_t n = static_cast<int64_t>(batch.tokens.size());
  const int64_t hidden = c.hidden_size;
  Resize(x_, n * hidden);
  Resize(xn_, n * hidden);
  Resize(q_, n * c.q_dim());
  Resize(k_, n * c.kv_dim());
  Resize(v_, n * c.kv_dim());
  Resize(attn_, n * c.q_dim());
  Resize(gate_, n * c.intermediate_size);
  Resize(up_, n * c.intermediate_size);
  token_positions_.resize(n);
  for (const SequenceInput& seq : batch.sequences) {
    for (int64_t i = 0; i < seq.num_tokens; ++i) {
      token_positions_[seq.token_offset + i] = seq.start_position + i;
    }
  }

  for (int64_t t = 0; t < n; ++t) {
    if (packed_embedding_ != nullptr) {
      kernels::DequantizePackedRow(w.token_embedding.dtype, packed_embedding_, hidden,
                                   batch.tokens[t], &x_[t * hidden]);
    } else {
      kernels::DequantizeRow(w.token_embedding.dtype, w.token_embedding.Row(batch.tokens[t]),
                             &x_[t * hidden], hidden);
    }
  }

  for (int64_t layer = 0; layer < c.num_layers; ++layer) {
    const LayerWeights& l = w.layers[layer];
    const CpuLayer& cl = layers_[layer];
    for (int64_t t = 0; t < n; ++t) {
      kernels::RmsNorm(&x_[t * hidden], l.attn_norm, c.rms_norm_eps, hidden, &xn_[t * hidden]);
    }
    MatMul(cl.wq, xn_.data(), n, q_.data());
    MatMul(cl.wk, xn_.data(), n, k_.data());
    MatMul(cl.wv, xn_.data(), n, v_.data());
    for (int64_t t = 0; t < n; ++t) {
      float* qt = &q_[t * c.q_dim()];
      float* kt = &k_[t * c.kv_dim()];
      if (l.bq != nullptr) {
        kernels::Add(qt, l.bq, c.q_dim());
        kernels::Add(kt, l.bk, c.kv_dim());
        kernels::Add(&v_[t * c.kv_dim()], l.bv, c.kv_dim());
      }
      kernels::ApplyRope(qt, c.num_heads, c.head_dim, c.rope_dim, token_positions_[t],
                         rope_inv_freq_.data(), c.rope_style);
      kernels::ApplyRope(kt, c.num_kv_heads, c.head_dim, c.rope_dim, token_positions_[t],
                         rope_inv_freq_.data(), c.rope_style);
    }
    Attention(batch, cache, layer);
    MatMul(cl.wo, attn_.data(), n, xn_.data());
    for (int64_t t = 0; t < n; ++t) {
      kernels::AddRmsNorm(&x_[t * hidden], &xn_[t * hidden], l.ffn_norm, c.rms_norm_eps, hidden,
                          &xn_[t * hidden]);
    }
    MatMul(cl.w_gate, xn_.data(), n, gate_.data());
    MatMul(cl.w_up, xn_.data(), n, up_.data());
    kernels::SiluMul(gate_.data(), up_.data(), n * c.intermediate_size, gate_.data());
    MatMul(cl.w_down, gate_.data(), n, xn_.data());
    for (int64_t t = 0; t < n; ++t) kernels::Add(&x_[t * hidden], &xn_[t * hidden], hidden);
  }

  for (const SequenceInput& seq : batch.sequences) {
    if (seq.kv != nullptr) seq.kv->EndStep(seq.num_tokens, seq.prompt_pending);
  }

  // Final norm only for the rows whose logits are wanted.
  int64_t rows = 0;
  if (batch.all_logits) {
    for (int64_t t = 0; t < n; ++t) {
      kernels::RmsNorm(&x_[t * hidden], w.output_norm, c.rms_norm_eps, hidden, &xn_[t * hidden]);
    }
    rows = n;
  } else {
    for (const SequenceInput& seq : batch.sequences) {
      const int64_t last = seq.token_offset + seq.num_tokens - 1;
      kernels::RmsNorm(&x_[last * hidden], w.output_norm, c.rms_norm_eps, hidden,
                       &xn_[rows * hidden]);
      ++rows;
    }
  }
  logits->resize(static_cast<size_t>(rows * c.vocab_size));
  MatMul(output_, xn_.data(), rows, logits->data());
  return absl::OkStatus();
}

}  // namespace morphserve::engine
