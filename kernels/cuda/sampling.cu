#include <climits>
#include <cmath>
#include <cstdint>

#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/launch_internal.h"
#include "kernels/cuda/reduce_internal.cuh"
#include "kernels/cuda/sampling.h"

namespace morphserve::kernels::cuda {
namespace {

using internal::kFullMask;
using internal::kWarpSize;
using internal::Require;

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kDigitBits = 8;
constexpr int kBuckets = 1 << kDigitBits;
constexpr int kBucketsPerLane = kBuckets / kWarpSize;
constexpr int kBitmapWords = static_cast<int>(kMaxSamplingVocab / 32);
// Probability masses in fixed point: exp(value - max) <= 1 times 2^44, so a
// whole vocabulary (2^18 tokens) sums below 2^62.
constexpr float kMassScale = 17592186044416.0f;
constexpr double kMassScaleD = 17592186044416.0;

// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2,
// 3"): the first word of the block for counter (c0, c1, c2, c3) and key
// (k0, k1).
__host__ __device__ inline uint32_t Philox(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                           uint32_t k0, uint32_t k1) {
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0;
    const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c2;
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32);
    c0 = hi1 ^ c1 ^ k0;
    c1 = static_cast<uint32_t>(p1);
    c2 = hi0 ^ c3 ^ k1;
    c3 = static_cast<uint32_t>(p0);
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c0;
}

// -log(E) with E = -log(u) exponential, u uniform in (0, 1) from 32 random
// bits; the upper half of u goes through log1p so that E keeps its relative
// precision near 0 (the tail where the noise is largest).
__host__ __device__ inline float Noise(uint64_t seed, uint64_t step, int32_t token) {
  const uint32_t r = Philox(static_cast<uint32_t>(token), static_cast<uint32_t>(step),
                            static_cast<uint32_t>(step >> 32), 0u, static_cast<uint32_t>(seed),
                            static_cast<uint32_t>(seed >> 32));
  const float e = r < 0x80000000u
                      ? -logf((static_cast<float>(r) + 0.5f) * 0x1p-32f)
                      : -log1pf(-((static_cast<float>(0xFFFFFFFFu - r) + 0.5f) * 0x1p-32f));
  return -logf(e);
}

// A 64-bit key that orders tokens as Sampler ranks them: by value, larger
// first, then by id, lower first. -0 and +0 tie, as they compare equal.
__device__ __forceinline__ uint64_t Key(float value, int token) {
  const uint32_t bits = __float_as_uint(value == 0.0f ? 0.0f : value);
  const uint32_t ordered = (bits & 0x80000000u) != 0 ? ~bits : bits | 0x80000000u;
  return (static_cast<uint64_t>(ordered) << 32) | static_cast<uint32_t>(~token);
}

__device__ __forceinline__ int KeyToken(uint64_t key) {
  return static_cast<int>(~static_cast<uint32_t>(key));
}

// The keys ranked at or above a selected one: (key >> shift) >= prefix;
// shift 64 keeps every key.
struct Threshold {
  uint64_t prefix;
  int shift;
};

__device__ __forceinline__ Threshold KeepAll() { return {0, 64}; }

__device__ __forceinline__ bool Above(uint64_t key, const Threshold& t) {
  return t.shift >= 64 || (key >> t.shift) >= t.prefix;
}

// The outcome of a search: the threshold, the count and mass of the keys
// ranked above the selected one, and the selected one's mass.
struct Selection {
  Threshold threshold;
  uint32_t count_above;
  unsigned long long mass_above;
  unsigned long long mass_at;
};

// One row's inputs.
struct Row {
  const float* logits;
  int vocab;
  bool penalised;
  const PenaltyEntry* entries;  // the row's own; visited only when penalised
  int num_entries;
  float repetition;
  float presence;
  float frequency;
};

// Sampler::ApplyPenalties for one token. The _rn intrinsics keep the
// compiler from fusing these into FMAs, which round differently from the CPU.
__device__ __forceinline__ float Penalise(const Row& row, float logit, int count) {
  if (row.repetition != 1.0f) {
    logit = logit > 0.0f ? logit / row.repetition : __fmul_rn(logit, row.repetition);
  }
  if (count > 0) {
    logit = __fsub_rn(logit,
                      __fadd_rn(row.presence, __fmul_rn(row.frequency, static_cast<float>(count))));
  }
  return logit;
}

struct Shared {
  // Tokens with a penalty entry, one bit each.
  uint32_t listed[kBitmapWords];
  unsigned int hist_count[kBuckets];
  unsigned long long hist_mass[kBuckets];
  // The bucket a search pass chose, from warp 0 to the block.
  int chosen_bucket;
  unsigned int chosen_count;
  unsigned int chosen_count_above;
  unsigned long long chosen_mass;
  unsigned long long chosen_mass_above;
  // The top-N raw keys, in no order until sorted.
  unsigned long long top_keys[kMaxLogprobs];
  unsigned int top_found;
  int recorded;
  // Per-warp partial results of block reductions.
  float red_f[kWarps];
  float red_f2[kWarps];
  int red_i[kWarps];
  unsigned int red_u[kWarps];
  unsigned long long red_ull[kWarps];
};

__device__ __forceinline__ int Lane() { return static_cast<int>(threadIdx.x) % kWarpSize; }
__device__ __forceinline__ int Warp() { return static_cast<int>(threadIdx.x) / kWarpSize; }

// Calls f(token, raw logit, penalised logit) once for every token of the
// row, spread over the block: the unlisted tokens in a pass over the
// vocabulary, then the listed ones from the entries.
template <typename F>
__device__ __forceinline__ void ForEachToken(const Row& row, const Shared& sh, F&& f) {
  for (int i = static_cast<int>(threadIdx.x); i < row.vocab; i += kThreads) {
    if (row.penalised && (sh.listed[i >> 5] >> (i & 31) & 1u) != 0) continue;
    const float raw = row.logits[i];
    f(i, raw, raw);
  }
  if (!row.penalised) return;
  for (int e = static_cast<int>(threadIdx.x); e < row.num_entries; e += kThreads) {
    const PenaltyEntry entry = row.entries[e];
    if (entry.token < 0 || entry.token >= row.vocab) continue;
    const float raw = row.logits[entry.token];
    f(entry.token, raw, Penalise(row, raw, entry.output_count));
  }
}

// Block reductions: every thread gets the result; each synchronises on both
// sides of its use of the shared partials. Partials combine in a fixed order.
__device__ float BlockMax(float v, Shared& sh) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    v = fmaxf(v, __shfl_xor_sync(kFullMask, v, offset));
  }
  if (Lane() == 0) sh.red_f[Warp()] = v;
  __syncthreads();
  float r = sh.red_f[0];
  for (int w = 1; w < kWarps; ++w) r = fmaxf(r, sh.red_f[w]);
  __syncthreads();
  return r;
}

template <typename T>
__device__ T BlockSumInt(T v, T* partials) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(kFullMask, v, offset);
  }
  if (Lane() == 0) partials[Warp()] = v;
  __syncthreads();
  T r = 0;
  for (int w = 0; w < kWarps; ++w) r += partials[w];
  __syncthreads();
  return r;
}

// exp-sum `sum` taken relative to `local_max`, made relative to `max`; 0 for
// an empty part (sum 0, local_max -inf).
__device__ __forceinline__ float Rescaled(float sum, float local_max, float max) {
  return sum > 0.0f ? sum * expf(local_max - max) : 0.0f;
}

// Combines per-thread (max, exp-sum) pairs into the block's.
__device__ void BlockMaxSum(float& max, float& sum, Shared& sh) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    const float other_max = __shfl_xor_sync(kFullMask, max, offset);
    const float other_sum = __shfl_xor_sync(kFullMask, sum, offset);
    const float m = fmaxf(max, other_max);
    sum = Rescaled(sum, max, m) + Rescaled(other_sum, other_max, m);
    max = m;
  }
  if (Lane() == 0) {
    sh.red_f[Warp()] = max;
    sh.red_f2[Warp()] = sum;
  }
  __syncthreads();
  float m = sh.red_f[0];
  for (int w = 1; w < kWarps; ++w) m = fmaxf(m, sh.red_f[w]);
  float s = 0.0f;
  for (int w = 0; w < kWarps; ++w) s += Rescaled(sh.red_f2[w], sh.red_f[w], m);
  __syncthreads();
  max = m;
  sum = s;
}

// Whether (value a, token ia) ranks before (b, ib): larger value, then lower id.
__device__ __forceinline__ bool Before(float a, int ia, float b, int ib) {
  return a > b || (a == b && ia < ib);
}

// The block's first (value, token) in that ranking.
__device__ void BlockArgMax(float& value, int& token, Shared& sh) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    const float other = __shfl_xor_sync(kFullMask, value, offset);
    const int other_token = __shfl_xor_sync(kFullMask, token, offset);
    if (Before(other, other_token, value, token)) {
      value = other;
      token = other_token;
    }
  }
  if (Lane() == 0) {
    sh.red_f[Warp()] = value;
    sh.red_i[Warp()] = token;
  }
  __syncthreads();
  value = sh.red_f[0];
  token = sh.red_i[0];
  for (int w = 1; w < kWarps; ++w) {
    if (Before(sh.red_f[w], sh.red_i[w], value, token)) {
      value = sh.red_f[w];
      token = sh.red_i[w];
    }
  }
  __syncthreads();
}

// Warp 0's part of a search pass: over the histogram of the keys still in
// play, the lowest-ranked bucket whose first key satisfies
// pred(count ranked above it, mass ranked above it), given what ranks above
// every key in play. Lane l holds buckets 255 - 8l down to 248 - 8l, so the
// lanes run down the ranking in order.
template <typename Pred>
__device__ void ChooseBucket(Shared& sh, uint32_t count_above, unsigned long long mass_above,
                             const Pred& pred) {
  const int lane = Lane();
  const int top = kBuckets - 1 - lane * kBucketsPerLane;
  uint32_t lane_count = 0;
  unsigned long long lane_mass = 0;
  for (int j = 0; j < kBucketsPerLane; ++j) {
    lane_count += sh.hist_count[top - j];
    lane_mass += sh.hist_mass[top - j];
  }
  // Inclusive scan over the lanes, then exclusive: what the lanes before hold.
  uint32_t count_scan = lane_count;
  unsigned long long mass_scan = lane_mass;
  for (int d = 1; d < kWarpSize; d *= 2) {
    const uint32_t c = __shfl_up_sync(kFullMask, count_scan, d);
    const unsigned long long m = __shfl_up_sync(kFullMask, mass_scan, d);
    if (lane >= d) {
      count_scan += c;
      mass_scan += m;
    }
  }
  uint32_t count = count_above + count_scan - lane_count;
  unsigned long long mass = mass_above + mass_scan - lane_mass;
  int found = -1;
  int first = -1;
  uint32_t found_count = 0;
  uint32_t first_count = 0;
  unsigned long long found_mass = 0;
  unsigned long long first_mass = 0;
  for (int j = 0; j < kBucketsPerLane; ++j) {
    const int b = top - j;
    const uint32_t n = sh.hist_count[b];
    if (n == 0) continue;
    if (first < 0) {
      first = b;
      first_count = count;
      first_mass = mass;
    }
    if (pred(count, mass)) {
      found = b;
      found_count = count;
      found_mass = mass;
    }
    count += n;
    mass += sh.hist_mass[b];
  }
  const unsigned found_lanes = __ballot_sync(kFullMask, found >= 0);
  if (found_lanes != 0) {
    // The predicate holds down the ranking and then fails: the last lane
    // that found a bucket holds the answer.
    if (lane == kWarpSize - 1 - __clz(static_cast<int>(found_lanes))) {
      sh.chosen_bucket = found;
      sh.chosen_count = sh.hist_count[found];
      sh.chosen_mass = sh.hist_mass[found];
      sh.chosen_count_above = found_count;
      sh.chosen_mass_above = found_mass;
    }
    return;
  }
  // Not even the first key qualifies (callers rule this out): take it.
  const unsigned nonempty = __ballot_sync(kFullMask, first >= 0);
  if (nonempty != 0 && lane == __ffs(static_cast<int>(nonempty)) - 1) {
    sh.chosen_bucket = first;
    sh.chosen_count = sh.hist_count[first];
    sh.chosen_mass = sh.hist_mass[first];
    sh.chosen_count_above = first_count;
    sh.chosen_mass_above = first_mass;
  } else if (nonempty == 0 && lane == 0) {
    sh.chosen_bucket = 0;
    sh.chosen_count = 0;
    sh.chosen_mass = 0;
    sh.chosen_count_above = count_above;
    sh.chosen_mass_above = mass_above;
  }
}

// Radix selection of the lowest-ranked key k such that pred(count of keys
// above k, their mass) holds, pred being true from the top down to k and
// false after. visit(g) must call g(key, mass) for every key in play (the
// same set every time); kWithMass false skips the masses (pred must not
// read them). Every thread must call it.
template <bool kWithMass, typename Visit, typename Pred>
__device__ Selection Select(Shared& sh, const Visit& visit, const Pred& pred) {
  uint64_t prefix = 0;
  int shift = 64;
  uint32_t count_above = 0;
  unsigned long long mass_above = 0;
  unsigned long long mass_at = 0;
  uint32_t left = 0;
  do {
    shift -= kDigitBits;
    for (int b = static_cast<int>(threadIdx.x); b < kBuckets; b += kThreads) {
      sh.hist_count[b] = 0;
      sh.hist_mass[b] = 0;
    }
    __syncthreads();
    const int known = shift + kDigitBits;  // bits above `shift` already fixed
    visit([&](uint64_t key, unsigned long long mass) {
      if (known < 64 && (key >> known) != prefix) return;
      const int b = static_cast<int>(key >> shift) & (kBuckets - 1);
      atomicAdd(&sh.hist_count[b], 1u);
      if (kWithMass) atomicAdd(&sh.hist_mass[b], mass);
    });
    __syncthreads();
    if (Warp() == 0) ChooseBucket(sh, count_above, mass_above, pred);
    __syncthreads();
    prefix = (prefix << kDigitBits) | static_cast<uint64_t>(sh.chosen_bucket);
    count_above = sh.chosen_count_above;
    mass_above = sh.chosen_mass_above;
    mass_at = sh.chosen_mass;
    left = sh.chosen_count;
    // The next pass rewrites the histogram and the choice only after a
    // barrier that every thread reaches after these reads.
  } while (shift > 0 && left > 1);
  return {{prefix, shift}, count_above, mass_above, mass_at};
}

struct Params {
  const float* logits;
  int64_t logits_stride;
  int vocab;
  const SamplingRowParams* rows;
  PenaltyEntry* entries;
  bool record;
  int32_t* tokens;
  float* logprobs;
  int32_t* top_ids;
  float* top_logprobs;
  int64_t top_stride;
  float* probs;
  int64_t probs_stride;
};

__device__ __forceinline__ unsigned long long Mass(float value, float max) {
  return static_cast<unsigned long long>(expf(value - max) * kMassScale);
}

// Writes the row's N most likely raw tokens and their log-probabilities.
__device__ void TopRaw(const Params& p, const Row& row, int n, float lse, int64_t r, Shared& sh) {
  const auto visit = [&](auto&& g) {
    for (int i = static_cast<int>(threadIdx.x); i < row.vocab; i += kThreads) {
      g(Key(row.logits[i], i), 0ull);
    }
  };
  const Selection s = Select<false>(sh, visit, [n](uint32_t count, unsigned long long) {
    return count < static_cast<uint32_t>(n);
  });
  if (threadIdx.x == 0) sh.top_found = 0;
  __syncthreads();
  visit([&](uint64_t key, unsigned long long) {
    if (!Above(key, s.threshold)) return;
    const unsigned slot = atomicAdd(&sh.top_found, 1u);
    if (slot < static_cast<unsigned>(kMaxLogprobs)) sh.top_keys[slot] = key;
  });
  __syncthreads();
  if (threadIdx.x == 0) {
    const int found = min(static_cast<int>(sh.top_found), n);
    for (int i = 1; i < found; ++i) {  // insertion sort, largest key first
      const unsigned long long key = sh.top_keys[i];
      int j = i;
      for (; j > 0 && sh.top_keys[j - 1] < key; --j) sh.top_keys[j] = sh.top_keys[j - 1];
      sh.top_keys[j] = key;
    }
    for (int i = 0; i < found; ++i) {
      const int token = KeyToken(sh.top_keys[i]);
      p.top_ids[r * p.top_stride + i] = token;
      p.top_logprobs[r * p.top_stride + i] = row.logits[token] - lse;
    }
  }
  __syncthreads();
}

// Grid: one block per row.
__global__ void __launch_bounds__(kThreads, 2) SampleKernel(const Params p) {
  __shared__ Shared sh;
  const int64_t r = blockIdx.x;
  const SamplingRowParams rp = p.rows[r];
  const bool greedy = rp.temperature == 0.0f;
  const float inv_t = greedy ? 1.0f : 1.0f / rp.temperature;

  Row row;
  row.logits = p.logits + r * p.logits_stride;
  row.vocab = p.vocab;
  row.repetition = rp.repetition_penalty;
  row.presence = rp.presence_penalty;
  row.frequency = rp.frequency_penalty;
  row.entries = p.entries == nullptr ? nullptr : p.entries + rp.penalty_offset;
  row.num_entries = p.entries == nullptr ? 0 : max(rp.penalty_size, 0);
  row.penalised =
      row.num_entries > 0 && (rp.repetition_penalty != 1.0f || rp.presence_penalty != 0.0f ||
                              rp.frequency_penalty != 0.0f);
  if (row.penalised) {
    const int words = (row.vocab + 31) / 32;
    for (int w = static_cast<int>(threadIdx.x); w < words; w += kThreads) sh.listed[w] = 0;
    __syncthreads();
    for (int e = static_cast<int>(threadIdx.x); e < row.num_entries; e += kThreads) {
      const int token = row.entries[e].token;
      if (token >= 0 && token < row.vocab) atomicOr(&sh.listed[token >> 5], 1u << (token & 31));
    }
    __syncthreads();
  }

  // Pass 1: the raw log-sum-exp; the penalised argmax (the greedy choice,
  // and the fallback when every candidate is at -inf); the candidates'
  // largest value and their number.
  float raw_max = -INFINITY;
  float raw_sum = 0.0f;
  float best = -INFINITY;
  int best_token = INT_MAX;
  float value_max = -INFINITY;
  uint32_t candidates = 0;
  ForEachToken(row, sh, [&](int token, float raw, float pen) {
    if (raw != -INFINITY) {
      if (raw > raw_max) {
        raw_sum = Rescaled(raw_sum, raw_max, raw) + 1.0f;
        raw_max = raw;
      } else {
        raw_sum += expf(raw - raw_max);
      }
    }
    if (Before(pen, token, best, best_token)) {
      best = pen;
      best_token = token;
    }
    if (!greedy && pen != -INFINITY) {
      value_max = fmaxf(value_max, __fmul_rn(pen, inv_t));
      ++candidates;
    }
  });
  BlockMaxSum(raw_max, raw_sum, sh);
  const float lse = raw_max + logf(raw_sum);
  BlockArgMax(best, best_token, sh);
  if (!greedy) {
    value_max = BlockMax(value_max, sh);
    candidates = BlockSumInt(candidates, sh.red_u);
  }

  const int n_top =
      p.top_ids == nullptr ? 0 : min(max(rp.num_logprobs, 0), min(kMaxLogprobs, row.vocab));
  if (n_top > 0) TopRaw(p, row, n_top, lse, r, sh);

  int chosen = best_token;
  unsigned long long kept_mass = 0;
  Threshold top_k = KeepAll();
  Threshold top_p = KeepAll();
  const bool sample = !greedy && candidates > 0;
  const float min_p = rp.min_p;
  if (sample) {
    const bool use_top_k = rp.top_k > 0 && static_cast<uint32_t>(rp.top_k) < candidates;
    const bool use_top_p = rp.top_p < 1.0f;
    // Candidates as keys, with their masses when top-p needs them.
    const auto candidate_keys = [&](auto&& g) {
      ForEachToken(row, sh, [&](int token, float, float pen) {
        if (pen == -INFINITY) return;
        const float value = __fmul_rn(pen, inv_t);
        g(Key(value, token), use_top_p ? Mass(value, value_max) : 0ull);
      });
    };
    // The mass top-p is a fraction of: that of the top-k tokens.
    unsigned long long total = 0;
    if (use_top_k) {
      const uint32_t k = static_cast<uint32_t>(rp.top_k);
      const auto pred = [k](uint32_t count, unsigned long long) { return count < k; };
      const Selection s = use_top_p ? Select<true>(sh, candidate_keys, pred)
                                    : Select<false>(sh, candidate_keys, pred);
      top_k = s.threshold;
      total = s.mass_above + s.mass_at;
    } else if (use_top_p) {
      unsigned long long part = 0;
      candidate_keys([&](uint64_t, unsigned long long mass) { part += mass; });
      total = BlockSumInt(part, sh.red_ull);
    }
    if (use_top_p) {
      // Among the top-k tokens that pass min-p, the last one whose
      // predecessors hold less than top_p of the mass.
      const double target = static_cast<double>(rp.top_p) * static_cast<double>(total);
      const auto visit = [&](auto&& g) {
        ForEachToken(row, sh, [&](int token, float, float pen) {
          if (pen == -INFINITY) return;
          const float value = __fmul_rn(pen, inv_t);
          const uint64_t key = Key(value, token);
          if (!Above(key, top_k)) return;
          const float w = expf(value - value_max);
          if (min_p > 0.0f && !(w >= min_p)) return;
          g(key, static_cast<unsigned long long>(w * kMassScale));
        });
      };
      top_p = Select<true>(sh, visit, [target](uint32_t, unsigned long long mass) {
                return static_cast<double>(mass) < target;
              }).threshold;
    }
    // The draw: the kept token with the largest value plus noise.
    float score = -INFINITY;
    int token_best = INT_MAX;
    unsigned long long mass_part = 0;
    ForEachToken(row, sh, [&](int token, float, float pen) {
      if (pen == -INFINITY) return;
      const float value = __fmul_rn(pen, inv_t);
      const uint64_t key = Key(value, token);
      if (!Above(key, top_k) || !Above(key, top_p)) return;
      const float w = expf(value - value_max);
      if (min_p > 0.0f && !(w >= min_p)) return;
      const float s = value + Noise(rp.seed, rp.step, token);
      if (Before(s, token, score, token_best)) {
        score = s;
        token_best = token;
      }
      mass_part += static_cast<unsigned long long>(w * kMassScale);
    });
    BlockArgMax(score, token_best, sh);
    chosen = token_best;
    if (p.probs != nullptr) kept_mass = BlockSumInt(mass_part, sh.red_ull);
  }

  if (p.probs != nullptr) {
    float* probs = p.probs + r * p.probs_stride;
    const double inv_kept = kept_mass > 0 ? kMassScaleD / static_cast<double>(kept_mass) : 0.0;
    ForEachToken(row, sh, [&](int token, float, float pen) {
      float prob = 0.0f;
      if (!sample) {
        prob = token == chosen ? 1.0f : 0.0f;
      } else if (pen != -INFINITY) {
        const float value = __fmul_rn(pen, inv_t);
        const uint64_t key = Key(value, token);
        const float w = expf(value - value_max);
        if (Above(key, top_k) && Above(key, top_p) && (min_p <= 0.0f || w >= min_p)) {
          prob = static_cast<float>(static_cast<double>(w) * inv_kept);
        }
      }
      probs[token] = prob;
    });
  }

  // Only NaNs leave nothing chosen; Sampler's ArgMax then gives 0.
  if (chosen < 0 || chosen >= row.vocab) chosen = 0;
  if (threadIdx.x == 0) {
    p.tokens[r] = chosen;
    p.logprobs[r] = row.logits[chosen] - lse;
  }

  // Record the choice in the row's list.
  if (p.record && p.entries != nullptr && rp.penalty_capacity > 0) {
    PenaltyEntry* entries = p.entries + rp.penalty_offset;
    const int size = max(rp.penalty_size, 0);
    if (threadIdx.x == 0) sh.recorded = 0;
    __syncthreads();  // also orders the reads of the entries above before the writes
    for (int e = static_cast<int>(threadIdx.x); e < size; e += kThreads) {
      if (entries[e].token == chosen) {
        ++entries[e].output_count;
        sh.recorded = 1;
      }
    }
    __syncthreads();
    if (threadIdx.x == 0 && sh.recorded == 0 && size < rp.penalty_capacity) {
      entries[size] = PenaltyEntry{chosen, 1};
    }
  }
}

}  // namespace

float SamplingNoise(uint64_t seed, uint64_t step, int32_t token) {
  return Noise(seed, step, token);
}

absl::Status SampleTokens(const SamplingArgs& a, cudaStream_t stream) {
  constexpr const char* kName = "SampleTokens";
  RETURN_IF_ERROR(Require(a.num_rows >= 0 && a.num_rows <= INT_MAX, kName, "0 <= num_rows < 2^31"));
  RETURN_IF_ERROR(Require(a.vocab > 0 && a.vocab <= kMaxSamplingVocab, kName,
                          "0 < vocab <= kMaxSamplingVocab"));
  RETURN_IF_ERROR(Require(a.logits_stride >= a.vocab, kName, "logits_stride >= vocab"));
  RETURN_IF_ERROR((Require((a.top_ids == nullptr) == (a.top_logprobs == nullptr), kName,
                           "top_ids and top_logprobs both set or both null")));
  RETURN_IF_ERROR(Require(a.top_ids == nullptr || a.top_stride >= kMaxLogprobs, kName,
                          "top_stride >= kMaxLogprobs"));
  RETURN_IF_ERROR(
      Require(a.probs == nullptr || a.probs_stride >= a.vocab, kName, "probs_stride >= vocab"));
  RETURN_IF_ERROR(Require(!a.record_tokens || a.penalty_entries != nullptr, kName,
                          "penalty_entries when recording tokens"));
  if (a.num_rows == 0) return absl::OkStatus();
  RETURN_IF_ERROR(Require(
      a.logits != nullptr && a.rows != nullptr && a.tokens != nullptr && a.logprobs != nullptr,
      kName, "logits, rows, tokens and logprobs"));

  Params p;
  p.logits = a.logits;
  p.logits_stride = a.logits_stride;
  p.vocab = static_cast<int>(a.vocab);
  p.rows = a.rows;
  p.entries = a.penalty_entries;
  p.record = a.record_tokens;
  p.tokens = a.tokens;
  p.logprobs = a.logprobs;
  p.top_ids = a.top_ids;
  p.top_logprobs = a.top_logprobs;
  p.top_stride = a.top_stride;
  p.probs = a.probs;
  p.probs_stride = a.probs_stride;
  SampleKernel<<<static_cast<unsigned>(a.num_rows), kThreads, 0, stream>>>(p);
  return LaunchStatus("SampleKernel");
}

}  // namespace morphserve::kernels::cuda
