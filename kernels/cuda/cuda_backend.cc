#include "kernels/cuda/cuda_backend.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <string_view>

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "kernels/arg_checks.h"
#include "kernels/cuda/cublaslt_api.h"
#include "kernels/cuda/cuda_check.h"

namespace ramba::kernels {
namespace {



// Offsets are checked on the host copy: device memory is never read back to validate.
absl::Status CheckHostOffsets(std::string_view op, const int64_t* host_offsets, int64_t num_seqs) {
  RAMBA_CHECK_ARG(op, num_seqs >= 0, "num_seqs must be >= 0");
  if (num_seqs == 0) return absl::OkStatus();
  RAMBA_CHECK_ARG(op, host_offsets != nullptr,
                  "the CUDA backend needs host_seq_offsets (a host copy of seq_offsets)");
  RAMBA_CHECK_ARG(op, host_offsets[0] >= 0, "seq_offsets[0] must be >= 0");
  for (int64_t s = 0; s < num_seqs; ++s) {
    if (host_offsets[s + 1] < host_offsets[s]) {
      return InvalidOpArgument(op, absl::StrCat("seq_offsets decrease at sequence ", s));
    }
  }
  return absl::OkStatus();
}

bool ValidWeightDtype(DType t) {
  return t == DType::kF32 || t == DType::kBF16 || t == DType::kF16;
}

}  // namespace

absl::StatusOr<std::unique_ptr<CudaBackend>> CudaBackend::Create(int device, DType weight_dtype) {
  if (weight_dtype != DType::kBF16 && weight_dtype != DType::kF32) {
    return absl::InvalidArgumentError("CUDA weight dtype must be bf16 or f32");
  }
  std::unique_ptr<CudaBackend> b(new CudaBackend());
  b->weight_dtype_ = weight_dtype;
  RETURN_IF_ERROR(b->Init(device));
  return b;
}

absl::Status CudaBackend::Init(int dev) {
  int count = 0;
  RAMBA_CUDA_RETURN_IF_ERROR(cudaGetDeviceCount(&count));
  if (dev < 0 || dev >= count) {
    return absl::FailedPreconditionError(
        absl::StrCat("CUDA device ", dev, " requested but ", count, " visible"));
  }
  device = dev;
  RAMBA_CUDA_RETURN_IF_ERROR(cudaSetDevice(dev));
  RAMBA_CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, dev));
  int smem = 0;
  RAMBA_CUDA_RETURN_IF_ERROR(
      cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  max_shared_per_block = static_cast<size_t>(smem);
  RAMBA_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  RAMBA_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&side_stream_, cudaStreamNonBlocking));
  RAMBA_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&settled_stream_, cudaStreamNonBlocking));
  // Keep freed pool memory cached: chunk K/V and scratch come and go at every step, and returning
  // them to the driver would make every allocation a synchronising cudaMalloc.
  cudaMemPool_t pool;
  RAMBA_CUDA_RETURN_IF_ERROR(cudaDeviceGetDefaultMemPool(&pool, dev));
  uint64_t threshold = UINT64_MAX;
  RAMBA_CUDA_RETURN_IF_ERROR(
      cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &threshold));
  RETURN_IF_ERROR(cuda::LoadCublasLt());
  RAMBA_CUBLAS_RETURN_IF_ERROR(cuda::CublasLt().cublasLtCreate(&cublaslt));
  RAMBA_CUDA_RETURN_IF_ERROR(
      cudaMallocHost(reinterpret_cast<void**>(&staging_), kStagingSegments * kStagingSegmentBytes));
  for (cudaEvent_t& e : staging_done_) {
    RAMBA_CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
  }
  RAMBA_CUDA_RETURN_IF_ERROR(cudaMallocHost(reinterpret_cast<void**>(&download_slots_),
                                            kMaxAsyncDownloads * kMaxAsyncDownloadBytes));
  for (cudaEvent_t& e : download_done_) {
    RAMBA_CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
  }
  scratch_.resize(static_cast<size_t>(cuda::ScratchSlot::kNumSlots));
  const size_t counter_bytes = static_cast<size_t>(CounterSlot::kNumSlots) * kCountersPerSlot *
                               sizeof(unsigned);
  RAMBA_CUDA_RETURN_IF_ERROR(cudaMalloc(reinterpret_cast<void**>(&counters), counter_bytes));
  RAMBA_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(counters, 0, counter_bytes, stream));
  // Programmatic dependent launch needs sm_90; RAMBA_CUDA_PDL=0 turns it off (to compare).
  int major = 0;
  RAMBA_CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  pdl = major >= 9 && cuda::EnvSwitchOn("RAMBA_CUDA_PDL");
  return absl::OkStatus();
}

CudaBackend::~CudaBackend() {
  if (stream != nullptr) cudaStreamSynchronize(stream);
  for (ScratchBlock& s : scratch_) {
    if (s.data != nullptr) cudaFreeAsync(s.data, stream);
  }
  if (cublaslt != nullptr) cuda::CublasLt().cublasLtDestroy(cublaslt);
  for (cudaEvent_t e : staging_done_) {
    if (e != nullptr) cudaEventDestroy(e);
  }
  for (cudaEvent_t e : download_done_) {
    if (e != nullptr) cudaEventDestroy(e);
  }
  if (download_slots_ != nullptr) cudaFreeHost(download_slots_);
  for (SettlingHostBlocks& b : host_settling_) cudaEventDestroy(b.done);
  for (void* slab : host_slabs_) cudaFreeHost(slab);
  for (auto& [id, exec] : graphs_) cudaGraphExecDestroy(exec);
  if (staging_ != nullptr) cudaFreeHost(staging_);
  if (counters != nullptr) cudaFree(counters);
  for (void* p : pending_frees_) cudaFreeAsync(p, stream);
  if (stream != nullptr) {
    cudaStreamSynchronize(stream);
    cudaStreamDestroy(stream);
  }
  for (cudaStream_t s : {side_stream_, settled_stream_}) {
    if (s == nullptr) continue;
    cudaStreamSynchronize(s);
    cudaStreamDestroy(s);
  }
}

// ---- Memory ----

absl::StatusOr<Buffer> CudaBackend::Allocate(size_t bytes) {
  // Never hand out null: a zero-byte buffer is still a valid pointer for ops of size 0.
  const size_t rounded = bytes == 0 ? 256 : bytes;
  void* p = nullptr;
  absl::MutexLock lock(&mu_);
  const cudaStream_t s = MemoryStream();
  const cudaError_t e = cudaMallocAsync(&p, rounded, s);
  if (e == cudaErrorMemoryAllocation) {
    cudaGetLastError();  // clear the sticky-free error so later calls are not blamed
    return absl::ResourceExhaustedError(
        absl::StrCat("Allocate: out of GPU memory for ", bytes, " bytes"));
  }
  RAMBA_CUDA_RETURN_IF_ERROR(e);
  RETURN_IF_ERROR(FinishMemoryCall(s));
  return Buffer(this, p, bytes);
}

namespace {

// AllocateHost's block size for `bytes`: its pool of equal blocks.
size_t HostBlockBytes(size_t bytes) { return std::max<size_t>((bytes + 255) & ~size_t{255}, 256); }

}  // namespace

absl::StatusOr<Buffer> CudaBackend::AllocateHost(size_t bytes) {
  absl::MutexLock lock(&mu_);
  ASSIGN_OR_RETURN(void* p, TakeHostBlock(HostBlockBytes(bytes)));
  return Buffer(this, p, bytes, /*host=*/true);
}

absl::StatusOr<Buffer> CudaBackend::AllocateHostCopy(const void* host_src, size_t bytes) {
  RAMBA_CHECK_ARG("AllocateHostCopy", host_src != nullptr || bytes == 0, "null pointer");
  ASSIGN_OR_RETURN(Buffer b, AllocateHost(bytes));
  std::memcpy(b.data(), host_src, bytes);  // no queued work reads a block handed out
  return b;
}

absl::StatusOr<void*> CudaBackend::TakeHostBlock(size_t block) {
  std::vector<void*>* free = &host_free_[block];
  if (free->empty()) SettleHostBlocks();
  if (free->empty()) {
    if (capturing_ && !OtherThreadRecording()) {
      return absl::FailedPreconditionError("AllocateHost: cannot allocate while recording a graph");
    }
    const size_t count = std::max<size_t>(kHostSlabBytes / block, 1);
    char* slab = nullptr;
    const cudaError_t e = cudaHostAlloc(reinterpret_cast<void**>(&slab), count * block,
                                        cudaHostAllocMapped | cudaHostAllocPortable);
    if (e == cudaErrorMemoryAllocation) {
      cudaGetLastError();
      return absl::ResourceExhaustedError(
          absl::StrCat("AllocateHost: out of pinned host memory for ", count * block, " bytes"));
    }
    RAMBA_CUDA_RETURN_IF_ERROR(e);
    void* device = nullptr;
    RAMBA_CUDA_RETURN_IF_ERROR(cudaHostGetDevicePointer(&device, slab, 0));
    if (device != slab) {
      cudaFreeHost(slab);
      return absl::UnimplementedError("AllocateHost: mapped memory without unified addressing");
    }
    host_slabs_.push_back(slab);
    for (size_t i = count; i-- > 0;) free->push_back(slab + i * block);
  }
  void* p = free->back();
  free->pop_back();
  return p;
}

// Batches whose event has passed go to host_free_; blocks freed since the last call become a new
// batch behind an event. Not while a graph is recorded: the event would become part of it.
void CudaBackend::SettleHostBlocks() {
  if (capturing_) return;
  while (!host_settling_.empty()) {
    if (cudaEventQuery(host_settling_.front().done) != cudaSuccess) {
      (void)cudaGetLastError();  // not ready (or failed: the blocks stay out); not for launches
      break;
    }
    for (const auto& [block, p] : host_settling_.front().blocks) host_free_[block].push_back(p);
    cudaEventDestroy(host_settling_.front().done);
    host_settling_.pop_front();
  }
  if (host_released_.empty()) return;
  SettlingHostBlocks batch;
  if (cudaEventCreateWithFlags(&batch.done, cudaEventDisableTiming) != cudaSuccess) return;
  if (cudaEventRecord(batch.done, stream) != cudaSuccess) {
    cudaEventDestroy(batch.done);
    return;
  }
  batch.blocks = std::move(host_released_);
  host_released_.clear();
  host_settling_.push_back(std::move(batch));
}

void CudaBackend::FreeHost(void* data, size_t bytes) {
  absl::MutexLock lock(&mu_);
  host_released_.emplace_back(HostBlockBytes(bytes), data);
}

absl::Status CudaBackend::FinishMemoryCall(cudaStream_t s) const {
  if (s == side_stream_) RAMBA_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(s));
  return absl::OkStatus();
}

void CudaBackend::Free(void* data, size_t /*bytes*/) {
  absl::MutexLock lock(&mu_);
  if (OtherThreadRecording()) {
    pending_frees_.push_back(data);
    return;
  }
  cudaFreeAsync(data, stream);
}

absl::Status CudaBackend::Upload(void* dst, const void* host_src, size_t bytes) {
  if (bytes == 0) return absl::OkStatus();
  RAMBA_CHECK_ARG("Upload", dst != nullptr && host_src != nullptr, "null pointer");
  absl::MutexLock lock(&mu_);
  if (const cudaStream_t s = MemoryStream(); s == side_stream_) {
    RAMBA_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(dst, host_src, bytes, cudaMemcpyDefault, s));
    return FinishMemoryCall(s);
  }
  if (capturing_) {
    // A recorded copy would read its staging slot again at every replay, long after reuse.
    return absl::FailedPreconditionError("Upload: host copies cannot be recorded in a graph");
  }
  if (bytes > kStagingSegmentBytes) {
    // Large (weights, restored chunks): from pageable memory the copy is staged before the call
    // returns, so the caller may reuse host_src at once.
    RAMBA_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(dst, host_src, bytes, cudaMemcpyDefault, stream));
    return absl::OkStatus();
  }
  const size_t aligned = (bytes + 255) & ~size_t{255};
  if (staging_offset_ + aligned > kStagingSegmentBytes) {
    RAMBA_CUDA_RETURN_IF_ERROR(cudaEventRecord(staging_done_[staging_segment_], stream));
    staging_pending_[staging_segment_] = true;
    staging_segment_ = (staging_segment_ + 1) % kStagingSegments;
    staging_offset_ = 0;
    if (staging_pending_[staging_segment_]) {
      RAMBA_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(staging_done_[staging_segment_]));
      staging_pending_[staging_segment_] = false;
    }
  }
  char* slot = staging_ + staging_segment_ * kStagingSegmentBytes + staging_offset_;
  std::memcpy(slot, host_src, bytes);
  staging_offset_ += aligned;
  RAMBA_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(dst, slot, bytes, cudaMemcpyDefault, stream));
  return absl::OkStatus();
}

absl::Status CudaBackend::Download(void* host_dst, const void* src, size_t bytes) {
  if (bytes == 0) return absl::OkStatus();
  RAMBA_CHECK_ARG("Download", host_dst != nullptr && src != nullptr, "null pointer");
  absl::MutexLock lock(&mu_);
  const cudaStream_t s = MemoryStream();
  RAMBA_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(host_dst, src, bytes, cudaMemcpyDefault, s));
  RAMBA_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(s));
  return absl::OkStatus();
}

absl::StatusOr<int64_t> CudaBackend::BeginDownload(const void* src, size_t bytes) {
  RAMBA_CHECK_ARG("BeginDownload", src != nullptr || bytes == 0, "null pointer");
  int64_t ticket = 0;
  ASSIGN_OR_RETURN(const int slot, NextDownloadSlot(bytes, &ticket));
  absl::MutexLock lock(&mu_);
  if (capturing_ && !OtherThreadRecording()) {
    return absl::FailedPreconditionError(
        "BeginDownload: host copies cannot be recorded in a graph");
  }
  const cudaStream_t s = MemoryStream();
  if (bytes > 0) {
    RAMBA_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(download_slots_ + slot * kMaxAsyncDownloadBytes, src,
                                               bytes, cudaMemcpyDefault, s));
  }
  RAMBA_CUDA_RETURN_IF_ERROR(cudaEventRecord(download_done_[slot], s));
  DownloadBegun();
  return ticket;
}

absl::Status CudaBackend::FinishDownload(int64_t ticket, void* host_dst) {
  ASSIGN_OR_RETURN(const int slot, FinishingDownloadSlot(ticket));
  RAMBA_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(download_done_[slot]));
  if (download_bytes_[slot] > 0) {
    std::memcpy(host_dst, download_slots_ + slot * kMaxAsyncDownloadBytes, download_bytes_[slot]);
  }
  return absl::OkStatus();
}

absl::Status CudaBackend::Copy(void* dst, const void* src, size_t bytes) {
  if (bytes == 0) return absl::OkStatus();
  RAMBA_CHECK_ARG("Copy", dst != nullptr && src != nullptr, "null pointer");
  absl::MutexLock lock(&mu_);
  const cudaStream_t s = MemoryStream();
  RAMBA_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, s));
  return FinishMemoryCall(s);
}

absl::Status CudaBackend::Zero(void* dst, size_t bytes) {
  if (bytes == 0) return absl::OkStatus();
  RAMBA_CHECK_ARG("Zero", dst != nullptr, "null pointer");
  absl::MutexLock lock(&mu_);
  const cudaStream_t s = MemoryStream();
  RAMBA_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(dst, 0, bytes, s));
  return FinishMemoryCall(s);
}

namespace {

class CudaFence : public Backend::Fence {
 public:
  explicit CudaFence(cudaEvent_t e) : event_(e) {}
  ~CudaFence() override { cudaEventDestroy(event_); }
  absl::Status Wait() override {
    RAMBA_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(event_));
    return absl::OkStatus();
  }

 private:
  cudaEvent_t event_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Backend::Fence>> CudaBackend::RecordFence() {
  absl::MutexLock lock(&mu_);
  // While another thread records, this thread's memory calls ran to completion on the side
  // stream (MemoryStream): nothing of its own is left to wait for.
  if (OtherThreadRecording()) return std::make_unique<Fence>();
  if (capturing_) {
    return absl::FailedPreconditionError("RecordFence: not while a graph is recorded");
  }
  cudaEvent_t e = nullptr;
  RAMBA_CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
  auto fence = std::make_unique<CudaFence>(e);
  RAMBA_CUDA_RETURN_IF_ERROR(cudaEventRecord(e, stream));
  return fence;
}

absl::Status CudaBackend::DownloadSettled(void* host_dst, const void* src, size_t bytes) {
  if (bytes == 0) return absl::OkStatus();
  RAMBA_CHECK_ARG("DownloadSettled", host_dst != nullptr && src != nullptr, "null pointer");
  RAMBA_CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(host_dst, src, bytes, cudaMemcpyDefault, settled_stream_));
  RAMBA_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(settled_stream_));
  return absl::OkStatus();
}

absl::Status CudaBackend::Synchronize() {
  RAMBA_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
  return absl::OkStatus();
}

absl::StatusOr<void*> CudaBackend::Scratch(cuda::ScratchSlot slot, size_t bytes) {
  ScratchBlock& s = scratch_[static_cast<size_t>(slot)];
  if (s.bytes < bytes || s.data == nullptr) {
    if (capturing_) {
      return absl::FailedPreconditionError(
          "scratch must not grow while a graph is recorded (run the step once eagerly first)");
    }
    ++scratch_generation_;
    if (s.data != nullptr) RAMBA_CUDA_RETURN_IF_ERROR(cudaFreeAsync(s.data, stream));
    s.data = nullptr;
    s.bytes = 0;
    const size_t grown = std::max<size_t>(bytes + bytes / 4, 4096);
    RAMBA_CUDA_RETURN_IF_ERROR(cudaMallocAsync(&s.data, grown, stream));
    s.bytes = grown;
  }
  return s.data;
}

absl::StatusOr<void*> CudaBackend::UploadScratch(cuda::ScratchSlot slot, const void* host,
                                                 size_t bytes) {
  ASSIGN_OR_RETURN(void* p, Scratch(slot, bytes));
  RETURN_IF_ERROR(Upload(p, host, bytes));
  return p;
}

// ---- Ops: host-side argument checks, then the launcher ----

namespace {

// The checks every projection shares. *empty: m or w.rows is zero, nothing to compute (and the
// pointers are not checked).
absl::Status CheckMatmulArgs(std::string_view op, const float* x, int64_t ldx, int64_t m,
                             MatrixView w, const float* y, int64_t ldy, bool* empty) {
  RAMBA_CHECK_ARG(op, m >= 0 && w.rows >= 0 && w.cols >= 0, "negative size");
  *empty = m == 0 || w.rows == 0;
  if (*empty) return absl::OkStatus();
  RAMBA_CHECK_ARG(op, x != nullptr && y != nullptr && w.data != nullptr, "null pointer");
  RAMBA_CHECK_ARG(op, ldx >= w.cols, "ldx below k");
  RAMBA_CHECK_ARG(op, ldy >= w.rows, "ldy below n");
  RAMBA_CHECK_ARG(op, ValidWeightDtype(w.dtype), "unsupported weight dtype");
  RAMBA_CHECK_ARG(op, m <= INT_MAX && w.rows <= INT_MAX && w.cols <= INT_MAX && ldx <= INT_MAX &&
                          ldy <= INT_MAX,
                  "size exceeds INT_MAX");
  return absl::OkStatus();
}

}  // namespace

absl::Status CudaBackend::Embed(const int32_t* tokens, int64_t n, MatrixView table, float* out) {
  RAMBA_CHECK_ARG("Embed", n >= 0 && table.rows >= 0 && table.cols >= 0, "negative size");
  if (n == 0 || table.cols == 0) return absl::OkStatus();
  RAMBA_CHECK_ARG("Embed", tokens != nullptr && out != nullptr && table.data != nullptr,
                  "null pointer");
  RAMBA_CHECK_ARG("Embed", ValidWeightDtype(table.dtype), "unsupported table dtype");
  return cuda::Embed(*this, tokens, n, table, out);
}

absl::Status CudaBackend::Matmul(const float* x, int64_t ldx, int64_t m, MatrixView w,
                                 const float* bias, float* y, int64_t ldy, bool accumulate) {
  bool empty = false;
  RETURN_IF_ERROR(CheckMatmulArgs("Matmul", x, ldx, m, w, y, ldy, &empty));
  if (empty) return absl::OkStatus();
  return cuda::Matmul(*this, x, ldx, m, w, bias, y, ldy, accumulate);
}

absl::Status CudaBackend::RmsNormMatmul(const float* x, int64_t ldx, int64_t m,
                                        const float* norm_weight, float eps, float* xn,
                                        MatrixView w, float* y, int64_t ldy) {
  constexpr std::string_view kOp = "RmsNormMatmul";
  bool empty = false;
  RETURN_IF_ERROR(CheckMatmulArgs(kOp, x, ldx, m, w, y, ldy, &empty));
  if (empty) return absl::OkStatus();
  RAMBA_CHECK_ARG(kOp, xn != nullptr && norm_weight != nullptr, "null pointer");
  RAMBA_CHECK_ARG(kOp, w.cols > 0, "k must be positive");
  return cuda::RmsNormMatmul(*this, x, ldx, m, norm_weight, eps, xn, w, y, ldy);
}

absl::Status CudaBackend::GatedRmsNormMatmul(const float* y, int64_t ldy, const float* z,
                                             int64_t ldz, const float* norm_weight,
                                             int64_t group_size, float eps, int64_t m, float* g,
                                             MatrixView w, float* out, int64_t ldo,
                                             bool accumulate) {
  constexpr std::string_view kOp = "GatedRmsNormMatmul";
  bool empty = false;
  RETURN_IF_ERROR(CheckMatmulArgs(kOp, g, w.cols, m, w, out, ldo, &empty));
  if (empty) return absl::OkStatus();
  RAMBA_CHECK_ARG(kOp, w.cols > 0, "k must be positive");
  RAMBA_CHECK_ARG(kOp, group_size > 0 && w.cols % group_size == 0,
                  "group_size must divide the weight's columns");
  RAMBA_CHECK_ARG(kOp, y != nullptr && z != nullptr && norm_weight != nullptr, "null pointer");
  RAMBA_CHECK_ARG(kOp, ldy >= w.cols && ldz >= w.cols, "row stride below dim");
  return cuda::GatedRmsNormMatmul(*this, y, ldy, z, ldz, norm_weight, group_size, eps, m, g, w,
                                  out, ldo, accumulate);
}

absl::Status CudaBackend::RmsNorm(const float* x, int64_t ldx, const float* weight, float* y,
                                  int64_t ldy, int64_t rows, int64_t dim, float eps) {
  RAMBA_CHECK_ARG("RmsNorm", rows >= 0 && dim >= 0, "negative size");
  if (rows == 0 || dim == 0) return absl::OkStatus();
  RAMBA_CHECK_ARG("RmsNorm", x != nullptr && y != nullptr && weight != nullptr, "null pointer");
  RAMBA_CHECK_ARG("RmsNorm", ldx >= dim && ldy >= dim, "row stride below dim");
  return cuda::RmsNorm(*this, x, ldx, weight, y, ldy, rows, dim, eps);
}

absl::Status CudaBackend::GatedRmsNorm(const float* y, int64_t ldy, const float* z, int64_t ldz,
                                       const float* weight, float* out, int64_t ldo, int64_t rows,
                                       int64_t dim, int64_t group_size, float eps) {
  constexpr std::string_view kOp = "GatedRmsNorm";
  RAMBA_CHECK_ARG(kOp, rows >= 0 && dim >= 0, "negative size");
  if (rows == 0 || dim == 0) return absl::OkStatus();
  RAMBA_CHECK_ARG(kOp, group_size > 0 && dim % group_size == 0,
                  "group_size must divide dim");
  RAMBA_CHECK_ARG(kOp, y != nullptr && z != nullptr && weight != nullptr && out != nullptr,
                  "null pointer");
  RAMBA_CHECK_ARG(kOp, ldy >= dim && ldz >= dim && ldo >= dim, "row stride below dim");
  return cuda::GatedRmsNorm(*this, y, ldy, z, ldz, weight, out, ldo, rows, dim, group_size, eps);
}

absl::Status CudaBackend::Add(float* y, const float* x, int64_t n) {
  RAMBA_CHECK_ARG("Add", n >= 0, "negative size");
  if (n == 0) return absl::OkStatus();
  RAMBA_CHECK_ARG("Add", y != nullptr && x != nullptr, "null pointer");
  return cuda::Add(*this, y, x, n);
}

absl::Status CudaBackend::SwiGlu(const float* gate, const float* up, float* out, int64_t n) {
  RAMBA_CHECK_ARG("SwiGlu", n >= 0, "negative size");
  if (n == 0) return absl::OkStatus();
  RAMBA_CHECK_ARG("SwiGlu", gate != nullptr && up != nullptr && out != nullptr, "null pointer");
  return cuda::SwiGlu(*this, gate, up, out, n);
}

absl::Status CudaBackend::BlockMean(const float* x, int64_t num_blocks, int64_t block_len,
                                    int64_t dim, float* out) {
  RAMBA_CHECK_ARG("BlockMean", num_blocks >= 0 && block_len >= 1 && dim >= 0,
                  "bad size (block_len must be >= 1)");
  if (num_blocks == 0 || dim == 0) return absl::OkStatus();
  RAMBA_CHECK_ARG("BlockMean", x != nullptr && out != nullptr, "null pointer");
  return cuda::BlockMean(*this, x, num_blocks, block_len, dim, out);
}

absl::Status CudaBackend::CausalConv1dSilu(const float* x, int64_t ldx, const int64_t* seq_offsets,
                                           int64_t num_seqs, float* const* conv_states,
                                           const float* weight, const float* bias,
                                           int64_t channels, int64_t kernel, float* y,
                                           const int64_t* host_seq_offsets) {
  constexpr std::string_view kOp = "CausalConv1dSilu";
  RAMBA_CHECK_ARG(kOp, channels >= 0, "negative size");
  RAMBA_CHECK_ARG(kOp, kernel >= 1, "kernel must be >= 1");
  RETURN_IF_ERROR(CheckHostOffsets(kOp, host_seq_offsets, num_seqs));
  if (num_seqs == 0 || channels == 0) return absl::OkStatus();
  RAMBA_CHECK_ARG(kOp, seq_offsets != nullptr && weight != nullptr, "null pointer");
  RAMBA_CHECK_ARG(kOp, ldx >= channels, "ldx below channels");
  if (host_seq_offsets[num_seqs] > host_seq_offsets[0]) {
    RAMBA_CHECK_ARG(kOp, x != nullptr && y != nullptr, "x or y is null");
  }
  if (kernel > 1) RAMBA_CHECK_ARG(kOp, conv_states != nullptr, "conv_states is null");
  return cuda::CausalConv1dSilu(*this, x, ldx, seq_offsets, num_seqs, conv_states, weight, bias,
                                channels, kernel, y, host_seq_offsets);
}

absl::Status CudaBackend::MambaMixer(const MambaMixerArgs& a) {
  constexpr std::string_view kOp = "MambaMixer";
  RETURN_IF_ERROR(CheckSsmParams(kOp, a.ssm));
  RETURN_IF_ERROR(CheckHostOffsets(kOp, a.host_seq_offsets, a.num_seqs));
  if (a.num_seqs == 0) return absl::OkStatus();
  const int64_t d_inner = a.ssm.nheads * a.ssm.headdim;
  RAMBA_CHECK_ARG(kOp, a.norm_group_size > 0 && d_inner % a.norm_group_size == 0,
                  "norm_group_size must divide nheads*headdim");
  RAMBA_CHECK_ARG(kOp, a.ld >= 2 * d_inner + 2 * a.ssm.ngroups * a.ssm.d_state + a.ssm.nheads,
                  "ld below the z | xBC | dt width");
  RAMBA_CHECK_ARG(kOp, a.conv_kernel >= 1, "conv_kernel must be positive");
  RAMBA_CHECK_ARG(kOp,
                  a.seq_offsets != nullptr && a.conv_states != nullptr &&
                      a.ssm_states != nullptr && a.conv_weight != nullptr &&
                      a.norm_weight != nullptr && a.g != nullptr && a.zxbcdt != nullptr,
                  "null pointer");
  RETURN_IF_ERROR(CheckMixerOutProj(kOp, a));
  // RAMBA_CUDA_FUSED_MIXER: 0 runs the three ops, 1 the fused decode kernel finished by each
  // sequence's last block, 2 the fused kernel plus a finishing kernel. Unset: measured choice
  // (docs/benchmarks.md, side by side): with PDL-launched ops the three were faster up to batch
  // 64 (1.37 vs 1.43 ms at batch 1, 4.70 vs 4.95 ms at 64) and the fused pair at 256 (13.7 vs
  // 14.4 ms), where separate kernels pass each row through L2 twice more. A fourth mode, conv +
  // SSM update fused with the gated norm left to out_proj, was measured slower at every batch
  // (1.46 vs 1.40 ms at batch 1, 6.1 vs 4.6 ms at 64, the norm then folded into out_proj's
  // GEMM) and removed.
  constexpr int64_t kFusedMixerMinBatch = 256;
  const char* env = std::getenv("RAMBA_CUDA_FUSED_MIXER");  // read per call: tests switch it
  const int mode = env != nullptr && env[0] >= '0' && env[0] <= '2'
                       ? env[0] - '0'
                       : (a.num_seqs >= kFusedMixerMinBatch ? 2 : 0);
  if (mode != 0) {
    ASSIGN_OR_RETURN(bool fused,
                     cuda::FusedMambaMixer(*this, a, a.num_seqs, a.host_seq_offsets, mode == 2));
    if (fused) {
      if (a.out_proj.data == nullptr) return absl::OkStatus();
      const int64_t base = a.host_seq_offsets[0];
      const int64_t rows = a.host_seq_offsets[a.num_seqs] - base;
      return Matmul(a.g + base * d_inner, d_inner, rows, a.out_proj, nullptr,
                    a.out + base * a.ld_out, a.ld_out, /*accumulate=*/true);
    }
  }
  RAMBA_CHECK_ARG(kOp, a.xbc != nullptr && a.y != nullptr, "null scratch pointer");
  // Decode batches of up to 16 rows whose gated norm is one group per row: the SSM kernel applies
  // the gate and out_proj folds the RMSNorm that is left (as in_proj folds its norm), so the
  // gated-norm kernel (~4 us per layer at batch 16) goes. RAMBA_CUDA_GATED_FOLD=0 turns it off.
  constexpr int64_t kGatedFoldMaxRows = 16;
  const int64_t base = a.host_seq_offsets[0], rows = a.host_seq_offsets[a.num_seqs] - base;
  if (a.out_proj.data != nullptr && a.out_proj.dtype != DType::kF32 &&
      a.norm_group_size == d_inner && rows > 0 && rows <= kGatedFoldMaxRows &&
      cuda::EnvSwitchOn("RAMBA_CUDA_GATED_FOLD") &&
      cuda::SsmDecodeTakes(a.ssm, a.num_seqs, a.host_seq_offsets)) {
    const int64_t conv_dim = d_inner + 2 * a.ssm.ngroups * a.ssm.d_state;
    RETURN_IF_ERROR(CausalConv1dSilu(a.zxbcdt + d_inner, a.ld, a.seq_offsets, a.num_seqs,
                                     a.conv_states, a.conv_weight, a.conv_bias, conv_dim,
                                     a.conv_kernel, a.xbc, a.host_seq_offsets));
    RETURN_IF_ERROR(cuda::SsmDecodeGated(*this, a.xbc, conv_dim, a.zxbcdt + d_inner + conv_dim,
                                         a.ld, a.seq_offsets, a.num_seqs, a.ssm_states, a.ssm,
                                         a.zxbcdt, a.ld, a.y));
    return cuda::RmsNormMatmul(*this, a.y + base * d_inner, d_inner, rows, a.norm_weight, a.eps,
                               a.g + base * d_inner, a.out_proj, a.out + base * a.ld_out, a.ld_out,
                               /*accumulate=*/true);
  }
  return Backend::MambaMixer(a);
}

absl::Status CudaBackend::MambaBlocks(const MambaBlockArgs* blocks, int64_t count) {
  // Decode batches of 1-2 one-token rows go through a persistent kernel (mamba_blocks.cu) and
  // larger ones block by block. Measured side by side (bench-mamba-blocks and bench-model,
  // docs/benchmarks.md): per 370M layer 11.4 (cluster kernel) vs 12.2 (grid-wide) vs 20.8 us
  // (block by block) at batch 1, 14.1 vs 16.3 vs 22.4 at batch 2; per decode step at 4K a tie at
  // batch 1 (cluster 0.757-0.769 ms and once 0.848, grid-wide 0.755-0.776) and 0.908-0.921 vs
  // 0.963-0.982 ms at batch 2. So 2 rows take the cluster kernel, 1 row the grid-wide one, whose
  // one-row variant with two phases per layer takes 10.4-10.8 us per layer, 0.616-0.645 ms per
  // step (twenty-first session).
  // RAMBA_CUDA_PERSISTENT_MAMBA=0 turns both off, =1 takes the grid-wide kernel (up to its 4
  // rows), =2 the cluster kernel first. Read per call: tests and bench-mamba-blocks switch it.
  constexpr int64_t kPersistentMaxRows = 2;
  const char* env = std::getenv("RAMBA_CUDA_PERSISTENT_MAMBA");
  const std::string_view mode = env != nullptr ? env : "";
  const int64_t rows = count > 0 ? blocks[0].mixer.num_seqs : 0;
  if (count > 0 && mode != "0" && (mode == "1" || mode == "2" || rows <= kPersistentMaxRows)) {
    for (int64_t i = 0; i < count; ++i) {
      const MambaMixerArgs& m = blocks[i].mixer;
      RETURN_IF_ERROR(CheckSsmParams("MambaBlocks", m.ssm));
      RETURN_IF_ERROR(CheckHostOffsets("MambaBlocks", m.host_seq_offsets, m.num_seqs));
      RAMBA_CHECK_ARG("MambaBlocks",
                      m.conv_states != nullptr && m.ssm_states != nullptr &&
                          m.conv_weight != nullptr && m.norm_weight != nullptr && m.g != nullptr &&
                          m.zxbcdt != nullptr && m.xbc != nullptr && m.out != nullptr &&
                          m.out_proj.data != nullptr && blocks[i].norm_weight != nullptr &&
                          blocks[i].in_proj.data != nullptr,
                      "null pointer");
    }
    bool done = false;
    if (mode == "2" || (mode != "1" && rows == 2)) {
      ASSIGN_OR_RETURN(done, cuda::ClusterMambaBlocks(*this, blocks, count));
    }
    if (!done) {
      ASSIGN_OR_RETURN(done, cuda::PersistentMambaBlocks(*this, blocks, count));
    }
    if (done) return absl::OkStatus();
  }
  return Backend::MambaBlocks(blocks, count);
}

absl::Status CudaBackend::SsmScan(const float* xbc, int64_t ldxbc, const float* dt_raw,
                                  int64_t lddt, const int64_t* seq_offsets, int64_t num_seqs,
                                  float* const* ssm_states, const SsmParams& p, float* y,
                                  const int64_t* host_seq_offsets) {
  constexpr std::string_view kOp = "SsmScan";
  RETURN_IF_ERROR(CheckSsmParams(kOp, p));
  RETURN_IF_ERROR(CheckHostOffsets(kOp, host_seq_offsets, num_seqs));
  if (num_seqs == 0) return absl::OkStatus();
  RAMBA_CHECK_ARG(kOp, ldxbc >= p.nheads * p.headdim + 2 * p.ngroups * p.d_state,
                  "ldxbc below nheads*headdim + 2*ngroups*d_state");
  RAMBA_CHECK_ARG(kOp, lddt >= p.nheads, "lddt below nheads");
  RAMBA_CHECK_ARG(kOp, ssm_states != nullptr && seq_offsets != nullptr, "null pointer");
  if (host_seq_offsets[num_seqs] > host_seq_offsets[0]) {
    RAMBA_CHECK_ARG(kOp, xbc != nullptr && dt_raw != nullptr && y != nullptr, "null pointer");
  }
  return cuda::SsmScan(*this, xbc, ldxbc, dt_raw, lddt, seq_offsets, num_seqs, ssm_states, p, y,
                       host_seq_offsets);
}

absl::Status CudaBackend::RopeInChunk(float* x, int64_t rows, int64_t heads, int64_t head_dim,
                                      int64_t period, float theta) {
  constexpr std::string_view kOp = "RopeInChunk";
  RAMBA_CHECK_ARG(kOp, rows >= 0 && heads >= 0 && head_dim >= 0, "negative size");
  RAMBA_CHECK_ARG(kOp, head_dim % 2 == 0, "head_dim must be even");
  RAMBA_CHECK_ARG(kOp, period >= 1, "period must be >= 1");
  if (rows == 0 || heads == 0 || head_dim == 0) return absl::OkStatus();
  RAMBA_CHECK_ARG(kOp, x != nullptr, "null pointer");
  return cuda::RopeInChunk(*this, x, rows, heads, head_dim, period, theta);
}

absl::Status CudaBackend::BlockAttention(const float* q, const float* k, const float* v,
                                         float* out, int64_t num_blocks, int64_t block_len,
                                         int64_t nh, int64_t nkv, int64_t hd) {
  constexpr std::string_view kOp = "BlockAttention";
  RAMBA_CHECK_ARG(kOp, num_blocks >= 0 && block_len >= 0, "negative size");
  RETURN_IF_ERROR(CheckAttentionHeads(kOp, nh, nkv, hd));
  if (num_blocks == 0 || block_len == 0) return absl::OkStatus();
  RAMBA_CHECK_ARG(kOp, q != nullptr && k != nullptr && v != nullptr && out != nullptr,
                  "null pointer");
  return cuda::BlockAttention(*this, q, k, v, out, num_blocks, block_len, nh, nkv, hd);
}

absl::Status CudaBackend::RetrieveChunks(const float* r, int64_t rows, const ChunkMemoryBatch& mem,
                                         int64_t retrieval_dim, int64_t heads, int64_t top_k,
                                         int64_t chunk_size, int32_t* indices, float* weights) {
  constexpr std::string_view kOp = "RetrieveChunks";
  RAMBA_CHECK_ARG(kOp, rows >= 0, "negative size");
  RAMBA_CHECK_ARG(kOp, heads > 0 && retrieval_dim > 0 && retrieval_dim % heads == 0,
                  "heads must divide retrieval_dim");
  RAMBA_CHECK_ARG(kOp, top_k > 0 && chunk_size > 0, "top_k and chunk_size must be positive");
  if (rows == 0) return absl::OkStatus();
  RAMBA_CHECK_ARG(kOp, mem.max_num_chunks >= 0,
                  "the CUDA backend needs mem.max_num_chunks (host-side bound)");
  RAMBA_CHECK_ARG(kOp, r != nullptr && indices != nullptr && weights != nullptr &&
                           mem.row_seq != nullptr && mem.row_position != nullptr &&
                           mem.num_chunks != nullptr && mem.landmarks != nullptr,
                  "null pointer");
  return cuda::RetrieveChunks(*this, r, rows, mem, retrieval_dim, heads, top_k, chunk_size,
                              indices, weights);
}

absl::Status CudaBackend::SparseChunkAttention(const float* q, int64_t rows,
                                               const ChunkMemoryBatch& mem,
                                               const int32_t* indices, const float* weights,
                                               int64_t retrieval_heads, int64_t top_k, int64_t nh,
                                               int64_t nkv, int64_t hd, int64_t chunk_size,
                                               float* out) {
  constexpr std::string_view kOp = "SparseChunkAttention";
  RAMBA_CHECK_ARG(kOp, rows >= 0, "negative size");
  RETURN_IF_ERROR(CheckAttentionHeads(kOp, nh, nkv, hd));
  RAMBA_CHECK_ARG(kOp, retrieval_heads > 0 && nkv % retrieval_heads == 0,
                  "retrieval_heads must be positive and divide nkv");
  RAMBA_CHECK_ARG(kOp, top_k > 0 && chunk_size > 0, "top_k and chunk_size must be positive");
  if (rows == 0) return absl::OkStatus();
  RAMBA_CHECK_ARG(kOp, q != nullptr && out != nullptr && indices != nullptr &&
                           weights != nullptr && mem.row_seq != nullptr && mem.chunk_kv != nullptr,
                  "null pointer");
  return cuda::SparseChunkAttention(*this, q, rows, mem, indices, weights, retrieval_heads, top_k,
                                    nh, nkv, hd, chunk_size, out);
}

absl::Status CudaBackend::HsaBlock(const HsaBlockArgs& a) {
  constexpr std::string_view kOp = "HsaBlock";
  RAMBA_CHECK_ARG(kOp, a.rows >= 0, "negative size");
  if (a.rows == 0) return absl::OkStatus();
  RETURN_IF_ERROR(CheckAttentionHeads(kOp, a.nh, a.nkv, a.hd));
  RAMBA_CHECK_ARG(kOp, a.retrieval_heads > 0 && a.nkv % a.retrieval_heads == 0,
                  "retrieval_heads must be positive and divide nkv");
  RAMBA_CHECK_ARG(kOp, a.top_k > 0 && a.chunk_size > 0, "top_k and chunk_size must be positive");
  RAMBA_CHECK_ARG(kOp,
                  a.h != nullptr && a.norm_weight != nullptr && a.indices != nullptr &&
                      a.weights != nullptr && a.mem.row_seq != nullptr &&
                      a.mem.chunk_kv != nullptr && a.q_proj.data != nullptr &&
                      a.o_proj.data != nullptr,
                  "null pointer");
  RAMBA_CHECK_ARG(kOp,
                  a.q_proj.rows == a.nh * a.hd && a.o_proj.cols == a.nh * a.hd &&
                      a.o_proj.rows == a.q_proj.cols && a.ldh >= a.q_proj.cols,
                  "q_proj must be [nh * hd, d] and o_proj [d, nh * hd], with ldh >= d");
  ASSIGN_OR_RETURN(const bool done, cuda::FusedHsaBlock(*this, a));
  if (done) return absl::OkStatus();
  return Backend::HsaBlock(a);
}

absl::Status CudaBackend::ApplyPenalties(const float* logits, int64_t rows, int64_t vocab,
                                         const PenaltyParams* params, float* out) {
  constexpr std::string_view kOp = "ApplyPenalties";
  RAMBA_CHECK_ARG(kOp, rows >= 0 && vocab > 0, "bad sizes");
  if (rows == 0) return absl::OkStatus();
  RAMBA_CHECK_ARG(kOp, logits != nullptr && params != nullptr && out != nullptr, "null pointer");
  RAMBA_CHECK_ARG(kOp, logits + rows * vocab <= out || out + rows * vocab <= logits,
                  "logits and out overlap");
  RETURN_IF_ERROR(CheckPenaltyParams(kOp, params, rows));
  return cuda::ApplyPenalties(*this, logits, rows, vocab, params, out);
}

absl::Status CudaBackend::CountTokens(const PenaltyParams* params, int64_t rows, int64_t vocab,
                                      const int32_t* tokens) {
  RAMBA_CHECK_ARG("CountTokens", rows >= 0 && vocab > 0, "bad sizes");
  if (rows == 0) return absl::OkStatus();
  RAMBA_CHECK_ARG("CountTokens", params != nullptr && tokens != nullptr, "null pointer");
  return cuda::CountTokens(*this, params, rows, vocab, tokens);
}

absl::Status CudaBackend::TokenLogprobs(const float* logits, int64_t rows, int64_t vocab,
                                        const int32_t* tokens, float* out) {
  RAMBA_CHECK_ARG("TokenLogprobs", rows >= 0 && vocab > 0 && vocab <= INT32_MAX, "bad sizes");
  if (rows == 0) return absl::OkStatus();
  RAMBA_CHECK_ARG("TokenLogprobs", logits != nullptr && tokens != nullptr && out != nullptr,
                  "null pointer");
  return cuda::TokenLogprobs(*this, logits, rows, vocab, tokens, out);
}

absl::Status CudaBackend::TopLogprobs(const float* logits, int64_t rows, int64_t vocab, int64_t n,
                                      int32_t* ids, float* logprobs) {
  RETURN_IF_ERROR(CheckTopLogprobsArgs(logits, rows, vocab, n, ids, logprobs));
  if (rows == 0) return absl::OkStatus();
  return cuda::TopLogprobs(*this, logits, rows, vocab, n, ids, logprobs);
}

absl::Status CudaBackend::Sample(const float* logits, int64_t rows, int64_t vocab,
                                 const SamplingParams* params, const float* uniforms,
                                 int32_t* out) {
  constexpr std::string_view kOp = "Sample";
  RAMBA_CHECK_ARG(kOp, rows >= 0, "negative size");
  RAMBA_CHECK_ARG(kOp, vocab > 0 && vocab <= INT32_MAX, "vocab must be in [1, 2^31)");
  if (rows == 0) return absl::OkStatus();
  RAMBA_CHECK_ARG(kOp, logits != nullptr && params != nullptr && uniforms != nullptr &&
                           out != nullptr,
                  "null pointer");
  RETURN_IF_ERROR(CheckSamplingParams(kOp, params, rows));
  return cuda::Sample(*this, logits, rows, vocab, params, uniforms, out);
}

absl::Status CudaBackend::StageHostChunks(const ChunkMemoryBatch& mem, const int64_t* host_chunks,
                                          const int32_t* indices, int64_t rows, int64_t heads,
                                          int64_t top_k, int64_t chunk_floats,
                                          const StagedChunks& out) {
  RAMBA_CHECK_ARG("StageHostChunks", rows >= 0 && heads > 0 && top_k > 0 && chunk_floats > 0,
                  "bad sizes");
  RAMBA_CHECK_ARG("StageHostChunks",
                  mem.chunk_kv != nullptr && host_chunks != nullptr && indices != nullptr &&
                      out.blocks != nullptr && out.slots != nullptr && out.tables != nullptr &&
                      out.num_chunks != nullptr && out.indices != nullptr,
                  "null pointer");
  RAMBA_CHECK_ARG("StageHostChunks",
                  out.cache.slots == 0 || (out.cache.blocks != nullptr &&
                                           out.cache.tags != nullptr && out.copies != nullptr),
                  "cache slots without cache arrays");
  if (rows == 0) return absl::OkStatus();
  return cuda::StageHostChunks(*this, mem, host_chunks, indices, rows, heads * top_k, chunk_floats,
                               out);
}

absl::Status CudaBackend::StageSelectedHostChunks(const ChunkMemoryBatch& mem,
                                                  const int32_t* indices, int64_t rows,
                                                  int64_t per_row, int64_t chunk_floats,
                                                  const StagedChunkTables& out) {
  constexpr std::string_view kOp = "StageSelectedHostChunks";
  RAMBA_CHECK_ARG(kOp,
                  rows >= 0 && per_row > 0 && chunk_floats > 0 && out.capacity >= 0 &&
                      out.total_host >= 0 && mem.num_seqs > 0 && mem.max_num_chunks >= 0,
                  "bad sizes (num_seqs and max_num_chunks must be known)");
  RAMBA_CHECK_ARG(kOp,
                  mem.chunk_kv != nullptr && mem.num_chunks != nullptr && mem.row_seq != nullptr &&
                      (indices != nullptr || rows == 0) && out.host_offsets != nullptr &&
                      out.picks != nullptr && out.staged != nullptr &&
                      out.table_offsets != nullptr && out.entries != nullptr &&
                      out.tables != nullptr &&
                      (out.capacity == 0 || (out.blocks != nullptr && out.sources != nullptr)),
                  "null pointer");
  return cuda::StageSelectedHostChunks(*this, mem, indices, rows, per_row, chunk_floats, out);
}

absl::Status CudaBackend::ScatterRows(const float* src, int64_t ld, float* const* dst,
                                      int64_t rows, int64_t cols) {
  RAMBA_CHECK_ARG("ScatterRows", rows >= 0 && cols >= 0, "negative size");
  if (rows == 0 || cols == 0) return absl::OkStatus();
  RAMBA_CHECK_ARG("ScatterRows", src != nullptr && dst != nullptr && ld >= cols,
                  "null pointer or ld below cols");
  return cuda::ScatterRows(*this, src, ld, dst, rows, cols);
}

// ---- Graphs ----

absl::Status CudaBackend::BeginGraph() {
  absl::MutexLock lock(&mu_);
  if (capturing_) return absl::FailedPreconditionError("BeginGraph: already recording");
  RAMBA_CUDA_RETURN_IF_ERROR(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  capturing_ = true;
  recording_thread_ = std::this_thread::get_id();
  return absl::OkStatus();
}

absl::StatusOr<int64_t> CudaBackend::EndGraph() {
  cudaGraph_t graph = nullptr;
  {
    absl::MutexLock lock(&mu_);
    if (!capturing_) return absl::FailedPreconditionError("EndGraph: not recording");
    capturing_ = false;
    const cudaError_t end = cudaStreamEndCapture(stream, &graph);
    for (void* p : pending_frees_) cudaFreeAsync(p, stream);  // other threads' frees meanwhile
    pending_frees_.clear();
    RAMBA_CUDA_RETURN_IF_ERROR(end);
  }
  cudaGraphExec_t exec = nullptr;
  const cudaError_t e = cudaGraphInstantiate(&exec, graph, 0);
  cudaGraphDestroy(graph);
  RAMBA_CUDA_RETURN_IF_ERROR(e);
  const int64_t id = next_graph_++;
  graphs_[id] = exec;
  return id;
}

absl::Status CudaBackend::LaunchGraph(int64_t graph) {
  auto it = graphs_.find(graph);
  if (it == graphs_.end()) return absl::NotFoundError(absl::StrCat("no graph ", graph));
  RAMBA_CUDA_RETURN_IF_ERROR(cudaGraphLaunch(it->second, stream));
  return absl::OkStatus();
}

void CudaBackend::DestroyGraph(int64_t graph) {
  auto it = graphs_.find(graph);
  if (it == graphs_.end()) return;
  cudaGraphExecDestroy(it->second);
  graphs_.erase(it);
}

}  // namespace ramba::kernels
