// Each supported family renders exactly what its Jinja template renders.
// Templates are the models' own (shortened only where the tool-calling parts
// are irrelevant); several expected strings come from llama.cpp's
// test-chat-template, which renders the same templates with a Jinja engine.
#include "engine/chat/chat_template.h"

#include <algorithm>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/engine/tokenizer/fixtures.h"

namespace morphserve::engine {
namespace {

using ::testing::HasSubstr;

constexpr char kSmolLm2[] =
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ "
    "'<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ "
    "'<|im_start|>assistant\n' }}{% endif %}";

constexpr char kQwen25[] = R"({%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\n<tools>" }}
    {{- "\n</tools><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
)";

constexpr char kOpenHermes[] =
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ "
    "'<|im_start|>assistant\\n' }}{% endif %}";

constexpr char kLlama3[] =
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | "
    "trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% "
    "endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ "
    "'<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

constexpr char kLlama31[] = R"({{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
)";

constexpr char kLlama2[] =
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set "
    "system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% "
    "set system_message = false %}{% endif %}{% for message in loop_messages %}{% if "
    "(message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation "
    "roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 == "
    "0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
    "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] "
    "%}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() "
    "+ ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + "
    "eos_token }}{% endif %}{% endfor %}";

constexpr char kMistralV1[] =
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != "
    "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
    "user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ "
    "'[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ "
    "message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant "
    "roles are supported!') }}{% endif %}{% endfor %}";

constexpr char kMistralV1System[] =
    "{%- if messages[0]['role'] == 'system' %}\n    {%- set system_message = "
    "messages[0]['content'] %}\n    {%- set loop_messages = messages[1:] %}\n{%- else %}\n    "
    "{%- set loop_messages = messages %}\n{%- endif %}\n\n{{- bos_token }}\n{%- for message in "
    "loop_messages %}\n    {%- if message['role'] == 'user' %}\n        {%- if loop.first and "
    "system_message is defined %}\n            {{- ' [INST] ' + system_message + '\\n\\n' + "
    "message['content'] + ' [/INST]' }}\n        {%- else %}\n            {{- ' [INST] ' + "
    "message['content'] + ' [/INST]' }}\n        {%- endif %}\n    {%- elif message['role'] == "
    "'assistant' %}\n        {{- ' ' + message['content'] + eos_token}}\n    {%- endif %}\n{%- "
    "endfor %}\n";

constexpr char kMistralV3[] = R"({%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\n\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"]|trim + eos_token}}
    {%- endif %}
{%- endfor %}
)";

constexpr char kPhi35[] =
    "{% for message in messages %}{% if message['role'] == 'system' and message['content'] "
    "%}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' "
    "%}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == "
    "'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% "
    "endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% "
    "endif %}";

constexpr char kPhi3Mini[] =
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') "
    "%}{{'<|user|>' + '\n' + message['content'] + '<|end|>' + '\n' + '<|assistant|>' + "
    "'\n'}}{% elif (message['role'] == 'assistant') %}{{message['content'] + '<|end|>' + "
    "'\n'}}{% endif %}{% endfor %}";

// The conversation of llama.cpp's test-chat-template.
const std::vector<ChatMessage> kLong = {
    {"system", "You are a helpful assistant"},
    {"user", "Hello"},
    {"assistant", "Hi there"},
    {"user", "Who are you"},
    {"assistant", "   I am an assistant   "},
    {"user", "Another question"},
};
// system + user + assistant + user.
const std::vector<ChatMessage> kShort = {
    {"system", "You are terse."}, {"user", "Hi"}, {"assistant", "Hello."}, {"user", "Bye?"}};
const std::vector<ChatMessage> kNoSystem = {{"user", "Hi"}};

std::string Render(std::string_view tmpl, const std::vector<ChatMessage>& messages,
                   bool add_generation_prompt = true, std::string bos = "",
                   std::string eos = "</s>") {
  auto t = ChatTemplate::FromTemplate(tmpl, std::move(bos), std::move(eos));
  EXPECT_TRUE(t.ok()) << t.status();
  if (!t.ok()) return "";
  auto text = t->Render(messages, add_generation_prompt);
  EXPECT_TRUE(text.ok()) << text.status();
  return text.ok() ? *text : "";
}

TEST(ChatTemplateTest, ChatMl) {
  EXPECT_EQ(Render(kSmolLm2, kShort),
            "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
            "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nBye?<|im_end|>\n"
            "<|im_start|>assistant\n");
  EXPECT_EQ(Render(kSmolLm2, kNoSystem, false),
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
            "Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n");
  EXPECT_EQ(Render(kQwen25, kNoSystem),
            "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
            "assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
  EXPECT_EQ(Render(kQwen25, kShort), Render(kSmolLm2, kShort));
  EXPECT_EQ(Render(kOpenHermes, kLong),
            "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\n"
            "Hello<|im_end|>\n<|im_start|>assistant\nHi there<|im_end|>\n<|im_start|>user\nWho "
            "are you<|im_end|>\n<|im_start|>assistant\n   I am an assistant   <|im_end|>\n"
            "<|im_start|>user\nAnother question<|im_end|>\n<|im_start|>assistant\n");
  // No default system prompt in this template.
  EXPECT_EQ(Render(kOpenHermes, kNoSystem, false), "<|im_start|>user\nHi<|im_end|>\n");
}

TEST(ChatTemplateTest, Llama3) {
  EXPECT_EQ(Render(kLlama3, kLong, true, "<|begin_of_text|>"),
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a helpful "
            "assistant<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\nHi there<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nWho are you<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\nI am an assistant<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nAnother question<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n");
  EXPECT_EQ(Render(kLlama31, kShort, true, "<|begin_of_text|>"),
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge "
            "Date: December 2023\nToday Date: 26 Jul 2024\n\nYou are terse.<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nBye?<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n");
  EXPECT_EQ(Render(kLlama31, kNoSystem, false, "<|begin_of_text|>"),
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge "
            "Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>");
}

TEST(ChatTemplateTest, Llama2) {
  EXPECT_EQ(Render(kLlama2, kShort, true, "<s>"),
            "<s>[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nHi [/INST] Hello. </s><s>[INST] "
            "Bye? [/INST]");
  EXPECT_EQ(Render(kLlama2, kNoSystem, true, "<s>"), "<s>[INST] Hi [/INST]");
}

TEST(ChatTemplateTest, Mistral) {
  EXPECT_EQ(Render(kMistralV1, std::vector<ChatMessage>(kLong.begin() + 1, kLong.begin() + 4), true,
                   "<s>"),
            "<s>[INST] Hello [/INST]Hi there</s>[INST] Who are you [/INST]");
  EXPECT_EQ(Render(kMistralV1System, kLong),
            " [INST] You are a helpful assistant\n\nHello [/INST] Hi there</s> [INST] Who are "
            "you [/INST]    I am an assistant   </s> [INST] Another question [/INST]");
  EXPECT_EQ(Render(kMistralV3, kLong),
            "[INST] Hello[/INST] Hi there</s>[INST] Who are you[/INST] I am an assistant</s>"
            "[INST] You are a helpful assistant\n\nAnother question[/INST]");
  EXPECT_EQ(Render(kMistralV3, kShort, true, "<s>"),
            "<s>[INST] Hi[/INST] Hello.</s>[INST] You are terse.\n\nBye?[/INST]");
}

TEST(ChatTemplateTest, Phi3) {
  EXPECT_EQ(Render(kPhi35, kShort, true, "", "<|endoftext|>"),
            "<|system|>\nYou are terse.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nHello."
            "<|end|>\n<|user|>\nBye?<|end|>\n<|assistant|>\n");
  EXPECT_EQ(Render(kPhi35, kNoSystem, false, "", "<|endoftext|>"),
            "<|user|>\nHi<|end|>\n<|endoftext|>");
  EXPECT_EQ(Render(kPhi3Mini, kLong),
            "<|user|>\nYou are a helpful assistant\nHello<|end|>\n<|assistant|>\nHi there"
            "<|end|>\n<|user|>\nWho are you<|end|>\n<|assistant|>\n   I am an assistant   "
            "<|end|>\n<|user|>\nAnother question<|end|>\n<|assistant|>\n");
}

TEST(ChatTemplateTest, StripPythonMatchesStrStrip) {
  EXPECT_EQ(StripPython(" \t\n a b \r\n"), "a b");
  EXPECT_EQ(StripPython("\xE3\x80\x80x\xC2\xA0\x1F"), "x");  // U+3000, U+00A0, U+001F
  EXPECT_EQ(StripPython("\xE2\x80\x8Bx"), "\xE2\x80\x8Bx");  // U+200B is not a space
  EXPECT_EQ(StripPython(" \x80 "), "\x80");                  // invalid bytes stay
  EXPECT_EQ(StripPython("   "), "");
}

TEST(ChatTemplateTest, FamiliesAndBos) {
  struct Case {
    const char* tmpl;
    const char* family;
    bool bos_in_text;
  };
  for (const Case& c : {Case{kSmolLm2, "chatml", false}, Case{kLlama3, "llama3", true},
                        Case{kLlama31, "llama3", true}, Case{kLlama2, "llama2", true},
                        Case{kMistralV3, "mistral", true}, Case{kPhi35, "phi3", false},
                        Case{kPhi3Mini, "phi3", true}}) {
    auto t = ChatTemplate::FromTemplate(c.tmpl, "<s>", "</s>");
    ASSERT_TRUE(t.ok()) << t.status();
    EXPECT_EQ(t->family_name(), c.family);
    EXPECT_EQ(t->adds_bos_in_text(), c.bos_in_text) << c.family;
  }
  // Without a BOS token there is nothing to write.
  auto no_bos = ChatTemplate::FromTemplate(kLlama3, "", "");
  ASSERT_TRUE(no_bos.ok());
  EXPECT_FALSE(no_bos->adds_bos_in_text());
}

TEST(ChatTemplateTest, UnknownTemplatesAreRejected) {
  auto empty = ChatTemplate::FromTemplate("", "<s>", "</s>");
  EXPECT_EQ(empty.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(empty.status().message()), HasSubstr("model has no chat template"));

  auto unknown = ChatTemplate::FromTemplate(
      "{% for m in messages %}<start_of_turn>{{ m['content'] }}{% endfor %}", "<s>", "</s>");
  EXPECT_EQ(unknown.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(unknown.status().message()), HasSubstr("unrecognised chat template"));

  auto no_template = ChatTemplate::FromModel(testing::FixtureTokenizer("llama-spm"));
  EXPECT_THAT(std::string(no_template.status().message()), HasSubstr("no chat template"));
}

TEST(ChatTemplateTest, RolesAreValidated) {
  auto chatml = ChatTemplate::FromTemplate(kSmolLm2, "", "");
  ASSERT_TRUE(chatml.ok());
  EXPECT_EQ(chatml->Render({}, true).status().code(), absl::StatusCode::kInvalidArgument);
  const std::vector<ChatMessage> tool = {{"user", "Hi"}, {"tool", "42"}};
  EXPECT_THAT(std::string(chatml->Render(tool, true).status().message()), HasSubstr("role 'tool'"));

  auto llama2 = ChatTemplate::FromTemplate(kLlama2, "<s>", "</s>");
  ASSERT_TRUE(llama2.ok());
  const std::vector<ChatMessage> two_users = {{"user", "a"}, {"user", "b"}};
  EXPECT_THAT(std::string(llama2->Render(two_users, true).status().message()),
              HasSubstr("alternating"));
  const std::vector<ChatMessage> late_system = {{"user", "a"}, {"system", "b"}};
  EXPECT_FALSE(llama2->Render(late_system, true).ok());

  auto mistral = ChatTemplate::FromTemplate(kMistralV1, "<s>", "</s>");
  ASSERT_TRUE(mistral.ok());
  EXPECT_THAT(std::string(mistral->Render(kShort, true).status().message()), HasSubstr("system"));
}

TEST(ChatTemplateTest, RenderedTextEncodesWithOneBos) {
  const Tokenizer& tok = testing::FixtureTokenizer("llama-bpe");
  auto t = ChatTemplate::FromTemplate(kLlama3, std::string(tok.TokenText(tok.bos_id())),
                                      std::string(tok.TokenText(tok.eos_id())));
  ASSERT_TRUE(t.ok()) << t.status();
  auto text = t->Render(kShort, true);
  ASSERT_TRUE(text.ok());
  const std::vector<int32_t> ids =
      tok.Encode(*text, /*add_special=*/!t->adds_bos_in_text(), /*parse_special=*/true);
  ASSERT_GT(ids.size(), 3u);
  EXPECT_EQ(ids[0], 128000);
  EXPECT_NE(ids[1], 128000);
  EXPECT_EQ(ids[1], 128006);                                 // <|start_header_id|>
  EXPECT_EQ(std::count(ids.begin(), ids.end(), 128009), 4);  // <|eot_id|>
  EXPECT_EQ(tok.Decode(ids),
            "system\n\nYou are terse.user\n\nHi"
            "assistant\n\nHello.user\n\n"
            "Bye?assistant\n\n");
}

}  // namespace
}  // namespace morphserve::engine
