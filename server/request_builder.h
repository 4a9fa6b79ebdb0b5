// Turns a GenerateRequest into the engine's GenerationRequest: input
// rendering and tokenization, server defaults, and validation of every field
// (errors name the field; their codes are the gRPC codes to return).
// Stateless; safe on any thread.
#ifndef MORPHSERVE_SERVER_REQUEST_BUILDER_H_
#define MORPHSERVE_SERVER_REQUEST_BUILDER_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
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

// The most stop token ids a request may give (the stop string limits are
// the engine's kMaxStopStrings and kMaxStopStringBytes); docs/api.md.
inline constexpr size_t kMaxStopTokenIds = 64;

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

// A client's request id goes into logs and responses as is: at most 256
// bytes of printable ASCII without spaces. BuildGenerationRequest checks it
// too; this is for callers that log the id before building.
absl::Status CheckRequestId(std::string_view id);

// Strict UTF-8 (no overlong forms, surrogates or values past U+10FFFF), as
// every string field must hold.
bool IsValidUtf8(std::string_view text);

}  // namespace morphserve::server

#endif  // MORPHSERVE_SERVER_REQUEST_BUILDER_H_
