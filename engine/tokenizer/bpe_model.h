// Merge-rank BPE over one pre-tokenized word, as in llama.cpp's
// llm_tokenizer_bpe_session and Hugging Face's BPE model: the adjacent pair
// with the lowest merge rank is merged first (leftmost on ties) until no
// ranked pair is left.
#ifndef MORPHSERVE_ENGINE_TOKENIZER_BPE_MODEL_H_
#define MORPHSERVE_ENGINE_TOKENIZER_BPE_MODEL_H_

#include <array>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "engine/tokenizer/vocab.h"

namespace morphserve::engine {

using MergePair = std::pair<std::string, std::string>;

class BpeModel {
 public:
  // What a final symbol that is not a token turns into.
  enum class Fallback {
    kSingleByteTokens,  // each byte as a one-byte token, skipped if absent (llama.cpp)
    kByteTokens,        // each byte as <0xNN>, else the unknown token (byte_fallback)
  };

  BpeModel() = default;

  // `merges` are in rank order. With `strict`, a merge whose parts or result
  // are not tokens is an error; otherwise it is skipped (it could never
  // apply to token ids anyway).
  static absl::StatusOr<BpeModel> Create(const Vocab& vocab, std::span<const MergePair> merges,
                                         bool strict, bool ignore_merges, Fallback fallback,
                                         int32_t unk_id);

  size_t num_merges() const { return merges_.size(); }

  // Appends the ids for `word` (already in the vocabulary's alphabet).
  void Encode(const Vocab& vocab, std::string_view word, std::vector<int32_t>* out) const;

 private:
  struct Merge {
    int32_t rank;
    int32_t result;
  };
  static uint64_t Key(int32_t left, int32_t right) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) |
           static_cast<uint32_t>(right);
  }
  void EmitFallback(const Vocab& vocab, std::string_view text, std::vector<int32_t>* out) const;

  absl::flat_hash_map<uint64_t, Merge> merges_;
  bool ignore_merges_ = false;
  Fallback fallback_ = Fallback::kSingleByteTokens;
  int32_t unk_id_ = kNoToken;
  std::array<int32_t, 256> byte_tokens_{};  // <0xNN> ids, for kByteTokens
};

}  // namespace morphserve::engine

#endif  // MORPHSERVE_ENGINE_TOKENIZER_BPE_MODEL_H_
