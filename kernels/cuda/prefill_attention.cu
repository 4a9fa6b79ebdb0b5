#include "kernels/cuda/prefill_attention.h"

#include <cstddef>
#include <cstdint>

#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/launch_internal.h"
#include "kernels/cuda/mma_internal.cuh"
#include "kernels/cuda/paged_cache_internal.cuh"
#include "kernels/cuda/reduce_internal.cuh"

namespace morphserve::kernels::cuda {
namespace {

using internal::Aligned16;
using internal::kVec;
using internal::MmaBf16;
using internal::PagedRow;
using internal::Require;

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * internal::kWarpSize;
// Query rows per thread block: each warp owns the 16 rows of one fragment.
constexpr int kRows = 16 * kWarps;
constexpr float kLog2e = 1.4426950408889634f;

// Keys per shared-memory tile; fewer for head_dim 256, whose output
// accumulators already take 128 registers a thread.
template <int kHeadDim>
constexpr int kKeyTile = kHeadDim <= 128 ? 64 : 32;

// Shared-memory row stride in bf16. The 8 extra values (16 bytes) shift
// consecutive rows by 4 banks, so the 8 rows of a fragment load fall in
// different banks.
template <int kHeadDim>
constexpr int kRowStride = kHeadDim + 8;

// The query tile, then the key tile, then the value tile.
template <int kHeadDim>
constexpr size_t kSharedBytes =
    static_cast<size_t>(kRows + 2 * kKeyTile<kHeadDim>) * kRowStride<kHeadDim> * sizeof(uint16_t);

struct Params {
  const __nv_bfloat16* k_cache;
  const __nv_bfloat16* v_cache;
  const int32_t* block_tables;
  int64_t block_table_stride;
  const int32_t* query_offsets;
  const int32_t* chunk_starts;
  int max_query_len;
  int block_size;
  int num_heads;
  int num_kv_heads;
  int group;         // query heads per KV head
  float scale_log2;  // scale * log2(e): the softmax runs on exp2
  const __nv_bfloat16* q;
  int64_t q_stride;
  __nv_bfloat16* out;
};

// Two bf16 (as bits) from shared memory, the first in the low half.
__device__ __forceinline__ uint32_t Load32(const uint16_t* src) {
  return *reinterpret_cast<const uint32_t*>(src);
}
__device__ __forceinline__ uint32_t Pack(uint16_t lo, uint16_t hi) {
  return static_cast<uint32_t>(lo) | static_cast<uint32_t>(hi) << 16;
}

// 16 bytes from global to shared memory; zeros where `valid` is false.
__device__ __forceinline__ void Copy16(const __nv_bfloat16* src, bool valid, uint16_t* dst) {
  *reinterpret_cast<uint4*>(dst) =
      valid ? *reinterpret_cast<const uint4*>(src) : make_uint4(0, 0, 0, 0);
}

// (lo, hi) rounded to bf16 as one A-fragment register; `sum` gains the
// rounded values, so that the weights the product uses are the ones that
// get normalised.
__device__ __forceinline__ uint32_t PackProbs(float lo, float hi, float& sum) {
  const __nv_bfloat162 pair = __floats2bfloat162_rn(lo, hi);
  sum += __low2float(pair) + __high2float(pair);
  return *reinterpret_cast<const uint32_t*>(&pair);
}

// Grid: (row tile, KV head, sequence). A sequence's query rows are its
// chunk's tokens times the `group` query heads of the KV head, token-major:
// row r is token r / group, query head kv_head * group + r % group. A block
// takes kRows of them; warp w the 16 rows from 16 w. For each tile of kKeys
// cache slots up to the block's last token:
//   1. the block copies the keys and values into shared memory;
//   2. each warp scores its rows against the keys (S = Q K^T, tensor cores),
//      masks the slots past each row's token, and updates its rows' running
//      maxima and sums, rescaling its output accumulators;
//   3. each warp adds P V to its accumulators, P being S's exponentials
//      still in registers.
// The output is divided by the sums at the end.
template <int kHeadDim>
__global__ void __launch_bounds__(kThreads) PrefillAttentionKernel(const Params p) {
  constexpr int kKeys = kKeyTile<kHeadDim>;
  constexpr int kStride = kRowStride<kHeadDim>;
  constexpr int kVecsPerRow = kHeadDim / kVec;

  const int seq = static_cast<int>(blockIdx.z);
  const int kv_head = static_cast<int>(blockIdx.y);
  const int q_begin = p.query_offsets[seq];
  const int n = min(p.query_offsets[seq + 1] - q_begin, p.max_query_len);
  const int rows = n * p.group;
  // Later rows attend to more slots: the first blocks of the grid take the
  // last tiles, so that the short ones fill in at the end.
  const int row0 = static_cast<int>(gridDim.x - 1 - blockIdx.x) * kRows;
  // The same for the whole block, so no thread is left waiting at a barrier.
  if (row0 >= rows) return;
  const int start = p.chunk_starts[seq];
  // Slots [0, limit(r)) are the ones tile row r attends to. Rows past the
  // chunk (in its last tile) are computed as its last token and not stored,
  // so that no row reads a slot its sequence has not written.
  auto limit = [&](int r) { return start + min((row0 + r) / p.group, n - 1) + 1; };
  const int tile_end = limit(kRows - 1);  // slots any row attends to
  const int mask_from = limit(0);         // slots below it every row attends to

  extern __shared__ __align__(16) uint16_t shared[];
  uint16_t* const q_tile = shared;
  uint16_t* const k_tile = q_tile + kRows * kStride;
  uint16_t* const v_tile = k_tile + kKeys * kStride;

  for (int i = static_cast<int>(threadIdx.x); i < kRows * kVecsPerRow; i += kThreads) {
    const int r = i / kVecsPerRow;
    const int col = i % kVecsPerRow * kVec;
    const int row = row0 + r;
    const int token = q_begin + row / p.group;
    const int head = kv_head * p.group + row % p.group;
    Copy16(p.q + token * p.q_stride + head * kHeadDim + col, row < rows,
           &q_tile[r * kStride + col]);
  }

  const int warp = static_cast<int>(threadIdx.x) / internal::kWarpSize;
  const int lane = static_cast<int>(threadIdx.x) % internal::kWarpSize;
  const int g = lane / 4;  // this lane's fragment rows: g and g + 8
  const int t = lane % 4;
  const int warp_row = warp * 16;
  const int row_limit[2] = {limit(warp_row + g), limit(warp_row + g + 8)};
  const int warp_end = limit(warp_row + 15);
  const int32_t* table = p.block_tables + seq * p.block_table_stride;

  float acc[kHeadDim / 8][4] = {};  // output fragments, dims 8 nd .. 8 nd + 7
  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.0f, 0.0f};  // this lane's share; the quad's sum at the end

  for (int key0 = 0; key0 < tile_end; key0 += kKeys) {
    __syncthreads();  // the previous tile is consumed (and the query tile written)
    // 1. Keys and values; zeros past the block's last slot, never read.
    for (int i = static_cast<int>(threadIdx.x); i < kKeys * kVecsPerRow; i += kThreads) {
      const int r = i / kVecsPerRow;
      const int col = i % kVecsPerRow * kVec;
      const int slot = key0 + r;
      const bool valid = slot < tile_end;
      const int row_slot = valid ? slot : 0;
      const __nv_bfloat16* key =
          PagedRow<kHeadDim>(p.k_cache, table, p.block_size, p.num_kv_heads, kv_head, row_slot);
      const __nv_bfloat16* value =
          PagedRow<kHeadDim>(p.v_cache, table, p.block_size, p.num_kv_heads, kv_head, row_slot);
      Copy16(key + col, valid, &k_tile[r * kStride + col]);
      Copy16(value + col, valid, &v_tile[r * kStride + col]);
    }
    __syncthreads();
    // Every slot of this tile lies past the warp's rows (the same for the
    // whole warp, so the fragments below have all their lanes).
    if (key0 >= warp_end) continue;

    // 2. Scores: s[j] is the fragment of keys key0 + 8 j .. key0 + 8 j + 7.
    float s[kKeys / 8][4] = {};
#pragma unroll
    for (int kk = 0; kk < kHeadDim; kk += 16) {
      const uint16_t* q_at = &q_tile[(warp_row + g) * kStride + kk + 2 * t];
      const uint32_t a[4] = {Load32(q_at), Load32(q_at + 8 * kStride), Load32(q_at + 8),
                             Load32(q_at + 8 * kStride + 8)};
#pragma unroll
      for (int j = 0; j < kKeys / 8; ++j) {
        const uint16_t* k_at = &k_tile[(8 * j + g) * kStride + kk + 2 * t];
        const uint32_t b[2] = {Load32(k_at), Load32(k_at + 8)};
        MmaBf16(s[j], a, b);
      }
    }
    const bool masked = key0 + kKeys > mask_from;
#pragma unroll
    for (int h = 0; h < 2; ++h) {  // fragment row g + 8 h: elements 2 h, 2 h + 1
      float tile_max = -INFINITY;
#pragma unroll
      for (int j = 0; j < kKeys / 8; ++j) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int slot = key0 + 8 * j + 2 * t + e;
          float& x = s[j][2 * h + e];
          x = masked && slot >= row_limit[h] ? -INFINITY : x * p.scale_log2;
          tile_max = fmaxf(tile_max, x);
        }
      }
      // The quad of lanes g * 4 .. g * 4 + 3 holds the row.
      tile_max = internal::WarpMax<4>(tile_max);
      // Finite: slot 0 is in every row's first tile.
      const float new_max = fmaxf(row_max[h], tile_max);
      const float rescale = exp2f(row_max[h] - new_max);  // 0 on the first tile
      row_max[h] = new_max;
      row_sum[h] *= rescale;
#pragma unroll
      for (int nd = 0; nd < kHeadDim / 8; ++nd) {
        acc[nd][2 * h] *= rescale;
        acc[nd][2 * h + 1] *= rescale;
      }
#pragma unroll
      for (int j = 0; j < kKeys / 8; ++j) {
        s[j][2 * h] = exp2f(s[j][2 * h] - new_max);
        s[j][2 * h + 1] = exp2f(s[j][2 * h + 1] - new_max);
      }
    }

    // 3. acc += P V, 16 keys at a time: score fragments 2 kk and 2 kk + 1
    // form the A fragment.
#pragma unroll
    for (int kk = 0; kk < kKeys / 16; ++kk) {
      const uint32_t a[4] = {PackProbs(s[2 * kk][0], s[2 * kk][1], row_sum[0]),
                             PackProbs(s[2 * kk][2], s[2 * kk][3], row_sum[1]),
                             PackProbs(s[2 * kk + 1][0], s[2 * kk + 1][1], row_sum[0]),
                             PackProbs(s[2 * kk + 1][2], s[2 * kk + 1][3], row_sum[1])};
#pragma unroll
      for (int nd = 0; nd < kHeadDim / 8; ++nd) {
        const uint16_t* v_at = &v_tile[(16 * kk + 2 * t) * kStride + 8 * nd + g];
        const uint32_t b[2] = {Pack(v_at[0], v_at[kStride]),
                               Pack(v_at[8 * kStride], v_at[9 * kStride])};
        MmaBf16(acc[nd], a, b);
      }
    }
  }

#pragma unroll
  for (int h = 0; h < 2; ++h) {
    // At least 1: each row's largest weight is exp2(0).
    const float inv = 1.0f / internal::WarpSum<4>(row_sum[h]);
    const int row = row0 + warp_row + g + 8 * h;
    if (row >= rows) continue;
    const int token = q_begin + row / p.group;
    const int head = kv_head * p.group + row % p.group;
    __nv_bfloat16* dst =
        p.out + (static_cast<int64_t>(token) * p.num_heads + head) * kHeadDim + 2 * t;
#pragma unroll
    for (int nd = 0; nd < kHeadDim / 8; ++nd) {
      *reinterpret_cast<__nv_bfloat162*>(dst + 8 * nd) =
          __floats2bfloat162_rn(acc[nd][2 * h] * inv, acc[nd][2 * h + 1] * inv);
    }
  }
}

template <int kHeadDim>
absl::Status Launch(const Params& p, int64_t num_seqs, cudaStream_t stream) {
  constexpr size_t kShared = kSharedBytes<kHeadDim>;
  // Above 48 KiB a kernel has to opt in to its dynamic shared memory.
  RETURN_IF_CUDA_ERROR(cudaFuncSetAttribute(PrefillAttentionKernel<kHeadDim>,
                                            cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(kShared)));
  const int64_t max_rows = int64_t{p.max_query_len} * p.group;
  const dim3 grid(static_cast<unsigned>((max_rows + kRows - 1) / kRows),
                  static_cast<unsigned>(p.num_kv_heads), static_cast<unsigned>(num_seqs));
  PrefillAttentionKernel<kHeadDim><<<grid, kThreads, kShared, stream>>>(p);
  return LaunchStatus("PrefillAttentionKernel");
}

}  // namespace

absl::Status PrefillAttention(const PrefillAttentionArgs& a, const __nv_bfloat16* q,
                              int64_t q_stride, __nv_bfloat16* out, cudaStream_t stream) {
  constexpr const char* kName = "PrefillAttention";
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
  // Query rows (tokens times group) are counted in int.
  RETURN_IF_ERROR(
      Require(a.max_query_len >= 0 &&
                  a.max_query_len * (a.num_heads / a.num_kv_heads) <= (int64_t{1} << 30),
              kName, "0 <= max_query_len, times the GQA group at most 2^30"));
  RETURN_IF_ERROR(Require(q_stride >= a.num_heads * a.head_dim && q_stride % kVec == 0, kName,
                          "q_stride >= num_heads * head_dim, a multiple of 8"));
  RETURN_IF_ERROR(Require(Aligned16(a.k_cache) && Aligned16(a.v_cache) && Aligned16(q), kName,
                          "16-byte aligned caches and q"));
  RETURN_IF_ERROR(Require(reinterpret_cast<uintptr_t>(out) % 4 == 0, kName, "4-byte aligned out"));
  if (a.num_seqs == 0 || a.max_query_len == 0) return absl::OkStatus();

  Params p;
  p.k_cache = a.k_cache;
  p.v_cache = a.v_cache;
  p.block_tables = a.block_tables;
  p.block_table_stride = a.block_table_stride;
  p.query_offsets = a.query_offsets;
  p.chunk_starts = a.chunk_starts;
  p.max_query_len = static_cast<int>(a.max_query_len);
  p.block_size = static_cast<int>(a.block_size);
  p.num_heads = static_cast<int>(a.num_heads);
  p.num_kv_heads = static_cast<int>(a.num_kv_heads);
  p.group = static_cast<int>(a.num_heads / a.num_kv_heads);
  p.scale_log2 = a.scale * kLog2e;
  p.q = q;
  p.q_stride = q_stride;
  p.out = out;
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
