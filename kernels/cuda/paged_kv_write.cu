#include "kernels/cuda/paged_kv_write.h"

#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/launch_internal.h"

namespace morphserve::kernels::cuda {
namespace {

constexpr int kThreads = 128;

// One block per token; its threads stride over the token's
// num_kv_heads * head_dim values, so each head's row is copied by
// consecutive threads into its contiguous cache row.
__global__ void __launch_bounds__(kThreads)
    WritePagedKvKernel(const __nv_bfloat16* k, const __nv_bfloat16* v, int64_t kv_stride,
                       const int32_t* slot_mapping, __nv_bfloat16* k_cache, __nv_bfloat16* v_cache,
                       int64_t num_slots, int64_t block_size, int64_t num_kv_heads,
                       int64_t head_dim) {
  const int64_t t = blockIdx.x;
  const __nv_bfloat16* k_row = k + t * kv_stride;
  const __nv_bfloat16* v_row = v + t * kv_stride;
  const int32_t* slots = slot_mapping + t * num_kv_heads;
  for (int64_t i = threadIdx.x; i < num_kv_heads * head_dim; i += blockDim.x) {
    const int64_t h = i / head_dim;
    const int64_t slot = slots[h];
    if (slot < 0 || slot >= num_slots) continue;
    const int64_t block = slot / block_size;
    const int64_t offset = slot - block * block_size;
    const int64_t at = ((block * num_kv_heads + h) * block_size + offset) * head_dim + i % head_dim;
    k_cache[at] = k_row[i];
    v_cache[at] = v_row[i];
  }
}

}  // namespace

absl::Status WritePagedKv(const __nv_bfloat16* k, const __nv_bfloat16* v, int64_t kv_stride,
                          const int32_t* slot_mapping, __nv_bfloat16* k_cache,
                          __nv_bfloat16* v_cache, int64_t num_blocks, int64_t block_size,
                          int64_t num_kv_heads, int64_t head_dim, int64_t n_tokens,
                          cudaStream_t stream) {
  RETURN_IF_ERROR(
      internal::Require(num_blocks > 0 && block_size > 0 && num_kv_heads > 0 && head_dim > 0,
                        "WritePagedKv", "a non-empty cache shape"));
  RETURN_IF_ERROR(internal::Require(kv_stride >= num_kv_heads * head_dim, "WritePagedKv",
                                    "kv_stride >= num_kv_heads * head_dim"));
  RETURN_IF_ERROR(internal::Require(n_tokens >= 0 && n_tokens <= INT32_MAX, "WritePagedKv",
                                    "0 <= n_tokens < 2^31"));
  if (n_tokens == 0) return absl::OkStatus();
  WritePagedKvKernel<<<static_cast<unsigned>(n_tokens), kThreads, 0, stream>>>(
      k, v, kv_stride, slot_mapping, k_cache, v_cache, num_blocks * block_size, block_size,
      num_kv_heads, head_dim);
  return LaunchStatus("WritePagedKvKernel");
}

}  // namespace morphserve::kernels::cuda
