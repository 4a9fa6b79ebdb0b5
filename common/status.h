// Status helpers shared by every module. Errors cross module boundaries as
// absl::Status / absl::StatusOr; these macros keep the propagation short.
#ifndef MORPHSERVE_COMMON_STATUS_H_
#define MORPHSERVE_COMMON_STATUS_H_

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define MORPHSERVE_CONCAT_INNER_(a, b) a##b
#define MORPHSERVE_CONCAT_(a, b) MORPHSERVE_CONCAT_INNER_(a, b)

// Returns from the enclosing function if `expr` is not OK.
#define RETURN_IF_ERROR(expr)                         \
  do {                                                \
    ::absl::Status _morphserve_status = (expr);       \
    if (!_morphserve_status.ok()) return _morphserve_status; \
  } while (0)

// `ASSIGN_OR_RETURN(auto x, MakeX());` binds the value or returns the error.
#define ASSIGN_OR_RETURN(lhs, expr) \
  ASSIGN_OR_RETURN_IMPL_(MORPHSERVE_CONCAT_(_morphserve_or_, __LINE__), lhs, expr)
#define ASSIGN_OR_RETURN_IMPL_(tmp, lhs, expr) \
  auto tmp = (expr);                           \
  if (!tmp.ok()) return tmp.status();          \
  lhs = std::move(tmp).value()

#endif  // MORPHSERVE_COMMON_STATUS_H_
