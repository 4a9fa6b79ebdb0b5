// What the CUDA backend's end-to-end tests share (cuda_backend_test.cc,
// cuda_policy_test.cc): generating greedily on a backend (optionally taught
// by another run), comparing a CUDA run with the CPU's, small random models
// and prompts, and the fixture that builds them.
#ifndef MORPHSERVE_TESTS_ENGINE_BACKEND_CUDA_BACKEND_TEST_UTIL_H_
#define MORPHSERVE_TESTS_ENGINE_BACKEND_CUDA_BACKEND_TEST_UTIL_H_

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <functional>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include "common/kv_policy.h"
#include "engine/backend/backend_registry.h"
#include "engine/backend/cpu_backend.h"
#include "engine/backend/cuda_backend.h"
#include "engine/backend/forward_backend.h"
#include "engine/kv/kv_sequence.h"
#include "engine/model/model.h"
#include "engine/sampler/sampler.h"
#include "tests/engine/model/hf_test_util.h"
#include "tests/kernels/cuda/cuda_test_util.h"

namespace morphserve::engine::cuda_backend_test {

// Greedy tokens and the logits behind each, per sequence.
struct Generation {
  std::vector<std::vector<int32_t>> tokens;
  std::vector<std::vector<std::vector<float>>> logits;
  // Per sequence, the slot each (layer, KV head) overwrites next, after
  // every step that chose one.
  std::vector<std::vector<int64_t>> victims;
  // Per sequence and victim: how many tokens the sequence had generated
  // when it was chosen (its cache differs from that token's step on when
  // the choice differs).
  std::vector<std::vector<size_t>> victim_steps;
  // Per sequence at the end, once its policy has compacted it: the position
  // of the token in each slot the policy tracks, [layer][kv_head][slot].
  std::vector<std::vector<int32_t>> positions;
};

// Where a backend keeps the positions of a compacted sequence's slots.
using PositionsOf = std::function<std::vector<int32_t>(const KvSequence&)>;

// The CPU's: KvSequence tracks them itself.
inline std::vector<int32_t> HostPositions(const KvSequence& kv, const ModelConfig& c) {
  if (!kv.compacted()) return {};
  const KvPolicyConfig& p = kv.config();
  const int64_t kept = p.kind == KvPolicyKind::kSnapKv ? p.capacity : p.capacity + 1;
  const int64_t slots = std::min(kv.num_slots(), kept);
  std::vector<int32_t> out;
  for (int64_t layer = 0; layer < c.num_layers; ++layer) {
    for (int64_t h = 0; h < c.num_kv_heads; ++h) {
      for (int64_t j = 0; j < slots; ++j) {
        out.push_back(static_cast<int32_t>(kv.SlotPosition(layer, h, j)));
      }
    }
  }
  return out;
}

// One KV policy for every sequence, or one per sequence.
class Policies {
 public:
  Policies(const KvPolicyConfig& all = {}) : each_{all} {}  // NOLINT: implicit on purpose
  explicit Policies(std::vector<KvPolicyConfig> each) : each_(std::move(each)) {}
  const KvPolicyConfig& For(size_t s) const { return each_.size() == 1 ? each_[0] : each_[s]; }

 private:
  std::vector<KvPolicyConfig> each_;
};

// Runs `prompts` together on `backend`, sequence s joining at step
// join[s] (0 for all when `join` is empty): its prompt in chunks of `chunk`
// tokens, then decodes until it has `steps` tokens, beside whatever the
// others are doing. Each sequence's blocks come from one shuffled pool.
// With a `teacher` (a run of the same prompts, steps and joins), each step
// decodes the teacher's token instead of its own, and after recording its
// own victims takes the teacher's: both runs then hold the same tokens in
// the same slots at every step.
inline Generation Generate(ForwardBackend& backend, const Model& model,
                    const std::vector<std::vector<int32_t>>& prompts, int64_t chunk,
                    int64_t steps, absl::Status* error, const Policies& policies,
                    const PositionsOf& positions_of, const std::vector<int64_t>& join = {},
                    const Generation* teacher = nullptr) {
  const KvCacheShape& shape = backend.cache_shape();
  const int64_t n = static_cast<int64_t>(prompts.size());
  int64_t longest = 0;
  for (const auto& p : prompts) longest = std::max<int64_t>(longest, p.size());
  const int64_t per_seq = (longest + steps + shape.block_size - 1) / shape.block_size;
  std::vector<int32_t> pool(static_cast<size_t>(shape.num_blocks));
  std::iota(pool.begin(), pool.end(), 0);
  std::mt19937 rng(3);
  std::shuffle(pool.begin(), pool.end(), rng);
  std::vector<std::vector<int32_t>> tables(n);
  std::vector<std::unique_ptr<KvSequence>> kv;
  for (int64_t s = 0; s < n; ++s) {
    tables[s].assign(pool.begin() + s * per_seq, pool.begin() + (s + 1) * per_seq);
    kv.push_back(std::make_unique<KvSequence>(policies.For(s), shape, model.config.num_heads,
                                              per_seq * shape.block_size));
  }
  Generation out;
  out.tokens.resize(n);
  out.logits.resize(n);
  out.victims.resize(n);
  out.victim_steps.resize(n);
  std::vector<float> logits;
  std::vector<int32_t> batch_tokens;
  std::vector<SequenceInput> inputs;
  std::vector<int64_t> members;
  const int64_t vocab = model.config.vocab_size;
  std::vector<int64_t> prefilled(n, 0);  // prompt tokens run so far
  for (int64_t t = 0; error->ok(); ++t) {
    batch_tokens.clear();
    inputs.clear();
    members.clear();
    for (int64_t s = 0; s < n; ++s) {
      const int64_t len = static_cast<int64_t>(prompts[s].size());
      if ((!join.empty() && t < join[s]) || static_cast<int64_t>(out.tokens[s].size()) >= steps) {
        continue;
      }
      std::vector<int32_t> next;
      bool pending = false;
      if (prefilled[s] < len) {
        const int64_t count = std::min(chunk, len - prefilled[s]);
        next.assign(prompts[s].begin() + prefilled[s], prompts[s].begin() + prefilled[s] + count);
        prefilled[s] += count;
        pending = prefilled[s] < len;
      } else {
        next = {teacher != nullptr ? teacher->tokens[s][out.tokens[s].size() - 1]
                                   : out.tokens[s].back()};
      }
      inputs.push_back({static_cast<int64_t>(batch_tokens.size()),
                        static_cast<int64_t>(next.size()), kv[s]->num_tokens(), tables[s],
                        kv[s].get(), pending});
      batch_tokens.insert(batch_tokens.end(), next.begin(), next.end());
      members.push_back(s);
    }
    const bool waiting = !join.empty() && std::any_of(join.begin(), join.end(),
                                                      [&](int64_t j) { return j > t; });
    if (members.empty() && !waiting) break;
    if (members.empty()) continue;
    *error = backend.Forward({batch_tokens, inputs, /*all_logits=*/false}, &logits);
    if (!error->ok()) break;
    for (size_t i = 0; i < members.size(); ++i) {
      KvSequence& seq = *kv[members[i]];
      std::vector<int64_t>& victims = out.victims[members[i]];
      const size_t before = victims.size();
      for (int64_t layer = 0; layer < shape.num_layers; ++layer) {
        for (int64_t h = 0; h < shape.num_kv_heads; ++h) {
          if (seq.PendingVictim(layer, h) >= 0) {
            victims.push_back(seq.PendingVictim(layer, h));
            out.victim_steps[members[i]].push_back(out.tokens[members[i]].size());
          }
        }
      }
      if (teacher != nullptr && victims.size() > before) {
        const std::vector<int64_t>& taught = teacher->victims[members[i]];
        const size_t count = static_cast<size_t>(shape.num_layers * shape.num_kv_heads);
        if (victims.size() - before != count || taught.size() < before + count) {
          *error = absl::InternalError("the teacher chose no victims at this step");
          break;
        }
        seq.SetVictims(std::vector<int32_t>(taught.begin() + before,
                                            taught.begin() + before + count));
      }
      if (inputs[i].prompt_pending) continue;
      const std::vector<float> row(logits.begin() + i * vocab, logits.begin() + (i + 1) * vocab);
      out.tokens[members[i]].push_back(ArgMax(row));
      out.logits[members[i]].push_back(row);
    }
  }
  for (int64_t s = 0; s < n && error->ok(); ++s) out.positions.push_back(positions_of(*kv[s]));
  return out;
}

inline double MaxAbs(const std::vector<float>& v) {
  double m = 0;
  for (float x : v) m = std::max(m, std::fabs(static_cast<double>(x)));
  return m;
}

inline double MaxAbsDiff(const std::vector<float>& a, const std::vector<float>& b) {
  double m = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    m = std::max(m, std::fabs(static_cast<double>(b[i]) - a[i]));
  }
  return m;
}

// Compares the CUDA generation with the CPU's: logits within `rel_tol` of
// the CPU's largest logit at every step until the tokens part, which only a
// near-tie in the CPU's logits may explain, or until the KV policy's
// choices part (after which the caches hold different tokens).
inline void ExpectSameGreedy(const Generation& cpu, const Generation& gpu, double rel_tol) {
  ASSERT_EQ(cpu.tokens.size(), gpu.tokens.size());
  for (size_t s = 0; s < cpu.tokens.size(); ++s) {
    ASSERT_EQ(cpu.tokens[s].size(), gpu.tokens[s].size());
    size_t same_cache = cpu.tokens[s].size();
    for (size_t v = 0; v < cpu.victims[s].size() && v < gpu.victims[s].size(); ++v) {
      if (cpu.victims[s][v] != gpu.victims[s][v]) {
        same_cache = std::min(same_cache, cpu.victim_steps[s][v] + 1);
        break;
      }
    }
    for (size_t i = 0; i < same_cache; ++i) {
      const std::vector<float>& want = cpu.logits[s][i];
      const std::vector<float>& got = gpu.logits[s][i];
      const double scale = MaxAbs(want);
      EXPECT_LE(MaxAbsDiff(want, got), rel_tol * scale) << "sequence " << s << " step " << i;
      if (cpu.tokens[s][i] != gpu.tokens[s][i]) {
        const double gap = want[cpu.tokens[s][i]] - want[gpu.tokens[s][i]];
        EXPECT_LE(gap, rel_tol * scale)
            << "sequence " << s << " step " << i << ": CUDA chose " << gpu.tokens[s][i]
            << ", CPU " << cpu.tokens[s][i] << ", not a near-tie";
        break;  // the sequences differ from here on
      }
    }
  }
}

// The CPU run taught by the device's (Generate's `teacher`), so that both
// held the same tokens at every step: every step's logits agree within
// `rel_tol` of the CPU's largest logit, the device's token is the CPU's
// choice but for a near-tie, and at least `agreement` of the CPU's own
// victims, chosen from the same cache as the device's, are the device's
// (bf16 keys on the device against f32 on the CPU part near-ties).
inline void ExpectSameTaught(const Generation& cpu, const Generation& gpu, double rel_tol,
                      double agreement) {
  ASSERT_EQ(cpu.tokens.size(), gpu.tokens.size());
  size_t same = 0;
  size_t total = 0;
  for (size_t s = 0; s < cpu.tokens.size(); ++s) {
    ASSERT_EQ(cpu.logits[s].size(), gpu.logits[s].size());
    for (size_t i = 0; i < cpu.logits[s].size(); ++i) {
      const std::vector<float>& want = cpu.logits[s][i];
      const std::vector<float>& got = gpu.logits[s][i];
      const double scale = MaxAbs(want);
      EXPECT_LE(MaxAbsDiff(want, got), rel_tol * scale) << "sequence " << s << " step " << i;
      const double gap = want[cpu.tokens[s][i]] - want[gpu.tokens[s][i]];
      EXPECT_LE(gap, rel_tol * scale) << "sequence " << s << " step " << i << ": CUDA chose "
                                      << gpu.tokens[s][i] << ", CPU " << cpu.tokens[s][i];
    }
    ASSERT_EQ(cpu.victims[s].size(), gpu.victims[s].size()) << "sequence " << s;
    for (size_t v = 0; v < cpu.victims[s].size(); ++v) same += cpu.victims[s][v] == gpu.victims[s][v];
    total += cpu.victims[s].size();
  }
  EXPECT_GE(static_cast<double>(same), agreement * static_cast<double>(total))
      << same << " of " << total << " victims agree";
}

inline std::vector<std::vector<int32_t>> RandomPrompts(const std::vector<int64_t>& lengths,
                                                int64_t vocab, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<std::vector<int32_t>> prompts;
  for (int64_t len : lengths) {
    std::vector<int32_t> p(static_cast<size_t>(len));
    for (int32_t& t : p) t = static_cast<int32_t>(rng() % vocab);
    prompts.push_back(std::move(p));
  }
  return prompts;
}

// A small Llama-family shape the CUDA kernels take (head_dim 64).
inline testing::TinySpec Shape(int64_t heads, int64_t kv_heads, int64_t ffn, int64_t vocab) {
  testing::TinySpec spec;
  spec.heads = heads;
  spec.kv_heads = kv_heads;
  spec.head_dim = 64;
  spec.hidden = heads * 64;
  spec.ffn = ffn;
  spec.vocab = vocab;
  spec.context = 256;
  return spec;
}

class CudaBackendTest : public testing::CudaTest {
 protected:
  // A model of `spec`'s shape with random bf16 weights scaled so that
  // activations stay of order one and attention is peaked (as in a trained
  // model, so that KV policies' scores are well apart); both backends read
  // the same bf16 values.
  std::unique_ptr<Model> TinyModel(const testing::TinySpec& spec, std::string_view arch) {
    const std::string dir = tmp_.Subdir(arch);
    testing::WriteHfCheckpoint(dir, testing::TinyConfigJson(spec, arch),
                               testing::RandomTinyWeights(spec, 5), "BF16");
    absl::StatusOr<std::unique_ptr<Model>> model = LoadModel({.path = dir});
    EXPECT_TRUE(model.ok()) << model.status();
    return model.ok() ? std::move(model).value() : nullptr;
  }

  void CompareOn(const Model& model, const std::vector<std::vector<int32_t>>& prompts,
                 int64_t chunk, int64_t steps, int64_t block_size, double rel_tol,
                 const Policies& policy = {}, const std::vector<int64_t>& join = {},
                 const std::function<void(const CudaBackend&)>& check = {}) {
    const int64_t blocks = 8 + static_cast<int64_t>(prompts.size()) *
                                   ((model.config.context_length + block_size - 1) / block_size);
    CpuBackend cpu(model, 2, blocks, block_size);
    BackendOptions options;
    options.device = "cuda";
    options.block_size = block_size;
    options.num_blocks = blocks;
    absl::StatusOr<std::unique_ptr<ForwardBackend>> gpu = CreateBackend(model, options);
    ASSERT_TRUE(gpu.ok()) << gpu.status();
    EXPECT_EQ((*gpu)->device(), "cuda");
    EXPECT_EQ((*gpu)->cache_shape().num_blocks, blocks);
    EXPECT_EQ((*gpu)->cache_shape().element_bytes, 2);
    absl::Status cpu_error, gpu_error;
    auto* cuda = dynamic_cast<CudaBackend*>(gpu->get());
    ASSERT_NE(cuda, nullptr);
    const PositionsOf device_positions = [&](const KvSequence& kv) {
      absl::StatusOr<std::vector<int32_t>> held = cuda->DevicePositions(kv);
      EXPECT_TRUE(held.ok()) << held.status();
      return held.ok() ? *held : std::vector<int32_t>();
    };
    const Generation want =
        Generate(cpu, model, prompts, chunk, steps, &cpu_error, policy,
                 [&](const KvSequence& kv) { return HostPositions(kv, model.config); }, join);
    const Generation got =
        Generate(**gpu, model, prompts, chunk, steps, &gpu_error, policy, device_positions, join);
    ASSERT_TRUE(cpu_error.ok()) << cpu_error;
    ASSERT_TRUE(gpu_error.ok()) << gpu_error;
    if (check) check(*cuda);
    ExpectSameGreedy(want, got, rel_tol);
    const int64_t heads = model.config.num_layers * model.config.num_kv_heads;
    for (size_t s = 0; s < prompts.size(); ++s) {
      SCOPED_TRACE(::testing::Message() << "sequence " << s);
      // The same tokens go: the victims agree, up to a near-tie that bf16
      // parts differently (after which the caches differ, so the comparison
      // stops there). A bug in the selection shows from its first use.
      ASSERT_EQ(want.victims[s].size(), got.victims[s].size());
      size_t agree = 0;
      while (agree < want.victims[s].size() && want.victims[s][agree] == got.victims[s][agree]) {
        ++agree;
      }
      EXPECT_GE(4 * agree, want.victims[s].size())
          << "the victims part at choice " << agree << " of " << want.victims[s].size();
      // Both compacted at the same step, and where every choice agreed they
      // hold the same tokens in the same slots. SnapKV's single selection
      // may part on a near-tie in a few (layer, KV head) lists, no more.
      ASSERT_EQ(want.positions[s].size(), got.positions[s].size());
      if (want.positions[s].empty()) continue;
      if (!want.victims[s].empty()) {
        if (agree == want.victims[s].size()) {
          EXPECT_EQ(want.positions[s], got.positions[s]);
        }
        continue;
      }
      const size_t per_head = want.positions[s].size() / static_cast<size_t>(heads);
      int64_t same = 0;
      for (int64_t h = 0; h < heads; ++h) {
        same += std::equal(want.positions[s].begin() + h * per_head,
                           want.positions[s].begin() + (h + 1) * per_head,
                           got.positions[s].begin() + h * per_head);
      }
      EXPECT_GE(4 * same, 3 * heads) << "kept tokens differ in " << heads - same << " of "
                                     << heads << " (layer, KV head) lists";
    }
  }

  testing::TempDir tmp_;
};

// A KV policy's settings.
inline KvPolicyConfig Policy(KvPolicyKind kind, int64_t window, int64_t capacity) {
  KvPolicyConfig policy;
  policy.kind = kind;
  policy.window = window;
  policy.capacity = capacity;
  return policy;
}

}  // namespace morphserve::engine::cuda_backend_test

#endif  // MORPHSERVE_TESTS_ENGINE_BACKEND_CUDA_BACKEND_TEST_UTIL_H_
