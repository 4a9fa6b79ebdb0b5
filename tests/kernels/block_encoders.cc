#include "tests/kernels/block_encoders.h"

#include <cstdlib>
#include <cstring>

#include "common/fp16.h"

namespace morphserve::kernels::testing {
namespace {

void PutHalf(uint8_t* out, uint16_t h) {
  out[0] = static_cast<uint8_t>(h & 0xff);
  out[1] = static_cast<uint8_t>(h >> 8);
}

// Nibble j of 32 in the low half of byte j, nibble j + 16 in its high half.
void PutNibbles32(const int* q, uint8_t* qs) {
  for (int j = 0; j < 16; ++j) qs[j] = static_cast<uint8_t>((q[j] & 15) | ((q[j + 16] & 15) << 4));
}

// Bit 4 of quant j as bit j of a little-endian 32-bit word.
void PutHighBits32(const int* q, uint8_t* qh) {
  uint32_t bits = 0;
  for (int j = 0; j < 32; ++j) bits |= static_cast<uint32_t>((q[j] >> 4) & 1) << j;
  for (int i = 0; i < 4; ++i) qh[i] = static_cast<uint8_t>(bits >> (8 * i));
}

// Twelve bytes: scales 0-3 and mins 0-3 in the low 6 bits of bytes 0-3 and
// 4-7; scales and mins 4-7 split into low nibbles (bytes 8-11, scale low /
// min high) and their top two bits in bits 6-7 of bytes 0-3 and 4-7.
void PutScalesK(const std::vector<int>& sc, const std::vector<int>& mins, uint8_t* s) {
  for (int j = 0; j < 4; ++j) {
    s[j] = static_cast<uint8_t>((sc[j] & 63) | ((sc[j + 4] >> 4) << 6));
    s[j + 4] = static_cast<uint8_t>((mins[j] & 63) | ((mins[j + 4] >> 4) << 6));
    s[j + 8] = static_cast<uint8_t>((sc[j + 4] & 15) | ((mins[j + 4] & 15) << 4));
  }
}

}  // namespace

void EncodeBlock(DType type, const BlockContent& c, uint8_t* out) {
  const int* q = c.q.data();
  switch (type) {
    case DType::kQ4_0:
      PutHalf(out, c.d);
      PutNibbles32(q, out + 2);
      return;
    case DType::kQ4_1:
      PutHalf(out, c.d);
      PutHalf(out + 2, c.m);
      PutNibbles32(q, out + 4);
      return;
    case DType::kQ5_0:
      PutHalf(out, c.d);
      PutHighBits32(q, out + 2);
      PutNibbles32(q, out + 6);
      return;
    case DType::kQ5_1:
      PutHalf(out, c.d);
      PutHalf(out + 2, c.m);
      PutHighBits32(q, out + 4);
      PutNibbles32(q, out + 8);
      return;
    case DType::kQ8_0:
      PutHalf(out, c.d);
      for (int j = 0; j < 32; ++j) out[2 + j] = static_cast<uint8_t>(static_cast<int8_t>(q[j]));
      return;
    case DType::kQ4_K:
    case DType::kQ5_K: {
      PutHalf(out, c.d);
      PutHalf(out + 2, c.m);
      PutScalesK(c.sc, c.mins, out + 4);
      uint8_t* qh = out + 16;
      uint8_t* qs = type == DType::kQ5_K ? out + 48 : out + 16;
      if (type == DType::kQ5_K) std::memset(qh, 0, 32);
      // Chunk k of 64: low nibbles of 32 bytes hold elements 64k..64k+31,
      // high nibbles 64k+32..64k+63; fifth bits in bits 2k, 2k+1 of qh.
      for (int k = 0; k < 4; ++k) {
        for (int l = 0; l < 32; ++l) {
          const int lo = q[64 * k + l];
          const int hi = q[64 * k + 32 + l];
          qs[32 * k + l] = static_cast<uint8_t>((lo & 15) | ((hi & 15) << 4));
          if (type == DType::kQ5_K) {
            qh[l] = static_cast<uint8_t>(qh[l] | (((lo >> 4) & 1) << (2 * k)) |
                                         (((hi >> 4) & 1) << (2 * k + 1)));
          }
        }
      }
      return;
    }
    case DType::kQ6_K: {
      // Per half of 128: ql[64] low nibbles, qh[32] two-bit pairs; within a
      // half, element 32i + l (i < 4) has its low nibble in ql[l + 32 (i & 1)]
      // (high half of the byte for i >= 2) and its top bits at qh[l] bits 2i.
      uint8_t* ql = out;
      uint8_t* qh = out + 128;
      std::memset(out, 0, 192);
      for (int h = 0; h < 2; ++h) {
        for (int i = 0; i < 4; ++i) {
          for (int l = 0; l < 32; ++l) {
            const int v = q[128 * h + 32 * i + l];
            uint8_t& low = ql[64 * h + l + 32 * (i & 1)];
            low = static_cast<uint8_t>(low | ((v & 15) << (i >= 2 ? 4 : 0)));
            uint8_t& top = qh[32 * h + l];
            top = static_cast<uint8_t>(top | ((v >> 4) << (2 * i)));
          }
        }
      }
      for (int g = 0; g < 16; ++g) {
        out[192 + g] = static_cast<uint8_t>(static_cast<int8_t>(c.sc[g]));
      }
      PutHalf(out + 208, c.d);
      return;
    }
    default:
      std::abort();
  }
}

std::vector<double> BlockValues(DType type, const BlockContent& c) {
  const double d = HalfToFloat(c.d);
  const double m = HalfToFloat(c.m);
  std::vector<double> v(c.q.size());
  for (size_t j = 0; j < c.q.size(); ++j) {
    const double q = c.q[j];
    switch (type) {
      case DType::kQ4_0:
        v[j] = d * (q - 8);
        break;
      case DType::kQ5_0:
        v[j] = d * (q - 16);
        break;
      case DType::kQ4_1:
      case DType::kQ5_1:
        v[j] = d * q + m;
        break;
      case DType::kQ8_0:
        v[j] = d * q;
        break;
      case DType::kQ4_K:
      case DType::kQ5_K:
        v[j] = d * c.sc[j / 32] * q - m * c.mins[j / 32];
        break;
      case DType::kQ6_K:
        v[j] = d * c.sc[j / 16] * (q - 32);
        break;
      default:
        std::abort();
    }
  }
  return v;
}

BlockContent RandomBlock(DType type, float magnitude, std::mt19937& rng) {
  const DTypeInfo& info = GetDTypeInfo(type);
  auto uniform_int = [&](int lo, int hi) {
    return std::uniform_int_distribution<int>(lo, hi)(rng);
  };
  auto uniform = [&](float lo, float hi) {
    return std::uniform_real_distribution<float>(lo, hi)(rng);
  };
  BlockContent c;
  c.q.resize(static_cast<size_t>(info.block_elems));
  int q_lo = 0;
  int q_hi = 15;
  float d = magnitude / 8.0f;
  switch (type) {
    case DType::kQ5_0:
    case DType::kQ5_1:
      q_hi = 31;
      d = magnitude / 16.0f;
      break;
    case DType::kQ8_0:
      q_lo = -128;
      q_hi = 127;
      d = magnitude / 128.0f;
      break;
    case DType::kQ4_K:
      d = magnitude / (8.0f * 63.0f);
      break;
    case DType::kQ5_K:
      q_hi = 31;
      d = magnitude / (16.0f * 63.0f);
      break;
    case DType::kQ6_K:
      q_hi = 63;
      d = magnitude / (32.0f * 127.0f);
      break;
    default:
      break;
  }
  for (int& q : c.q) q = uniform_int(q_lo, q_hi);
  c.d = FloatToHalf(d * uniform(0.25f, 1.0f));
  c.m = FloatToHalf(magnitude * uniform(-1.0f, 0.5f));
  if (type == DType::kQ4_K || type == DType::kQ5_K) {
    c.m = FloatToHalf(magnitude / 63.0f * uniform(0.0f, 1.0f));
    for (int s = 0; s < 8; ++s) {
      c.sc.push_back(uniform_int(0, 63));
      c.mins.push_back(uniform_int(0, 63));
    }
  }
  if (type == DType::kQ6_K) {
    for (int g = 0; g < 16; ++g) c.sc.push_back(uniform_int(-128, 127));
  }
  return c;
}

std::vector<uint8_t> RandomMatrix(DType type, int64_t rows, int64_t cols, std::mt19937& rng) {
  const DTypeInfo& info = GetDTypeInfo(type);
  std::vector<uint8_t> out(RowBytes(type, cols) * static_cast<size_t>(rows));
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  const int64_t n_blocks = rows * cols / info.block_elems;
  for (int64_t i = 0; i < n_blocks; ++i) {
    uint8_t* p = out.data() + i * info.block_bytes;
    switch (type) {
      case DType::kF32: {
        const float v = uniform(rng);
        std::memcpy(p, &v, sizeof(v));
        break;
      }
      case DType::kF16:
        PutHalf(p, FloatToHalf(uniform(rng)));
        break;
      case DType::kBF16:
        PutHalf(p, FloatToBF16(uniform(rng)));
        break;
      default:
        EncodeBlock(type, RandomBlock(type, 1.0f, rng), p);
        break;
    }
  }
  return out;
}

}  // namespace morphserve::kernels::testing
