// `morphserve tokenize`: token ids of text, one line per input line, or the
// `.inp` -> `.out` format of tokenizer test vectors.
#include <cstdio>
#include <fstream>
#include <iostream>
#include <iterator>
#include <string>

#include "common/strings.h"
#include "common/status.h"
#include "engine/model/model.h"
#include "server/cli/arg_parser.h"
#include "server/cli/commands.h"

namespace morphserve::cli {
namespace {

constexpr std::string_view kVocabTestSeparator = "\n__ggml_vocab_test__\n";

std::string FormatIds(const std::vector<int32_t>& ids) {
  std::string line;
  for (int32_t id : ids) StrAppend(&line, " ", id);
  return line;
}

absl::Status Run(const std::string& model, const std::string& text, const std::string& vocab_test,
                 bool no_bos, bool parse_special) {
  if (model.empty()) return absl::InvalidArgumentError("--model is required");
  ASSIGN_OR_RETURN(std::unique_ptr<engine::Tokenizer> tokenizer, engine::LoadTokenizer(model));
  if (!vocab_test.empty()) {
    std::ifstream f(vocab_test, std::ios::binary);
    if (!f) return absl::NotFoundError(StrCat(vocab_test, ": cannot open"));
    const std::string all{std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
    // Test strings end with the separator; what follows the last one is not a test.
    size_t begin = 0;
    for (size_t end; (end = all.find(kVocabTestSeparator, begin)) != std::string::npos;
         begin = end + kVocabTestSeparator.size()) {
      const std::string line = FormatIds(tokenizer->Encode(
          std::string_view(all).substr(begin, end - begin), /*add_special=*/false,
          /*parse_special=*/false));
      std::printf("%s\n", line.c_str());
    }
    return absl::OkStatus();
  }
  auto emit = [&](std::string_view s) {
    std::printf("%s\n", FormatIds(tokenizer->Encode(s, !no_bos, parse_special)).c_str());
  };
  if (!text.empty()) {
    emit(text);
    return absl::OkStatus();
  }
  for (std::string line; std::getline(std::cin, line);) emit(line);
  return absl::OkStatus();
}

}  // namespace

int TokenizeCommand(int argc, char** argv, int first) {
  std::string model, text, vocab_test;
  bool no_bos = false;
  bool parse_special = false;
  ArgParser p("morphserve tokenize --model PATH [--text TEXT | --vocab-test FILE.inp] [options]",
              "Prints token ids, one line per input line (stdin unless --text is given).\n"
              "With --vocab-test, reads the .inp test-vector format and prints the .out format.");
  p.AddString("model", &model, "a .gguf file (vocab-only is fine) or a Hugging Face directory");
  p.AddString("text", &text, "text to tokenize instead of stdin lines");
  p.AddString("vocab-test", &vocab_test, "tokenizer test-vector input file (.inp)");
  p.AddFlag("no-bos", &no_bos, "do not add BOS/EOS tokens");
  p.AddFlag("parse-special", &parse_special, "turn special-token text into special tokens");
  return RunCommand("tokenize", p, argc, argv, first,
                    [&] { return Run(model, text, vocab_test, no_bos, parse_special); });
}

}  // namespace morphserve::cli
