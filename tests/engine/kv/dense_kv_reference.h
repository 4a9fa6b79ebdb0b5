// A dense, non-paged reference of every KV policy, written the way the
// MorphKV spec states the algorithms (section 2.4: append the token, evict
// down to the budget, then attend), with doubles and plain loops. The paged
// implementation decides evictions one step earlier and recycles slots; the
// tests check that both keep the same tokens and attend the same way.
#ifndef MORPHSERVE_TESTS_ENGINE_KV_DENSE_KV_REFERENCE_H_
#define MORPHSERVE_TESTS_ENGINE_KV_DENSE_KV_REFERENCE_H_

#include <cstdint>
#include <vector>

#include "common/kv_policy.h"

namespace morphserve::engine::testing {

class DenseKvReference {
 public:
  DenseKvReference(const KvPolicyConfig& config, int64_t num_layers, int64_t num_heads,
                   int64_t num_kv_heads, int64_t head_dim);

  // One layer of a step of `n` tokens at positions num_tokens() ... :
  // q [n][num_heads][head_dim], k and v [n][num_kv_heads][head_dim]; writes
  // the attention output [n][num_heads][head_dim]. `decode`: the prompt is
  // complete, so the policy applies before each token attends (n must be 1).
  void Layer(int64_t layer, const float* q, const float* k, const float* v, int64_t n,
             bool decode, float* out);
  // After every layer of the step.
  void EndStep(int64_t n) { num_tokens_ += n; }

  int64_t num_tokens() const { return num_tokens_; }
  // Positions held by (layer, KV head), ascending.
  std::vector<int64_t> Positions(int64_t layer, int64_t kv_head) const;

 private:
  struct Entry {
    int64_t position;
    std::vector<double> k, v;
    double h2o = 0.0;
  };
  using Cache = std::vector<Entry>;

  double Logit(const float* q, const Entry& e) const;
  // Keeps the recent tokens (position >= recent_from), the sinks and the
  // `keep` best-scoring candidates; ties keep the newer token.
  static void KeepBest(Cache& cache, const std::vector<double>& score, int64_t recent_from,
                       int64_t sinks, int64_t keep);
  void Evict(int64_t layer, int64_t kv_head, int64_t t);
  void SnapKvSelect(int64_t layer, int64_t kv_head);

  KvPolicyConfig config_;
  int64_t num_heads_, num_kv_heads_, head_dim_;
  int64_t num_tokens_ = 0;
  bool snap_done_ = false;
  std::vector<Cache> caches_;                   // [layer * num_kv_heads + kv_head]
  std::vector<std::vector<float>> queries_;     // [layer]: every query so far
};

}  // namespace morphserve::engine::testing

#endif  // MORPHSERVE_TESTS_ENGINE_KV_DENSE_KV_REFERENCE_H_
