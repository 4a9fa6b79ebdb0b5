#include "engine/tokenizer/bpe_model.h"

#include <queue>

#include "absl/strings/str_format.h"
#include "common/strings.h"
#include "engine/tokenizer/unicode.h"

namespace morphserve::engine {
namespace {

struct Symbol {
  uint32_t start;
  uint32_t len;  // 0 once merged into its left neighbour
  int32_t id;    // kNoToken when the text is not a token
  int32_t prev;
  int32_t next;
};

struct Candidate {
  int32_t rank;
  int32_t left;
  int32_t right;
  int32_t left_id;
  int32_t right_id;
  int32_t result;
};

// Lowest rank first, then leftmost (std::priority_queue pops the "largest").
struct CandidateAfter {
  bool operator()(const Candidate& a, const Candidate& b) const {
    return a.rank > b.rank || (a.rank == b.rank && a.left > b.left);
  }
};

}  // namespace

absl::StatusOr<BpeModel> BpeModel::Create(const Vocab& vocab, std::span<const MergePair> merges,
                                          bool strict, bool ignore_merges, Fallback fallback,
                                          int32_t unk_id) {
  BpeModel model;
  model.ignore_merges_ = ignore_merges;
  model.fallback_ = fallback;
  model.unk_id_ = unk_id;
  model.merges_.reserve(merges.size());
  for (size_t rank = 0; rank < merges.size(); ++rank) {
    const auto& [first, second] = merges[rank];
    const int32_t left = vocab.Find(first);
    const int32_t right = vocab.Find(second);
    const int32_t result = vocab.Find(morphserve::StrCat(first, second));
    if (left == kNoToken || right == kNoToken || result == kNoToken) {
      if (strict) {
        return absl::InvalidArgumentError(morphserve::StrCat(
            "merge ", rank, " ('", first, "' '", second, "') refers to text that is not a token"));
      }
      continue;
    }
    // The first (lowest-ranked) occurrence of a pair wins.
    model.merges_.emplace(Key(left, right), Merge{static_cast<int32_t>(rank), result});
  }
  for (int b = 0; b < 256; ++b) {
    model.byte_tokens_[b] = vocab.Find(absl::StrFormat("<0x%02X>", b));
  }
  return model;
}

void BpeModel::EmitFallback(const Vocab& vocab, std::string_view text,
                            std::vector<int32_t>* out) const {
  for (char c : text) {
    int32_t id;
    if (fallback_ == Fallback::kSingleByteTokens) {
      id = vocab.Find(std::string_view(&c, 1));
    } else {
      id = byte_tokens_[static_cast<uint8_t>(c)];
      if (id == kNoToken) id = unk_id_;
    }
    if (id != kNoToken) out->push_back(id);
  }
}

void BpeModel::Encode(const Vocab& vocab, std::string_view word, std::vector<int32_t>* out) const {
  if (word.empty()) return;
  if (ignore_merges_) {
    if (const int32_t id = vocab.Find(word); id != kNoToken) {
      out->push_back(id);
      return;
    }
  }

  std::vector<Symbol> symbols;
  symbols.reserve(word.size());
  for (size_t pos = 0; pos < word.size();) {
    const size_t len =
        std::min(unicode::Utf8SequenceLength(static_cast<uint8_t>(word[pos])), word.size() - pos);
    const int32_t index = static_cast<int32_t>(symbols.size());
    symbols.push_back(Symbol{static_cast<uint32_t>(pos), static_cast<uint32_t>(len),
                             vocab.Find(word.substr(pos, len)), index - 1,
                             pos + len == word.size() ? -1 : index + 1});
    pos += len;
  }

  std::vector<Candidate> storage;
  storage.reserve(symbols.size());
  std::priority_queue<Candidate, std::vector<Candidate>, CandidateAfter> queue(CandidateAfter{},
                                                                               std::move(storage));
  auto add_pair = [&](int32_t left, int32_t right) {
    if (left < 0 || right < 0) return;
    const Symbol& l = symbols[left];
    const Symbol& r = symbols[right];
    if (l.id == kNoToken || r.id == kNoToken) return;
    auto it = merges_.find(Key(l.id, r.id));
    if (it == merges_.end()) return;
    queue.push(Candidate{it->second.rank, left, right, l.id, r.id, it->second.result});
  };
  for (int32_t i = 1; i < static_cast<int32_t>(symbols.size()); ++i) add_pair(i - 1, i);

  while (!queue.empty()) {
    const Candidate c = queue.top();
    queue.pop();
    Symbol& l = symbols[c.left];
    Symbol& r = symbols[c.right];
    // Stale entry: one side has merged since it was queued.
    if (l.len == 0 || r.len == 0 || l.id != c.left_id || r.id != c.right_id) continue;
    l.len += r.len;
    l.id = c.result;
    r.len = 0;
    l.next = r.next;
    if (r.next >= 0) symbols[r.next].prev = c.left;
    add_pair(l.prev, c.left);
    add_pair(c.left, l.next);
  }

  for (int32_t i = 0; i != -1; i = symbols[i].next) {
    const Symbol& s = symbols[i];
    if (s.id != kNoToken) {
      out->push_back(s.id);
    } else {
      EmitFallback(vocab, word.substr(s.start, s.len), out);
    }
  }
}

}  // namespace morphserve::engine
