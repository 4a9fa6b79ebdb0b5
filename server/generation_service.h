// The morphserve.v1.Generation service on gRPC's callback API. Generate
// returns a reactor that drains the request's TokenStream with at most one
// write in flight; the engine only ever calls a notification callable that
// stays safe after the reactor is gone.
#ifndef MORPHSERVE_SERVER_GENERATION_SERVICE_H_
#define MORPHSERVE_SERVER_GENERATION_SERVICE_H_

#include <cstdint>
#include <memory>
#include <string>

#include "engine/model/model.h"
#include "grpcpp/grpcpp.h"
#include "server/engine_loop.h"
#include "server/metrics.h"
#include "server/request_builder.h"

namespace morphserve::server {

// absl and gRPC share their status codes.
grpc::Status ToGrpcStatus(const absl::Status& status);
std::string StatusCodeName(grpc::StatusCode code);  // e.g. INVALID_ARGUMENT

class GenerationServiceImpl;

class GenerationService {
 public:
  // `model` and `engine` must outlive the service.
  GenerationService(const engine::Model& model, EngineLoop* engine, ServerDefaults defaults);
  ~GenerationService();
  GenerationService(const GenerationService&) = delete;
  GenerationService& operator=(const GenerationService&) = delete;

  // What to register with the grpc::ServerBuilder.
  grpc::Service* grpc_service();
  // New Generate calls get UNAVAILABLE from now on.
  void StartDraining();
  // Generate streams not yet finished.
  int64_t active_streams() const;
  // Generate calls refused before they started, by status code.
  Rejections rejections() const;
  // Logs each request's prompt and reply text (off by default).
  void set_log_prompts(bool on);

 private:
  std::unique_ptr<GenerationServiceImpl> impl_;
};

}  // namespace morphserve::server

#endif  // MORPHSERVE_SERVER_GENERATION_SERVICE_H_
