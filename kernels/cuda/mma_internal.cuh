// Warp-wide tensor-core multiply-accumulate on bf16 (sm_80 and later).
//
// One warp computes D = A B + C for A 16x16, B 16x8 and C, D 16x8 in f32.
// Each lane holds a fixed part of every matrix, as the PTX ISA lays out the
// fragments of mma.m16n8k16 with floating-point types. With g = lane / 4
// and t = lane % 4:
//   A: a[0] = A[g][2t, 2t+1]     a[1] = A[g+8][2t, 2t+1]
//      a[2] = A[g][2t+8, 2t+9]   a[3] = A[g+8][2t+8, 2t+9]
//   B: b[0] = B[2t, 2t+1][g]     b[1] = B[2t+8, 2t+9][g]
//   C: c[0], c[1] = C[g][2t, 2t+1]   c[2], c[3] = C[g+8][2t, 2t+1]
// Each uint32_t of a and b packs two bf16, the first-named one in the low
// half. Row g of a C fragment has the same lanes and order as row g of an A
// fragment, so products (after rounding to bf16) feed the next
// multiplication without leaving registers.
#ifndef MORPHSERVE_KERNELS_CUDA_MMA_INTERNAL_CUH_
#define MORPHSERVE_KERNELS_CUDA_MMA_INTERNAL_CUH_

#include <cstdint>

namespace morphserve::kernels::cuda::internal {

// c += A B for the fragments above. Every lane of the warp must call it.
__device__ __forceinline__ void MmaBf16(float (&c)[4], const uint32_t (&a)[4],
                                        const uint32_t (&b)[2]) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

}  // namespace morphserve::kernels::cuda::internal

#endif  // MORPHSERVE_KERNELS_CUDA_MMA_INTERNAL_CUH_
