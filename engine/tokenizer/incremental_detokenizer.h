// Streams generated tokens out as text without ever splitting a UTF-8
// character: bytes of an incomplete character are held back until it
// completes, and bytes that cannot form a character become U+FFFD as soon
// as that is certain (one per maximal invalid subsequence, as the WHATWG
// decoder does).
//
// For ids whose decoded bytes are valid UTF-8, the concatenation of every
// Push() result and Flush() equals Tokenizer::Decode(ids) with the same
// LeadingSpace. Not thread-safe; one instance per stream.
#ifndef MORPHSERVE_ENGINE_TOKENIZER_INCREMENTAL_DETOKENIZER_H_
#define MORPHSERVE_ENGINE_TOKENIZER_INCREMENTAL_DETOKENIZER_H_

#include <cstdint>
#include <string>
#include <string_view>

#include "engine/tokenizer/tokenizer.h"

namespace morphserve::engine {

class IncrementalDetokenizer {
 public:
  // `tokenizer` must outlive this object.
  explicit IncrementalDetokenizer(
      const Tokenizer& tokenizer,
      Tokenizer::LeadingSpace leading_space = Tokenizer::LeadingSpace::kStrip);

  // Text completed by `id` (possibly empty). Invalid ids add nothing.
  std::string Push(int32_t id);
  // Whatever is still held back, as U+FFFD: call at the end of the stream.
  std::string Flush();

 private:
  void Feed(std::string_view bytes, std::string* out);
  void Reset();

  const Tokenizer& tokenizer_;
  bool strip_leading_space_;
  // UTF-8 decoder state: the bytes of the character in progress, how many
  // continuation bytes it still needs and the range the next one must be in.
  std::string pending_;
  int needed_ = 0;
  uint8_t lower_ = 0x80;
  uint8_t upper_ = 0xBF;
};

}  // namespace morphserve::engine

#endif  // MORPHSERVE_ENGINE_TOKENIZER_INCREMENTAL_DETOKENIZER_H_
