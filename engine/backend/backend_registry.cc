#include "engine/backend/backend_registry.h"

namespace morphserve::engine {

std::vector<std::string> BuiltBackends() {
  std::vector<std::string> backends = {"cpu"};
#ifdef MORPHSERVE_WITH_CUDA
  backends.push_back("cuda");
#endif
  return backends;
}

}  // namespace morphserve::engine
