// A fixed set of worker threads for data-parallel loops on the hot path.
//
// ParallelFor splits [0, n) into contiguous chunks, runs them on the workers
// and on the calling thread, and returns when all are done. It allocates
// nothing per call. One caller at a time: the engine thread owns the pool.
#ifndef MORPHSERVE_COMMON_THREAD_POOL_H_
#define MORPHSERVE_COMMON_THREAD_POOL_H_

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
  // multiples of `grain` except the last.
  void ParallelFor(int64_t n, int64_t grain,
                   const std::function<void(int64_t, int64_t)>& fn);

  // Threads to use when the user did not say: the hardware concurrency.
  static int DefaultThreads();

 private:
  void WorkerLoop(int index);
  void RunShare(int index);

  std::vector<std::thread> workers_;
  std::mutex mu_;
  std::condition_variable wake_;
  std::condition_variable done_;
  uint64_t generation_ = 0;  // bumped per ParallelFor call
  int pending_ = 0;          // workers still running the current call
  bool stop_ = false;
  const std::function<void(int64_t, int64_t)>* fn_ = nullptr;
  int64_t n_ = 0;
  int64_t grain_ = 1;
};

}  // namespace morphserve

#endif  // MORPHSERVE_COMMON_THREAD_POOL_H_
