#include "tests/engine/kv/dense_kv_reference.h"

#include <algorithm>
#include <cmath>
#include <limits>

namespace morphserve::engine::testing {
namespace {

std::vector<double> Softmax(const std::vector<double>& x) {
  double m = -std::numeric_limits<double>::infinity();
  for (double v : x) m = std::max(m, v);
  std::vector<double> p(x.size());
  double z = 0.0;
  for (size_t i = 0; i < x.size(); ++i) z += p[i] = std::exp(x[i] - m);
  for (double& v : p) v /= z;
  return p;
}

}  // namespace

DenseKvReference::DenseKvReference(const KvPolicyConfig& config, int64_t num_layers,
                                   int64_t num_heads, int64_t num_kv_heads, int64_t head_dim)
    : config_(config),
      num_heads_(num_heads),
      num_kv_heads_(num_kv_heads),
      head_dim_(head_dim),
      caches_(num_layers * num_kv_heads),
      queries_(num_layers) {}

double DenseKvReference::Logit(const float* q, const Entry& e) const {
  double dot = 0.0;
  for (int64_t d = 0; d < head_dim_; ++d) dot += q[d] * e.k[d];
  return dot / std::sqrt(static_cast<double>(head_dim_));
}

std::vector<int64_t> DenseKvReference::Positions(int64_t layer, int64_t kv_head) const {
  std::vector<int64_t> out;
  for (const Entry& e : caches_[layer * num_kv_heads_ + kv_head]) out.push_back(e.position);
  std::sort(out.begin(), out.end());
  return out;
}

void DenseKvReference::KeepBest(Cache& cache, const std::vector<double>& score,
                                int64_t recent_from, int64_t sinks, int64_t keep) {
  std::vector<size_t> candidates;
  for (size_t i = 0; i < cache.size(); ++i) {
    if (cache[i].position < recent_from && cache[i].position >= sinks) candidates.push_back(i);
  }
  std::sort(candidates.begin(), candidates.end(), [&](size_t a, size_t b) {
    if (score[a] != score[b]) return score[a] > score[b];
    return cache[a].position > cache[b].position;
  });
  std::vector<bool> drop(cache.size(), false);
  for (size_t i = static_cast<size_t>(std::max<int64_t>(keep, 0)); i < candidates.size(); ++i) {
    drop[candidates[i]] = true;
  }
  Cache kept;
  for (size_t i = 0; i < cache.size(); ++i) {
    if (!drop[i]) kept.push_back(std::move(cache[i]));
  }
  cache = std::move(kept);
}

// Spec 2.4 step 4 for MorphKV; H2O and streaming by their own scores.
void DenseKvReference::Evict(int64_t layer, int64_t kv_head, int64_t t) {
  Cache& cache = caches_[layer * num_kv_heads_ + kv_head];
  const int64_t c = config_.capacity, w = config_.window;
  if (static_cast<int64_t>(cache.size()) < c + 1) return;
  const int64_t recent_from = t - w;
  std::vector<double> score(cache.size(), 0.0);
  const int64_t group = num_heads_ / num_kv_heads_;
  const int64_t sinks = config_.kind == KvPolicyKind::kStreaming ? config_.sinks : 0;
  if (config_.kind == KvPolicyKind::kMorphKv) {
    std::vector<size_t> cand;
    for (size_t i = 0; i < cache.size(); ++i) {
      if (cache[i].position < recent_from) cand.push_back(i);
    }
    const bool sum_logits = config_.aggregation == MorphKvAggregation::kGroupLogitSum;
    const int64_t first_row = sum_logits ? t - w : t - w + 1;
    for (int64_t r = first_row; r < t; ++r) {
      // Per query head (or, summed, per group): softmax over the candidates.
      std::vector<double> row(cand.size(), 0.0);
      for (int64_t g = 0; g < group; ++g) {
        const float* q = &queries_[layer][(r * num_heads_ + kv_head * group + g) * head_dim_];
        std::vector<double> logits(cand.size());
        for (size_t j = 0; j < cand.size(); ++j) logits[j] = Logit(q, cache[cand[j]]);
        if (sum_logits) {
          for (size_t j = 0; j < cand.size(); ++j) row[j] += logits[j];
        } else {
          const std::vector<double> p = Softmax(logits);
          for (size_t j = 0; j < cand.size(); ++j) row[j] = std::max(row[j], p[j]);
        }
      }
      if (sum_logits) row = Softmax(row);
      for (size_t j = 0; j < cand.size(); ++j) {
        double& s = score[cand[j]];
        s = config_.fusion == KvFusion::kMax ? std::max(s, row[j]) : s + row[j];
      }
    }
  } else if (config_.kind == KvPolicyKind::kH2o) {
    for (size_t i = 0; i < cache.size(); ++i) score[i] = cache[i].h2o;
  } else {
    for (size_t i = 0; i < cache.size(); ++i) score[i] = static_cast<double>(cache[i].position);
  }
  KeepBest(cache, score, recent_from, sinks, c - w - sinks);
}

// SnapKV (spec 4.1), one selection over the prompt, per KV head with the
// group's probabilities summed.
void DenseKvReference::SnapKvSelect(int64_t layer, int64_t kv_head) {
  Cache& cache = caches_[layer * num_kv_heads_ + kv_head];
  const int64_t length = static_cast<int64_t>(cache.size());
  const int64_t window = kSnapKvObservationWindow;
  const int64_t prefix = length - window;
  const int64_t group = num_heads_ / num_kv_heads_;
  std::vector<double> sums(length, 0.0);
  for (int64_t p = prefix; p < length; ++p) {
    for (int64_t g = 0; g < group; ++g) {
      const float* q = &queries_[layer][(p * num_heads_ + kv_head * group + g) * head_dim_];
      std::vector<double> logits(p + 1);
      for (int64_t j = 0; j <= p; ++j) logits[j] = Logit(q, cache[j]);
      const std::vector<double> probs = Softmax(logits);
      for (int64_t j = 0; j <= p; ++j) sums[j] += probs[j];
    }
  }
  std::vector<double> pooled(length, 0.0);
  for (int64_t j = 0; j < prefix; ++j) {
    for (int64_t k = j - 2; k <= j + 2; ++k) {
      if (k >= 0 && k < prefix) pooled[j] += sums[k];
    }
    pooled[j] /= 5.0;
  }
  KeepBest(cache, pooled, prefix, 0, config_.capacity - window);
}

void DenseKvReference::Layer(int64_t layer, const float* q, const float* k, const float* v,
                             int64_t n, bool decode, float* out) {
  const int64_t group = num_heads_ / num_kv_heads_;
  std::vector<float>& history = queries_[layer];
  history.insert(history.end(), q, q + n * num_heads_ * head_dim_);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t t = num_tokens_ + i;
    for (int64_t kvh = 0; kvh < num_kv_heads_; ++kvh) {
      Cache& cache = caches_[layer * num_kv_heads_ + kvh];
      if (decode && config_.kind == KvPolicyKind::kSnapKv && !snap_done_ &&
          static_cast<int64_t>(cache.size()) > config_.capacity) {
        SnapKvSelect(layer, kvh);
      }
      Entry e{t, {}, {}, 0.0};
      const float* kt = k + (i * num_kv_heads_ + kvh) * head_dim_;
      const float* vt = v + (i * num_kv_heads_ + kvh) * head_dim_;
      e.k.assign(kt, kt + head_dim_);
      e.v.assign(vt, vt + head_dim_);
      cache.push_back(std::move(e));
      if (decode && config_.bounded()) Evict(layer, kvh, t);
      for (int64_t g = 0; g < group; ++g) {
        const int64_t head = kvh * group + g;
        const float* qh = q + (i * num_heads_ + head) * head_dim_;
        std::vector<double> logits(cache.size());
        for (size_t j = 0; j < cache.size(); ++j) logits[j] = Logit(qh, cache[j]);
        const std::vector<double> p = Softmax(logits);
        float* o = out + (i * num_heads_ + head) * head_dim_;
        for (int64_t d = 0; d < head_dim_; ++d) {
          double acc = 0.0;
          for (size_t j = 0; j < cache.size(); ++j) acc += p[j] * cache[j].v[d];
          o[d] = static_cast<float>(acc);
        }
        for (size_t j = 0; j < cache.size(); ++j) cache[j].h2o += p[j];
      }
    }
  }
  if (decode && layer == static_cast<int64_t>(queries_.size()) - 1) snap_done_ = true;
}

}  // namespace morphserve::engine::testing
