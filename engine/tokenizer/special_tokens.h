// Splits special and added tokens out of raw text before the models run, as
// llama.cpp's tokenizer_st_partition does.
#ifndef MORPHSERVE_ENGINE_TOKENIZER_SPECIAL_TOKENS_H_
#define MORPHSERVE_ENGINE_TOKENIZER_SPECIAL_TOKENS_H_

#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include "engine/tokenizer/vocab.h"

namespace morphserve::engine {

// Either a token that was matched verbatim or a run of raw text.
struct Fragment {
  int32_t token = kNoToken;  // kNoToken for raw text
  std::string_view text;     // raw text, a view into the input
  size_t offset = 0;         // where `text` starts in the input
};

// Token ids whose text is matched verbatim in raw text (control, unknown and
// user-defined tokens), longest text first.
std::vector<int32_t> SpecialTokensByLength(const Vocab& vocab);

// Splits `text` on every occurrence of the tokens in `specials` (in that
// order, each over what the previous ones left). Control and unknown tokens
// are only matched with `parse_special`; user-defined tokens always are.
// A token's lstrip/rstrip flag drops ASCII whitespace beside it.
std::vector<Fragment> SplitSpecialTokens(std::string_view text, const Vocab& vocab,
                                         std::span<const int32_t> specials, bool parse_special);

}  // namespace morphserve::engine

#endif  // MORPHSERVE_ENGINE_TOKENIZER_SPECIAL_TOKENS_H_
