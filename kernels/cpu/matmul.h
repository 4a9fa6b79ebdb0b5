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

// Y[t * y_stride + r] = sum_k W[r, k] * X[t * x_stride + k]
//   for t in [0, n_tokens), r in [0, rows), k in [0, cols).
// W is `rows` rows of `cols` elements of `w_type`, `w_row_bytes` apart.
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
};

// Plain reference: dequantizes each row to f32, accumulates in double.
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
