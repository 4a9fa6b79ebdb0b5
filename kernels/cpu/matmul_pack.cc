// PackWeights: rewrites block-32 weight rows into the tiles of
// packed_blocks.h. Runs once per matrix at model load.
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "common/fp16.h"
#include "kernels/cpu/matmul.h"
#include "kernels/cpu/packed_blocks.h"
#include "kernels/cpu/quant_blocks.h"

namespace morphserve::kernels {
namespace {

// The quants of a row-layout block as stored (before the offset).
void StoredQuants(const BlockQ4_0& b, int* q) { UnpackNibbles(b.qs, 0, q); }
void StoredQuants(const BlockQ4_1& b, int* q) { UnpackNibbles(b.qs, 0, q); }
void StoredQuants(const BlockQ5_0& b, int* q) {
  UnpackNibbles(b.qs, 0, q);
  AddHighBits(b.qh, q);
}
void StoredQuants(const BlockQ5_1& b, int* q) {
  UnpackNibbles(b.qs, 0, q);
  AddHighBits(b.qh, q);
}
void StoredQuants(const BlockQ8_0& b, int* q) {
  for (int k = 0; k < kQK; ++k) q[k] = b.qs[k];
}

// Stores element k of row i of a tile: the inverse of PackedQuant.
template <typename Tile>
void SetPackedQuant(Tile& tile, int i, int k, int q) {
  const int p = k / 2;
  const int lane = 2 * i + k % 2;
  if constexpr (std::is_same_v<Tile, PackedQ8_0>) {
    tile.qs[kPackGroup * 2 * p + lane] = static_cast<int8_t>(q);
  } else {
    uint8_t& byte = tile.qs[kPackGroup * 2 * (p % 8) + lane];
    byte = static_cast<uint8_t>(p < 8 ? (byte & 0xF0) | (q & 15) : (byte & 0x0F) | (q & 15) << 4);
    if constexpr (kTileHasHighBits<Tile>) {
      tile.qh[p] = static_cast<uint16_t>(tile.qh[p] | ((q >> 4) & 1) << lane);
    }
  }
}

// Packs groups [g0, g1).
template <typename Block>
void Pack(const void* w, size_t w_row_bytes, int64_t rows, int64_t cols, void* out, int64_t g0,
          int64_t g1) {
  using Tile = typename PackedOf<Block>::Tile;
  const int64_t nb = cols / kQK;
  auto* tiles = static_cast<Tile*>(out);
  for (int64_t g = g0; g < g1; ++g) {
    for (int64_t b = 0; b < nb; ++b) {
      Tile& tile = tiles[g * nb + b];
      std::memset(&tile, 0, sizeof(tile));  // rows past the end stay zero
      for (int i = 0; i < kPackGroup; ++i) {
        const int64_t r = g * kPackRows + i;
        if (r >= rows) break;
        const auto* row = reinterpret_cast<const Block*>(static_cast<const char*>(w) +
                                                         static_cast<size_t>(r) * w_row_bytes);
        const Block& blk = row[b];
        tile.d[i] = blk.d;
        if constexpr (kTileHasMin<Tile>) tile.m[i] = blk.m;
        int q[kQK];
        StoredQuants(blk, q);
        for (int k = 0; k < kQK; ++k) SetPackedQuant(tile, i, k, q[k]);
      }
    }
  }
}

// The same arithmetic as DequantizeRow: d * (q - offset) [+ m] in f32.
template <typename Block>
void UnpackRow(const void* packed, int64_t cols, int64_t r, float* out) {
  using Tile = typename PackedOf<Block>::Tile;
  const int64_t nb = cols / kQK;
  const Tile* tiles = static_cast<const Tile*>(packed) + (r / kPackRows) * nb;
  const int i = static_cast<int>(r % kPackRows);
  for (int64_t b = 0; b < nb; ++b, out += kQK) {
    const Tile& tile = tiles[b];
    const float d = HalfToFloat(tile.d[i]);
    for (int k = 0; k < kQK; ++k) {
      const auto q = static_cast<float>(PackedQuant(tile, i, k) - PackedOf<Block>::kOffset);
      if constexpr (kTileHasMin<Tile>) {
        out[k] = d * q + HalfToFloat(tile.m[i]);
      } else {
        out[k] = d * q;
      }
    }
  }
}

using PackFn = void (*)(const void*, size_t, int64_t, int64_t, void*, int64_t, int64_t);
using UnpackRowFn = void (*)(const void*, int64_t, int64_t, float*);

struct Packer {
  size_t tile_bytes = 0;  // 0: no packed layout
  PackFn pack = nullptr;
  UnpackRowFn unpack_row = nullptr;
};

template <typename Block>
constexpr Packer PackerOf() {
  return {sizeof(typename PackedOf<Block>::Tile), Pack<Block>, UnpackRow<Block>};
}

Packer PackerFor(DType type) {
  switch (type) {
    case DType::kQ4_0:
      return PackerOf<BlockQ4_0>();
    case DType::kQ4_1:
      return PackerOf<BlockQ4_1>();
    case DType::kQ5_0:
      return PackerOf<BlockQ5_0>();
    case DType::kQ5_1:
      return PackerOf<BlockQ5_1>();
    case DType::kQ8_0:
      return PackerOf<BlockQ8_0>();
    default:
      return {};
  }
}

}  // namespace

bool CanPackWeights(DType type) { return PackerFor(type).pack != nullptr; }

size_t PackedWeightBytes(DType type, int64_t rows, int64_t cols) {
  const int64_t groups = (rows + kPackRows - 1) / kPackRows;
  return static_cast<size_t>(groups * (cols / kQK)) * PackerFor(type).tile_bytes;
}

void PackWeights(DType type, const void* w, size_t w_row_bytes, int64_t rows, int64_t cols,
                 void* out, ThreadPool* pool) {
  const PackFn pack = PackerFor(type).pack;
  if (pack == nullptr) std::abort();  // CanPackWeights is checked first
  const int64_t groups = (rows + kPackRows - 1) / kPackRows;
  ParallelFor(pool, groups, 64,
              [&](int64_t g0, int64_t g1) { pack(w, w_row_bytes, rows, cols, out, g0, g1); });
}

void DequantizePackedRow(DType type, const void* packed, int64_t cols, int64_t r, float* out) {
  const UnpackRowFn unpack = PackerFor(type).unpack_row;
  if (unpack == nullptr) std::abort();  // CanPackWeights is checked first
  unpack(packed, cols, r, out);
}

}  // namespace morphserve::kernels
