// Internals of MatMul shared by its instruction-set variants and the tests:
// the per-ISA kernel tables and a way to force one ISA.
#ifndef MORPHSERVE_KERNELS_CPU_MATMUL_INTERNAL_H_
#define MORPHSERVE_KERNELS_CPU_MATMUL_INTERNAL_H_

#include <cstddef>
#include <cstdint>

#include "common/dtype.h"
#include "common/thread_pool.h"
#include "kernels/cpu/matmul.h"

// The SIMD variants exist on x86-64 only; elsewhere MatMul runs the scalar
// kernels.
#if defined(__x86_64__)
#define MORPHSERVE_KERNELS_X86 1
#else
#define MORPHSERVE_KERNELS_X86 0
#endif

namespace morphserve::kernels::internal {

enum class Isa {
  kScalar,  // portable C++
  kAvx2,    // AVX2 + FMA + F16C
  kAvx512,  // AVX-512 F/BW/VL + VNNI, on top of kAvx2
};

inline constexpr int kNumDTypes = static_cast<int>(DType::kQ8_K) + 1;

// Quantizes one activation row of `n` elements (a multiple of the block) to
// int16 at `out`, followed by ActScale32 (block32) or ActScaleK (super-block)
// records: the layout described in quant_blocks.h.
using QuantizeRowFn = void (*)(const float* x, int64_t n, void* out);

// For t in [0, n_tok): y[t * y_stride] = dot(weight row, activation row t),
// where activation row t starts `act_stride` bytes after row t - 1 and is
// f32 for F32/F16/BF16 weights and a quantized row otherwise.
using RowDotFn = void (*)(const void* w_row, int64_t cols, const void* act, size_t act_stride,
                          int64_t n_tok, float* y, int64_t y_stride);

// The packed layout: for t in [0, n_tok) and i in [0, n_rows):
// y[t * y_stride + i] = dot(row i of a group, activation row t), where
// `tiles` is the group's first tile (its cols / 32 tiles are consecutive)
// and the activation rows are quantized block-32 rows.
using PackedDotFn = void (*)(const void* tiles, int64_t cols, const void* act, size_t act_stride,
                             int64_t n_tok, float* y, int64_t y_stride, int n_rows);

struct KernelTable {
  QuantizeRowFn quantize_block32;
  QuantizeRowFn quantize_superblock;
  RowDotFn dot[kNumDTypes];            // null for unsupported types
  PackedDotFn packed_dot[kNumDTypes];  // null for the types PackWeights does not take
};

const KernelTable& ScalarKernels();
const KernelTable& Avx2Kernels();    // x86-64 only
const KernelTable& Avx512Kernels();  // x86-64 only

// The table of `isa`, which must be supported.
const KernelTable& KernelsFor(Isa isa);

// Whether this CPU runs `isa`, and the best one it runs.
bool IsaSupported(Isa isa);
Isa BestIsa();
const char* IsaName(Isa isa);

// MatMul forced onto `isa`, which must be supported.
void MatMulWithIsa(const MatMulArgs& args, void* scratch, ThreadPool* pool, Isa isa);

}  // namespace morphserve::kernels::internal

#endif  // MORPHSERVE_KERNELS_CPU_MATMUL_INTERNAL_H_
