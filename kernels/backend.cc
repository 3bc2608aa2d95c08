#include "kernels/backend.h"

#ifdef RAMBA_HAVE_CUDA
#include <cuda_runtime_api.h>

#include "kernels/cuda/cuda_backend.h"
#endif

#include <algorithm>
#include <cstring>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "kernels/arg_checks.h"

namespace ramba::kernels {

size_t DTypeSize(DType t) {
  switch (t) {
    case DType::kF32:
      return 4;
    case DType::kBF16:
    case DType::kF16:
      return 2;
  }
  return 0;
}

std::string_view DTypeName(DType t) {
  switch (t) {
    case DType::kF32:
      return "f32";
    case DType::kBF16:
      return "bf16";
    case DType::kF16:
      return "f16";
  }
  return "unknown";
}

namespace {

uint32_t FloatBits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

float BitsFloat(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

}  // namespace

float Bf16ToF32(uint16_t v) { return BitsFloat(static_cast<uint32_t>(v) << 16); }

uint16_t F32ToBf16(float v) {
  const uint32_t u = FloatBits(v);
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    // NaN: keep the sign and a quiet-NaN payload so truncation cannot turn it into infinity.
    return static_cast<uint16_t>((u >> 16) | 0x0040u);
  }
  // Round to nearest, ties to even; overflow rounds up to infinity as IEEE requires.
  const uint32_t rounding = 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>((u + rounding) >> 16);
}

float F16ToF32(uint16_t v) {
  const uint32_t sign = static_cast<uint32_t>(v & 0x8000u) << 16;
  const uint32_t exp = (v >> 10) & 0x1fu;
  const uint32_t mant = v & 0x3ffu;
  if (exp == 0x1f) return BitsFloat(sign | 0x7f800000u | (mant << 13));  // inf / NaN
  if (exp != 0) return BitsFloat(sign | ((exp + 112) << 23) | (mant << 13));
  if (mant == 0) return BitsFloat(sign);
  // Subnormal half: mant * 2^-24 is exact in float.
  const float mag = static_cast<float>(mant) * 5.9604644775390625e-8f;
  return sign ? -mag : mag;
}

uint16_t F32ToF16(float v) {
  const uint32_t u = FloatBits(v);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u | ((a >> 13) & 0x3ffu));  // NaN
  if (a >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to >= 65536: inf
  if (a >= 0x38800000u) {
    // Normal half. Rebias the exponent (127 -> 15) and round the 13 dropped bits to nearest even;
    // a carry out of the mantissa correctly bumps the exponent.
    const uint32_t rebased = a - (112u << 23);
    const uint32_t rounding = 0xfffu + ((rebased >> 13) & 1u);
    return static_cast<uint16_t>(sign | ((rebased + rounding) >> 13));
  }
  if (a < 0x33000000u) return sign;  // below half the smallest subnormal (2^-25): zero
  // Subnormal half: value = m * 2^-24 with m = round(a_float * 2^24), ties to even.
  const uint32_t e = a >> 23;               // 102..112
  const uint32_t mant = (a & 0x7fffffu) | 0x800000u;
  const uint32_t shift = 126 - e;           // 14..24: mant * 2^(e-150) / 2^-24 = mant >> (126-e)
  const uint32_t q = mant >> shift;
  const uint32_t rem = mant & ((1u << shift) - 1);
  const uint32_t half = 1u << (shift - 1);
  const uint32_t r = q + ((rem > half || (rem == half && (q & 1u))) ? 1u : 0u);
  return static_cast<uint16_t>(sign | r);
}

Buffer::Buffer(Backend* owner, void* data, size_t bytes, bool host)
    : owner_(owner), data_(data), bytes_(bytes), host_(host) {
  if (data_ != nullptr && owner_ != nullptr) {
    (host_ ? owner_->host_held_bytes_ : owner_->held_bytes_)
        .fetch_add(static_cast<int64_t>(bytes_), std::memory_order_relaxed);
  }
}

Buffer& Buffer::operator=(Buffer&& o) noexcept {
  if (this != &o) {
    Reset();
    owner_ = std::exchange(o.owner_, nullptr);
    data_ = std::exchange(o.data_, nullptr);
    bytes_ = std::exchange(o.bytes_, 0);
    host_ = std::exchange(o.host_, false);
  }
  return *this;
}

void* Buffer::Release() {
  if (data_ != nullptr && owner_ != nullptr) {
    (host_ ? owner_->host_held_bytes_ : owner_->held_bytes_)
        .fetch_sub(static_cast<int64_t>(bytes_), std::memory_order_relaxed);
  }
  owner_ = nullptr;
  bytes_ = 0;
  host_ = false;
  return std::exchange(data_, nullptr);
}

absl::StatusOr<Buffer> Backend::AllocateHost(size_t bytes) {
  ASSIGN_OR_RETURN(Buffer b, Allocate(bytes));
  return Buffer(this, b.Release(), bytes, /*host=*/true);
}

absl::StatusOr<Buffer> Backend::AllocateHostCopy(const void* host_src, size_t bytes) {
  ASSIGN_OR_RETURN(Buffer b, AllocateHost(bytes));
  RETURN_IF_ERROR(Upload(b.data(), host_src, bytes));
  return b;
}

void Buffer::Reset() {
  if (data_ != nullptr && owner_ != nullptr) {
    (host_ ? owner_->host_held_bytes_ : owner_->held_bytes_)
        .fetch_sub(static_cast<int64_t>(bytes_), std::memory_order_relaxed);
    if (host_) {
      owner_->FreeHost(data_, bytes_);
    } else {
      owner_->Free(data_, bytes_);
    }
  }
  owner_ = nullptr;
  data_ = nullptr;
  bytes_ = 0;
  host_ = false;
}

absl::Status Backend::RmsNormMatmul(const float* x, int64_t ldx, int64_t m,
                                    const float* norm_weight, float eps, float* xn, MatrixView w,
                                    float* y, int64_t ldy) {
  RETURN_IF_ERROR(RmsNorm(x, ldx, norm_weight, xn, ldx, m, w.cols, eps));
  return Matmul(xn, ldx, m, w, nullptr, y, ldy, false);
}

absl::Status Backend::GatedRmsNormMatmul(const float* y, int64_t ldy, const float* z,
                                         int64_t ldz, const float* norm_weight,
                                         int64_t group_size, float eps, int64_t m, float* g,
                                         MatrixView w, float* out, int64_t ldo, bool accumulate) {
  RETURN_IF_ERROR(
      GatedRmsNorm(y, ldy, z, ldz, norm_weight, g, w.cols, m, w.cols, group_size, eps));
  return Matmul(g, w.cols, m, w, nullptr, out, ldo, accumulate);
}

absl::Status Backend::MambaMixer(const MambaMixerArgs& a) {
  const SsmParams& p = a.ssm;
  const int64_t d_inner = p.nheads * p.headdim;
  const int64_t conv_dim = d_inner + 2 * p.ngroups * p.d_state;
  if (a.host_seq_offsets == nullptr && !host_accessible()) {
    return absl::InvalidArgumentError("MambaMixer: host_seq_offsets is required");
  }
  const int64_t* offsets = a.host_seq_offsets != nullptr ? a.host_seq_offsets : a.seq_offsets;
  RETURN_IF_ERROR(CheckMixerOutProj("MambaMixer", a));
  if (a.num_seqs <= 0) return absl::OkStatus();
  const int64_t base = offsets[0], rows = offsets[a.num_seqs] - base;  // rows are absolute
  RETURN_IF_ERROR(CausalConv1dSilu(a.zxbcdt + d_inner, a.ld, a.seq_offsets, a.num_seqs,
                                   a.conv_states, a.conv_weight, a.conv_bias, conv_dim,
                                   a.conv_kernel, a.xbc, a.host_seq_offsets));
  RETURN_IF_ERROR(SsmScan(a.xbc, conv_dim, a.zxbcdt + d_inner + conv_dim, a.ld, a.seq_offsets,
                          a.num_seqs, a.ssm_states, p, a.y, a.host_seq_offsets));
  if (a.out_proj.data != nullptr) {
    return GatedRmsNormMatmul(a.y + base * d_inner, d_inner, a.zxbcdt + base * a.ld, a.ld,
                              a.norm_weight, a.norm_group_size, a.eps, rows,
                              a.g + base * d_inner, a.out_proj, a.out + base * a.ld_out,
                              a.ld_out, /*accumulate=*/true);
  }
  return GatedRmsNorm(a.y + base * d_inner, d_inner, a.zxbcdt + base * a.ld, a.ld, a.norm_weight,
                      a.g + base * d_inner, d_inner, rows, d_inner, a.norm_group_size, a.eps);
}

absl::Status Backend::MambaBlocks(const MambaBlockArgs* blocks, int64_t count) {
  for (int64_t i = 0; i < count; ++i) {
    const MambaBlockArgs& b = blocks[i];
    const MambaMixerArgs& m = b.mixer;
    if (m.host_seq_offsets == nullptr && !host_accessible()) {
      return absl::InvalidArgumentError("MambaBlocks: host_seq_offsets is required");
    }
    if (m.out_proj.data == nullptr || m.out == nullptr) {
      return absl::InvalidArgumentError("MambaBlocks: every block needs out_proj and out");
    }
    if (m.num_seqs <= 0) continue;
    const int64_t* offsets = m.host_seq_offsets != nullptr ? m.host_seq_offsets : m.seq_offsets;
    const int64_t base = offsets[0], rows = offsets[m.num_seqs] - base;
    RETURN_IF_ERROR(RmsNormMatmul(m.out + base * m.ld_out, m.ld_out, rows, b.norm_weight, b.eps,
                                  b.xn + base * m.ld_out, b.in_proj,
                                  const_cast<float*>(m.zxbcdt) + base * m.ld, m.ld));
    RETURN_IF_ERROR(MambaMixer(m));
  }
  return absl::OkStatus();
}

absl::Status Backend::HsaBlock(const HsaBlockArgs& a) {
  const int64_t width = a.nh * a.hd;
  RETURN_IF_ERROR(
      RmsNormMatmul(a.h, a.ldh, a.rows, a.norm_weight, a.eps, a.xn, a.q_proj, a.q, width));
  RETURN_IF_ERROR(SparseChunkAttention(a.q, a.rows, a.mem, a.indices, a.weights, a.retrieval_heads,
                                       a.top_k, a.nh, a.nkv, a.hd, a.chunk_size, a.attn));
  return Matmul(a.attn, width, a.rows, a.o_proj, nullptr, a.h, a.ldh, /*accumulate=*/true);
}

absl::Status Backend::StageHostChunks(const ChunkMemoryBatch& mem, const int64_t* host_chunks,
                                      const int32_t* indices, int64_t rows, int64_t heads,
                                      int64_t top_k, int64_t chunk_floats,
                                      const StagedChunks& out) {
  if (!host_accessible()) return absl::UnimplementedError("StageHostChunks");
  const int64_t per_row = heads * top_k, S = out.cache.slots;
  if (S > 0 && (out.cache.blocks == nullptr || out.cache.tags == nullptr)) {
    return absl::InvalidArgumentError("StageHostChunks: cache slots without cache arrays");
  }
  const size_t chunk_bytes = chunk_floats * sizeof(float);
  uint64_t selected = 0, host = 0, hits = 0;
  for (int64_t r = 0; r < rows; ++r) {
    out.tables[r] = out.slots + r * per_row;
    out.num_chunks[r] = per_row;
    // The row's cache: tags (chunk + 1 per slot), stamps (last use per slot), the clock.
    float* cache = S > 0 ? out.cache.blocks[r] : nullptr;
    int32_t* tags = cache != nullptr ? out.cache.tags[r] : nullptr;
    int32_t* stamps = tags != nullptr ? tags + S : nullptr;
    const int32_t now = tags != nullptr ? ++tags[2 * S] : 0;
    for (int64_t j = 0; j < per_row; ++j) {
      const int64_t slot = r * per_row + j;
      const int32_t c = indices[slot];
      out.indices[slot] = c < 0 ? -1 : static_cast<int32_t>(j);
      selected += c >= 0;
      if (c < 0) {
        out.slots[slot] = nullptr;
        continue;
      }
      if (c >= host_chunks[r]) {
        out.slots[slot] = mem.chunk_kv[r][c];
        continue;
      }
      ++host;
      int64_t at = -1;  // the cache slot holding c, else the one to copy it into
      bool hit = false;
      for (int64_t i = 0; tags != nullptr && i < S; ++i) {
        if (tags[i] == c + 1) {
          at = i;
          hit = true;
          break;
        }
        if (stamps[i] < now && (at < 0 || stamps[i] < stamps[at])) at = i;
      }
      float* block = at >= 0 ? cache + at * chunk_floats : out.blocks + slot * chunk_floats;
      if (hit) {
        ++hits;
      } else {
        std::memcpy(block, mem.chunk_kv[r][c], chunk_bytes);
        if (at >= 0) tags[at] = c + 1;
      }
      if (at >= 0) stamps[at] = now;
      out.slots[slot] = block;
    }
  }
  if (out.tier_counts != nullptr) {
    out.tier_counts[0] += selected;
    out.tier_counts[1] += host;
    out.tier_counts[2] += hits;
  }
  return absl::OkStatus();
}

absl::Status Backend::StageSelectedHostChunks(const ChunkMemoryBatch& mem, const int32_t* indices,
                                              int64_t rows, int64_t per_row, int64_t chunk_floats,
                                              const StagedChunkTables& out) {
  if (!host_accessible()) return absl::UnimplementedError("StageSelectedHostChunks");
  const int64_t num_seqs = mem.num_seqs;
  const int64_t* host_off = out.host_offsets;
  // Picks per host-tier chunk, counted up to kMaxCountedPicks.
  std::fill(out.picks, out.picks + out.total_host, 0);
  uint64_t selected = 0, host = 0;
  for (int64_t slot = 0; slot < rows * per_row; ++slot) {
    const int32_t c = indices[slot];
    const int32_t s = mem.row_seq[slot / per_row];
    selected += c >= 0;
    if (c >= 0 && c < host_off[s + 1] - host_off[s]) {
      ++out.picks[host_off[s] + c];
      ++host;
    }
  }
  if (out.tier_counts != nullptr) {
    out.tier_counts[0] += selected;
    out.tier_counts[1] += host;
  }
  for (int64_t i = 0; i < out.total_host; ++i) {
    out.picks[i] = std::min(out.picks[i], kMaxCountedPicks);
  }
  // Threshold t: every chunk with at least t picks fits; chunks with t - 1 fill what is left.
  int64_t bins[kMaxCountedPicks + 1] = {};
  for (int64_t i = 0; i < out.total_host; ++i) ++bins[out.picks[i]];
  int32_t t = 1;
  for (int64_t fit = 0;
       t <= kMaxCountedPicks && fit + bins[kMaxCountedPicks + 1 - t] <= out.capacity; ++t) {
    fit += bins[kMaxCountedPicks + 1 - t];
  }
  t = kMaxCountedPicks + 2 - t;  // the smallest pick count all of whose chunks fit
  int32_t staged = 0;
  for (int64_t i = 0; i < out.total_host; ++i) {
    if (out.picks[i] >= t) out.picks[i] = -(++staged);
  }
  for (int64_t i = 0; i < out.total_host && t > 1 && staged < out.capacity; ++i) {
    if (out.picks[i] == t - 1) out.picks[i] = -(++staged);
  }
  *out.staged = staged;
  // Tables: staged chunks (picks < 0: slot -picks - 1) at their copies, the rest in place.
  for (int64_t s = 0; s < num_seqs; ++s) {
    const float** table = out.entries + out.table_offsets[s];
    out.tables[s] = table;
    for (int64_t c = 0; c < mem.num_chunks[s]; ++c) {
      const float* src = mem.chunk_kv[s][c];
      const int32_t p = c < host_off[s + 1] - host_off[s] ? out.picks[host_off[s] + c] : 0;
      if (p < 0) {
        float* block = out.blocks + static_cast<int64_t>(-p - 1) * chunk_floats;
        std::memcpy(block, src, chunk_floats * sizeof(float));
        table[c] = block;
      } else {
        table[c] = src;
      }
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<Backend::Fence>> Backend::RecordFence() {
  return std::make_unique<Fence>();
}

absl::Status Backend::DownloadSettled(void* host_dst, const void* src, size_t bytes) {
  return Download(host_dst, src, bytes);
}

absl::StatusOr<int> Backend::NextDownloadSlot(size_t bytes, int64_t* ticket) {
  if (bytes > kMaxAsyncDownloadBytes) {
    return absl::InvalidArgumentError(absl::StrCat("BeginDownload: ", bytes, " bytes is over the ",
                                                   kMaxAsyncDownloadBytes, "-byte limit"));
  }
  if (downloads_begun_ - downloads_finished_ >= kMaxAsyncDownloads) {
    return absl::FailedPreconditionError(
        absl::StrCat("BeginDownload: ", kMaxAsyncDownloads, " downloads are already unfinished"));
  }
  *ticket = downloads_begun_;
  const int slot = static_cast<int>(*ticket % kMaxAsyncDownloads);
  download_bytes_[slot] = bytes;
  return slot;
}

absl::StatusOr<int> Backend::FinishingDownloadSlot(int64_t ticket) {
  if (ticket != downloads_finished_ || ticket >= downloads_begun_) {
    return absl::FailedPreconditionError(
        absl::StrCat("FinishDownload: ticket ", ticket, " is not the oldest unfinished download (",
                     downloads_finished_, " of ", downloads_begun_, " begun)"));
  }
  ++downloads_finished_;
  return static_cast<int>(ticket % kMaxAsyncDownloads);
}

absl::StatusOr<int64_t> Backend::BeginDownload(const void* src, size_t bytes) {
  int64_t ticket = 0;
  ASSIGN_OR_RETURN(const int slot, NextDownloadSlot(bytes, &ticket));
  download_copies_[slot].resize(bytes);
  RETURN_IF_ERROR(Download(download_copies_[slot].data(), src, bytes));
  DownloadBegun();
  return ticket;
}

absl::Status Backend::FinishDownload(int64_t ticket, void* host_dst) {
  ASSIGN_OR_RETURN(const int slot, FinishingDownloadSlot(ticket));
  if (download_bytes_[slot] > 0) {
    std::memcpy(host_dst, download_copies_[slot].data(), download_bytes_[slot]);
  }
  return absl::OkStatus();
}

#ifdef RAMBA_HAVE_CUDA
bool CudaAvailable() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // no driver or no device: clear the error, report none
    return false;
  }
  return count > 0;
}
#else
bool CudaAvailable() { return false; }
#endif

absl::StatusOr<std::unique_ptr<Backend>> CreateCudaBackend(DType weight_dtype) {
#ifdef RAMBA_HAVE_CUDA
  if (!CudaAvailable()) {
    return absl::FailedPreconditionError("--device=cuda but no CUDA GPU is visible");
  }
  ASSIGN_OR_RETURN(std::unique_ptr<CudaBackend> b, CudaBackend::Create(0, weight_dtype));
  return std::unique_ptr<Backend>(std::move(b));
#else
  return absl::UnimplementedError(
      "the CUDA backend is not built into this binary; use --device=cpu");
#endif
}

absl::StatusOr<std::unique_ptr<Backend>> CreateBackend(std::string_view device, int threads) {
  if (device == "cpu") return CreateCpuBackend(threads);
  if (device == "cuda" || (device == "auto" && CudaAvailable())) {
    return CreateCudaBackend(DType::kBF16);
  }
  if (device == "auto") return CreateCpuBackend(threads);
  return absl::InvalidArgumentError(
      absl::StrCat("unknown device \"", std::string(device), "\"; expected cpu, cuda or auto"));
}

}  // namespace ramba::kernels
