// The counted fixed-point sums of the one-row persistent Mamba kernel (kernels/cuda/
// counted_sum.h): a reader must see a word as complete exactly when every expected add has
// landed, in any order, over layers whose adders add the difference to their previous partial,
// and the adders' final subtractions must return the word to zero.
#include "kernels/cuda/counted_sum.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

namespace ramba::kernels::cuda::counted_sum {
namespace {

constexpr long long kMax = static_cast<long long>(kPartialMax);  // a saturated partial

// One word of one layer parity as the kernel drives it: n adders, each adding once per layer
// the difference between its new partial and its last one.
class Word {
 public:
  explicit Word(int n) : last_(n, 0) {}
  void AddLayerPartial(int adder, long long partial) {
    word_ += Add(partial - last_[adder], 1);
    last_[adder] = partial;
    ++adds_;
  }
  // The launch's end: every adder takes its partials and counts out.
  void TakeOut(int adder, unsigned long long adds) { word_ += 0ull - Add(last_[adder], adds); }
  unsigned long long word() const { return word_; }
  unsigned long long adds() const { return adds_; }

 private:
  unsigned long long word_ = 0;
  unsigned long long adds_ = 0;
  std::vector<long long> last_;
};

long long Sum(const std::vector<long long>& v) { return std::accumulate(v.begin(), v.end(), 0ll); }

TEST(CountedSumTest, CompleteExactlyWhenEveryAddHasLandedOverManyLayers) {
  std::mt19937_64 rng(7);
  for (int n : {1, 2, 32, 128, kMaxAdders}) {
    Word w(n);
    std::uniform_int_distribution<long long> partial(-kMax, kMax);
    // Enough layers that the count field wraps several times.
    for (int layer = 0; layer < 40; ++layer) {
      std::vector<long long> v(n);
      for (long long& x : v) {
        const int pick = static_cast<int>(rng() % 4);
        x = pick == 0 ? kMax : pick == 1 ? -kMax : partial(rng);  // extremes and random
      }
      std::vector<int> order(n);
      std::iota(order.begin(), order.end(), 0);
      std::shuffle(order.begin(), order.end(), rng);
      const unsigned long long want = Expected(w.adds() + n);
      for (int i = 0; i < n; ++i) {
        EXPECT_FALSE(Complete(w.word() - want))
            << "n " << n << " layer " << layer << " after " << i << " of the layer's adds";
        w.AddLayerPartial(order[i], v[order[i]]);
      }
      ASSERT_TRUE(Complete(w.word() - want)) << "n " << n << " layer " << layer;
      EXPECT_EQ(static_cast<long long>(w.word() - want), Sum(v));
    }
  }
}

TEST(CountedSumTest, TakingOutEveryAdderReturnsTheWordToZero) {
  std::mt19937_64 rng(11);
  const int n = 128;
  Word w(n);
  std::uniform_int_distribution<long long> partial(-kMax, kMax);
  const int layers = 13;
  for (int layer = 0; layer < layers; ++layer) {
    for (int i = 0; i < n; ++i) w.AddLayerPartial(i, partial(rng));
  }
  for (int i = 0; i < n; ++i) w.TakeOut(i, layers);
  EXPECT_EQ(w.word(), 0ull);
}

TEST(CountedSumTest, ValueIsTheSumInUnitsOfTwoToTheMinus32) {
  const long long units = -(3ll << 32) - (1ll << 31);  // -3.5
  EXPECT_FLOAT_EQ(Value(static_cast<unsigned long long>(units)), -3.5f);
  EXPECT_FLOAT_EQ(Value(0ull), 0.0f);
  // The extremes of a complete word: kMaxAdders saturated partials of either sign.
  EXPECT_TRUE(Complete(static_cast<unsigned long long>(kMaxAdders * kMax)));
  EXPECT_TRUE(Complete(static_cast<unsigned long long>(-kMaxAdders * kMax)));
  EXPECT_FALSE(Complete(Expected(1)));
  EXPECT_FALSE(Complete(0ull - Expected(1)));
}

}  // namespace
}  // namespace ramba::kernels::cuda::counted_sum
