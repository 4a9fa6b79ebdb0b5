// The paged KV write against a host-side copy into the same layout: every
// targeted slot holds its token's row, every other byte of the (poisoned)
// cache is untouched.
#include "kernels/cuda/paged_kv_write.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "tests/kernels/cuda/cuda_test_util.h"

namespace morphserve::kernels::cuda {
namespace {

using testing::Poisoned;
using testing::RandomBf16;
using testing::Upload;

struct Shape {
  int64_t n_tokens, num_kv_heads, head_dim, block_size, num_blocks;
};

std::string Describe(const Shape& s) {
  return absl::StrCat("t", s.n_tokens, "_kv", s.num_kv_heads, "_d", s.head_dim, "_bs", s.block_size,
                      "_blocks", s.num_blocks);
}
void PrintTo(const Shape& s, std::ostream* os) { *os << Describe(s); }
std::string ShapeName(const ::testing::TestParamInfo<Shape>& info) { return Describe(info.param); }

class PagedKvWriteCudaTest : public testing::CudaTest,
                             public ::testing::WithParamInterface<Shape> {};

TEST_P(PagedKvWriteCudaTest, WritesMappedSlotsOnly) {
  const Shape s = GetParam();
  std::mt19937 rng(static_cast<uint32_t>(s.n_tokens * 31 + s.num_kv_heads));
  const int64_t kv_dim = s.num_kv_heads * s.head_dim;
  // K and V sit after the queries in a fused QKV row of 4 query heads per
  // KV head.
  const int64_t q_dim = 4 * kv_dim;
  const int64_t stride = q_dim + 2 * kv_dim;
  const std::vector<uint16_t> qkv = RandomBf16(s.n_tokens * stride, 1.0f, rng);

  // Each KV head gets its own distinct slots (as bounded policies do); some
  // tokens are padding (-1) or point past the pool, and are skipped.
  const int64_t num_slots = s.num_blocks * s.block_size;
  std::vector<int32_t> mapping(s.n_tokens * s.num_kv_heads);
  for (int64_t h = 0; h < s.num_kv_heads; ++h) {
    std::vector<int32_t> slots(num_slots);
    std::iota(slots.begin(), slots.end(), 0);
    std::shuffle(slots.begin(), slots.end(), rng);
    for (int64_t t = 0; t < s.n_tokens; ++t) mapping[t * s.num_kv_heads + h] = slots[t];
  }
  if (s.n_tokens > 2) {
    mapping[1 * s.num_kv_heads] = -1;
    mapping[2 * s.num_kv_heads + s.num_kv_heads - 1] = static_cast<int32_t>(num_slots + 5);
  }

  const size_t cache_elems = num_slots * kv_dim;
  std::vector<uint16_t> k_expected(cache_elems, 0xffff);
  std::vector<uint16_t> v_expected(cache_elems, 0xffff);
  for (int64_t t = 0; t < s.n_tokens; ++t) {
    for (int64_t h = 0; h < s.num_kv_heads; ++h) {
      const int64_t slot = mapping[t * s.num_kv_heads + h];
      if (slot < 0 || slot >= num_slots) continue;
      const int64_t at =
          ((slot / s.block_size * s.num_kv_heads + h) * s.block_size + slot % s.block_size) *
          s.head_dim;
      std::copy_n(&qkv[t * stride + q_dim + h * s.head_dim], s.head_dim, &k_expected[at]);
      std::copy_n(&qkv[t * stride + q_dim + kv_dim + h * s.head_dim], s.head_dim, &v_expected[at]);
    }
  }

  ASSERT_OK_AND_ASSIGN(DeviceBuffer d_qkv, Upload(qkv));
  ASSERT_OK_AND_ASSIGN(DeviceBuffer d_mapping, Upload(mapping));
  ASSERT_OK_AND_ASSIGN(DeviceBuffer d_k_cache, Poisoned<uint16_t>(cache_elems));
  ASSERT_OK_AND_ASSIGN(DeviceBuffer d_v_cache, Poisoned<uint16_t>(cache_elems));
  const auto* qkv_ptr = d_qkv.as<__nv_bfloat16>();
  ASSERT_OK(WritePagedKv(qkv_ptr + q_dim, qkv_ptr + q_dim + kv_dim, stride, d_mapping.as<int32_t>(),
                         d_k_cache.as<__nv_bfloat16>(), d_v_cache.as<__nv_bfloat16>(), s.num_blocks,
                         s.block_size, s.num_kv_heads, s.head_dim, s.n_tokens, stream_));
  ASSERT_OK(Sync());
  ASSERT_OK_AND_ASSIGN(const std::vector<uint16_t> k_cache, d_k_cache.ToHost<uint16_t>());
  ASSERT_OK_AND_ASSIGN(const std::vector<uint16_t> v_cache, d_v_cache.ToHost<uint16_t>());
  EXPECT_TRUE(k_cache == k_expected) << "keys differ";
  EXPECT_TRUE(v_cache == v_expected) << "values differ";
}

INSTANTIATE_TEST_SUITE_P(Shapes, PagedKvWriteCudaTest,
                         ::testing::Values(Shape{1, 1, 64, 16, 1}, Shape{17, 3, 64, 16, 4},
                                           Shape{1031, 8, 128, 16, 70}, Shape{5, 4, 128, 7, 3},
                                           Shape{40, 2, 256, 1, 45}),
                         ShapeName);

}  // namespace
}  // namespace morphserve::kernels::cuda
