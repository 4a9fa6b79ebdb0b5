// Turns a GenerateRequest into the engine's GenerationRequest: input
// rendering and tokenization, server defaults, and validation of every field
// (errors name the field; their codes are the gRPC codes to return).
// Stateless; safe on any thread.
#ifndef MORPHSERVE_SERVER_REQUEST_BUILDER_H_
#define MORPHSERVE_SERVER_REQUEST_BUILDER_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/kv_policy.h"
#include "engine/model/model.h"
#include "morphserve/v1/generation.pb.h"
#include "server/engine_loop.h"

namespace morphserve::server {

struct ServerDefaults {
  // Accepted bearer tokens (`authorization: Bearer KEY`); empty: no auth.
  std::vector<std::string> api_keys;
  KvPolicyConfig kv;
  // When the request leaves it unset; capped at what the context leaves
  // after the prompt.
  int64_t max_new_tokens = 256;
  int64_t max_new_tokens_limit = 4096;  // the most a request may ask for
};

// Limits on request fields, documented in docs/api.md (the stop string
// limits are the engine's kMaxStopStrings and kMaxStopStringBytes).
inline constexpr size_t kMaxStopTokenIds = 64;
// Request ids are echoed into responses and logs.
inline constexpr size_t kMaxRequestIdBytes = 128;

absl::StatusOr<GenerationRequest> BuildGenerationRequest(const v1::GenerateRequest& request,
                                                         const engine::Model& model,
                                                         const ServerDefaults& defaults);

// The request's KV policy: the defaults, overridden field by field, checked
// against the model's context length.
absl::StatusOr<KvPolicyConfig> KvPolicyFromProto(const v1::KvParams& kv,
                                                 const KvPolicyConfig& defaults,
                                                 int64_t context_length);

// Prompt tokens of text or chat input, as Generate would use them.
absl::StatusOr<std::vector<int32_t>> TokenizeInput(const engine::Model& model,
                                                   const v1::TokenizeRequest& request);

}  // namespace morphserve::server

#endif  // MORPHSERVE_SERVER_REQUEST_BUILDER_H_
