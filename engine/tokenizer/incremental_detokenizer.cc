#include "engine/tokenizer/incremental_detokenizer.h"

namespace morphserve::engine {
namespace {

constexpr std::string_view kReplacement = "\xEF\xBF\xBD";  // U+FFFD

}  // namespace

IncrementalDetokenizer::IncrementalDetokenizer(const Tokenizer& tokenizer,
                                               Tokenizer::LeadingSpace leading_space)
    : tokenizer_(tokenizer),
      strip_leading_space_(tokenizer.add_space_prefix() &&
                           leading_space == Tokenizer::LeadingSpace::kStrip) {}

std::string IncrementalDetokenizer::Push(int32_t id) {
  std::string piece = tokenizer_.TokenToPiece(id);
  std::string out;
  if (piece.empty()) return out;
  // Same rule as Decode: the first piece with text loses one leading space.
  std::string_view bytes = piece;
  if (strip_leading_space_ && bytes.front() == ' ') bytes.remove_prefix(1);
  strip_leading_space_ = false;
  Feed(bytes, &out);
  return out;
}

std::string IncrementalDetokenizer::Flush() {
  std::string out;
  if (needed_ > 0) out.append(kReplacement);
  Reset();
  return out;
}

void IncrementalDetokenizer::Reset() {
  pending_.clear();
  needed_ = 0;
  lower_ = 0x80;
  upper_ = 0xBF;
}

void IncrementalDetokenizer::Feed(std::string_view bytes, std::string* out) {
  size_t i = 0;
  while (i < bytes.size()) {
    const uint8_t b = static_cast<uint8_t>(bytes[i]);
    if (needed_ == 0) {
      ++i;
      if (b < 0x80) {
        out->push_back(static_cast<char>(b));
        continue;
      }
      if (b >= 0xC2 && b <= 0xDF) {
        needed_ = 1;
      } else if (b >= 0xE0 && b <= 0xEF) {
        needed_ = 2;
        if (b == 0xE0) lower_ = 0xA0;  // no overlong forms
        if (b == 0xED) upper_ = 0x9F;  // no surrogates
      } else if (b >= 0xF0 && b <= 0xF4) {
        needed_ = 3;
        if (b == 0xF0) lower_ = 0x90;  // no overlong forms
        if (b == 0xF4) upper_ = 0x8F;  // nothing past U+10FFFF
      } else {
        out->append(kReplacement);
        continue;
      }
      pending_.push_back(static_cast<char>(b));
      continue;
    }
    if (b < lower_ || b > upper_) {
      // The character in progress is broken; this byte starts afresh.
      out->append(kReplacement);
      Reset();
      continue;
    }
    ++i;
    pending_.push_back(static_cast<char>(b));
    lower_ = 0x80;
    upper_ = 0xBF;
    if (--needed_ == 0) {
      out->append(pending_);
      Reset();
    }
  }
}

}  // namespace morphserve::engine
