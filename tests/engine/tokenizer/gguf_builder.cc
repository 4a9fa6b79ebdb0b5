#include "tests/engine/tokenizer/gguf_builder.h"

namespace morphserve::engine::testing {
namespace {

constexpr uint32_t kTypeUint32 = 4;
constexpr uint32_t kTypeInt32 = 5;
constexpr uint32_t kTypeFloat32 = 6;
constexpr uint32_t kTypeBool = 7;
constexpr uint32_t kTypeString = 8;
constexpr uint32_t kTypeArray = 9;

}  // namespace

GgufBuilder::GgufBuilder() {
  Raw("GGUF", 4);
  Pod<uint32_t>(3);  // version
  Pod<uint64_t>(0);  // tensors
  Pod<uint64_t>(0);  // key/value pairs, patched in by Bytes()
}

void GgufBuilder::Raw(const void* data, size_t size) {
  kv_.append(static_cast<const char*>(data), size);
}

void GgufBuilder::Str(std::string_view s) {
  Pod<uint64_t>(s.size());
  Raw(s.data(), s.size());
}

void GgufBuilder::Key(std::string_view key, uint32_t type) {
  Str(key);
  Pod<uint32_t>(type);
  ++count_;
}

GgufBuilder& GgufBuilder::String(std::string_view key, std::string_view value) {
  Key(key, kTypeString);
  Str(value);
  return *this;
}

GgufBuilder& GgufBuilder::Bool(std::string_view key, bool value) {
  Key(key, kTypeBool);
  Pod<uint8_t>(value ? 1 : 0);
  return *this;
}

GgufBuilder& GgufBuilder::Uint32(std::string_view key, uint32_t value) {
  Key(key, kTypeUint32);
  Pod<uint32_t>(value);
  return *this;
}

GgufBuilder& GgufBuilder::StringArray(std::string_view key,
                                      const std::vector<std::string>& values) {
  Key(key, kTypeArray);
  Pod<uint32_t>(kTypeString);
  Pod<uint64_t>(values.size());
  for (const std::string& v : values) Str(v);
  return *this;
}

GgufBuilder& GgufBuilder::Float32Array(std::string_view key, const std::vector<float>& values) {
  Key(key, kTypeArray);
  Pod<uint32_t>(kTypeFloat32);
  Pod<uint64_t>(values.size());
  for (float v : values) Pod<float>(v);
  return *this;
}

GgufBuilder& GgufBuilder::Int32Array(std::string_view key, const std::vector<int32_t>& values) {
  Key(key, kTypeArray);
  Pod<uint32_t>(kTypeInt32);
  Pod<uint64_t>(values.size());
  for (int32_t v : values) Pod<int32_t>(v);
  return *this;
}

std::vector<uint8_t> GgufBuilder::Bytes() const {
  std::vector<uint8_t> out(kv_.begin(), kv_.end());  // starts with the header
  for (int i = 0; i < 8; ++i) out[16 + i] = static_cast<uint8_t>(count_ >> (8 * i));
  return out;
}

absl::StatusOr<std::unique_ptr<GgufFile>> GgufBuilder::Parse() {
  parsed_ = Bytes();
  return GgufFile::Parse(parsed_);
}

}  // namespace morphserve::engine::testing
