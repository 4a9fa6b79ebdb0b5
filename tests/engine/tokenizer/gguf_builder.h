// Builds metadata-only GGUF files in memory, for tokenizer tests that need
// vocabularies with specific (or broken) metadata.
#ifndef MORPHSERVE_TESTS_ENGINE_TOKENIZER_GGUF_BUILDER_H_
#define MORPHSERVE_TESTS_ENGINE_TOKENIZER_GGUF_BUILDER_H_

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/gguf/gguf_file.h"

namespace morphserve::engine::testing {

class GgufBuilder {
 public:
  GgufBuilder();

  GgufBuilder& String(std::string_view key, std::string_view value);
  GgufBuilder& Bool(std::string_view key, bool value);
  GgufBuilder& Uint32(std::string_view key, uint32_t value);
  GgufBuilder& StringArray(std::string_view key, const std::vector<std::string>& values);
  GgufBuilder& Float32Array(std::string_view key, const std::vector<float>& values);
  GgufBuilder& Int32Array(std::string_view key, const std::vector<int32_t>& values);

  // GGUF v3 bytes with no tensors.
  std::vector<uint8_t> Bytes() const;
  // Parses Bytes(); the builder keeps the bytes alive, so it must outlive
  // the result.
  absl::StatusOr<std::unique_ptr<GgufFile>> Parse();

 private:
  void Key(std::string_view key, uint32_t type);
  void Raw(const void* data, size_t size);
  template <typename T>
  void Pod(T value) {
    Raw(&value, sizeof(value));
  }
  void Str(std::string_view s);

  // The header ("GGUF", version 3, no tensors, key count patched in by
  // Bytes()) followed by the key/value pairs.
  std::string kv_;
  uint64_t count_ = 0;
  std::vector<uint8_t> parsed_;
};

}  // namespace morphserve::engine::testing

#endif  // MORPHSERVE_TESTS_ENGINE_TOKENIZER_GGUF_BUILDER_H_
