// Which compute backends this binary was built with, and which one a
// `--device` flag selects. The one place that knows whether CUDA was
// compiled in.
#ifndef MORPHSERVE_ENGINE_BACKEND_BACKEND_REGISTRY_H_
#define MORPHSERVE_ENGINE_BACKEND_BACKEND_REGISTRY_H_

#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace morphserve::engine {

// e.g. {"cpu"} or {"cpu", "cuda"}.
std::vector<std::string> BuiltBackends();

// The device that `--device requested` (auto, cpu or cuda) runs on. `auto`
// picks the best one that can run the forward pass here.
absl::StatusOr<std::string> ResolveDevice(std::string_view requested);

}  // namespace morphserve::engine

#endif  // MORPHSERVE_ENGINE_BACKEND_BACKEND_REGISTRY_H_
