#include "engine/model/safetensors_file.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "absl/strings/str_join.h"
#include "common/status.h"
#include "common/strings.h"
#include "nlohmann/json.hpp"

namespace morphserve::engine {
namespace {

// The reference implementation refuses larger headers too; it keeps a
// corrupt length from making us parse gigabytes of tensor data as JSON.
constexpr uint64_t kMaxHeaderBytes = 100ull << 20;

struct DTypeSpec {
  std::string_view name;
  uint64_t bytes;
  std::optional<DType> dtype;
};

// Every dtype of the safetensors format, so that files holding tensors the
// engine does not compute with (e.g. I64 buffers) still parse and bounds-check.
constexpr DTypeSpec kDTypes[] = {
    {"F32", 4, DType::kF32},      {"F16", 2, DType::kF16},      {"BF16", 2, DType::kBF16},
    {"F64", 8, std::nullopt},     {"I64", 8, std::nullopt},     {"U64", 8, std::nullopt},
    {"I32", 4, std::nullopt},     {"U32", 4, std::nullopt},     {"I16", 2, std::nullopt},
    {"U16", 2, std::nullopt},     {"I8", 1, std::nullopt},      {"U8", 1, std::nullopt},
    {"BOOL", 1, std::nullopt},    {"F8_E4M3", 1, std::nullopt}, {"F8_E5M2", 1, std::nullopt},
    {"F8_E8M0", 1, std::nullopt},
};

const DTypeSpec* FindDType(std::string_view name) {
  for (const DTypeSpec& d : kDTypes) {
    if (d.name == name) return &d;
  }
  return nullptr;
}

absl::Status Invalid(std::string_view tensor, std::string_view problem) {
  return absl::InvalidArgumentError(StrCat("tensor '", tensor, "': ", problem));
}

// Parses one header entry into `t` (data pointer excluded); `data_size` is
// the length of the byte buffer after the header.
absl::Status ParseEntry(const std::string& name, const nlohmann::json& entry, uint64_t data_size,
                        SafetensorsTensor& t, uint64_t& begin) {
  t.name = name;
  if (!entry.is_object()) return Invalid(name, "header entry is not an object");
  auto dtype_it = entry.find("dtype");
  if (dtype_it == entry.end() || !dtype_it->is_string()) return Invalid(name, "missing dtype");
  t.dtype_name = dtype_it->get<std::string>();
  const DTypeSpec* spec = FindDType(t.dtype_name);
  if (spec == nullptr) {
    return absl::UnimplementedError(
        StrCat("tensor '", name, "': dtype '", t.dtype_name, "' is not supported"));
  }
  t.dtype = spec->dtype;

  auto shape_it = entry.find("shape");
  if (shape_it == entry.end() || !shape_it->is_array()) return Invalid(name, "missing shape");
  uint64_t bytes = spec->bytes;
  bool overflow = false;
  for (const nlohmann::json& d : *shape_it) {
    if (!d.is_number_unsigned()) {
      return Invalid(name, "shape entries must be non-negative integers");
    }
    const uint64_t dim = d.get<uint64_t>();
    if (dim > static_cast<uint64_t>(INT64_MAX)) return Invalid(name, "shape entry too large");
    overflow = overflow || __builtin_mul_overflow(bytes, dim, &bytes);
    t.shape.push_back(static_cast<int64_t>(dim));
  }
  if (overflow) return Invalid(name, "shape is too large");

  auto off_it = entry.find("data_offsets");
  if (off_it == entry.end() || !off_it->is_array() || off_it->size() != 2 ||
      !(*off_it)[0].is_number_unsigned() || !(*off_it)[1].is_number_unsigned()) {
    return Invalid(name, "data_offsets must be two non-negative integers");
  }
  begin = (*off_it)[0].get<uint64_t>();
  const uint64_t end = (*off_it)[1].get<uint64_t>();
  if (begin > end || end > data_size) {
    return Invalid(name, StrCat("data_offsets [", begin, ", ", end,
                                "] are out of range (the data section is ", data_size, " bytes)"));
  }
  if (end - begin != bytes) {
    return Invalid(
        name, StrCat("data_offsets [", begin, ", ", end, "] hold ", end - begin, " bytes, but ",
                     t.dtype_name, " shape [", absl::StrJoin(t.shape, ", "), "] needs ", bytes));
  }
  t.size_bytes = bytes;
  return absl::OkStatus();
}

}  // namespace

int64_t SafetensorsTensor::NumElements() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return absl::NotFoundError(StrCat(path, ": ", std::strerror(errno)));
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    return absl::InvalidArgumentError(StrCat(path, ": not a regular file"));
  }
  const size_t size = static_cast<size_t>(st.st_size);
  std::unique_ptr<SafetensorsFile> file(new SafetensorsFile(path));
  if (size > 0) {  // mmap rejects empty files; ParseAll reports them
    void* map = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (map == MAP_FAILED) {
      const int err = errno;
      ::close(fd);
      return absl::InternalError(StrCat(path, ": mmap failed: ", std::strerror(err)));
    }
    file->mapping_ = map;
    file->mapping_size_ = size;
  }
  ::close(fd);
  absl::Status status =
      file->ParseAll({static_cast<const uint8_t*>(file->mapping_), file->mapping_size_});
  if (!status.ok()) return absl::Status(status.code(), StrCat(path, ": ", status.message()));
  return file;
}

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Parse(
    std::span<const uint8_t> bytes, std::string name) {
  std::unique_ptr<SafetensorsFile> file(new SafetensorsFile(std::move(name)));
  absl::Status status = file->ParseAll(bytes);
  if (!status.ok()) {
    return absl::Status(status.code(), StrCat(file->name_, ": ", status.message()));
  }
  return file;
}

SafetensorsFile::~SafetensorsFile() {
  if (mapping_ != nullptr) ::munmap(mapping_, mapping_size_);
}

const SafetensorsTensor* SafetensorsFile::Find(std::string_view tensor_name) const {
  auto it = index_.find(tensor_name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

absl::Status SafetensorsFile::ParseAll(std::span<const uint8_t> bytes) {
  if (bytes.size() < 8) {
    return absl::InvalidArgumentError(
        StrCat("truncated file: ", bytes.size(), " bytes, too short for the 8-byte header length"));
  }
  uint64_t header_len = 0;
  std::memcpy(&header_len, bytes.data(), 8);  // little-endian host, as in gguf_file.cc
  if (header_len > bytes.size() - 8) {
    return absl::InvalidArgumentError(
        StrCat("header length ", header_len, " exceeds the file size ", bytes.size()));
  }
  if (header_len > kMaxHeaderBytes) {
    return absl::InvalidArgumentError(
        StrCat("header length ", header_len, " is above the limit of ", kMaxHeaderBytes));
  }
  const char* header = reinterpret_cast<const char*>(bytes.data() + 8);
  const nlohmann::json json = nlohmann::json::parse(header, header + header_len, /*cb=*/nullptr,
                                                    /*allow_exceptions=*/false);
  if (json.is_discarded()) return absl::InvalidArgumentError("the header is not valid JSON");
  if (!json.is_object()) return absl::InvalidArgumentError("the header is not a JSON object");

  const uint8_t* data = bytes.data() + 8 + header_len;
  const uint64_t data_size = bytes.size() - 8 - header_len;
  std::vector<std::pair<uint64_t, size_t>> by_offset;  // (begin, tensor index)
  for (const auto& [key, entry] : json.items()) {
    if (key == "__metadata__") continue;
    SafetensorsTensor t;
    uint64_t begin = 0;
    RETURN_IF_ERROR(ParseEntry(key, entry, data_size, t, begin));
    t.data = data + begin;
    by_offset.emplace_back(begin, tensors_.size());
    index_.emplace(t.name, tensors_.size());
    tensors_.push_back(std::move(t));
  }
  // Tensors must not share bytes: a writer bug or a crafted file would
  // otherwise alias weights silently.
  std::sort(by_offset.begin(), by_offset.end());
  uint64_t prev_end = 0;  // end of the previous non-empty tensor
  const SafetensorsTensor* prev = nullptr;
  for (const auto& [begin, index] : by_offset) {
    const SafetensorsTensor& t = tensors_[index];
    if (t.size_bytes == 0) continue;
    if (prev != nullptr && begin < prev_end) {
      return absl::InvalidArgumentError(
          StrCat("tensors '", prev->name, "' and '", t.name, "' overlap"));
    }
    prev_end = begin + t.size_bytes;
    prev = &t;
  }
  return absl::OkStatus();
}

}  // namespace morphserve::engine
