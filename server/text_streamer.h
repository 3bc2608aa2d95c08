// Turns generated tokens' bytes into streamable UTF-8 text while watching for stop sequences:
// text is released only up to a complete UTF-8 character and never while it could still be the
// start of a stop sequence, so a client never sees half a character or part of a stop sequence.
#ifndef RAMBA_SERVER_TEXT_STREAMER_H_
#define RAMBA_SERVER_TEXT_STREAMER_H_

#include <string>
#include <vector>

namespace ramba::server {

class TextStreamer {
 public:
  TextStreamer(std::vector<std::string> stop_sequences, bool include_stop_sequence);

  // Adds one token's bytes; returns the text now safe to release (possibly empty). After a stop
  // sequence matched, stopped() is true and later calls return "". With may_stop false a match
  // ending in these bytes does not count (min_tokens); one ending in later bytes does, even if it
  // began here.
  std::string Add(const std::string& token_bytes, bool may_stop = true);
  // Releases whatever is held back (end of generation without a stop match). Invalid UTF-8 at
  // the end becomes U+FFFD.
  std::string Flush();

  bool stopped() const { return stop_index_ >= 0; }
  // The stop sequence that matched (valid when stopped()).
  const std::string& matched() const { return stops_[stop_index_]; }

 private:
  std::vector<std::string> stops_;
  bool include_stop_;
  std::string held_;  // bytes not yet released
  size_t no_stop_before_ = 0;  // matches must end past held_[0, no_stop_before_)
  int stop_index_ = -1;
};

// Length of the longest prefix of `s` that ends on a UTF-8 character boundary, treating an
// incomplete trailing sequence (up to 3 bytes) as not yet complete.
size_t CompleteUtf8Prefix(const std::string& s);

// `s` with every byte that is not part of a valid UTF-8 sequence replaced by U+FFFD (protobuf
// string fields must hold valid UTF-8; models can emit any byte).
std::string SanitizeUtf8(const std::string& s);

}  // namespace ramba::server

#endif  // RAMBA_SERVER_TEXT_STREAMER_H_
