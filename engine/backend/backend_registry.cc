#include "engine/backend/backend_registry.h"

#include "common/strings.h"

namespace morphserve::engine {

std::vector<std::string> BuiltBackends() {
  std::vector<std::string> backends = {"cpu"};
#ifdef MORPHSERVE_WITH_CUDA
  backends.push_back("cuda");
#endif
  return backends;
}

absl::StatusOr<std::string> ResolveDevice(std::string_view requested) {
  // The forward pass runs on the CPU backend; the CUDA kernels exist but the
  // engine does not drive them yet, so `auto` stays on the CPU.
  if (requested == "cpu" || requested == "auto") return std::string("cpu");
  if (requested == "cuda") {
#ifdef MORPHSERVE_WITH_CUDA
    return absl::UnimplementedError(
        "--device cuda: the CUDA forward pass is not available in this version; use --device cpu");
#else
    return absl::FailedPreconditionError(
        "--device cuda: this binary was built without CUDA (it is built where nvcc is found)");
#endif
  }
  return absl::InvalidArgumentError(
      StrCat("--device: unknown device '", requested, "' (auto, cpu or cuda)"));
}

}  // namespace morphserve::engine
