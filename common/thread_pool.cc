#include "common/thread_pool.h"

#include <algorithm>
#include <chrono>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace morphserve {
namespace {

// How long an idle worker polls for the next call before it sleeps.
constexpr std::chrono::microseconds kSpinTime(200);
// Chunks per thread: enough to balance uneven progress, few enough that
// claiming costs nothing next to the work.
constexpr int64_t kChunksPerThread = 4;

inline void CpuRelax() {
#if defined(__x86_64__)
  _mm_pause();
#else
  std::this_thread::yield();
#endif
}

// claim_ packs (call id, chunk count, next unclaimed chunk) into one word, so
// that a claim is checked against the count of its own call: reading the
// count separately could pair a stale claim with the next call's count, and
// a worker would then run a chunk that does not exist.
constexpr int64_t kMaxChunks = 0xffff;
uint32_t CallOf(uint64_t claim) { return static_cast<uint32_t>(claim >> 32); }
int64_t ChunksOf(uint64_t claim) { return static_cast<int64_t>((claim >> 16) & 0xffff); }
int64_t IndexOf(uint64_t claim) { return static_cast<int64_t>(claim & 0xffff); }

}  // namespace

ThreadPool::ThreadPool(int num_threads) {
  const int workers = std::max(0, num_threads - 1);
  workers_.reserve(workers);
  for (int i = 0; i < workers; ++i) workers_.emplace_back([this] { WorkerLoop(); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_.store(true);
  }
  wake_.notify_all();
  for (std::thread& t : workers_) t.join();
}

int ThreadPool::DefaultThreads() {
  const unsigned n = std::thread::hardware_concurrency();
  return n == 0 ? 1 : static_cast<int>(n);
}

void ThreadPool::RunChunks(uint32_t call) {
  uint64_t claim = claim_.load(std::memory_order_acquire);
  for (;;) {
    if (CallOf(claim) != call) return;
    const int64_t index = IndexOf(claim);
    const int64_t chunks = ChunksOf(claim);
    if (index >= chunks) return;
    if (!claim_.compare_exchange_weak(claim, claim + 1, std::memory_order_acq_rel)) continue;
    // The claim succeeded, so the call cannot end before this chunk does, and
    // its parameters stay as ParallelFor set them before publishing it.
    const int64_t n = n_.load(std::memory_order_relaxed);
    const int64_t grain = grain_.load(std::memory_order_relaxed);
    const int64_t grains = (n + grain - 1) / grain;
    const int64_t begin = grains * index / chunks * grain;
    const int64_t end = std::min(n, grains * (index + 1) / chunks * grain);
    if (begin < end) (*fn_.load(std::memory_order_relaxed))(begin, end);
    done_.fetch_add(1, std::memory_order_acq_rel);
    claim = claim_.load(std::memory_order_acquire);
  }
}

void ThreadPool::ParallelFor(int64_t n, int64_t grain,
                             const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  grain = std::max<int64_t>(1, grain);
  const int64_t grains = (n + grain - 1) / grain;
  if (workers_.empty() || grains <= 1) {
    fn(0, n);
    return;
  }
  const int64_t chunks =
      std::min<int64_t>({grains, num_threads() * kChunksPerThread, kMaxChunks});
  fn_.store(&fn, std::memory_order_relaxed);
  n_.store(n, std::memory_order_relaxed);
  grain_.store(grain, std::memory_order_relaxed);
  done_.store(0, std::memory_order_relaxed);
  ++call_;
  claim_.store((static_cast<uint64_t>(call_) << 32) | (static_cast<uint64_t>(chunks) << 16),
               std::memory_order_release);
  {
    // Sleeping workers re-check claim_ under the lock, so none misses a call.
    std::lock_guard<std::mutex> lock(mu_);
  }
  wake_.notify_all();
  RunChunks(call_);
  for (int spins = 0; done_.load(std::memory_order_acquire) != chunks; ++spins) {
    if (spins < 4096) {
      CpuRelax();
    } else {
      std::this_thread::yield();
    }
  }
}

void ThreadPool::WorkerLoop() {
  uint32_t seen = 0;
  for (;;) {
    const auto spin_until = std::chrono::steady_clock::now() + kSpinTime;
    uint32_t call = CallOf(claim_.load(std::memory_order_acquire));
    for (int i = 0; call == seen && !stop_.load(std::memory_order_relaxed); ++i) {
      CpuRelax();
      if ((i & 255) == 255 && std::chrono::steady_clock::now() > spin_until) {
        std::unique_lock<std::mutex> lock(mu_);
        wake_.wait(lock, [&] {
          return stop_.load() || CallOf(claim_.load(std::memory_order_acquire)) != seen;
        });
      }
      call = CallOf(claim_.load(std::memory_order_acquire));
    }
    if (stop_.load()) return;
    seen = call;
    RunChunks(call);
  }
}

void ParallelFor(ThreadPool* pool, int64_t n, int64_t grain,
                 const std::function<void(int64_t, int64_t)>& fn) {
  if (pool == nullptr) {
    fn(0, n);
  } else {
    pool->ParallelFor(n, grain, fn);
  }
}

}  // namespace morphserve
