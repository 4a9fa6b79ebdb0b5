// Per-token vector operations of the Llama block, on f32.
#ifndef MORPHSERVE_KERNELS_CPU_ELEMENTWISE_H_
#define MORPHSERVE_KERNELS_CPU_ELEMENTWISE_H_

#include <cstdint>

namespace morphserve::kernels {

// out = x / sqrt(mean(x^2) + eps) * weight, over n elements. out may alias x.
void RmsNorm(const float* x, const float* weight, float eps, int64_t n, float* out);

// residual += delta; then out = RmsNorm(residual). (Fused add + norm.)
void AddRmsNorm(float* residual, const float* delta, const float* weight, float eps,
                int64_t n, float* out);

// out[i] = silu(gate[i]) * up[i]; out may alias gate or up.
void SiluMul(const float* gate, const float* up, int64_t n, float* out);

// x[i] += y[i]
void Add(float* x, const float* y, int64_t n);

// In-place softmax over n values; returns the log of the normaliser
// (logsumexp), so that log-probabilities are x - result before the call.
float SoftmaxInPlace(float* x, int64_t n);

// log(sum exp(x[i])) without changing x; the maximum when it is not finite.
float LogSumExp(const float* x, int64_t n);

// The first index of the largest value, NaN ignored; 0 when there is none.
int64_t ArgMax(const float* x, int64_t n);

// Rotary embedding pairs. kAdjacent rotates (x[2i], x[2i+1]) (GGUF Llama, with
// its permuted Q/K rows); kHalf rotates (x[i], x[i + rot/2]) (Hugging Face).
enum class RopeStyle { kAdjacent, kHalf };

// Rotates the first `rot_dim` dims of each of `n_heads` heads (head_dim apart)
// by angle pos * inv_freq[i], i in [0, rot_dim/2). Scaling (linear, llama3) is
// folded into inv_freq by the caller.
void ApplyRope(float* x, int64_t n_heads, int64_t head_dim, int64_t rot_dim, int64_t pos,
               const float* inv_freq, RopeStyle style);

}  // namespace morphserve::kernels

#endif  // MORPHSERVE_KERNELS_CPU_ELEMENTWISE_H_
