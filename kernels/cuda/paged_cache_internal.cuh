// Reading the paged bf16 cache, shared by the kernels that stream its rows.
// Layout as on the CPU: [block][kv_head][slot][head_dim], addressed through
// a sequence's block table.
#ifndef MORPHSERVE_KERNELS_CUDA_PAGED_CACHE_INTERNAL_CUH_
#define MORPHSERVE_KERNELS_CUDA_PAGED_CACHE_INTERNAL_CUH_

#include <cuda_bf16.h>

#include <cstdint>

namespace morphserve::kernels::cuda::internal {

// bf16 values per 16-byte load.
inline constexpr int kVec = 8;

// The 8 bf16 at `src` (16-byte aligned) as f32: a bf16 is the high half of
// the f32 with the same bits.
__device__ __forceinline__ void LoadVec(const __nv_bfloat16* src, float (&dst)[kVec]) {
  const uint4 raw = *reinterpret_cast<const uint4*>(src);
  const unsigned words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    dst[2 * i] = __uint_as_float(words[i] << 16);
    dst[2 * i + 1] = __uint_as_float(words[i] & 0xffff0000u);
  }
}

// The row of cache slot `slot` of KV head `kv_head`, for the sequence whose
// block table is `table`.
template <int kHeadDim>
__device__ __forceinline__ const __nv_bfloat16* PagedRow(const __nv_bfloat16* cache,
                                                         const int32_t* table, int block_size,
                                                         int num_kv_heads, int kv_head, int slot) {
  const int64_t block = table[slot / block_size];
  const int64_t offset = slot % block_size;
  return cache + ((block * num_kv_heads + kv_head) * block_size + offset) * kHeadDim;
}

}  // namespace morphserve::kernels::cuda::internal

#endif  // MORPHSERVE_KERNELS_CUDA_PAGED_CACHE_INTERNAL_CUH_
