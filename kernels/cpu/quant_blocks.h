// GGML block layouts of the quantized weight types (as stored in GGUF files)
// and the 16-bit activation rows that MatMul quantizes its input into.
//
// Half-precision fields are kept as raw uint16_t bits; every block size is
// even, so blocks inside a 2-byte aligned row are naturally aligned.
#ifndef MORPHSERVE_KERNELS_CPU_QUANT_BLOCKS_H_
#define MORPHSERVE_KERNELS_CPU_QUANT_BLOCKS_H_

#include <cstdint>
#include <cstring>

namespace morphserve::kernels {

inline constexpr int kQK = 32;    // elements per block of the Q4_0..Q8_0 types
inline constexpr int kQKK = 256;  // elements per K-quant super-block

// value[j] = d * (nibble[j] - 8); nibble j < 16 is the low half of qs[j],
// nibble j + 16 the high half of qs[j].
struct BlockQ4_0 {
  uint16_t d;
  uint8_t qs[kQK / 2];
};

// value[j] = d * nibble[j] + m.
struct BlockQ4_1 {
  uint16_t d;
  uint16_t m;
  uint8_t qs[kQK / 2];
};

// value[j] = d * (q[j] - 16); the fifth bit of q[j] is bit j of qh (read as
// a little-endian uint32), the low four bits as in Q4_0.
struct BlockQ5_0 {
  uint16_t d;
  uint8_t qh[4];
  uint8_t qs[kQK / 2];
};

// value[j] = d * q[j] + m, q[j] as in Q5_0.
struct BlockQ5_1 {
  uint16_t d;
  uint16_t m;
  uint8_t qh[4];
  uint8_t qs[kQK / 2];
};

// value[j] = d * qs[j].
struct BlockQ8_0 {
  uint16_t d;
  int8_t qs[kQK];
};

// Eight sub-blocks of 32: value = d * sc[s] * q - dmin * m[s], with 6-bit sc
// and m packed in `scales` (see UnpackScalesK4). qs holds 4 chunks of 64
// elements: the low nibbles of 32 bytes, then their high nibbles.
struct BlockQ4K {
  uint16_t d;
  uint16_t dmin;
  uint8_t scales[12];
  uint8_t qs[kQKK / 2];
};

// Q4_K plus a fifth bit per element: for chunk c (64 elements), bit 2c of
// qh[l] belongs to element 64c + l, bit 2c + 1 to element 64c + 32 + l.
struct BlockQ5K {
  uint16_t d;
  uint16_t dmin;
  uint8_t scales[12];
  uint8_t qh[kQKK / 8];
  uint8_t qs[kQKK / 2];
};

// Sixteen groups of 16: value = d * scales[g] * (q - 32), q 6 bits. In each
// half of 128 elements (ql + 64h, qh + 32h), for l < 32:
//   q[l]      = ql[l] & 15      | (qh[l] & 3) << 4
//   q[l + 32] = ql[l + 32] & 15 | (qh[l] >> 2 & 3) << 4
//   q[l + 64] = ql[l] >> 4      | (qh[l] >> 4 & 3) << 4
//   q[l + 96] = ql[l + 32] >> 4 | (qh[l] >> 6) << 4
struct BlockQ6K {
  uint8_t ql[kQKK / 2];
  uint8_t qh[kQKK / 4];
  int8_t scales[kQKK / 16];
  uint16_t d;
};

// The block_bytes of GetDTypeInfo (not constexpr; the tests compare them).
static_assert(sizeof(BlockQ4_0) == 18);
static_assert(sizeof(BlockQ4_1) == 20);
static_assert(sizeof(BlockQ5_0) == 22);
static_assert(sizeof(BlockQ5_1) == 24);
static_assert(sizeof(BlockQ8_0) == 34);
static_assert(sizeof(BlockQ4K) == 144);
static_assert(sizeof(BlockQ5K) == 176);
static_assert(sizeof(BlockQ6K) == 210);

// The nibbles of a Q4_0..Q5_1 block as integers, `offset` subtracted:
// q[j] for element j (low nibbles are elements 0..15, high ones 16..31).
inline void UnpackNibbles(const uint8_t* qs, int offset, int* q) {
  for (int j = 0; j < kQK / 2; ++j) {
    q[j] = (qs[j] & 15) - offset;
    q[j + kQK / 2] = (qs[j] >> 4) - offset;
  }
}

// Adds a Q5_0/Q5_1 block's fifth bits (bit j of qh, little-endian) to q.
inline void AddHighBits(const uint8_t* qh_bytes, int* q) {
  uint32_t qh;
  std::memcpy(&qh, qh_bytes, sizeof(qh));
  for (int j = 0; j < kQK; ++j) q[j] += static_cast<int>(((qh >> j) & 1u) << 4);
}

// The 6-bit scales and mins of the eight sub-blocks of a Q4_K/Q5_K block.
inline void UnpackScalesK4(const uint8_t* s, uint8_t* sc, uint8_t* m) {
  for (int j = 0; j < 4; ++j) {
    sc[j] = s[j] & 63;
    m[j] = s[j + 4] & 63;
  }
  for (int j = 4; j < 8; ++j) {
    sc[j] = static_cast<uint8_t>((s[j + 4] & 15) | ((s[j - 4] >> 6) << 4));
    m[j] = static_cast<uint8_t>((s[j + 4] >> 4) | ((s[j] >> 6) << 4));
  }
}

// A quantized activation row of n elements (a multiple of 32) is n int16
// values x[j] ~= d * q[j], then one scale record per block: ActScale32 per
// 32 elements for the Q4_0..Q8_0 weights, ActScaleK per 256 for the
// K-quants. Rows start 64-byte aligned, so every block of values does too.
inline constexpr int kActMax = 32767;  // |q| <= kActMax

struct ActScale32 {
  float d;
  float sum;  // d * sum(q), for the weight types with a min
};

struct ActScaleK {
  float d;
  int32_t sums[kQKK / 32];  // sum(q) over each sub-block of 32, for the mins
};

template <typename Scale>
inline Scale* ActScales(void* row, int64_t n) {
  return reinterpret_cast<Scale*>(static_cast<int16_t*>(row) + n);
}
template <typename Scale>
inline const Scale* ActScales(const void* row, int64_t n) {
  return reinterpret_cast<const Scale*>(static_cast<const int16_t*>(row) + n);
}

// 1 / d for a block of largest magnitude `amax`: q = nearbyint(x * id) then
// has |q| <= kActMax, since amax * id stays within a few ulps of kActMax.
// Blocks below kActTiny quantize to zero: kActMax / amax would overflow near
// 1e-35, and such values vanish next to any other activation anyway.
inline constexpr float kActTiny = 1e-30f;
inline float ActInverseScale(float amax) {
  return amax >= kActTiny ? static_cast<float>(kActMax) / amax : 0.0f;
}

}  // namespace morphserve::kernels

#endif  // MORPHSERVE_KERNELS_CPU_QUANT_BLOCKS_H_
