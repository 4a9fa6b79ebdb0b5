// MatMul kernels for CPUs with AVX-512 VNNI: the x86 kernels with the
// int16 dot products fused into vpdpwssd, 32 vector registers, and masked
// adds for the fifth weight bits. They stay on 256-bit vectors: processing
// two blocks per 512-bit vector measured no faster on Zen 4 (which splits
// 512-bit operations) and costs clock speed elsewhere.
#include "kernels/cpu/matmul_internal.h"

#if MORPHSERVE_KERNELS_X86
#include <immintrin.h>

#include <cstring>
#include <type_traits>

#include "common/fp16.h"
#include "kernels/cpu/packed_blocks.h"
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

constexpr bool kFusedMadd = true;
constexpr int kVectorRegs = 32;

inline __m256i MaddAcc(__m256i acc, __m256i a, __m256i b) { return _mm256_dpwssd_epi32(acc, a, b); }

inline __m256i AddBit4(__m256i v, uint32_t bits) {
  return _mm256_mask_add_epi16(v, static_cast<__mmask16>(bits), v, _mm256_set1_epi16(16));
}

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
