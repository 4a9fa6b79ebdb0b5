#include "engine/kv/paged_kv_cache.h"

namespace morphserve::engine {

PagedKvCache::PagedKvCache(const KvCacheShape& shape)
    : shape_(shape),
      keys_(static_cast<size_t>(shape.num_layers * shape.num_blocks * shape.FloatsPerBlock())),
      values_(keys_.size()) {}

}  // namespace morphserve::engine
