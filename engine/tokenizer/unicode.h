// Unicode helpers for the tokenizers: code point classes, UTF-8 coding with
// llama.cpp's lenient rules, strict UTF-8 validation and the GPT-2 byte-level
// alphabet.
#ifndef MORPHSERVE_ENGINE_TOKENIZER_UNICODE_H_
#define MORPHSERVE_ENGINE_TOKENIZER_UNICODE_H_

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace morphserve::engine::unicode {

inline constexpr uint32_t kReplacementChar = 0xFFFD;

// Bits returned by CodePointFlags().
enum CodePointFlag : uint8_t {
  kLetter = 1,       // \p{L}
  kNumber = 2,       // \p{N}
  kPunctuation = 4,  // \p{P}
  kWhitespace = 8,   // \s (the White_Space property)
};

uint8_t CodePointFlags(uint32_t cp);
inline bool IsLetter(uint32_t cp) { return (CodePointFlags(cp) & kLetter) != 0; }
inline bool IsNumber(uint32_t cp) { return (CodePointFlags(cp) & kNumber) != 0; }
inline bool IsWhitespace(uint32_t cp) { return (CodePointFlags(cp) & kWhitespace) != 0; }

// Length of the sequence a UTF-8 lead byte announces, judged from its high
// nibble only (continuation bytes count as 1), as SentencePiece-style symbol
// splitting does.
size_t Utf8SequenceLength(uint8_t lead);

// Decodes `text` the way llama.cpp does before pre-tokenizing: structurally
// valid sequences are accepted (overlong forms and surrogates included), and
// every byte that does not start one becomes U+FFFD.
std::vector<uint32_t> DecodeUtf8Lenient(std::string_view text);

// Appends the UTF-8 form of `cp` (U+FFFD for values past U+10FFFF).
void AppendUtf8(uint32_t cp, std::string* out);

// Strict validation (no overlongs, surrogates or values past U+10FFFF).
bool IsValidUtf8(std::string_view text);

// GPT-2 byte-level alphabet: each byte maps to one printable code point.
// Returns the UTF-8 form of the code point standing for `byte`.
std::string_view ByteToUnicode(uint8_t byte);
// The byte a byte-level code point stands for, if it is one.
std::optional<uint8_t> UnicodeToByte(uint32_t cp);

}  // namespace morphserve::engine::unicode

#endif  // MORPHSERVE_ENGINE_TOKENIZER_UNICODE_H_
