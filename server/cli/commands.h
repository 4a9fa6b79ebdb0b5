// The subcommands of the `morphserve` binary. Each takes the full argv and
// the index of its first own argument, and returns the process exit code.
#ifndef MORPHSERVE_SERVER_CLI_COMMANDS_H_
#define MORPHSERVE_SERVER_CLI_COMMANDS_H_

#include <functional>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "server/cli/arg_parser.h"

namespace morphserve::cli {

int BatchCommand(int argc, char** argv, int first);
int ChatCommand(int argc, char** argv, int first);
int EvalCommand(int argc, char** argv, int first);
int GenerateCommand(int argc, char** argv, int first);
int TokenizeCommand(int argc, char** argv, int first);
int InfoCommand(int argc, char** argv, int first);
int ServeCommand(int argc, char** argv, int first);

// What every subcommand does with its parser: parses argv[first..) (a usage
// error exits 2), prints the help when asked, sets up logging at
// `*log_level` when given (exit 2 on a bad level), then calls `run` (an error
// exits 1). Errors are printed as "morphserve <name>: <message>".
// The whole file at `path`, given with `--flag`; the error names the flag.
absl::StatusOr<std::string> ReadFlagFile(const std::string& path, std::string_view flag);

int RunCommand(std::string_view name, ArgParser& parser, int argc, char** argv, int first,
               const std::function<absl::Status()>& run, const std::string* log_level = nullptr);

}  // namespace morphserve::cli

#endif  // MORPHSERVE_SERVER_CLI_COMMANDS_H_
