#include "common/thread_pool.h"

#include <atomic>
#include <vector>

#include "gtest/gtest.h"

namespace morphserve {
namespace {

TEST(ThreadPoolTest, CoversEveryIndexExactlyOnce) {
  for (int threads : {1, 2, 3, 8}) {
    ThreadPool pool(threads);
    for (int64_t n : {1, 7, 64, 1001}) {
      for (int64_t grain : {1, 4, 32}) {
        std::vector<std::atomic<int>> hits(n);
        pool.ParallelFor(n, grain, [&](int64_t b, int64_t e) {
          ASSERT_LE(0, b);
          ASSERT_LT(b, e);
          ASSERT_LE(e, n);
          for (int64_t i = b; i < e; ++i) hits[i].fetch_add(1);
        });
        for (int64_t i = 0; i < n; ++i) ASSERT_EQ(hits[i].load(), 1) << "n=" << n << " i=" << i;
      }
    }
  }
}

TEST(ThreadPoolTest, RangesStartOnGrainBoundaries) {
  ThreadPool pool(4);
  std::atomic<int> misaligned{0};
  pool.ParallelFor(1000, 16, [&](int64_t b, int64_t) {
    if (b % 16 != 0) misaligned.fetch_add(1);
  });
  EXPECT_EQ(misaligned.load(), 0);
}

TEST(ThreadPoolTest, ReusableAcrossManyCalls) {
  ThreadPool pool(3);
  std::atomic<int64_t> sum{0};
  for (int call = 0; call < 2000; ++call) {
    pool.ParallelFor(10, 1, [&](int64_t b, int64_t e) { sum.fetch_add(e - b); });
  }
  EXPECT_EQ(sum.load(), 20000);
}

}  // namespace
}  // namespace morphserve

namespace morphserve {
namespace {

// Calls of very different sizes back to back: a worker that is slow to see
// that a small call has ended must not claim a chunk of it against the next
// call's chunk count (this used to run a chunk twice and hang the caller).
TEST(ThreadPool, AlternatingCallSizesCoverEachIndexOnce) {
  ThreadPool pool(3);
  std::vector<std::atomic<int>> hits(2000);
  const std::function<void(int64_t, int64_t)> count = [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) hits[i].fetch_add(1, std::memory_order_relaxed);
  };
  for (int iter = 0; iter < 300000; ++iter) {
    const int64_t n = iter % 2 == 0 ? 3 : 2000;
    pool.ParallelFor(n, iter % 2 == 0 ? 1 : 16, count);
    for (int64_t i = 0; i < n; ++i) {
      ASSERT_EQ(hits[i].exchange(0, std::memory_order_relaxed), 1) << "call " << iter;
    }
  }
}

}  // namespace
}  // namespace morphserve
