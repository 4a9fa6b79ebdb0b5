#include "engine/tokenizer/special_tokens.h"

#include <algorithm>

namespace morphserve::engine {
namespace {

bool IsAsciiSpace(char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\v' || c == '\f' || c == '\r';
}

bool IsVerbatimType(TokenType type) {
  return type == TokenType::kControl || type == TokenType::kUnknown ||
         type == TokenType::kUserDefined;
}

// Appends the raw piece text[begin, end) unless it is empty.
void AddRaw(std::string_view text, size_t base, size_t begin, size_t end,
            std::vector<Fragment>* out) {
  if (begin < end)
    out->push_back(Fragment{kNoToken, text.substr(begin, end - begin), base + begin});
}

}  // namespace

std::vector<int32_t> SpecialTokensByLength(const Vocab& vocab) {
  std::vector<int32_t> ids;
  for (int32_t id = 0; id < vocab.size(); ++id) {
    if (IsVerbatimType(vocab[id].type)) ids.push_back(id);
  }
  std::stable_sort(ids.begin(), ids.end(), [&](int32_t a, int32_t b) {
    return vocab[a].text.size() > vocab[b].text.size();
  });
  return ids;
}

std::vector<Fragment> SplitSpecialTokens(std::string_view text, const Vocab& vocab,
                                         std::span<const int32_t> specials, bool parse_special) {
  std::vector<Fragment> fragments;
  if (text.empty()) return fragments;
  fragments.push_back(Fragment{kNoToken, text, 0});
  std::vector<Fragment> next;
  for (const int32_t id : specials) {
    const TokenRecord& token = vocab[id];
    if (!parse_special && token.type != TokenType::kUserDefined) continue;
    const std::string_view needle = token.text;
    next.clear();
    bool changed = false;
    for (const Fragment& f : fragments) {
      if (f.token != kNoToken || f.text.find(needle) == std::string_view::npos) {
        next.push_back(f);
        continue;
      }
      changed = true;
      size_t begin = 0;  // start of the unprocessed rest of f.text
      while (begin < f.text.size()) {
        const size_t match = f.text.find(needle, begin);
        if (match == std::string_view::npos) break;
        size_t left_end = match;
        if (token.lstrip) {
          while (left_end > begin && IsAsciiSpace(f.text[left_end - 1])) --left_end;
        }
        AddRaw(f.text, f.offset, begin, left_end, &next);
        next.push_back(Fragment{id, {}, f.offset + match});
        begin = match + needle.size();
        if (token.rstrip) {
          while (begin < f.text.size() && IsAsciiSpace(f.text[begin])) ++begin;
        }
      }
      AddRaw(f.text, f.offset, begin, f.text.size(), &next);
    }
    if (changed) fragments.swap(next);
  }
  return fragments;
}

}  // namespace morphserve::engine
