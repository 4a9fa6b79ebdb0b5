#include "scheduler/block_pool.h"

#include <algorithm>
#include <random>
#include <set>

#include "gtest/gtest.h"

namespace morphserve::scheduler {
namespace {

TEST(BlockPoolTest, AllocatesDistinctIdsUntilEmpty) {
  BlockPool pool(5);
  std::vector<int32_t> table;
  ASSERT_TRUE(pool.Allocate(3, &table));
  ASSERT_TRUE(pool.Allocate(2, &table));
  EXPECT_EQ(pool.num_free(), 0);
  EXPECT_FALSE(pool.Allocate(1, &table));
  EXPECT_EQ(table.size(), 5u);
  EXPECT_EQ(std::set<int32_t>(table.begin(), table.end()).size(), 5u);
}

TEST(BlockPoolTest, FailedAllocationTakesNothing) {
  BlockPool pool(4);
  std::vector<int32_t> table;
  EXPECT_FALSE(pool.Allocate(5, &table));
  EXPECT_TRUE(table.empty());
  EXPECT_EQ(pool.num_free(), 4);
}

TEST(BlockPoolTest, RejectsDoubleFreeAndUnknownIds) {
  BlockPool pool(4);
  std::vector<int32_t> table;
  ASSERT_TRUE(pool.Allocate(2, &table));
  EXPECT_TRUE(pool.Free(table));
  EXPECT_FALSE(pool.Free(table));  // already free
  const int32_t bad[] = {7};
  EXPECT_FALSE(pool.Free(bad));
  EXPECT_EQ(pool.num_free(), 4);
}

TEST(BlockPoolTest, RandomTrafficKeepsInvariants) {
  BlockPool pool(64);
  std::mt19937 rng(7);
  std::vector<std::vector<int32_t>> owners(8);
  for (int step = 0; step < 5000; ++step) {
    auto& owner = owners[rng() % owners.size()];
    if (rng() % 3 == 0) {
      ASSERT_TRUE(pool.Free(owner));
      owner.clear();
    } else {
      const int32_t n = static_cast<int32_t>(rng() % 6);
      const bool fits = n <= pool.num_free();
      ASSERT_EQ(pool.Allocate(n, &owner), fits);
    }
    std::set<int32_t> seen;
    size_t used = 0;
    for (const auto& o : owners) {
      for (int32_t id : o) {
        ASSERT_TRUE(seen.insert(id).second) << "block " << id << " owned twice";
        ASSERT_FALSE(pool.IsFree(id));
      }
      used += o.size();
    }
    ASSERT_EQ(static_cast<int32_t>(used), pool.num_used());
    ASSERT_EQ(pool.num_free() + pool.num_used(), pool.num_blocks());
  }
}

}  // namespace
}  // namespace morphserve::scheduler
