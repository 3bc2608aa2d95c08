// State slot files: where the session store keeps recurrent-state snapshots too large to pass
// through RocksDB cheaply (key-value separation, as in WiscKey or RocksDB's BlobDB, but without
// the write-ahead log copy: a commit writes the snapshot's bytes once).
//
// Every session incarnation (origin number n) has two slot files, "<dir>/<n>.0" and "<n>.1". A
// commit writes the slot its stored pointer does not name, makes it durable, and only then
// commits the new pointer (slot, length, CRC-32C) in the same RocksDB WriteBatch as the rest of
// the commit; so the slot a committed pointer names is never being written, and a crash at any
// point leaves the old pointer with its intact slot or the new pointer with its durable one.
// Files of sessions that no longer exist (a crash between a slot write and its commit, or
// between a delete and its unlink) are removed when the store opens.
//
// Thread-safe. Callers serialise writers of one file number (the store's per-session lock) and
// never read a slot while it may be written.
#ifndef RAMBA_STORE_STATE_SLOTS_H_
#define RAMBA_STORE_STATE_SLOTS_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <unordered_set>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace ramba::store {

class StateSlots {
 public:
  // Opens `dir`, creating it when missing.
  static absl::StatusOr<std::unique_ptr<StateSlots>> Open(const std::string& dir);
  ~StateSlots();
  StateSlots(const StateSlots&) = delete;
  StateSlots& operator=(const StateSlots&) = delete;

  // Writes `payload` at the start of slot `slot` of file number `n` (creating it). With `sync`,
  // the bytes, and the file's directory entry when it is new, are durable on return.
  absl::Status Write(uint64_t n, int slot, absl::string_view payload, bool sync);
  // The first `length` bytes of the slot, checked against `crc` (CRC-32C). DataLoss when the
  // file is missing, shorter or different.
  absl::StatusOr<std::string> Read(uint64_t n, int slot, uint64_t length, uint32_t crc) const;
  // Removes both slots of `n`; absent files are fine.
  void Remove(uint64_t n);
  // Removes every slot file whose number is not in `live` (other files are left alone).
  absl::Status RemoveAllBut(const std::unordered_set<uint64_t>& live);
  // Bytes of every slot file.
  int64_t bytes() const { return bytes_.load(std::memory_order_relaxed); }

  std::string Path(uint64_t n, int slot) const;

 private:
  StateSlots(std::string dir, int dir_fd, int64_t bytes)
      : dir_(std::move(dir)), dir_fd_(dir_fd), bytes_(bytes) {}

  const std::string dir_;
  const int dir_fd_;
  std::atomic<int64_t> bytes_;
};

}  // namespace ramba::store

#endif  // RAMBA_STORE_STATE_SLOTS_H_
