// The subcommands of the `morphserve` binary. Each takes the full argv and
// the index of its first own argument, and returns the process exit code.
#ifndef MORPHSERVE_SERVER_CLI_COMMANDS_H_
#define MORPHSERVE_SERVER_CLI_COMMANDS_H_

namespace morphserve::cli {

int EvalCommand(int argc, char** argv, int first);
int GenerateCommand(int argc, char** argv, int first);
int TokenizeCommand(int argc, char** argv, int first);
int InfoCommand(int argc, char** argv, int first);

}  // namespace morphserve::cli

#endif  // MORPHSERVE_SERVER_CLI_COMMANDS_H_
