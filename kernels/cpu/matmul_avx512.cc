// MatMul kernels for CPUs with AVX-512 VNNI: the x86 kernels with the
// integer dot products fused into vpdpbusd / vpdpwssd. They stay on 256-bit
// vectors: processing two blocks per 512-bit vector measured no faster on
// Zen 4 (which splits 512-bit operations) and costs clock speed elsewhere.
#include "kernels/cpu/matmul_internal.h"

#if MORPHSERVE_KERNELS_X86
#include <immintrin.h>

#include <cstring>
#include <type_traits>

#include "common/fp16.h"
#include "kernels/cpu/quant_blocks.h"

#if defined(__clang__)
#pragma clang attribute push(                                                      \
    __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni"))), \
    apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")
#endif

namespace morphserve::kernels::internal {
namespace {

inline __m256i DotU8S8(__m256i u, __m256i s) {
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
}

inline __m256i MaddAcc(__m256i acc, __m256i a, __m256i b) { return _mm256_dpwssd_epi32(acc, a, b); }

#include "kernels/cpu/matmul_x86_kernels.inc"

}  // namespace
}  // namespace morphserve::kernels::internal

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

namespace morphserve::kernels::internal {

const KernelTable& Avx512Kernels() {
  static const KernelTable kTable = MakeTable();
  return kTable;
}

}  // namespace morphserve::kernels::internal

#endif  // MORPHSERVE_KERNELS_X86
