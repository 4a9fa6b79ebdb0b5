// Read-only view of a GGUF file (versions 2 and 3): metadata, tensor
// directory and tensor data, parsed with every offset and length checked.
//
// Open() memory-maps the file; Parse() reads a caller-owned buffer (tests and
// the fuzzer). Strings and tensor data point into the mapping, so they stay
// valid as long as the GgufFile lives. Immutable after construction: safe to
// read from any thread.
#ifndef MORPHSERVE_ENGINE_GGUF_GGUF_FILE_H_
#define MORPHSERVE_ENGINE_GGUF_GGUF_FILE_H_

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "common/dtype.h"

namespace morphserve::engine {

enum class GgufType : uint32_t {
  kUint8 = 0,
  kInt8 = 1,
  kUint16 = 2,
  kInt16 = 3,
  kUint32 = 4,
  kInt32 = 5,
  kFloat32 = 6,
  kBool = 7,
  kString = 8,
  kArray = 9,
  kUint64 = 10,
  kInt64 = 11,
  kFloat64 = 12,
};

std::string_view GgufTypeName(GgufType type);

// One metadata value. Scalars are widened into `integer`/`real`; arrays of
// numbers keep a pointer to their little-endian elements in the file.
struct GgufValue {
  GgufType type = GgufType::kUint8;
  int64_t integer = 0;   // every integer type and bool
  double real = 0;       // float32 / float64
  std::string_view str;  // kString
  // kArray:
  GgufType elem_type = GgufType::kUint8;
  uint64_t count = 0;
  const uint8_t* elems = nullptr;           // numeric arrays
  std::vector<std::string_view> strings;    // string arrays

  bool IsInteger() const;
  bool IsReal() const { return type == GgufType::kFloat32 || type == GgufType::kFloat64; }
};

struct GgufTensor {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> dims;  // GGUF order: dims[0] is contiguous
  uint64_t offset = 0;        // from the start of the data section
  uint64_t size_bytes = 0;
  const uint8_t* data = nullptr;

  int64_t NumElements() const;
};

class GgufFile {
 public:
  // Maps `path` and parses it. Errors name the file and the problem.
  static absl::StatusOr<std::unique_ptr<GgufFile>> Open(const std::string& path);
  // Parses `bytes`, which must outlive the result.
  static absl::StatusOr<std::unique_ptr<GgufFile>> Parse(std::span<const uint8_t> bytes);

  ~GgufFile();
  GgufFile(const GgufFile&) = delete;
  GgufFile& operator=(const GgufFile&) = delete;

  uint32_t version() const { return version_; }
  uint32_t alignment() const { return alignment_; }
  const std::map<std::string, GgufValue, std::less<>>& metadata() const { return metadata_; }
  const std::vector<GgufTensor>& tensors() const { return tensors_; }

  const GgufValue* Find(std::string_view key) const;
  const GgufTensor* FindTensor(std::string_view name) const;

  // Typed look-ups: nullopt when absent, an error when present with a type
  // that cannot be converted.
  absl::StatusOr<std::optional<int64_t>> GetInt(std::string_view key) const;
  absl::StatusOr<std::optional<double>> GetReal(std::string_view key) const;
  absl::StatusOr<std::optional<bool>> GetBool(std::string_view key) const;
  absl::StatusOr<std::optional<std::string_view>> GetString(std::string_view key) const;
  absl::StatusOr<std::optional<std::span<const std::string_view>>> GetStringArray(
      std::string_view key) const;
  // Numeric arrays converted to the requested element type.
  absl::StatusOr<std::optional<std::vector<float>>> GetRealArray(std::string_view key) const;
  absl::StatusOr<std::optional<std::vector<int64_t>>> GetIntArray(std::string_view key) const;

 private:
  GgufFile() = default;
  absl::Status ParseAll(std::span<const uint8_t> bytes);

  void* mapping_ = nullptr;
  size_t mapping_size_ = 0;
  uint32_t version_ = 0;
  uint32_t alignment_ = 32;
  std::map<std::string, GgufValue, std::less<>> metadata_;
  std::vector<GgufTensor> tensors_;
  std::map<std::string, size_t, std::less<>> tensor_index_;
};

}  // namespace morphserve::engine

#endif  // MORPHSERVE_ENGINE_GGUF_GGUF_FILE_H_
