// Conversion of stored rows (F32, F16, BF16 and GGML quantized blocks) to f32.
#ifndef MORPHSERVE_KERNELS_CPU_DEQUANTIZE_H_
#define MORPHSERVE_KERNELS_CPU_DEQUANTIZE_H_

#include <cstdint>

#include "common/dtype.h"

namespace morphserve::kernels {

// dst[0..n) = src row of n elements of `type`; n is a multiple of the block size.
void DequantizeRow(DType type, const void* src, float* dst, int64_t n);

// Whether DequantizeRow and MatMul support `type`.
bool IsSupportedWeightType(DType type);

}  // namespace morphserve::kernels

#endif  // MORPHSERVE_KERNELS_CPU_DEQUANTIZE_H_
