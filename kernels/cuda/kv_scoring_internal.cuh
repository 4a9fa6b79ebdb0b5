// Pieces shared by the KV policy kernels (kv_scoring.cu, kv_policy.cu) and
// the attention that runs MorphKV's first scoring pass (paged_attention.cu):
// the logits of one cached key against a chunk of query rows, the running
// softmax statistics per thread row and their merging into partial softmax
// denominators, MorphKV's score rows and candidates and its per-partition
// statistics, and the choice of the candidate evicted first.
#ifndef MORPHSERVE_KERNELS_CUDA_KV_SCORING_INTERNAL_CUH_
#define MORPHSERVE_KERNELS_CUDA_KV_SCORING_INTERNAL_CUH_

#include <cuda_bf16.h>

#include <climits>

#include "kernels/cuda/paged_cache_internal.cuh"
#include "kernels/cuda/reduce_internal.cuh"

namespace morphserve::kernels::cuda::internal {

// Query rows scored per pass over a partition's keys: they sit in shared
// memory as f32 [kScoringRowChunk][head_dim] and each thread keeps one
// logit per row in registers.
inline constexpr int kScoringRowChunk = 32;

// Threads work in rows of head_dim / kVec consecutive lanes, each lane
// holding the 8 values of the head dimension from dim0, so one row of
// threads reads one cache row (coalesced). For the key at `key` (null: a
// thread row with no slot, which still takes part in the shuffles),
// logits[r] = q[r] . key for r < rows, reduced within the thread row so
// that all its lanes end with all of them. `rows` must be the same for the
// whole warp.
template <int kHeadDim>
__device__ __forceinline__ void ChunkLogits(const __nv_bfloat16* key, int dim0, int rows,
                                            const float (*q)[kHeadDim],
                                            float (&logits)[kScoringRowChunk]) {
  constexpr int kRowThreads = kHeadDim / kVec;
  float k[kVec] = {};
  if (key != nullptr) LoadVec(key + dim0, k);
#pragma unroll
  for (int r = 0; r < kScoringRowChunk; ++r) {
    if (r < rows) {
      const float4 a = *reinterpret_cast<const float4*>(&q[r][dim0]);
      const float4 b = *reinterpret_cast<const float4*>(&q[r][dim0 + 4]);
      const float dot = a.x * k[0] + a.y * k[1] + a.z * k[2] + a.w * k[3] + b.x * k[4] +
                        b.y * k[5] + b.z * k[6] + b.w * k[7];
      logits[r] = WarpSum<kRowThreads>(dot);
    }
  }
}

// v cut to [0, hi]: a device-side count bounded by its host-side bound.
__device__ __forceinline__ int Clamp(int v, int hi) { return min(max(v, 0), hi); }

// A softmax probability, exp(logit - row_max) * inv_sum, with exp taken as
// the CPU path takes it (kernels/cpu: exactly 0 below -87), so that the
// far tail ties at 0 on both sides instead of ranking by subnormals.
__device__ __forceinline__ float Probability(float logit, float row_max, float inv_sum) {
  const float x = logit - row_max;
  return x < -87.0f ? 0.0f : expf(x) * inv_sum;
}

// An exp sum taken relative to `local_max`, made relative to `global_max`;
// 0 for a part with no entry (sum 0, local_max -inf).
__device__ __forceinline__ float Rescaled(float sum, float local_max, float global_max) {
  return sum > 0.0f ? sum * expf(local_max - global_max) : 0.0f;
}

// Running softmax statistics of a chunk of query rows, one set per thread
// row: run_max[t][r] the largest logit thread row t has seen for row r,
// run_sum[t][r] its exp sum relative to that maximum.
template <int kRowsAtOnce>
using RowStats = float[kRowsAtOnce][kScoringRowChunk];

// Sets every thread row's statistics to the empty ones (max -inf, sum 0);
// the block's kThreads threads share the work.
template <int kThreads, int kRowsAtOnce>
__device__ __forceinline__ void ResetRowStats(RowStats<kRowsAtOnce>& run_max,
                                              RowStats<kRowsAtOnce>& run_sum) {
  for (int i = static_cast<int>(threadIdx.x); i < kRowsAtOnce * kScoringRowChunk; i += kThreads) {
    run_max[i / kScoringRowChunk][i % kScoringRowChunk] = -INFINITY;
    run_sum[i / kScoringRowChunk][i % kScoringRowChunk] = 0.0f;
  }
}

// Folds `logit` into a running maximum and the exp sum relative to it
// (online softmax): a new maximum rescales the sum.
__device__ __forceinline__ void FoldLogit(float logit, float& run_max, float& run_sum) {
  const float m = run_max;
  if (logit > m) {
    run_sum = run_sum * expf(m - logit) + 1.0f;
    run_max = logit;
  } else {
    run_sum += expf(logit - m);
  }
}

// Merges the thread rows' statistics of the chunk's first `rows` rows into
// part_max[r] (the largest logit) and part_sum[r] (the exp sum relative to
// it); the block's kThreads threads share the rows.
template <int kThreads, int kRowsAtOnce>
__device__ __forceinline__ void MergeRowStats(const RowStats<kRowsAtOnce>& run_max,
                                              const RowStats<kRowsAtOnce>& run_sum, int rows,
                                              float* part_max, float* part_sum) {
  for (int r = static_cast<int>(threadIdx.x); r < rows; r += kThreads) {
    float m = -INFINITY;
    for (int t = 0; t < kRowsAtOnce; ++t) m = fmaxf(m, run_max[t][r]);
    float sum = 0.0f;
    for (int t = 0; t < kRowsAtOnce; ++t) sum += Rescaled(run_sum[t][r], run_max[t][r], m);
    part_max[r] = m;
    part_sum[r] = sum;
  }
}

// Where the score rows of one (sequence, KV head) of MorphKV's scoring
// (kv_scoring.h) take their queries from: the sequence's ring of W rows,
// each [num_heads][head_dim] bf16.
struct ScoreRowSource {
  const __nv_bfloat16* q;  // ring row 0
  int64_t row_stride;
  int group;   // query heads per KV head
  int window;  // W
  // Group-max-prob: score row i * group + g is query head g of the ring row
  // of position t-W+1+i (i < W-1), `skipped` the ring row of t-W. Else score
  // row r is the sum of the group's heads in ring row r.
  bool per_head;
  int skipped;
  float scale;
};

// The source for sequence `seq`, whose ring row 0 is at rings + seq *
// seq_stride; recent_from = t - W for the next token t.
__device__ __forceinline__ ScoreRowSource MakeScoreRowSource(const __nv_bfloat16* rings,
                                                             int64_t seq_stride, int64_t row_stride,
                                                             int seq, int group, int window,
                                                             bool per_head, int recent_from,
                                                             float scale) {
  ScoreRowSource s;
  s.q = rings + seq * seq_stride;
  s.row_stride = row_stride;
  s.group = group;
  s.window = window;
  s.per_head = per_head;
  s.skipped = (recent_from % window + window) % window;
  s.scale = scale;
  return s;
}

// q[r] = scale * the query of score row r0 + r, for r < rows; the block's
// kThreads threads share the work.
template <int kHeadDim, int kThreads>
__device__ __forceinline__ void LoadScoreQueries(const ScoreRowSource& s, int kv_head, int r0,
                                                 int rows, float (*q)[kHeadDim]) {
  const __nv_bfloat16* base = s.q + static_cast<int64_t>(kv_head) * s.group * kHeadDim;
  for (int i = static_cast<int>(threadIdx.x); i < rows * kHeadDim; i += kThreads) {
    const int r = i / kHeadDim;
    const int d = i % kHeadDim;
    const int row = r0 + r;
    if (s.per_head) {
      const int ring = (s.skipped + 1 + row / s.group) % s.window;
      q[r][d] =
          __bfloat162float(base[ring * s.row_stride + (row % s.group) * kHeadDim + d]) * s.scale;
    } else {
      const __nv_bfloat16* head = base + row * s.row_stride + d;
      float sum = 0.0f;
      for (int g = 0; g < s.group; ++g) sum += __bfloat162float(head[g * kHeadDim]);
      q[r][d] = sum * s.scale;
    }
  }
}

// pos[i] = the position of slot start + i if it is a candidate (sinks <=
// position < recent_from), else -1, for i < n. positions: the (sequence,
// KV head)'s slot positions, or null while positions equal slots.
template <int kThreads>
__device__ __forceinline__ void MarkCandidates(const int32_t* positions, int recent_from, int sinks,
                                               int start, int n, int* pos) {
  for (int i = static_cast<int>(threadIdx.x); i < n; i += kThreads) {
    const int slot = start + i;
    const int position = positions == nullptr ? slot : positions[slot];
    pos[i] = position >= sinks && position < recent_from ? position : -1;
  }
}

// MorphKV's pass a over one partition of a (sequence, KV head)'s slots
// [start, start + n): for each of `score_rows` rows, the largest logit over
// the partition's candidates (pos[i] >= 0, marked by MarkCandidates) and
// the sum of exp(logit - that maximum), into out_max[r] and out_sum[r]
// (-inf and 0 without a candidate). Rows go kScoringRowChunk at a time
// through q; run_max and run_sum are the running statistics of the block's
// thread rows. Every thread of the block must call it.
template <int kHeadDim, int kThreads>
__device__ __forceinline__ void PartitionRowStats(
    const __nv_bfloat16* k_cache, const int32_t* table, int block_size, int num_kv_heads,
    int kv_head, int start, int n, const int* pos, const ScoreRowSource& src, int score_rows,
    float (*q)[kHeadDim], RowStats<kThreads / (kHeadDim / kVec)>& run_max,
    RowStats<kThreads / (kHeadDim / kVec)>& run_sum, float* out_max, float* out_sum) {
  constexpr int kRowThreads = kHeadDim / kVec;
  constexpr int kRowsAtOnce = kThreads / kRowThreads;
  static_assert(kRowThreads <= kWarpSize && kThreads % kRowThreads == 0);
  const int lane_in_row = static_cast<int>(threadIdx.x) % kRowThreads;
  const int row = static_cast<int>(threadIdx.x) / kRowThreads;
  const int dim0 = lane_in_row * kVec;
  for (int r0 = 0; r0 < score_rows; r0 += kScoringRowChunk) {
    const int rows = min(kScoringRowChunk, score_rows - r0);
    LoadScoreQueries<kHeadDim, kThreads>(src, kv_head, r0, rows, q);
    ResetRowStats<kThreads, kRowsAtOnce>(run_max, run_sum);
    __syncthreads();
    // Every thread runs the same number of iterations: the shuffles need
    // their whole warp.
    for (int j0 = 0; j0 < n; j0 += kRowsAtOnce) {
      const int j = j0 + row;
      const bool candidate = j < n && pos[j] >= 0;
      const __nv_bfloat16* key =
          j < n ? PagedRow<kHeadDim>(k_cache, table, block_size, num_kv_heads, kv_head, start + j)
                : nullptr;
      float logits[kScoringRowChunk] = {};
      ChunkLogits<kHeadDim>(key, dim0, rows, q, logits);
#pragma unroll
      for (int r = 0; r < kScoringRowChunk; ++r) {
        if (candidate && r < rows && r % kRowThreads == lane_in_row) {
          FoldLogit(logits[r], run_max[row][r], run_sum[row][r]);
        }
      }
    }
    __syncthreads();
    MergeRowStats<kThreads, kRowsAtOnce>(run_max, run_sum, rows, out_max + r0, out_sum + r0);
    __syncthreads();  // q and the running statistics are refilled next chunk
  }
}

// A candidate's score and position, and its slot; slot -1 for none.
struct Choice {
  float score;
  int pos;
  int slot;
};

__device__ __forceinline__ Choice NoChoice() { return {INFINITY, INT_MAX, -1}; }

// The one evicted first of two: the lower score, or on a tie the older token.
__device__ __forceinline__ Choice Lower(const Choice& a, const Choice& b) {
  const bool b_first = b.score < a.score || (b.score == a.score && b.pos < a.pos);
  return b_first ? b : a;
}

__device__ __forceinline__ Choice WarpLowest(Choice c) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    const Choice other = {__shfl_xor_sync(kFullMask, c.score, offset),
                          __shfl_xor_sync(kFullMask, c.pos, offset),
                          __shfl_xor_sync(kFullMask, c.slot, offset)};
    c = Lower(c, other);
  }
  return c;
}

// The lowest over a block of kThreads threads, in thread 0; every thread
// must call it. `warp_best` holds kThreads / 32 entries.
template <int kThreads>
__device__ __forceinline__ Choice BlockLowest(Choice c, Choice* warp_best) {
  c = WarpLowest(c);
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  if (lane == 0) warp_best[warp] = c;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kThreads / kWarpSize; ++w) c = Lower(c, warp_best[w]);
  }
  return c;
}

}  // namespace morphserve::kernels::cuda::internal

#endif  // MORPHSERVE_KERNELS_CUDA_KV_SCORING_INTERNAL_CUH_
