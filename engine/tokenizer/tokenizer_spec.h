// Everything a loader (GGUF or Hugging Face files) extracts to build a
// Tokenizer. Internal to engine/tokenizer.
#ifndef MORPHSERVE_ENGINE_TOKENIZER_TOKENIZER_SPEC_H_
#define MORPHSERVE_ENGINE_TOKENIZER_TOKENIZER_SPEC_H_

#include <cstdint>
#include <string>
#include <vector>

#include "engine/tokenizer/bpe_model.h"
#include "engine/tokenizer/pre_tokenizer.h"
#include "engine/tokenizer/vocab.h"

namespace morphserve::engine {

struct TokenizerSpec {
  // "llama": SentencePiece-style text (spaces as U+2581, <0xNN> byte
  // fallback); "gpt2": byte-level BPE.
  std::string model_name;
  std::string pre_tokenizer_name;

  std::vector<TokenRecord> tokens;

  // SentencePiece-style: merge by token scores (GGUF "llama") instead of
  // merge ranks (tokenizer.json with byte_fallback).
  bool use_scores = false;
  bool add_space_prefix = false;
  // Prefix only text at the very start of the input (Metaspace
  // prepend_scheme "first"), not text after every special token.
  bool space_prefix_first_only = false;

  // Byte-level BPE.
  PreTokenizerKind pre_tokenizer = PreTokenizerKind::kDefault;
  bool byte_level_prefix_space = false;  // ByteLevel add_prefix_space

  std::vector<MergePair> merges;
  bool strict_merges = false;
  bool ignore_merges = false;

  bool add_bos = false;
  bool add_eos = false;
  int32_t bos_id = kNoToken;
  int32_t eos_id = kNoToken;
  int32_t unk_id = kNoToken;
  int32_t pad_id = kNoToken;
  // End-of-generation ids beyond EOS and the ones recognised by their text.
  std::vector<int32_t> extra_eog_ids;

  std::string chat_template;
};

}  // namespace morphserve::engine

#endif  // MORPHSERVE_ENGINE_TOKENIZER_TOKENIZER_SPEC_H_
