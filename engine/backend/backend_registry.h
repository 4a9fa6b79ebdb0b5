// Which compute backends this binary was built with. The one place that
// knows whether CUDA was compiled in.
#ifndef MORPHSERVE_ENGINE_BACKEND_BACKEND_REGISTRY_H_
#define MORPHSERVE_ENGINE_BACKEND_BACKEND_REGISTRY_H_

#include <string>
#include <vector>

namespace morphserve::engine {

// e.g. {"cpu"} or {"cpu", "cuda"}.
std::vector<std::string> BuiltBackends();

}  // namespace morphserve::engine

#endif  // MORPHSERVE_ENGINE_BACKEND_BACKEND_REGISTRY_H_
