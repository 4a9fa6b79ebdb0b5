// Portable MatMul kernels: the fallback for CPUs without AVX2 and the
// baseline the SIMD variants are tested against. Integer dot products over
// the same quantized activations as the SIMD kernels.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "common/fp16.h"
#include "kernels/cpu/matmul_internal.h"
#include "kernels/cpu/quant_blocks.h"

namespace morphserve::kernels::internal {
namespace {

// Tokens sharing one pass over a weight block.
constexpr int64_t kTokGroup = 4;

void QuantizeBlock32(const float* x, int64_t n, void* out) {
  auto* b = static_cast<ActBlock32*>(out);
  for (int64_t i = 0; i < n / kQK; ++i, x += kQK) {
    float amax = 0.0f;
    for (int j = 0; j < kQK; ++j) amax = std::max(amax, std::fabs(x[j]));
    const float id = amax > 0.0f ? 127.0f / amax : 0.0f;
    int sum = 0;
    for (int j = 0; j < kQK; ++j) {
      const int q = static_cast<int>(std::nearbyint(x[j] * id));
      b[i].qs[j] = static_cast<int8_t>(q);
      sum += q;
    }
    b[i].d = amax / 127.0f;
    b[i].sum = b[i].d * static_cast<float>(sum);
  }
}

void QuantizeSuperBlock(const float* x, int64_t n, void* out) {
  auto* b = static_cast<ActBlockK*>(out);
  for (int64_t i = 0; i < n / kQKK; ++i, x += kQKK) {
    float amax = 0.0f;
    for (int j = 0; j < kQKK; ++j) amax = std::max(amax, std::fabs(x[j]));
    const float id = amax > 0.0f ? 127.0f / amax : 0.0f;
    for (int g = 0; g < kQKK / 16; ++g) {
      int sum = 0;
      for (int j = 16 * g; j < 16 * g + 16; ++j) {
        const int q = static_cast<int>(std::nearbyint(x[j] * id));
        b[i].qs[j] = static_cast<int8_t>(q);
        sum += q;
      }
      b[i].bsums[g] = static_cast<int16_t>(sum);
    }
    b[i].d = amax / 127.0f;
  }
}

template <typename Act>
const Act* ActRow(const void* act, size_t stride, int64_t t) {
  return reinterpret_cast<const Act*>(static_cast<const char*>(act) + stride * t);
}

// A block of 32 as value[j] = d * q[j] + m.
struct Unpacked32 {
  int q[kQK];
  float d;
  float m;
};

void UnpackNibbles(const uint8_t* qs, int* q) {
  for (int j = 0; j < kQK / 2; ++j) {
    q[j] = qs[j] & 15;
    q[j + kQK / 2] = qs[j] >> 4;
  }
}

void AddHighBits(const uint8_t* qh_bytes, int* q) {
  uint32_t qh;
  std::memcpy(&qh, qh_bytes, sizeof(qh));
  for (int j = 0; j < kQK; ++j) q[j] |= static_cast<int>(((qh >> j) & 1u) << 4);
}

void Unpack(const BlockQ4_0& b, Unpacked32* u) {
  UnpackNibbles(b.qs, u->q);
  u->d = HalfToFloat(b.d);
  u->m = -8.0f * u->d;
}

void Unpack(const BlockQ4_1& b, Unpacked32* u) {
  UnpackNibbles(b.qs, u->q);
  u->d = HalfToFloat(b.d);
  u->m = HalfToFloat(b.m);
}

void Unpack(const BlockQ5_0& b, Unpacked32* u) {
  UnpackNibbles(b.qs, u->q);
  AddHighBits(b.qh, u->q);
  u->d = HalfToFloat(b.d);
  u->m = -16.0f * u->d;
}

void Unpack(const BlockQ5_1& b, Unpacked32* u) {
  UnpackNibbles(b.qs, u->q);
  AddHighBits(b.qh, u->q);
  u->d = HalfToFloat(b.d);
  u->m = HalfToFloat(b.m);
}

void Unpack(const BlockQ8_0& b, Unpacked32* u) {
  for (int j = 0; j < kQK; ++j) u->q[j] = b.qs[j];
  u->d = HalfToFloat(b.d);
  u->m = 0.0f;
}

// sum_j (d q_j + m) dx a_j = d dx sum_j q_j a_j + m sum, with sum = dx sum_j a_j.
template <typename Block>
void DotBlock32(const void* w_row, int64_t cols, const void* act, size_t act_stride, int64_t n_tok,
                float* y, int64_t y_stride) {
  const auto* w = static_cast<const Block*>(w_row);
  const int64_t nb = cols / kQK;
  Unpacked32 u;
  for (int64_t t0 = 0; t0 < n_tok; t0 += kTokGroup) {
    const int64_t nt = std::min(kTokGroup, n_tok - t0);
    float acc[kTokGroup] = {};
    for (int64_t b = 0; b < nb; ++b) {
      Unpack(w[b], &u);
      for (int64_t t = 0; t < nt; ++t) {
        const ActBlock32& a = ActRow<ActBlock32>(act, act_stride, t0 + t)[b];
        int isum = 0;
        for (int j = 0; j < kQK; ++j) isum += u.q[j] * a.qs[j];
        acc[t] += u.d * a.d * static_cast<float>(isum) + u.m * a.sum;
      }
    }
    for (int64_t t = 0; t < nt; ++t) y[(t0 + t) * y_stride] = acc[t];
  }
}

// A K-quant super-block as value = d * sc[g] * q - dmin * mn[g] for each
// group g of 16 (Q4_K/Q5_K repeat their 32-element scales over two groups).
struct UnpackedK {
  int q[kQKK];
  int sc[kQKK / 16];
  int mn[kQKK / 16];
  float d;
  float dmin;
};

void UnpackScaleGroupsK4(const uint8_t* scales, UnpackedK* u) {
  uint8_t sc[8];
  uint8_t m[8];
  UnpackScalesK4(scales, sc, m);
  for (int g = 0; g < kQKK / 16; ++g) {
    u->sc[g] = sc[g / 2];
    u->mn[g] = m[g / 2];
  }
}

void Unpack(const BlockQ4K& b, UnpackedK* u) {
  for (int c = 0; c < 4; ++c) {
    for (int l = 0; l < 32; ++l) {
      u->q[64 * c + l] = b.qs[32 * c + l] & 15;
      u->q[64 * c + 32 + l] = b.qs[32 * c + l] >> 4;
    }
  }
  UnpackScaleGroupsK4(b.scales, u);
  u->d = HalfToFloat(b.d);
  u->dmin = HalfToFloat(b.dmin);
}

void Unpack(const BlockQ5K& b, UnpackedK* u) {
  for (int c = 0; c < 4; ++c) {
    for (int l = 0; l < 32; ++l) {
      u->q[64 * c + l] = (b.qs[32 * c + l] & 15) | (((b.qh[l] >> (2 * c)) & 1) << 4);
      u->q[64 * c + 32 + l] = (b.qs[32 * c + l] >> 4) | (((b.qh[l] >> (2 * c + 1)) & 1) << 4);
    }
  }
  UnpackScaleGroupsK4(b.scales, u);
  u->d = HalfToFloat(b.d);
  u->dmin = HalfToFloat(b.dmin);
}

void Unpack(const BlockQ6K& b, UnpackedK* u) {
  for (int h = 0; h < 2; ++h) {
    const uint8_t* ql = b.ql + 64 * h;
    const uint8_t* qh = b.qh + 32 * h;
    int* q = u->q + 128 * h;
    for (int l = 0; l < 32; ++l) {
      q[l] = (ql[l] & 15) | ((qh[l] & 3) << 4);
      q[l + 32] = (ql[l + 32] & 15) | (((qh[l] >> 2) & 3) << 4);
      q[l + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
      q[l + 96] = (ql[l + 32] >> 4) | ((qh[l] >> 6) << 4);
    }
  }
  for (int g = 0; g < kQKK / 16; ++g) {
    u->sc[g] = b.scales[g];
    u->mn[g] = 32 * b.scales[g];
  }
  u->d = HalfToFloat(b.d);
  u->dmin = u->d;
}

template <typename Block>
void DotSuperBlock(const void* w_row, int64_t cols, const void* act, size_t act_stride,
                   int64_t n_tok, float* y, int64_t y_stride) {
  const auto* w = static_cast<const Block*>(w_row);
  const int64_t nb = cols / kQKK;
  UnpackedK u;
  for (int64_t t0 = 0; t0 < n_tok; t0 += kTokGroup) {
    const int64_t nt = std::min(kTokGroup, n_tok - t0);
    float acc[kTokGroup] = {};
    for (int64_t b = 0; b < nb; ++b) {
      Unpack(w[b], &u);
      for (int64_t t = 0; t < nt; ++t) {
        const ActBlockK& a = ActRow<ActBlockK>(act, act_stride, t0 + t)[b];
        int sumi = 0;
        int summ = 0;
        for (int g = 0; g < kQKK / 16; ++g) {
          int isum = 0;
          for (int j = 16 * g; j < 16 * g + 16; ++j) isum += u.q[j] * a.qs[j];
          sumi += u.sc[g] * isum;
          summ += u.mn[g] * a.bsums[g];
        }
        acc[t] += a.d * (u.d * static_cast<float>(sumi) - u.dmin * static_cast<float>(summ));
      }
    }
    for (int64_t t = 0; t < nt; ++t) y[(t0 + t) * y_stride] = acc[t];
  }
}

inline float Identity(float v) { return v; }

// Float weights against f32 activations; eight partial sums per token keep
// the rounding error and the dependency chains short.
template <typename T, float (*ToFloat)(T)>
void DotFloat(const void* w_row, int64_t cols, const void* act, size_t act_stride, int64_t n_tok,
              float* y, int64_t y_stride) {
  constexpr int kLanes = 8;
  const auto* w = static_cast<const T*>(w_row);
  for (int64_t t0 = 0; t0 < n_tok; t0 += kTokGroup) {
    const int64_t nt = std::min(kTokGroup, n_tok - t0);
    const float* x[kTokGroup];
    for (int64_t t = 0; t < nt; ++t) x[t] = ActRow<float>(act, act_stride, t0 + t);
    float acc[kTokGroup][kLanes] = {};
    int64_t k = 0;
    for (; k + kLanes <= cols; k += kLanes) {
      float wf[kLanes];
      for (int l = 0; l < kLanes; ++l) wf[l] = ToFloat(w[k + l]);
      for (int64_t t = 0; t < nt; ++t) {
        for (int l = 0; l < kLanes; ++l) acc[t][l] += wf[l] * x[t][k + l];
      }
    }
    for (; k < cols; ++k) {
      const float wf = ToFloat(w[k]);
      for (int64_t t = 0; t < nt; ++t) acc[t][0] += wf * x[t][k];
    }
    for (int64_t t = 0; t < nt; ++t) {
      float sum = 0.0f;
      for (int l = 0; l < kLanes; ++l) sum += acc[t][l];
      y[(t0 + t) * y_stride] = sum;
    }
  }
}

KernelTable MakeTable() {
  KernelTable k{};
  k.quantize_block32 = QuantizeBlock32;
  k.quantize_superblock = QuantizeSuperBlock;
  k.dot[static_cast<int>(DType::kF32)] = DotFloat<float, Identity>;
  k.dot[static_cast<int>(DType::kF16)] = DotFloat<uint16_t, HalfToFloat>;
  k.dot[static_cast<int>(DType::kBF16)] = DotFloat<uint16_t, BF16ToFloat>;
  k.dot[static_cast<int>(DType::kQ4_0)] = DotBlock32<BlockQ4_0>;
  k.dot[static_cast<int>(DType::kQ4_1)] = DotBlock32<BlockQ4_1>;
  k.dot[static_cast<int>(DType::kQ5_0)] = DotBlock32<BlockQ5_0>;
  k.dot[static_cast<int>(DType::kQ5_1)] = DotBlock32<BlockQ5_1>;
  k.dot[static_cast<int>(DType::kQ8_0)] = DotBlock32<BlockQ8_0>;
  k.dot[static_cast<int>(DType::kQ4_K)] = DotSuperBlock<BlockQ4K>;
  k.dot[static_cast<int>(DType::kQ5_K)] = DotSuperBlock<BlockQ5K>;
  k.dot[static_cast<int>(DType::kQ6_K)] = DotSuperBlock<BlockQ6K>;
  return k;
}

}  // namespace

const KernelTable& ScalarKernels() {
  static const KernelTable kTable = MakeTable();
  return kTable;
}

}  // namespace morphserve::kernels::internal
