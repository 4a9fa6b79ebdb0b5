// SentencePiece-BPE driven by token scores, as in llama.cpp's
// llm_tokenizer_spm_session: adjacent symbols whose concatenation is a token
// are merged highest score first (leftmost on ties); symbols that end up
// not being tokens are emitted as <0xNN> byte tokens.
#ifndef MORPHSERVE_ENGINE_TOKENIZER_SPM_MODEL_H_
#define MORPHSERVE_ENGINE_TOKENIZER_SPM_MODEL_H_

#include <array>
#include <cstdint>
#include <string_view>
#include <vector>

#include "engine/tokenizer/vocab.h"

namespace morphserve::engine {

class SpmModel {
 public:
  SpmModel() = default;
  // Byte fallback uses <0xNN>, then the one-byte token, then `unk_id`.
  static SpmModel Create(const Vocab& vocab, int32_t unk_id);

  // Appends the ids for `text`, whose spaces are already escaped as U+2581.
  void Encode(const Vocab& vocab, std::string_view text, std::vector<int32_t>* out) const;

 private:
  std::array<int32_t, 256> byte_tokens_{};
};

}  // namespace morphserve::engine

#endif  // MORPHSERVE_ENGINE_TOKENIZER_SPM_MODEL_H_
