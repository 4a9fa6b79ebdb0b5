// A small command-line parser for the subcommands: typed options bound to
// variables, `--name value` or `--name=value`, repeatable list options,
// generated --help. Errors name the option.
#ifndef MORPHSERVE_SERVER_CLI_ARG_PARSER_H_
#define MORPHSERVE_SERVER_CLI_ARG_PARSER_H_

#include <cstdint>
#include <functional>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"

namespace morphserve::cli {

class ArgParser {
 public:
  ArgParser(std::string usage, std::string summary);

  void AddString(std::string name, std::string* out, std::string help);
  void AddInt(std::string name, int64_t* out, std::string help);
  void AddFloat(std::string name, float* out, std::string help);
  void AddFlag(std::string name, bool* out, std::string help);
  void AddList(std::string name, std::vector<std::string>* out, std::string help);

  // Parses argv[first..argc). --help sets help_requested() and stops.
  absl::Status Parse(int argc, char** argv, int first);

  bool help_requested() const { return help_requested_; }
  bool WasSet(std::string_view name) const { return set_.count(std::string(name)) > 0; }
  std::string Help() const;

 private:
  struct Option {
    std::string name;
    std::string help;
    std::string default_text;
    bool takes_value;
    std::function<absl::Status(std::string_view)> apply;
  };
  const Option* Find(std::string_view name) const;

  std::string usage_;
  std::string summary_;
  std::vector<Option> options_;
  std::set<std::string> set_;
  bool help_requested_ = false;
};

}  // namespace morphserve::cli

#endif  // MORPHSERVE_SERVER_CLI_ARG_PARSER_H_
