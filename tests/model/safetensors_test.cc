// safetensors: round trips of every supported dtype with metadata, and one test per malformation
// (each must be an error with the right code and a message naming the tensor or field).
#include "model/safetensors.h"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "gtest/gtest.h"
#include "kernels/backend.h"

namespace ramba {
namespace {

using kernels::DType;

std::string Le64(uint64_t v) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[i] = static_cast<char>((v >> (8 * i)) & 0xff);
  return s;
}

// A file with the given header text and `data_bytes` bytes of data.
std::string File(const std::string& header, size_t data_bytes) {
  return Le64(header.size()) + header + std::string(data_bytes, '\x11');
}

std::string U16Bytes(const std::vector<uint16_t>& v) {
  std::string s;
  for (uint16_t x : v) {
    s.push_back(static_cast<char>(x & 0xff));
    s.push_back(static_cast<char>(x >> 8));
  }
  return s;
}

void ExpectError(const absl::StatusOr<TensorMap>& r, absl::StatusCode code,
                 const std::string& needle) {
  ASSERT_FALSE(r.ok()) << "accepted; expected an error naming " << needle;
  EXPECT_EQ(r.status().code(), code) << r.status();
  EXPECT_NE(r.status().message().find(needle), std::string::npos) << r.status();
}

TEST(SafetensorsTest, RoundTripAllDTypesWithMetadata) {
  TensorMap m;
  m["a.f32"] = MakeF32Tensor({2, 3}, {1.f, -2.f, 3.5f, 0.f, 1e-30f, -7.25f});
  TensorData bf;
  bf.dtype = DType::kBF16;
  bf.shape = {3};
  const std::vector<float> bf_vals = {1.0f, -2.5f, 0.15625f};
  std::vector<uint16_t> bf_bits;
  for (float f : bf_vals) bf_bits.push_back(kernels::F32ToBf16(f));
  bf.bytes = U16Bytes(bf_bits);
  m["b.bf16"] = bf;
  TensorData hf;
  hf.dtype = DType::kF16;
  hf.shape = {2, 1, 2};
  // 1.0, -2.0, 0.5, 65504 (largest f16) as raw IEEE half bits.
  hf.bytes = U16Bytes({0x3C00, 0xC000, 0x3800, 0x7BFF});
  m["c.f16"] = hf;
  m["d.scalar"] = MakeF32Tensor({}, {42.f});
  m["e.empty"] = MakeF32Tensor({0, 5}, {});

  const std::map<std::string, std::string> meta = {{"format", "pt"}, {"step", "1200"}};
  const std::string bytes = SerializeSafetensors(m, meta);
  // Data section 8-byte aligned.
  uint64_t header_len = 0;
  std::memcpy(&header_len, bytes.data(), 8);
  EXPECT_EQ(header_len % 8, 0u);

  std::map<std::string, std::string> meta_back;
  auto r = ParseSafetensors(bytes, &meta_back);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(meta_back, meta);
  ASSERT_EQ(r->size(), m.size());
  for (const auto& [name, t] : m) {
    const TensorData& got = r->at(name);
    EXPECT_EQ(got.dtype, t.dtype) << name;
    EXPECT_EQ(got.shape, t.shape) << name;
    EXPECT_EQ(got.bytes, t.bytes) << name;
  }
  EXPECT_EQ(r->at("a.f32").ToFloat(), (std::vector<float>{1.f, -2.f, 3.5f, 0.f, 1e-30f, -7.25f}));
  EXPECT_EQ(r->at("b.bf16").ToFloat(), bf_vals);
  EXPECT_EQ(r->at("c.f16").ToFloat(), (std::vector<float>{1.f, -2.f, 0.5f, 65504.f}));
  EXPECT_EQ(r->at("c.f16").NumElements(), 4);
  EXPECT_EQ(r->at("d.scalar").NumElements(), 1);
  EXPECT_EQ(r->at("d.scalar").ToFloat(), std::vector<float>{42.f});
  EXPECT_EQ(r->at("e.empty").NumElements(), 0);

  // Without metadata there is no __metadata__ entry, and the parse still works.
  auto plain = ParseSafetensors(SerializeSafetensors(m));
  ASSERT_TRUE(plain.ok()) << plain.status();
  EXPECT_EQ(plain->count("__metadata__"), 0u);
}

TEST(SafetensorsTest, WriteAndReadFile) {
  const std::string path = ::testing::TempDir() + "/ramba_safetensors_test.safetensors";
  TensorMap m;
  m["w"] = MakeF32Tensor({4}, {1, 2, 3, 4});
  ASSERT_TRUE(WriteSafetensors(path, m, {{"k", "v"}}).ok());
  std::map<std::string, std::string> meta;
  auto r = ReadSafetensors(path, &meta);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->at("w").ToFloat(), (std::vector<float>{1, 2, 3, 4}));
  EXPECT_EQ(meta.at("k"), "v");

  // A file error carries the path.
  std::FILE* f = std::fopen(path.c_str(), "wb");
  ASSERT_NE(f, nullptr);
  std::fputs("xx", f);
  std::fclose(f);
  r = ReadSafetensors(path);
  ExpectError(r, absl::StatusCode::kDataLoss, path);

  // Empty file.
  f = std::fopen(path.c_str(), "wb");
  std::fclose(f);
  ExpectError(ReadSafetensors(path), absl::StatusCode::kDataLoss, "8-byte");
  std::remove(path.c_str());

  EXPECT_EQ(ReadSafetensors("/nonexistent/ramba/model.safetensors").status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_FALSE(ReadSafetensors(::testing::TempDir()).ok());  // a directory
}

TEST(SafetensorsTest, WriteRejectsInconsistentTensors) {
  const std::string path = ::testing::TempDir() + "/ramba_safetensors_bad.safetensors";
  TensorMap m;
  m["short"] = MakeF32Tensor({4}, {1, 2, 3});
  auto s = WriteSafetensors(path, m);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("short"), std::string::npos) << s;
  TensorMap reserved;
  reserved["__metadata__"] = MakeF32Tensor({1}, {1});
  EXPECT_EQ(WriteSafetensors(path, reserved).code(), absl::StatusCode::kInvalidArgument);
}

TEST(SafetensorsTest, TruncatedFiles) {
  ExpectError(ParseSafetensors(""), absl::StatusCode::kDataLoss, "8-byte");
  ExpectError(ParseSafetensors(std::string("\x10\0\0", 3)), absl::StatusCode::kDataLoss, "8-byte");
  // Header length past EOF.
  ExpectError(ParseSafetensors(Le64(1000) + "{}"), absl::StatusCode::kDataLoss, "header length");
  ExpectError(ParseSafetensors(Le64(~0ull) + "{}"), absl::StatusCode::kDataLoss, "header length");
  // Truncated header (the JSON is cut short inside the declared length).
  const std::string header = R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  const std::string good = File(header, 8);
  ASSERT_TRUE(ParseSafetensors(good).ok());
  ExpectError(ParseSafetensors(good.substr(0, 20)), absl::StatusCode::kDataLoss, "header length");
  ExpectError(ParseSafetensors(Le64(20) + header.substr(0, 20)),
              absl::StatusCode::kInvalidArgument, "JSON");
  // Truncated data.
  ExpectError(ParseSafetensors(good.substr(0, good.size() - 1)), absl::StatusCode::kDataLoss,
              "'w'");
}

TEST(SafetensorsTest, HeaderNotAJsonObject) {
  ExpectError(ParseSafetensors(File("garbage!", 0)), absl::StatusCode::kInvalidArgument, "JSON");
  ExpectError(ParseSafetensors(File("[1,2,3]", 0)), absl::StatusCode::kInvalidArgument, "object");
  ExpectError(ParseSafetensors(File(R"({"w": 5})", 0)), absl::StatusCode::kInvalidArgument,
              "'w'");
  // An empty object is a valid, empty file.
  auto r = ParseSafetensors(File("{}", 0));
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_TRUE(r->empty());
}

TEST(SafetensorsTest, MissingOrMistypedFields) {
  struct Case {
    const char* header;
    const char* needle;
  };
  const Case cases[] = {
      {R"({"w":{"shape":[2],"data_offsets":[0,8]}})", "dtype"},
      {R"({"w":{"dtype":"F32","data_offsets":[0,8]}})", "shape"},
      {R"({"w":{"dtype":"F32","shape":[2]}})", "data_offsets"},
      {R"({"w":{"dtype":32,"shape":[2],"data_offsets":[0,8]}})", "dtype"},
      {R"({"w":{"dtype":"F32","shape":2,"data_offsets":[0,8]}})", "shape"},
      {R"({"w":{"dtype":"F32","shape":[2.5],"data_offsets":[0,8]}})", "shape"},
      {R"({"w":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", "shape"},
      {R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0]}})", "data_offsets"},
      {R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[-8,0]}})", "data_offsets"},
      {R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}})", "data_offsets"},
      {R"({"w":{"dtype":"F32","shape":[2],"data_offsets":"0-8"}})", "data_offsets"},
  };
  for (const Case& c : cases) {
    auto r = ParseSafetensors(File(c.header, 8));
    ASSERT_FALSE(r.ok()) << c.header;
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << c.header;
    EXPECT_NE(r.status().message().find("'w'"), std::string::npos) << r.status();
    EXPECT_NE(r.status().message().find(c.needle), std::string::npos) << r.status();
  }
}

TEST(SafetensorsTest, UnsupportedDTypes) {
  ExpectError(ParseSafetensors(File(R"({"w":{"dtype":"F64","shape":[1],"data_offsets":[0,8]}})", 8)),
              absl::StatusCode::kInvalidArgument, "F64");
  auto r = ParseSafetensors(File(R"({"w":{"dtype":"I8","shape":[8],"data_offsets":[0,8]}})", 8));
  ExpectError(r, absl::StatusCode::kInvalidArgument, "'w'");
  EXPECT_NE(r.status().message().find("only F32, BF16, F16"), std::string::npos) << r.status();
  ExpectError(ParseSafetensors(File(R"({"w":{"dtype":"Q4","shape":[8],"data_offsets":[0,8]}})", 8)),
              absl::StatusCode::kInvalidArgument, "unknown dtype Q4");
}

TEST(SafetensorsTest, ShapeAndOffsetsMismatch) {
  // 3 floats need 12 bytes, the offsets hold 8.
  auto r = ParseSafetensors(File(R"({"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 12));
  ExpectError(r, absl::StatusCode::kInvalidArgument, "'w'");
  EXPECT_NE(r.status().message().find("12 bytes"), std::string::npos) << r.status();
  // BF16 is two bytes an element.
  ExpectError(ParseSafetensors(File(R"({"w":{"dtype":"BF16","shape":[2,2],"data_offsets":[0,16]}})", 16)),
              absl::StatusCode::kInvalidArgument, "'w'");
  // Element count overflow.
  ExpectError(ParseSafetensors(File(
                  R"({"w":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}})", 8)),
              absl::StatusCode::kInvalidArgument, "'w'");
}

TEST(SafetensorsTest, OffsetsBeyondData) {
  ExpectError(ParseSafetensors(File(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})", 12)),
              absl::StatusCode::kDataLoss, "'w'");
}

TEST(SafetensorsTest, OverlappingRanges) {
  const std::string header =
      R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
      R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})";
  auto r = ParseSafetensors(File(header, 12));
  ExpectError(r, absl::StatusCode::kInvalidArgument, "overlap");
  EXPECT_NE(r.status().message().find("'a'"), std::string::npos) << r.status();
  EXPECT_NE(r.status().message().find("'b'"), std::string::npos) << r.status();
  // Same range twice.
  const std::string same =
      R"({"b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
      R"("a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  ExpectError(ParseSafetensors(File(same, 8)), absl::StatusCode::kInvalidArgument, "overlap");
  // Out-of-order but disjoint ranges and empty tensors are fine.
  const std::string ok =
      R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]},)"
      R"("z":{"dtype":"F32","shape":[0],"data_offsets":[4,4]},)"
      R"("b":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})";
  EXPECT_TRUE(ParseSafetensors(File(ok, 8)).ok());
}

TEST(SafetensorsTest, DuplicateNames) {
  const std::string header =
      R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
      R"("w":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})";
  ExpectError(ParseSafetensors(File(header, 8)), absl::StatusCode::kInvalidArgument,
              "'w' more than once");
}

TEST(SafetensorsTest, Metadata) {
  std::map<std::string, std::string> meta;
  auto r = ParseSafetensors(File(R"({"__metadata__":{"format":"pt"}})", 0), &meta);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_TRUE(r->empty());
  EXPECT_EQ(meta.at("format"), "pt");
  ExpectError(ParseSafetensors(File(R"({"__metadata__":[1]})", 0)),
              absl::StatusCode::kInvalidArgument, "__metadata__");
  ExpectError(ParseSafetensors(File(R"({"__metadata__":{"step":3}})", 0)),
              absl::StatusCode::kInvalidArgument, "step");
}

TEST(SafetensorsTest, HeaderPaddingAndTrailingSpacesAccepted) {
  const std::string header = R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}      )";
  auto r = ParseSafetensors(File(header, 4));
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->at("w").shape, std::vector<int64_t>{1});
}

}  // namespace
}  // namespace ramba
