// Shared pieces of the KV policy kernel tests (kv_policy_test.cc,
// kv_selection_test.cc, kv_compaction_test.cc): one layer's paged cache for
// a batch, with NaN wherever no sequence holds a slot, and the poison values
// outputs start from.
#ifndef MORPHSERVE_TESTS_KERNELS_CUDA_KV_POLICY_TEST_UTIL_H_
#define MORPHSERVE_TESTS_KERNELS_CUDA_KV_POLICY_TEST_UTIL_H_

#include <cstddef>
#include <cstdint>
#include <random>
#include <vector>

namespace morphserve::testing {

// A bf16 NaN, for values no kernel may read.
inline constexpr uint16_t kNanBf16 = 0xffff;
// What a poisoned int32 output holds until written.
inline constexpr int32_t kPoisonInt = 0x7f7f7f7f;

// One layer's paged cache for a batch, in the kernels' layout, with keys
// (and values) for the slots each sequence holds and NaN elsewhere.
struct Cache {
  int64_t block_size = 0, num_kv_heads = 0, head_dim = 0;
  std::vector<int32_t> tables;
  int64_t table_stride = 0;
  int64_t pool_blocks = 0;
  std::vector<uint16_t> k, v;

  size_t At(int64_t seq, int64_t kv_head, int64_t slot) const {
    const int64_t block = tables[seq * table_stride + slot / block_size];
    return ((block * num_kv_heads + kv_head) * block_size + slot % block_size) * head_dim;
  }
};

// slots[s] random bf16 keys and values for sequence s, over scrambled block
// tables.
Cache MakeCache(const std::vector<int32_t>& slots, int64_t block_size, int64_t num_kv_heads,
                int64_t head_dim, std::mt19937& rng);

}  // namespace morphserve::testing

#endif  // MORPHSERVE_TESTS_KERNELS_CUDA_KV_POLICY_TEST_UTIL_H_
