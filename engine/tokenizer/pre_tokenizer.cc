#include "engine/tokenizer/pre_tokenizer.h"

#include <cstdint>
#include <utility>

#include "engine/tokenizer/unicode.h"

namespace morphserve::engine {
namespace {

using unicode::CodePointFlags;

// A word as a half-open range of code point indices.
using Span = std::pair<size_t, size_t>;
using Spans = std::vector<Span>;

constexpr uint32_t kOutOfRange = 0xFFFFFFFF;

// Code point access limited to one input span: positions outside read as
// "no character", which is what the regex lookaheads see at a span's end.
class Cursor {
 public:
  Cursor(const std::vector<uint32_t>& cps, Span span) : cps_(cps), span_(span) {}

  uint32_t Cp(size_t pos) const { return In(pos) ? cps_[pos] : kOutOfRange; }
  // Flags, plus a bit that is set for every real character (so "not a
  // letter, number or space" can be told from "past the end").
  uint8_t Flags(size_t pos) const { return In(pos) ? (CodePointFlags(cps_[pos]) | kAny) : 0; }
  bool In(size_t pos) const { return pos >= span_.first && pos < span_.second; }

  static constexpr uint8_t kAny = 0x80;

 private:
  const std::vector<uint32_t>& cps_;
  Span span_;
};

constexpr uint8_t kLetter = unicode::kLetter;
constexpr uint8_t kNumber = unicode::kNumber;
constexpr uint8_t kSpace = unicode::kWhitespace;

bool IsOther(uint8_t flags) {  // [^\s\p{L}\p{N}]
  return (flags & Cursor::kAny) != 0 && (flags & (kLetter | kNumber | kSpace)) == 0;
}

// llama.cpp lower-cases with the full Unicode table, but only ASCII letters
// lower-case to the letters a contraction can hold.
uint32_t AsciiLower(uint32_t cp) { return (cp >= 'A' && cp <= 'Z') ? cp + 32 : cp; }

// Length of a contraction ('s 't 're 've 'm 'll 'd) at `pos`, or 0.
size_t Contraction(const Cursor& c, size_t pos, bool ignore_case) {
  if (c.Cp(pos) != '\'' || !c.In(pos + 1)) return 0;
  auto lower = [&](size_t p) { return ignore_case ? AsciiLower(c.Cp(p)) : c.Cp(p); };
  const uint32_t a = lower(pos + 1);
  if (a == 's' || a == 't' || a == 'm' || a == 'd') return 2;
  if (!c.In(pos + 2)) return 0;
  const uint32_t b = lower(pos + 2);
  if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return 3;
  return 0;
}

// Whitespace handling shared by both regex families: \s+(?!\S) backs off one
// character when non-space follows, else \s+ takes the whole run. With
// `newline_rule`, \s*[\r\n]+ (ending at the run's last CR/LF) comes first.
size_t WhitespaceEnd(const Cursor& c, size_t pos, bool newline_rule) {
  size_t n = 0;
  size_t last_newline_end = 0;
  while (c.Flags(pos + n) & kSpace) {
    const uint32_t cp = c.Cp(pos + n);
    if (cp == '\r' || cp == '\n') last_newline_end = pos + n + 1;
    ++n;
  }
  if (newline_rule && last_newline_end > 0) return last_newline_end;
  if (n > 1 && c.Cp(pos + n) != kOutOfRange) return pos + n - 1;
  if (n > 0) return pos + n;
  return pos + 1;  // no alternative matches: the character stands alone
}

void SplitGpt2(const std::vector<uint32_t>& cps, Span span, Spans* out) {
  const Cursor c(cps, span);
  size_t pos = span.first;
  while (pos < span.second) {
    const size_t start = pos;
    const uint32_t cp = c.Cp(pos);
    if (const size_t n = Contraction(c, pos, /*ignore_case=*/false); n > 0) {
      pos += n;
    } else {
      const bool space = cp == ' ';
      const uint8_t f = space ? c.Flags(pos + 1) : c.Flags(pos);
      if (f & kLetter) {
        pos += space + 1;
        while (c.Flags(pos) & kLetter) ++pos;
      } else if (f & kNumber) {
        pos += space + 1;
        while (c.Flags(pos) & kNumber) ++pos;
      } else if (IsOther(f)) {
        pos += space + 1;
        while (IsOther(c.Flags(pos))) ++pos;
      } else {
        pos = WhitespaceEnd(c, pos, /*newline_rule=*/false);
      }
    }
    out->emplace_back(start, pos);
  }
}

void SplitLlama3(const std::vector<uint32_t>& cps, Span span, size_t max_digits, Spans* out) {
  const Cursor c(cps, span);
  size_t pos = span.first;
  while (pos < span.second) {
    const size_t start = pos;
    const uint32_t cp = c.Cp(pos);
    const uint8_t f = c.Flags(pos);
    if (const size_t n = Contraction(c, pos, /*ignore_case=*/true); n > 0) {
      pos += n;
    } else if (cp != '\r' && cp != '\n' && !(f & kNumber) &&
               ((f & kLetter) || (c.Flags(pos + 1) & kLetter))) {
      // [^\r\n\p{L}\p{N}]?\p{L}+
      ++pos;
      while (c.Flags(pos) & kLetter) ++pos;
    } else if (f & kNumber) {
      // \p{N}{1,max_digits}
      while ((c.Flags(pos) & kNumber) && pos - start < max_digits) ++pos;
    } else if (IsOther(cp == ' ' ? c.Flags(pos + 1) : f)) {
      //  ?[^\s\p{L}\p{N}]+[\r\n]*
      pos += (cp == ' ') + 1;
      while (IsOther(c.Flags(pos))) ++pos;
      while (c.Cp(pos) == '\r' || c.Cp(pos) == '\n') ++pos;
    } else {
      pos = WhitespaceEnd(c, pos, /*newline_rule=*/true);
    }
    out->emplace_back(start, pos);
  }
}

// Regex `X+` (or `X` with `single`) used as an isolating splitter: matches
// and the gaps between them both become words.
template <typename Pred>
void SplitRuns(const std::vector<uint32_t>& cps, Span span, bool single, Pred pred, Spans* out) {
  size_t pos = span.first;
  while (pos < span.second) {
    const size_t start = pos;
    if (pred(cps[pos])) {
      ++pos;
      while (!single && pos < span.second && pred(cps[pos])) ++pos;
    } else {
      while (pos < span.second && !pred(cps[pos])) ++pos;
    }
    out->emplace_back(start, pos);
  }
}

// Regex [0-9][0-9][0-9] as an isolating splitter.
void SplitDigitTriples(const std::vector<uint32_t>& cps, Span span, Spans* out) {
  auto digit = [&](size_t p) { return p < span.second && cps[p] >= '0' && cps[p] <= '9'; };
  size_t gap = span.first;
  size_t pos = span.first;
  while (pos < span.second) {
    if (digit(pos) && digit(pos + 1) && digit(pos + 2)) {
      if (gap < pos) out->emplace_back(gap, pos);
      out->emplace_back(pos, pos + 3);
      pos += 3;
      gap = pos;
    } else {
      ++pos;
    }
  }
  if (gap < span.second) out->emplace_back(gap, span.second);
}

// Runs one splitting stage over every span produced by the previous one.
template <typename Stage>
Spans Apply(const Spans& in, Stage stage) {
  Spans out;
  out.reserve(in.size() * 2);
  for (const Span& s : in) stage(s, &out);
  return out;
}

bool IsDefaultPunctuation(uint32_t cp) {  // [\p{P}\$\+<=>\^~\|]
  switch (cp) {
    case '$':
    case '+':
    case '<':
    case '=':
    case '>':
    case '^':
    case '~':
    case '|':
      return true;
    default:
      return (CodePointFlags(cp) & unicode::kPunctuation) != 0;
  }
}

Spans Split(PreTokenizerKind kind, const std::vector<uint32_t>& cps) {
  const Spans whole = {{0, cps.size()}};
  auto gpt2 = [&](Span s, Spans* o) { SplitGpt2(cps, s, o); };
  auto numbers = [](uint32_t cp) { return unicode::IsNumber(cp); };
  switch (kind) {
    case PreTokenizerKind::kGpt2:
      return Apply(whole, gpt2);
    case PreTokenizerKind::kLlama3:
      return Apply(whole, [&](Span s, Spans* o) { SplitLlama3(cps, s, 3, o); });
    case PreTokenizerKind::kQwen2:
      return Apply(whole, [&](Span s, Spans* o) { SplitLlama3(cps, s, 1, o); });
    case PreTokenizerKind::kDigitsThenGpt2: {
      const Spans digits =
          Apply(whole, [&](Span s, Spans* o) { SplitRuns(cps, s, /*single=*/true, numbers, o); });
      return Apply(digits, gpt2);
    }
    case PreTokenizerKind::kDefault: {
      Spans spans = Apply(whole, [&](Span s, Spans* o) {
        SplitRuns(cps, s, /*single=*/false, IsDefaultPunctuation, o);
      });
      spans = Apply(spans, gpt2);
      spans =
          Apply(spans, [&](Span s, Spans* o) { SplitRuns(cps, s, /*single=*/false, numbers, o); });
      return Apply(spans, [&](Span s, Spans* o) { SplitDigitTriples(cps, s, o); });
    }
  }
  return whole;
}

}  // namespace

std::optional<PreTokenizerKind> PreTokenizerFromGgufName(std::string_view name) {
  auto any_of = [name](std::initializer_list<std::string_view> names) {
    for (std::string_view n : names) {
      if (n == name) return true;
    }
    return false;
  };
  if (any_of({"", "default"})) return PreTokenizerKind::kDefault;
  if (any_of({"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "dbrx",
              "smaug-bpe"})) {
    return PreTokenizerKind::kLlama3;
  }
  if (any_of({"qwen2", "deepseek-r1-qwen", "stablelm2", "megrez", "hunyuan"})) {
    return PreTokenizerKind::kQwen2;
  }
  if (any_of({"gpt-2", "phi-2", "mpt", "olmo", "jais", "exaone4", "mellum"})) {
    return PreTokenizerKind::kGpt2;
  }
  if (any_of({"smollm", "starcoder", "refact", "codeshell", "exaone", "minerva-7b", "command-r"})) {
    return PreTokenizerKind::kDigitsThenGpt2;
  }
  return std::nullopt;
}

std::vector<std::string> PreTokenize(PreTokenizerKind kind, std::string_view text) {
  const std::vector<uint32_t> cps = unicode::DecodeUtf8Lenient(text);
  std::vector<std::string> words;
  if (cps.empty()) return words;
  const Spans spans = Split(kind, cps);
  words.reserve(spans.size());
  for (const auto& [begin, end] : spans) {
    std::string& word = words.emplace_back();
    for (size_t i = begin; i < end; ++i) unicode::AppendUtf8(cps[i], &word);
  }
  return words;
}

}  // namespace morphserve::engine
