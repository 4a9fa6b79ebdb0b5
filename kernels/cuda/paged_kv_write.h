// Writing a step's keys and values into one layer's paged KV cache
// (device pointers, queued on `stream`; the status covers argument checks
// and the launch).
//
// Cache layout as on the CPU (kernels/cpu/paged_attention.h), in bf16:
// [num_blocks][num_kv_heads][block_size][head_dim].
#ifndef MORPHSERVE_KERNELS_CUDA_PAGED_KV_WRITE_H_
#define MORPHSERVE_KERNELS_CUDA_PAGED_KV_WRITE_H_

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "absl/status/status.h"

namespace morphserve::kernels::cuda {

// Copies token t's KV head h (head_dim values at k + t * kv_stride +
// h * head_dim, and likewise for v) into cache slot slot_mapping[t][h],
// a flat slot: block id * block_size + offset in the block. The mapping is
// per KV head because bounded KV policies recycle a different slot in each.
// A slot outside [0, num_blocks * block_size) is skipped (-1 marks a padded
// token). slot_mapping: int32 [n_tokens][num_kv_heads]; k, v: bf16 (slices
// of a fused QKV product are fine); k_cache, v_cache: bf16, one layer.
absl::Status WritePagedKv(const __nv_bfloat16* k, const __nv_bfloat16* v, int64_t kv_stride,
                          const int32_t* slot_mapping, __nv_bfloat16* k_cache,
                          __nv_bfloat16* v_cache, int64_t num_blocks, int64_t block_size,
                          int64_t num_kv_heads, int64_t head_dim, int64_t n_tokens,
                          cudaStream_t stream);

}  // namespace morphserve::kernels::cuda

#endif  // MORPHSERVE_KERNELS_CUDA_PAGED_KV_WRITE_H_
