// MatMul driver: quantizes the activations once per call, then splits the
// weight rows over the pool and runs the best kernel set the CPU supports.
#include "kernels/cpu/matmul.h"

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <vector>

#include "kernels/cpu/dequantize.h"
#include "kernels/cpu/matmul_internal.h"
#include "kernels/cpu/quant_blocks.h"

#if MORPHSERVE_KERNELS_X86
#include <cpuid.h>
#endif

namespace morphserve::kernels {
namespace {

// Rows per unit of work handed to a thread.
constexpr int64_t kRowGrain = 16;
// Rows whose weights stay in L1 while a tile of tokens passes over them.
constexpr int64_t kRowBlock = 16;
// Tokens per tile: their quantized activations stay in L2.
constexpr int64_t kTokTile = 32;
// Activation elements worth quantizing on a separate thread.
constexpr int64_t kQuantizeGrainElems = 16384;
constexpr size_t kAlign = 64;

enum class ActKind { kFloat, kBlock32, kSuperBlock };

ActKind ActKindOf(DType type) {
  switch (type) {
    case DType::kF32:
    case DType::kF16:
    case DType::kBF16:
      return ActKind::kFloat;
    case DType::kQ4_K:
    case DType::kQ5_K:
    case DType::kQ6_K:
      return ActKind::kSuperBlock;
    default:
      return ActKind::kBlock32;
  }
}

size_t RoundUp(size_t n, size_t to) { return (n + to - 1) / to * to; }

#if MORPHSERVE_KERNELS_X86
// Read from CPUID: clang's __builtin_cpu_supports does not know "f16c".
bool HasF16c() {
  unsigned eax = 0;
  unsigned ebx = 0;
  unsigned ecx = 0;
  unsigned edx = 0;
  return __get_cpuid(1, &eax, &ebx, &ecx, &edx) != 0 && (ecx & bit_F16C) != 0;
}
#endif

// Bytes of one quantized activation row (int16 values, then the block
// scales), padded to a cache line.
size_t ActRowBytes(ActKind kind, int64_t cols) {
  const size_t values = static_cast<size_t>(cols) * sizeof(int16_t);
  switch (kind) {
    case ActKind::kFloat:
      return 0;
    case ActKind::kBlock32:
      return RoundUp(values + static_cast<size_t>(cols / kQK) * sizeof(ActScale32), kAlign);
    case ActKind::kSuperBlock:
      return RoundUp(values + static_cast<size_t>(cols / kQKK) * sizeof(ActScaleK), kAlign);
  }
  return 0;
}

}  // namespace

void MatMulReference(const MatMulArgs& args) {
  if (args.w_layout != WeightLayout::kRows) std::abort();
  std::vector<float> w(static_cast<size_t>(args.cols));
  const auto* w_bytes = static_cast<const char*>(args.w);
  for (int64_t r = 0; r < args.rows; ++r) {
    DequantizeRow(args.w_type, w_bytes + static_cast<size_t>(r) * args.w_row_bytes, w.data(),
                  args.cols);
    for (int64_t t = 0; t < args.n_tokens; ++t) {
      const float* x = args.x + t * args.x_stride;
      double sum = 0.0;
      for (int64_t k = 0; k < args.cols; ++k) sum += static_cast<double>(w[k]) * x[k];
      args.y[t * args.y_stride + r] = static_cast<float>(sum);
    }
  }
}

size_t MatMulScratchBytes(DType w_type, int64_t cols, int64_t n_tokens) {
  const ActKind kind = ActKindOf(w_type);
  if (kind == ActKind::kFloat) return 0;
  return static_cast<size_t>(n_tokens) * ActRowBytes(kind, cols) + kAlign;
}

void MatMul(const MatMulArgs& args, void* scratch, ThreadPool* pool) {
  static const internal::Isa kIsa = internal::BestIsa();
  internal::MatMulWithIsa(args, scratch, pool, kIsa);
}

namespace internal {

bool IsaSupported(Isa isa) {
  switch (isa) {
    case Isa::kScalar:
      return true;
#if MORPHSERVE_KERNELS_X86
    case Isa::kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && HasF16c();
    case Isa::kAvx512:
      return IsaSupported(Isa::kAvx2) && __builtin_cpu_supports("avx512f") &&
             __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
             __builtin_cpu_supports("avx512vnni");
#else
    case Isa::kAvx2:
    case Isa::kAvx512:
      return false;
#endif
  }
  return false;
}

const KernelTable& KernelsFor(Isa isa) {
#if MORPHSERVE_KERNELS_X86
  if (isa == Isa::kAvx512) return Avx512Kernels();
  if (isa == Isa::kAvx2) return Avx2Kernels();
#endif
  return ScalarKernels();
}

Isa BestIsa() {
  if (IsaSupported(Isa::kAvx512)) return Isa::kAvx512;
  if (IsaSupported(Isa::kAvx2)) return Isa::kAvx2;
  return Isa::kScalar;
}

const char* IsaName(Isa isa) {
  switch (isa) {
    case Isa::kScalar:
      return "scalar";
    case Isa::kAvx2:
      return "avx2";
    case Isa::kAvx512:
      return "avx512";
  }
  return "?";
}

void MatMulWithIsa(const MatMulArgs& args, void* scratch, ThreadPool* pool, Isa isa) {
  if (args.rows <= 0 || args.n_tokens <= 0) return;
  const KernelTable& table = KernelsFor(isa);
  // Everything the parallel loops need, so that each lambda captures a single
  // reference and its std::function needs no heap allocation.
  struct Job {
    const MatMulArgs& args;
    RowDotFn dot;
    PackedDotFn packed_dot;  // used instead of dot for the packed layout
    int64_t unit_rows;       // rows per unit of work: 1, or a packed group
    QuantizeRowFn quantize;
    char* quantized;  // activation rows in scratch, for quantized weights
    const char* act;  // the rows the dot products read
    size_t act_stride;
  } job{args,
        table.dot[static_cast<int>(args.w_type)],
        nullptr,
        1,
        nullptr,
        nullptr,
        reinterpret_cast<const char*>(args.x),
        static_cast<size_t>(args.x_stride) * sizeof(float)};
  if (args.w_layout == WeightLayout::kPacked) {
    job.packed_dot = table.packed_dot[static_cast<int>(args.w_type)];
    job.unit_rows = kPackRows;
    if (job.packed_dot == nullptr) std::abort();  // CanPackWeights is checked before packing
  } else if (job.dot == nullptr) {
    std::abort();  // IsSupportedWeightType is checked at load
  }

  const ActKind kind = ActKindOf(args.w_type);
  if (kind != ActKind::kFloat) {
    // Activations are quantized once here, not once per weight row.
    const size_t misalign = reinterpret_cast<uintptr_t>(scratch) % kAlign;
    job.quantized = static_cast<char*>(scratch) + (misalign == 0 ? 0 : kAlign - misalign);
    job.act = job.quantized;
    job.act_stride = ActRowBytes(kind, args.cols);
    job.quantize = kind == ActKind::kBlock32 ? table.quantize_block32 : table.quantize_superblock;
    const int64_t grain = std::max<int64_t>(1, kQuantizeGrainElems / args.cols);
    ParallelFor(pool, args.n_tokens, grain, [&job](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        job.quantize(job.args.x + t * job.args.x_stride, job.args.cols,
                     job.quantized + static_cast<size_t>(t) * job.act_stride);
      }
    });
  }

  // Units are rows, or groups of kPackRows rows in the packed layout. A tile
  // of tokens passes over a block of units while their weights stay in L1.
  const int64_t units = (args.rows + job.unit_rows - 1) / job.unit_rows;
  ParallelFor(pool, units, kRowGrain / job.unit_rows, [&job](int64_t u0, int64_t u1) {
    const MatMulArgs& a = job.args;
    const auto* w = static_cast<const char*>(a.w);
    const int64_t block = kRowBlock / job.unit_rows;
    const size_t unit_bytes = job.packed_dot != nullptr
                                  ? PackedWeightBytes(a.w_type, kPackRows, a.cols)
                                  : a.w_row_bytes;
    for (int64_t ub = u0; ub < u1; ub += block) {
      const int64_t ub_end = std::min(u1, ub + block);
      for (int64_t t0 = 0; t0 < a.n_tokens; t0 += kTokTile) {
        const int64_t nt = std::min(kTokTile, a.n_tokens - t0);
        const char* act_tile = job.act + static_cast<size_t>(t0) * job.act_stride;
        for (int64_t u = ub; u < ub_end; ++u) {
          const char* wu = w + static_cast<size_t>(u) * unit_bytes;
          float* yu = a.y + t0 * a.y_stride + u * job.unit_rows;
          if (job.packed_dot != nullptr) {
            const int rows = static_cast<int>(std::min(kPackRows, a.rows - u * kPackRows));
            job.packed_dot(wu, a.cols, act_tile, job.act_stride, nt, yu, a.y_stride, rows);
          } else {
            job.dot(wu, a.cols, act_tile, job.act_stride, nt, yu, a.y_stride);
          }
        }
      }
    }
  });
}

}  // namespace internal
}  // namespace morphserve::kernels
