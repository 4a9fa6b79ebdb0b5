// Small host-side helpers shared by the kernel wrappers.
#ifndef MORPHSERVE_KERNELS_CUDA_LAUNCH_INTERNAL_H_
#define MORPHSERVE_KERNELS_CUDA_LAUNCH_INTERNAL_H_

#include <algorithm>
#include <cstdint>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace morphserve::kernels::cuda::internal {

// Blocks for a grid-stride loop over `total` items: enough to cover them,
// capped because each thread loops over the rest.
inline unsigned GridStrideBlocks(int64_t total, int threads) {
  constexpr int64_t kMaxBlocks = 1 << 16;
  return static_cast<unsigned>(std::clamp<int64_t>((total + threads - 1) / threads, 1, kMaxBlocks));
}

// Whether `ptr` allows the kernels' 16-byte vector loads.
inline bool Aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// INVALID_ARGUMENT naming the kernel and the broken requirement unless `ok`.
inline absl::Status Require(bool ok, const char* kernel, const char* requirement) {
  if (ok) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(kernel, ": requires ", requirement));
}

}  // namespace morphserve::kernels::cuda::internal

#endif  // MORPHSERVE_KERNELS_CUDA_LAUNCH_INTERNAL_H_
