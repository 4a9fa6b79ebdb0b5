// KV policy parameters: parsing, validation messages, and the slot bound the
// scheduler reserves.
#include "common/kv_policy.h"

#include <string>

#include "gtest/gtest.h"

namespace morphserve {
namespace {

KvPolicyConfig Config(KvPolicyKind kind, int64_t window, int64_t capacity) {
  KvPolicyConfig c;
  c.kind = kind;
  c.window = window;
  c.capacity = capacity;
  return c;
}

void ExpectError(const KvPolicyConfig& c, const std::string& field, int64_t context = 2048) {
  const absl::Status s = c.Validate(context);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_NE(std::string(s.message()).find(field), std::string::npos) << s;
}

TEST(KvPolicyConfig, ParsesNamesAndRejectsUnknownOnes) {
  for (const char* name : {"full", "morphkv", "h2o", "snapkv", "streaming"}) {
    const auto kind = ParseKvPolicyKind(name);
    ASSERT_TRUE(kind.ok()) << name;
    EXPECT_EQ(KvPolicyName(*kind), name);
  }
  const auto bad = ParseKvPolicyKind("morph");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(std::string(bad.status().message()).find("kv_policy"), std::string::npos);
  EXPECT_TRUE(ParseKvFusion("max").ok());
  const auto fusion = ParseKvFusion("mean");
  ASSERT_FALSE(fusion.ok());
  EXPECT_NE(std::string(fusion.status().message()).find("kv_fusion"), std::string::npos);
  EXPECT_EQ(*ParseMorphKvAggregation("group-max-prob"), MorphKvAggregation::kGroupMaxProb);
  EXPECT_FALSE(ParseMorphKvAggregation("sum").ok());
}

TEST(KvPolicyConfig, ValidationNamesTheParameter) {
  EXPECT_TRUE(Config(KvPolicyKind::kMorphKv, 32, 512).Validate(2048).ok());
  EXPECT_TRUE(Config(KvPolicyKind::kFull, 0, 0).Validate(2048).ok());  // parameters unused
  ExpectError(Config(KvPolicyKind::kMorphKv, 0, 512), "kv_window");
  ExpectError(Config(KvPolicyKind::kH2o, 32, 32), "kv_capacity");
  ExpectError(Config(KvPolicyKind::kStreaming, 8, 4), "kv_capacity");
  ExpectError(Config(KvPolicyKind::kMorphKv, 32, 4096), "context length");
  ExpectError(Config(KvPolicyKind::kSnapKv, 8, 32), "kv_capacity");
  KvPolicyConfig variant_a = Config(KvPolicyKind::kMorphKv, 1, 64);
  variant_a.aggregation = MorphKvAggregation::kGroupMaxProb;
  ExpectError(variant_a, "kv_window");
  KvPolicyConfig sinks = Config(KvPolicyKind::kStreaming, 8, 16);
  sinks.sinks = 9;
  ExpectError(sinks, "kv_sinks");
  sinks.sinks = -1;
  ExpectError(sinks, "kv_sinks");
  sinks.sinks = 8;
  EXPECT_TRUE(sinks.Validate(2048).ok());
}

TEST(KvPolicyConfig, MaxSlotsIsTheMostEverHeld) {
  // 100 prompt tokens, 50 generated: the last is never written.
  EXPECT_EQ(Config(KvPolicyKind::kFull, 8, 64).MaxSlots(100, 50), 149);
  // Bounded: the whole prompt during prefill, C+1 after.
  EXPECT_EQ(Config(KvPolicyKind::kMorphKv, 8, 64).MaxSlots(100, 50), 100);
  EXPECT_EQ(Config(KvPolicyKind::kH2o, 8, 64).MaxSlots(10, 500), 65);
  EXPECT_EQ(Config(KvPolicyKind::kStreaming, 8, 64).MaxSlots(10, 20), 29);
  // SnapKV: the prompt, then C plus the response.
  EXPECT_EQ(Config(KvPolicyKind::kSnapKv, 8, 64).MaxSlots(100, 50), 113);
  EXPECT_EQ(Config(KvPolicyKind::kSnapKv, 8, 64).MaxSlots(40, 50), 89);
}

}  // namespace
}  // namespace morphserve
