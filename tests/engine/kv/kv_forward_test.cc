// The forward pass with each KV policy against a dense forward pass (plain
// reference kernels + the dense policy reference) on a random GQA model:
// the same logits and the same kept tokens at every step of a long greedy
// generation.
#include <algorithm>
#include <cmath>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "common/kv_policy.h"
#include "common/thread_pool.h"
#include "engine/kv/kv_sequence.h"
#include "engine/kv/paged_kv_cache.h"
#include "engine/model/llama_forward.h"
#include "engine/model/model.h"
#include "engine/model/model_config.h"
#include "gtest/gtest.h"
#include "kernels/cpu/dequantize.h"
#include "kernels/cpu/elementwise.h"
#include "kernels/cpu/matmul.h"
#include "tests/engine/kv/dense_kv_reference.h"
#include "tests/engine/model/hf_test_util.h"

namespace morphserve::engine {
namespace {

// The Llama block written plainly over the dense KV reference.
class DenseForward {
 public:
  DenseForward(const Model& model, const KvPolicyConfig& policy)
      : model_(model),
        c_(model.config),
        kv_(policy, c_.num_layers, c_.num_heads, c_.num_kv_heads, c_.head_dim),
        inv_freq_(RopeInverseFrequencies(c_)) {}

  testing::DenseKvReference& kv() { return kv_; }

  // Logits of the last of `tokens`.
  std::vector<float> Step(const std::vector<int32_t>& tokens, bool decode) {
    const int64_t n = static_cast<int64_t>(tokens.size()), hidden = c_.hidden_size;
    const LlamaWeights& w = model_.weights;
    std::vector<float> x(n * hidden), xn(n * hidden), q(n * c_.q_dim()), k(n * c_.kv_dim()),
        v(n * c_.kv_dim()), attn(n * c_.q_dim()), gate(n * c_.intermediate_size),
        up(n * c_.intermediate_size);
    for (int64_t t = 0; t < n; ++t) {
      kernels::DequantizeRow(w.token_embedding.dtype, w.token_embedding.Row(tokens[t]),
                             &x[t * hidden], hidden);
    }
    for (int64_t layer = 0; layer < c_.num_layers; ++layer) {
      const LayerWeights& l = w.layers[layer];
      for (int64_t t = 0; t < n; ++t) {
        kernels::RmsNorm(&x[t * hidden], l.attn_norm, c_.rms_norm_eps, hidden, &xn[t * hidden]);
      }
      MatMul(l.wq, xn.data(), n, q.data());
      MatMul(l.wk, xn.data(), n, k.data());
      MatMul(l.wv, xn.data(), n, v.data());
      for (int64_t t = 0; t < n; ++t) {
        const int64_t pos = kv_.num_tokens() + t;
        kernels::ApplyRope(&q[t * c_.q_dim()], c_.num_heads, c_.head_dim, c_.rope_dim, pos,
                           inv_freq_.data(), c_.rope_style);
        kernels::ApplyRope(&k[t * c_.kv_dim()], c_.num_kv_heads, c_.head_dim, c_.rope_dim, pos,
                           inv_freq_.data(), c_.rope_style);
      }
      kv_.Layer(layer, q.data(), k.data(), v.data(), n, decode, attn.data());
      MatMul(l.wo, attn.data(), n, xn.data());
      for (int64_t t = 0; t < n; ++t) {
        kernels::AddRmsNorm(&x[t * hidden], &xn[t * hidden], l.ffn_norm, c_.rms_norm_eps, hidden,
                            &xn[t * hidden]);
      }
      MatMul(l.w_gate, xn.data(), n, gate.data());
      MatMul(l.w_up, xn.data(), n, up.data());
      kernels::SiluMul(gate.data(), up.data(), n * c_.intermediate_size, gate.data());
      MatMul(l.w_down, gate.data(), n, xn.data());
      for (int64_t t = 0; t < n; ++t) kernels::Add(&x[t * hidden], &xn[t * hidden], hidden);
    }
    kv_.EndStep(n);
    std::vector<float> last(hidden), logits(c_.vocab_size);
    kernels::RmsNorm(&x[(n - 1) * hidden], w.output_norm, c_.rms_norm_eps, hidden, last.data());
    MatMul(w.output, last.data(), 1, logits.data());
    return logits;
  }

 private:
  void MatMul(const Matrix& m, const float* x, int64_t n, float* y) {
    kernels::MatMulReference({m.dtype, m.data, m.row_bytes, m.rows, m.cols, x, m.cols, n, y,
                              m.rows});
  }

  const Model& model_;
  const ModelConfig& c_;
  testing::DenseKvReference kv_;
  std::vector<float> inv_freq_;
};

struct Case {
  std::string name;
  KvPolicyKind kind;
  int64_t window, capacity;
  KvFusion fusion;
  MorphKvAggregation aggregation;
};

void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }

class KvForwardTest : public ::testing::TestWithParam<Case> {
 protected:
  static void SetUpTestSuite() {
    dir_ = new morphserve::testing::TempDir();
    morphserve::testing::TinySpec spec;
    spec.layers = 2;
    spec.heads = 6;
    spec.kv_heads = 2;
    spec.hidden = 96;
    spec.context = 1024;
    const auto tensors = morphserve::testing::RandomTinyWeights(spec, 11);
    morphserve::testing::WriteHfCheckpoint(
        dir_->path(), morphserve::testing::TinyConfigJson(spec, "LlamaForCausalLM"), tensors,
        "F32");
    auto model = LoadModel({.path = dir_->path()});
    ASSERT_TRUE(model.ok()) << model.status();
    model_ = std::move(*model).release();
  }
  static void TearDownTestSuite() {
    delete model_;
    delete dir_;
  }
  static morphserve::testing::TempDir* dir_;
  static Model* model_;
};

morphserve::testing::TempDir* KvForwardTest::dir_ = nullptr;
Model* KvForwardTest::model_ = nullptr;

TEST_P(KvForwardTest, MatchesDenseForwardOverALongGeneration) {
  const Case& tc = GetParam();
  KvPolicyConfig policy;
  policy.kind = tc.kind;
  policy.window = tc.window;
  policy.capacity = tc.capacity;
  policy.fusion = tc.fusion;
  policy.aggregation = tc.aggregation;
  const ModelConfig& c = model_->config;
  ASSERT_TRUE(policy.Validate(c.context_length).ok());
  const int64_t prompt_len = 90, chunk = 32, steps = 250;
  // `steps` tokens are fed back, so the request generates steps + 1.
  const int64_t max_slots = policy.MaxSlots(prompt_len, steps + 1);
  const int64_t block_size = 16;
  const int64_t blocks = (max_slots + block_size - 1) / block_size;
  PagedKvCache cache({c.num_layers, c.num_kv_heads, c.head_dim, block_size, blocks});
  std::vector<int32_t> table(blocks);
  std::iota(table.begin(), table.end(), 0);
  std::shuffle(table.begin(), table.end(), std::mt19937(3));
  KvSequence seq(policy, cache.shape(), c.num_heads, max_slots);
  ThreadPool pool(2);
  LlamaForward forward(*model_, &pool, {.reference_kernels = true});
  DenseForward dense(*model_, policy);

  std::mt19937 rng(5);
  std::vector<int32_t> prompt(prompt_len);
  for (int32_t& t : prompt) t = static_cast<int32_t>(rng() % c.vocab_size);
  std::vector<float> logits, want;
  for (int64_t begin = 0; begin < prompt_len; begin += chunk) {
    const int64_t n = std::min(chunk, prompt_len - begin);
    const std::vector<int32_t> part(prompt.begin() + begin, prompt.begin() + begin + n);
    SequenceInput in{0, n, begin, table, &seq, begin + n < prompt_len};
    ASSERT_TRUE(forward.Forward({part, {&in, 1}, false}, cache, &logits).ok());
    want = dense.Step(part, /*decode=*/false);
  }
  for (int64_t step = 0; step < steps; ++step) {
    float scale = 0.0f;
    for (float x : want) scale = std::max(scale, std::abs(x));
    for (int64_t i = 0; i < c.vocab_size; ++i) {
      ASSERT_NEAR(logits[i], want[i], 1e-4f * scale) << "step " << step << " logit " << i;
    }
    // Greedy from the paged run, fed to both (teacher forcing).
    const int32_t next = static_cast<int32_t>(
        std::max_element(logits.begin(), logits.begin() + c.vocab_size) - logits.begin());
    SequenceInput in{0, 1, seq.num_tokens(), table, &seq, false};
    ASSERT_TRUE(forward.Forward({{&next, 1}, {&in, 1}, false}, cache, &logits).ok());
    want = dense.Step({next}, /*decode=*/true);
    for (int64_t layer = 0; layer < c.num_layers; ++layer) {
      for (int64_t h = 0; h < c.num_kv_heads; ++h) {
        std::vector<int64_t> kept;
        for (int64_t s = 0; s < seq.num_slots(); ++s) kept.push_back(seq.SlotPosition(layer, h, s));
        std::sort(kept.begin(), kept.end());
        ASSERT_EQ(kept, dense.kv().Positions(layer, h))
            << "step " << step << " layer " << layer << " kv head " << h;
      }
    }
  }
  const KvUsage usage = seq.Usage();
  EXPECT_EQ(usage.tokens_full_equivalent, prompt_len + steps);
  if (policy.bounded()) {
    EXPECT_EQ(usage.tokens_resident, policy.capacity + 1);
  }
}

INSTANTIATE_TEST_SUITE_P(
    Policies, KvForwardTest,
    ::testing::Values(
        Case{"full", KvPolicyKind::kFull, 8, 64, KvFusion::kSum,
             MorphKvAggregation::kGroupLogitSum},
        Case{"morphkv_sum", KvPolicyKind::kMorphKv, 8, 64, KvFusion::kSum,
             MorphKvAggregation::kGroupLogitSum},
        Case{"morphkv_max_variant_a", KvPolicyKind::kMorphKv, 6, 48, KvFusion::kMax,
             MorphKvAggregation::kGroupMaxProb},
        Case{"h2o", KvPolicyKind::kH2o, 8, 64, KvFusion::kSum,
             MorphKvAggregation::kGroupLogitSum},
        Case{"snapkv", KvPolicyKind::kSnapKv, 8, 64, KvFusion::kSum,
             MorphKvAggregation::kGroupLogitSum},
        Case{"streaming", KvPolicyKind::kStreaming, 8, 64, KvFusion::kSum,
             MorphKvAggregation::kGroupLogitSum}),
    [](const ::testing::TestParamInfo<Case>& param) { return param.param.name; });

}  // namespace
}  // namespace morphserve::engine
