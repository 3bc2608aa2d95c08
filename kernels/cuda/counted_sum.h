// Counted fixed-point sums: many adders add 64-bit integers into one word with atomic adds
// (exact in any order, so the result is deterministic), and every add also adds one to a count
// in the word's top 8 bits, so a reader that knows how many adds to expect can tell from the
// word alone that all of them have landed: no fence, flag or counter between the adders and the
// reader. The one-row persistent Mamba kernel's out_proj exchange (mamba_blocks.cu) uses it.
// Values are in units of 2^-32 and partials saturate at +-2^47 units (+-2^15), so a sum of any
// of at most kMaxAdders partials stays within +-2^55 units, while each missing add leaves the
// count field at least 2^56 units (one count) away from the expected one: outside that band.
// Plain C++ outside nvcc, so that the CPU tests check the encoding (counted_sum_test.cc).
#ifndef RAMBA_KERNELS_CUDA_COUNTED_SUM_H_
#define RAMBA_KERNELS_CUDA_COUNTED_SUM_H_

#ifdef __CUDACC__
#define RAMBA_COUNTED_SUM_FN __host__ __device__ __forceinline__
#else
#define RAMBA_COUNTED_SUM_FN inline
#endif

namespace ramba::kernels::cuda::counted_sum {

constexpr int kMaxAdders = 255;  // adds expected by a reader, at most (the count field's range)
constexpr int kCountShift = 56;
constexpr float kScale = 4294967296.0f;            // units per 1.0: 2^32
constexpr float kPartialMax = 140737488355328.0f;  // 2^47 units: where partials saturate

// What an adder adds: `delta` units, counting `adds` adds.
RAMBA_COUNTED_SUM_FN unsigned long long Add(long long delta, unsigned long long adds) {
  return static_cast<unsigned long long>(delta) + (adds << kCountShift);
}
// The count field of a word after `adds` adds in all (modulo the field).
RAMBA_COUNTED_SUM_FN unsigned long long Expected(unsigned long long adds) {
  return adds << kCountShift;
}
// For rest = word - Expected(adds the reader waits for): whether every one of them has landed.
RAMBA_COUNTED_SUM_FN bool Complete(unsigned long long rest) {
  return rest + (1ull << (kCountShift - 1)) < (1ull << kCountShift);
}
// A complete word's value, from its rest.
RAMBA_COUNTED_SUM_FN float Value(unsigned long long rest) {
  return static_cast<float>(static_cast<long long>(rest)) * (1.0f / kScale);
}

}  // namespace ramba::kernels::cuda::counted_sum

#undef RAMBA_COUNTED_SUM_FN

#endif  // RAMBA_KERNELS_CUDA_COUNTED_SUM_H_
