// Helpers shared by the benchmark tools (bench-model, bench-ops, bench-mamba-blocks): timing,
// the copy bandwidth, uploads.
#ifndef RAMBA_TOOLS_BENCH_UTIL_H_
#define RAMBA_TOOLS_BENCH_UTIL_H_

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/backend.h"

namespace ramba::bench {

// A backend buffer holding a copy of v.
template <class T>
absl::StatusOr<kernels::Buffer> Put(kernels::Backend* be, const std::vector<T>& v) {
  auto b = be->Allocate(v.size() * sizeof(T));
  if (!b.ok()) return b.status();
  if (auto s = be->Upload(b->data(), v.data(), v.size() * sizeof(T)); !s.ok()) return s;
  return b;
}

inline double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Median wall time of `reps` runs of run() on `be`, each closed by Synchronize, after one
// warm-up run; NaN when a run fails.
template <class F>
double MedianSeconds(kernels::Backend* be, int reps, F&& run) {
  if (!run().ok() || !be->Synchronize().ok()) return NAN;
  std::vector<double> t;
  for (int i = 0; i < reps; ++i) {
    const double t0 = Now();
    if (!run().ok() || !be->Synchronize().ok()) return NAN;
    t.push_back(Now() - t0);
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

// Device time per run of run() as the model's decode graphs run ops: `steps` runs back to back
// in one graph (no host launch or synchronisation between them), median over `reps` launches of
// the graph, divided by `steps`. Successive runs may find some of their inputs still in L2.
// NaN when the backend has no graphs or a run or the capture fails.
template <class F>
double InGraphSeconds(kernels::Backend* be, int reps, int steps, F&& run) {
  if (!be->SupportsGraphs()) return NAN;
  if (!run().ok() || !be->Synchronize().ok()) return NAN;  // scratch is sized before capture
  const uint64_t generation = be->scratch_generation();
  if (!be->BeginGraph().ok()) return NAN;
  bool ok = true;
  for (int i = 0; i < steps && ok; ++i) ok = run().ok();
  auto graph = be->EndGraph();
  if (!graph.ok()) return NAN;
  double t = NAN;
  if (ok && be->scratch_generation() == generation) {
    t = MedianSeconds(be, reps, [&] { return be->LaunchGraph(*graph); }) / steps;
  }
  be->DestroyGraph(*graph);
  return t;
}

// Read + write bandwidth of a large backend copy (1 GiB on a device, 256 MiB on the CPU), GB/s:
// the memory floor the benchmarks state their figures against. 0 when allocation fails.
inline double MeasureCopyBandwidth(kernels::Backend* be) {
  const size_t bytes = be->host_accessible() ? (size_t{256} << 20) : (size_t{1} << 30);
  auto a = be->Allocate(bytes);
  auto b = be->Allocate(bytes);
  if (!a.ok() || !b.ok()) return 0;
  std::vector<uint8_t> init(1 << 20);
  for (size_t i = 0; i < init.size(); ++i) init[i] = static_cast<uint8_t>(i * 131 + 7);
  for (size_t off = 0; off < bytes; off += init.size()) {
    (void)be->Upload(a->as<uint8_t>() + off, init.data(), init.size());
  }
  const double s = MedianSeconds(be, 5, [&] { return be->Copy(b->data(), a->data(), bytes); });
  return 2.0 * bytes / s / 1e9;
}

}  // namespace ramba::bench

#endif  // RAMBA_TOOLS_BENCH_UTIL_H_
