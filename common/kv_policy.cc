#include "common/kv_policy.h"

#include <algorithm>
#include <array>
#include <utility>

#include "common/strings.h"

namespace morphserve {
namespace {

constexpr std::array<std::pair<std::string_view, KvPolicyKind>, 5> kPolicies = {{
    {"full", KvPolicyKind::kFull},
    {"morphkv", KvPolicyKind::kMorphKv},
    {"h2o", KvPolicyKind::kH2o},
    {"snapkv", KvPolicyKind::kSnapKv},
    {"streaming", KvPolicyKind::kStreaming},
}};
constexpr std::array<std::pair<std::string_view, KvFusion>, 2> kFusions = {{
    {"sum", KvFusion::kSum},
    {"max", KvFusion::kMax},
}};
constexpr std::array<std::pair<std::string_view, MorphKvAggregation>, 2> kAggregations = {{
    {"group-logit-sum", MorphKvAggregation::kGroupLogitSum},
    {"group-max-prob", MorphKvAggregation::kGroupMaxProb},
}};

template <typename T, size_t N>
absl::StatusOr<T> Lookup(const std::array<std::pair<std::string_view, T>, N>& table,
                         std::string_view name, std::string_view what) {
  std::string known;
  for (const auto& [n, v] : table) {
    if (n == name) return v;
    StrAppend(&known, known.empty() ? "" : ", ", n);
  }
  return absl::InvalidArgumentError(
      StrCat("unknown ", what, " '", name, "' (expected one of: ", known, ")"));
}

template <typename T, size_t N>
std::string_view NameOf(const std::array<std::pair<std::string_view, T>, N>& table, T value) {
  for (const auto& [n, v] : table) {
    if (v == value) return n;
  }
  return "?";
}

}  // namespace

absl::StatusOr<KvPolicyKind> ParseKvPolicyKind(std::string_view name) {
  return Lookup(kPolicies, name, "kv_policy");
}
absl::StatusOr<KvFusion> ParseKvFusion(std::string_view name) {
  return Lookup(kFusions, name, "kv_fusion");
}
absl::StatusOr<MorphKvAggregation> ParseMorphKvAggregation(std::string_view name) {
  return Lookup(kAggregations, name, "kv_aggregation");
}
std::string_view KvPolicyName(KvPolicyKind kind) { return NameOf(kPolicies, kind); }
std::string_view KvFusionName(KvFusion fusion) { return NameOf(kFusions, fusion); }
std::string_view MorphKvAggregationName(MorphKvAggregation aggregation) {
  return NameOf(kAggregations, aggregation);
}

absl::Status KvPolicyConfig::Validate(int64_t context_length) const {
  if (kind == KvPolicyKind::kFull) return absl::OkStatus();
  const std::string_view policy = KvPolicyName(kind);
  if (kind == KvPolicyKind::kSnapKv) {
    if (capacity <= kSnapKvObservationWindow) {
      return absl::InvalidArgumentError(
          StrCat("kv_capacity must be above snapkv's observation window of ",
                 kSnapKvObservationWindow, " (got ", capacity, ")"));
    }
  } else {
    const int64_t min_window =
        kind == KvPolicyKind::kMorphKv && aggregation == MorphKvAggregation::kGroupMaxProb ? 2
                                                                                           : 1;
    if (window < min_window) {
      return absl::InvalidArgumentError(StrCat("kv_window must be at least ", min_window,
                                               " for ", policy, " (got ", window, ")"));
    }
    if (capacity <= window) {
      return absl::InvalidArgumentError(StrCat("kv_capacity (", capacity,
                                               ") must be larger than kv_window (", window,
                                               ") for ", policy));
    }
  }
  if (capacity + 1 > context_length) {
    return absl::InvalidArgumentError(StrCat("kv_capacity ", capacity,
                                             " is beyond the model's context length ",
                                             context_length));
  }
  if (kind == KvPolicyKind::kStreaming && (sinks < 0 || sinks > capacity - window)) {
    return absl::InvalidArgumentError(
        StrCat("kv_sinks must be in [0, kv_capacity - kv_window] = [0, ", capacity - window,
               "] so that the ", window + 1, " most recent tokens fit (got ", sinks, ")"));
  }
  return absl::OkStatus();
}

int64_t KvPolicyConfig::MaxSlots(int64_t prompt_tokens, int64_t max_new_tokens) const {
  // The last generated token is returned, never written to the cache.
  const int64_t written = prompt_tokens + std::max<int64_t>(max_new_tokens - 1, 0);
  switch (kind) {
    case KvPolicyKind::kFull:
      return written;
    case KvPolicyKind::kSnapKv: {
      const int64_t kept = prompt_tokens >= capacity ? capacity : prompt_tokens;
      return std::max(prompt_tokens, written - prompt_tokens + kept);
    }
    case KvPolicyKind::kMorphKv:
    case KvPolicyKind::kH2o:
    case KvPolicyKind::kStreaming:
      return std::max(prompt_tokens, std::min(written, capacity + 1));
  }
  return written;
}

int64_t KvPolicyConfig::SlotsHeld(int64_t prompt_tokens, int64_t tokens) const {
  if (tokens < prompt_tokens) return tokens;
  switch (kind) {
    case KvPolicyKind::kFull:
      return tokens;
    case KvPolicyKind::kSnapKv:
      return prompt_tokens > capacity ? capacity + tokens - prompt_tokens : tokens;
    case KvPolicyKind::kMorphKv:
    case KvPolicyKind::kH2o:
    case KvPolicyKind::kStreaming:
      return std::min(tokens, capacity + 1);
  }
  return tokens;
}

int64_t KvPolicyConfig::SlotsForStep(int64_t prompt_tokens, int64_t tokens, int64_t n) const {
  if (tokens < prompt_tokens) return tokens + n;
  return SlotsHeld(prompt_tokens, tokens + n);
}

}  // namespace morphserve
