// Helpers for the llama.cpp tokenizer test vectors under the shared fixtures
// directory (see its README).
#ifndef MORPHSERVE_TESTS_ENGINE_TOKENIZER_FIXTURES_H_
#define MORPHSERVE_TESTS_ENGINE_TOKENIZER_FIXTURES_H_

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "engine/gguf/gguf_file.h"
#include "engine/tokenizer/tokenizer.h"

namespace morphserve::engine::testing {

struct VocabCase {
  std::string text;
  std::vector<int32_t> ids;
};

// fixtures/tokenizer/ggml-vocab-<name>.gguf
std::string VocabPath(const std::string& name);
// The test strings and expected ids (add_special = parse_special = false).
std::vector<VocabCase> LoadVocabCases(const std::string& name);
std::string ReadFileOrDie(const std::string& path);

// Loads a fixture vocabulary once per process; aborts the test on failure.
const GgufFile& FixtureGguf(const std::string& name);
const Tokenizer& FixtureTokenizer(const std::string& name);

// Metadata arrays of a fixture vocabulary (empty, with a test failure, when
// absent).
std::vector<std::string_view> GgufStrings(const GgufFile& file, std::string_view key);
std::vector<double> GgufNumbers(const GgufFile& file, std::string_view key);

}  // namespace morphserve::engine::testing

#endif  // MORPHSERVE_TESTS_ENGINE_TOKENIZER_FIXTURES_H_
