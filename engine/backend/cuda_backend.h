// The forward pass on one NVIDIA GPU: bf16 weights (GGUF quantized types
// dequantized at load), a bf16 paged KV pool allocated once after them,
// cuBLAS for every projection and MLP product over the step's tokens, and
// the kernels of kernels/cuda for the rest. The KV policies' bookkeeping
// (KvSequence) stays on the host; this backend runs the sequences whose
// policy it supports (SupportsPolicy) and refuses the others.
//
// Each step uploads its metadata (token ids, positions, slot mapping, block
// tables) in one copy, queues every kernel on the backend's stream, and
// waits once, for the logits. Device memory is allocated at creation and
// grows only when a step is larger than any before.
#ifndef MORPHSERVE_ENGINE_BACKEND_CUDA_BACKEND_H_
#define MORPHSERVE_ENGINE_BACKEND_CUDA_BACKEND_H_

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <set>
#include <span>
#include <string_view>
#include <type_traits>
#include <unordered_set>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/backend/forward_backend.h"
#include "engine/kv/kv_sequence.h"
#include "engine/model/model.h"
#include "kernels/cuda/device_buffer.h"
#include "kernels/cuda/kv_scoring.h"
#include "kernels/cuda/matmul.h"
#include "kernels/cuda/sampling.h"

namespace morphserve::engine {

// OK when the CUDA runtime sees a device; FAILED_PRECONDITION saying why not.
absl::Status CudaDeviceVisible();

struct CudaBackendOptions {
  int64_t block_size = 16;
  // 0: as many blocks as gpu_memory_utilization leaves after the weights and
  // the step's working memory.
  int64_t num_blocks = 0;
  double gpu_memory_utilization = 0.9;
  // The step size the working memory is first sized for (a larger step
  // grows it once): tokens, and sequences (rows of logits).
  int64_t max_step_tokens = 2048;
  int64_t max_step_sequences = 256;
  // Decode-only steps of up to this many sequences run as CUDA graphs: a
  // step shape seen a second time is captured, and replayed whenever it
  // recurs (0: every step is launched kernel by kernel).
  int64_t cuda_graph_max_batch = 64;
};

class CudaBackend final : public ForwardBackend {
 public:
  // Uploads `model`'s weights to device 0 and allocates the KV pool; `model`
  // must outlive the backend.
  static absl::StatusOr<std::unique_ptr<CudaBackend>> Create(const Model& model,
                                                             const CudaBackendOptions& options);
  ~CudaBackend() override;
  CudaBackend(const CudaBackend&) = delete;
  CudaBackend& operator=(const CudaBackend&) = delete;

  std::string_view device() const override { return "cuda"; }
  const KvCacheShape& cache_shape() const override { return shape_; }
  absl::Status SupportsPolicy(const KvPolicyConfig& policy) const override {
    return RunsPolicy(policy);
  }
  // The same, before a backend exists (so `auto` can decide first).
  static absl::Status RunsPolicy(const KvPolicyConfig& policy);
  absl::Status Forward(const ForwardBatch& batch, std::vector<float>* logits) override;
  // Sampling runs on the device (kernels/cuda/sampling.h): the seeded draws
  // follow the device's own random stream, so they differ from the CPU's;
  // greedy choices, the kept sets and the log-probabilities agree.
  absl::Status AddRequest(int64_t id, const SamplingParams& params,
                          std::span<const int32_t> prompt, int64_t max_new_tokens) override;
  void RemoveRequest(int64_t id) override;
  absl::Status ForwardAndSample(const ForwardBatch& batch, std::span<const SampleRow> rows,
                                std::vector<SampleResult>* out) override;

  // For tests and debugging: the original position of the token in each
  // slot of a compacted sequence, as the device holds them (the host keeps
  // none): [layer][kv_head][slot] for the slots below num_slots() that the
  // policy tracks (C + 1; SnapKV's first C, the tokens its selection kept).
  // Empty while `kv` has not been compacted on this backend.
  absl::StatusOr<std::vector<int32_t>> DevicePositions(const KvSequence& kv);

  // Changes CudaBackendOptions::cuda_graph_max_batch (benchmarks compare
  // with and without graphs on one backend).
  void set_graph_max_batch(int64_t n) { graph_max_batch_ = std::max<int64_t>(n, 0); }
  // Steps captured into a CUDA graph, and steps replayed from one.
  int64_t graph_captures() const { return graph_captures_; }
  int64_t graph_replays() const { return graph_replays_; }
  // Whether the decode attention runs one MorphKV slab's first scoring pass
  // (on by default); off, every slab scores on its own. Benchmarks and tests
  // compare the two.
  void set_fused_scoring(bool on) { fused_scoring_ = on; }
  // Steady MorphKV evictions whose first scoring pass ran in the decode
  // attention, and those scored on their own (a second slab's in a step).
  int64_t fused_evictions() const { return fused_evictions_; }
  int64_t unfused_evictions() const { return unfused_evictions_; }

 private:
  using DeviceBuffer = kernels::cuda::DeviceBuffer;

  struct Layer {
    DeviceBuffer attn_norm, ffn_norm;  // f32 [hidden]
    DeviceBuffer qkv;                  // bf16 [q_dim + 2 kv_dim][hidden]: wq, wk, wv
    DeviceBuffer qkv_bias;             // f32 [q_dim + 2 kv_dim]; empty without biases
    DeviceBuffer wo;                   // bf16 [hidden][q_dim]
    DeviceBuffer gate_up;              // bf16 [2 intermediate][hidden]: w_gate, w_up
    DeviceBuffer down;                 // bf16 [hidden][intermediate]
  };

  // Page-locked host memory (cudaMallocHost), for the step's copies.
  struct PinnedDeleter {
    void operator()(void* p) const;
  };
  using Pinned = std::unique_ptr<void, PinnedDeleter>;

  // A request's sampling state: its seed, the draws so far (the random
  // stream's counter), and its token history in the penalty pool (the
  // host's mirror of which tokens the list holds).
  struct RequestSampling {
    SamplingParams params;
    uint64_t seed = 0;
    uint64_t step = 0;
    int64_t penalty_offset = 0;
    int32_t penalty_size = 0;
    int32_t penalty_capacity = 0;  // 0: no penalties, no list
    std::unordered_set<int32_t> listed;
  };

  // First-fit ranges of fixed-size elements in one device array, which
  // doubles when full (between steps, when no kernel reads it), so callers
  // keep offsets, not pointers. Ranges are multiples of 4 elements.
  class DevicePool {
   public:
    explicit DevicePool(size_t element_bytes) : element_bytes_(element_bytes) {}
    absl::StatusOr<int64_t> Allocate(int64_t n);
    void Free(int64_t offset, int64_t n);
    // Counts the times the array moved (so captured graphs know theirs is gone).
    int64_t generation() const { return generation_; }
    template <typename T>
    T* as() const {
      return buffer_.as<T>();
    }

   private:
    size_t element_bytes_;
    DeviceBuffer buffer_;
    int64_t capacity_ = 0;
    int64_t generation_ = 0;
    std::map<int64_t, int64_t> free_;  // offset -> length, disjoint, merged
  };

  // The device policy state of every sequence whose policy settings match:
  // one slot per sequence, each field laid out [layer][slot][...], so that
  // each layer's policy kernels run once over all of a slab's sequences
  // (they index sequences by slot; a slot with nothing to do this step is
  // given 0 slots and left alone). Fields, for capacity slots:
  //   ring: bf16 [layer][slot][ring_size][q_dim], the query ring (MorphKV:
  //     its W queries; SnapKV: its observation window until it selects);
  //   positions: int32 [layer][slot][kv_head][kept], the position of each
  //     cache slot's token once compacted (kept: C + 1, SnapKV C);
  //   victims: int32 [layer][slot][kv_head], the slot each next token
  //     overwrites (-1 until the first selection);
  //   scores: f32 [layer][slot][kv_head][score_slots], H2O's running scores.
  // The arrays grow (doubling, between steps) when every slot is taken.
  struct PolicySlab {
    int64_t id = 0;          // tells slabs apart in graph keys
    int64_t generation = 0;  // counts the times the arrays moved
    KvPolicyConfig config;
    int64_t ring_size = 0, kept = 0, score_slots = 0;  // per slot
    int64_t capacity = 0;
    DeviceBuffer ring, positions, victims, scores;
    std::vector<bool> used;  // per slot
    // Slots [0, high_water) hold every sequence of the slab.
    int64_t HighWater() const;
  };
  // A sequence's place in its slab (KvSequence::DeviceState): released
  // with the sequence.
  struct PolicyState : KvSequence::DeviceState {
    PolicyState(PolicySlab* owner, int64_t index) : slab(owner), slot(index) {}
    ~PolicyState() override { slab->used[static_cast<size_t>(slot)] = false; }
    PolicySlab* slab;
    int64_t slot;
    bool snapped = false;  // SnapKV's one selection is behind it
  };
  // A sequence with device policy work in this step.
  struct PolicyStep {
    const SequenceInput* input = nullptr;  // in the step's batch
    KvSequence* kv = nullptr;
    int64_t slot = 0;
    int64_t first_row = 0;  // the device row of its first token
    int64_t n = 0;          // its tokens this step
    int64_t slots = 0;      // slots held once the step's tokens are written
    bool push = false;      // the step's queries join the ring
    bool evict = false;     // a bounded policy picks the next token's victims
    bool first = false;     // ... for the first time: it compacts
    bool snap = false;      // SnapKV's selection at the end of the prompt
  };
  // One slab's work in this step, over its slots [0, high_water): the
  // launch bounds (host side) and where its arrays sit in the metadata.
  struct SlabStep {
    PolicySlab* slab = nullptr;
    std::vector<PolicyStep> seqs;
    int64_t high_water = 0;
    int64_t tokens = 0;      // query rows gathered (ring pushes, H2O)
    int64_t max_tokens = 0;  // most of one sequence
    int64_t max_slots = 0;   // most slots of a sequence that takes part
    int64_t steady = 0, first = 0, snap = 0, evict = 0;  // sequences
    int64_t scatter = 0;     // position updates per layer
    // MorphKV only: the steady evictions take their first scoring pass from
    // the decode attention (kernels/cuda/kv_scoring.h). One slab per step at
    // most, the one with the most steady evictions; the others score alone.
    bool fused = false;
    // Metadata offsets (int32 entries): rows [tokens], query_start
    // [high_water + 1], then per slot: the first position, SnapKV's prompt
    // length, the slots held (H2O), the slots of a steady eviction, of a
    // first selection, the first recent position, the candidates kept;
    // block tables [high_water][table_stride]; position updates
    // [layer][scatter] (offsets in the layer's positions, values); when
    // fused, each decode's slot in the slab, or -1 (MorphKvFusedStats's
    // scored_as) [num_decode].
    size_t rows, query_start, first_position, snap_tokens, slots_all, slots_steady, slots_first,
        recent_from, keep, tables, scatter_offsets, scatter_values, scored_as, end;
  };
  // Whether `kv` (null for none) has device policy work: any policy but full.
  static bool DeviceScored(const KvSequence* kv);
  // Gives every policy sequence of the batch its slab slot and plans the
  // step's policy work by slab, as KvSequence::AfterAttention decides it
  // on the CPU; lays out its metadata from `at` on. Returns its end.
  absl::StatusOr<size_t> PlanPolicies(const ForwardBatch& batch, size_t at);
  absl::StatusOr<PolicySlab*> SlabFor(const KvSequence& kv);
  // Writes the planned policy metadata into the staged metadata `m`.
  void StagePolicies(int32_t* m) const;
  // A slab's inputs to its layer's policy work: the positions of the tokens
  // written into recycled slots, and the step's queries in its rings (and
  // in policy_q_). Queued before the attention for the fused slab, after it
  // for the others.
  absl::Status QueueSlabInputs(const SlabStep& step, int64_t layer);
  // The fused slab's first scoring pass for PagedAttention in `layer`;
  // nullopt when no slab is fused this step.
  std::optional<kernels::cuda::MorphKvFusedStats> FusedStats(int64_t layer) const;
  // The policies' work after the layer's attention.
  absl::Status RunPolicies(int64_t layer, __nv_bfloat16* k_cache, __nv_bfloat16* v_cache);
  // A slab step's first selections (bounded policies after a long prompt,
  // SnapKV once): keep lists from `scores` (null: by position), then the
  // kept tokens gathered into the lowest slots.
  absl::Status SelectAndCompact(const SlabStep& step, int64_t layer, const float* scores,
                                int64_t scores_stride, float* moved_scores,
                                __nv_bfloat16* k_cache, __nv_bfloat16* v_cache);
  // Queues the copy of every evicting slab's victims to victims_host_.
  absl::Status QueueVictimsBack();
  absl::Status GrowScratch(DeviceBuffer& buffer, size_t bytes);
  // Sizes the policies' scratch for the step (before anything is queued).
  absl::Status ReservePolicyScratch();

  CudaBackend(const Model& model, kernels::cuda::Cublas cublas);
  // The host side of a step: checks, working memory, the sequences' device
  // policy state, and the metadata staged in pinned memory.
  absl::Status PrepareStep(const ForwardBatch& batch);
  // Queues the prepared step's device work up to the logits (in logits_),
  // with the victims' copy back; EndStep advances the sequences once it has
  // run.
  absl::Status QueueForward();
  void EndStep(const ForwardBatch& batch);
  // What a prepared decode step's launches depend on besides the contents
  // of device and pinned memory (`mode` tells the callers' work after the
  // logits apart); empty when the step does not run as a graph.
  std::vector<int64_t> GraphKey(int64_t mode) const;
  // Runs `queue` (which queues work on stream_) directly, or through the
  // CUDA graph cached for `key`, capturing it the second time `key` shows.
  absl::Status RunStep(const std::vector<int64_t>& key, const std::function<absl::Status()>& queue);
  absl::Status UploadWeights();
  absl::Status AllocatePool(const CudaBackendOptions& options);
  // Sizes the working memory for steps of up to `tokens` tokens and `rows`
  // rows of logits (growing only).
  absl::Status Reserve(int64_t tokens, int64_t rows);
  absl::Status ReserveMetadata(size_t entries);
  // A buffer that captured graphs may use was (re)allocated: they are stale.
  void BuffersMoved() { ++buffers_generation_; }
  // Sets meta_at_ and table_stride_ for the step, then writes its metadata
  // into the pinned staging buffer.
  void LayOutMetadata(const ForwardBatch& batch, int64_t rows);
  void StageMetadata(const ForwardBatch& batch);
  absl::Status RunLayers(int64_t n);

  const Model& model_;
  cudaStream_t stream_ = nullptr;
  kernels::cuda::Cublas cublas_;
  KvCacheShape shape_;

  DeviceBuffer embedding_;      // bf16 [vocab][hidden]
  DeviceBuffer output_;         // bf16 [vocab][hidden]; empty when tied to the embedding
  DeviceBuffer output_norm_;    // f32 [hidden]
  DeviceBuffer rope_inv_freq_;  // f32 [rope_dim / 2]
  std::vector<Layer> layers_;
  DeviceBuffer k_cache_, v_cache_;  // bf16 [layer][block][kv_head][slot][head_dim]

  // Working memory, for capacity_tokens_ tokens and capacity_rows_ rows.
  int64_t capacity_tokens_ = 0;
  int64_t capacity_rows_ = 0;
  int64_t table_stride_ = 0;     // block-table columns per attention row, this step
  int64_t max_context_ = 0;      // the longest context the pool allows
  DeviceBuffer x_, delta_;       // f32 [tokens][hidden]: residual stream, its update
  DeviceBuffer xn_;              // bf16 [tokens][hidden]
  DeviceBuffer qkv_;             // bf16 [tokens][q_dim + 2 kv_dim]
  DeviceBuffer attn_;            // bf16 [tokens][q_dim]
  DeviceBuffer gate_up_;         // bf16 [tokens][2 intermediate]
  DeviceBuffer act_;             // bf16 [tokens][intermediate]
  DeviceBuffer last_;            // bf16 [rows][hidden]
  DeviceBuffer logits_;          // f32 [rows][vocab]
  DeviceBuffer attn_scratch_;    // PagedAttention's split-context scratch
  // Sampling: the rows' parameters, and what comes back per row
  // ([tokens][logprobs][top ids][top logprobs], capacity_rows_ apart).
  DeviceBuffer sample_rows_, sampled_;
  Pinned sample_host_, sampled_host_;
  std::map<int64_t, RequestSampling> requests_;
  DevicePool penalties_{sizeof(kernels::cuda::PenaltyEntry)};
  std::map<std::vector<int64_t>, std::unique_ptr<PolicySlab>> slabs_;  // by settings
  int64_t next_slab_id_ = 0;
  std::vector<SlabStep> slab_steps_;  // this step's
  const SlabStep* fused_step_ = nullptr;  // the one of slab_steps_ fused, if any
  std::vector<int64_t> first_rows_;   // per batch sequence, its first device row
  DeviceBuffer policy_q_;             // bf16 [rows][qkv]: a slab's gathered query rows
  DeviceBuffer policy_scratch_, policy_scores_, keep_lists_, keep_counts_;
  DeviceBuffer fused_stats_;  // the fused slab's first pass, one layer's
  Pinned victims_host_;
  size_t victims_capacity_ = 0;  // int32 entries in victims_host_
  std::mt19937_64 seed_rng_{std::random_device{}()};
  DeviceBuffer meta_;            // int32: the staged metadata
  Pinned meta_host_, logits_host_;
  size_t meta_capacity_ = 0;     // int32 entries in meta_ / meta_host_
  // Offsets (int32 entries) into the staged metadata of the current step.
  // Token rows are in device order: decodes first, then prompt chunks.
  struct MetaLayout {
    size_t tokens, positions;   // [n]
    size_t rows;                // the device rows whose logits are wanted
    size_t slots;               // [layer][n][kv_head]: flat cache slots
    size_t decode_tables, decode_context;                   // per decode
    size_t prefill_tables, prefill_offsets, prefill_starts;  // per chunk
    size_t policy;  // the slabs' (SlabStep)
    size_t total;
  } meta_at_{};
  int64_t num_decode_ = 0;       // single-token sequences this step
  int64_t num_prefill_ = 0;      // prompt chunks of several tokens
  int64_t prefill_max_len_ = 0;  // the longest chunk
  int64_t attention_rows_ = 0;   // rows PagedAttention runs at once
  int64_t step_tokens_ = 0, step_rows_ = 0;  // the prepared step's
  bool step_all_logits_ = false;

  // CUDA graphs of decode steps, least recently used dropped first.
  struct GraphExecDeleter {
    void operator()(cudaGraphExec_t exec) const;
  };
  struct CachedGraph {
    std::unique_ptr<std::remove_pointer_t<cudaGraphExec_t>, GraphExecDeleter> exec;
    uint64_t last_use = 0;
  };
  int64_t graph_max_batch_ = 0;
  int64_t buffers_generation_ = 0;
  std::map<std::vector<int64_t>, CachedGraph> graphs_;
  std::set<std::vector<int64_t>> seen_keys_;  // shapes run once, directly
  uint64_t graph_clock_ = 0;
  int64_t graph_captures_ = 0, graph_replays_ = 0;
  bool fused_scoring_ = true;
  int64_t fused_evictions_ = 0, unfused_evictions_ = 0;
};

}  // namespace morphserve::engine

#endif  // MORPHSERVE_ENGINE_BACKEND_CUDA_BACKEND_H_
