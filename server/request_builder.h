// Turns a GenerateRequest into the engine's GenerationRequest: input
// rendering and tokenization, server defaults, and validation of every field
// (errors name the field; their codes are the gRPC codes to return).
// Stateless; safe on any thread.
#ifndef MORPHSERVE_SERVER_REQUEST_BUILDER_H_
#define MORPHSERVE_SERVER_REQUEST_BUILDER_H_

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
  int64_t max_new_tokens = 256;         // when the request leaves it unset
  int64_t max_new_tokens_limit = 4096;  // the most a request may ask for
};

absl::StatusOr<GenerationRequest> BuildGenerationRequest(const v1::GenerateRequest& request,
                                                         const engine::Model& model,
                                                         const ServerDefaults& defaults);

// The request's KV policy: the defaults, overridden field by field.
absl::StatusOr<KvPolicyConfig> KvPolicyFromProto(const v1::KvParams& kv,
                                                 const KvPolicyConfig& defaults);

// Prompt tokens of text or chat input, as Generate would use them.
absl::StatusOr<std::vector<int32_t>> TokenizeInput(const engine::Model& model,
                                                   const v1::TokenizeRequest& request);

bool IsValidUtf8(std::string_view text);

}  // namespace morphserve::server

#endif  // MORPHSERVE_SERVER_REQUEST_BUILDER_H_
