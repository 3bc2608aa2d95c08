// Status propagation macros. Debian's Abseil (20220623) ships neither RETURN_IF_ERROR nor
// ASSIGN_OR_RETURN, so the project keeps its own two, here and nowhere else.
#ifndef RAMBA_BASE_STATUS_MACROS_H_
#define RAMBA_BASE_STATUS_MACROS_H_

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define RAMBA_CONCAT_INNER_(a, b) a##b
#define RAMBA_CONCAT_(a, b) RAMBA_CONCAT_INNER_(a, b)

// Returns from the enclosing function with `expr`'s status when it is not OK.
#define RETURN_IF_ERROR(expr)                          \
  do {                                                 \
    ::absl::Status ramba_status_ = (expr);             \
    if (!ramba_status_.ok()) return ramba_status_;     \
  } while (0)

// Evaluates `rexpr` (an absl::StatusOr<T>); on error returns its status, else moves the value
// into `lhs`, which may be a declaration (`auto x`) or an existing variable.
#define ASSIGN_OR_RETURN(lhs, rexpr) \
  RAMBA_ASSIGN_OR_RETURN_IMPL_(RAMBA_CONCAT_(ramba_statusor_, __LINE__), lhs, rexpr)
#define RAMBA_ASSIGN_OR_RETURN_IMPL_(statusor, lhs, rexpr) \
  auto statusor = (rexpr);                                 \
  if (!statusor.ok()) return std::move(statusor).status(); \
  lhs = std::move(statusor).value()

#endif  // RAMBA_BASE_STATUS_MACROS_H_
