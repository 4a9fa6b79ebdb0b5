// Read-only view of one `.safetensors` file: an 8-byte little-endian header
// length, a JSON header mapping tensor names to dtype, shape and byte range,
// then the tensor bytes.
//
// Open() memory-maps the file; Parse() reads a caller-owned buffer (tests).
// Every length and offset is checked before use: bad input is an error, never
// a crash. Tensor data points into the mapping and stays valid as long as the
// SafetensorsFile lives. Immutable after construction.
#ifndef MORPHSERVE_ENGINE_MODEL_SAFETENSORS_FILE_H_
#define MORPHSERVE_ENGINE_MODEL_SAFETENSORS_FILE_H_

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

struct SafetensorsTensor {
  std::string name;
  // The dtype as written in the header ("F32", "BF16", "I64", ...).
  std::string dtype_name;
  // Set for the dtypes the engine computes with (F32, F16, BF16).
  std::optional<DType> dtype;
  std::vector<int64_t> shape;
  const uint8_t* data = nullptr;
  uint64_t size_bytes = 0;

  int64_t NumElements() const;
};

class SafetensorsFile {
 public:
  // Maps `path` and parses it. Errors name the file and the problem.
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(const std::string& path);
  // Parses `bytes`, which must outlive the result; `name` labels errors.
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Parse(std::span<const uint8_t> bytes,
                                                                std::string name);

  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& name() const { return name_; }
  const std::vector<SafetensorsTensor>& tensors() const { return tensors_; }
  const SafetensorsTensor* Find(std::string_view tensor_name) const;

 private:
  explicit SafetensorsFile(std::string name) : name_(std::move(name)) {}
  absl::Status ParseAll(std::span<const uint8_t> bytes);

  std::string name_;
  void* mapping_ = nullptr;
  size_t mapping_size_ = 0;
  std::vector<SafetensorsTensor> tensors_;
  std::map<std::string, size_t, std::less<>> index_;
};

}  // namespace morphserve::engine

#endif  // MORPHSERVE_ENGINE_MODEL_SAFETENSORS_FILE_H_
