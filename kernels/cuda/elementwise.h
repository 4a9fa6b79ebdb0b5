// Per-token vector operations of the Llama block on a batch of tokens.
//
// Each function takes the arguments of its kernels/cpu/elementwise.h
// namesake in the same order, batched: per-token vectors become
// [n_tokens][...] arrays, a per-token scalar becomes a device array, and
// n_tokens (with any row strides) and the stream come last. Pointers are
// device pointers; work is queued on `stream` and the returned status covers
// argument checks and the launch (not the kernel's run).
//
// Dtypes: the residual stream is f32; what feeds a matrix product (norm
// outputs, Q/K/V, the MLP's activations) is bf16. Norm weights stay f32:
// they are tiny and bf16 would round them. Arithmetic is f32 throughout.
#ifndef MORPHSERVE_KERNELS_CUDA_ELEMENTWISE_H_
#define MORPHSERVE_KERNELS_CUDA_ELEMENTWISE_H_

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "absl/status/status.h"
#include "kernels/cpu/elementwise.h"

namespace morphserve::kernels::cuda {

// out[t] = x[t] / sqrt(mean(x[t]^2) + eps) * weight for each of n_tokens
// rows of n. x: f32 [n_tokens][n]; weight: f32 [n]; out: bf16 [n_tokens][n].
absl::Status RmsNorm(const float* x, const float* weight, float eps, int64_t n, __nv_bfloat16* out,
                     int64_t n_tokens, cudaStream_t stream);

// residual[t] += delta[t]; then out[t] = RmsNorm(residual[t]).
// residual, delta: f32 [n_tokens][n]; weight: f32 [n]; out: bf16 [n_tokens][n].
absl::Status AddRmsNorm(float* residual, const float* delta, const float* weight, float eps,
                        int64_t n, __nv_bfloat16* out, int64_t n_tokens, cudaStream_t stream);

// out[t][i] = silu(gate[t][i]) * up[t][i] for i < n. gate and up are bf16
// rows `in_stride` elements apart (so both may sit in one fused gate|up
// product); out is bf16 [n_tokens][n] and overlaps neither.
absl::Status SiluMul(const __nv_bfloat16* gate, const __nv_bfloat16* up, int64_t n,
                     __nv_bfloat16* out, int64_t n_tokens, int64_t in_stride, cudaStream_t stream);

// Rotates, in place, the first rot_dim dims of each of the n_heads heads of
// every token by positions[t] * inv_freq[i] (pairs as in RopeStyle; scaling
// folded into inv_freq by the caller). x: bf16, token t's heads start at
// x + t * x_stride (so Q and K may be slices of a fused QKV product);
// positions: int32 [n_tokens]; inv_freq: f32 [rot_dim / 2].
absl::Status ApplyRope(__nv_bfloat16* x, int64_t n_heads, int64_t head_dim, int64_t rot_dim,
                       const int32_t* positions, const float* inv_freq, RopeStyle style,
                       int64_t n_tokens, int64_t x_stride, cudaStream_t stream);

// x[t][i] += bias[i] for i < n: the biases of a QKV product (families such
// as Qwen2 have them). x: bf16, token t's row at x + t * x_stride; bias: f32
// [n]. The sum is formed in f32 and rounded once.
absl::Status AddBias(__nv_bfloat16* x, const float* bias, int64_t n, int64_t n_tokens,
                     int64_t x_stride, cudaStream_t stream);

// out[r] = x[rows[r]] for r < n_rows: picks the rows whose logits a step
// wants. x: bf16 [*][n]; rows: int32 [n_rows], each a row of x; out: bf16
// [n_rows][n], overlapping x nowhere.
absl::Status GatherRows(const __nv_bfloat16* x, int64_t n, const int32_t* rows,
                        __nv_bfloat16* out, int64_t n_rows, cudaStream_t stream);

// base[offsets[i]] = values[i] for i < n: a step's few updates to a device
// table (a KV policy's slot positions). offsets, values: int32 [n]; offsets
// are distinct, so the order of the writes does not matter.
absl::Status ScatterInt32(int32_t* base, const int32_t* offsets, const int32_t* values,
                          int64_t n, cudaStream_t stream);

}  // namespace morphserve::kernels::cuda

#endif  // MORPHSERVE_KERNELS_CUDA_ELEMENTWISE_H_
