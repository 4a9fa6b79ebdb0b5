#include "kernels/cuda/elementwise.h"

#include <type_traits>

#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/launch_internal.h"
#include "kernels/cuda/reduce_internal.cuh"

namespace morphserve::kernels::cuda {
namespace {

using internal::GridStrideBlocks;
using internal::Require;

constexpr int kNormThreads = 256;
constexpr int kElementThreads = 256;

// One block per token; its threads stride over the row (coalesced), and the
// sum of squares is reduced across the block. With kAddDelta the row is
// residual += delta, written back before it is normalised; each thread
// reads back only what it wrote.
template <bool kAddDelta>
__global__ void __launch_bounds__(kNormThreads)
    RmsNormKernel(std::conditional_t<kAddDelta, float*, const float*> x, const float* delta,
                  const float* weight, float eps, int64_t n, __nv_bfloat16* out) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * n;
  float sum_sq = 0.0f;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    float v = x[row + i];
    if constexpr (kAddDelta) {
      v += delta[row + i];
      x[row + i] = v;
    }
    sum_sq += v * v;
  }
  __shared__ float scratch[internal::kWarpSize];
  const float total = internal::BlockSum(sum_sq, scratch);
  const float scale = 1.0f / sqrtf(total / static_cast<float>(n) + eps);
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    out[row + i] = __float2bfloat16(x[row + i] * scale * weight[i]);
  }
}

// Grid-stride loop over the n_tokens * n outputs, one per thread.
__global__ void __launch_bounds__(kElementThreads)
    SiluMulKernel(const __nv_bfloat16* gate, const __nv_bfloat16* up, int64_t n, __nv_bfloat16* out,
                  int64_t total, int64_t in_stride) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += step) {
    const int64_t t = idx / n;
    const int64_t in = t * in_stride + (idx - t * n);
    const float g = __bfloat162float(gate[in]);
    const float u = __bfloat162float(up[in]);
    // expf(-g) overflows to inf for very negative g, giving silu = -0.
    out[idx] = __float2bfloat16(g / (1.0f + expf(-g)) * u);
  }
}

// Grid-stride loop over (token, head, pair), one rotation per thread;
// consecutive threads take consecutive pairs of a head.
__global__ void __launch_bounds__(kElementThreads)
    RopeKernel(__nv_bfloat16* x, int64_t n_heads, int64_t head_dim, int64_t half,
               const int32_t* positions, const float* inv_freq, RopeStyle style, int64_t total,
               int64_t x_stride) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += step) {
    const int64_t pair = idx % half;
    const int64_t token_head = idx / half;
    const int64_t head = token_head % n_heads;
    const int64_t t = token_head / n_heads;
    // The angle is formed in f32, as on the CPU; sincosf is the accurate
    // version (no fast math), which large positions need.
    const float theta = static_cast<float>(positions[t]) * inv_freq[pair];
    float s;
    float c;
    sincosf(theta, &s, &c);
    __nv_bfloat16* v = x + t * x_stride + head * head_dim;
    const int64_t ia = style == RopeStyle::kAdjacent ? 2 * pair : pair;
    const int64_t ib = style == RopeStyle::kAdjacent ? 2 * pair + 1 : pair + half;
    const float a = __bfloat162float(v[ia]);
    const float b = __bfloat162float(v[ib]);
    v[ia] = __float2bfloat16(a * c - b * s);
    v[ib] = __float2bfloat16(a * s + b * c);
  }
}

// Grid-stride loop over the n_tokens * n outputs: x[t][i] += bias[i].
__global__ void __launch_bounds__(kElementThreads)
    AddBiasKernel(__nv_bfloat16* x, const float* bias, int64_t n, int64_t total,
                  int64_t x_stride) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += step) {
    const int64_t t = idx / n;
    const int64_t i = idx - t * n;
    __nv_bfloat16& v = x[t * x_stride + i];
    v = __float2bfloat16(__bfloat162float(v) + bias[i]);
  }
}

// Grid-stride loop over the n_rows * n outputs: out[r] = x[rows[r]].
__global__ void __launch_bounds__(kElementThreads)
    GatherRowsKernel(const __nv_bfloat16* x, int64_t n, const int32_t* rows, __nv_bfloat16* out,
                     int64_t total) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += step) {
    const int64_t r = idx / n;
    out[idx] = x[static_cast<int64_t>(rows[r]) * n + (idx - r * n)];
  }
}

__global__ void __launch_bounds__(kElementThreads)
    ScatterInt32Kernel(int32_t* base, const int32_t* offsets, const int32_t* values, int64_t n) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += step) {
    base[offsets[i]] = values[i];
  }
}

template <bool kAddDelta>
absl::Status LaunchRmsNorm(std::conditional_t<kAddDelta, float*, const float*> x,
                           const float* delta, const float* weight, float eps, int64_t n,
                           __nv_bfloat16* out, int64_t n_tokens, cudaStream_t stream) {
  const char* name = kAddDelta ? "AddRmsNorm" : "RmsNorm";
  RETURN_IF_ERROR(Require(n > 0 && n_tokens >= 0, name, "n > 0 and n_tokens >= 0"));
  RETURN_IF_ERROR(Require(n_tokens <= INT32_MAX, name, "n_tokens < 2^31"));
  if (n_tokens == 0) return absl::OkStatus();
  RmsNormKernel<kAddDelta>
      <<<static_cast<unsigned>(n_tokens), kNormThreads, 0, stream>>>(x, delta, weight, eps, n, out);
  return LaunchStatus(kAddDelta ? "RmsNormKernel<add>" : "RmsNormKernel");
}

}  // namespace

absl::Status RmsNorm(const float* x, const float* weight, float eps, int64_t n, __nv_bfloat16* out,
                     int64_t n_tokens, cudaStream_t stream) {
  return LaunchRmsNorm<false>(x, nullptr, weight, eps, n, out, n_tokens, stream);
}

absl::Status AddRmsNorm(float* residual, const float* delta, const float* weight, float eps,
                        int64_t n, __nv_bfloat16* out, int64_t n_tokens, cudaStream_t stream) {
  return LaunchRmsNorm<true>(residual, delta, weight, eps, n, out, n_tokens, stream);
}

absl::Status SiluMul(const __nv_bfloat16* gate, const __nv_bfloat16* up, int64_t n,
                     __nv_bfloat16* out, int64_t n_tokens, int64_t in_stride, cudaStream_t stream) {
  RETURN_IF_ERROR(Require(n > 0 && n_tokens >= 0 && in_stride >= n, "SiluMul",
                          "n > 0, n_tokens >= 0 and in_stride >= n"));
  if (n_tokens == 0) return absl::OkStatus();
  const int64_t total = n_tokens * n;
  SiluMulKernel<<<GridStrideBlocks(total, kElementThreads), kElementThreads, 0, stream>>>(
      gate, up, n, out, total, in_stride);
  return LaunchStatus("SiluMulKernel");
}

absl::Status ApplyRope(__nv_bfloat16* x, int64_t n_heads, int64_t head_dim, int64_t rot_dim,
                       const int32_t* positions, const float* inv_freq, RopeStyle style,
                       int64_t n_tokens, int64_t x_stride, cudaStream_t stream) {
  RETURN_IF_ERROR(Require(n_heads > 0 && rot_dim > 0 && rot_dim % 2 == 0 && rot_dim <= head_dim,
                          "ApplyRope", "n_heads > 0 and an even rot_dim in (0, head_dim]"));
  RETURN_IF_ERROR(Require(n_tokens >= 0 && x_stride >= n_heads * head_dim, "ApplyRope",
                          "n_tokens >= 0 and x_stride >= n_heads * head_dim"));
  if (n_tokens == 0) return absl::OkStatus();
  const int64_t half = rot_dim / 2;
  const int64_t total = n_tokens * n_heads * half;
  RopeKernel<<<GridStrideBlocks(total, kElementThreads), kElementThreads, 0, stream>>>(
      x, n_heads, head_dim, half, positions, inv_freq, style, total, x_stride);
  return LaunchStatus("RopeKernel");
}

absl::Status AddBias(__nv_bfloat16* x, const float* bias, int64_t n, int64_t n_tokens,
                     int64_t x_stride, cudaStream_t stream) {
  RETURN_IF_ERROR(Require(n > 0 && n_tokens >= 0 && x_stride >= n, "AddBias",
                          "n > 0, n_tokens >= 0 and x_stride >= n"));
  if (n_tokens == 0) return absl::OkStatus();
  const int64_t total = n_tokens * n;
  AddBiasKernel<<<GridStrideBlocks(total, kElementThreads), kElementThreads, 0, stream>>>(
      x, bias, n, total, x_stride);
  return LaunchStatus("AddBiasKernel");
}

absl::Status GatherRows(const __nv_bfloat16* x, int64_t n, const int32_t* rows,
                        __nv_bfloat16* out, int64_t n_rows, cudaStream_t stream) {
  RETURN_IF_ERROR(Require(n > 0 && n_rows >= 0, "GatherRows", "n > 0 and n_rows >= 0"));
  if (n_rows == 0) return absl::OkStatus();
  const int64_t total = n_rows * n;
  GatherRowsKernel<<<GridStrideBlocks(total, kElementThreads), kElementThreads, 0, stream>>>(
      x, n, rows, out, total);
  return LaunchStatus("GatherRowsKernel");
}

absl::Status ScatterInt32(int32_t* base, const int32_t* offsets, const int32_t* values,
                          int64_t n, cudaStream_t stream) {
  RETURN_IF_ERROR(Require(n >= 0, "ScatterInt32", "n >= 0"));
  if (n == 0) return absl::OkStatus();
  ScatterInt32Kernel<<<GridStrideBlocks(n, kElementThreads), kElementThreads, 0, stream>>>(
      base, offsets, values, n);
  return LaunchStatus("ScatterInt32Kernel");
}

}  // namespace morphserve::kernels::cuda
