#include "server/cli/arg_parser.h"

#include "absl/strings/numbers.h"
#include "common/strings.h"
#include "absl/strings/str_format.h"

namespace morphserve::cli {

ArgParser::ArgParser(std::string usage, std::string summary)
    : usage_(std::move(usage)), summary_(std::move(summary)) {}

void ArgParser::AddString(std::string name, std::string* out, std::string help) {
  options_.push_back({name, std::move(help), out->empty() ? "" : *out, true,
                      [out](std::string_view v) {
                        *out = std::string(v);
                        return absl::OkStatus();
                      }});
}

void ArgParser::AddInt(std::string name, int64_t* out, std::string help) {
  options_.push_back({name, std::move(help), StrCat(*out), true,
                      [out, name](std::string_view v) {
                        if (!absl::SimpleAtoi(absl::string_view(v.data(), v.size()), out)) {
                          return absl::InvalidArgumentError(
                              StrCat("--", name, " expects an integer, got '", v, "'"));
                        }
                        return absl::OkStatus();
                      }});
}

void ArgParser::AddFloat(std::string name, float* out, std::string help) {
  options_.push_back({name, std::move(help), StrCat(*out), true,
                      [out, name](std::string_view v) {
                        if (!absl::SimpleAtof(absl::string_view(v.data(), v.size()), out)) {
                          return absl::InvalidArgumentError(
                              StrCat("--", name, " expects a number, got '", v, "'"));
                        }
                        return absl::OkStatus();
                      }});
}

void ArgParser::AddFlag(std::string name, bool* out, std::string help) {
  options_.push_back({name, std::move(help), "", false, [out](std::string_view) {
                        *out = true;
                        return absl::OkStatus();
                      }});
}

void ArgParser::AddList(std::string name, std::vector<std::string>* out, std::string help) {
  options_.push_back({name, std::move(help), "", true, [out](std::string_view v) {
                        out->emplace_back(v);
                        return absl::OkStatus();
                      }});
}

const ArgParser::Option* ArgParser::Find(std::string_view name) const {
  for (const Option& o : options_) {
    if (o.name == name) return &o;
  }
  return nullptr;
}

absl::Status ArgParser::Parse(int argc, char** argv, int first) {
  for (int i = first; i < argc; ++i) {
    std::string_view arg = argv[i];
    if (arg == "--help" || arg == "-h") {
      help_requested_ = true;
      return absl::OkStatus();
    }
    if (arg.substr(0, 2) != "--") {
      return absl::InvalidArgumentError(StrCat("unexpected argument '", arg, "'"));
    }
    arg.remove_prefix(2);
    std::string_view value;
    bool has_inline_value = false;
    if (size_t eq = arg.find('='); eq != std::string_view::npos) {
      value = arg.substr(eq + 1);
      arg = arg.substr(0, eq);
      has_inline_value = true;
    }
    const Option* opt = Find(arg);
    if (opt == nullptr) return absl::InvalidArgumentError(StrCat("unknown option --", arg));
    if (opt->takes_value && !has_inline_value) {
      if (i + 1 >= argc) {
        return absl::InvalidArgumentError(StrCat("--", arg, " needs a value"));
      }
      value = argv[++i];
    } else if (!opt->takes_value && has_inline_value) {
      return absl::InvalidArgumentError(StrCat("--", arg, " takes no value"));
    }
    if (absl::Status s = opt->apply(value); !s.ok()) return s;
    set_.insert(opt->name);
  }
  return absl::OkStatus();
}

std::string ArgParser::Help() const {
  std::string out = StrCat("usage: ", usage_, "\n\n", summary_, "\n\noptions:\n");
  for (const Option& o : options_) {
    const std::string left = StrCat("  --", o.name, o.takes_value ? " VALUE" : "");
    std::string line = absl::StrFormat("%-28s %s", left, o.help);
    if (!o.default_text.empty()) StrAppend(&line, " (default: ", o.default_text, ")");
    StrAppend(&out, line, "\n");
  }
  StrAppend(&out, absl::StrFormat("%-28s %s\n", "  --help", "show this help"));
  return out;
}

}  // namespace morphserve::cli
