#include "engine/gguf/gguf_file.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <limits>

#include "common/strings.h"
#include "common/status.h"

namespace morphserve::engine {
namespace {

constexpr uint32_t kMagic = 0x46554747;  // "GGUF" little-endian
constexpr uint32_t kMaxDims = 4;
constexpr uint64_t kMaxStringBytes = 1ull << 30;

// GGML type ids as stored in the tensor directory.
std::optional<DType> DTypeFromGgml(uint32_t id) {
  switch (id) {
    case 0: return DType::kF32;
    case 1: return DType::kF16;
    case 2: return DType::kQ4_0;
    case 3: return DType::kQ4_1;
    case 6: return DType::kQ5_0;
    case 7: return DType::kQ5_1;
    case 8: return DType::kQ8_0;
    case 10: return DType::kQ2_K;
    case 11: return DType::kQ3_K;
    case 12: return DType::kQ4_K;
    case 13: return DType::kQ5_K;
    case 14: return DType::kQ6_K;
    case 15: return DType::kQ8_K;
    case 30: return DType::kBF16;
    default: return std::nullopt;
  }
}

// Bounds-checked little-endian reader over the file bytes.
class Reader {
 public:
  explicit Reader(std::span<const uint8_t> bytes) : bytes_(bytes) {}

  size_t pos() const { return pos_; }
  size_t remaining() const { return bytes_.size() - pos_; }

  absl::Status Need(uint64_t n, std::string_view what) const {
    if (n > remaining()) {
      return absl::InvalidArgumentError(StrCat("truncated file: ", what, " needs ", n,
                                                     " bytes at offset ", pos_, ", only ",
                                                     remaining(), " left"));
    }
    return absl::OkStatus();
  }

  template <typename T>
  absl::StatusOr<T> Read(std::string_view what) {
    RETURN_IF_ERROR(Need(sizeof(T), what));
    T v;
    std::memcpy(&v, bytes_.data() + pos_, sizeof(T));
    pos_ += sizeof(T);
    return v;
  }

  absl::StatusOr<std::string_view> ReadString(std::string_view what) {
    ASSIGN_OR_RETURN(uint64_t len, Read<uint64_t>(what));
    if (len > kMaxStringBytes) {
      return absl::InvalidArgumentError(StrCat(what, ": string length ", len, " too large"));
    }
    RETURN_IF_ERROR(Need(len, what));
    std::string_view s(reinterpret_cast<const char*>(bytes_.data() + pos_), len);
    pos_ += len;
    return s;
  }

  absl::StatusOr<const uint8_t*> Skip(uint64_t n, std::string_view what) {
    RETURN_IF_ERROR(Need(n, what));
    const uint8_t* p = bytes_.data() + pos_;
    pos_ += n;
    return p;
  }

 private:
  std::span<const uint8_t> bytes_;
  size_t pos_ = 0;
};

int ScalarSize(GgufType t) {
  switch (t) {
    case GgufType::kUint8:
    case GgufType::kInt8:
    case GgufType::kBool: return 1;
    case GgufType::kUint16:
    case GgufType::kInt16: return 2;
    case GgufType::kUint32:
    case GgufType::kInt32:
    case GgufType::kFloat32: return 4;
    case GgufType::kUint64:
    case GgufType::kInt64:
    case GgufType::kFloat64: return 8;
    default: return 0;
  }
}

// Decodes one numeric scalar at `p` (little-endian host assumed; checked at
// compile time below).
void DecodeScalar(GgufType t, const uint8_t* p, int64_t* integer, double* real) {
  auto load = [p](auto v) {
    std::memcpy(&v, p, sizeof(v));
    return v;
  };
  switch (t) {
    case GgufType::kUint8: *integer = load(uint8_t{}); break;
    case GgufType::kInt8: *integer = load(int8_t{}); break;
    case GgufType::kBool: *integer = load(uint8_t{}) != 0; break;
    case GgufType::kUint16: *integer = load(uint16_t{}); break;
    case GgufType::kInt16: *integer = load(int16_t{}); break;
    case GgufType::kUint32: *integer = load(uint32_t{}); break;
    case GgufType::kInt32: *integer = load(int32_t{}); break;
    case GgufType::kUint64: {
      const uint64_t u = load(uint64_t{});
      *integer = u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())
                     ? std::numeric_limits<int64_t>::max()
                     : static_cast<int64_t>(u);
      break;
    }
    case GgufType::kInt64: *integer = load(int64_t{}); break;
    case GgufType::kFloat32: *real = load(float{}); break;
    case GgufType::kFloat64: *real = load(double{}); break;
    default: break;
  }
}

static_assert(std::endian::native == std::endian::little, "GGUF reading assumes little-endian");

absl::Status ReadValue(Reader& r, GgufType type, std::string_view key, GgufValue* out,
                       int depth) {
  out->type = type;
  if (type == GgufType::kString) {
    ASSIGN_OR_RETURN(out->str, r.ReadString(key));
    return absl::OkStatus();
  }
  if (type == GgufType::kArray) {
    if (depth > 0) {
      return absl::InvalidArgumentError(StrCat("metadata '", key, "': nested arrays"));
    }
    ASSIGN_OR_RETURN(uint32_t et, r.Read<uint32_t>(key));
    ASSIGN_OR_RETURN(uint64_t count, r.Read<uint64_t>(key));
    out->elem_type = static_cast<GgufType>(et);
    out->count = count;
    if (out->elem_type == GgufType::kString) {
      // Each string takes at least its 8-byte length: bound the count first.
      if (count > r.remaining() / 8) {
        return absl::InvalidArgumentError(
            StrCat("metadata '", key, "': array of ", count, " strings exceeds the file"));
      }
      out->strings.reserve(count);
      for (uint64_t i = 0; i < count; ++i) {
        ASSIGN_OR_RETURN(std::string_view s, r.ReadString(key));
        out->strings.push_back(s);
      }
      return absl::OkStatus();
    }
    const int size = ScalarSize(out->elem_type);
    if (size == 0) {
      return absl::InvalidArgumentError(
          StrCat("metadata '", key, "': unsupported array element type ", et));
    }
    if (count > r.remaining() / size) {
      return absl::InvalidArgumentError(
          StrCat("metadata '", key, "': array of ", count, " elements exceeds the file"));
    }
    ASSIGN_OR_RETURN(out->elems, r.Skip(count * size, key));
    return absl::OkStatus();
  }
  const int size = ScalarSize(type);
  if (size == 0) {
    return absl::InvalidArgumentError(StrCat("metadata '", key, "': unknown value type ",
                                                   static_cast<uint32_t>(type)));
  }
  ASSIGN_OR_RETURN(const uint8_t* p, r.Skip(size, key));
  DecodeScalar(type, p, &out->integer, &out->real);
  return absl::OkStatus();
}

}  // namespace

std::string_view GgufTypeName(GgufType type) {
  static constexpr std::string_view kNames[] = {"uint8",  "int8",   "uint16", "int16", "uint32",
                                                "int32",  "float32", "bool",  "string", "array",
                                                "uint64", "int64",  "float64"};
  const auto i = static_cast<uint32_t>(type);
  return i < std::size(kNames) ? kNames[i] : "unknown";
}

bool GgufValue::IsInteger() const {
  return ScalarSize(type) != 0 && !IsReal();
}

int64_t GgufTensor::NumElements() const {
  int64_t n = 1;
  for (int64_t d : dims) n *= d;
  return n;
}

absl::StatusOr<std::unique_ptr<GgufFile>> GgufFile::Open(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    return absl::NotFoundError(StrCat(path, ": ", std::strerror(errno)));
  }
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    return absl::InvalidArgumentError(StrCat(path, ": not a regular file"));
  }
  const size_t size = static_cast<size_t>(st.st_size);
  if (size == 0) {
    ::close(fd);
    return absl::InvalidArgumentError(StrCat(path, ": empty file, not GGUF"));
  }
  void* map = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (map == MAP_FAILED) {
    return absl::InternalError(StrCat(path, ": mmap failed: ", std::strerror(errno)));
  }
  std::unique_ptr<GgufFile> file(new GgufFile());
  file->mapping_ = map;
  file->mapping_size_ = size;
  absl::Status st2 = file->ParseAll({static_cast<const uint8_t*>(map), size});
  if (!st2.ok()) {
    return absl::Status(st2.code(), StrCat(path, ": ", st2.message()));
  }
  return file;
}

absl::StatusOr<std::unique_ptr<GgufFile>> GgufFile::Parse(std::span<const uint8_t> bytes) {
  std::unique_ptr<GgufFile> file(new GgufFile());
  RETURN_IF_ERROR(file->ParseAll(bytes));
  return file;
}

GgufFile::~GgufFile() {
  if (mapping_ != nullptr) ::munmap(mapping_, mapping_size_);
}

absl::Status GgufFile::ParseAll(std::span<const uint8_t> bytes) {
  Reader r(bytes);
  ASSIGN_OR_RETURN(uint32_t magic, r.Read<uint32_t>("magic"));
  if (magic != kMagic) return absl::InvalidArgumentError("bad magic: not a GGUF file");
  ASSIGN_OR_RETURN(version_, r.Read<uint32_t>("version"));
  if (version_ != 2 && version_ != 3) {
    return absl::InvalidArgumentError(
        StrCat("unsupported GGUF version ", version_, " (supported: 2, 3)"));
  }
  ASSIGN_OR_RETURN(uint64_t n_tensors, r.Read<uint64_t>("tensor count"));
  ASSIGN_OR_RETURN(uint64_t n_kv, r.Read<uint64_t>("metadata count"));
  // Each key/value takes at least 12 bytes and each tensor entry at least 24.
  if (n_kv > r.remaining() / 12) {
    return absl::InvalidArgumentError(StrCat("metadata count ", n_kv, " exceeds the file"));
  }
  for (uint64_t i = 0; i < n_kv; ++i) {
    ASSIGN_OR_RETURN(std::string_view key, r.ReadString("metadata key"));
    ASSIGN_OR_RETURN(uint32_t type, r.Read<uint32_t>(key));
    GgufValue value;
    RETURN_IF_ERROR(ReadValue(r, static_cast<GgufType>(type), key, &value, 0));
    if (!metadata_.emplace(std::string(key), std::move(value)).second) {
      return absl::InvalidArgumentError(StrCat("duplicate metadata key '", key, "'"));
    }
  }
  if (const GgufValue* a = Find("general.alignment"); a != nullptr) {
    if (!a->IsInteger() || a->integer <= 0 || a->integer > (1 << 20) ||
        (a->integer & (a->integer - 1)) != 0) {
      return absl::InvalidArgumentError("general.alignment must be a power of two");
    }
    alignment_ = static_cast<uint32_t>(a->integer);
  }

  if (n_tensors > r.remaining() / 24) {
    return absl::InvalidArgumentError(
        StrCat("tensor count ", n_tensors, " exceeds the file"));
  }
  tensors_.reserve(n_tensors);
  for (uint64_t i = 0; i < n_tensors; ++i) {
    GgufTensor t;
    ASSIGN_OR_RETURN(std::string_view name, r.ReadString("tensor name"));
    t.name = std::string(name);
    ASSIGN_OR_RETURN(uint32_t n_dims, r.Read<uint32_t>(name));
    if (n_dims == 0 || n_dims > kMaxDims) {
      return absl::InvalidArgumentError(
          StrCat("tensor '", name, "': ", n_dims, " dimensions (1 to 4 allowed)"));
    }
    int64_t elems = 1;
    for (uint32_t d = 0; d < n_dims; ++d) {
      ASSIGN_OR_RETURN(uint64_t dim, r.Read<uint64_t>(name));
      if (dim == 0 || dim > (1ull << 40) ||
          static_cast<uint64_t>(elems) > (1ull << 50) / dim) {
        return absl::InvalidArgumentError(
            StrCat("tensor '", name, "': bad dimension ", dim));
      }
      elems *= static_cast<int64_t>(dim);
      t.dims.push_back(static_cast<int64_t>(dim));
    }
    ASSIGN_OR_RETURN(uint32_t type_id, r.Read<uint32_t>(name));
    const std::optional<DType> dtype = DTypeFromGgml(type_id);
    if (!dtype) {
      return absl::InvalidArgumentError(
          StrCat("tensor '", name, "': unsupported tensor type id ", type_id));
    }
    t.dtype = *dtype;
    const DTypeInfo& info = GetDTypeInfo(t.dtype);
    if (t.dims[0] % info.block_elems != 0) {
      return absl::InvalidArgumentError(
          StrCat("tensor '", name, "': row length ", t.dims[0],
                       " is not a multiple of the ", info.name, " block size ",
                       info.block_elems));
    }
    t.size_bytes = static_cast<uint64_t>(elems / info.block_elems) * info.block_bytes;
    ASSIGN_OR_RETURN(t.offset, r.Read<uint64_t>(name));
    if (t.offset % alignment_ != 0) {
      return absl::InvalidArgumentError(StrCat("tensor '", name, "': offset ", t.offset,
                                                     " is not aligned to ", alignment_));
    }
    if (!tensor_index_.emplace(t.name, tensors_.size()).second) {
      return absl::InvalidArgumentError(StrCat("duplicate tensor '", name, "'"));
    }
    tensors_.push_back(std::move(t));
  }

  const uint64_t data_start = (r.pos() + alignment_ - 1) / alignment_ * alignment_;
  const uint64_t data_size = bytes.size() >= data_start ? bytes.size() - data_start : 0;
  for (GgufTensor& t : tensors_) {
    if (t.offset > data_size || t.size_bytes > data_size - t.offset) {
      return absl::InvalidArgumentError(
          StrCat("tensor '", t.name, "': data [", t.offset, ", ", t.offset + t.size_bytes,
                       ") runs past the end of the file (data section is ", data_size,
                       " bytes): truncated file?"));
    }
    t.data = bytes.data() + data_start + t.offset;
  }
  return absl::OkStatus();
}

const GgufValue* GgufFile::Find(std::string_view key) const {
  auto it = metadata_.find(key);
  return it == metadata_.end() ? nullptr : &it->second;
}

const GgufTensor* GgufFile::FindTensor(std::string_view name) const {
  auto it = tensor_index_.find(name);
  return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

namespace {
absl::Status WrongType(std::string_view key, const GgufValue& v, std::string_view want) {
  return absl::InvalidArgumentError(StrCat("metadata '", key, "' has type ",
                                                 GgufTypeName(v.type), ", expected ", want));
}
}  // namespace

absl::StatusOr<std::optional<int64_t>> GgufFile::GetInt(std::string_view key) const {
  const GgufValue* v = Find(key);
  if (v == nullptr) return std::nullopt;
  if (!v->IsInteger()) return WrongType(key, *v, "an integer");
  return v->integer;
}

absl::StatusOr<std::optional<double>> GgufFile::GetReal(std::string_view key) const {
  const GgufValue* v = Find(key);
  if (v == nullptr) return std::nullopt;
  if (v->IsReal()) return v->real;
  if (v->IsInteger()) return static_cast<double>(v->integer);
  return WrongType(key, *v, "a number");
}

absl::StatusOr<std::optional<bool>> GgufFile::GetBool(std::string_view key) const {
  const GgufValue* v = Find(key);
  if (v == nullptr) return std::nullopt;
  if (!v->IsInteger()) return WrongType(key, *v, "a bool");
  return v->integer != 0;
}

absl::StatusOr<std::optional<std::string_view>> GgufFile::GetString(std::string_view key) const {
  const GgufValue* v = Find(key);
  if (v == nullptr) return std::nullopt;
  if (v->type != GgufType::kString) return WrongType(key, *v, "a string");
  return v->str;
}

absl::StatusOr<std::optional<std::span<const std::string_view>>> GgufFile::GetStringArray(
    std::string_view key) const {
  const GgufValue* v = Find(key);
  if (v == nullptr) return std::nullopt;
  if (v->type != GgufType::kArray || v->elem_type != GgufType::kString) {
    return WrongType(key, *v, "an array of strings");
  }
  return std::span<const std::string_view>(v->strings);
}

absl::StatusOr<std::optional<std::vector<float>>> GgufFile::GetRealArray(
    std::string_view key) const {
  const GgufValue* v = Find(key);
  if (v == nullptr) return std::nullopt;
  const int size = ScalarSize(v->elem_type);
  if (v->type != GgufType::kArray || size == 0) return WrongType(key, *v, "a numeric array");
  std::vector<float> out(v->count);
  for (uint64_t i = 0; i < v->count; ++i) {
    int64_t iv = 0;
    double rv = 0;
    DecodeScalar(v->elem_type, v->elems + i * size, &iv, &rv);
    const bool real = v->elem_type == GgufType::kFloat32 || v->elem_type == GgufType::kFloat64;
    out[i] = static_cast<float>(real ? rv : static_cast<double>(iv));
  }
  return out;
}

absl::StatusOr<std::optional<std::vector<int64_t>>> GgufFile::GetIntArray(
    std::string_view key) const {
  const GgufValue* v = Find(key);
  if (v == nullptr) return std::nullopt;
  const int size = ScalarSize(v->elem_type);
  const bool real = v->elem_type == GgufType::kFloat32 || v->elem_type == GgufType::kFloat64;
  if (v->type != GgufType::kArray || size == 0 || real) {
    return WrongType(key, *v, "an integer array");
  }
  std::vector<int64_t> out(v->count);
  for (uint64_t i = 0; i < v->count; ++i) {
    double unused = 0;
    DecodeScalar(v->elem_type, v->elems + i * size, &out[i], &unused);
  }
  return out;
}

}  // namespace morphserve::engine
