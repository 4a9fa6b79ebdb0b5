// f32 reductions across lanes of a warp and across a thread block.
#ifndef MORPHSERVE_KERNELS_CUDA_REDUCE_INTERNAL_CUH_
#define MORPHSERVE_KERNELS_CUDA_REDUCE_INTERNAL_CUH_

namespace morphserve::kernels::cuda::internal {

inline constexpr int kWarpSize = 32;
inline constexpr unsigned kFullMask = 0xffffffffu;

// Sum (or max) over each aligned group of kWidth lanes (a power of two up to
// 32), returned to every lane of the group. Every lane of the warp must call
// it with the same kWidth.
template <int kWidth = kWarpSize>
__device__ __forceinline__ float WarpSum(float v) {
  static_assert(kWidth > 0 && kWidth <= kWarpSize && (kWidth & (kWidth - 1)) == 0);
#pragma unroll
  for (int offset = kWidth / 2; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(kFullMask, v, offset);
  }
  return v;
}

template <int kWidth = kWarpSize>
__device__ __forceinline__ float WarpMax(float v) {
  static_assert(kWidth > 0 && kWidth <= kWarpSize && (kWidth & (kWidth - 1)) == 0);
#pragma unroll
  for (int offset = kWidth / 2; offset > 0; offset /= 2) {
    v = fmaxf(v, __shfl_xor_sync(kFullMask, v, offset));
  }
  return v;
}

// Sum over the block, returned to every thread. blockDim.x must be a
// multiple of 32; every thread must call it; `scratch` holds 32 floats and
// may be reused once this returns (it synchronises on both sides).
__device__ __forceinline__ float BlockSum(float v, float* scratch) {
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  v = WarpSum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  const int warps = static_cast<int>(blockDim.x) / kWarpSize;
  const float total = WarpSum(lane < warps ? scratch[lane] : 0.0f);
  __syncthreads();
  return total;
}

}  // namespace morphserve::kernels::cuda::internal

#endif  // MORPHSERVE_KERNELS_CUDA_REDUCE_INTERNAL_CUH_
