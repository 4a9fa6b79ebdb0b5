// The packed layout of the block-32 weight types (WeightLayout::kPacked).
//
// A packed matrix is a sequence of tiles: for each group g of kPackRows rows,
// for each block b of 32 columns, one tile holding block b of rows 8g..8g+7
// (zeros past the last row). Inside a tile the quants are arranged for the
// x86 kernels: 16-bit lane 2i + e of "pair vector" p (p in [0, 16)) holds
// element 2p + e of row i, so that one vector times a broadcast pair of
// activations (elements 2p, 2p + 1) adds to all eight rows at once.
//   Q4/Q5: qs[16h + 2i + e] holds pair vector h in its low nibble and pair
//          vector h + 8 in its high nibble (h in [0, 8));
//   Q5:    bit 2i + e of qh[p] is the fifth bit of pair vector p's lane;
//   Q8:    qs[16p + 2i + e] is lane 2i + e of pair vector p.
// The scales stay f16, so a tile has the bytes of the eight blocks it holds.
#ifndef MORPHSERVE_KERNELS_CPU_PACKED_BLOCKS_H_
#define MORPHSERVE_KERNELS_CPU_PACKED_BLOCKS_H_

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "kernels/cpu/matmul.h"
#include "kernels/cpu/quant_blocks.h"

namespace morphserve::kernels {

inline constexpr int kPackGroup = static_cast<int>(kPackRows);
inline constexpr int kPairs = kQK / 2;  // pair vectors per tile

struct PackedQ4_0 {
  uint16_t d[kPackGroup];
  uint8_t qs[kPackGroup * kQK / 2];
};

struct PackedQ4_1 {
  uint16_t d[kPackGroup];
  uint16_t m[kPackGroup];
  uint8_t qs[kPackGroup * kQK / 2];
};

struct PackedQ5_0 {
  uint16_t d[kPackGroup];
  uint16_t qh[kPairs];
  uint8_t qs[kPackGroup * kQK / 2];
};

struct PackedQ5_1 {
  uint16_t d[kPackGroup];
  uint16_t m[kPackGroup];
  uint16_t qh[kPairs];
  uint8_t qs[kPackGroup * kQK / 2];
};

struct PackedQ8_0 {
  uint16_t d[kPackGroup];
  int8_t qs[kPackGroup * kQK];
};

static_assert(sizeof(PackedQ4_0) == kPackGroup * sizeof(BlockQ4_0));
static_assert(sizeof(PackedQ4_1) == kPackGroup * sizeof(BlockQ4_1));
static_assert(sizeof(PackedQ5_0) == kPackGroup * sizeof(BlockQ5_0));
static_assert(sizeof(PackedQ5_1) == kPackGroup * sizeof(BlockQ5_1));
static_assert(sizeof(PackedQ8_0) == kPackGroup * sizeof(BlockQ8_0));

// The tile type of each block type, and what its quants mean:
// value = d * (q - kOffset) [+ m].
template <typename TileType, int kOffsetValue>
struct PackedTraits {
  using Tile = TileType;
  static constexpr int kOffset = kOffsetValue;
};
template <typename Block>
struct PackedOf;
template <>
struct PackedOf<BlockQ4_0> : PackedTraits<PackedQ4_0, 8> {};
template <>
struct PackedOf<BlockQ4_1> : PackedTraits<PackedQ4_1, 0> {};
template <>
struct PackedOf<BlockQ5_0> : PackedTraits<PackedQ5_0, 16> {};
template <>
struct PackedOf<BlockQ5_1> : PackedTraits<PackedQ5_1, 0> {};
template <>
struct PackedOf<BlockQ8_0> : PackedTraits<PackedQ8_0, 0> {};

template <typename Tile>
inline constexpr bool kTileHasMin =
    std::is_same_v<Tile, PackedQ4_1> || std::is_same_v<Tile, PackedQ5_1>;
template <typename Tile>
inline constexpr bool kTileHasHighBits =
    std::is_same_v<Tile, PackedQ5_0> || std::is_same_v<Tile, PackedQ5_1>;

// Element k of row i of a tile as stored (before the offset): the nibble
// plus its fifth bit, or the signed byte.
template <typename Tile>
inline int PackedQuant(const Tile& tile, int i, int k) {
  const int p = k / 2;
  const int lane = 2 * i + k % 2;
  if constexpr (std::is_same_v<Tile, PackedQ8_0>) {
    return tile.qs[kPackGroup * 2 * p + lane];
  } else {
    const uint8_t byte = tile.qs[kPackGroup * 2 * (p % 8) + lane];
    int q = p < 8 ? byte & 15 : byte >> 4;
    if constexpr (kTileHasHighBits<Tile>) q |= ((tile.qh[p] >> lane) & 1) << 4;
    return q;
  }
}

}  // namespace morphserve::kernels

#endif  // MORPHSERVE_KERNELS_CPU_PACKED_BLOCKS_H_
