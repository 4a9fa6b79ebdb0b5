// Every KV policy on the CUDA backend against the CPU's, end to end, and
// how one MorphKV slab's first scoring pass runs inside the decode
// attention. Skips without a GPU, like every `cuda` test.
#include <gtest/gtest.h>

#include <memory>
#include <vector>

#include "common/kv_policy.h"
#include "engine/backend/backend_registry.h"
#include "engine/backend/cuda_backend.h"
#include "tests/engine/backend/cuda_backend_test_util.h"

namespace morphserve::engine::cuda_backend_test {
namespace {

// Every dropping policy scored on the device, on prompts of 40 (selection
// right after the prompt, which prefills in chunks of 16) and 7 (the cache
// fills while decoding), then one eviction per step for the bounded ones.
TEST_F(CudaBackendTest, MorphKvOnTheDeviceMatchesTheCpu) {
  const testing::TinySpec spec = Shape(4, 2, 256, 300);
  const std::unique_ptr<Model> model = TinyModel(spec, "LlamaForCausalLM");
  ASSERT_NE(model, nullptr);
  for (MorphKvAggregation aggregation :
       {MorphKvAggregation::kGroupLogitSum, MorphKvAggregation::kGroupMaxProb}) {
    for (KvFusion fusion : {KvFusion::kSum, KvFusion::kMax}) {
      KvPolicyConfig policy = Policy(KvPolicyKind::kMorphKv, 6, 24);
      policy.fusion = fusion;
      policy.aggregation = aggregation;
      SCOPED_TRACE(::testing::Message()
                   << (aggregation == MorphKvAggregation::kGroupMaxProb ? "group-max-prob "
                                                                         : "group-logit-sum ")
                   << (fusion == KvFusion::kSum ? "sum" : "max"));
      // Group-max-prob ranks by per-head probabilities, whose order sits
      // closer to the bf16-against-f32 noise of the keys: its choices part
      // on a near-tie sooner (for some prompts within the first steps, with
      // the kept sets still equal), so it runs prompts that keep them
      // together for long enough to check the steady state.
      const bool per_head = aggregation == MorphKvAggregation::kGroupMaxProb;
      // Every steady eviction takes its first pass from the attention.
      CompareOn(*model, RandomPrompts({40, 7}, spec.vocab, per_head ? 14 : 8), 16, 30, 8, 0.03,
                policy, {}, [](const CudaBackend& cuda) {
                  EXPECT_GT(cuda.fused_evictions(), 0);
                  EXPECT_EQ(cuda.unfused_evictions(), 0);
                });
    }
  }
}

// H2O's running scores accumulate over the prompt's chunks (causal rows)
// and every decode, and restart in the slot a token overwrites.
TEST_F(CudaBackendTest, H2oOnTheDeviceMatchesTheCpu) {
  const testing::TinySpec spec = Shape(4, 2, 256, 300);
  const std::unique_ptr<Model> model = TinyModel(spec, "LlamaForCausalLM");
  ASSERT_NE(model, nullptr);
  CompareOn(*model, RandomPrompts({40, 7}, spec.vocab, 12), 16, 30, 8, 0.03,
            Policy(KvPolicyKind::kH2o, 6, 24));
}

// Streaming keeps its sinks and drops the oldest token after them.
TEST_F(CudaBackendTest, StreamingOnTheDeviceMatchesTheCpu) {
  const testing::TinySpec spec = Shape(4, 2, 256, 300);
  const std::unique_ptr<Model> model = TinyModel(spec, "LlamaForCausalLM");
  ASSERT_NE(model, nullptr);
  KvPolicyConfig policy = Policy(KvPolicyKind::kStreaming, 6, 24);
  policy.sinks = 3;
  CompareOn(*model, RandomPrompts({40, 7}, spec.vocab, 10), 16, 30, 8, 0.03, policy);
}

// SnapKV selects once at the end of the longer prompt (its last chunk is
// shorter than the observation window, so the ring spans two steps) and
// grows afterwards; the short prompt is never cut.
TEST_F(CudaBackendTest, SnapKvOnTheDeviceMatchesTheCpu) {
  const testing::TinySpec spec = Shape(6, 2, 256, 300);
  const std::unique_ptr<Model> model = TinyModel(spec, "LlamaForCausalLM");
  ASSERT_NE(model, nullptr);
  CompareOn(*model, RandomPrompts({70, 7}, spec.vocab, 11), 24, 12, 8, 0.03,
            Policy(KvPolicyKind::kSnapKv, 6, 44));
}

// A policy's sequences share one slab of device state, whose kernels run
// once per layer over all of them. Eight sequences fill its first capacity
// and run for a while; three more join later and grow it mid-run (every
// live ring, position list and victim moves), with prompts that cut at
// different steps, so first selections, steady evictions and growing
// caches mix in the same launches. The CPU path parts from the device on
// bf16 near-ties with some prompts at this small window; these stay
// together long enough to check every part.
TEST_F(CudaBackendTest, ManySequencesShareAPolicySlab) {
  const testing::TinySpec spec = Shape(4, 2, 256, 300);
  const std::unique_ptr<Model> model = TinyModel(spec, "LlamaForCausalLM");
  ASSERT_NE(model, nullptr);
  CompareOn(*model, RandomPrompts({3, 30, 9, 1, 17, 22, 5, 12, 26, 2, 14}, spec.vocab, 17), 8, 14,
            8, 0.03, Policy(KvPolicyKind::kMorphKv, 4, 12), {0, 0, 0, 0, 0, 0, 0, 0, 6, 6, 9});
}

// The decode attention runs the first scoring pass of one MorphKV slab per
// step, the one with the most steady evictions; a second slab's sequences
// (other settings) are scored on their own in the same step, beside full
// and H2O sequences. Every step equals, bit for bit, the same steps with
// every slab scored on its own: these contexts fit one partition of either
// pass, so both sum the same terms in the same order. (Against the CPU,
// whose f32 cache parts from the device's bf16 one on near-ties, the
// MorphKV tests above check the fused path.)
TEST_F(CudaBackendTest, MixedMorphKvSettingsFuseOneSlabPerStep) {
  const testing::TinySpec spec = Shape(4, 2, 256, 300);
  const std::unique_ptr<Model> model = TinyModel(spec, "LlamaForCausalLM");
  ASSERT_NE(model, nullptr);
  const KvPolicyConfig a = Policy(KvPolicyKind::kMorphKv, 4, 12);
  KvPolicyConfig b = Policy(KvPolicyKind::kMorphKv, 3, 16);
  b.fusion = KvFusion::kMax;
  b.aggregation = MorphKvAggregation::kGroupMaxProb;
  const Policies policies({a, b, a, KvPolicyConfig{}, b, a, Policy(KvPolicyKind::kH2o, 4, 12)});
  const std::vector<std::vector<int32_t>> prompts =
      RandomPrompts({3, 30, 9, 5, 17, 22, 12}, spec.vocab, 18);
  BackendOptions options;
  options.device = "cuda";
  options.block_size = 8;
  options.num_blocks = 64;
  absl::StatusOr<std::unique_ptr<ForwardBackend>> fused = CreateBackend(*model, options);
  absl::StatusOr<std::unique_ptr<ForwardBackend>> alone = CreateBackend(*model, options);
  ASSERT_TRUE(fused.ok()) << fused.status();
  ASSERT_TRUE(alone.ok()) << alone.status();
  auto* fused_cuda = dynamic_cast<CudaBackend*>(fused->get());
  auto* alone_cuda = dynamic_cast<CudaBackend*>(alone->get());
  ASSERT_NE(fused_cuda, nullptr);
  ASSERT_NE(alone_cuda, nullptr);
  alone_cuda->set_fused_scoring(false);
  const PositionsOf positions = [](const KvSequence&) { return std::vector<int32_t>(); };
  const std::vector<int64_t> join = {0, 0, 0, 0, 0, 3, 0};
  absl::Status fused_error, alone_error;
  const Generation want =
      Generate(**alone, *model, prompts, 8, 14, &alone_error, policies, positions, join);
  const Generation got =
      Generate(**fused, *model, prompts, 8, 14, &fused_error, policies, positions, join);
  ASSERT_TRUE(alone_error.ok()) << alone_error;
  ASSERT_TRUE(fused_error.ok()) << fused_error;
  EXPECT_EQ(want.tokens, got.tokens);
  EXPECT_EQ(want.logits, got.logits);
  EXPECT_EQ(want.victims, got.victims);
  EXPECT_GT(fused_cuda->fused_evictions(), 0);
  EXPECT_GT(fused_cuda->unfused_evictions(), 0);
  EXPECT_EQ(alone_cuda->fused_evictions(), 0);
  EXPECT_EQ(alone_cuda->unfused_evictions(),
            fused_cuda->fused_evictions() + fused_cuda->unfused_evictions());
}

}  // namespace
}  // namespace morphserve::engine::cuda_backend_test
