// The one thread that owns the scheduler and the executor. Other threads
// submit requests and cancellations through a locked inbox and read tokens
// from each request's TokenStream; the loop never blocks on them.
#ifndef MORPHSERVE_SERVER_ENGINE_LOOP_H_
#define MORPHSERVE_SERVER_ENGINE_LOOP_H_

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "common/kv_policy.h"
#include "common/sampling_params.h"
#include "engine/backend/forward_backend.h"
#include "engine/executor/executor.h"
#include "engine/generation/stop_checker.h"
#include "engine/model/model.h"
#include "scheduler/scheduler.h"
#include "server/metrics.h"
#include "server/token_stream.h"

namespace morphserve::server {

struct EngineOptions {
  std::string device = "cpu";  // what the forward pass runs on
  // The KV pool: num_blocks blocks when positive, else what kv_cache_bytes
  // holds when positive, else the device's default (see BackendOptions).
  // Once the engine runs, num_blocks is the pool's actual size.
  int64_t num_blocks = 0;
  int64_t kv_cache_bytes = 0;
  double gpu_memory_utilization = 0.9;
  int64_t cuda_graph_max_batch = 64;  // see engine::BackendOptions
  // Policies requests will mostly use: `auto` picks a device that runs them.
  std::vector<KvPolicyConfig> policies = {};
  int64_t block_size = 16;
  int64_t max_num_seqs = 256;
  int64_t max_num_batched_tokens = 2048;
  scheduler::FullAdmission full_admission = scheduler::FullAdmission::kOptimistic;
  int threads = 0;  // 0: all cores
  bool reference_kernels = false;
  bool pack_weights = true;  // see engine::ForwardOptions
  bool record_timeline = false;  // keep one StepSample per step (benchmarks)
  // Most requests in the engine (queued or running); beyond, Submit answers
  // ResourceExhausted at once. 0: no limit.
  int64_t max_queue = 0;
};

// The engine after one step, for plots of a run.
struct StepSample {
  double seconds = 0.0;  // since the loop started
  int64_t decoding = 0;
  int64_t running = 0;
  int64_t waiting = 0;
  int64_t used_blocks = 0;
  int64_t output_tokens = 0;  // in this step
};

struct GenerationRequest {
  std::vector<int32_t> prompt;
  SamplingParams sampling;
  engine::StopConditions stop;
  KvPolicyConfig kv;
  int32_t priority = 0;
  std::optional<std::chrono::steady_clock::time_point> deadline;
};

inline constexpr int kNumKvPolicies = 5;  // KvPolicyKind values
static_assert(static_cast<int>(KvPolicyKind::kStreaming) + 1 == kNumKvPolicies);

struct EngineStats {
  int64_t running = 0;
  int64_t waiting = 0;
  int64_t free_blocks = 0;
  int64_t used_blocks = 0;
  int64_t total_blocks = 0;
  int64_t peak_used_blocks = 0;
  int64_t peak_running = 0;
  int64_t preemptions = 0;
  int64_t steps = 0;
  int64_t decode_steps = 0;  // steps that decoded at least one sequence
  int64_t decoding_sum = 0;  // sequences decoding, summed over decode steps
  int64_t output_tokens = 0;
  int64_t prompt_tokens = 0;          // of requests admitted
  int64_t requests_finished[5] = {};  // by FinishReason (kNone: failed)
  // KV figures summed over the live requests, after the latest step.
  int64_t kv_tokens_resident = 0;
  int64_t kv_tokens_full_equivalent = 0;
  int64_t kv_bytes_resident = 0;
  int64_t kv_bytes_saved = 0;
  // Tokens evicted so far, by the policy of the request (KvPolicyKind).
  int64_t kv_tokens_evicted[kNumKvPolicies] = {};
  // Each ended request's final usage, summed: bytes saved and what a full
  // cache would have held (resident + saved).
  int64_t finished_kv_bytes_saved = 0;
  int64_t finished_kv_bytes_full_equivalent = 0;
  Histogram time_to_first_token;
  Histogram inter_token_latency;
  Histogram queue_time;
  Histogram request_latency;
  Histogram batch_size{Histogram::kBatchSizes};  // sequences per step
};

class EngineLoop {
 public:
  // The engine on options.device, its backend created (weights uploaded,
  // KV pool allocated) before the thread starts; errors say what failed.
  static absl::StatusOr<std::unique_ptr<EngineLoop>> Create(const engine::Model& model,
                                                            const EngineOptions& options);
  // The engine on the CPU backend, with options.num_blocks blocks (tests).
  EngineLoop(const engine::Model& model, const EngineOptions& options);
  // The engine on `backend`, whose pool size replaces options.num_blocks.
  EngineLoop(const engine::Model& model, const EngineOptions& options,
             std::unique_ptr<engine::ForwardBackend> backend);
  ~EngineLoop();  // stops the thread; unfinished streams get a Cancelled error
  EngineLoop(const EngineLoop&) = delete;
  EngineLoop& operator=(const EngineLoop&) = delete;

  // Validates and queues a request. Errors here are immediate: invalid
  // parameters (InvalidArgument, OutOfRange), a request that could never
  // fit the KV pool (ResourceExhausted), or a KV policy the device does not
  // run (Unimplemented).
  absl::StatusOr<std::pair<int64_t, std::shared_ptr<TokenStream>>> Submit(
      GenerationRequest request);
  // Requests submitted and not yet ended.
  int64_t in_engine() const { return in_engine_; }
  // Ends the request after the step in flight, freeing its blocks; its
  // stream gets a last event with finish kCancelled.
  void Cancel(int64_t id);

  EngineStats Stats() const;
  // Options as run: num_blocks, block_size and device are the backend's.
  const EngineOptions& options() const { return options_; }
  // Whether the device runs `policy` (the error Submit gives otherwise).
  absl::Status SupportsPolicy(const KvPolicyConfig& policy) const;
  // Every step so far (with EngineOptions::record_timeline).
  std::vector<StepSample> Timeline() const;

 private:
  struct Pending {
    int64_t id;
    GenerationRequest request;
    std::shared_ptr<TokenStream> stream;
    std::chrono::steady_clock::time_point submitted;
  };
  struct Live {
    std::shared_ptr<TokenStream> stream;
    std::chrono::steady_clock::time_point submitted;
    std::optional<std::chrono::steady_clock::time_point> first_scheduled, first_token;
    std::chrono::steady_clock::time_point last_token;
    int64_t prompt_tokens = 0;
    int64_t completion_tokens = 0;
    KvPolicyKind kv_policy = KvPolicyKind::kFull;
  };

  void Run();
  void Finish(int64_t id, FinishReason finish, absl::Status error);
  // Copies the scheduler's figures into stats_ for other threads.
  void PublishStats(int64_t scheduled, int64_t decoding, int64_t new_tokens, bool stepped);

  const engine::Model& model_;
  EngineOptions options_;
  engine::Executor executor_;
  scheduler::Scheduler scheduler_;
  std::map<int64_t, Live> live_;  // engine thread only

  mutable std::mutex mu_;
  std::condition_variable wake_;
  std::vector<Pending> inbox_;
  std::vector<int64_t> cancels_;
  bool stop_ = false;
  int64_t next_id_ = 1;
  EngineStats stats_;  // guarded by mu_; updated once per step
  // Inter-token latencies of the step in flight (engine thread only; kept
  // to reuse its storage).
  std::vector<double> token_gaps_;
  // Evictions of requests that have ended, by policy (engine thread only).
  int64_t ended_evicted_[kNumKvPolicies] = {};
  std::vector<StepSample> timeline_;  // guarded by mu_
  std::chrono::steady_clock::time_point started_;

  std::atomic<int64_t> in_engine_{0};
  std::thread thread_;
};

}  // namespace morphserve::server

#endif  // MORPHSERVE_SERVER_ENGINE_LOOP_H_
