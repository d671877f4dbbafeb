// Parallel-for on the XLA FFI thread pool, with the calling thread as one
// of the workers.
//
// A CPU handler must not block waiting for tasks it scheduled on the pool: when
// several custom calls of one jit run at once, every pool thread can end up
// waiting and none is left to run the tasks (docs/design.md, "XLA FFI conventions"). So the workers
// pull work items from a shared counter, the calling thread among them, and the caller waits only
// for items another thread has already claimed, i.e. is running right now: a task still queued
// behind other work claims nothing and is never waited for (if it never gets a thread, the caller
// runs every item itself). The caller then runs `done` and returns a completed future, so XLA goes
// on on the same thread. Against completing the future from the pool task that finished last, this
// took ~40 us off an MLA decode call at 4096 keys (NOTES.md 6).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace jax_mla::cpu {

namespace ffi = xla::ffi;

inline ffi::Future ReadyFuture(ffi::Error error = ffi::Error::Success()) {
  ffi::Promise promise;
  ffi::Future future(promise);
  if (error.success()) {
    promise.SetAvailable();
  } else {
    promise.SetError(std::move(error));
  }
  return future;
}

inline void Pause() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

// Runs item(i) for every i in [0, n) on up to max_tasks threads (the calling
// thread and up to max_tasks - 1 pool tasks), then done() once on the calling
// thread, and returns a completed future. Items run on pool threads must not
// touch the FFI call's context, only buffers; a pool task that starts after
// every item was claimed returns without touching anything.
template <typename Item, typename Done>
ffi::Future ParallelFor(ffi::ThreadPool& pool, int64_t n, int64_t max_tasks, Item item, Done done) {
  const int64_t tasks = std::min<int64_t>(n, std::min<int64_t>(max_tasks, pool.num_threads()));
  if (tasks <= 1) {
    for (int64_t i = 0; i < n; ++i) item(i);
    done();
    return ReadyFuture();
  }
  struct State {
    State(Item i, int64_t n) : item(std::move(i)), n(n) {}
    Item item;
    const int64_t n;
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> finished{0};
    void Run() {
      for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < n;) {
        item(i);
        finished.fetch_add(1, std::memory_order_release);
      }
    }
  };
  auto state = std::make_shared<State>(std::move(item), n);
  for (int64_t t = 1; t < tasks; ++t) pool.Schedule([state] { state->Run(); });
  state->Run();
  // Every item is claimed; the unfinished ones are running on other threads.
  for (int64_t spins = 0; state->finished.load(std::memory_order_acquire) < n; ++spins) {
    if (spins < (1 << 16)) {
      Pause();
    } else {
      std::this_thread::yield();
    }
  }
  done();
  return ReadyFuture();
}

}  // namespace jax_mla::cpu
