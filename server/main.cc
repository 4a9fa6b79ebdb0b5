// morphserve: serve Llama-family models; subcommands for generation, a chat
// client of the server, tokenization and model inspection.
#include <cstdio>
#include <string_view>

#include "absl/strings/str_join.h"
#include "engine/backend/backend_registry.h"
#include "server/cli/commands.h"
#include "server/version.h"

namespace {

constexpr std::string_view kUsage = R"(usage: morphserve <command> [options]

commands:
  serve      serve the model over gRPC
  generate   generate text from a prompt or a chat message
  chat       chat with a running server, replies streamed as they are generated
  batch      run many prompts through the scheduler and report throughput
  eval       measure each KV policy's fidelity to the full cache
  tokenize   print the token ids of text
  info       describe a model file: architecture, shapes, dtypes, tokenizer
options:
  --version  print the version, git commit and built-in backends
  --help     show this help; `morphserve <command> --help` for a command's options
)";

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fputs(kUsage.data(), stderr);
    return 2;
  }
  const std::string_view command = argv[1];
  if (command == "--help" || command == "-h" || command == "help") {
    std::fputs(kUsage.data(), stdout);
    return 0;
  }
  if (command == "--version" || command == "version") {
    std::printf("morphserve %s (commit %s)\nbackends: %s\n", morphserve::kVersion,
                morphserve::kGitCommit,
                absl::StrJoin(morphserve::engine::BuiltBackends(), " ").c_str());
    return 0;
  }
  if (command == "serve") return morphserve::cli::ServeCommand(argc, argv, 2);
  if (command == "generate") return morphserve::cli::GenerateCommand(argc, argv, 2);
  if (command == "chat") return morphserve::cli::ChatCommand(argc, argv, 2);
  if (command == "batch") return morphserve::cli::BatchCommand(argc, argv, 2);
  if (command == "eval") return morphserve::cli::EvalCommand(argc, argv, 2);
  if (command == "tokenize") return morphserve::cli::TokenizeCommand(argc, argv, 2);
  if (command == "info") return morphserve::cli::InfoCommand(argc, argv, 2);
  std::fprintf(stderr, "morphserve: unknown command '%s'\n\n%s", argv[1], kUsage.data());
  return 2;
}
