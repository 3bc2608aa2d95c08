#include "store/state_slots.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <optional>
#include <system_error>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "store/crc32c.h"

namespace ramba::store {
namespace {

absl::Status Errno(int err, absl::string_view what) {
  std::string msg = absl::StrCat(what, ": ", std::strerror(err));
  if (err == ENOSPC || err == EDQUOT) return absl::ResourceExhaustedError(msg);
  return absl::InternalError(msg);
}

// "<n>.<slot>" -> n; nullopt for any other name.
std::optional<uint64_t> SlotFileNumber(const std::string& name) {
  const size_t dot = name.rfind('.');
  uint64_t n = 0;
  if (dot == std::string::npos || dot + 2 != name.size() || (name[dot + 1] != '0' &&
                                                             name[dot + 1] != '1') ||
      !absl::SimpleAtoi(absl::string_view(name).substr(0, dot), &n)) {
    return std::nullopt;
  }
  return n;
}

}  // namespace

absl::StatusOr<std::unique_ptr<StateSlots>> StateSlots::Open(const std::string& dir) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) return absl::InternalError(absl::StrCat("creating ", dir, ": ", ec.message()));
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return Errno(errno, absl::StrCat("opening ", dir));
  int64_t bytes = 0;
  for (const auto& entry : std::filesystem::directory_iterator(dir, ec)) {
    if (SlotFileNumber(entry.path().filename()) && entry.is_regular_file(ec)) {
      bytes += static_cast<int64_t>(entry.file_size(ec));
    }
  }
  return std::unique_ptr<StateSlots>(new StateSlots(dir, fd, bytes));
}

StateSlots::~StateSlots() { ::close(dir_fd_); }

std::string StateSlots::Path(uint64_t n, int slot) const {
  return absl::StrCat(dir_, "/", n, ".", slot);
}

absl::Status StateSlots::Write(uint64_t n, int slot, absl::string_view payload, bool sync) {
  const std::string path = Path(n, slot);
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  const bool created = fd >= 0;
  if (!created && errno == EEXIST) fd = ::open(path.c_str(), O_WRONLY | O_CLOEXEC);
  if (fd < 0) return Errno(errno, absl::StrCat("opening state slot ", path));
  struct stat st {};
  int64_t old_size = ::fstat(fd, &st) == 0 ? st.st_size : 0;
  absl::Status status;
  for (size_t done = 0; done < payload.size() && status.ok();) {
    const ssize_t w = ::pwrite(fd, payload.data() + done, payload.size() - done,
                               static_cast<off_t>(done));
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) status = Errno(w < 0 ? errno : EIO, absl::StrCat("writing state slot ", path));
    if (w > 0) done += static_cast<size_t>(w);
  }
  if (status.ok() && sync && ::fdatasync(fd) != 0) {
    status = Errno(errno, absl::StrCat("syncing state slot ", path));
  }
  ::close(fd);
  if (status.ok() && created && sync && ::fsync(dir_fd_) != 0) {
    status = Errno(errno, absl::StrCat("syncing the directory of state slot ", path));
  }
  const auto new_size = std::max<int64_t>(old_size, static_cast<int64_t>(payload.size()));
  bytes_.fetch_add(new_size - old_size, std::memory_order_relaxed);
  return status;
}

absl::StatusOr<std::string> StateSlots::Read(uint64_t n, int slot, uint64_t length,
                                             uint32_t crc) const {
  const std::string path = Path(n, slot);
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0 && errno == ENOENT) {
    return absl::DataLossError(absl::StrCat("state slot ", path, " is missing"));
  }
  if (fd < 0) return Errno(errno, absl::StrCat("opening state slot ", path));
  std::string out;
  out.resize(length);
  size_t done = 0;
  absl::Status status;
  while (done < length && status.ok()) {
    const ssize_t r = ::pread(fd, out.data() + done, length - done, static_cast<off_t>(done));
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) status = Errno(errno, absl::StrCat("reading state slot ", path));
    if (r == 0) break;
    if (r > 0) done += static_cast<size_t>(r);
  }
  ::close(fd);
  if (!status.ok()) return status;
  if (done < length) {
    return absl::DataLossError(absl::StrCat("state slot ", path, " holds ", done,
                                            " bytes, its pointer says ", length));
  }
  const uint32_t actual = Crc32c(out);
  if (actual != crc) {
    return absl::DataLossError(absl::StrCat("state slot ", path, " checksum mismatch (stored 0x",
                                            absl::Hex(crc), ", computed 0x", absl::Hex(actual),
                                            ")"));
  }
  return out;
}

void StateSlots::Remove(uint64_t n) {
  for (int slot = 0; slot < 2; ++slot) {
    const std::string path = Path(n, slot);
    struct stat st {};
    if (::stat(path.c_str(), &st) == 0 && ::unlink(path.c_str()) == 0) {
      bytes_.fetch_sub(st.st_size, std::memory_order_relaxed);
    }
  }
}

absl::Status StateSlots::RemoveAllBut(const std::unordered_set<uint64_t>& live) {
  std::error_code ec;
  std::vector<uint64_t> dead;
  for (const auto& entry : std::filesystem::directory_iterator(dir_, ec)) {
    const std::optional<uint64_t> n = SlotFileNumber(entry.path().filename());
    if (n && live.count(*n) == 0) dead.push_back(*n);
  }
  if (ec) return absl::InternalError(absl::StrCat("listing ", dir_, ": ", ec.message()));
  for (uint64_t n : dead) Remove(n);
  return absl::OkStatus();
}

}  // namespace ramba::store
