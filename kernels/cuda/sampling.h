// The next token of every row of a batch of logits, chosen on the GPU with
// the semantics of the CPU reference, engine::Sampler (engine/sampler/):
//   - penalties as vLLM applies them: repetition over the prompt and the
//     output (divide a positive logit, multiply a negative one), then
//     presence and frequency over the output (subtract presence +
//     frequency * count);
//   - greedy rows (temperature 0): the largest penalised logit, the lower id
//     on a tie;
//   - sampling rows: the penalised logits times 1 / temperature; tokens at
//     -inf dropped; top-k, min-p and top-p applied in Sampler's order, on
//     the tokens ranked by (value descending, id ascending), so ties at a
//     cut go to the lower id; then one draw from what is kept;
//   - log-probabilities of the RAW logits (before penalties, temperature and
//     truncation): the chosen token's and, on request, the top N (N <=
//     kMaxLogprobs) most likely tokens, most likely first, ties to the
//     lower id.
//
// One thread block per row, all its working state in shared memory: there
// is no device scratch, and nothing is allocated per call.
//
// Truncation. Top-k, min-p and top-p each keep a prefix of the ranking, so
// what is kept is every token ranked at or above one threshold. The
// thresholds are found by radix selection over a 64-bit key per token (the
// value's bits in an order-preserving form, then the inverted id), 8 bits a
// pass over the vocabulary, with a shared-memory histogram of counts and of
// probability mass per digit. A search stops as soon as the threshold token
// is alone in its bucket: for float logits usually after 3 or 4 of the 8
// possible passes (ties in value go on into the id bits). Top-k's threshold
// is the k-th key; top-p's the last key whose predecessors hold less than
// top_p of the top-k tokens' mass (so the token that crosses top_p is kept,
// as in Sampler). Masses are exp(value - max) in 2^-44 fixed point, so the
// histograms sum in integers: the same inputs give the same cut whatever
// order the atomics land in.
//
// The draw: the exponential race (Gumbel-max), as vLLM samples without
// FlashInfer: the kept token with the largest value - log(E), where E =
// -log(u) and u is uniform from Philox4x32-10 keyed by the row's seed with
// the counter (token, step). That picks token i with probability
// proportional to exp(value_i), needs no prefix sums or sorting, and
// depends only on (seed, step, the row's logits and parameters): never on
// the row's place in the batch or on other rows. SamplingNoise() gives the
// noise on the host, for tests.
//
// Penalty state. A request's token history is a short list of distinct
// (token, output count) entries in a device pool of PenaltyEntry, rather
// than a dense [rows][vocab] count array (256 rows x 128k vocab would be
// 128 MiB, almost all zeros, and the host would have to clear and refill
// rows as the batch changes). A row's entries are
// penalty_entries[penalty_offset, penalty_offset + penalty_size): every
// distinct prompt token (output count 0 unless also generated) and every
// generated token (count >= 1). The repetition penalty applies to every
// entry, presence and frequency to entries with a count above 0; ids outside
// [0, vocab) are ignored. While sampling, the row marks its entries in a
// shared-memory bitmap of the vocabulary: vocabulary passes skip marked
// tokens and the entries are visited separately with their penalised
// logits, so the logits stay read-only.
//
// How the host keeps the lists: at admission it reserves penalty_capacity
// entries for the request (distinct prompt tokens + max new tokens) and
// uploads the distinct prompt tokens as {token, 0}, penalty_size of them.
// With record_tokens set, each launch then records every row's chosen token
// itself: the entry for it gets output_count + 1 or, if absent and
// penalty_size < penalty_capacity, {token, 1} is written at index
// penalty_size. The host mirrors that without reading the list back: it
// keeps the set of listed tokens per request and, on reading the chosen
// token, adds 1 to penalty_size when the token was new and there was room.
// A request without penalties needs no list (penalty_size and
// penalty_capacity 0). Rows of one launch must not share entries.
//
// Device pointers; work is queued on `stream` and the returned status covers
// argument checks and the launch. The row parameters are read on the
// device, so they are not checked: they must satisfy
// SamplingParams::Validate (num_logprobs is clamped to [0, kMaxLogprobs]).
#ifndef MORPHSERVE_KERNELS_CUDA_SAMPLING_H_
#define MORPHSERVE_KERNELS_CUDA_SAMPLING_H_

#include <cuda_runtime_api.h>

#include <cstdint>

#include "absl/status/status.h"
#include "common/sampling_params.h"

namespace morphserve::kernels::cuda {

// Largest vocabulary: the shared bitmap of penalised tokens has one bit each.
inline constexpr int64_t kMaxSamplingVocab = int64_t{1} << 18;

// One token of a request's history.
struct PenaltyEntry {
  int32_t token = 0;
  int32_t output_count = 0;  // times generated so far; 0 for a prompt-only token
};

// One row's parameters, as SamplingParams; an array of these is copied to
// the device each step.
struct SamplingRowParams {
  float temperature = 1.0f;  // 0: greedy
  int32_t top_k = 0;         // 0: off
  float top_p = 1.0f;        // 1: off
  float min_p = 0.0f;        // 0: off
  float repetition_penalty = 1.0f;
  float presence_penalty = 0.0f;
  float frequency_penalty = 0.0f;
  int32_t num_logprobs = 0;  // top-N raw log-probabilities to report
  uint64_t seed = 0;
  // The draw's counter: different for every token the request draws (the
  // number of tokens it has generated, say). The same seed and step give
  // the same token for the same logits.
  uint64_t step = 0;
  // The request's history: entries [offset, offset + size) of the pool, with
  // room for `capacity` in all when recording.
  int64_t penalty_offset = 0;
  int32_t penalty_size = 0;
  int32_t penalty_capacity = 0;
};

// The row parameters of `params` with `seed` (the request's own, or one the
// host chose for an unseeded request) and `step`; no penalty list yet.
inline SamplingRowParams ToSamplingRow(const SamplingParams& params, uint64_t seed, uint64_t step) {
  SamplingRowParams row;
  row.temperature = params.temperature;
  row.top_k = params.top_k;
  row.top_p = params.top_p;
  row.min_p = params.min_p;
  row.repetition_penalty = params.repetition_penalty;
  row.presence_penalty = params.presence_penalty;
  row.frequency_penalty = params.frequency_penalty;
  row.num_logprobs = params.logprobs;
  row.seed = seed;
  row.step = step;
  return row;
}

struct SamplingArgs {
  // f32 [num_rows][logits_stride]; the first `vocab` of each row are used.
  const float* logits = nullptr;
  int64_t logits_stride = 0;
  int64_t num_rows = 0;
  int64_t vocab = 0;                        // 1 .. kMaxSamplingVocab
  const SamplingRowParams* rows = nullptr;  // [num_rows]
  // The pool the rows' penalty lists index; null when no row has one.
  PenaltyEntry* penalty_entries = nullptr;
  // Record each row's chosen token in its list (see above).
  bool record_tokens = false;

  // Outputs, per row: the token and its raw log-probability.
  int32_t* tokens = nullptr;  // int32 [num_rows]
  float* logprobs = nullptr;  // f32 [num_rows]
  // int32 and f32 [num_rows][top_stride], top_stride >= kMaxLogprobs, both
  // set or both null (no row reports alternatives): row r's first
  // min(num_logprobs, vocab) entries are its most likely raw tokens, most
  // likely first; later entries are left as they were.
  int32_t* top_ids = nullptr;
  float* top_logprobs = nullptr;
  int64_t top_stride = 0;
  // Optional, for tests and debugging: f32 [num_rows][probs_stride], the
  // distribution each row drew from (0 for a dropped token; a greedy row
  // has 1 at its token). Costs one more pass over the vocabulary.
  float* probs = nullptr;
  int64_t probs_stride = 0;
};

absl::Status SampleTokens(const SamplingArgs& args, cudaStream_t stream);

// The noise the draw adds to token `token`'s value, -log(-log(u)), computed
// on the host as the device does (to within float rounding of log).
float SamplingNoise(uint64_t seed, uint64_t step, int32_t token);

}  // namespace morphserve::kernels::cuda

#endif  // MORPHSERVE_KERNELS_CUDA_SAMPLING_H_
