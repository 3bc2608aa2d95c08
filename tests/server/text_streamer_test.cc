#include "server/text_streamer.h"

#include "gtest/gtest.h"

namespace ramba::server {
namespace {

std::string Feed(TextStreamer& t, const std::vector<std::string>& pieces) {
  std::string out;
  for (const auto& p : pieces) out += t.Add(p);
  return out;
}

TEST(TextStreamerTest, PassesPlainTextThrough) {
  TextStreamer t({}, false);
  EXPECT_EQ(t.Add("Hel"), "Hel");
  EXPECT_EQ(t.Add("lo"), "lo");
  EXPECT_EQ(t.Flush(), "");
}

TEST(TextStreamerTest, HoldsBackSplitUtf8) {
  TextStreamer t({}, false);
  const std::string e_acute = "\xC3\xA9";
  EXPECT_EQ(t.Add("caf" + e_acute.substr(0, 1)), "caf");
  EXPECT_EQ(t.Add(e_acute.substr(1)), e_acute);
  const std::string emoji = "\xF0\x9F\x98\x80";
  EXPECT_EQ(t.Add(emoji.substr(0, 2)), "");
  EXPECT_EQ(t.Add(emoji.substr(2)), emoji);
  EXPECT_EQ(t.Add("\xE2\x82"), "");
  EXPECT_EQ(t.Flush(), "\xEF\xBF\xBD");  // a dangling partial character becomes U+FFFD
}

TEST(TextStreamerTest, StopsOnSequenceAcrossTokensWithoutLeakingIt) {
  TextStreamer t({"\nUser:"}, false);
  EXPECT_EQ(Feed(t, {"Sure", ".", "\n", "Us"}), "Sure.");  // "\nUs" held back
  EXPECT_FALSE(t.stopped());
  EXPECT_EQ(t.Add("er: more"), "");
  EXPECT_TRUE(t.stopped());
  EXPECT_EQ(t.matched(), "\nUser:");
  EXPECT_EQ(t.Add("ignored"), "");
}

TEST(TextStreamerTest, ReleasesHeldTextWhenNoMatch) {
  TextStreamer t({"STOP"}, false);
  EXPECT_EQ(t.Add("ST"), "");
  EXPECT_EQ(t.Add("ew"), "STew");
  EXPECT_EQ(t.Add("S"), "");
  EXPECT_EQ(t.Flush(), "S");
}

TEST(TextStreamerTest, IncludeStopSequenceAndEarliestMatch) {
  TextStreamer t({"world", "lo w"}, true);
  EXPECT_EQ(t.Add("hello world"), "hello w");
  EXPECT_EQ(t.matched(), "lo w");
}

// min_tokens: a match ending in bytes added with may_stop false does not count; one that began
// there and ends later does.
TEST(TextStreamerTest, MatchesEndingBeforeMayStopDoNotCount) {
  TextStreamer t({"ab", "b"}, false);
  EXPECT_EQ(t.Add("xab", false), "xab");  // both matches end here: released
  EXPECT_FALSE(t.stopped());
  EXPECT_EQ(t.Add("a", false), "");  // may start "ab": held back
  EXPECT_EQ(t.Add("bc", true), "");  // "ab" ends now: stops
  EXPECT_TRUE(t.stopped());
  EXPECT_EQ(t.matched(), "ab");

  // A shorter stop sequence inside text held back for a longer one ended too early.
  TextStreamer u({"a", "abc"}, true);
  EXPECT_EQ(u.Add("ab", false), "");  // held: "ab" may begin "abc"
  EXPECT_EQ(u.Add("x", true), "abx");
  EXPECT_FALSE(u.stopped());
  EXPECT_EQ(u.Add("a", true), "a");  // include_stop_sequence: the match is released
  EXPECT_TRUE(u.stopped());
}

TEST(TextStreamerTest, InvalidBytesBecomeReplacementCharacters) {
  EXPECT_EQ(SanitizeUtf8("a\xFF" "b"), "a\xEF\xBF\xBD" "b");
  EXPECT_EQ(SanitizeUtf8("\x80"), "\xEF\xBF\xBD");
  EXPECT_EQ(SanitizeUtf8("\xC0\xAF"), "\xEF\xBF\xBD\xEF\xBF\xBD");  // overlong
  EXPECT_EQ(SanitizeUtf8("\xED\xA0\x80"), "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD");  // surrogate
  EXPECT_EQ(SanitizeUtf8("ok \xE2\x82\xAC"), "ok \xE2\x82\xAC");
  TextStreamer t({}, false);
  EXPECT_EQ(t.Add("x\xFE"), "x\xEF\xBF\xBD");
}

TEST(TextStreamerTest, CompleteUtf8Prefix) {
  EXPECT_EQ(CompleteUtf8Prefix(""), 0u);
  EXPECT_EQ(CompleteUtf8Prefix("ab"), 2u);
  EXPECT_EQ(CompleteUtf8Prefix("a\xC3"), 1u);
  EXPECT_EQ(CompleteUtf8Prefix("a\xE2\x82\xAC"), 4u);
  EXPECT_EQ(CompleteUtf8Prefix("a\xF0\x9F\x98"), 1u);
}

}  // namespace
}  // namespace ramba::server
