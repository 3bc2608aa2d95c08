// The CUDA backend: device memory from a stream-ordered pool, every op enqueued on one stream,
// bf16 weight matrices (cuBLASLt and our own kernels), float32 activations and recurrent states.
// Ops are asynchronous; Download and Synchronize wait. One thread runs the model (ops, graphs),
// like every Backend; memory calls (Allocate, Free, Upload, Download, Copy, Zero) may also come
// from other threads (a server creates and pages in sessions on its RPC threads), and stay out
// of a graph that the model's thread is recording.
#ifndef RAMBA_KERNELS_CUDA_CUDA_BACKEND_H_
#define RAMBA_KERNELS_CUDA_CUDA_BACKEND_H_

#include <deque>
#include <map>
#include <memory>
#include <thread>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "kernels/backend.h"
#include "kernels/cuda/ops.h"

namespace ramba::kernels {

class CudaBackend : public Backend, public cuda::Context {
 public:
  // Uses device `device`; fails when no GPU is usable.
  // Weight matrices are stored as `weight_dtype` (kBF16 or kF32).
  static absl::StatusOr<std::unique_ptr<CudaBackend>> Create(int device = 0,
                                                             DType weight_dtype = DType::kBF16);
  ~CudaBackend() override;

  std::string_view name() const override { return "cuda"; }
  bool host_accessible() const override { return false; }
  DType weight_dtype() const override { return weight_dtype_; }

  absl::StatusOr<Buffer> Allocate(size_t bytes) override;
  // Pinned and mapped (UVA: the host address is the device address), so kernels read it in place
  // over PCIe.
  absl::StatusOr<Buffer> AllocateHost(size_t bytes) override;
  absl::StatusOr<Buffer> AllocateHostCopy(const void* host_src, size_t bytes) override;
  absl::Status Upload(void* dst, const void* host_src, size_t bytes) override;
  absl::Status Download(void* host_dst, const void* src, size_t bytes) override;
  absl::StatusOr<int64_t> BeginDownload(const void* src, size_t bytes) override;
  absl::Status FinishDownload(int64_t ticket, void* host_dst) override;
  absl::Status Copy(void* dst, const void* src, size_t bytes) override;
  absl::Status Zero(void* dst, size_t bytes) override;
  absl::Status Synchronize() override;

  absl::Status Embed(const int32_t* tokens, int64_t n, MatrixView table, float* out) override;
  absl::Status Matmul(const float* x, int64_t ldx, int64_t m, MatrixView w, const float* bias,
                      float* y, int64_t ldy, bool accumulate) override;
  absl::Status RmsNormMatmul(const float* x, int64_t ldx, int64_t m, const float* norm_weight,
                             float eps, float* xn, MatrixView w, float* y, int64_t ldy) override;
  absl::Status GatedRmsNormMatmul(const float* y, int64_t ldy, const float* z, int64_t ldz,
                                  const float* norm_weight, int64_t group_size, float eps,
                                  int64_t m, float* g, MatrixView w, float* out, int64_t ldo,
                                  bool accumulate) override;
  absl::Status RmsNorm(const float* x, int64_t ldx, const float* weight, float* y, int64_t ldy,
                       int64_t rows, int64_t dim, float eps) override;
  absl::Status GatedRmsNorm(const float* y, int64_t ldy, const float* z, int64_t ldz,
                            const float* weight, float* out, int64_t ldo, int64_t rows,
                            int64_t dim, int64_t group_size, float eps) override;
  absl::Status Add(float* y, const float* x, int64_t n) override;
  absl::Status SwiGlu(const float* gate, const float* up, float* out, int64_t n) override;
  absl::Status BlockMean(const float* x, int64_t num_blocks, int64_t block_len, int64_t dim,
                         float* out) override;
  absl::Status CausalConv1dSilu(const float* x, int64_t ldx, const int64_t* seq_offsets,
                                int64_t num_seqs, float* const* conv_states, const float* weight,
                                const float* bias, int64_t channels, int64_t kernel, float* y,
                                const int64_t* host_seq_offsets = nullptr) override;
  absl::Status SsmScan(const float* xbc, int64_t ldxbc, const float* dt_raw, int64_t lddt,
                       const int64_t* seq_offsets, int64_t num_seqs, float* const* ssm_states,
                       const SsmParams& p, float* y,
                       const int64_t* host_seq_offsets = nullptr) override;
  absl::Status MambaMixer(const MambaMixerArgs& a) override;
  absl::Status MambaBlocks(const MambaBlockArgs* blocks, int64_t count) override;
  absl::Status HsaBlock(const HsaBlockArgs& a) override;
  absl::Status RopeInChunk(float* x, int64_t rows, int64_t heads, int64_t head_dim,
                           int64_t period, float theta) override;
  absl::Status BlockAttention(const float* q, const float* k, const float* v, float* out,
                              int64_t num_blocks, int64_t block_len, int64_t nh, int64_t nkv,
                              int64_t hd) override;
  absl::Status RetrieveChunks(const float* r, int64_t rows, const ChunkMemoryBatch& mem,
                              int64_t retrieval_dim, int64_t heads, int64_t top_k,
                              int64_t chunk_size, int32_t* indices, float* weights) override;
  absl::Status SparseChunkAttention(const float* q, int64_t rows, const ChunkMemoryBatch& mem,
                                    const int32_t* indices, const float* weights,
                                    int64_t retrieval_heads, int64_t top_k, int64_t nh,
                                    int64_t nkv, int64_t hd, int64_t chunk_size,
                                    float* out) override;
  absl::Status ApplyPenalties(const float* logits, int64_t rows, int64_t vocab,
                              const PenaltyParams* params, float* out) override;
  absl::Status CountTokens(const PenaltyParams* params, int64_t rows, int64_t vocab,
                           const int32_t* tokens) override;
  absl::Status TokenLogprobs(const float* logits, int64_t rows, int64_t vocab,
                             const int32_t* tokens, float* out) override;
  absl::Status TopLogprobs(const float* logits, int64_t rows, int64_t vocab, int64_t n,
                           int32_t* ids, float* logprobs) override;
  absl::Status Sample(const float* logits, int64_t rows, int64_t vocab,
                      const SamplingParams* params, const float* uniforms,
                      int32_t* out) override;
  absl::Status StageHostChunks(const ChunkMemoryBatch& mem, const int64_t* host_chunks,
                               const int32_t* indices, int64_t rows, int64_t heads, int64_t top_k,
                               int64_t chunk_floats, const StagedChunks& out) override;
  absl::StatusOr<std::unique_ptr<Fence>> RecordFence() override;
  absl::Status DownloadSettled(void* host_dst, const void* src, size_t bytes) override;
  absl::Status StageSelectedHostChunks(const ChunkMemoryBatch& mem, const int32_t* indices,
                                       int64_t rows, int64_t per_row, int64_t chunk_floats,
                                       const StagedChunkTables& out) override;
  absl::Status ScatterRows(const float* src, int64_t ld, float* const* dst, int64_t rows,
                           int64_t cols) override;

  bool SupportsGraphs() const override { return true; }
  absl::Status BeginGraph() override;
  absl::StatusOr<int64_t> EndGraph() override;
  absl::Status LaunchGraph(int64_t graph) override;
  void DestroyGraph(int64_t graph) override;
  uint64_t scratch_generation() const override { return scratch_generation_; }

  // cuda::Context
  absl::StatusOr<void*> Scratch(cuda::ScratchSlot slot, size_t bytes) override;
  absl::StatusOr<void*> UploadScratch(cuda::ScratchSlot slot, const void* host,
                                      size_t bytes) override;

 protected:
  void Free(void* data, size_t bytes) override;
  void FreeHost(void* data, size_t bytes) override;

 private:
  CudaBackend() = default;
  absl::Status Init(int device);

  struct ScratchBlock {
    void* data = nullptr;
    size_t bytes = 0;
  };
  std::vector<ScratchBlock> scratch_;
  DType weight_dtype_ = DType::kBF16;
  uint64_t scratch_generation_ = 0;

  // Memory calls from other threads. mu_ guards what they share with the model's thread (the
  // staging ring, the recording state). Work they put on `stream` while another thread records
  // would become part of the graph instead of running, so then they use side_stream_ and wait
  // for it before returning, and their frees wait in pending_frees_ until the recording ends.
  bool OtherThreadRecording() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return capturing_ && std::this_thread::get_id() != recording_thread_;
  }
  // The stream for this thread's memory call; FinishMemoryCall waits for it when it is the side
  // stream.
  cudaStream_t MemoryStream() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return OtherThreadRecording() ? side_stream_ : stream;
  }
  absl::Status FinishMemoryCall(cudaStream_t s) const;
  absl::Mutex mu_;
  bool capturing_ = false;  // written under mu_ by the recording thread
  std::thread::id recording_thread_ ABSL_GUARDED_BY(mu_);
  std::vector<void*> pending_frees_ ABSL_GUARDED_BY(mu_);
  cudaStream_t side_stream_ = nullptr;
  cudaStream_t settled_stream_ = nullptr;  // DownloadSettled's: waits for nothing else
  std::map<int64_t, cudaGraphExec_t> graphs_;
  int64_t next_graph_ = 1;

  // Pinned staging for small uploads (the per-step index and pointer arrays): a copy from pageable
  // memory makes the host wait for all queued GPU work first, so each step's launches would stall
  // behind the previous step. Segments are reused round-robin; an event recorded when a segment
  // fills says when its copies are done.
  static constexpr int kStagingSegments = 8;
  static constexpr size_t kStagingSegmentBytes = size_t{1} << 20;
  char* staging_ = nullptr;
  cudaEvent_t staging_done_[kStagingSegments] = {};
  bool staging_pending_[kStagingSegments] = {};
  int staging_segment_ = 0;
  size_t staging_offset_ = 0;
  // AllocateHost's memory: slabs of equal blocks per block size (chunk blocks all have one size),
  // kept until the backend goes, since cudaFreeHost waits for the whole device. The host writes
  // new blocks directly (AllocateHostCopy), so a freed block is handed out again only once the
  // work queued before its free is done: freed blocks wait in host_released_, then in a batch
  // behind an event recorded on the stream (host_settling_), then in host_free_.
  absl::StatusOr<void*> TakeHostBlock(size_t block) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void SettleHostBlocks() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  struct SettlingHostBlocks {
    cudaEvent_t done = nullptr;
    std::vector<std::pair<size_t, void*>> blocks;  // (block size, block)
  };
  std::map<size_t, std::vector<void*>> host_free_ ABSL_GUARDED_BY(mu_);
  std::vector<std::pair<size_t, void*>> host_released_ ABSL_GUARDED_BY(mu_);
  std::deque<SettlingHostBlocks> host_settling_ ABSL_GUARDED_BY(mu_);
  std::vector<void*> host_slabs_ ABSL_GUARDED_BY(mu_);
  static constexpr size_t kHostSlabBytes = size_t{64} << 20;

  // Pinned slots for BeginDownload (a copy into pageable memory would make the host wait), each
  // with an event recorded behind its copy.
  char* download_slots_ = nullptr;
  cudaEvent_t download_done_[kMaxAsyncDownloads] = {};
};

}  // namespace ramba::kernels

#endif  // RAMBA_KERNELS_CUDA_CUDA_BACKEND_H_
