#include <cstdio>
#include <fstream>
#include <iterator>
#include <string>

#include "common/logging.h"
#include "common/strings.h"
#include "server/cli/commands.h"

namespace morphserve::cli {
namespace {

void PrintError(std::string_view name, const absl::Status& s) {
  std::fprintf(stderr, "morphserve %.*s: %s\n", static_cast<int>(name.size()), name.data(),
               std::string(s.message()).c_str());
}

}  // namespace

absl::StatusOr<std::string> ReadFlagFile(const std::string& path, std::string_view flag) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(StrCat("--", flag, ": cannot read ", path));
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

int RunCommand(std::string_view name, ArgParser& parser, int argc, char** argv, int first,
               const std::function<absl::Status()>& run, const std::string* log_level) {
  if (absl::Status s = parser.Parse(argc, argv, first); !s.ok()) {
    PrintError(name, s);
    return 2;
  }
  if (parser.help_requested()) {
    std::fputs(parser.Help().c_str(), stdout);
    return 0;
  }
  if (log_level != nullptr) {
    if (absl::Status s = InitLogging(*log_level, LogFormat::kPlain); !s.ok()) {
      PrintError(name, s);
      return 2;
    }
  }
  if (absl::Status s = run(); !s.ok()) {
    PrintError(name, s);
    return 1;
  }
  return 0;
}

}  // namespace morphserve::cli
