#include "engine/tokenizer/tokenizer.h"

#include <algorithm>
#include <utility>

#include "common/status.h"
#include "common/strings.h"
#include "engine/tokenizer/special_tokens.h"
#include "engine/tokenizer/tokenizer_spec.h"
#include "engine/tokenizer/unicode.h"

namespace morphserve::engine {
namespace {

constexpr std::string_view kSpaceMarker = "\xE2\x96\x81";  // U+2581, SentencePiece's space

// Texts that end a turn or a document in the supported chat formats. Like
// llama.cpp, such tokens stop generation and are treated as control tokens
// even when the vocabulary marks them otherwise.
constexpr std::string_view kEndOfGenerationTexts[] = {
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>",   "<|endoftext|>",
    "<|eom_id|>", "<EOT>",      "_<EOT>",  "<|end_of_text|>", "<end_of_utterance>",
};

// Parses "<0xNN>".
std::optional<uint8_t> ParseByteToken(std::string_view text) {
  if (text.size() != 6 || text.substr(0, 3) != "<0x" || text[5] != '>') return std::nullopt;
  auto nibble = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
  };
  const int hi = nibble(text[3]);
  const int lo = nibble(text[4]);
  if (hi < 0 || lo < 0) return std::nullopt;
  return static_cast<uint8_t>(hi * 16 + lo);
}

std::string ReplaceAll(std::string_view text, std::string_view from, std::string_view to) {
  std::string out;
  out.reserve(text.size());
  size_t pos = 0;
  for (size_t hit; (hit = text.find(from, pos)) != std::string_view::npos;
       pos = hit + from.size()) {
    out.append(text.substr(pos, hit - pos)).append(to);
  }
  out.append(text.substr(pos));
  return out;
}

std::string ByteLevelDecode(std::string_view text) {
  std::string out;
  for (uint32_t cp : unicode::DecodeUtf8Lenient(text)) {
    if (const std::optional<uint8_t> b = unicode::UnicodeToByte(cp)) {
      out.push_back(static_cast<char>(*b));
    } else {
      unicode::AppendUtf8(cp, &out);  // not in the alphabet: kept as is
    }
  }
  return out;
}

absl::Status CheckId(int32_t id, int32_t vocab_size, std::string_view what) {
  if (id == kNoToken || (id >= 0 && id < vocab_size)) return absl::OkStatus();
  return absl::InvalidArgumentError(morphserve::StrCat(
      what, " id ", id, " is out of range (vocabulary has ", vocab_size, " tokens)"));
}

}  // namespace

Tokenizer::~Tokenizer() = default;

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::Build(TokenizerSpec spec) {
  if (spec.tokens.empty()) return absl::InvalidArgumentError("vocabulary is empty");
  std::vector<int32_t> eog = spec.extra_eog_ids;
  for (size_t i = 0; i < spec.tokens.size(); ++i) {
    TokenRecord& t = spec.tokens[i];
    if (std::find(std::begin(kEndOfGenerationTexts), std::end(kEndOfGenerationTexts), t.text) !=
        std::end(kEndOfGenerationTexts)) {
      t.type = TokenType::kControl;
      eog.push_back(static_cast<int32_t>(i));
    }
  }

  std::unique_ptr<Tokenizer> tok(new Tokenizer());
  ASSIGN_OR_RETURN(tok->vocab_, Vocab::Create(std::move(spec.tokens)));
  const int32_t n = tok->vocab_.size();
  RETURN_IF_ERROR(CheckId(spec.bos_id, n, "BOS"));
  RETURN_IF_ERROR(CheckId(spec.eos_id, n, "EOS"));
  RETURN_IF_ERROR(CheckId(spec.unk_id, n, "unknown-token"));
  RETURN_IF_ERROR(CheckId(spec.pad_id, n, "padding"));
  for (int32_t id : spec.extra_eog_ids) RETURN_IF_ERROR(CheckId(id, n, "end-of-generation"));
  if (spec.add_bos && spec.bos_id == kNoToken) {
    return absl::InvalidArgumentError("the model adds BOS but has no BOS token");
  }
  if (spec.add_eos && spec.eos_id == kNoToken) {
    return absl::InvalidArgumentError("the model adds EOS but has no EOS token");
  }

  tok->model_name_ = std::move(spec.model_name);
  tok->pre_tokenizer_name_ = std::move(spec.pre_tokenizer_name);
  tok->chat_template_ = std::move(spec.chat_template);
  tok->byte_level_ = tok->model_name_ == "gpt2";
  tok->use_scores_ = spec.use_scores;
  tok->pre_tokenizer_ = spec.pre_tokenizer;
  tok->byte_level_prefix_space_ = spec.byte_level_prefix_space;
  tok->add_space_prefix_ = spec.add_space_prefix;
  tok->space_prefix_first_only_ = spec.space_prefix_first_only;
  tok->add_bos_ = spec.add_bos;
  tok->add_eos_ = spec.add_eos;
  tok->bos_id_ = spec.bos_id;
  tok->eos_id_ = spec.eos_id;
  tok->unk_id_ = spec.unk_id;
  tok->pad_id_ = spec.pad_id;

  if (tok->use_scores_) {
    tok->spm_ = SpmModel::Create(tok->vocab_, tok->unk_id_);
  } else {
    const auto fallback =
        tok->byte_level_ ? BpeModel::Fallback::kSingleByteTokens : BpeModel::Fallback::kByteTokens;
    ASSIGN_OR_RETURN(tok->bpe_, BpeModel::Create(tok->vocab_, spec.merges, spec.strict_merges,
                                                 spec.ignore_merges, fallback, tok->unk_id_));
  }

  if (tok->eos_id_ != kNoToken) eog.push_back(tok->eos_id_);
  for (int32_t id : eog) {
    if (id != kNoToken) tok->eog_ids_.insert(id);
  }
  tok->eog_list_.assign(tok->eog_ids_.begin(), tok->eog_ids_.end());
  std::sort(tok->eog_list_.begin(), tok->eog_list_.end());

  tok->specials_by_length_ = SpecialTokensByLength(tok->vocab_);
  tok->pieces_.reserve(n);
  for (int32_t id = 0; id < n; ++id) tok->pieces_.push_back(tok->ComputePiece(id));
  return tok;
}

std::string Tokenizer::ComputePiece(int32_t id) const {
  const TokenRecord& t = vocab_[id];
  switch (t.type) {
    case TokenType::kUserDefined:
      return t.text;
    case TokenType::kNormal:
      return byte_level_ ? ByteLevelDecode(t.text) : ReplaceAll(t.text, kSpaceMarker, " ");
    case TokenType::kByte:
      if (const std::optional<uint8_t> b = ParseByteToken(t.text)) {
        return std::string(1, static_cast<char>(*b));
      }
      return "";
    case TokenType::kControl:
    case TokenType::kUnknown:
    case TokenType::kUnused:
    case TokenType::kUndefined:
      break;
  }
  return "";
}

std::vector<int32_t> Tokenizer::Encode(std::string_view text, bool add_special,
                                       bool parse_special) const {
  std::vector<int32_t> out;
  out.reserve(text.size() / 3 + 2);
  if (add_special && add_bos_) out.push_back(bos_id_);
  // SentencePiece-style text gets its space prefix at the start and after
  // every special token.
  bool after_special = true;
  for (const Fragment& f : SplitSpecialTokens(text, vocab_, specials_by_length_, parse_special)) {
    if (f.token != kNoToken) {
      out.push_back(f.token);
      after_special = true;
      continue;
    }
    EncodeText(f.text, f.offset == 0, after_special, &out);
    after_special = false;
  }
  if (add_special && add_eos_) out.push_back(eos_id_);
  return out;
}

void Tokenizer::EncodeText(std::string_view text, bool at_text_start, bool after_special,
                           std::vector<int32_t>* out) const {
  if (byte_level_) {
    std::string raw;
    if (byte_level_prefix_space_ && text.front() != ' ') raw = " ";
    raw.append(text);
    std::string encoded;
    for (const std::string& word : PreTokenize(pre_tokenizer_, raw)) {
      encoded.clear();
      for (char c : word) encoded.append(unicode::ByteToUnicode(static_cast<uint8_t>(c)));
      bpe_.Encode(vocab_, encoded, out);
    }
    return;
  }
  std::string prefixed;
  if (add_space_prefix_ && after_special && (!space_prefix_first_only_ || at_text_start)) {
    prefixed = " ";
  }
  prefixed.append(text);
  const std::string escaped = ReplaceAll(prefixed, " ", kSpaceMarker);
  if (use_scores_) {
    spm_.Encode(vocab_, escaped, out);
  } else {
    bpe_.Encode(vocab_, escaped, out);
  }
}

std::string Tokenizer::TokenToPiece(int32_t id, bool render_special) const {
  if (!vocab_.Contains(id)) return "";
  const TokenType type = vocab_[id].type;
  if (render_special && (type == TokenType::kControl || type == TokenType::kUnknown)) {
    return vocab_[id].text;
  }
  return pieces_[id];
}

std::string Tokenizer::Decode(std::span<const int32_t> ids, LeadingSpace leading_space) const {
  std::string out;
  bool strip = add_space_prefix_ && leading_space == LeadingSpace::kStrip;
  for (int32_t id : ids) {
    if (!vocab_.Contains(id) || pieces_[id].empty()) continue;
    const std::string& piece = pieces_[id];
    out.append(piece, strip && piece.front() == ' ' ? 1 : 0);
    strip = false;
  }
  return out;
}

absl::Status Tokenizer::ValidateIds(std::span<const int32_t> ids) const {
  for (size_t i = 0; i < ids.size(); ++i) {
    if (!vocab_.Contains(ids[i])) {
      return absl::InvalidArgumentError(morphserve::StrCat("token id ", ids[i], " at position ", i,
                                                           " is outside the vocabulary [0, ",
                                                           vocab_.size(), ")"));
    }
  }
  return absl::OkStatus();
}

std::string_view Tokenizer::TokenText(int32_t id) const {
  return vocab_.Contains(id) ? std::string_view(vocab_[id].text) : std::string_view();
}

TokenType Tokenizer::GetTokenType(int32_t id) const {
  return vocab_.Contains(id) ? vocab_[id].type : TokenType::kUndefined;
}

std::optional<int32_t> Tokenizer::FindToken(std::string_view text) const {
  const int32_t id = vocab_.Find(text);
  if (id == kNoToken) return std::nullopt;
  return id;
}

}  // namespace morphserve::engine
