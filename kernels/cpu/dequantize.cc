// Reference dequantizers: plain scalar code written to mirror the block
// layout comments in quant_blocks.h, used by MatMulReference and loaders.
#include "kernels/cpu/dequantize.h"

#include <cstdlib>
#include <cstring>

#include "common/fp16.h"
#include "kernels/cpu/quant_blocks.h"

namespace morphserve::kernels {
namespace {

void DequantizeQ4_0(const BlockQ4_0* b, float* y, int64_t nb) {
  for (int64_t i = 0; i < nb; ++i, y += kQK) {
    const float d = HalfToFloat(b[i].d);
    for (int j = 0; j < kQK / 2; ++j) {
      y[j] = d * static_cast<float>((b[i].qs[j] & 15) - 8);
      y[j + kQK / 2] = d * static_cast<float>((b[i].qs[j] >> 4) - 8);
    }
  }
}

void DequantizeQ4_1(const BlockQ4_1* b, float* y, int64_t nb) {
  for (int64_t i = 0; i < nb; ++i, y += kQK) {
    const float d = HalfToFloat(b[i].d);
    const float m = HalfToFloat(b[i].m);
    for (int j = 0; j < kQK / 2; ++j) {
      y[j] = d * static_cast<float>(b[i].qs[j] & 15) + m;
      y[j + kQK / 2] = d * static_cast<float>(b[i].qs[j] >> 4) + m;
    }
  }
}

// The 5-bit values of a Q5_0/Q5_1 block, unsigned (0..31).
void Unpack5(const uint8_t* qh_bytes, const uint8_t* qs, int* q) {
  uint32_t qh;
  std::memcpy(&qh, qh_bytes, sizeof(qh));
  for (int j = 0; j < kQK / 2; ++j) {
    q[j] = (qs[j] & 15) | static_cast<int>(((qh >> j) & 1u) << 4);
    q[j + kQK / 2] = (qs[j] >> 4) | static_cast<int>(((qh >> (j + 16)) & 1u) << 4);
  }
}

void DequantizeQ5_0(const BlockQ5_0* b, float* y, int64_t nb) {
  int q[kQK];
  for (int64_t i = 0; i < nb; ++i, y += kQK) {
    const float d = HalfToFloat(b[i].d);
    Unpack5(b[i].qh, b[i].qs, q);
    for (int j = 0; j < kQK; ++j) y[j] = d * static_cast<float>(q[j] - 16);
  }
}

void DequantizeQ5_1(const BlockQ5_1* b, float* y, int64_t nb) {
  int q[kQK];
  for (int64_t i = 0; i < nb; ++i, y += kQK) {
    const float d = HalfToFloat(b[i].d);
    const float m = HalfToFloat(b[i].m);
    Unpack5(b[i].qh, b[i].qs, q);
    for (int j = 0; j < kQK; ++j) y[j] = d * static_cast<float>(q[j]) + m;
  }
}

void DequantizeQ8_0(const BlockQ8_0* b, float* y, int64_t nb) {
  for (int64_t i = 0; i < nb; ++i, y += kQK) {
    const float d = HalfToFloat(b[i].d);
    for (int j = 0; j < kQK; ++j) y[j] = d * static_cast<float>(b[i].qs[j]);
  }
}

void DequantizeQ4K(const BlockQ4K* b, float* y, int64_t nb) {
  uint8_t sc[8];
  uint8_t m[8];
  for (int64_t i = 0; i < nb; ++i) {
    const float d = HalfToFloat(b[i].d);
    const float dmin = HalfToFloat(b[i].dmin);
    UnpackScalesK4(b[i].scales, sc, m);
    const uint8_t* q = b[i].qs;
    for (int c = 0; c < 4; ++c, q += 32, y += 64) {
      const float d_lo = d * sc[2 * c];
      const float m_lo = dmin * m[2 * c];
      const float d_hi = d * sc[2 * c + 1];
      const float m_hi = dmin * m[2 * c + 1];
      for (int l = 0; l < 32; ++l) {
        y[l] = d_lo * static_cast<float>(q[l] & 15) - m_lo;
        y[l + 32] = d_hi * static_cast<float>(q[l] >> 4) - m_hi;
      }
    }
  }
}

void DequantizeQ5K(const BlockQ5K* b, float* y, int64_t nb) {
  uint8_t sc[8];
  uint8_t m[8];
  for (int64_t i = 0; i < nb; ++i) {
    const float d = HalfToFloat(b[i].d);
    const float dmin = HalfToFloat(b[i].dmin);
    UnpackScalesK4(b[i].scales, sc, m);
    const uint8_t* q = b[i].qs;
    for (int c = 0; c < 4; ++c, q += 32, y += 64) {
      const float d_lo = d * sc[2 * c];
      const float m_lo = dmin * m[2 * c];
      const float d_hi = d * sc[2 * c + 1];
      const float m_hi = dmin * m[2 * c + 1];
      for (int l = 0; l < 32; ++l) {
        const int h_lo = (b[i].qh[l] >> (2 * c)) & 1;
        const int h_hi = (b[i].qh[l] >> (2 * c + 1)) & 1;
        y[l] = d_lo * static_cast<float>((q[l] & 15) | (h_lo << 4)) - m_lo;
        y[l + 32] = d_hi * static_cast<float>((q[l] >> 4) | (h_hi << 4)) - m_hi;
      }
    }
  }
}

void DequantizeQ6K(const BlockQ6K* b, float* y, int64_t nb) {
  for (int64_t i = 0; i < nb; ++i) {
    const float d = HalfToFloat(b[i].d);
    for (int h = 0; h < 2; ++h, y += 128) {
      const uint8_t* ql = b[i].ql + 64 * h;
      const uint8_t* qh = b[i].qh + 32 * h;
      const int8_t* sc = b[i].scales + 8 * h;
      for (int l = 0; l < 32; ++l) {
        const int g = l / 16;
        const int q0 = ((ql[l] & 15) | ((qh[l] & 3) << 4)) - 32;
        const int q1 = ((ql[l + 32] & 15) | (((qh[l] >> 2) & 3) << 4)) - 32;
        const int q2 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
        const int q3 = ((ql[l + 32] >> 4) | ((qh[l] >> 6) << 4)) - 32;
        y[l] = d * static_cast<float>(sc[g] * q0);
        y[l + 32] = d * static_cast<float>(sc[g + 2] * q1);
        y[l + 64] = d * static_cast<float>(sc[g + 4] * q2);
        y[l + 96] = d * static_cast<float>(sc[g + 6] * q3);
      }
    }
  }
}

template <typename Block>
const Block* As(const void* p) {
  return static_cast<const Block*>(p);
}

}  // namespace

bool IsSupportedWeightType(DType type) {
  switch (type) {
    case DType::kF32:
    case DType::kF16:
    case DType::kBF16:
    case DType::kQ4_0:
    case DType::kQ4_1:
    case DType::kQ5_0:
    case DType::kQ5_1:
    case DType::kQ8_0:
    case DType::kQ4_K:
    case DType::kQ5_K:
    case DType::kQ6_K:
      return true;
    case DType::kQ2_K:
    case DType::kQ3_K:
    case DType::kQ8_K:
      return false;
  }
  return false;
}

void DequantizeRow(DType type, const void* src, float* dst, int64_t n) {
  const int64_t nb32 = n / kQK;
  const int64_t nbk = n / kQKK;
  switch (type) {
    case DType::kF32:
      std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
      return;
    case DType::kF16: {
      const auto* h = static_cast<const uint16_t*>(src);
      for (int64_t i = 0; i < n; ++i) dst[i] = HalfToFloat(h[i]);
      return;
    }
    case DType::kBF16: {
      const auto* h = static_cast<const uint16_t*>(src);
      for (int64_t i = 0; i < n; ++i) dst[i] = BF16ToFloat(h[i]);
      return;
    }
    case DType::kQ4_0:
      return DequantizeQ4_0(As<BlockQ4_0>(src), dst, nb32);
    case DType::kQ4_1:
      return DequantizeQ4_1(As<BlockQ4_1>(src), dst, nb32);
    case DType::kQ5_0:
      return DequantizeQ5_0(As<BlockQ5_0>(src), dst, nb32);
    case DType::kQ5_1:
      return DequantizeQ5_1(As<BlockQ5_1>(src), dst, nb32);
    case DType::kQ8_0:
      return DequantizeQ8_0(As<BlockQ8_0>(src), dst, nb32);
    case DType::kQ4_K:
      return DequantizeQ4K(As<BlockQ4K>(src), dst, nbk);
    case DType::kQ5_K:
      return DequantizeQ5K(As<BlockQ5K>(src), dst, nbk);
    case DType::kQ6_K:
      return DequantizeQ6K(As<BlockQ6K>(src), dst, nbk);
    case DType::kQ2_K:
    case DType::kQ3_K:
    case DType::kQ8_K:
      break;
  }
  // Callers check IsSupportedWeightType when a tensor is loaded; an
  // unsupported type reaching here is a programming error.
  std::abort();
}

}  // namespace morphserve::kernels
