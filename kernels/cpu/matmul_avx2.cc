// AVX2 + FMA + F16C MatMul kernels. Compiled for those extensions through a
// target pragma rather than file-wide flags, so that no inline function from
// a shared header is compiled with them here and then picked by the linker
// for code that runs on older CPUs.
#include "kernels/cpu/matmul_internal.h"

#if MORPHSERVE_KERNELS_X86
#include <immintrin.h>

#include <cstring>
#include <type_traits>

#include "common/fp16.h"
#include "kernels/cpu/packed_blocks.h"
#include "kernels/cpu/quant_blocks.h"

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif

namespace morphserve::kernels::internal {
namespace {

constexpr bool kFusedMadd = false;
constexpr int kVectorRegs = 16;

inline __m256i MaddAcc(__m256i acc, __m256i a, __m256i b) {
  return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b));
}

inline __m256i AddBit4(__m256i v, uint32_t bits) {
  const __m256i lane_bit = _mm256_setr_epi16(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048,
                                             4096, 8192, 16384, -32768);
  const __m256i set = _mm256_cmpeq_epi16(
      _mm256_and_si256(_mm256_set1_epi16(static_cast<int16_t>(bits)), lane_bit), lane_bit);
  return _mm256_or_si256(v, _mm256_and_si256(set, _mm256_set1_epi16(16)));
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

const KernelTable& Avx2Kernels() {
  static const KernelTable kTable = MakeTable();
  return kTable;
}

}  // namespace morphserve::kernels::internal

#endif  // MORPHSERVE_KERNELS_X86
