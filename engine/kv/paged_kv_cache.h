// Physical key/value storage for every layer, carved into fixed-size blocks.
//
// A sequence owns a list of block ids (its block table, allocated by the
// scheduler's BlockPool) shared by all layers; cache slot s of the sequence
// lives in block table[s / block_size] at offset s % block_size. Per layer
// and block the layout is [kv_head][slot][head_dim], f32. Allocated once;
// the engine thread is the only writer.
#ifndef MORPHSERVE_ENGINE_KV_PAGED_KV_CACHE_H_
#define MORPHSERVE_ENGINE_KV_PAGED_KV_CACHE_H_

#include <cstdint>
#include <cstddef>
#include <vector>

namespace morphserve::engine {

struct KvCacheShape {
  int64_t num_layers = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t block_size = 16;
  int64_t num_blocks = 0;
  // Bytes per stored K or V element: 4 (f32) on the CPU, 2 (bf16) on CUDA.
  int64_t element_bytes = 4;

  // K (or V) values of one block in one layer.
  int64_t ValuesPerBlock() const { return num_kv_heads * block_size * head_dim; }
  // K and V of one block in every layer.
  int64_t BytesPerBlock() const { return 2 * num_layers * ValuesPerBlock() * element_bytes; }
};

class PagedKvCache {
 public:
  // Allocates `shape`'s blocks as f32 (whatever its element_bytes says).
  explicit PagedKvCache(const KvCacheShape& shape);

  const KvCacheShape& shape() const { return shape_; }

  // Base of layer `layer`'s K (or V) storage: [num_blocks][kv_head][slot][dim].
  float* keys(int64_t layer) { return keys_.data() + layer * LayerFloats(); }
  float* values(int64_t layer) { return values_.data() + layer * LayerFloats(); }
  const float* keys(int64_t layer) const { return keys_.data() + layer * LayerFloats(); }
  const float* values(int64_t layer) const { return values_.data() + layer * LayerFloats(); }

  // Address of (block, head, offset) within a layer's K or V storage.
  int64_t Index(int64_t block, int64_t head, int64_t offset) const {
    return ((block * shape_.num_kv_heads + head) * shape_.block_size + offset) * shape_.head_dim;
  }

 private:
  int64_t LayerFloats() const { return shape_.num_blocks * shape_.ValuesPerBlock(); }

  KvCacheShape shape_;
  std::vector<float> keys_;
  std::vector<float> values_;
};

}  // namespace morphserve::engine

#endif  // MORPHSERVE_ENGINE_KV_PAGED_KV_CACHE_H_
