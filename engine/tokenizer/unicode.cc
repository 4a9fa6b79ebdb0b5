#include "engine/tokenizer/unicode.h"

#include <algorithm>
#include <array>
#include <iterator>

namespace morphserve::engine::unicode {
namespace {

struct FlagRange {
  uint32_t first;
  uint32_t last;
  uint8_t flags;
};

constexpr FlagRange kFlagRanges[] = {
#include "engine/tokenizer/unicode_tables.inc"
};

constexpr uint32_t kBmpSize = 0x10000;
constexpr uint32_t kMaxCodePoint = 0x10FFFF;

// The Basic Multilingual Plane is expanded into a flat table once, so the
// common case is one load; rarer planes fall back to a binary search.
const std::array<uint8_t, kBmpSize>& BmpFlags() {
  static const std::array<uint8_t, kBmpSize>* const table = [] {
    auto* t = new std::array<uint8_t, kBmpSize>{};
    for (const FlagRange& r : kFlagRanges) {
      if (r.first >= kBmpSize) break;
      const uint32_t last = std::min(r.last, kBmpSize - 1);
      for (uint32_t cp = r.first; cp <= last; ++cp) (*t)[cp] = r.flags;
    }
    return t;
  }();
  return *table;
}

uint8_t SearchFlags(uint32_t cp) {
  const auto* it = std::upper_bound(std::begin(kFlagRanges), std::end(kFlagRanges), cp,
                                    [](uint32_t v, const FlagRange& r) { return v < r.first; });
  if (it == std::begin(kFlagRanges)) return 0;
  --it;
  return cp <= it->last ? it->flags : 0;
}

// Byte-level alphabet tables, built once.
struct ByteLevelTables {
  std::array<std::string, 256> byte_to_utf8;
  std::array<int16_t, 324> cp_to_byte;  // the alphabet's code points all lie below 324
};

const ByteLevelTables& GetByteLevelTables() {
  static const ByteLevelTables* const tables = [] {
    auto* t = new ByteLevelTables();
    t->cp_to_byte.fill(-1);
    auto printable = [](int b) {
      return (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
    };
    int next = 256;
    for (int b = 0; b < 256; ++b) {
      const int cp = printable(b) ? b : next++;
      AppendUtf8(static_cast<uint32_t>(cp), &t->byte_to_utf8[b]);
      t->cp_to_byte[cp] = static_cast<int16_t>(b);
    }
    return t;
  }();
  return *tables;
}

}  // namespace

uint8_t CodePointFlags(uint32_t cp) {
  if (cp < kBmpSize) return BmpFlags()[cp];
  return SearchFlags(cp);
}

size_t Utf8SequenceLength(uint8_t lead) {
  static constexpr uint8_t kLengths[16] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4};
  return kLengths[lead >> 4];
}

std::vector<uint32_t> DecodeUtf8Lenient(std::string_view text) {
  std::vector<uint32_t> cps;
  cps.reserve(text.size());
  const auto byte = [&](size_t i) { return static_cast<uint8_t>(text[i]); };
  const auto is_cont = [&](size_t i) { return i < text.size() && (byte(i) & 0xC0) == 0x80; };
  size_t i = 0;
  while (i < text.size()) {
    const uint8_t b = byte(i);
    uint32_t cp = kReplacementChar;
    size_t len = 1;
    if (b < 0x80) {
      cp = b;
    } else if ((b & 0xE0) == 0xC0 && is_cont(i + 1)) {
      cp = (uint32_t{b} & 0x1F) << 6 | (byte(i + 1) & 0x3F);
      len = 2;
    } else if ((b & 0xF0) == 0xE0 && is_cont(i + 1) && is_cont(i + 2)) {
      cp = (uint32_t{b} & 0x0F) << 12 | (byte(i + 1) & 0x3Fu) << 6 | (byte(i + 2) & 0x3F);
      len = 3;
    } else if ((b & 0xF8) == 0xF0 && is_cont(i + 1) && is_cont(i + 2) && is_cont(i + 3)) {
      cp = (uint32_t{b} & 0x07) << 18 | (byte(i + 1) & 0x3Fu) << 12 | (byte(i + 2) & 0x3Fu) << 6 |
           (byte(i + 3) & 0x3F);
      len = 4;
      // Lead bytes F5..F7 encode values Unicode does not have.
      if (cp > kMaxCodePoint) {
        cp = kReplacementChar;
        len = 1;
      }
    }
    cps.push_back(cp);
    i += len;
  }
  return cps;
}

void AppendUtf8(uint32_t cp, std::string* out) {
  if (cp > kMaxCodePoint) cp = kReplacementChar;
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

bool IsValidUtf8(std::string_view text) {
  size_t i = 0;
  while (i < text.size()) {
    const uint8_t b = static_cast<uint8_t>(text[i]);
    if (b < 0x80) {
      ++i;
      continue;
    }
    size_t need;
    uint8_t lower = 0x80;
    uint8_t upper = 0xBF;
    if (b >= 0xC2 && b <= 0xDF) {
      need = 1;
    } else if (b >= 0xE0 && b <= 0xEF) {
      need = 2;
      if (b == 0xE0) lower = 0xA0;
      if (b == 0xED) upper = 0x9F;
    } else if (b >= 0xF0 && b <= 0xF4) {
      need = 3;
      if (b == 0xF0) lower = 0x90;
      if (b == 0xF4) upper = 0x8F;
    } else {
      return false;
    }
    if (text.size() - i - 1 < need) return false;
    for (size_t k = 1; k <= need; ++k) {
      const uint8_t c = static_cast<uint8_t>(text[i + k]);
      if (c < lower || c > upper) return false;
      lower = 0x80;
      upper = 0xBF;
    }
    i += need + 1;
  }
  return true;
}

std::string_view ByteToUnicode(uint8_t byte) { return GetByteLevelTables().byte_to_utf8[byte]; }

std::optional<uint8_t> UnicodeToByte(uint32_t cp) {
  const auto& map = GetByteLevelTables().cp_to_byte;
  if (cp >= map.size() || map[cp] < 0) return std::nullopt;
  return static_cast<uint8_t>(map[cp]);
}

}  // namespace morphserve::engine::unicode
