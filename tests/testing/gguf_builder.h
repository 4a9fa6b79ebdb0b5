// Builds GGUF files in memory for tests: metadata of every type, tensors of
// any dtype with raw bytes, explicit alignment. Used to test the parser
// against hostile input and to write small models.
#ifndef MORPHSERVE_TESTS_TESTING_GGUF_BUILDER_H_
#define MORPHSERVE_TESTS_TESTING_GGUF_BUILDER_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace morphserve::testing {

class GgufBuilder {
 public:
  explicit GgufBuilder(uint32_t version = 3) : version_(version) {}

  GgufBuilder& SetU32(std::string_view key, uint32_t v);
  GgufBuilder& SetI32(std::string_view key, int32_t v);
  GgufBuilder& SetU64(std::string_view key, uint64_t v);
  GgufBuilder& SetF32(std::string_view key, float v);
  GgufBuilder& SetBool(std::string_view key, bool v);
  GgufBuilder& SetString(std::string_view key, std::string_view v);
  GgufBuilder& SetStringArray(std::string_view key, const std::vector<std::string>& v);
  GgufBuilder& SetF32Array(std::string_view key, const std::vector<float>& v);
  GgufBuilder& SetI32Array(std::string_view key, const std::vector<int32_t>& v);

  // dims in GGUF order (dims[0] contiguous); ggml_type is the GGML type id.
  GgufBuilder& AddTensor(std::string_view name, std::vector<uint64_t> dims, uint32_t ggml_type,
                         std::vector<uint8_t> data);
  GgufBuilder& AddF32Tensor(std::string_view name, std::vector<uint64_t> dims,
                            const std::vector<float>& values);

  GgufBuilder& SetAlignment(uint32_t alignment);

  std::vector<uint8_t> Build() const;
  // Writes Build() to `path`.
  void WriteTo(const std::string& path) const;

 private:
  struct Tensor {
    std::string name;
    std::vector<uint64_t> dims;
    uint32_t type;
    std::vector<uint8_t> data;
  };
  void Key(std::string_view key, uint32_t type);

  uint32_t version_;
  uint32_t alignment_ = 32;
  uint64_t n_kv_ = 0;
  std::vector<uint8_t> kv_;
  std::vector<Tensor> tensors_;
};

}  // namespace morphserve::testing

#endif  // MORPHSERVE_TESTS_TESTING_GGUF_BUILDER_H_
