// The KV policy flags shared by the commands that run the engine
// (generate, eval, and later batch and serve), and the usage figures they
// report.
#ifndef MORPHSERVE_SERVER_CLI_KV_OPTIONS_H_
#define MORPHSERVE_SERVER_CLI_KV_OPTIONS_H_

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "common/kv_policy.h"
#include "engine/kv/kv_sequence.h"
#include "engine/model/model_config.h"
#include "nlohmann/json.hpp"
#include "server/cli/arg_parser.h"

namespace morphserve::cli {

struct KvFlags {
  std::string policy = "full";
  int64_t window = 32;
  int64_t capacity = 512;
  std::string fusion = "sum";
  int64_t sinks = 4;
  std::string aggregation = "group-logit-sum";
};

void AddKvFlags(ArgParser& parser, KvFlags* flags);

// Parses and validates against the model's context length.
absl::StatusOr<KvPolicyConfig> KvPolicyFromFlags(const KvFlags& flags, int64_t context_length);

// A size in bytes: "2GiB", "512MiB", "1.5GB", "1000000". Errors name `flag`.
absl::StatusOr<int64_t> ParseByteSize(const std::string& text, std::string_view flag);

// Adds kv_tokens_resident, kv_tokens_full_equivalent, kv_bytes_resident,
// kv_bytes_saved and kv_tokens_evicted to `usage`.
void AddKvUsage(const engine::KvUsage& kv, nlohmann::json& usage);

}  // namespace morphserve::cli

#endif  // MORPHSERVE_SERVER_CLI_KV_OPTIONS_H_
