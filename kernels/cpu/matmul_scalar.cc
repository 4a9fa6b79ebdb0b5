// Portable MatMul kernels: the fallback for CPUs without AVX2 and the
// baseline the SIMD variants are tested against. The same quantized
// activations and exact integer dot products as the SIMD kernels; only the
// order and rounding of the f32 sums differ.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "common/fp16.h"
#include "kernels/cpu/matmul_internal.h"
#include "kernels/cpu/packed_blocks.h"
#include "kernels/cpu/quant_blocks.h"

namespace morphserve::kernels::internal {
namespace {

// Tokens sharing one pass over a weight block.
constexpr int64_t kTokGroup = 4;

float AbsMax(const float* x, int n) {
  float amax = 0.0f;
  for (int j = 0; j < n; ++j) amax = std::max(amax, std::fabs(x[j]));
  return amax;
}

// Quantizes n values with inverse scale `id`; returns the sum of the quants.
int QuantizeValues(const float* x, int n, float id, int16_t* q) {
  int sum = 0;
  for (int j = 0; j < n; ++j) {
    q[j] = static_cast<int16_t>(std::nearbyint(x[j] * id));
    sum += q[j];
  }
  return sum;
}

void QuantizeBlock32(const float* x, int64_t n, void* out) {
  auto* q = static_cast<int16_t*>(out);
  ActScale32* scales = ActScales<ActScale32>(out, n);
  for (int64_t b = 0; b < n / kQK; ++b) {
    const float amax = AbsMax(x + kQK * b, kQK);
    const int sum = QuantizeValues(x + kQK * b, kQK, ActInverseScale(amax), q + kQK * b);
    scales[b].d = amax / kActMax;
    scales[b].sum = scales[b].d * static_cast<float>(sum);
  }
}

void QuantizeSuperBlock(const float* x, int64_t n, void* out) {
  auto* q = static_cast<int16_t*>(out);
  ActScaleK* scales = ActScales<ActScaleK>(out, n);
  for (int64_t b = 0; b < n / kQKK; ++b) {
    const float* xb = x + kQKK * b;
    const float amax = AbsMax(xb, kQKK);
    const float id = ActInverseScale(amax);
    for (int s = 0; s < kQKK / kQK; ++s) {
      scales[b].sums[s] = QuantizeValues(xb + kQK * s, kQK, id, q + kQKK * b + kQK * s);
    }
    scales[b].d = amax / kActMax;
  }
}

// Row t of the activations, `stride` bytes apart: f32 or int16 values.
template <typename T>
const T* ActRow(const void* act, size_t stride, int64_t t) {
  return reinterpret_cast<const T*>(static_cast<const char*>(act) + stride * t);
}

// A block of 32 as value[j] = d * q[j] + m (m = 0 but for Q4_1 and Q5_1).
struct Unpacked32 {
  int q[kQK];
  float d;
  float m;
};

void Unpack(const BlockQ4_0& b, Unpacked32* u) {
  UnpackNibbles(b.qs, 8, u->q);
  u->d = HalfToFloat(b.d);
  u->m = 0.0f;
}

void Unpack(const BlockQ4_1& b, Unpacked32* u) {
  UnpackNibbles(b.qs, 0, u->q);
  u->d = HalfToFloat(b.d);
  u->m = HalfToFloat(b.m);
}

void Unpack(const BlockQ5_0& b, Unpacked32* u) {
  UnpackNibbles(b.qs, 16, u->q);
  AddHighBits(b.qh, u->q);
  u->d = HalfToFloat(b.d);
  u->m = 0.0f;
}

void Unpack(const BlockQ5_1& b, Unpacked32* u) {
  UnpackNibbles(b.qs, 0, u->q);
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
        const int16_t* row = ActRow<int16_t>(act, act_stride, t0 + t);
        const int16_t* x = row + kQK * b;
        const ActScale32& a = ActScales<ActScale32>(row, cols)[b];
        // |isum| <= 32 * 128 * 32767 < 2^31 (Q8_0; the others are smaller).
        int isum = 0;
        for (int j = 0; j < kQK; ++j) isum += u.q[j] * x[j];
        acc[t] += u.d * a.d * static_cast<float>(isum) + u.m * a.sum;
      }
    }
    for (int64_t t = 0; t < nt; ++t) y[(t0 + t) * y_stride] = acc[t];
  }
}

// The packed layout: the same sums per (row, token) as the x86 packed
// kernels (exact integer block dot, then isum * (d dx) + m sum in f32).
template <typename Block>
void DotPacked32(const void* tiles, int64_t cols, const void* act, size_t act_stride,
                 int64_t n_tok, float* y, int64_t y_stride, int n_rows) {
  using Tile = typename PackedOf<Block>::Tile;
  const auto* tile = static_cast<const Tile*>(tiles);
  const int64_t nb = cols / kQK;
  int q[kQK];
  for (int i = 0; i < n_rows; ++i) {
    for (int64_t t = 0; t < n_tok; ++t) {
      const int16_t* row = ActRow<int16_t>(act, act_stride, t);
      float acc = 0.0f;
      for (int64_t b = 0; b < nb; ++b) {
        const Tile& tb = tile[b];
        for (int k = 0; k < kQK; ++k) q[k] = PackedQuant(tb, i, k) - PackedOf<Block>::kOffset;
        const int16_t* x = row + kQK * b;
        const ActScale32& a = ActScales<ActScale32>(row, cols)[b];
        int isum = 0;
        for (int k = 0; k < kQK; ++k) isum += q[k] * x[k];
        acc = std::fma(static_cast<float>(isum), HalfToFloat(tb.d[i]) * a.d, acc);
        if constexpr (kTileHasMin<Tile>) acc = std::fma(HalfToFloat(tb.m[i]), a.sum, acc);
      }
      y[t * y_stride + i] = acc;
    }
  }
}

// A K-quant super-block as value = d * sc[g] * q - dmin * mn[g / 2] for each
// group g of 16 (Q4_K/Q5_K repeat their 32-element scales over two groups;
// Q6_K has q signed and no mins).
struct UnpackedK {
  int q[kQKK];
  int sc[kQKK / 16];
  int mn[kQKK / 32];
  float d;
  float dmin;
};

void UnpackScaleGroupsK4(const uint8_t* scales, UnpackedK* u) {
  uint8_t sc[8];
  uint8_t m[8];
  UnpackScalesK4(scales, sc, m);
  for (int g = 0; g < kQKK / 16; ++g) u->sc[g] = sc[g / 2];
  for (int s = 0; s < kQKK / 32; ++s) u->mn[s] = m[s];
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
      q[l] = ((ql[l] & 15) | ((qh[l] & 3) << 4)) - 32;
      q[l + 32] = ((ql[l + 32] & 15) | (((qh[l] >> 2) & 3) << 4)) - 32;
      q[l + 64] = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
      q[l + 96] = ((ql[l + 32] >> 4) | ((qh[l] >> 6) << 4)) - 32;
    }
  }
  for (int g = 0; g < kQKK / 16; ++g) u->sc[g] = b.scales[g];
  for (int s = 0; s < kQKK / 32; ++s) u->mn[s] = 0;
  u->d = HalfToFloat(b.d);
  u->dmin = 0.0f;
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
        const int16_t* row = ActRow<int16_t>(act, act_stride, t0 + t);
        const int16_t* x = row + kQKK * b;
        const ActScaleK& a = ActScales<ActScaleK>(row, cols)[b];
        // A group's sum is at most 16 * 32 * 32767 < 2^31 (Q6_K); scaled,
        // the super-block's may not be, so it is summed in 64 bits.
        int64_t sumi = 0;
        for (int g = 0; g < kQKK / 16; ++g) {
          int isum = 0;
          for (int j = 16 * g; j < 16 * g + 16; ++j) isum += u.q[j] * x[j];
          sumi += int64_t{u.sc[g]} * isum;
        }
        // |summ| <= 8 * 63 * 32 * 32767 < 2^31.
        int summ = 0;
        for (int s = 0; s < kQKK / 32; ++s) summ += u.mn[s] * a.sums[s];
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
  k.packed_dot[static_cast<int>(DType::kQ4_0)] = DotPacked32<BlockQ4_0>;
  k.packed_dot[static_cast<int>(DType::kQ4_1)] = DotPacked32<BlockQ4_1>;
  k.packed_dot[static_cast<int>(DType::kQ5_0)] = DotPacked32<BlockQ5_0>;
  k.packed_dot[static_cast<int>(DType::kQ5_1)] = DotPacked32<BlockQ5_1>;
  k.packed_dot[static_cast<int>(DType::kQ8_0)] = DotPacked32<BlockQ8_0>;
  return k;
}

}  // namespace

const KernelTable& ScalarKernels() {
  static const KernelTable kTable = MakeTable();
  return kTable;
}

}  // namespace morphserve::kernels::internal
