// Text <-> token ids for Llama-family models, matching llama.cpp's
// llama_tokenize / llama_token_to_piece.
//
// Two model kinds are supported: SentencePiece-style BPE ("llama": spaces as
// U+2581, <0xNN> byte fallback) and byte-level BPE ("gpt2": Llama 3, Qwen2,
// GPT-2, SmolLM). A Tokenizer is immutable after construction; every const
// method is safe to call from any thread.
//
// Invalid token ids never crash: TokenToPiece and TokenText return "" and
// Decode skips them. ValidateIds reports them, for callers that must reject
// bad input instead.
#ifndef MORPHSERVE_ENGINE_TOKENIZER_TOKENIZER_H_
#define MORPHSERVE_ENGINE_TOKENIZER_TOKENIZER_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/gguf/gguf_file.h"
#include "engine/tokenizer/bpe_model.h"
#include "engine/tokenizer/pre_tokenizer.h"
#include "engine/tokenizer/spm_model.h"
#include "engine/tokenizer/vocab.h"

namespace morphserve::engine {

struct TokenizerSpec;

class Tokenizer {
 public:
  // Whether Decode drops the space that SentencePiece-style encoding put in
  // front of the text (add_space_prefix). Decoding a whole sequence from its
  // start strips it; decoding a continuation keeps it.
  enum class LeadingSpace { kStrip, kKeep };

  // Builds from the `tokenizer.ggml.*` metadata of a GGUF file.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromGguf(const GgufFile& file);
  // Builds from a Hugging Face model directory: tokenizer.json, plus
  // tokenizer_config.json, chat_template.jinja and generation_config.json
  // when present.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromHuggingFace(const std::string& dir);

  ~Tokenizer();
  Tokenizer(const Tokenizer&) = delete;
  Tokenizer& operator=(const Tokenizer&) = delete;

  // Same as llama_tokenize(text, add_special, parse_special): `add_special`
  // adds BOS/EOS as the model asks (add_bos / add_eos); `parse_special`
  // turns the text of control tokens into their ids. User-defined tokens are
  // always matched.
  std::vector<int32_t> Encode(std::string_view text, bool add_special, bool parse_special) const;

  // The raw bytes a token stands for (possibly part of a UTF-8 character).
  // Control and unknown tokens give "" unless `render_special`.
  std::string TokenToPiece(int32_t id, bool render_special = false) const;
  // Concatenated pieces, with the leading space handled per `leading_space`.
  std::string Decode(std::span<const int32_t> ids,
                     LeadingSpace leading_space = LeadingSpace::kStrip) const;
  // InvalidArgument naming the first id outside [0, vocab_size()).
  absl::Status ValidateIds(std::span<const int32_t> ids) const;

  // The vocabulary entry itself ("" for an invalid id).
  std::string_view TokenText(int32_t id) const;
  // kUndefined for an invalid id.
  TokenType GetTokenType(int32_t id) const;
  std::optional<int32_t> FindToken(std::string_view text) const;

  int32_t vocab_size() const { return vocab_.size(); }
  int32_t bos_id() const { return bos_id_; }  // -1 when the model has none
  int32_t eos_id() const { return eos_id_; }
  int32_t unk_id() const { return unk_id_; }
  int32_t pad_id() const { return pad_id_; }
  bool add_bos() const { return add_bos_; }
  bool add_eos() const { return add_eos_; }
  bool add_space_prefix() const { return add_space_prefix_; }

  bool IsEndOfGeneration(int32_t id) const { return eog_ids_.contains(id); }
  // Sorted ascending.
  const std::vector<int32_t>& end_of_generation_ids() const { return eog_list_; }
  bool IsControl(int32_t id) const { return GetTokenType(id) == TokenType::kControl; }

  // "llama" (SentencePiece-style) or "gpt2" (byte-level).
  const std::string& model_name() const { return model_name_; }
  const std::string& pre_tokenizer_name() const { return pre_tokenizer_name_; }
  // The model's Jinja chat template, "" if it has none.
  const std::string& chat_template() const { return chat_template_; }

 private:
  Tokenizer() = default;
  static absl::StatusOr<std::unique_ptr<Tokenizer>> Build(TokenizerSpec spec);
  std::string ComputePiece(int32_t id) const;
  void EncodeText(std::string_view text, bool at_text_start, bool after_special,
                  std::vector<int32_t>* out) const;

  Vocab vocab_;
  std::vector<std::string> pieces_;  // TokenToPiece without specials
  std::vector<int32_t> specials_by_length_;
  bool byte_level_ = false;
  bool use_scores_ = false;
  SpmModel spm_;
  BpeModel bpe_;
  PreTokenizerKind pre_tokenizer_ = PreTokenizerKind::kDefault;
  bool byte_level_prefix_space_ = false;
  bool add_space_prefix_ = false;
  bool space_prefix_first_only_ = false;
  bool add_bos_ = false;
  bool add_eos_ = false;
  int32_t bos_id_ = kNoToken;
  int32_t eos_id_ = kNoToken;
  int32_t unk_id_ = kNoToken;
  int32_t pad_id_ = kNoToken;
  absl::flat_hash_set<int32_t> eog_ids_;
  std::vector<int32_t> eog_list_;
  std::string model_name_;
  std::string pre_tokenizer_name_;
  std::string chat_template_;
};

}  // namespace morphserve::engine

#endif  // MORPHSERVE_ENGINE_TOKENIZER_TOKENIZER_H_
