#include "server/text_streamer.h"

#include <algorithm>
#include <cstdint>

namespace ramba::server {

size_t CompleteUtf8Prefix(const std::string& s) {
  // Walk back over at most 3 continuation bytes to the last lead byte.
  const size_t n = s.size();
  size_t i = n;
  int back = 0;
  while (i > 0 && back < 4) {
    const unsigned char c = static_cast<unsigned char>(s[i - 1]);
    if ((c & 0xC0) != 0x80) {  // lead byte or ASCII
      size_t need = 1;
      if ((c & 0xE0) == 0xC0) need = 2;
      else if ((c & 0xF0) == 0xE0) need = 3;
      else if ((c & 0xF8) == 0xF0) need = 4;
      const size_t have = n - (i - 1);
      return have >= need ? n : i - 1;
    }
    --i;
    ++back;
  }
  return n;  // only continuation bytes: invalid, release as is
}

std::string SanitizeUtf8(const std::string& s) {
  std::string out;
  out.reserve(s.size());
  size_t i = 0;
  while (i < s.size()) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    size_t len = 0;
    uint32_t min = 0;
    if (c < 0x80) len = 1;
    else if ((c & 0xE0) == 0xC0) { len = 2; min = 0x80; }
    else if ((c & 0xF0) == 0xE0) { len = 3; min = 0x800; }
    else if ((c & 0xF8) == 0xF0) { len = 4; min = 0x10000; }
    bool ok = len > 0 && i + len <= s.size();
    uint32_t cp = len == 1 ? c : (c & (0x7F >> len));
    for (size_t k = 1; ok && k < len; ++k) {
      const unsigned char cc = static_cast<unsigned char>(s[i + k]);
      ok = (cc & 0xC0) == 0x80;
      cp = (cp << 6) | (cc & 0x3F);
    }
    ok = ok && cp >= min && cp <= 0x10FFFF && !(cp >= 0xD800 && cp <= 0xDFFF);
    if (ok) {
      out.append(s, i, len);
      i += len;
    } else {
      out += "\xEF\xBF\xBD";
      ++i;
    }
  }
  return out;
}

TextStreamer::TextStreamer(std::vector<std::string> stop_sequences, bool include_stop_sequence)
    : include_stop_(include_stop_sequence) {
  for (auto& s : stop_sequences) {
    if (!s.empty()) stops_.push_back(std::move(s));
  }
}

std::string TextStreamer::Add(const std::string& token_bytes, bool may_stop) {
  if (stopped()) return "";
  held_ += token_bytes;
  // A stop sequence in the held text ends generation; the earliest match wins.
  size_t best = std::string::npos;
  for (size_t k = 0; k < stops_.size() && may_stop; ++k) {
    const size_t len = stops_[k].size();
    const size_t from = no_stop_before_ >= len ? no_stop_before_ - len + 1 : 0;
    const size_t at = held_.find(stops_[k], from);
    if (at != std::string::npos && (best == std::string::npos || at < best)) {
      best = at;
      stop_index_ = static_cast<int>(k);
    }
  }
  no_stop_before_ = may_stop ? 0 : held_.size();
  if (best != std::string::npos) {
    std::string out = held_.substr(0, best + (include_stop_ ? stops_[stop_index_].size() : 0));
    held_.clear();
    return SanitizeUtf8(out);
  }
  // Hold back the longest suffix that is a proper prefix of some stop sequence.
  size_t keep = 0;
  for (const std::string& s : stops_) {
    for (size_t len = std::min(s.size() - 1, held_.size()); len > keep; --len) {
      if (held_.compare(held_.size() - len, len, s, 0, len) == 0) {
        keep = len;
        break;
      }
    }
  }
  size_t release = held_.size() - keep;
  release = CompleteUtf8Prefix(held_.substr(0, release));
  std::string out = held_.substr(0, release);
  held_.erase(0, release);
  no_stop_before_ -= std::min(no_stop_before_, release);
  return SanitizeUtf8(out);
}

std::string TextStreamer::Flush() {
  if (stopped()) return "";
  std::string out;
  out.swap(held_);
  const size_t complete = CompleteUtf8Prefix(out);
  if (complete < out.size()) out = out.substr(0, complete) + "\xEF\xBF\xBD";
  return SanitizeUtf8(out);
}

}  // namespace ramba::server
