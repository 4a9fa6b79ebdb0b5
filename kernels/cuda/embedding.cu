#include "kernels/cuda/embedding.h"

#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/launch_internal.h"

namespace morphserve::kernels::cuda {
namespace {

constexpr int kThreads = 256;

// One block per token; its threads stride over the row (coalesced).
__global__ void __launch_bounds__(kThreads)
    EmbeddingGatherKernel(const __nv_bfloat16* table, int64_t vocab_size, int64_t dim,
                          const int32_t* ids, float* out) {
  const int32_t id = ids[blockIdx.x];
  float* row = out + static_cast<int64_t>(blockIdx.x) * dim;
  const bool valid = id >= 0 && id < vocab_size;
  const __nv_bfloat16* src = table + (valid ? static_cast<int64_t>(id) * dim : 0);
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) {
    row[i] = valid ? __bfloat162float(src[i]) : 0.0f;
  }
}

}  // namespace

absl::Status EmbeddingGather(const __nv_bfloat16* table, int64_t vocab_size, int64_t dim,
                             const int32_t* ids, float* out, int64_t n_tokens,
                             cudaStream_t stream) {
  RETURN_IF_ERROR(internal::Require(vocab_size > 0 && dim > 0, "EmbeddingGather",
                                    "vocab_size > 0 and dim > 0"));
  RETURN_IF_ERROR(internal::Require(n_tokens >= 0 && n_tokens <= INT32_MAX, "EmbeddingGather",
                                    "0 <= n_tokens < 2^31"));
  if (n_tokens == 0) return absl::OkStatus();
  EmbeddingGatherKernel<<<static_cast<unsigned>(n_tokens), kThreads, 0, stream>>>(table, vocab_size,
                                                                                  dim, ids, out);
  return LaunchStatus("EmbeddingGatherKernel");
}

}  // namespace morphserve::kernels::cuda
