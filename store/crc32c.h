// CRC-32C (Castagnoli, polynomial 0x1EDC6F41, reflected), the checksum of every store record.
// Implemented here because RocksDB does not install its crc32c header and zlib's crc32 is the
// IEEE polynomial. Uses the SSE4.2 crc32 instruction when the CPU has it, a table otherwise; both
// give identical results. Thread-safe (pure functions).
#ifndef RAMBA_STORE_CRC32C_H_
#define RAMBA_STORE_CRC32C_H_

#include <cstddef>
#include <cstdint>
#include "absl/strings/string_view.h"

namespace ramba::store {

// Returns the CRC-32C of `data[0, n)` appended to a stream whose CRC so far is `crc` (0 to start).
uint32_t Crc32cExtend(uint32_t crc, const void* data, size_t n);
inline uint32_t Crc32c(absl::string_view data) { return Crc32cExtend(0, data.data(), data.size()); }

// The table implementation alone (tests compare it with the dispatched one).
uint32_t Crc32cExtendPortable(uint32_t crc, const void* data, size_t n);

}  // namespace ramba::store

#endif  // RAMBA_STORE_CRC32C_H_
