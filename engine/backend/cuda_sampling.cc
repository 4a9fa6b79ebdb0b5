// CudaBackend's sampling: each request's seed, draw counter and penalty
// history (in a DevicePool), and the step that chooses tokens on the device.
#include <algorithm>
#include <vector>

#include "common/status.h"
#include "common/strings.h"
#include "engine/backend/cuda_backend.h"
#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/sampling.h"

namespace morphserve::engine {

namespace kc = kernels::cuda;

absl::Status CudaBackend::AddRequest(int64_t id, const SamplingParams& params,
                                     std::span<const int32_t> prompt, int64_t max_new_tokens) {
  if (requests_.contains(id)) return absl::InvalidArgumentError(StrCat("request ", id, " exists"));
  RequestSampling r;
  r.params = params;
  r.seed = params.seed.has_value() ? *params.seed : seed_rng_();
  const bool penalized = params.repetition_penalty != 1.0f || params.presence_penalty != 0.0f ||
                         params.frequency_penalty != 0.0f;
  if (penalized) {
    // The distinct prompt tokens, then room for every token it may draw.
    std::vector<kc::PenaltyEntry> entries;
    for (int32_t t : prompt) {
      if (r.listed.insert(t).second) entries.push_back({t, 0});
    }
    r.penalty_size = static_cast<int32_t>(entries.size());
    r.penalty_capacity = static_cast<int32_t>(entries.size() + std::max<int64_t>(max_new_tokens, 1));
    ASSIGN_OR_RETURN(r.penalty_offset, penalties_.Allocate(r.penalty_capacity));
    RETURN_IF_CUDA_ERROR(cudaMemcpy(penalties_.as<kc::PenaltyEntry>() + r.penalty_offset, entries.data(),
                                    entries.size() * sizeof(kc::PenaltyEntry),
                                    cudaMemcpyHostToDevice));
  }
  requests_.emplace(id, std::move(r));
  return absl::OkStatus();
}

void CudaBackend::RemoveRequest(int64_t id) {
  const auto it = requests_.find(id);
  if (it == requests_.end()) return;
  if (it->second.penalty_capacity > 0) {
    penalties_.Free(it->second.penalty_offset, it->second.penalty_capacity);
  }
  requests_.erase(it);
}

absl::Status CudaBackend::ForwardAndSample(const ForwardBatch& batch,
                                           std::span<const SampleRow> rows,
                                           std::vector<SampleResult>* out) {
  RETURN_IF_ERROR(CheckSampleArgs(batch, rows));
  if (rows.empty()) return absl::OkStatus();
  const int64_t n_rows = static_cast<int64_t>(rows.size());
  bool any_top = false;
  for (const SampleRow& row : rows) {
    if (!row.sample) continue;
    const auto it = requests_.find(row.id);
    if (it == requests_.end()) {
      return absl::InternalError(StrCat("request ", row.id, " was never added"));
    }
    any_top = any_top || it->second.params.logprobs > 0;
  }
  RETURN_IF_ERROR(PrepareStep(batch));
  // Every row's parameters (staged after PrepareStep, which may grow the
  // buffer); a row that draws nothing is greedy, without penalties or
  // log-probabilities, and its token is ignored.
  auto* params = static_cast<kc::SamplingRowParams*>(sample_host_.get());
  for (int64_t i = 0; i < n_rows; ++i) {
    params[i] = kc::SamplingRowParams{};
    params[i].temperature = 0.0f;
    if (!rows[i].sample) continue;
    const RequestSampling& r = requests_.at(rows[i].id);
    params[i] = kc::ToSamplingRow(r.params, r.seed, r.step);
    params[i].penalty_offset = r.penalty_offset;
    params[i].penalty_size = r.penalty_size;
    params[i].penalty_capacity = r.penalty_capacity;
  }
  // Tokens, their log-probabilities and (when asked) the top lists come
  // back in one copy; the layout is [tokens][logprobs][top ids][top logprobs].
  const int64_t words = any_top ? (2 + 2 * kMaxLogprobs) * capacity_rows_ : 2 * capacity_rows_;
  const auto queue = [&]() -> absl::Status {
    RETURN_IF_ERROR(QueueForward());
    RETURN_IF_CUDA_ERROR(cudaMemcpyAsync(sample_rows_.data(), params,
                                         n_rows * sizeof(kc::SamplingRowParams),
                                         cudaMemcpyHostToDevice, stream_));
    kc::SamplingArgs args;
    args.logits = logits_.as<float>();
    args.logits_stride = model_.config.vocab_size;
    args.num_rows = n_rows;
    args.vocab = model_.config.vocab_size;
    args.rows = sample_rows_.as<kc::SamplingRowParams>();
    args.penalty_entries = penalties_.as<kc::PenaltyEntry>();
    args.record_tokens = true;
    args.tokens = sampled_.as<int32_t>();
    args.logprobs = sampled_.as<float>() + capacity_rows_;
    if (any_top) {
      args.top_ids = sampled_.as<int32_t>() + 2 * capacity_rows_;
      args.top_logprobs = sampled_.as<float>() + (2 + kMaxLogprobs) * capacity_rows_;
      args.top_stride = kMaxLogprobs;
    }
    RETURN_IF_ERROR(kc::SampleTokens(args, stream_));
    RETURN_IF_CUDA_ERROR(cudaMemcpyAsync(sampled_host_.get(), sampled_.data(),
                                         words * sizeof(int32_t), cudaMemcpyDeviceToHost,
                                         stream_));
    return absl::OkStatus();
  };
  RETURN_IF_ERROR(RunStep(GraphKey(/*mode=*/1 + any_top), queue));
  RETURN_IF_CUDA_ERROR(cudaStreamSynchronize(stream_));
  EndStep(batch);
  const auto* tokens = static_cast<const int32_t*>(sampled_host_.get());
  const auto* logprobs = reinterpret_cast<const float*>(tokens + capacity_rows_);
  const int32_t* top_ids = tokens + 2 * capacity_rows_;
  const auto* top_logprobs =
      reinterpret_cast<const float*>(tokens + (2 + kMaxLogprobs) * capacity_rows_);
  out->resize(rows.size());
  for (int64_t i = 0; i < n_rows; ++i) {
    if (!rows[i].sample) continue;
    RequestSampling& r = requests_.at(rows[i].id);
    SampleResult& result = (*out)[i];
    result.token = tokens[i];
    result.logprob = logprobs[i];
    result.top.clear();
    const int64_t top = std::min<int64_t>(r.params.logprobs, model_.config.vocab_size);
    for (int64_t k = 0; k < top; ++k) {
      result.top.push_back({top_ids[i * kMaxLogprobs + k], top_logprobs[i * kMaxLogprobs + k]});
    }
    // Mirror what the kernel recorded in the request's list.
    ++r.step;
    if (r.penalty_capacity > 0 && r.penalty_size < r.penalty_capacity &&
        r.listed.insert(result.token).second) {
      ++r.penalty_size;
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<int64_t> CudaBackend::DevicePool::Allocate(int64_t n) {
  n = (n + 3) / 4 * 4;
  for (auto it = free_.begin(); it != free_.end(); ++it) {
    if (it->second < n) continue;
    const int64_t offset = it->first;
    const int64_t rest = it->second - n;
    free_.erase(it);
    if (rest > 0) free_.emplace(offset + n, rest);
    return offset;
  }
  // Grow: at least double, and enough for `n` past the end.
  const int64_t grown = std::max<int64_t>({2 * capacity_, capacity_ + n, 1 << 16});
  ASSIGN_OR_RETURN(DeviceBuffer bigger, DeviceBuffer::Allocate(grown * element_bytes_));
  ++generation_;
  if (capacity_ > 0) {
    RETURN_IF_CUDA_ERROR(cudaMemcpy(bigger.data(), buffer_.data(), capacity_ * element_bytes_,
                                    cudaMemcpyDeviceToDevice));
  }
  buffer_ = std::move(bigger);
  Free(capacity_, grown - capacity_);
  capacity_ = grown;
  return Allocate(n);
}

void CudaBackend::DevicePool::Free(int64_t offset, int64_t n) {
  n = (n + 3) / 4 * 4;
  auto [it, inserted] = free_.emplace(offset, n);
  if (!inserted) return;
  // Merge with the following range, then with the preceding one.
  if (auto next = std::next(it); next != free_.end() && offset + n == next->first) {
    it->second += next->second;
    free_.erase(next);
  }
  if (it != free_.begin()) {
    auto prev = std::prev(it);
    if (prev->first + prev->second == offset) {
      prev->second += it->second;
      free_.erase(it);
    }
  }
}

}  // namespace morphserve::engine
