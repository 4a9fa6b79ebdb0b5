// GPU sampling against the CPU reference, engine::Sampler. Each row is a
// request: sampling parameters, a prompt and the tokens generated so far,
// recorded in the CPU sampler by forcing them and given to the GPU as a
// penalty list. Then, per row:
//   - greedy rows pick the CPU's token exactly (ties to the lower id);
//   - the chosen token's raw log-probability and the top-N raw tokens and
//     log-probabilities agree with the CPU's;
//   - the distribution the GPU drew from (its debug output) keeps exactly
//     the tokens the CPU keeps, with the same probabilities;
//   - a sampling row's token is the one the race picks over the CPU's
//     distribution with the same noise (SamplingNoise, computed here);
//   - every output is written (buffers start poisoned) and top-N entries
//     past N are not.
// Logits rows are padded with NaN past the vocabulary, and penalty lists
// are followed by spare entries that would change the result if read.
// Vocabularies of 128k and more are named "large" so that slow runs can
// leave them out (--gtest_filter=-*large*).
#include "kernels/cuda/sampling.h"

#include <gtest/gtest.h>

#include "tests/kernels/cuda/sampling_test_util.h"

namespace morphserve::kernels::cuda::sampling_test {
namespace {

struct VocabCase {
  int64_t vocab;
};
std::string VocabName(const ::testing::TestParamInfo<VocabCase>& info) {
  return absl::StrCat(info.param.vocab >= 100000 ? "large_" : "", "v", info.param.vocab);
}
void PrintTo(const VocabCase& c, std::ostream* os) { *os << "vocab " << c.vocab; }

class SamplingVocabTest : public SamplingTest, public ::testing::WithParamInterface<VocabCase> {};

TEST_P(SamplingVocabTest, GreedyRowsPickTheCpuTokenWithTiesToTheLowerId) {
  const int64_t vocab = GetParam().vocab;
  std::mt19937 rng(static_cast<uint32_t>(vocab));
  Batch b(vocab);
  for (int32_t logprobs : {0, 1, 5, 20}) {
    Request q;
    q.params = Greedy(logprobs);
    b.Add(q, RandomLogits(vocab, 2.0f, 0.0f, rng), rng);
    b.Add(q, RandomLogits(vocab, 1.0f, 0.5f, rng), rng);
  }
  CheckAll(b, true);
}

// The configurations the truncation test runs, one row each.
std::vector<SamplingParams> TruncationConfigs() {
  std::vector<SamplingParams> configs;
  auto add = [&](float t, int32_t k, float p, float min_p, int32_t logprobs) {
    SamplingParams s;
    s.temperature = t;
    s.top_k = k;
    s.top_p = p;
    s.min_p = min_p;
    s.logprobs = logprobs;
    configs.push_back(s);
  };
  add(1.0f, 0, 1.0f, 0.0f, 0);        // everything
  add(0.7f, 1, 1.0f, 0.0f, 3);        // top-k 1
  add(1.0f, 7, 1.0f, 0.0f, 0);        // top-k
  add(1.3f, 64, 1.0f, 0.0f, 20);      // top-k
  add(1.0f, 1 << 30, 1.0f, 0.0f, 0);  // top-k past the vocabulary
  add(1.0f, 0, 0.05f, 0.0f, 0);       // top-p keeping one
  add(0.8f, 0, 0.5f, 0.0f, 2);        // top-p
  add(1.0f, 0, 0.9f, 0.0f, 0);        // top-p
  add(2.0f, 0, 0.99f, 0.0f, 0);       // top-p, wide
  add(1.0f, 0, 1.0f, 0.05f, 0);       // min-p
  add(0.5f, 0, 1.0f, 0.3f, 1);        // min-p
  add(1.0f, 40, 0.9f, 0.0f, 0);       // top-k and top-p
  add(1.5f, 20, 0.95f, 0.1f, 5);      // all three
  add(1.0f, 0, 0.8f, 0.02f, 0);       // top-p and min-p
  add(0.9f, 10, 1.0f, 0.2f, 0);       // top-k and min-p
  add(3.0f, 300, 0.7f, 0.0f, 0);      // top-k and top-p, flat
  return configs;
}

TEST_P(SamplingVocabTest, TruncationKeepsWhatTheCpuKeeps) {
  const int64_t vocab = GetParam().vocab;
  std::mt19937 rng(static_cast<uint32_t>(vocab) + 1);
  Batch b(vocab);
  uint64_t seed = 100;
  for (const SamplingParams& p : TruncationConfigs()) {
    for (float grid : {0.0f, 0.25f}) {
      Request q;
      q.params = p;
      q.seed = seed++;
      q.step = seed * 7;
      b.Add(q, RandomLogits(vocab, 2.0f, grid, rng), rng);
    }
  }
  CheckAll(b, true);
}

TEST_P(SamplingVocabTest, PenaltiesMatchTheCpu) {
  const int64_t vocab = GetParam().vocab;
  std::mt19937 rng(static_cast<uint32_t>(vocab) + 2);
  Batch b(vocab);
  struct Penalty {
    float repetition, presence, frequency;
  };
  uint64_t seed = 1;
  for (const Penalty& pen :
       {Penalty{1.3f, 0.0f, 0.0f}, Penalty{0.8f, 0.0f, 0.0f}, Penalty{1.0f, 0.7f, 0.0f},
        Penalty{1.0f, 0.0f, -0.4f}, Penalty{1.2f, 1.5f, 0.6f}, Penalty{1.0f, 0.0f, 0.0f}}) {
    for (float temperature : {0.0f, 0.8f}) {
      Request q;
      q.params.temperature = temperature;
      q.params.top_k = temperature > 0 ? 50 : 0;
      q.params.top_p = temperature > 0 ? 0.9f : 1.0f;
      q.params.repetition_penalty = pen.repetition;
      q.params.presence_penalty = pen.presence;
      q.params.frequency_penalty = pen.frequency;
      q.params.logprobs = 4;
      q.seed = seed++;
      q.step = 3;
      // Penalised tokens among the most likely, where they change the choice.
      std::vector<float> logits = RandomLogits(vocab, 1.0f, 0.0f, rng);
      const int64_t top = std::min<int64_t>(20, vocab);
      std::vector<int32_t> by_value(vocab);
      for (int32_t i = 0; i < vocab; ++i) by_value[i] = i;
      std::partial_sort(by_value.begin(), by_value.begin() + top, by_value.end(),
                        [&](int32_t x, int32_t y) { return logits[x] > logits[y]; });
      q.prompt = RandomPrompt(40, vocab, vocab, rng);
      for (int i = 0; i < 12; ++i) q.prompt.push_back(by_value[(2 * i) % top]);
      for (int i = 0; i < 15; ++i) q.generated.push_back(by_value[(5 * i) % top]);
      b.Add(q, logits, rng, /*spare=*/4);
    }
  }
  CheckAll(b, true);
}

// Vocabularies: small enough to emulate, odd, and the real ones.
INSTANTIATE_TEST_SUITE_P(Vocabularies, SamplingVocabTest,
                         ::testing::Values(VocabCase{1}, VocabCase{37}, VocabCase{1000},
                                           VocabCase{4099}, VocabCase{32000}, VocabCase{49153},
                                           VocabCase{128256}, VocabCase{kMaxSamplingVocab}),
                         VocabName);

}  // namespace
}  // namespace morphserve::kernels::cuda::sampling_test
