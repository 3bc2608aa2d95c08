// Argument checks shared by the backends: every op validates its host-side arguments and returns
// InvalidArgument "<Op>: <what is wrong>" instead of crashing.
#ifndef RAMBA_KERNELS_ARG_CHECKS_H_
#define RAMBA_KERNELS_ARG_CHECKS_H_

#include <string>
#include <string_view>

#include "absl/status/status.h"

namespace ramba::kernels {

inline absl::Status InvalidOpArgument(std::string_view op, std::string_view what) {
  return absl::InvalidArgumentError(std::string(op) + ": " + std::string(what));
}

}  // namespace ramba::kernels

// Returns InvalidOpArgument(op, msg) from the enclosing function unless `cond` holds.
#define RAMBA_CHECK_ARG(op, cond, msg)                                     \
  do {                                                                     \
    if (!(cond)) return ::ramba::kernels::InvalidOpArgument((op), (msg)); \
  } while (0)

#endif  // RAMBA_KERNELS_ARG_CHECKS_H_
