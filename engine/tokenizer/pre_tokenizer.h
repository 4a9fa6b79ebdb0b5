// Pre-tokenizers for byte-level BPE vocabularies: hand-written equivalents of
// the regular expressions that llama.cpp and Hugging Face tokenizers use to
// split text into words before BPE merging.
#ifndef MORPHSERVE_ENGINE_TOKENIZER_PRE_TOKENIZER_H_
#define MORPHSERVE_ENGINE_TOKENIZER_PRE_TOKENIZER_H_

#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace morphserve::engine {

enum class PreTokenizerKind {
  // llama.cpp's fallback for BPE vocabularies without a known pre-tokenizer:
  // punctuation runs, then the GPT-2 regex, then digit runs, then digit
  // triples.
  kDefault,
  // 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
  kGpt2,
  // (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|
  //  ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
  kLlama3,
  // As kLlama3 with \p{N} (one digit per word).
  kQwen2,
  // Every digit isolated (\p{N}), then the GPT-2 regex on what is left
  // (SmolLM, StarCoder, Refact).
  kDigitsThenGpt2,
};

// Maps a `tokenizer.ggml.pre` value to its kind; nullopt when unknown.
std::optional<PreTokenizerKind> PreTokenizerFromGgufName(std::string_view name);

// Splits `text` into words. Invalid UTF-8 in the input comes out as U+FFFD,
// as in llama.cpp. The words concatenate back to the (repaired) input.
std::vector<std::string> PreTokenize(PreTokenizerKind kind, std::string_view text);

}  // namespace morphserve::engine

#endif  // MORPHSERVE_ENGINE_TOKENIZER_PRE_TOKENIZER_H_
