// A fixed set of worker threads for data-parallel loops on the hot path.
//
// ParallelFor splits [0, n) into a fixed set of contiguous chunks that the
// calling thread and the workers claim one at a time, and returns when all
// are done. It allocates nothing per call. Decode calls it hundreds of times
// per token, so idle workers spin briefly on an atomic before sleeping
// (waking a sleeping thread costs as much as a small matrix product), and
// the caller never waits for a worker to wake: it runs unclaimed chunks
// itself, which also keeps a descheduled worker from stalling the call on a
// busy machine. One caller at a time: the engine thread owns the pool.
#ifndef MORPHSERVE_COMMON_THREAD_POOL_H_
#define MORPHSERVE_COMMON_THREAD_POOL_H_

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace morphserve {

class ThreadPool {
 public:
  // `num_threads` counts the calling thread: 1 means no workers.
  explicit ThreadPool(int num_threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int num_threads() const { return static_cast<int>(workers_.size()) + 1; }

  // Calls fn(begin, end) over disjoint ranges covering [0, n). Ranges are
  // multiples of `grain` except the last; the split depends only on n,
  // grain and num_threads() (not on which thread runs which range).
  void ParallelFor(int64_t n, int64_t grain,
                   const std::function<void(int64_t, int64_t)>& fn);

  // Threads to use when the user did not say: the hardware concurrency.
  static int DefaultThreads();

 private:
  void WorkerLoop();
  // Claims and runs chunks of call `call` until none is left.
  void RunChunks(uint32_t call);

  std::vector<std::thread> workers_;
  // The current call. Written before `claim_` publishes the call; read by a
  // worker only after it claimed a chunk, which keeps the call open.
  std::atomic<const std::function<void(int64_t, int64_t)>*> fn_{nullptr};
  std::atomic<int64_t> n_{0};
  std::atomic<int64_t> grain_{1};
  uint32_t call_ = 0;
  // (call id << 32) | (chunk count << 16) | index of the next unclaimed chunk.
  std::atomic<uint64_t> claim_{0};
  std::atomic<int64_t> done_{0};  // chunks finished in the current call
  std::atomic<bool> stop_{false};
  std::mutex mu_;  // only for sleeping and waking
  std::condition_variable wake_;
};

// pool->ParallelFor(n, grain, fn), or fn(0, n) on the calling thread when
// `pool` is null: for code that runs both on a pool and inside another
// pool's task.
void ParallelFor(ThreadPool* pool, int64_t n, int64_t grain,
                 const std::function<void(int64_t, int64_t)>& fn);

}  // namespace morphserve

#endif  // MORPHSERVE_COMMON_THREAD_POOL_H_
