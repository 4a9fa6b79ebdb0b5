#include "kernels/cuda/device_buffer.h"

#include <cuda_runtime_api.h>

#include <utility>

#include "absl/strings/str_cat.h"
#include "kernels/cuda/cuda_status.h"

namespace morphserve::kernels::cuda {

absl::StatusOr<DeviceBuffer> DeviceBuffer::Allocate(size_t bytes) {
  DeviceBuffer buffer;
  if (bytes == 0) return buffer;
  RETURN_IF_CUDA_ERROR(cudaMalloc(&buffer.data_, bytes));
  buffer.size_ = bytes;
  return buffer;
}

DeviceBuffer::DeviceBuffer(DeviceBuffer&& other) noexcept
    : data_(std::exchange(other.data_, nullptr)), size_(std::exchange(other.size_, 0)) {}

DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& other) noexcept {
  if (this != &other) {
    Release();
    data_ = std::exchange(other.data_, nullptr);
    size_ = std::exchange(other.size_, 0);
  }
  return *this;
}

DeviceBuffer::~DeviceBuffer() { Release(); }

void DeviceBuffer::Release() {
  // cudaFree synchronises the device, so nothing still running can use the
  // memory afterwards. Its error (if the context is already gone) has
  // nowhere to go from a destructor.
  if (data_ != nullptr) cudaFree(data_);
  data_ = nullptr;
  size_ = 0;
}

absl::Status DeviceBuffer::CopyFromHost(const void* src, size_t bytes) {
  if (bytes > size_) {
    return absl::InvalidArgumentError(
        absl::StrCat("copy of ", bytes, " bytes into a device buffer of ", size_));
  }
  if (bytes == 0) return absl::OkStatus();
  RETURN_IF_CUDA_ERROR(cudaMemcpy(data_, src, bytes, cudaMemcpyHostToDevice));
  // From pageable memory cudaMemcpy may return before the device has the
  // data, and a non-blocking stream would not wait for it.
  return CudaStatus(cudaDeviceSynchronize(), "cudaDeviceSynchronize after cudaMemcpy");
}

absl::Status DeviceBuffer::CopyToHost(void* dst, size_t bytes) const {
  if (bytes > size_) {
    return absl::InvalidArgumentError(
        absl::StrCat("copy of ", bytes, " bytes out of a device buffer of ", size_));
  }
  if (bytes == 0) return absl::OkStatus();
  // Kernels on a non-blocking stream are not ordered with cudaMemcpy.
  RETURN_IF_CUDA_ERROR(cudaDeviceSynchronize());
  return CudaStatus(cudaMemcpy(dst, data_, bytes, cudaMemcpyDeviceToHost),
                    "cudaMemcpy(dst, data_, bytes, cudaMemcpyDeviceToHost)");
}

absl::Status DeviceBuffer::Fill(uint8_t value) {
  if (size_ == 0) return absl::OkStatus();
  RETURN_IF_CUDA_ERROR(cudaMemset(data_, value, size_));
  // cudaMemset may return before the device has written.
  return CudaStatus(cudaDeviceSynchronize(), "cudaDeviceSynchronize after cudaMemset");
}

}  // namespace morphserve::kernels::cuda
