#include "engine/tokenizer/spm_model.h"

#include <queue>

#include "absl/strings/str_format.h"
#include "engine/tokenizer/unicode.h"

namespace morphserve::engine {
namespace {

struct Symbol {
  uint32_t start;
  uint32_t len;  // 0 once merged into its left neighbour
  int32_t prev;
  int32_t next;
};

struct Bigram {
  float score;
  int32_t left;
  int32_t right;
  uint32_t len;  // byte length of the merged text when queued
};

// Highest score first, then leftmost.
struct BigramBefore {
  bool operator()(const Bigram& a, const Bigram& b) const {
    return a.score < b.score || (a.score == b.score && a.left > b.left);
  }
};

}  // namespace

SpmModel SpmModel::Create(const Vocab& vocab, int32_t unk_id) {
  SpmModel model;
  for (int b = 0; b < 256; ++b) {
    int32_t id = vocab.Find(absl::StrFormat("<0x%02X>", b));
    if (id == kNoToken) {
      const char c = static_cast<char>(b);
      id = vocab.Find(std::string_view(&c, 1));
    }
    model.byte_tokens_[b] = id == kNoToken ? unk_id : id;
  }
  return model;
}

void SpmModel::Encode(const Vocab& vocab, std::string_view text, std::vector<int32_t>* out) const {
  std::vector<Symbol> symbols;
  symbols.reserve(text.size());
  for (size_t pos = 0; pos < text.size();) {
    const size_t len =
        std::min(unicode::Utf8SequenceLength(static_cast<uint8_t>(text[pos])), text.size() - pos);
    const int32_t index = static_cast<int32_t>(symbols.size());
    symbols.push_back(Symbol{static_cast<uint32_t>(pos), static_cast<uint32_t>(len), index - 1,
                             pos + len == text.size() ? -1 : index + 1});
    pos += len;
  }
  if (symbols.empty()) return;

  std::priority_queue<Bigram, std::vector<Bigram>, BigramBefore> queue;
  auto add_bigram = [&](int32_t left, int32_t right) {
    if (left < 0 || right < 0) return;
    // Adjacent live symbols are contiguous in the text.
    const uint32_t len = symbols[left].len + symbols[right].len;
    const int32_t id = vocab.Find(text.substr(symbols[left].start, len));
    if (id == kNoToken) return;
    queue.push(Bigram{vocab[id].score, left, right, len});
  };
  for (int32_t i = 1; i < static_cast<int32_t>(symbols.size()); ++i) add_bigram(i - 1, i);

  while (!queue.empty()) {
    const Bigram b = queue.top();
    queue.pop();
    Symbol& l = symbols[b.left];
    Symbol& r = symbols[b.right];
    if (l.len == 0 || r.len == 0 || l.len + r.len != b.len) continue;
    l.len += r.len;
    r.len = 0;
    l.next = r.next;
    if (r.next >= 0) symbols[r.next].prev = b.left;
    add_bigram(l.prev, b.left);
    add_bigram(b.left, l.next);
  }

  // Every merged symbol is a token by construction, so a symbol that is not
  // one is a single unmatched character: it falls back to its bytes.
  for (int32_t i = 0; i != -1; i = symbols[i].next) {
    const std::string_view piece = text.substr(symbols[i].start, symbols[i].len);
    const int32_t id = vocab.Find(piece);
    if (id != kNoToken) {
      out->push_back(id);
      continue;
    }
    for (char c : piece) {
      const int32_t byte_id = byte_tokens_[static_cast<uint8_t>(c)];
      if (byte_id != kNoToken) out->push_back(byte_id);
    }
  }
}

}  // namespace morphserve::engine
