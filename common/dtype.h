// Element types of weights and activations. Quantized types are stored in
// fixed-size blocks (GGML layouts); `BlockElems` elements take `BlockBytes`.
#ifndef MORPHSERVE_COMMON_DTYPE_H_
#define MORPHSERVE_COMMON_DTYPE_H_

#include <cstddef>
#include <cstdint>
#include <string_view>

namespace morphserve {

enum class DType : uint8_t {
  kF32,
  kF16,
  kBF16,
  kQ4_0,
  kQ4_1,
  kQ5_0,
  kQ5_1,
  kQ8_0,
  kQ2_K,
  kQ3_K,
  kQ4_K,
  kQ5_K,
  kQ6_K,
  kQ8_K,
};

struct DTypeInfo {
  std::string_view name;
  int block_elems;   // elements per block (1 for plain types)
  int block_bytes;   // bytes per block
};

const DTypeInfo& GetDTypeInfo(DType type);
inline std::string_view DTypeName(DType type) { return GetDTypeInfo(type).name; }

// Bytes taken by one row of `n` elements; `n` must be a multiple of the block
// size (checked by the loaders before any tensor is used).
inline size_t RowBytes(DType type, int64_t n) {
  const DTypeInfo& info = GetDTypeInfo(type);
  return static_cast<size_t>(n / info.block_elems) * static_cast<size_t>(info.block_bytes);
}

}  // namespace morphserve

#endif  // MORPHSERVE_COMMON_DTYPE_H_
