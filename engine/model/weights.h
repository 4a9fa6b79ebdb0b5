// Views of a Llama-family model's weights. Matrices stay in their stored
// dtype (quantized GGUF blocks included) and usually point into a memory
// mapping; small vectors (norms, biases) are converted to f32 at load.
#ifndef MORPHSERVE_ENGINE_MODEL_WEIGHTS_H_
#define MORPHSERVE_ENGINE_MODEL_WEIGHTS_H_

#include <cstddef>
#include <cstdint>
#include <deque>
#include <memory>
#include <vector>

#include "common/dtype.h"

namespace morphserve::engine {

// `rows` x `cols`, row-major, each row `row_bytes` long (out_features x
// in_features, as y = W x). A row slice of a fused matrix is a Matrix too.
struct Matrix {
  DType dtype = DType::kF32;
  const void* data = nullptr;
  int64_t rows = 0;
  int64_t cols = 0;
  size_t row_bytes = 0;

  const void* Row(int64_t r) const {
    return static_cast<const uint8_t*>(data) + static_cast<size_t>(r) * row_bytes;
  }
  Matrix RowSlice(int64_t begin, int64_t count) const {
    return {dtype, Row(begin), count, cols, row_bytes};
  }
  bool empty() const { return data == nullptr; }
};

struct LayerWeights {
  const float* attn_norm = nullptr;
  const float* ffn_norm = nullptr;
  Matrix wq, wk, wv, wo;
  const float* bq = nullptr;  // biases: null when the family has none
  const float* bk = nullptr;
  const float* bv = nullptr;
  Matrix w_gate, w_up, w_down;
};

struct LlamaWeights {
  Matrix token_embedding;  // vocab x hidden
  const float* output_norm = nullptr;
  Matrix output;           // vocab x hidden (the embedding when tied)
  std::vector<LayerWeights> layers;

  // Storage for what was converted or generated at load; the views above
  // point into it (deque: stable addresses).
  std::deque<std::vector<float>> owned_f32;
  std::deque<std::vector<uint8_t>> owned_bytes;

  const float* Own(std::vector<float> v) { return owned_f32.emplace_back(std::move(v)).data(); }
};

}  // namespace morphserve::engine

#endif  // MORPHSERVE_ENGINE_MODEL_WEIGHTS_H_
