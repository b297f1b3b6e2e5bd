// Helper threads of the kernels' calls: started once, they spin a while after each job before sleeping.
//
// The kernels split a call into work items that the caller and helpers take from a shared counter; the caller
// waits only for items already taken, so a helper that comes late (or never: a forked child has none) costs
// nothing but its share. Through XLA's intra-op pool a helper was a sleeping pool thread most of the time on
// this 2-core host, woken too late to take a share, and whole models ran at one core's speed in phases (TFLite
// conv_int8 b8 1.05-1.10 ms against 0.70 ms when it took its share, session 22). Each helper here keeps
// checking for a new job for kSpinSeconds after its last one (yielding the core to any other runnable thread
// after the first microseconds), then sleeps until the next job is posted.
#pragma once

#include <immintrin.h>
#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace jaxinfer {

class Helpers {
 public:
  // The process's helpers: one fewer than the cores, at most kMaxHelpers (none on one core).
  static Helpers& Get() {
    static Helpers* helpers = new Helpers();  // never destroyed: its detached threads outlive static teardown
    return *helpers;
  }

  int count() const { return static_cast<int>(threads_); }

  // Runs task once on each of up to n helpers, without waiting. A job posted while helpers are still on the
  // previous one replaces it for those that have not started it.
  void Post(std::function<void()> task, int n) {
    n = std::min(n, count());
    if (n <= 0) return;
    {
      std::lock_guard<std::mutex> lock(mu_);
      task_ = std::make_shared<std::function<void()>>(std::move(task));
      wanted_.store(n, std::memory_order_relaxed);
      generation_.fetch_add(1, std::memory_order_release);
    }
    if (sleeping_.load(std::memory_order_acquire) > 0) wake_.notify_all();
  }

 private:
  static constexpr int kMaxHelpers = 7;
  static constexpr double kSpinSeconds = 200e-6;
  static constexpr int kPauses = 100;  // pure pause spins (~1-2 us) before yielding to other runnable threads

  Helpers() {
    const unsigned cores = std::max(1u, std::thread::hardware_concurrency());
    threads_ = std::min<unsigned>(cores - 1, kMaxHelpers);
    for (unsigned i = 0; i < threads_; ++i) std::thread([this] { Loop(); }).detach();
    // A forked child has none of these threads: it runs its kernels' calls alone. The lock is held across the
    // fork so that the child's copy is never one a helper held mid-update.
    pthread_atfork([] { Get().mu_.lock(); }, [] { Get().mu_.unlock(); },
                   [] {
                     Get().mu_.unlock();
                     Get().threads_ = 0;
                   });
  }

  void Loop() {
    uint64_t seen = generation_.load(std::memory_order_acquire);
    for (;;) {
      const auto start = std::chrono::steady_clock::now();
      for (int i = 0; generation_.load(std::memory_order_acquire) == seen; ++i) {
        if (i < kPauses) {
          _mm_pause();
          continue;
        }
        if (std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() < kSpinSeconds) {
          sched_yield();
          continue;
        }
        std::unique_lock<std::mutex> lock(mu_);
        sleeping_.fetch_add(1, std::memory_order_acq_rel);
        wake_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
        sleeping_.fetch_sub(1, std::memory_order_acq_rel);
        break;
      }
      std::shared_ptr<std::function<void()>> task;
      {
        std::lock_guard<std::mutex> lock(mu_);
        seen = generation_.load(std::memory_order_acquire);
        if (wanted_.load(std::memory_order_relaxed) > 0) {
          wanted_.fetch_sub(1, std::memory_order_relaxed);
          task = task_;
        }
      }
      if (task) (*task)();
    }
  }

  unsigned threads_ = 0;
  std::mutex mu_;
  std::condition_variable wake_;
  std::shared_ptr<std::function<void()>> task_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> wanted_{0};
  std::atomic<int> sleeping_{0};
};

// The caller's part of a shared job: the items left for it, then the wait for those others took (Share).
template <typename Job, typename Work>
void WorkAndWait(const std::shared_ptr<Job>& j, Work work, int64_t items) {
  work(*j);
  while (j->done.load(std::memory_order_acquire) < items) _mm_pause();
}

// Runs work(*j) on the calling thread and on up to threads - 1 helpers, each taking work items from the job's
// own counter, then waits until j->done counts all `items`: only for items already taken, since the caller
// takes whatever is left itself. The helpers hold `j`, so one that starts after the caller returned finds the
// job alive (and nothing left to take).
template <typename Job, typename Work>
void Share(const std::shared_ptr<Job>& j, Work work, int64_t threads, int64_t items) {
  Helpers::Get().Post([j, work] { work(*j); }, static_cast<int>(threads - 1));
  WorkAndWait(j, work, items);
}

// Share, with the job also offered to XLA's intra-op pool (threads - 1 tasks) when `offer` (a large job: the
// callers' thresholds) and our helpers have not started on it within kOfferWaitNs: right after one of XLA's own
// parallel loops its workers are awake and spinning for more, and they took the other core from our helper, which
// then ran late (a 3x3 64-channel layer on 2 cores: 1.32 ms with our helpers only, 1.06 ms offered to both; cnn
// batch 8 454 -> 347 us, session 27). Whoever comes first takes work items; a late arrival finds none and returns at
// once. Small jobs are not offered: waking a sleeping pool worker cost more than it saved (bert_dynamic batch 1: 145
// -> 174 us when every job was). Nor are jobs a helper took up at once (session 29): between our own kernels XLA's
// workers sleep, and the caller's wake-up call cost it 10-20 us before it started on its own share (cnn b8, its
// three convolutions).
inline std::atomic<int> g_share_xla{1};
constexpr int64_t kOfferWaitNs = 3000;
template <typename Job, typename Work, typename Pool>
void ShareWith(Pool& pool, bool offer, const std::shared_ptr<Job>& j, Work work, int64_t threads, int64_t items) {
  if (!offer || !g_share_xla.load(std::memory_order_relaxed) || threads < 2) {
    Share(j, work, threads, items);
    return;
  }
  auto started = std::make_shared<std::atomic<int>>(0);
  const int helpers = std::min<int>(static_cast<int>(threads - 1), Helpers::Get().count());
  Helpers::Get().Post(
      [j, work, started] {
        started->fetch_add(1, std::memory_order_release);
        work(*j);
      },
      helpers);
  const auto until = std::chrono::steady_clock::now() + std::chrono::nanoseconds(kOfferWaitNs);
  while (started->load(std::memory_order_acquire) < helpers && std::chrono::steady_clock::now() < until) _mm_pause();
  for (int64_t i = 1 + started->load(std::memory_order_acquire); i < threads; ++i)
    pool.Schedule([j, work] { work(*j); });
  WorkAndWait(j, work, items);
}

}  // namespace jaxinfer
