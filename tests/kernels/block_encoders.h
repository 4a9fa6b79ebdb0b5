// Test-side encoders of GGML blocks: build a block from its logical content
// (scales and integer quants), written from the format description
// independently of the kernels' own unpacking code.
#ifndef MORPHSERVE_TESTS_KERNELS_BLOCK_ENCODERS_H_
#define MORPHSERVE_TESTS_KERNELS_BLOCK_ENCODERS_H_

#include <cstdint>
#include <random>
#include <vector>

#include "common/dtype.h"

namespace morphserve::kernels::testing {

// The logical content of one quantized block.
struct BlockContent {
  uint16_t d = 0;         // f16 scale
  uint16_t m = 0;         // f16 min (Q4_1, Q5_1) or dmin (Q4_K, Q5_K)
  std::vector<int> sc;    // Q4_K/Q5_K: 8 six-bit scales; Q6_K: 16 int8 scales
  std::vector<int> mins;  // Q4_K/Q5_K: 8 six-bit mins
  std::vector<int> q;     // block_elems quants, in the type's range
};

// Serializes `c` as one block of `type` into out[0, block_bytes).
void EncodeBlock(DType type, const BlockContent& c, uint8_t* out);

// What each element of the block stands for, per the format's formula.
std::vector<double> BlockValues(DType type, const BlockContent& c);

// Random content in the full range of every field, with scales that keep
// the values of order `magnitude`.
BlockContent RandomBlock(DType type, float magnitude, std::mt19937& rng);

// `rows` random rows of `cols` elements of `type` (float types: values in
// [-1, 1]; quantized types: RandomBlock), back to back.
std::vector<uint8_t> RandomMatrix(DType type, int64_t rows, int64_t cols, std::mt19937& rng);

}  // namespace morphserve::kernels::testing

#endif  // MORPHSERVE_TESTS_KERNELS_BLOCK_ENCODERS_H_
