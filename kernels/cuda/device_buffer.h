// An owned device allocation (cudaMalloc'd, freed on destruction; move-only)
// with synchronous copies to and from the host. Meant for set-up and tests:
// nothing here belongs on a per-step path.
#ifndef MORPHSERVE_KERNELS_CUDA_DEVICE_BUFFER_H_
#define MORPHSERVE_KERNELS_CUDA_DEVICE_BUFFER_H_

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace morphserve::kernels::cuda {

class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  // `bytes` == 0 gives an empty buffer (null data).
  static absl::StatusOr<DeviceBuffer> Allocate(size_t bytes);
  // A buffer holding a copy of `host`.
  template <typename T>
  static absl::StatusOr<DeviceBuffer> FromHost(std::span<const T> host);

  DeviceBuffer(DeviceBuffer&& other) noexcept;
  DeviceBuffer& operator=(DeviceBuffer&& other) noexcept;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer();

  void* data() const { return data_; }
  size_t size() const { return size_; }
  template <typename T>
  T* as() const {
    return static_cast<T*>(data_);
  }

  // Copies `bytes` (at most size()) between the host and the buffer's start;
  // both wait for the whole device, so they are ordered with kernels on any
  // stream.
  absl::Status CopyFromHost(const void* src, size_t bytes);
  absl::Status CopyToHost(void* dst, size_t bytes) const;
  // Sets every byte to `value` (0xff poisons f32 and bf16 with NaN).
  absl::Status Fill(uint8_t value);

  // The whole buffer as size() / sizeof(T) elements.
  template <typename T>
  absl::StatusOr<std::vector<T>> ToHost() const;

 private:
  void Release();

  void* data_ = nullptr;
  size_t size_ = 0;
};

template <typename T>
absl::StatusOr<DeviceBuffer> DeviceBuffer::FromHost(std::span<const T> host) {
  absl::StatusOr<DeviceBuffer> buffer = Allocate(host.size_bytes());
  if (!buffer.ok()) return buffer.status();
  if (absl::Status s = buffer->CopyFromHost(host.data(), host.size_bytes()); !s.ok()) return s;
  return buffer;
}

template <typename T>
absl::StatusOr<std::vector<T>> DeviceBuffer::ToHost() const {
  std::vector<T> host(size_ / sizeof(T));
  if (absl::Status s = CopyToHost(host.data(), host.size() * sizeof(T)); !s.ok()) return s;
  return host;
}

}  // namespace morphserve::kernels::cuda

#endif  // MORPHSERVE_KERNELS_CUDA_DEVICE_BUFFER_H_
