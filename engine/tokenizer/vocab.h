// Token table shared by the tokenizer models: id -> text/score/type and a
// text -> id index.
#ifndef MORPHSERVE_ENGINE_TOKENIZER_VOCAB_H_
#define MORPHSERVE_ENGINE_TOKENIZER_VOCAB_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"

namespace morphserve::engine {

inline constexpr int32_t kNoToken = -1;

// Values of `tokenizer.ggml.token_type` (llama.cpp's llama_token_type).
enum class TokenType : int32_t {
  kUndefined = 0,
  kNormal = 1,
  kUnknown = 2,
  kControl = 3,
  kUserDefined = 4,
  kUnused = 5,
  kByte = 6,
};

struct TokenRecord {
  std::string text;
  float score = 0.0f;
  TokenType type = TokenType::kNormal;
  // Whitespace next to a special token is swallowed when splitting it out.
  bool lstrip = false;
  bool rstrip = false;
};

class Vocab {
 public:
  Vocab() = default;
  // Fails on duplicate or empty texts.
  static absl::StatusOr<Vocab> Create(std::vector<TokenRecord> tokens);

  int32_t size() const { return static_cast<int32_t>(tokens_.size()); }
  bool Contains(int32_t id) const { return id >= 0 && id < size(); }
  const TokenRecord& operator[](int32_t id) const { return tokens_[id]; }
  TokenRecord& mutable_token(int32_t id) { return tokens_[id]; }
  // kNoToken when absent.
  int32_t Find(std::string_view text) const;

 private:
  std::vector<TokenRecord> tokens_;
  absl::flat_hash_map<std::string, int32_t> ids_;
};

}  // namespace morphserve::engine

#endif  // MORPHSERVE_ENGINE_TOKENIZER_VOCAB_H_
