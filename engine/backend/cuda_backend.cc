#include "engine/backend/cuda_backend.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <optional>
#include <span>

#include <spdlog/spdlog.h>

#include "common/fp16.h"
#include "common/status.h"
#include "common/strings.h"
#include "common/thread_pool.h"
#include "kernels/cpu/dequantize.h"
#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/elementwise.h"
#include "kernels/cuda/embedding.h"
#include "kernels/cuda/paged_attention.h"
#include "kernels/cuda/paged_kv_write.h"
#include "kernels/cuda/prefill_attention.h"

namespace morphserve::engine {
namespace {

namespace kc = kernels::cuda;
using kc::DeviceBuffer;

constexpr int64_t kBf16Bytes = 2;
// Weights are converted to bf16 on the host this many bytes at a time.
constexpr int64_t kUploadChunkBytes = int64_t{64} << 20;

template <typename T>
T* At(const DeviceBuffer& b, int64_t offset = 0) {
  return b.as<T>() + offset;
}

__nv_bfloat16* Bf16(const DeviceBuffer& b, int64_t offset = 0) {
  return At<__nv_bfloat16>(b, offset);
}

// A device copy of `n` f32 values at `host`; empty for null.
absl::StatusOr<DeviceBuffer> UploadF32(const float* host, int64_t n) {
  if (host == nullptr) return DeviceBuffer();
  return DeviceBuffer::FromHost(std::span<const float>(host, static_cast<size_t>(n)));
}

// The rows of `parts`, one after another, as one dense bf16 matrix on the
// device; quantized rows are dequantized first.
absl::StatusOr<DeviceBuffer> UploadMatrices(std::initializer_list<const Matrix*> parts,
                                            ThreadPool& pool) {
  const int64_t cols = (*parts.begin())->cols;
  int64_t rows = 0;
  for (const Matrix* m : parts) {
    if (m->cols != cols) return absl::InternalError("fused matrices differ in width");
    rows += m->rows;
  }
  ASSIGN_OR_RETURN(DeviceBuffer device, DeviceBuffer::Allocate(rows * cols * kBf16Bytes));
  const int64_t chunk_rows = std::max<int64_t>(1, kUploadChunkBytes / (cols * kBf16Bytes));
  std::vector<uint16_t> staged(static_cast<size_t>(std::min(rows, chunk_rows) * cols));
  int64_t done = 0;
  for (const Matrix* m : parts) {
    for (int64_t r0 = 0; r0 < m->rows; r0 += chunk_rows) {
      const int64_t count = std::min(chunk_rows, m->rows - r0);
      pool.ParallelFor(count, 16, [&](int64_t begin, int64_t end) {
        std::vector<float> row(static_cast<size_t>(cols));
        for (int64_t r = begin; r < end; ++r) {
          kernels::DequantizeRow(m->dtype, m->Row(r0 + r), row.data(), cols);
          for (int64_t c = 0; c < cols; ++c) staged[r * cols + c] = FloatToBF16(row[c]);
        }
      });
      RETURN_IF_CUDA_ERROR(cudaMemcpy(Bf16(device, done * cols), staged.data(),
                                      count * cols * kBf16Bytes, cudaMemcpyHostToDevice));
      done += count;
    }
  }
  return device;
}

}  // namespace

absl::Status CudaDeviceVisible() {
  int count = 0;
  const cudaError_t error = cudaGetDeviceCount(&count);
  if (error != cudaSuccess) {
    // Clear the sticky "no device" error so later calls start clean.
    cudaGetLastError();
    return absl::FailedPreconditionError(
        StrCat("--device cuda: no usable GPU (", cudaGetErrorString(error), ")"));
  }
  if (count == 0) return absl::FailedPreconditionError("--device cuda: no GPU is visible");
  return absl::OkStatus();
}

void CudaBackend::PinnedDeleter::operator()(void* p) const { cudaFreeHost(p); }

CudaBackend::CudaBackend(const Model& model, kc::Cublas cublas)
    : model_(model), cublas_(std::move(cublas)) {}

CudaBackend::~CudaBackend() {
  if (stream_ != nullptr) {
    cudaStreamSynchronize(stream_);
    cudaStreamDestroy(stream_);
  }
}

absl::StatusOr<std::unique_ptr<CudaBackend>> CudaBackend::Create(
    const Model& model, const CudaBackendOptions& options) {
  const ModelConfig& c = model.config;
  if (c.head_dim != 64 && c.head_dim != 128 && c.head_dim != 256) {
    return absl::InvalidArgumentError(
        StrCat("--device cuda: head_dim ", c.head_dim, " is not supported (64, 128 or 256)"));
  }
  if (c.vocab_size > kc::kMaxSamplingVocab) {
    return absl::InvalidArgumentError(StrCat("--device cuda: a vocabulary of ", c.vocab_size,
                                             " is above the device sampler's ",
                                             kc::kMaxSamplingVocab));
  }
  if (!(options.gpu_memory_utilization > 0.0 && options.gpu_memory_utilization <= 1.0)) {
    return absl::InvalidArgumentError("--gpu-memory-utilization must be in (0, 1]");
  }
  RETURN_IF_ERROR(CudaDeviceVisible());
  ASSIGN_OR_RETURN(kc::Cublas cublas, kc::Cublas::Create());
  std::unique_ptr<CudaBackend> backend(new CudaBackend(model, std::move(cublas)));
  RETURN_IF_CUDA_ERROR(cudaStreamCreateWithFlags(&backend->stream_, cudaStreamNonBlocking));
  RETURN_IF_ERROR(backend->UploadWeights());
  backend->shape_ = {c.num_layers, c.num_kv_heads, c.head_dim, options.block_size, 0};
  backend->shape_.element_bytes = kBf16Bytes;
  // The longest context a sequence can reach sets the attention's launch
  // shape and scratch; the pool may cap it further below.
  backend->max_context_ = c.context_length;
  backend->graph_max_batch_ = std::max<int64_t>(options.cuda_graph_max_batch, 0);
  RETURN_IF_ERROR(backend->Reserve(options.max_step_tokens, options.max_step_sequences));
  RETURN_IF_ERROR(backend->AllocatePool(options));
  return backend;
}

absl::Status CudaBackend::UploadWeights() {
  const ModelConfig& c = model_.config;
  const LlamaWeights& w = model_.weights;
  ThreadPool pool(ThreadPool::DefaultThreads());
  ASSIGN_OR_RETURN(embedding_, UploadMatrices({&w.token_embedding}, pool));
  const bool tied =
      w.output.data == w.token_embedding.data && w.output.dtype == w.token_embedding.dtype;
  if (!tied) {
    ASSIGN_OR_RETURN(output_, UploadMatrices({&w.output}, pool));
  }
  ASSIGN_OR_RETURN(output_norm_, UploadF32(w.output_norm, c.hidden_size));
  const std::vector<float> inv_freq = RopeInverseFrequencies(c);
  ASSIGN_OR_RETURN(rope_inv_freq_, DeviceBuffer::FromHost(std::span<const float>(inv_freq)));
  layers_.resize(c.num_layers);
  for (int64_t i = 0; i < c.num_layers; ++i) {
    const LayerWeights& l = w.layers[i];
    Layer& d = layers_[i];
    ASSIGN_OR_RETURN(d.attn_norm, UploadF32(l.attn_norm, c.hidden_size));
    ASSIGN_OR_RETURN(d.ffn_norm, UploadF32(l.ffn_norm, c.hidden_size));
    ASSIGN_OR_RETURN(d.qkv, UploadMatrices({&l.wq, &l.wk, &l.wv}, pool));
    if (l.bq != nullptr) {
      std::vector<float> bias(l.bq, l.bq + c.q_dim());
      bias.insert(bias.end(), l.bk, l.bk + c.kv_dim());
      bias.insert(bias.end(), l.bv, l.bv + c.kv_dim());
      ASSIGN_OR_RETURN(d.qkv_bias, DeviceBuffer::FromHost(std::span<const float>(bias)));
    }
    ASSIGN_OR_RETURN(d.wo, UploadMatrices({&l.wo}, pool));
    ASSIGN_OR_RETURN(d.gate_up, UploadMatrices({&l.w_gate, &l.w_up}, pool));
    ASSIGN_OR_RETURN(d.down, UploadMatrices({&l.w_down}, pool));
  }
  return absl::OkStatus();
}

absl::Status CudaBackend::AllocatePool(const CudaBackendOptions& options) {
  const int64_t per_block = shape_.BytesPerBlock();
  int64_t blocks = options.num_blocks;
  size_t free_bytes = 0;
  size_t total_bytes = 0;
  RETURN_IF_CUDA_ERROR(cudaMemGetInfo(&free_bytes, &total_bytes));
  if (blocks == 0) {
    // What the process may still take under the utilization cap, counting
    // everything already resident on the GPU (other processes included).
    const double used = static_cast<double>(total_bytes - free_bytes);
    const double budget =
        options.gpu_memory_utilization * static_cast<double>(total_bytes) - used;
    blocks = budget > 0 ? static_cast<int64_t>(budget) / per_block : 0;
    if (blocks < 1) {
      return absl::ResourceExhaustedError(
          StrCat("--gpu-memory-utilization ", options.gpu_memory_utilization, " of ",
                 total_bytes >> 20, " MiB leaves no room for a KV block of ", per_block,
                 " bytes after ", static_cast<int64_t>(used) >> 20,
                 " MiB of weights and working memory"));
    }
  }
  blocks = std::min<int64_t>(blocks, INT32_MAX / std::max<int64_t>(1, shape_.block_size));
  const int64_t half = blocks * per_block / 2;  // K or V of every layer
  if (2 * half > static_cast<int64_t>(free_bytes)) {
    return absl::ResourceExhaustedError(StrCat("a KV pool of ", blocks, " blocks needs ",
                                               (2 * half) >> 20, " MiB; the GPU has ",
                                               free_bytes >> 20, " MiB free"));
  }
  ASSIGN_OR_RETURN(k_cache_, DeviceBuffer::Allocate(half));
  ASSIGN_OR_RETURN(v_cache_, DeviceBuffer::Allocate(half));
  // Zeros, once: a slot is read only after it is written, but a pool with
  // no stray NaN keeps any mistake visible as a wrong number, not a NaN.
  RETURN_IF_ERROR(k_cache_.Fill(0));
  RETURN_IF_ERROR(v_cache_.Fill(0));
  shape_.num_blocks = blocks;
  spdlog::info("CUDA KV pool: {} blocks of {} tokens ({} MiB)", blocks, shape_.block_size,
               (2 * half) >> 20);
  return absl::OkStatus();
}

absl::Status CudaBackend::Reserve(int64_t tokens, int64_t rows) {
  const ModelConfig& c = model_.config;
  if (tokens > capacity_tokens_ || rows > capacity_rows_) BuffersMoved();
  if (tokens > capacity_tokens_) {
    const int64_t qkv_dim = c.q_dim() + 2 * c.kv_dim();
    ASSIGN_OR_RETURN(x_, DeviceBuffer::Allocate(tokens * c.hidden_size * sizeof(float)));
    ASSIGN_OR_RETURN(delta_, DeviceBuffer::Allocate(tokens * c.hidden_size * sizeof(float)));
    ASSIGN_OR_RETURN(xn_, DeviceBuffer::Allocate(tokens * c.hidden_size * kBf16Bytes));
    ASSIGN_OR_RETURN(qkv_, DeviceBuffer::Allocate(tokens * qkv_dim * kBf16Bytes));
    ASSIGN_OR_RETURN(attn_, DeviceBuffer::Allocate(tokens * c.q_dim() * kBf16Bytes));
    ASSIGN_OR_RETURN(gate_up_,
                     DeviceBuffer::Allocate(tokens * 2 * c.intermediate_size * kBf16Bytes));
    ASSIGN_OR_RETURN(act_, DeviceBuffer::Allocate(tokens * c.intermediate_size * kBf16Bytes));
    capacity_tokens_ = tokens;
  }
  if (rows > capacity_rows_) {
    const size_t sampled_words = static_cast<size_t>((2 + 2 * kMaxLogprobs) * rows);
    ASSIGN_OR_RETURN(sample_rows_,
                     DeviceBuffer::Allocate(rows * sizeof(kc::SamplingRowParams)));
    ASSIGN_OR_RETURN(sampled_, DeviceBuffer::Allocate(sampled_words * sizeof(int32_t)));
    void* rows_host = nullptr;
    RETURN_IF_CUDA_ERROR(cudaMallocHost(&rows_host, rows * sizeof(kc::SamplingRowParams)));
    sample_host_.reset(rows_host);
    void* sampled_host = nullptr;
    RETURN_IF_CUDA_ERROR(cudaMallocHost(&sampled_host, sampled_words * sizeof(int32_t)));
    sampled_host_.reset(sampled_host);
    ASSIGN_OR_RETURN(last_, DeviceBuffer::Allocate(rows * c.hidden_size * kBf16Bytes));
    ASSIGN_OR_RETURN(logits_, DeviceBuffer::Allocate(rows * c.vocab_size * sizeof(float)));
    void* pinned = nullptr;
    RETURN_IF_CUDA_ERROR(cudaMallocHost(&pinned, rows * c.vocab_size * sizeof(float)));
    logits_host_.reset(pinned);
    capacity_rows_ = rows;
  }
  // Attention rows run in groups whose split-context scratch is sized once.
  if (attention_rows_ == 0) {
    attention_rows_ = std::max<int64_t>(rows, 1);
    ASSIGN_OR_RETURN(attn_scratch_,
                     DeviceBuffer::Allocate(kc::PagedAttentionScratchBytes(
                         attention_rows_, c.num_heads, c.head_dim, max_context_)));
  }
  // Metadata for a step of decodes over contexts of up to 4096 slots; a
  // step that needs more grows it.
  return ReserveMetadata(4 * tokens + rows * (1 + c.num_layers * c.num_kv_heads) +
                         rows * (4096 / shape_.block_size));
}

absl::Status CudaBackend::ReserveMetadata(size_t entries) {
  if (entries <= meta_capacity_) return absl::OkStatus();
  BuffersMoved();
  ASSIGN_OR_RETURN(meta_, DeviceBuffer::Allocate(entries * sizeof(int32_t)));
  void* pinned = nullptr;
  RETURN_IF_CUDA_ERROR(cudaMallocHost(&pinned, entries * sizeof(int32_t)));
  meta_host_.reset(pinned);
  meta_capacity_ = entries;
  return absl::OkStatus();
}

void CudaBackend::LayOutMetadata(const ForwardBatch& batch, int64_t rows) {
  const ModelConfig& c = model_.config;
  const int64_t n = static_cast<int64_t>(batch.tokens.size());
  // Single-token sequences (decodes) go first on the device, one attention
  // row each; the prompt chunks follow, in batch order.
  num_decode_ = 0;
  prefill_max_len_ = 0;
  table_stride_ = 1;  // block-table columns: the longest table this step reads
  for (const SequenceInput& seq : batch.sequences) {
    if (seq.num_tokens == 1) {
      ++num_decode_;
    } else {
      prefill_max_len_ = std::max(prefill_max_len_, seq.num_tokens);
    }
    const int64_t context = seq.kv != nullptr ? seq.kv->ContextSlots(seq.num_tokens - 1)
                                              : seq.start_position + seq.num_tokens;
    table_stride_ = std::max(table_stride_, (context + shape_.block_size - 1) / shape_.block_size);
  }
  num_prefill_ = static_cast<int64_t>(batch.sequences.size()) - num_decode_;
  // A decode step that may run as a graph rounds its block-table width up
  // to a power of two, so that one graph serves while contexts grow.
  if (num_prefill_ == 0 && num_decode_ <= graph_max_batch_) {
    table_stride_ = static_cast<int64_t>(std::bit_ceil(static_cast<uint64_t>(table_stride_)));
  }
  MetaLayout& at = meta_at_;
  at.tokens = 0;
  at.positions = at.tokens + n;
  at.rows = at.positions + n;
  at.slots = at.rows + rows;
  at.decode_tables = at.slots + c.num_layers * n * c.num_kv_heads;
  at.decode_context = at.decode_tables + num_decode_ * table_stride_;
  at.prefill_tables = at.decode_context + num_decode_;
  at.prefill_offsets = at.prefill_tables + num_prefill_ * table_stride_;
  at.prefill_starts = at.prefill_offsets + num_prefill_ + 1;
  at.policy = at.prefill_starts + num_prefill_;
  at.total = at.policy;  // PlanPolicies adds the slabs'
  // Each sequence's first device row.
  first_rows_.clear();
  int64_t decode = 0;
  int64_t prefill_row = num_decode_;
  for (const SequenceInput& seq : batch.sequences) {
    if (seq.num_tokens == 1) {
      first_rows_.push_back(decode++);
    } else {
      first_rows_.push_back(prefill_row);
      prefill_row += seq.num_tokens;
    }
  }
}

void CudaBackend::StageMetadata(const ForwardBatch& batch) {
  const ModelConfig& c = model_.config;
  const int64_t n = static_cast<int64_t>(batch.tokens.size());
  const int64_t bs = shape_.block_size;
  const int64_t kv_heads = c.num_kv_heads;
  const MetaLayout& at = meta_at_;
  int32_t* m = static_cast<int32_t*>(meta_host_.get());
  const auto copy_table = [&](std::span<const int32_t> table, int32_t* out) {
    const int64_t len = std::min<int64_t>(static_cast<int64_t>(table.size()), table_stride_);
    std::copy_n(table.begin(), len, out);
    std::fill(out + len, out + table_stride_, 0);
  };
  int64_t decode = 0;
  int64_t prefill = 0;
  int64_t prefill_row = num_decode_;  // device row of the next prompt chunk
  int64_t logit_row = 0;
  m[at.prefill_offsets] = 0;
  for (const SequenceInput& seq : batch.sequences) {
    int64_t first_row;  // the device row of the sequence's first token
    if (seq.num_tokens == 1) {
      first_row = decode;
      copy_table(seq.block_table, m + at.decode_tables + decode * table_stride_);
      m[at.decode_context + decode] = static_cast<int32_t>(
          seq.kv != nullptr ? seq.kv->ContextSlots(0) : seq.start_position + 1);
      ++decode;
    } else {
      first_row = prefill_row;
      copy_table(seq.block_table, m + at.prefill_tables + prefill * table_stride_);
      // Prompt chunks run while slots equal positions.
      m[at.prefill_starts + prefill] = static_cast<int32_t>(seq.start_position);
      prefill_row += seq.num_tokens;
      ++prefill;
      m[at.prefill_offsets + prefill] = static_cast<int32_t>(prefill_row - num_decode_);
    }
    for (int64_t i = 0; i < seq.num_tokens; ++i) {
      const int64_t row = first_row + i;
      m[at.tokens + row] = batch.tokens[seq.token_offset + i];
      m[at.positions + row] = static_cast<int32_t>(seq.start_position + i);
      for (int64_t layer = 0; layer < c.num_layers; ++layer) {
        for (int64_t h = 0; h < kv_heads; ++h) {
          const int64_t slot =
              seq.kv != nullptr ? seq.kv->WriteSlot(layer, h, i) : seq.start_position + i;
          m[at.slots + (layer * n + row) * kv_heads + h] =
              static_cast<int32_t>(seq.block_table[slot / bs] * bs + slot % bs);
        }
      }
      if (batch.all_logits) m[at.rows + seq.token_offset + i] = static_cast<int32_t>(row);
    }
    if (!batch.all_logits) {
      m[at.rows + logit_row++] = static_cast<int32_t>(first_row + seq.num_tokens - 1);
    }
  }
  StagePolicies(m);
}

absl::Status CudaBackend::RunLayers(int64_t n) {
  const ModelConfig& c = model_.config;
  const int64_t hidden = c.hidden_size;
  const int64_t q_dim = c.q_dim();
  const int64_t kv_dim = c.kv_dim();
  const int64_t qkv_dim = q_dim + 2 * kv_dim;
  const int64_t inter = c.intermediate_size;
  const int64_t layer_values = shape_.num_blocks * shape_.ValuesPerBlock();
  const int32_t* meta = meta_.as<int32_t>();
  const auto matmul = [&](const DeviceBuffer& w, int64_t rows, int64_t cols,
                          const __nv_bfloat16* x, void* y, DType y_type) {
    return kc::MatMul({Bf16(w), rows, cols, x, cols, n, y, rows, y_type}, cublas_, stream_);
  };
  float* x = x_.as<float>();
  float* delta = delta_.as<float>();
  __nv_bfloat16* xn = Bf16(xn_);
  __nv_bfloat16* qkv = Bf16(qkv_);
  kc::PagedAttentionArgs attention;
  attention.block_table_stride = table_stride_;
  attention.max_context_len = max_context_;
  attention.block_size = shape_.block_size;
  attention.num_heads = c.num_heads;
  attention.num_kv_heads = c.num_kv_heads;
  attention.head_dim = c.head_dim;
  attention.scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
  kc::PrefillAttentionArgs prefill;
  prefill.block_tables = meta + meta_at_.prefill_tables;
  prefill.block_table_stride = table_stride_;
  prefill.query_offsets = meta + meta_at_.prefill_offsets;
  prefill.chunk_starts = meta + meta_at_.prefill_starts;
  prefill.max_query_len = prefill_max_len_;
  prefill.num_seqs = num_prefill_;
  prefill.block_size = shape_.block_size;
  prefill.num_heads = c.num_heads;
  prefill.num_kv_heads = c.num_kv_heads;
  prefill.head_dim = c.head_dim;
  prefill.scale = attention.scale;

  RETURN_IF_ERROR(kc::EmbeddingGather(Bf16(embedding_), c.vocab_size, hidden,
                                      meta + meta_at_.tokens, x, n, stream_));
  for (int64_t li = 0; li < c.num_layers; ++li) {
    const Layer& l = layers_[li];
    if (li == 0) {
      RETURN_IF_ERROR(kc::RmsNorm(x, l.attn_norm.as<float>(), c.rms_norm_eps, hidden, xn, n, stream_));
    } else {
      RETURN_IF_ERROR(kc::AddRmsNorm(x, delta, l.attn_norm.as<float>(), c.rms_norm_eps, hidden, xn,
                                     n, stream_));
    }
    RETURN_IF_ERROR(matmul(l.qkv, qkv_dim, hidden, xn, qkv, DType::kBF16));
    if (l.qkv_bias.size() > 0) {
      RETURN_IF_ERROR(kc::AddBias(qkv, l.qkv_bias.as<float>(), qkv_dim, n, qkv_dim, stream_));
    }
    const int32_t* positions = meta + meta_at_.positions;
    RETURN_IF_ERROR(kc::ApplyRope(qkv, c.num_heads, c.head_dim, c.rope_dim, positions,
                                  rope_inv_freq_.as<float>(), c.rope_style, n, qkv_dim, stream_));
    RETURN_IF_ERROR(kc::ApplyRope(qkv + q_dim, c.num_kv_heads, c.head_dim, c.rope_dim, positions,
                                  rope_inv_freq_.as<float>(), c.rope_style, n, qkv_dim, stream_));
    __nv_bfloat16* k_cache = Bf16(k_cache_, li * layer_values);
    __nv_bfloat16* v_cache = Bf16(v_cache_, li * layer_values);
    RETURN_IF_ERROR(kc::WritePagedKv(qkv + q_dim, qkv + q_dim + kv_dim, qkv_dim,
                                     meta + meta_at_.slots + li * n * c.num_kv_heads, k_cache,
                                     v_cache, shape_.num_blocks, shape_.block_size,
                                     c.num_kv_heads, c.head_dim, n, stream_));
    // Decodes: one row each, the context split over partitions. The fused
    // MorphKV slab's first scoring pass runs along, on its rings with this
    // step's queries in.
    attention.k_cache = k_cache;
    attention.v_cache = v_cache;
    std::optional<kc::MorphKvFusedStats> stats = FusedStats(li);
    const int32_t* scored_as = stats ? stats->scored_as : nullptr;
    if (fused_step_ != nullptr) RETURN_IF_ERROR(QueueSlabInputs(*fused_step_, li));
    for (int64_t r0 = 0; r0 < num_decode_; r0 += attention_rows_) {
      attention.num_seqs = std::min(attention_rows_, num_decode_ - r0);
      attention.block_tables = meta + meta_at_.decode_tables + r0 * table_stride_;
      attention.context_lens = meta + meta_at_.decode_context + r0;
      if (stats) stats->scored_as = scored_as + r0;
      RETURN_IF_ERROR(kc::PagedAttention(attention, qkv + r0 * qkv_dim, qkv_dim,
                                         Bf16(attn_, r0 * q_dim), attn_scratch_.data(), stream_,
                                         stats ? &*stats : nullptr));
    }
    // Prompt chunks: causal, tiled over their tokens.
    if (num_prefill_ > 0) {
      prefill.k_cache = k_cache;
      prefill.v_cache = v_cache;
      RETURN_IF_ERROR(kc::PrefillAttention(prefill, qkv + num_decode_ * qkv_dim, qkv_dim,
                                           Bf16(attn_, num_decode_ * q_dim), stream_));
    }
    RETURN_IF_ERROR(RunPolicies(li, k_cache, v_cache));
    RETURN_IF_ERROR(matmul(l.wo, hidden, q_dim, Bf16(attn_), delta, DType::kF32));
    RETURN_IF_ERROR(kc::AddRmsNorm(x, delta, l.ffn_norm.as<float>(), c.rms_norm_eps, hidden, xn, n,
                                   stream_));
    RETURN_IF_ERROR(matmul(l.gate_up, 2 * inter, hidden, xn, Bf16(gate_up_), DType::kBF16));
    RETURN_IF_ERROR(kc::SiluMul(Bf16(gate_up_), Bf16(gate_up_, inter), inter, Bf16(act_), n,
                                2 * inter, stream_));
    RETURN_IF_ERROR(matmul(l.down, hidden, inter, Bf16(act_), delta, DType::kF32));
  }
  return kc::AddRmsNorm(x, delta, output_norm_.as<float>(), c.rms_norm_eps, hidden, xn, n,
                        stream_);
}

absl::Status CudaBackend::PrepareStep(const ForwardBatch& batch) {
  RETURN_IF_ERROR(ValidateForwardBatch(model_.config, shape_, batch));
  for (const SequenceInput& seq : batch.sequences) {
    if (seq.kv != nullptr) RETURN_IF_ERROR(SupportsPolicy(seq.kv->config()));
  }
  const int64_t n = static_cast<int64_t>(batch.tokens.size());
  const int64_t rows = batch.all_logits ? n : static_cast<int64_t>(batch.sequences.size());
  if (n > capacity_tokens_ || rows > capacity_rows_) {
    spdlog::info("CUDA working memory grows to {} tokens, {} rows", std::max(n, capacity_tokens_),
                 std::max(rows, capacity_rows_));
  }
  RETURN_IF_ERROR(Reserve(std::max(n, capacity_tokens_), std::max(rows, capacity_rows_)));
  step_tokens_ = n;
  step_rows_ = rows;
  step_all_logits_ = batch.all_logits;
  LayOutMetadata(batch, rows);
  ASSIGN_OR_RETURN(meta_at_.total, PlanPolicies(batch, meta_at_.policy));
  RETURN_IF_ERROR(ReserveMetadata(meta_at_.total));
  StageMetadata(batch);
  return ReservePolicyScratch();
}

absl::Status CudaBackend::QueueForward() {
  const ModelConfig& c = model_.config;
  const int32_t* meta = meta_.as<int32_t>();
  RETURN_IF_CUDA_ERROR(cudaMemcpyAsync(meta_.data(), meta_host_.get(),
                                       meta_at_.total * sizeof(int32_t), cudaMemcpyHostToDevice,
                                       stream_));
  RETURN_IF_ERROR(RunLayers(step_tokens_));
  RETURN_IF_ERROR(QueueVictimsBack());
  const __nv_bfloat16* head_in = Bf16(xn_);
  if (!step_all_logits_) {
    RETURN_IF_ERROR(kc::GatherRows(Bf16(xn_), c.hidden_size, meta + meta_at_.rows, Bf16(last_),
                                   step_rows_, stream_));
    head_in = Bf16(last_);
  }
  const DeviceBuffer& head = output_.size() > 0 ? output_ : embedding_;
  return kc::MatMul({Bf16(head), c.vocab_size, c.hidden_size, head_in, c.hidden_size, step_rows_,
                     logits_.data(), c.vocab_size, DType::kF32},
                    cublas_, stream_);
}

void CudaBackend::EndStep(const ForwardBatch& batch) {
  for (const SequenceInput& seq : batch.sequences) {
    if (seq.kv != nullptr) seq.kv->EndStep(seq.num_tokens, seq.prompt_pending);
  }
  // The victims came back per evicting slab, [layer][slot][kv_head] over
  // its covered slots; each sequence's next token goes into its own.
  const ModelConfig& c = model_.config;
  const auto* host = static_cast<const int32_t*>(victims_host_.get());
  std::vector<int32_t> victims(static_cast<size_t>(c.num_layers * c.num_kv_heads));
  for (const SlabStep& step : slab_steps_) {
    if (step.evict == 0) continue;
    for (const PolicyStep& p : step.seqs) {
      if (!p.evict) continue;
      for (int64_t layer = 0; layer < c.num_layers; ++layer) {
        std::copy_n(host + (layer * step.high_water + p.slot) * c.num_kv_heads, c.num_kv_heads,
                    victims.begin() + layer * c.num_kv_heads);
      }
      p.kv->SetVictims(victims);
    }
    host += c.num_layers * step.high_water * c.num_kv_heads;
  }
}

absl::Status CudaBackend::Forward(const ForwardBatch& batch, std::vector<float>* logits) {
  logits->clear();
  if (batch.tokens.empty()) return absl::OkStatus();
  RETURN_IF_ERROR(PrepareStep(batch));
  const size_t logit_bytes =
      static_cast<size_t>(step_rows_ * model_.config.vocab_size) * sizeof(float);
  const auto queue = [&]() -> absl::Status {
    RETURN_IF_ERROR(QueueForward());
    RETURN_IF_CUDA_ERROR(cudaMemcpyAsync(logits_host_.get(), logits_.data(), logit_bytes,
                                         cudaMemcpyDeviceToHost, stream_));
    return absl::OkStatus();
  };
  RETURN_IF_ERROR(RunStep(GraphKey(/*mode=*/0), queue));
  RETURN_IF_CUDA_ERROR(cudaStreamSynchronize(stream_));
  const float* host = static_cast<const float*>(logits_host_.get());
  logits->assign(host, host + logit_bytes / sizeof(float));
  EndStep(batch);
  return absl::OkStatus();
}

}  // namespace morphserve::engine
