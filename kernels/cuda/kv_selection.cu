// The selection side of kernels/cuda/kv_policy.h: the steady-state victim
// (SelectLowestCandidates), the first selection's ranking (SelectKeepLists),
// the compaction of the kept tokens (CompactKv) and the query ring
// (PushQueryRing). kv_policy.cu holds the attention sums (H2O, SnapKV).
#include <algorithm>
#include <climits>
#include <cstdint>

#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/kv_policy.h"
#include "kernels/cuda/kv_scoring_internal.cuh"
#include "kernels/cuda/launch_internal.h"
#include "kernels/cuda/paged_cache_internal.cuh"
#include "kernels/cuda/reduce_internal.cuh"

namespace morphserve::kernels::cuda {
namespace {

using internal::Aligned16;
using internal::Choice;
using internal::Clamp;
using internal::kFullMask;
using internal::kVec;
using internal::kWarpSize;
using internal::Lower;
using internal::NoChoice;
using internal::Require;
using internal::Rescaled;

constexpr int kThreads = 128;  // the query ring's copies

// ---------------------------------------------------------------------------
// Candidates.

constexpr int kSelectThreads = 256;
constexpr int kSelectWarps = kSelectThreads / kWarpSize;
constexpr int kRadixBits = 8;
constexpr int kRadixBins = 1 << kRadixBits;

struct CandidateParams {
  const int32_t* num_slots;
  const int32_t* recent_from;
  const int32_t* positions;
  int64_t positions_stride;
  int sinks;
  int max_slots;
  int num_kv_heads;
  const float* scores;
  int64_t scores_stride;
};

CandidateParams MakeCandidateParams(const CandidateArgs& a, const float* scores,
                                    int64_t scores_stride) {
  CandidateParams p;
  p.num_slots = a.num_slots;
  p.recent_from = a.recent_from;
  p.positions = a.positions;
  p.positions_stride = a.positions_stride;
  p.sinks = static_cast<int>(a.sinks);
  p.max_slots = static_cast<int>(a.max_slots);
  p.num_kv_heads = static_cast<int>(a.num_kv_heads);
  p.scores = scores;
  p.scores_stride = scores_stride;
  return p;
}

// Slot j's position if it is a candidate, else -1.
__device__ __forceinline__ int CandidatePosition(const CandidateParams& p, const int32_t* positions,
                                                 int recent_from, int j) {
  const int position = positions == nullptr ? j : positions[j];
  return position >= p.sinks && position < recent_from ? position : -1;
}

// Grid: (KV head, sequence).
__global__ void __launch_bounds__(kSelectThreads)
    LowestCandidateKernel(const CandidateParams p, int32_t* victims) {
  const int kv_head = static_cast<int>(blockIdx.x);
  const int seq = static_cast<int>(blockIdx.y);
  if (p.num_slots[seq] <= 0) return;  // left alone
  const int64_t unit = static_cast<int64_t>(seq) * p.num_kv_heads + kv_head;
  const int slots = Clamp(p.num_slots[seq], p.max_slots);
  const int recent_from = p.recent_from[seq];
  const int32_t* positions =
      p.positions == nullptr ? nullptr : p.positions + unit * p.positions_stride;
  const float* scores = p.scores == nullptr ? nullptr : p.scores + unit * p.scores_stride;
  __shared__ Choice warp_best[kSelectWarps];
  Choice best = NoChoice();
  for (int j = static_cast<int>(threadIdx.x); j < slots; j += kSelectThreads) {
    const int position = CandidatePosition(p, positions, recent_from, j);
    if (position >= 0) {
      best = Lower(best, Choice{scores == nullptr ? 0.0f : scores[j], position, j});
    }
  }
  best = internal::BlockLowest<kSelectThreads>(best, warp_best);
  if (threadIdx.x == 0) victims[unit] = best.slot;
}

// A candidate's rank key: larger is kept first. The score's bits made to
// order as unsigned integers (0 and -0 alike), then the position (unique
// within a KV head, so keys never tie).
__device__ __forceinline__ uint64_t RankKey(float score, int position) {
  const unsigned bits = __float_as_uint(score == 0.0f ? 0.0f : score);
  const unsigned ordered = (bits & 0x80000000u) != 0 ? ~bits : bits | 0x80000000u;
  return (static_cast<uint64_t>(ordered) << 32) | static_cast<unsigned>(position);
}

// Grid: (KV head, sequence). The key of the keep-th best candidate by a
// most-significant-digit-first radix select (one histogram of kRadixBits
// per pass over the candidates), then the kept slots in ascending order by
// a block-wide scan.
__global__ void __launch_bounds__(kSelectThreads)
    KeepListKernel(const CandidateParams p, const int32_t* keep, int32_t* keep_lists,
                   int64_t keep_stride, int32_t* keep_counts, int32_t* victims) {
  const int kv_head = static_cast<int>(blockIdx.x);
  const int seq = static_cast<int>(blockIdx.y);
  const int64_t unit = static_cast<int64_t>(seq) * p.num_kv_heads + kv_head;
  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid % kWarpSize;
  const int warp = tid / kWarpSize;
  // Left alone but for the count, which tells CompactKv to skip it.
  if (p.num_slots[seq] <= 0) {
    if (tid == 0) keep_counts[unit] = -1;
    return;
  }
  const int slots = min(p.num_slots[seq], p.max_slots);
  const int recent_from = p.recent_from[seq];
  const int32_t* positions =
      p.positions == nullptr ? nullptr : p.positions + unit * p.positions_stride;
  const float* scores = p.scores == nullptr ? nullptr : p.scores + unit * p.scores_stride;
  // The key of slot j, or false when j is no candidate.
  const auto key_of = [&](int j, uint64_t* key) {
    const int position = CandidatePosition(p, positions, recent_from, j);
    if (position < 0) return false;
    *key = RankKey(scores == nullptr ? 0.0f : scores[j], position);
    return true;
  };

  __shared__ unsigned hist[kRadixBins];
  __shared__ uint64_t prefix;     // the digits of the wanted key found so far
  __shared__ unsigned remaining;  // its rank among the keys sharing them (1 = largest)
  __shared__ bool keep_none;
  __shared__ int warp_count[kSelectWarps];

  for (int pass = 0; pass < 64 / kRadixBits; ++pass) {
    const int shift = 64 - kRadixBits * (pass + 1);
    const uint64_t mask = pass == 0 ? 0 : ~uint64_t{0} << (shift + kRadixBits);
    for (int i = tid; i < kRadixBins; i += kSelectThreads) hist[i] = 0;
    __syncthreads();
    const uint64_t want = pass == 0 ? 0 : prefix;
    for (int j = tid; j < slots; j += kSelectThreads) {
      uint64_t key;
      if (key_of(j, &key) && (key & mask) == want) {
        atomicAdd(&hist[(key >> shift) & (kRadixBins - 1)], 1u);
      }
    }
    __syncthreads();
    if (tid == 0) {
      if (pass == 0) {
        unsigned candidates = 0;
        for (int i = 0; i < kRadixBins; ++i) candidates += hist[i];
        const unsigned wanted = static_cast<unsigned>(max(keep[seq], 0));
        remaining = min(wanted, candidates);
        keep_none = remaining == 0;
        prefix = 0;
      }
      if (!keep_none) {
        unsigned above = 0;
        int digit = kRadixBins - 1;
        while (above + hist[digit] < remaining) above += hist[digit--];
        remaining -= above;
        prefix |= static_cast<uint64_t>(digit) << shift;
      }
    }
    __syncthreads();
    if (keep_none) break;
  }
  const uint64_t threshold = prefix;
  const bool none = keep_none;

  int base = 0;
  for (int j0 = 0; j0 < slots; j0 += kSelectThreads) {
    const int j = j0 + tid;
    uint64_t key = 0;
    const bool candidate = j < slots && key_of(j, &key);
    const bool kept = j < slots && (!candidate || (!none && key >= threshold));
    const unsigned ballot = __ballot_sync(kFullMask, kept);
    if (lane == 0) warp_count[warp] = __popc(ballot);
    __syncthreads();
    int at = base + __popc(ballot & ((1u << lane) - 1u));
    int total = 0;
    for (int w = 0; w < kSelectWarps; ++w) {
      if (w < warp) at += warp_count[w];
      total += warp_count[w];
    }
    if (kept) keep_lists[unit * keep_stride + at] = j;
    if (candidate && !none && key == threshold && victims != nullptr) victims[unit] = at;
    base += total;
    __syncthreads();  // warp_count is refilled next tile
  }
  if (tid == 0) {
    keep_counts[unit] = base;
    if (none && victims != nullptr) victims[unit] = -1;
  }
}

absl::Status CheckCandidates(const char* name, const CandidateArgs& a, const float* scores,
                             int64_t scores_stride) {
  RETURN_IF_ERROR(Require(a.num_seqs >= 0 && a.num_seqs <= 65535, name, "0 <= num_seqs <= 65535"));
  RETURN_IF_ERROR(
      Require(a.num_kv_heads > 0 && a.num_kv_heads <= 65535, name, "0 < num_kv_heads <= 65535"));
  RETURN_IF_ERROR(Require(a.max_slots >= 0 && a.max_slots <= (int64_t{1} << 30), name,
                          "0 <= max_slots <= 2^30"));
  RETURN_IF_ERROR(Require(a.sinks >= 0 && a.sinks <= INT_MAX, name, "0 <= sinks < 2^31"));
  RETURN_IF_ERROR(Require(a.positions == nullptr || a.positions_stride >= a.max_slots, name,
                          "positions_stride >= max_slots"));
  return Require(scores == nullptr || scores_stride >= a.max_slots, name,
                 "scores_stride >= max_slots");
}

// ---------------------------------------------------------------------------
// Compaction and the query ring.

constexpr int kCompactThreads = 256;
// 16-byte vectors of K (and of V) each thread holds per round.
constexpr int kCompactVecs = 4;

struct CompactParams {
  __nv_bfloat16* k_cache;
  __nv_bfloat16* v_cache;
  const int32_t* block_tables;
  int64_t block_table_stride;
  int max_slots;
  int block_size;
  int num_kv_heads;
  int vecs_per_row;  // head_dim / 8
  const int32_t* keep_lists;
  int64_t keep_stride;
  const int32_t* keep_counts;
  const int32_t* positions_in;
  int32_t* positions_out;
  int64_t positions_stride;
  float* scores;
  int64_t scores_stride;
};

__device__ __forceinline__ uint4* CacheVec(__nv_bfloat16* cache, const CompactParams& p,
                                           const int32_t* table, int kv_head, int slot, int vec) {
  const int64_t block = table[slot / p.block_size];
  const int64_t row = (block * p.num_kv_heads + kv_head) * p.block_size + slot % p.block_size;
  return reinterpret_cast<uint4*>(cache + (row * p.vecs_per_row + vec) * kVec);
}

// Grid: (KV head, sequence). Each round moves the rows of a run of keep
// list entries: every thread reads its part of them, then after a barrier
// writes it. A destination i never lies above its source keep[i], so within
// a round the barrier orders every read before any write that could reach
// it, and every later round reads only slots above this round's
// destinations.
__global__ void __launch_bounds__(kCompactThreads) CompactKernel(const CompactParams p) {
  const int kv_head = static_cast<int>(blockIdx.x);
  const int seq = static_cast<int>(blockIdx.y);
  const int64_t unit = static_cast<int64_t>(seq) * p.num_kv_heads + kv_head;
  const int count = p.keep_counts[unit];
  if (count < 0) return;
  const int n = min(count, p.max_slots);
  const int tid = static_cast<int>(threadIdx.x);
  const int32_t* table = p.block_tables + seq * p.block_table_stride;
  const int32_t* keep = p.keep_lists + unit * p.keep_stride;
  const int32_t* positions_in =
      p.positions_in == nullptr ? nullptr : p.positions_in + unit * p.positions_stride;
  int32_t* positions_out = p.positions_out + unit * p.positions_stride;
  float* scores = p.scores == nullptr ? nullptr : p.scores + unit * p.scores_stride;
  // At most one row per thread, which carries its position and score.
  const int rows_per_round =
      max(1, min(kCompactThreads, kCompactThreads * kCompactVecs / p.vecs_per_row));

  for (int i0 = 0; i0 < n; i0 += rows_per_round) {
    const int rows = min(rows_per_round, n - i0);
    const int items = rows * p.vecs_per_row;
    uint4 k[kCompactVecs] = {};
    uint4 v[kCompactVecs] = {};
#pragma unroll
    for (int u = 0; u < kCompactVecs; ++u) {
      const int item = tid + u * kCompactThreads;
      if (item < items) {
        const int i = i0 + item / p.vecs_per_row;
        const int from = keep[i];
        if (from != i) {
          const int vec = item % p.vecs_per_row;
          k[u] = *CacheVec(p.k_cache, p, table, kv_head, from, vec);
          v[u] = *CacheVec(p.v_cache, p, table, kv_head, from, vec);
        }
      }
    }
    int position = -1;
    float score = 0.0f;
    const bool carrier = tid < rows;
    if (carrier) {
      const int from = keep[i0 + tid];
      position = positions_in == nullptr ? from : positions_in[from];
      if (scores != nullptr) score = scores[from];
    }
    __syncthreads();
#pragma unroll
    for (int u = 0; u < kCompactVecs; ++u) {
      const int item = tid + u * kCompactThreads;
      if (item < items) {
        const int i = i0 + item / p.vecs_per_row;
        if (keep[i] != i) {
          const int vec = item % p.vecs_per_row;
          *CacheVec(p.k_cache, p, table, kv_head, i, vec) = k[u];
          *CacheVec(p.v_cache, p, table, kv_head, i, vec) = v[u];
        }
      }
    }
    if (carrier) {
      positions_out[i0 + tid] = position;
      if (scores != nullptr) scores[i0 + tid] = score;
    }
  }
  // Every read happened before the last round's barrier.
  for (int i = n + tid; i < p.max_slots; i += kCompactThreads) {
    positions_out[i] = -1;
    if (scores != nullptr) scores[i] = 0.0f;
  }
}

// Grid: (token of the ring's share, sequence).
__global__ void __launch_bounds__(kThreads)
    PushQueryRingKernel(const __nv_bfloat16* q, int64_t q_stride, const int32_t* query_start,
                        const int32_t* num_tokens, int max_tokens, int vecs_per_row,
                        __nv_bfloat16* ring, int64_t ring_seq_stride, int64_t ring_row_stride,
                        int ring_size) {
  const int t = static_cast<int>(blockIdx.x);
  const int seq = static_cast<int>(blockIdx.y);
  const int n = Clamp(query_start[seq + 1] - query_start[seq], max_tokens);
  const int copied = min(n, ring_size);
  if (t >= copied) return;
  const int i = n - copied + t;
  const int64_t position = static_cast<int64_t>(num_tokens[seq]) + i;
  const uint4* src =
      reinterpret_cast<const uint4*>(q + (static_cast<int64_t>(query_start[seq]) + i) * q_stride);
  uint4* dst = reinterpret_cast<uint4*>(ring + seq * ring_seq_stride +
                                        (position % ring_size) * ring_row_stride);
  for (int v = static_cast<int>(threadIdx.x); v < vecs_per_row; v += kThreads) dst[v] = src[v];
}

}  // namespace

absl::Status SelectLowestCandidates(const CandidateArgs& a, const float* scores,
                                    int64_t scores_stride, int32_t* victims, cudaStream_t stream) {
  constexpr const char* kName = "SelectLowestCandidates";
  RETURN_IF_ERROR(CheckCandidates(kName, a, scores, scores_stride));
  if (a.num_seqs == 0) return absl::OkStatus();
  const dim3 grid(static_cast<unsigned>(a.num_kv_heads), static_cast<unsigned>(a.num_seqs));
  LowestCandidateKernel<<<grid, kSelectThreads, 0, stream>>>(
      MakeCandidateParams(a, scores, scores_stride), victims);
  return LaunchStatus("LowestCandidateKernel");
}

absl::Status SelectKeepLists(const CandidateArgs& a, const int32_t* keep, const float* scores,
                             int64_t scores_stride, int32_t* keep_lists, int64_t keep_stride,
                             int32_t* keep_counts, int32_t* victims, cudaStream_t stream) {
  constexpr const char* kName = "SelectKeepLists";
  RETURN_IF_ERROR(CheckCandidates(kName, a, scores, scores_stride));
  RETURN_IF_ERROR(Require(keep_stride >= a.max_slots, kName, "keep_stride >= max_slots"));
  if (a.num_seqs == 0) return absl::OkStatus();
  const dim3 grid(static_cast<unsigned>(a.num_kv_heads), static_cast<unsigned>(a.num_seqs));
  KeepListKernel<<<grid, kSelectThreads, 0, stream>>>(MakeCandidateParams(a, scores, scores_stride),
                                                      keep, keep_lists, keep_stride, keep_counts,
                                                      victims);
  return LaunchStatus("KeepListKernel");
}

absl::Status CompactKv(const CompactKvArgs& a, const int32_t* keep_lists, int64_t keep_stride,
                       const int32_t* keep_counts, const int32_t* positions_in,
                       int32_t* positions_out, int64_t positions_stride, float* scores,
                       int64_t scores_stride, cudaStream_t stream) {
  constexpr const char* kName = "CompactKv";
  RETURN_IF_ERROR(Require(a.num_seqs >= 0 && a.num_seqs <= 65535, kName, "0 <= num_seqs <= 65535"));
  RETURN_IF_ERROR(
      Require(a.num_kv_heads > 0 && a.num_kv_heads <= 65535, kName, "0 < num_kv_heads <= 65535"));
  RETURN_IF_ERROR(Require(a.head_dim > 0 && a.head_dim % kVec == 0 && a.head_dim <= 4096, kName,
                          "0 < head_dim <= 4096, a multiple of 8"));
  RETURN_IF_ERROR(
      Require(a.block_size > 0 && a.block_size <= (1 << 20) && a.block_table_stride >= 0, kName,
              "0 < block_size <= 2^20 and block_table_stride >= 0"));
  RETURN_IF_ERROR(Require(a.max_slots >= 0 && a.max_slots <= (int64_t{1} << 30), kName,
                          "0 <= max_slots <= 2^30"));
  RETURN_IF_ERROR(Require(keep_stride >= a.max_slots, kName, "keep_stride >= max_slots"));
  RETURN_IF_ERROR(Require(positions_out != nullptr && positions_stride >= a.max_slots, kName,
                          "positions_out with positions_stride >= max_slots"));
  RETURN_IF_ERROR(Require(scores == nullptr || scores_stride >= a.max_slots, kName,
                          "scores_stride >= max_slots"));
  RETURN_IF_ERROR(
      Require(Aligned16(a.k_cache) && Aligned16(a.v_cache), kName, "16-byte aligned caches"));
  if (a.num_seqs == 0) return absl::OkStatus();
  CompactParams p;
  p.k_cache = a.k_cache;
  p.v_cache = a.v_cache;
  p.block_tables = a.block_tables;
  p.block_table_stride = a.block_table_stride;
  p.max_slots = static_cast<int>(a.max_slots);
  p.block_size = static_cast<int>(a.block_size);
  p.num_kv_heads = static_cast<int>(a.num_kv_heads);
  p.vecs_per_row = static_cast<int>(a.head_dim / kVec);
  p.keep_lists = keep_lists;
  p.keep_stride = keep_stride;
  p.keep_counts = keep_counts;
  p.positions_in = positions_in;
  p.positions_out = positions_out;
  p.positions_stride = positions_stride;
  p.scores = scores;
  p.scores_stride = scores_stride;
  const dim3 grid(static_cast<unsigned>(a.num_kv_heads), static_cast<unsigned>(a.num_seqs));
  CompactKernel<<<grid, kCompactThreads, 0, stream>>>(p);
  return LaunchStatus("CompactKernel");
}

absl::Status PushQueryRing(const __nv_bfloat16* q, int64_t q_stride, const int32_t* query_start,
                           const int32_t* num_tokens, int64_t num_seqs, int64_t max_tokens,
                           int64_t row_elems, __nv_bfloat16* ring, int64_t ring_seq_stride,
                           int64_t ring_row_stride, int64_t ring_size, cudaStream_t stream) {
  constexpr const char* kName = "PushQueryRing";
  RETURN_IF_ERROR(Require(num_seqs >= 0 && num_seqs <= 65535, kName, "0 <= num_seqs <= 65535"));
  RETURN_IF_ERROR(
      Require(max_tokens >= 0 && max_tokens <= INT_MAX, kName, "0 <= max_tokens < 2^31"));
  RETURN_IF_ERROR(Require(ring_size > 0 && ring_size <= (1 << 20), kName, "0 < ring_size <= 2^20"));
  RETURN_IF_ERROR(Require(row_elems > 0 && row_elems % kVec == 0 && q_stride >= row_elems &&
                              ring_row_stride >= row_elems,
                          kName, "row_elems a positive multiple of 8 within both strides"));
  RETURN_IF_ERROR(Require(q_stride % kVec == 0 && ring_row_stride % kVec == 0 &&
                              ring_seq_stride % kVec == 0 && ring_seq_stride >= 0,
                          kName, "strides multiples of 8"));
  RETURN_IF_ERROR(Require(Aligned16(q) && Aligned16(ring), kName, "16-byte aligned q and ring"));
  const int64_t rows = std::min(max_tokens, ring_size);
  if (num_seqs == 0 || rows == 0) return absl::OkStatus();
  const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>(num_seqs));
  PushQueryRingKernel<<<grid, kThreads, 0, stream>>>(
      q, q_stride, query_start, num_tokens, static_cast<int>(max_tokens),
      static_cast<int>(row_elems / kVec), ring, ring_seq_stride, ring_row_stride,
      static_cast<int>(ring_size));
  return LaunchStatus("PushQueryRingKernel");
}

}  // namespace morphserve::kernels::cuda
