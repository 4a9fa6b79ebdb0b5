#include "kernels/cuda/paged_attention.h"

#include <cstdint>

#include "absl/strings/str_cat.h"
#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/kv_scoring_internal.cuh"
#include "kernels/cuda/launch_internal.h"
#include "kernels/cuda/paged_cache_internal.cuh"
#include "kernels/cuda/reduce_internal.cuh"

namespace morphserve::kernels::cuda {
namespace {

using internal::Aligned16;
using internal::kVec;
using internal::LoadVec;
using internal::Require;

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / internal::kWarpSize;
constexpr int kPartition = static_cast<int>(kPartitionSize);
// Query heads handled by one block, all of the same KV head, so that each
// key and value row is read once for all of them. Larger GQA groups are
// split over several blocks.
constexpr int kHeadsPerBlock = 8;
constexpr int kRowChunk = internal::kScoringRowChunk;
static_assert(kPartitionSize == kFusedStatsPartitionSize);

struct Params {
  const __nv_bfloat16* k_cache;
  const __nv_bfloat16* v_cache;
  const int32_t* block_tables;
  int64_t block_table_stride;
  const int32_t* context_lens;
  int max_context_len;
  int max_partitions;  // partitions per (sequence, head) in the scratch
  int block_size;
  int num_heads;
  int num_kv_heads;
  int group;               // query heads per KV head
  int blocks_per_kv_head;  // ceil(group / kHeadsPerBlock)
  float scale;
  const __nv_bfloat16* q;
  int64_t q_stride;
  __nv_bfloat16* out;
  // Split path only (null when every context fits one partition), indexed
  // [(seq * num_heads + head) * max_partitions + partition]: each
  // partition's output (normalised by its own exp sum; head_dim values per
  // index), its largest logit and its sum of exp(logit - that maximum).
  float* partial_out;
  float* max_logits;
  float* exp_sums;
  // MorphKV's pass a (MorphKvFusedStats), only read by the scored kernel.
  const int32_t* scored_as;
  const int32_t* recent_from;
  const int32_t* positions;
  int64_t positions_stride;
  int sinks;
  const __nv_bfloat16* rings;
  int64_t ring_seq_stride;
  int64_t ring_row_stride;
  int window;
  bool per_head;
  int score_rows;
  int scored_slots;      // max_slots
  int stats_partitions;  // per (scored sequence, KV head)
  float* stats_max;      // [scored][kv_head][partition][score row]
  float* stats_sum;
};

__host__ __device__ __forceinline__ int NumPartitions(int context_len) {
  return context_len <= kPartition ? 1 : (context_len + kPartition - 1) / kPartition;
}

__device__ __forceinline__ int ContextLen(const Params& p, int seq) {
  return min(max(p.context_lens[seq], 0), p.max_context_len);
}

// Grid: (partition, KV head x head chunk, sequence). A block handles up to
// kHeadsPerBlock query heads of one KV head over one partition's slots.
// Threads work in rows of kRowThreads consecutive lanes, each lane holding 8
// of the head_dim values, so one row of threads reads one 16*kRowThreads-byte
// cache row (coalesced) and kRowsAtOnce rows are in flight per block:
//   1. logits: each thread row scores one key against every head (dot
//      products reduced by shuffles within the row), into shared memory;
//   2. softmax: warp w normalises heads w, w + kWarps, ...;
//   3. values: each thread row adds p * v of one slot into per-head register
//      accumulators, which are then summed over the rows in shared memory;
//   4. kScored, for a sequence with a scoring index, in the first block of
//      each KV head: MorphKV's pass a over the partition's keys, which the
//      block has just read (internal::PartitionRowStats).
template <int kHeadDim, bool kScored>
__global__ void __launch_bounds__(kThreads) PagedAttentionKernel(const Params p) {
  constexpr int kRowThreads = kHeadDim / kVec;
  constexpr int kRowsAtOnce = kThreads / kRowThreads;
  static_assert(kRowThreads <= internal::kWarpSize && kThreads % kRowThreads == 0);

  const int partition = static_cast<int>(blockIdx.x);
  const int seq = static_cast<int>(blockIdx.z);
  const int context_len = ContextLen(p, seq);
  // The same for the whole block, so no thread is left waiting at a barrier.
  if (partition >= NumPartitions(context_len)) return;
  const int start = partition * kPartition;
  const int n = min(kPartition, context_len - start);  // 0 only for an empty context

  const int kv_head = static_cast<int>(blockIdx.y) / p.blocks_per_kv_head;
  const int first_in_group = static_cast<int>(blockIdx.y) % p.blocks_per_kv_head * kHeadsPerBlock;
  const int first_head = kv_head * p.group + first_in_group;
  const int heads = min(kHeadsPerBlock, p.group - first_in_group);

  const int lane_in_row = static_cast<int>(threadIdx.x) % kRowThreads;
  const int row = static_cast<int>(threadIdx.x) / kRowThreads;
  const int dim0 = lane_in_row * kVec;
  const int32_t* table = p.block_tables + seq * p.block_table_stride;

  // The logits, and in step 4 the score rows' queries after them.
  constexpr int kLogitValues = kHeadsPerBlock * kPartition;
  constexpr int kArea =
      kScored && kRowChunk * kHeadDim > kLogitValues ? kRowChunk * kHeadDim : kLogitValues;
  __shared__ __align__(16) float area[kArea];
  auto* logits = reinterpret_cast<float(*)[kPartition]>(area);
  __shared__ float head_max[kHeadsPerBlock];
  __shared__ float head_sum[kHeadsPerBlock];
  __shared__ __align__(16) float row_acc[kRowsAtOnce][kHeadDim];

  // 1. Logits. This thread's 8 dims of each query, pre-scaled.
  float q[kHeadsPerBlock][kVec];
  const __nv_bfloat16* q_seq = p.q + seq * p.q_stride;
#pragma unroll
  for (int h = 0; h < kHeadsPerBlock; ++h) {
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      q[h][e] = h < heads
                    ? __bfloat162float(q_seq[(first_head + h) * kHeadDim + dim0 + e]) * p.scale
                    : 0.0f;
    }
  }
  // Every thread runs the same number of iterations: the shuffles need
  // their whole warp.
  for (int j0 = 0; j0 < n; j0 += kRowsAtOnce) {
    const int j = j0 + row;
    float k[kVec] = {};
    if (j < n) {
      const __nv_bfloat16* key = internal::PagedRow<kHeadDim>(p.k_cache, table, p.block_size,
                                                              p.num_kv_heads, kv_head, start + j);
      LoadVec(key + dim0, k);
    }
#pragma unroll
    for (int h = 0; h < kHeadsPerBlock; ++h) {
      if (h < heads) {
        float dot = 0.0f;
#pragma unroll
        for (int e = 0; e < kVec; ++e) dot += q[h][e] * k[e];
        dot = internal::WarpSum<kRowThreads>(dot);
        if (j < n && lane_in_row == 0) logits[h][j] = dot;
      }
    }
  }
  __syncthreads();

  // 2. Softmax over the partition's slots, leaving exp(logit - max) in place.
  const int warp = static_cast<int>(threadIdx.x) / internal::kWarpSize;
  const int lane = static_cast<int>(threadIdx.x) % internal::kWarpSize;
  for (int h = warp; h < heads; h += kWarps) {
    float m = -INFINITY;
    for (int j = lane; j < n; j += internal::kWarpSize) m = fmaxf(m, logits[h][j]);
    m = internal::WarpMax(m);
    float sum = 0.0f;
    for (int j = lane; j < n; j += internal::kWarpSize) {
      const float e = expf(logits[h][j] - m);
      logits[h][j] = e;
      sum += e;
    }
    sum = internal::WarpSum(sum);
    if (lane == 0) {
      head_max[h] = m;
      head_sum[h] = sum;
    }
  }
  __syncthreads();

  // 3. Weighted values.
  float acc[kHeadsPerBlock][kVec] = {};
  for (int j = row; j < n; j += kRowsAtOnce) {
    float v[kVec];
    const __nv_bfloat16* value = internal::PagedRow<kHeadDim>(p.v_cache, table, p.block_size,
                                                              p.num_kv_heads, kv_head, start + j);
    LoadVec(value + dim0, v);
#pragma unroll
    for (int h = 0; h < kHeadsPerBlock; ++h) {
      if (h < heads) {
        const float w = logits[h][j];
#pragma unroll
        for (int e = 0; e < kVec; ++e) acc[h][e] += w * v[e];
      }
    }
  }
#pragma unroll
  for (int h = 0; h < kHeadsPerBlock; ++h) {
    if (h < heads) {
      float4* dst = reinterpret_cast<float4*>(&row_acc[row][dim0]);
      dst[0] = make_float4(acc[h][0], acc[h][1], acc[h][2], acc[h][3]);
      dst[1] = make_float4(acc[h][4], acc[h][5], acc[h][6], acc[h][7]);
      __syncthreads();
      const int head = first_head + h;
      const float sum = head_sum[h];
      const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
      const int64_t at =
          (static_cast<int64_t>(seq) * p.num_heads + head) * p.max_partitions + partition;
      for (int d = static_cast<int>(threadIdx.x); d < kHeadDim; d += kThreads) {
        float total = 0.0f;
#pragma unroll
        for (int r = 0; r < kRowsAtOnce; ++r) total += row_acc[r][d];
        if (p.partial_out == nullptr) {
          p.out[(static_cast<int64_t>(seq) * p.num_heads + head) * kHeadDim + d] =
              __float2bfloat16(total * inv);
        } else {
          p.partial_out[at * kHeadDim + d] = total * inv;
        }
      }
      if (p.partial_out != nullptr && threadIdx.x == 0) {
        p.max_logits[at] = head_max[h];
        p.exp_sums[at] = sum;
      }
      __syncthreads();  // row_acc is rewritten for the next head
    }
  }

  // 4. Pass a. Every test here is the same for the whole block.
  if constexpr (kScored) {
    const int scored = p.scored_as[seq];
    if (scored < 0 || first_in_group != 0 || start >= p.scored_slots) return;
    __shared__ int pos[kPartition];
    __shared__ internal::RowStats<kRowsAtOnce> run_max;
    __shared__ internal::RowStats<kRowsAtOnce> run_sum;
    const int scored_n = min(n, p.scored_slots - start);
    const int64_t unit = static_cast<int64_t>(scored) * p.num_kv_heads + kv_head;
    const int recent_from = p.recent_from[scored];
    internal::MarkCandidates<kThreads>(
        p.positions == nullptr ? nullptr : p.positions + unit * p.positions_stride, recent_from,
        p.sinks, start, scored_n, pos);
    const internal::ScoreRowSource source =
        internal::MakeScoreRowSource(p.rings, p.ring_seq_stride, p.ring_row_stride, scored, p.group,
                                     p.window, p.per_head, recent_from, p.scale);
    const int64_t at = (unit * p.stats_partitions + partition) * p.score_rows;
    internal::PartitionRowStats<kHeadDim, kThreads>(
        p.k_cache, table, p.block_size, p.num_kv_heads, kv_head, start, scored_n, pos, source,
        p.score_rows, reinterpret_cast<float(*)[kHeadDim]>(area), run_max, run_sum,
        p.stats_max + at, p.stats_sum + at);
  }
}

// Grid: (query head, sequence); thread d combines dim d of the partitions'
// outputs, each weighted by its exp sum rescaled to the largest maximum.
template <int kHeadDim>
__global__ void __launch_bounds__(kHeadDim) PagedAttentionReduceKernel(const Params p) {
  const int head = static_cast<int>(blockIdx.x);
  const int seq = static_cast<int>(blockIdx.y);
  const int partitions = NumPartitions(ContextLen(p, seq));
  const int64_t base = (static_cast<int64_t>(seq) * p.num_heads + head) * p.max_partitions;
  float global_max = -INFINITY;
  for (int i = 0; i < partitions; ++i) global_max = fmaxf(global_max, p.max_logits[base + i]);
  // An empty partition (sum 0, max -inf) weighs 0.
  auto weight = [&](int i) {
    const float sum = p.exp_sums[base + i];
    return sum > 0.0f ? sum * expf(p.max_logits[base + i] - global_max) : 0.0f;
  };
  float total = 0.0f;
  for (int i = 0; i < partitions; ++i) total += weight(i);
  const float inv = total > 0.0f ? 1.0f / total : 0.0f;
  const int d = static_cast<int>(threadIdx.x);
  float acc = 0.0f;
  for (int i = 0; i < partitions; ++i) acc += weight(i) * p.partial_out[(base + i) * kHeadDim + d];
  p.out[(static_cast<int64_t>(seq) * p.num_heads + head) * kHeadDim + d] =
      __float2bfloat16(acc * inv);
}

template <int kHeadDim>
absl::Status Launch(const Params& p, int64_t num_seqs, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.max_partitions),
                  static_cast<unsigned>(p.num_kv_heads * p.blocks_per_kv_head),
                  static_cast<unsigned>(num_seqs));
  if (p.scored_as != nullptr) {
    PagedAttentionKernel<kHeadDim, true><<<grid, kThreads, 0, stream>>>(p);
  } else {
    PagedAttentionKernel<kHeadDim, false><<<grid, kThreads, 0, stream>>>(p);
  }
  RETURN_IF_ERROR(LaunchStatus("PagedAttentionKernel"));
  if (p.partial_out == nullptr) return absl::OkStatus();
  const dim3 reduce_grid(static_cast<unsigned>(p.num_heads), static_cast<unsigned>(num_seqs));
  PagedAttentionReduceKernel<kHeadDim><<<reduce_grid, kHeadDim, 0, stream>>>(p);
  return LaunchStatus("PagedAttentionReduceKernel");
}

}  // namespace

size_t PagedAttentionScratchBytes(int64_t num_seqs, int64_t num_heads, int64_t head_dim,
                                  int64_t max_context_len) {
  if (max_context_len <= kPartitionSize) return 0;
  const int64_t partitions = (max_context_len + kPartitionSize - 1) / kPartitionSize;
  // Output rows, then the maxima, then the exp sums.
  return static_cast<size_t>(num_seqs * num_heads * partitions * (head_dim + 2)) * sizeof(float);
}

absl::Status PagedAttention(const PagedAttentionArgs& a, const __nv_bfloat16* q, int64_t q_stride,
                            __nv_bfloat16* out, void* scratch, cudaStream_t stream,
                            const MorphKvFusedStats* stats) {
  constexpr const char* kName = "PagedAttention";
  // Grid dimensions y and z stop at 65535.
  RETURN_IF_ERROR(Require(a.num_seqs >= 0 && a.num_seqs <= 65535, kName, "0 <= num_seqs <= 65535"));
  RETURN_IF_ERROR(
      Require(a.num_kv_heads > 0 && a.num_heads % a.num_kv_heads == 0 && a.num_heads <= 65535,
              kName, "num_kv_heads > 0 dividing num_heads <= 65535"));
  RETURN_IF_ERROR(Require(a.head_dim == 64 || a.head_dim == 128 || a.head_dim == 256, kName,
                          "head_dim 64, 128 or 256"));
  RETURN_IF_ERROR(
      Require(a.block_size > 0 && a.block_size <= (1 << 20) && a.block_table_stride >= 0, kName,
              "0 < block_size <= 2^20 and block_table_stride >= 0"));
  RETURN_IF_ERROR(Require(a.max_context_len >= 0 && a.max_context_len <= (int64_t{1} << 30), kName,
                          "0 <= max_context_len <= 2^30"));
  RETURN_IF_ERROR(
      Require(q_stride >= a.num_heads * a.head_dim, kName, "q_stride >= num_heads * head_dim"));
  RETURN_IF_ERROR(
      Require(Aligned16(a.k_cache) && Aligned16(a.v_cache), kName, "16-byte aligned caches"));
  const size_t scratch_bytes =
      PagedAttentionScratchBytes(a.num_seqs, a.num_heads, a.head_dim, a.max_context_len);
  RETURN_IF_ERROR(Require(scratch_bytes == 0 || (scratch != nullptr && Aligned16(scratch)), kName,
                          "16-byte aligned scratch of PagedAttentionScratchBytes()"));
  if (stats != nullptr) {
    RETURN_IF_ERROR(CheckFusedStats(*stats, a.num_heads, a.num_kv_heads, a.head_dim));
  }
  if (a.num_seqs == 0) return absl::OkStatus();

  Params p{};
  p.k_cache = a.k_cache;
  p.v_cache = a.v_cache;
  p.block_tables = a.block_tables;
  p.block_table_stride = a.block_table_stride;
  p.context_lens = a.context_lens;
  p.max_context_len = static_cast<int>(a.max_context_len);
  p.max_partitions = NumPartitions(p.max_context_len);
  p.block_size = static_cast<int>(a.block_size);
  p.num_heads = static_cast<int>(a.num_heads);
  p.num_kv_heads = static_cast<int>(a.num_kv_heads);
  p.group = static_cast<int>(a.num_heads / a.num_kv_heads);
  p.blocks_per_kv_head = (p.group + kHeadsPerBlock - 1) / kHeadsPerBlock;
  p.scale = a.scale;
  p.q = q;
  p.q_stride = q_stride;
  p.out = out;
  if (scratch_bytes > 0) {
    const int64_t rows = a.num_seqs * a.num_heads * p.max_partitions;
    p.partial_out = static_cast<float*>(scratch);
    p.max_logits = p.partial_out + rows * a.head_dim;
    p.exp_sums = p.max_logits + rows;
  }
  if (stats != nullptr) {
    p.scored_as = stats->scored_as;
    p.recent_from = stats->recent_from;
    p.positions = stats->positions;
    p.positions_stride = stats->positions_stride;
    p.sinks = static_cast<int>(stats->sinks);
    p.rings = stats->q;
    p.ring_seq_stride = stats->q_seq_stride;
    p.ring_row_stride = stats->q_row_stride;
    p.window = static_cast<int>(stats->window);
    p.per_head = stats->group_max_prob;
    p.score_rows = static_cast<int>(
        MorphKvScoreRows(a.num_heads, a.num_kv_heads, stats->window, stats->group_max_prob));
    p.scored_slots = static_cast<int>(stats->max_slots);
    p.stats_partitions = NumPartitions(p.scored_slots);
    const int64_t values = stats->num_scored * a.num_kv_heads * p.stats_partitions * p.score_rows;
    p.stats_max = stats->stats;
    p.stats_sum = stats->stats + values;
  }
  switch (a.head_dim) {
    case 64:
      return Launch<64>(p, a.num_seqs, stream);
    case 128:
      return Launch<128>(p, a.num_seqs, stream);
    default:
      return Launch<256>(p, a.num_seqs, stream);
  }
}

}  // namespace morphserve::kernels::cuda
