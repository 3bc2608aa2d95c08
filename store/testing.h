// Test-only access to a SessionStore's raw column families (fault injection and key counting).
// Not for production code: it bypasses every invariant of the store. Works only on stores made
// by SessionStore::Open.
#ifndef RAMBA_STORE_TESTING_H_
#define RAMBA_STORE_TESTING_H_

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "store/session_store.h"

namespace ramba::store::testing {

// Column family names: "sessions", "states", "chunks", "landmarks", "refcounts", "meta".
absl::StatusOr<std::string> GetRaw(SessionStore& store, const std::string& column_family,
                                   const std::string& key);
absl::Status PutRaw(SessionStore& store, const std::string& column_family, const std::string& key,
                    const std::string& value);
// Live keys of a column family (deleted and range-deleted keys excluded).
absl::StatusOr<int64_t> CountKeys(SessionStore& store, const std::string& column_family);

}  // namespace ramba::store::testing

#endif  // RAMBA_STORE_TESTING_H_
