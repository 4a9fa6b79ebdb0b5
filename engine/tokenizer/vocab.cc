#include "engine/tokenizer/vocab.h"

#include <utility>

#include "common/strings.h"

namespace morphserve::engine {

absl::StatusOr<Vocab> Vocab::Create(std::vector<TokenRecord> tokens) {
  Vocab vocab;
  vocab.ids_.reserve(tokens.size());
  for (size_t i = 0; i < tokens.size(); ++i) {
    const int32_t id = static_cast<int32_t>(i);
    if (tokens[i].text.empty()) {
      return absl::InvalidArgumentError(morphserve::StrCat("token ", id, " has empty text"));
    }
    auto [it, inserted] = vocab.ids_.emplace(tokens[i].text, id);
    if (!inserted) {
      return absl::InvalidArgumentError(morphserve::StrCat("duplicate token '", tokens[i].text,
                                                           "' has ids ", it->second, " and ", id));
    }
  }
  vocab.tokens_ = std::move(tokens);
  return vocab;
}

int32_t Vocab::Find(std::string_view text) const {
  // Debian's Abseil has its own string_view type, which the map hashes.
  auto it = ids_.find(absl::string_view(text.data(), text.size()));
  return it == ids_.end() ? kNoToken : it->second;
}

}  // namespace morphserve::engine
