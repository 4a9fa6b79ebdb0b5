#include "tests/kernels/cuda/kv_policy_test_util.h"

#include <algorithm>
#include <utility>

#include "tests/kernels/cuda/cuda_test_util.h"

namespace morphserve::testing {

Cache MakeCache(const std::vector<int32_t>& slots, int64_t block_size, int64_t num_kv_heads,
                int64_t head_dim, std::mt19937& rng) {
  Cache c;
  c.block_size = block_size;
  c.num_kv_heads = num_kv_heads;
  c.head_dim = head_dim;
  ScrambledTables tables = ScrambleBlockTables(slots, block_size, rng);
  c.tables = std::move(tables.tables);
  c.table_stride = tables.stride;
  c.pool_blocks = tables.pool_blocks;
  const size_t elems = c.pool_blocks * num_kv_heads * block_size * head_dim;
  c.k.assign(elems, kNanBf16);
  c.v.assign(elems, kNanBf16);
  for (size_t seq = 0; seq < slots.size(); ++seq) {
    for (int64_t slot = 0; slot < slots[seq]; ++slot) {
      for (int64_t h = 0; h < num_kv_heads; ++h) {
        const std::vector<uint16_t> k = RandomBf16(head_dim, 1.0f, rng);
        const std::vector<uint16_t> v = RandomBf16(head_dim, 1.0f, rng);
        std::copy(k.begin(), k.end(), &c.k[c.At(seq, h, slot)]);
        std::copy(v.begin(), v.end(), &c.v[c.At(seq, h, slot)]);
      }
    }
  }
  return c;
}

}  // namespace morphserve::testing
