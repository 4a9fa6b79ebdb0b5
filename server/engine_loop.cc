#include "server/engine_loop.h"

#include <algorithm>
#include <iterator>
#include <utility>

#include "common/status.h"
#include "common/strings.h"
#include "engine/backend/backend_registry.h"
#include "engine/backend/cpu_backend.h"

namespace morphserve::server {

using Clock = std::chrono::steady_clock;

namespace {

double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

}  // namespace

absl::StatusOr<std::unique_ptr<EngineLoop>> EngineLoop::Create(const engine::Model& model,
                                                               const EngineOptions& options) {
  engine::BackendOptions backend;
  backend.device = options.device;
  backend.block_size = options.block_size;
  backend.num_blocks = options.num_blocks;
  backend.kv_cache_bytes = options.kv_cache_bytes;
  backend.gpu_memory_utilization = options.gpu_memory_utilization;
  backend.cuda_graph_max_batch = options.cuda_graph_max_batch;
  backend.policies = options.policies;
  backend.max_step_tokens = options.max_num_batched_tokens;
  backend.max_step_sequences = options.max_num_seqs;
  backend.threads = options.threads;
  backend.forward.reference_kernels = options.reference_kernels;
  backend.forward.pack_weights = options.pack_weights;
  ASSIGN_OR_RETURN(std::unique_ptr<engine::ForwardBackend> created,
                   engine::CreateBackend(model, backend));
  return std::make_unique<EngineLoop>(model, options, std::move(created));
}

EngineLoop::EngineLoop(const engine::Model& model, const EngineOptions& options)
    : EngineLoop(model, options,
                 std::make_unique<engine::CpuBackend>(
                     model, options.threads, options.num_blocks, options.block_size,
                     engine::ForwardOptions{.reference_kernels = options.reference_kernels,
                                            .pack_weights = options.pack_weights})) {}

EngineLoop::EngineLoop(const engine::Model& model, const EngineOptions& options,
                       std::unique_ptr<engine::ForwardBackend> backend)
    : model_(model),
      options_(options),
      executor_(model, std::move(backend)),
      scheduler_({executor_.cache_shape().num_blocks, executor_.cache_shape().block_size,
                  options.max_num_seqs, options.max_num_batched_tokens, options.full_admission}) {
  options_.num_blocks = executor_.cache_shape().num_blocks;
  options_.block_size = executor_.cache_shape().block_size;
  options_.device = std::string(executor_.backend().device());
  stats_.total_blocks = options_.num_blocks;
  stats_.free_blocks = options_.num_blocks;
  started_ = Clock::now();
  thread_ = std::thread([this] { Run(); });
}

EngineLoop::~EngineLoop() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  wake_.notify_all();
  thread_.join();
  for (auto& [id, live] : live_) {
    StreamEvent e;
    e.error = absl::CancelledError("the engine stopped");
    live.stream->Push(std::move(e));
  }
  for (Pending& p : inbox_) {
    StreamEvent e;
    e.error = absl::CancelledError("the engine stopped");
    p.stream->Push(std::move(e));
  }
}

absl::StatusOr<std::pair<int64_t, std::shared_ptr<TokenStream>>> EngineLoop::Submit(
    GenerationRequest request) {
  const engine::ModelConfig& c = model_.config;
  if (request.prompt.empty()) return absl::InvalidArgumentError("the prompt is empty");
  for (int32_t t : request.prompt) {
    if (t < 0 || t >= c.vocab_size) {
      return absl::InvalidArgumentError(
          StrCat("token id ", t, " is outside the vocabulary [0, ", c.vocab_size, ")"));
    }
  }
  RETURN_IF_ERROR(request.sampling.Validate());
  RETURN_IF_ERROR(request.stop.Validate());
  RETURN_IF_ERROR(request.kv.Validate(c.context_length));
  RETURN_IF_ERROR(SupportsPolicy(request.kv));
  const int64_t prompt = static_cast<int64_t>(request.prompt.size());
  if (prompt + request.stop.max_new_tokens > c.context_length) {
    return absl::OutOfRangeError(StrCat("prompt (", prompt, " tokens) + max_new_tokens (",
                                        request.stop.max_new_tokens,
                                        ") exceeds the context length ", c.context_length));
  }
  const int64_t blocks =
      (request.kv.MaxSlots(prompt, request.stop.max_new_tokens) + options_.block_size - 1) /
      options_.block_size;
  if (blocks > options_.num_blocks) {
    return absl::ResourceExhaustedError(
        StrCat("prompt (", prompt, " tokens) + stopping.max_new_tokens (",
               request.stop.max_new_tokens, ") need up to ", blocks, " KV blocks under kv.policy '",
               KvPolicyName(request.kv.kind), "'; the pool has ", options_.num_blocks));
  }
  if (options_.max_queue > 0 && in_engine_.load() >= options_.max_queue) {
    return absl::ResourceExhaustedError(
        StrCat("the server is full: ", options_.max_queue, " requests are queued or running"));
  }
  auto stream = std::make_shared<TokenStream>();
  int64_t id;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stop_) return absl::UnavailableError("the engine is stopping");
    id = next_id_++;
    inbox_.push_back({id, std::move(request), stream, Clock::now()});
    ++in_engine_;
  }
  wake_.notify_all();
  return std::make_pair(id, stream);
}

absl::Status EngineLoop::SupportsPolicy(const KvPolicyConfig& policy) const {
  // The backend's answer is fixed at creation, so any thread may ask.
  return executor_.backend().SupportsPolicy(policy);
}

void EngineLoop::Cancel(int64_t id) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    cancels_.push_back(id);
  }
  wake_.notify_all();
}

EngineStats EngineLoop::Stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_;
}

std::vector<StepSample> EngineLoop::Timeline() const {
  std::lock_guard<std::mutex> lock(mu_);
  return timeline_;
}

void EngineLoop::Finish(int64_t id, FinishReason finish, absl::Status error) {
  const auto it = live_.find(id);
  if (it == live_.end()) return;
  Live& live = it->second;
  StreamEvent e;
  e.finish = finish;
  e.error = std::move(error);
  e.usage.prompt_tokens = live.prompt_tokens;
  e.usage.completion_tokens = live.completion_tokens;
  e.usage.kv = executor_.Usage(id);
  if (live.first_scheduled) e.usage.queue_seconds = Seconds(*live.first_scheduled - live.submitted);
  if (live.first_token) {
    e.usage.time_to_first_token_seconds = Seconds(*live.first_token - live.submitted);
  }
  ended_evicted_[static_cast<int>(live.kv_policy)] += e.usage.kv.tokens_evicted;
  {
    std::lock_guard<std::mutex> lock(mu_);
    ++stats_.requests_finished[static_cast<int>(e.error.ok() ? finish : FinishReason::kNone)];
    stats_.finished_kv_bytes_saved += e.usage.kv.bytes_saved;
    stats_.finished_kv_bytes_full_equivalent += e.usage.kv.bytes_resident + e.usage.kv.bytes_saved;
    if (live.first_token) stats_.time_to_first_token.Observe(e.usage.time_to_first_token_seconds);
    if (live.first_scheduled) stats_.queue_time.Observe(e.usage.queue_seconds);
    stats_.request_latency.Observe(Seconds(Clock::now() - live.submitted));
  }
  // Out of the engine before the client can see the end, so that a request
  // sent right after it is not refused as one too many.
  --in_engine_;
  live.stream->Push(std::move(e));
  executor_.RemoveSequence(id);
  live_.erase(it);
}

void EngineLoop::Run() {
  StepResult result;
  std::vector<engine::TokenOutput> outputs;
  for (;;) {
    std::vector<Pending> inbox;
    std::vector<int64_t> cancels;
    {
      std::unique_lock<std::mutex> lock(mu_);
      // Sleep unless something runs; waiting requests that cannot be
      // admitted yet only wait for running ones to end.
      const bool busy = scheduler_.Stats().running > 0;
      if (!busy) {
        wake_.wait_for(lock, std::chrono::milliseconds(50),
                       [&] { return stop_ || !inbox_.empty() || !cancels_.empty(); });
      }
      if (stop_) return;
      inbox.swap(inbox_);
      cancels.swap(cancels_);
    }
    for (Pending& p : inbox) {
      scheduler::SequenceRequest sr;
      sr.id = p.id;
      sr.prompt = p.request.prompt;
      sr.max_new_tokens = p.request.stop.max_new_tokens;
      sr.kv = p.request.kv;
      sr.priority = p.request.priority;
      sr.deadline = p.request.deadline;
      absl::Status s = executor_.AddSequence(p.id, p.request.prompt, p.request.sampling,
                                             p.request.stop, p.request.kv);
      if (s.ok()) s = scheduler_.Add(std::move(sr));
      if (!s.ok()) {
        executor_.RemoveSequence(p.id);
        --in_engine_;
        StreamEvent e;
        e.error = s;
        p.stream->Push(std::move(e));
        continue;
      }
      Live live;
      live.stream = p.stream;
      live.submitted = p.submitted;
      live.prompt_tokens = static_cast<int64_t>(p.request.prompt.size());
      live.kv_policy = p.request.kv.kind;
      live_.emplace(p.id, std::move(live));
      std::lock_guard<std::mutex> lock(mu_);
      stats_.prompt_tokens += static_cast<int64_t>(p.request.prompt.size());
    }
    for (int64_t id : cancels) {
      if (scheduler_.Cancel(id)) Finish(id, FinishReason::kCancelled, absl::OkStatus());
    }
    for (const scheduler::TokenEvent& e : scheduler_.ExpireDeadlines(Clock::now())) {
      Finish(e.seq_id, FinishReason::kCancelled,
             absl::DeadlineExceededError("the request passed its deadline"));
    }
    const StepPlan& plan = scheduler_.Schedule();
    if (plan.sequences.empty()) {
      PublishStats(0, 0, 0, /*stepped=*/false);
      continue;
    }
    const Clock::time_point now = Clock::now();
    int64_t decoding = 0;
    for (const ScheduledSequence& s : plan.sequences) {
      Live& live = live_.at(s.seq_id);
      if (!live.first_scheduled) live.first_scheduled = now;
      if (!s.prompt_pending && !s.fresh && s.tokens.size() == 1) ++decoding;
    }
    if (absl::Status s = executor_.Execute(plan, &result, &outputs); !s.ok()) {
      std::vector<int64_t> failed;
      for (const ScheduledSequence& seq : plan.sequences) failed.push_back(seq.seq_id);
      for (int64_t id : failed) {
        scheduler_.Fail(id);
        Finish(id, FinishReason::kNone, s);
      }
      continue;
    }
    const std::vector<scheduler::TokenEvent> events = scheduler_.Update(result);
    const Clock::time_point done = Clock::now();
    int64_t new_tokens = 0;
    for (size_t i = 0; i < outputs.size(); ++i) {
      engine::TokenOutput& out = outputs[i];
      if (out.token < 0) continue;
      Live& live = live_.at(out.seq_id);
      ++live.completion_tokens;
      ++new_tokens;
      if (!live.first_token) {
        live.first_token = done;
      } else {
        token_gaps_.push_back(Seconds(done - live.last_token));
      }
      live.last_token = done;
      StreamEvent e;
      e.token = out.token;
      e.text = std::move(out.text);
      e.logprob = out.logprob;
      e.top = std::move(out.top);
      live.stream->Push(std::move(e));
    }
    for (const scheduler::TokenEvent& e : events) {
      if (e.finish != FinishReason::kNone) Finish(e.seq_id, e.finish, absl::OkStatus());
    }
    PublishStats(static_cast<int64_t>(plan.sequences.size()), decoding, new_tokens,
                 /*stepped=*/true);
  }
}

void EngineLoop::PublishStats(int64_t scheduled, int64_t decoding, int64_t new_tokens,
                              bool stepped) {
  const scheduler::SchedulerStats s = scheduler_.Stats();
  engine::KvUsage kv;
  int64_t evicted[kNumKvPolicies];
  std::copy(std::begin(ended_evicted_), std::end(ended_evicted_), evicted);
  for (const auto& [id, live] : live_) {
    const engine::KvUsage u = executor_.Usage(id);
    kv.tokens_resident += u.tokens_resident;
    kv.tokens_full_equivalent += u.tokens_full_equivalent;
    kv.bytes_resident += u.bytes_resident;
    kv.bytes_saved += u.bytes_saved;
    evicted[static_cast<int>(live.kv_policy)] += u.tokens_evicted;
  }
  std::lock_guard<std::mutex> lock(mu_);
  std::copy(std::begin(evicted), std::end(evicted), stats_.kv_tokens_evicted);
  stats_.kv_tokens_resident = kv.tokens_resident;
  stats_.kv_tokens_full_equivalent = kv.tokens_full_equivalent;
  stats_.kv_bytes_resident = kv.bytes_resident;
  stats_.kv_bytes_saved = kv.bytes_saved;
  stats_.running = s.running;
  stats_.waiting = s.waiting;
  stats_.free_blocks = s.free_blocks;
  stats_.used_blocks = s.used_blocks;
  stats_.peak_used_blocks = std::max(stats_.peak_used_blocks, s.used_blocks);
  stats_.peak_running = std::max(stats_.peak_running, decoding);
  stats_.preemptions = s.preemptions;
  stats_.output_tokens += new_tokens;
  if (!stepped) return;
  if (options_.record_timeline) {
    timeline_.push_back({Seconds(Clock::now() - started_), decoding, s.running, s.waiting,
                         s.used_blocks, new_tokens});
  }
  ++stats_.steps;
  stats_.batch_size.Observe(static_cast<double>(scheduled));
  for (double gap : token_gaps_) stats_.inter_token_latency.Observe(gap);
  token_gaps_.clear();
  if (decoding > 0) {
    ++stats_.decode_steps;
    stats_.decoding_sum += decoding;
  }
}

}  // namespace morphserve::server
