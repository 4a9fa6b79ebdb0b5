// Matrix products of weights (any stored dtype) with f32 activations.
//
// This is where CPU decode spends its time: it reads each weight row once
// per step, in its stored (possibly quantized) form, for all tokens at once.
#ifndef MORPHSERVE_KERNELS_CPU_MATMUL_H_
#define MORPHSERVE_KERNELS_CPU_MATMUL_H_

#include <cstddef>
#include <cstdint>

#include "common/dtype.h"
#include "common/thread_pool.h"

namespace morphserve::kernels {

// How a weight matrix is laid out in memory.
enum class WeightLayout {
  // `rows` rows of `cols` elements of the dtype, `w_row_bytes` apart: the
  // GGUF layout.
  kRows,
  // PackWeights' layout: rows in groups of kPackRows, the groups' blocks
  // interleaved so that one vector holds the same elements of every row of
  // a group. Only the types CanPackWeights accepts.
  kPacked,
};

// Y[t * y_stride + r] = sum_k W[r, k] * X[t * x_stride + k]
//   for t in [0, n_tokens), r in [0, rows), k in [0, cols).
// W is `rows` x `cols` elements of `w_type` laid out as `w_layout` says.
// `cols` is a multiple of the dtype's block size.
struct MatMulArgs {
  DType w_type;
  const void* w;
  size_t w_row_bytes;
  int64_t rows;
  int64_t cols;
  const float* x;
  int64_t x_stride;
  int64_t n_tokens;
  float* y;
  int64_t y_stride;
  WeightLayout w_layout = WeightLayout::kRows;  // w_row_bytes is unused when packed
};

// Rows per group of the packed layout.
inline constexpr int64_t kPackRows = 8;

// Whether PackWeights takes `type`: the block-32 quantized types (Q4_0, Q4_1,
// Q5_0, Q5_1, Q8_0). Their packed products need a quarter to a half of the
// instructions per multiply-add of the row layout once a step has several
// tokens: the per-block scaling is done for eight rows at once.
bool CanPackWeights(DType type);

// Bytes of a packed `rows` x `cols` matrix (rows rounded up to kPackRows).
size_t PackedWeightBytes(DType type, int64_t rows, int64_t cols);

// Writes the packed copy of a `rows` x `cols` matrix stored as rows
// `w_row_bytes` apart to `out` (PackedWeightBytes long). The packed layout
// holds the same quants and scales, so MatMul gives the same products up to
// the order of its f32 sums. Split over the pool's threads where one is given.
void PackWeights(DType type, const void* w, size_t w_row_bytes, int64_t rows, int64_t cols,
                 void* out, ThreadPool* pool = nullptr);

// Row `r` of a packed `cols`-wide matrix as f32: bit-identical to
// DequantizeRow of the row it was packed from (token lookups in a tied
// embedding read the packed copy).
void DequantizePackedRow(DType type, const void* packed, int64_t cols, int64_t r, float* out);

// Plain reference: dequantizes each row to f32, accumulates in double. Row
// layout only.
void MatMulReference(const MatMulArgs& args);

// Fast path (SIMD chosen at run time, split over the pool's threads).
// Agrees with the reference within the quantization of X where the weight
// type is quantized (activations are quantized to 16 bits per block). Each
// output depends only on its weight row and token row: it is bit-identical
// whatever n_tokens, the other rows and the thread count.
// `scratch` holds at least MatMulScratchBytes(args) bytes.
void MatMul(const MatMulArgs& args, void* scratch, ThreadPool* pool);
size_t MatMulScratchBytes(DType w_type, int64_t cols, int64_t n_tokens);

}  // namespace morphserve::kernels

#endif  // MORPHSERVE_KERNELS_CPU_MATMUL_H_
