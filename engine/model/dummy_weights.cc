// --load-format dummy: a model of a config's exact shape with deterministic
// pseudo-random weights, for benchmarking and tests without a checkpoint.
#include <cstring>
#include <filesystem>
#include <memory>

#include "common/fp16.h"
#include "common/status.h"
#include "common/strings.h"
#include "common/thread_pool.h"
#include "engine/model/hf_internal.h"
#include "engine/model/hf_loader.h"

namespace morphserve::engine {
namespace {

namespace fs = std::filesystem;

// Uniform on [-a, a] has standard deviation a / sqrt(3): this gives 0.02,
// the usual initializer scale, which keeps activations in a sane range.
constexpr float kHalfWidth = 0.02f * 1.7320508f;
constexpr uint64_t kGamma = 0x9e3779b97f4a7c15ull;

uint64_t Mix64(uint64_t x) {
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

uint64_t Fnv1a(std::string_view s) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (char ch : s) h = (h ^ static_cast<uint8_t>(ch)) * 0x100000001b3ull;
  return h;
}

// Element i of a tensor gets 16 bits of splitmix64's (i / 4)-th output from
// `key` (BF16 keeps 8 bits of mantissa, so 16 bits is plenty). Counter-based:
// any range is computed independently of the others, so the split across
// threads does not change the values.
uint64_t Word(uint64_t key, int64_t group) {
  return Mix64(key + (static_cast<uint64_t>(group) + 1) * kGamma);
}

uint16_t Bits(uint64_t key, int64_t i) {
  return static_cast<uint16_t>(Word(key, i / 4) >> (16 * (i % 4)));
}

// Calls store(i, bits) for each i in [begin, end); one hash per four elements.
template <typename Store>
void Fill(uint64_t key, int64_t begin, int64_t end, Store store) {
  int64_t i = begin;
  for (; i < end && i % 4 != 0; ++i) store(i, Bits(key, i));
  for (; i + 4 <= end; i += 4) {
    const uint64_t word = Word(key, i / 4);
    for (int lane = 0; lane < 4; ++lane) {
      store(i + lane, static_cast<uint16_t>(word >> (16 * lane)));
    }
  }
  for (; i < end; ++i) store(i, Bits(key, i));
}

// Uniform on (-a, a).
float Uniform(uint16_t bits) {
  return ((static_cast<float>(bits) + 0.5f) / 65536.0f * 2.0f - 1.0f) * kHalfWidth;
}

class Generator {
 public:
  Generator(uint64_t seed, Model& model)
      : seed_(seed), model_(model), pool_(ThreadPool::DefaultThreads()), to_bf16_(1 << 16) {
    // A lookup per element instead of float math: generation of an 8B-shaped
    // model is bound by this loop.
    for (uint32_t b = 0; b < to_bf16_.size(); ++b) {
      to_bf16_[b] = FloatToBF16(Uniform(static_cast<uint16_t>(b)));
    }
  }

  Matrix RandomMatrix(std::string_view name, int64_t rows, int64_t cols) {
    const uint64_t key = Key(name);
    const int64_t n = rows * cols;
    // Left uninitialized (no zeroing pass over gigabytes): the workers touch
    // the pages first, in parallel.
    std::shared_ptr<uint8_t[]> bytes(new uint8_t[static_cast<size_t>(n) * sizeof(uint16_t)]);
    model_.keep_alive.push_back(bytes);
    uint8_t* out = bytes.get();
    const uint16_t* table = to_bf16_.data();
    pool_.ParallelFor(n, 1 << 16, [key, out, table](int64_t begin, int64_t end) {
      Fill(key, begin, end, [out, table](int64_t i, uint16_t bits) {
        std::memcpy(out + 2 * i, &table[bits], sizeof(uint16_t));
      });
    });
    return Matrix{DType::kBF16, out, rows, cols, RowBytes(DType::kBF16, cols)};
  }

  const float* RandomVector(std::string_view name, int64_t n) {
    std::vector<float> v(n);
    Fill(Key(name), 0, n, [&v](int64_t i, uint16_t bits) { v[i] = Uniform(bits); });
    return model_.weights.Own(std::move(v));
  }

  const float* Ones(int64_t n) { return model_.weights.Own(std::vector<float>(n, 1.0f)); }

 private:
  uint64_t Key(std::string_view name) const { return Mix64(seed_ ^ Mix64(Fnv1a(name))); }

  uint64_t seed_;
  Model& model_;
  ThreadPool pool_;
  std::vector<uint16_t> to_bf16_;  // 16 random bits -> BF16 of Uniform()
};

void GenerateLayer(const ModelConfig& c, int64_t i, Generator& gen, LayerWeights& l) {
  const std::string p = StrCat("model.layers.", i, ".");
  const int64_t h = c.hidden_size;
  l.attn_norm = gen.Ones(h);
  l.ffn_norm = gen.Ones(h);
  l.wq = gen.RandomMatrix(p + "self_attn.q_proj.weight", c.q_dim(), h);
  l.wk = gen.RandomMatrix(p + "self_attn.k_proj.weight", c.kv_dim(), h);
  l.wv = gen.RandomMatrix(p + "self_attn.v_proj.weight", c.kv_dim(), h);
  if (c.qkv_bias) {
    l.bq = gen.RandomVector(p + "self_attn.q_proj.bias", c.q_dim());
    l.bk = gen.RandomVector(p + "self_attn.k_proj.bias", c.kv_dim());
    l.bv = gen.RandomVector(p + "self_attn.v_proj.bias", c.kv_dim());
  }
  l.wo = gen.RandomMatrix(p + "self_attn.o_proj.weight", h, c.q_dim());
  l.w_gate = gen.RandomMatrix(p + "mlp.gate_proj.weight", c.intermediate_size, h);
  l.w_up = gen.RandomMatrix(p + "mlp.up_proj.weight", c.intermediate_size, h);
  l.w_down = gen.RandomMatrix(p + "mlp.down_proj.weight", h, c.intermediate_size);
}

}  // namespace

absl::StatusOr<std::unique_ptr<Model>> LoadDummyModel(const std::string& path,
                                                      int64_t num_layers_override, uint64_t seed) {
  if (num_layers_override < 0) {
    return absl::InvalidArgumentError(
        StrCat("layer override must not be negative, got ", num_layers_override));
  }
  std::error_code ec;
  const fs::path config_path =
      fs::is_directory(path, ec) ? fs::path(path) / "config.json" : fs::path(path);
  auto model = std::make_unique<Model>();
  model->format = "dummy";
  model->path = path;
  ASSIGN_OR_RETURN(model->config, ModelConfigFromHfFile(config_path.string()));
  ModelConfig& c = model->config;
  if (num_layers_override > 0) c.num_layers = num_layers_override;
  // Before generating, which takes seconds for large shapes.
  fs::path dir = config_path.parent_path();
  if (dir.empty()) dir = ".";
  if (fs::exists(dir / "tokenizer.json", ec)) {
    RETURN_IF_ERROR(AttachHfTokenizer(dir.string(), *model));
  }

  LlamaWeights& w = model->weights;
  Generator gen(seed, *model);
  w.token_embedding = gen.RandomMatrix("model.embed_tokens.weight", c.vocab_size, c.hidden_size);
  w.output_norm = gen.Ones(c.hidden_size);
  w.output = c.tie_embeddings ? w.token_embedding
                              : gen.RandomMatrix("lm_head.weight", c.vocab_size, c.hidden_size);
  w.layers.resize(c.num_layers);
  for (int64_t i = 0; i < c.num_layers; ++i) GenerateLayer(c, i, gen, w.layers[i]);

  return model;
}

}  // namespace morphserve::engine
