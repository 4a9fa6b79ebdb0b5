// StrCat / StrAppend that also take std::string_view. Debian's Abseil is
// built with its own absl::string_view (ABSL_OPTION_USE_STD_STRING_VIEW 0),
// which absl::StrCat needs; these forward std::string_view as that type.
#ifndef MORPHSERVE_COMMON_STRINGS_H_
#define MORPHSERVE_COMMON_STRINGS_H_

#include <string>
#include <string_view>

#include "absl/strings/str_cat.h"

namespace morphserve {
namespace strings_internal {

inline absl::string_view Arg(std::string_view s) { return {s.data(), s.size()}; }
template <typename T>
const T& Arg(const T& v) {
  return v;
}

}  // namespace strings_internal

template <typename... Args>
std::string StrCat(const Args&... args) {
  return absl::StrCat(strings_internal::Arg(args)...);
}

template <typename... Args>
void StrAppend(std::string* out, const Args&... args) {
  absl::StrAppend(out, strings_internal::Arg(args)...);
}

// std::string_view of an absl::string_view (e.g. absl::Status::message()).
inline std::string_view ToStd(absl::string_view s) { return {s.data(), s.size()}; }

}  // namespace morphserve

#endif  // MORPHSERVE_COMMON_STRINGS_H_
