#include "tests/testing/gguf_builder.h"

#include <cstring>
#include <fstream>
#include <stdexcept>

namespace morphserve::testing {
namespace {

template <typename T>
void Put(std::vector<uint8_t>& out, T v) {
  const size_t at = out.size();
  out.resize(at + sizeof(T));
  std::memcpy(out.data() + at, &v, sizeof(T));
}

void PutString(std::vector<uint8_t>& out, std::string_view s) {
  Put<uint64_t>(out, s.size());
  out.insert(out.end(), s.begin(), s.end());
}

}  // namespace

void GgufBuilder::Key(std::string_view key, uint32_t type) {
  PutString(kv_, key);
  Put<uint32_t>(kv_, type);
  ++n_kv_;
}

GgufBuilder& GgufBuilder::SetU32(std::string_view key, uint32_t v) {
  Key(key, 4);
  Put(kv_, v);
  return *this;
}
GgufBuilder& GgufBuilder::SetI32(std::string_view key, int32_t v) {
  Key(key, 5);
  Put(kv_, v);
  return *this;
}
GgufBuilder& GgufBuilder::SetU64(std::string_view key, uint64_t v) {
  Key(key, 10);
  Put(kv_, v);
  return *this;
}
GgufBuilder& GgufBuilder::SetF32(std::string_view key, float v) {
  Key(key, 6);
  Put(kv_, v);
  return *this;
}
GgufBuilder& GgufBuilder::SetBool(std::string_view key, bool v) {
  Key(key, 7);
  Put<uint8_t>(kv_, v ? 1 : 0);
  return *this;
}
GgufBuilder& GgufBuilder::SetString(std::string_view key, std::string_view v) {
  Key(key, 8);
  PutString(kv_, v);
  return *this;
}
GgufBuilder& GgufBuilder::SetStringArray(std::string_view key, const std::vector<std::string>& v) {
  Key(key, 9);
  Put<uint32_t>(kv_, 8);
  Put<uint64_t>(kv_, v.size());
  for (const std::string& s : v) PutString(kv_, s);
  return *this;
}
GgufBuilder& GgufBuilder::SetF32Array(std::string_view key, const std::vector<float>& v) {
  Key(key, 9);
  Put<uint32_t>(kv_, 6);
  Put<uint64_t>(kv_, v.size());
  for (float f : v) Put(kv_, f);
  return *this;
}
GgufBuilder& GgufBuilder::SetI32Array(std::string_view key, const std::vector<int32_t>& v) {
  Key(key, 9);
  Put<uint32_t>(kv_, 5);
  Put<uint64_t>(kv_, v.size());
  for (int32_t i : v) Put(kv_, i);
  return *this;
}

GgufBuilder& GgufBuilder::SetAlignment(uint32_t alignment) {
  alignment_ = alignment;
  return SetU32("general.alignment", alignment);
}

GgufBuilder& GgufBuilder::AddTensor(std::string_view name, std::vector<uint64_t> dims,
                                    uint32_t ggml_type, std::vector<uint8_t> data) {
  tensors_.push_back({std::string(name), std::move(dims), ggml_type, std::move(data)});
  return *this;
}

GgufBuilder& GgufBuilder::AddF32Tensor(std::string_view name, std::vector<uint64_t> dims,
                                       const std::vector<float>& values) {
  std::vector<uint8_t> bytes(values.size() * sizeof(float));
  std::memcpy(bytes.data(), values.data(), bytes.size());
  return AddTensor(name, std::move(dims), 0, std::move(bytes));
}

std::vector<uint8_t> GgufBuilder::Build() const {
  std::vector<uint8_t> out;
  Put<uint32_t>(out, 0x46554747);
  Put<uint32_t>(out, version_);
  Put<uint64_t>(out, tensors_.size());
  Put<uint64_t>(out, n_kv_);
  out.insert(out.end(), kv_.begin(), kv_.end());
  uint64_t offset = 0;
  std::vector<uint64_t> offsets;
  for (const Tensor& t : tensors_) {
    PutString(out, t.name);
    Put<uint32_t>(out, static_cast<uint32_t>(t.dims.size()));
    for (uint64_t d : t.dims) Put<uint64_t>(out, d);
    Put<uint32_t>(out, t.type);
    Put<uint64_t>(out, offset);
    offsets.push_back(offset);
    offset += (t.data.size() + alignment_ - 1) / alignment_ * alignment_;
  }
  out.resize((out.size() + alignment_ - 1) / alignment_ * alignment_, 0);
  const size_t data_start = out.size();
  for (size_t i = 0; i < tensors_.size(); ++i) {
    out.resize(data_start + offsets[i], 0);
    out.insert(out.end(), tensors_[i].data.begin(), tensors_[i].data.end());
  }
  return out;
}

void GgufBuilder::WriteTo(const std::string& path) const {
  const std::vector<uint8_t> bytes = Build();
  std::ofstream f(path, std::ios::binary);
  f.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  if (!f) throw std::runtime_error("cannot write " + path);
}

}  // namespace morphserve::testing
