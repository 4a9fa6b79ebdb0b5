#include "tools/plot/png_writer.h"

#include <algorithm>
#include <array>
#include <cstddef>
#include <string_view>

#include "absl/status/status.h"
#include "absl/strings/str_format.h"

namespace morphserve::plot {
namespace {

// Largest payload of one stored deflate block (its length field is 16 bits).
constexpr size_t kMaxStoredBlock = 65535;

// Table for the reflected CRC-32 (polynomial 0xEDB88320) that PNG chunks use.
constexpr std::array<uint32_t, 256> MakeCrcTable() {
  std::array<uint32_t, 256> table{};
  for (uint32_t n = 0; n < 256; ++n) {
    uint32_t c = n;
    for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
    table[n] = c;
  }
  return table;
}
constexpr std::array<uint32_t, 256> kCrcTable = MakeCrcTable();

uint32_t Crc32(std::span<const uint8_t> bytes) {
  uint32_t c = 0xFFFFFFFFu;
  for (uint8_t b : bytes) c = kCrcTable[(c ^ b) & 0xFF] ^ (c >> 8);
  return c ^ 0xFFFFFFFFu;
}

uint32_t Adler32(std::span<const uint8_t> bytes) {
  constexpr uint32_t kMod = 65521;
  // 5552 is the most bytes that can be summed before b may overflow 32 bits,
  // so the modulo runs once per run instead of once per byte.
  constexpr size_t kRun = 5552;
  uint32_t a = 1, b = 0;
  for (size_t i = 0; i < bytes.size(); i += kRun) {
    const size_t end = std::min(bytes.size(), i + kRun);
    for (size_t j = i; j < end; ++j) {
      a += bytes[j];
      b += a;
    }
    a %= kMod;
    b %= kMod;
  }
  return (b << 16) | a;
}

void AppendBigEndian32(uint32_t v, std::vector<uint8_t>* out) {
  out->push_back(static_cast<uint8_t>(v >> 24));
  out->push_back(static_cast<uint8_t>(v >> 16));
  out->push_back(static_cast<uint8_t>(v >> 8));
  out->push_back(static_cast<uint8_t>(v));
}

// Appends a chunk: length, type, data, then the CRC of type and data.
void AppendChunk(std::string_view type, std::span<const uint8_t> data, std::vector<uint8_t>* out) {
  AppendBigEndian32(static_cast<uint32_t>(data.size()), out);
  const size_t crc_begin = out->size();
  out->insert(out->end(), type.begin(), type.end());
  out->insert(out->end(), data.begin(), data.end());
  AppendBigEndian32(Crc32(std::span(*out).subspan(crc_begin)), out);
}

// Wraps `raw` in a zlib stream made of stored deflate blocks.
std::vector<uint8_t> ZlibStored(std::span<const uint8_t> raw) {
  std::vector<uint8_t> out;
  out.reserve(raw.size() + raw.size() / kMaxStoredBlock * 5 + 16);
  // CMF: deflate with a 32 KiB window; FLG: no dictionary, "fastest" level,
  // check bits making 0x7801 a multiple of 31.
  out.push_back(0x78);
  out.push_back(0x01);
  size_t offset = 0;
  do {
    const size_t len = std::min(kMaxStoredBlock, raw.size() - offset);
    const bool final = offset + len == raw.size();
    // BFINAL in bit 0, BTYPE 00 (stored) in bits 1-2; the rest of the byte is
    // padding, since stored data starts on a byte boundary.
    out.push_back(final ? 1 : 0);
    const auto len16 = static_cast<uint16_t>(len);
    const auto nlen16 = static_cast<uint16_t>(~len16);
    out.push_back(static_cast<uint8_t>(len16 & 0xFF));
    out.push_back(static_cast<uint8_t>(len16 >> 8));
    out.push_back(static_cast<uint8_t>(nlen16 & 0xFF));
    out.push_back(static_cast<uint8_t>(nlen16 >> 8));
    out.insert(out.end(), raw.begin() + static_cast<ptrdiff_t>(offset),
               raw.begin() + static_cast<ptrdiff_t>(offset + len));
    offset += len;
  } while (offset < raw.size());
  AppendBigEndian32(Adler32(raw), &out);
  return out;
}

}  // namespace

absl::StatusOr<std::vector<uint8_t>> EncodeRgbPng(int width, int height,
                                                  std::span<const uint8_t> rgb) {
  if (width <= 0 || height <= 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("PNG size must be positive, got %dx%d", width, height));
  }
  const size_t row_bytes = static_cast<size_t>(width) * 3;
  if (rgb.size() != row_bytes * static_cast<size_t>(height)) {
    return absl::InvalidArgumentError(
        absl::StrFormat("PNG of %dx%d needs %d RGB bytes, got %d", width, height,
                        row_bytes * static_cast<size_t>(height), rgb.size()));
  }
  // A chunk's length field is 31 bits; one IDAT holds the whole image.
  constexpr size_t kMaxChunkBytes = 0x7FFFFFFF;
  const size_t raw_bytes = (row_bytes + 1) * static_cast<size_t>(height);
  if (raw_bytes + raw_bytes / kMaxStoredBlock * 5 + 16 > kMaxChunkBytes) {
    return absl::InvalidArgumentError(
        absl::StrFormat("PNG of %dx%d is too large for one IDAT chunk", width, height));
  }

  // Every scanline starts with its filter type. Filters only pay off when the
  // data is compressed afterwards, so every row uses 0 (None).
  std::vector<uint8_t> raw;
  raw.reserve(raw_bytes);
  for (size_t y = 0; y < static_cast<size_t>(height); ++y) {
    raw.push_back(0);
    const auto row = rgb.subspan(y * row_bytes, row_bytes);
    raw.insert(raw.end(), row.begin(), row.end());
  }

  std::vector<uint8_t> png = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1A, '\n'};
  std::vector<uint8_t> ihdr;
  AppendBigEndian32(static_cast<uint32_t>(width), &ihdr);
  AppendBigEndian32(static_cast<uint32_t>(height), &ihdr);
  // Bit depth 8, colour type 2 (RGB), deflate, adaptive filtering, no
  // interlace.
  ihdr.insert(ihdr.end(), {8, 2, 0, 0, 0});
  AppendChunk("IHDR", ihdr, &png);
  AppendChunk("IDAT", ZlibStored(raw), &png);
  AppendChunk("IEND", {}, &png);
  return png;
}

}  // namespace morphserve::plot
