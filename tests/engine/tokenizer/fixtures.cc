#include "tests/engine/tokenizer/fixtures.h"

#include <fstream>
#include <map>
#include <mutex>
#include <sstream>

#include "gtest/gtest.h"

namespace morphserve::engine::testing {
namespace {

constexpr std::string_view kSeparator = "\n__ggml_vocab_test__\n";

std::vector<int32_t> ParseIds(const std::string& line) {
  std::vector<int32_t> ids;
  std::istringstream in(line);
  int64_t id;
  while (in >> id) ids.push_back(static_cast<int32_t>(id));
  return ids;
}

}  // namespace

std::string VocabPath(const std::string& name) {
  return std::string(MORPHSERVE_FIXTURES_DIR) + "/tokenizer/ggml-vocab-" + name + ".gguf";
}

std::string ReadFileOrDie(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    ADD_FAILURE() << "cannot open " << path;
    return "";
  }
  std::ostringstream buffer;
  buffer << in.rdbuf();
  return buffer.str();
}

std::vector<VocabCase> LoadVocabCases(const std::string& name) {
  const std::string inp = ReadFileOrDie(VocabPath(name) + ".inp");
  const std::string out = ReadFileOrDie(VocabPath(name) + ".out");
  std::vector<VocabCase> cases;
  size_t pos = 0;
  for (size_t hit; (hit = inp.find(kSeparator, pos)) != std::string::npos;
       pos = hit + kSeparator.size()) {
    cases.push_back(VocabCase{inp.substr(pos, hit - pos), {}});
  }
  std::istringstream lines(out);
  std::string line;
  for (VocabCase& c : cases) {
    if (!std::getline(lines, line)) {
      ADD_FAILURE() << name << ": fewer .out lines than test strings";
      break;
    }
    c.ids = ParseIds(line);
  }
  return cases;
}

const GgufFile& FixtureGguf(const std::string& name) {
  static std::mutex mu;
  static auto* files = new std::map<std::string, std::unique_ptr<GgufFile>>();
  std::lock_guard<std::mutex> lock(mu);
  std::unique_ptr<GgufFile>& file = (*files)[name];
  if (file == nullptr) {
    auto opened = GgufFile::Open(VocabPath(name));
    if (!opened.ok()) {
      ADD_FAILURE() << opened.status();
      std::abort();
    }
    file = *std::move(opened);
  }
  return *file;
}

const Tokenizer& FixtureTokenizer(const std::string& name) {
  static std::mutex mu;
  static auto* tokenizers = new std::map<std::string, std::unique_ptr<Tokenizer>>();
  const GgufFile& file = FixtureGguf(name);
  std::lock_guard<std::mutex> lock(mu);
  std::unique_ptr<Tokenizer>& tok = (*tokenizers)[name];
  if (tok == nullptr) {
    auto built = Tokenizer::FromGguf(file);
    if (!built.ok()) {
      ADD_FAILURE() << built.status();
      std::abort();
    }
    tok = *std::move(built);
  }
  return *tok;
}

std::vector<std::string_view> GgufStrings(const GgufFile& file, std::string_view key) {
  const GgufValue* value = file.Find(key);
  if (value == nullptr || value->type != GgufType::kArray) {
    ADD_FAILURE() << "no string array " << key;
    return {};
  }
  return value->strings;
}

std::vector<double> GgufNumbers(const GgufFile& file, std::string_view key) {
  auto values = file.GetRealArray(key);
  std::vector<double> out;
  if (!values.ok() || !values->has_value()) {
    ADD_FAILURE() << "no numeric array " << key;
    return out;
  }
  for (float v : **values) out.push_back(v);
  return out;
}

}  // namespace morphserve::engine::testing
