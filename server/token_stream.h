// One request's output, handed from the engine loop's thread to whoever
// consumes it (a gRPC reactor, the batch driver). Thread-safe; shared by
// both sides, so neither holds a pointer into the other.
#ifndef MORPHSERVE_SERVER_TOKEN_STREAM_H_
#define MORPHSERVE_SERVER_TOKEN_STREAM_H_

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "common/finish_reason.h"
#include "engine/kv/kv_sequence.h"
#include "engine/sampler/sampler.h"

namespace morphserve::server {

struct RequestUsage {
  int64_t prompt_tokens = 0;
  int64_t completion_tokens = 0;
  engine::KvUsage kv;
  double queue_seconds = 0.0;          // submitted -> first scheduled
  double time_to_first_token_seconds = 0.0;
  int64_t preemptions = 0;
};

// A token (with the text it releases), or the end of the stream.
struct StreamEvent {
  int32_t token = -1;
  std::string text;
  float logprob = 0.0f;
  std::vector<engine::TokenLogprob> top;
  FinishReason finish = FinishReason::kNone;  // set on the last event
  absl::Status error;                         // not OK: the request failed
  RequestUsage usage;                         // on the last event
  bool last() const { return finish != FinishReason::kNone || !error.ok(); }
};

class TokenStream {
 public:
  void Push(StreamEvent event) {
    std::function<void()> notify;
    {
      std::lock_guard<std::mutex> lock(mu_);
      events_.push_back(std::move(event));
      notify = notify_;
    }
    ready_.notify_all();
    if (notify) notify();
  }

  // Called (on the pushing thread, without the stream's lock) after every
  // Push; for consumers that are woken rather than waiting in Pop. The
  // callable must stay safe to call after its consumer is gone.
  void SetNotify(std::function<void()> notify) {
    std::lock_guard<std::mutex> lock(mu_);
    notify_ = std::move(notify);
  }

  // The next event, waiting up to `timeout`; nullopt on timeout.
  std::optional<StreamEvent> Pop(std::chrono::milliseconds timeout) {
    std::unique_lock<std::mutex> lock(mu_);
    if (!ready_.wait_for(lock, timeout, [&] { return !events_.empty(); })) return std::nullopt;
    StreamEvent e = std::move(events_.front());
    events_.pop_front();
    return e;
  }

 private:
  std::mutex mu_;
  std::condition_variable ready_;
  std::deque<StreamEvent> events_;
  std::function<void()> notify_;
};

}  // namespace morphserve::server

#endif  // MORPHSERVE_SERVER_TOKEN_STREAM_H_
