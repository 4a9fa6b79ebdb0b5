// Token embedding lookup on a batch of tokens (device pointers, queued on
// `stream`; the status covers argument checks and the launch).
#ifndef MORPHSERVE_KERNELS_CUDA_EMBEDDING_H_
#define MORPHSERVE_KERNELS_CUDA_EMBEDDING_H_

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "absl/status/status.h"

namespace morphserve::kernels::cuda {

// out[t] = table[ids[t]] widened to f32, the start of the residual stream.
// table: bf16 [vocab_size][dim]; ids: int32 [n_tokens]; out: f32
// [n_tokens][dim]. Ids are checked by the tokenizer; one outside
// [0, vocab_size) gives a row of zeros rather than a read out of bounds.
absl::Status EmbeddingGather(const __nv_bfloat16* table, int64_t vocab_size, int64_t dim,
                             const int32_t* ids, float* out, int64_t n_tokens, cudaStream_t stream);

}  // namespace morphserve::kernels::cuda

#endif  // MORPHSERVE_KERNELS_CUDA_EMBEDDING_H_
