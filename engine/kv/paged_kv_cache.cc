#include "engine/kv/paged_kv_cache.h"

namespace morphserve::engine {

PagedKvCache::PagedKvCache(const KvCacheShape& shape)
    : shape_(shape),
      keys_(static_cast<size_t>(shape.num_layers * shape.num_blocks * shape.ValuesPerBlock())),
      values_(keys_.size()) {
  shape_.element_bytes = sizeof(float);
}

}  // namespace morphserve::engine
