// Asynchronous parallel-for on the XLA FFI thread pool.
//
// A CPU handler must not block waiting for tasks it scheduled on the pool: when
// several custom calls of one jit run at once, every pool thread can end up
// waiting and none is left to run the tasks (DESIGN.md). So the handler
// returns an ffi::Future; the tasks pull work items from a shared counter, and
// whichever task finishes last runs `done` and completes the future.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
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

// Runs item(i) for every i in [0, n) on up to max_tasks pool tasks, then done()
// once, and returns a future that completes after done() returned. Work and
// done run on pool threads (or inline when there is no pool or no work), and
// must not touch the FFI call's context: only buffers, which XLA keeps alive
// until the future completes.
template <typename Item, typename Done>
ffi::Future ParallelFor(ffi::ThreadPool& pool, int64_t n, int64_t max_tasks, Item item,
                        Done done) {
  const int64_t tasks = std::min<int64_t>(n, std::min<int64_t>(max_tasks, pool.num_threads()));
  if (tasks <= 1) {
    for (int64_t i = 0; i < n; ++i) item(i);
    done();
    return ReadyFuture();
  }
  struct State {
    State(Item i, Done d, int64_t n, int64_t tasks)
        : item(std::move(i)), done(std::move(d)), n(n), live(tasks) {}
    Item item;
    Done done;
    const int64_t n;
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> live;
    ffi::Promise promise;
  };
  auto state = std::make_shared<State>(std::move(item), std::move(done), n, tasks);
  ffi::Future future(state->promise);
  for (int64_t t = 0; t < tasks; ++t) {
    pool.Schedule([state] {
      for (int64_t i; (i = state->next.fetch_add(1, std::memory_order_relaxed)) < state->n;)
        state->item(i);
      if (state->live.fetch_sub(1, std::memory_order_acq_rel) == 1) {
        state->done();
        state->promise.SetAvailable();
      }
    });
  }
  return future;
}

}  // namespace jax_mla::cpu
