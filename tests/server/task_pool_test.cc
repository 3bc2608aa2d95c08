// A TaskPool runs every task it is given, off the caller's thread, and none is lost at Stop.
#include "server/task_pool.h"

#include <atomic>
#include <thread>

#include "absl/synchronization/notification.h"
#include "gtest/gtest.h"

namespace ramba::server {
namespace {

TEST(TaskPoolTest, RunsTasksOffTheCallersThread) {
  TaskPool c(3);
  const std::thread::id me = std::this_thread::get_id();
  std::atomic<int> ran{0}, elsewhere{0};
  for (int i = 0; i < 100; ++i) {
    c.Run([&] {
      if (std::this_thread::get_id() != me) ++elsewhere;
      ++ran;
    });
  }
  c.Stop();
  EXPECT_EQ(ran.load(), 100);
  EXPECT_EQ(elsewhere.load(), 100);
  EXPECT_EQ(c.Pending(), 0);
}

TEST(TaskPoolTest, TasksRunConcurrentlyAndPendingCountsThem) {
  TaskPool c(2);
  absl::Notification release;
  std::atomic<int> started{0};
  for (int i = 0; i < 2; ++i) {
    c.Run([&] {
      ++started;
      release.WaitForNotification();
    });
  }
  c.Run([] {});
  while (started.load() < 2) std::this_thread::yield();  // both threads busy at once
  EXPECT_EQ(c.Pending(), 3);
  release.Notify();
  c.Stop();
  EXPECT_EQ(c.Pending(), 0);
}

TEST(TaskPoolTest, AfterStopTasksRunInline) {
  TaskPool c(1);
  c.Stop();
  bool ran = false;
  c.Run([&] { ran = true; });
  EXPECT_TRUE(ran);
}

}  // namespace
}  // namespace ramba::server
