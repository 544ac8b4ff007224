// The emulator's launch machinery. Every CUDA thread of a block is a fiber (ucontext) on
// the calling OS thread, switched cooperatively: a barrier parks the fiber and resumes the
// next runnable one, so a barrier costs a few context switches instead of a kernel round
// trip, runs are deterministic, and a barrier nobody can complete is reported as a deadlock
// instead of hanging. Blocks run one after another; shared memory is poisoned with NaNs
// before every block so that reading what was never written shows up in the results.
// Included once, after the kernels.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <array>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <memory>
#include <utility>
#include <vector>

gla_emu_dim3 threadIdx;
gla_emu_dim3 blockIdx;
gla_emu_dim3 blockDim;
gla_emu_dim3 gridDim;

namespace gla_emu {

constexpr size_t kStackBytes = 256 * 1024;

#if defined(__x86_64__) && !defined(GLA_EMU_UCONTEXT)  // ucontext under sanitizers
// Save the callee-saved registers on the current stack, store its pointer in *save, switch to
// the stack `load` and restore that fiber's registers (System V x86-64 ABI).
extern "C" void gla_emu_switch(void** save, void* load);
asm(R"(
    .text
    .p2align 4
    .globl gla_emu_switch
    .hidden gla_emu_switch
    .type gla_emu_switch, @function
gla_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size gla_emu_switch, .-gla_emu_switch
)");

struct Context {
  void* sp = nullptr;
};
inline void start_context(Context& c, char* stack, size_t bytes, void (*entry)()) {
  auto top = reinterpret_cast<uintptr_t>(stack + bytes) & ~uintptr_t(15);
  auto* sp = reinterpret_cast<void**>(top);
  *--sp = nullptr;                            // keeps the entry's stack 16-byte aligned
  *--sp = reinterpret_cast<void*>(entry);     // gla_emu_switch "returns" into entry
  for (int r = 0; r < 6; ++r) *--sp = nullptr;  // callee-saved registers
  c.sp = sp;
}
inline void switch_context(Context& from, Context& to) { gla_emu_switch(&from.sp, to.sp); }
#else
struct Context {
  ucontext_t uc;
};
inline void start_context(Context& c, char* stack, size_t bytes, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = bytes;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}
inline void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

struct Barrier {
  int expected = 0;
  int arrived = 0;
  std::vector<int> waiting;
};

struct Launch {
  void (*run)(void**) = nullptr;
  void** args = nullptr;
  size_t smem_bytes = 0;
  std::vector<unsigned char> memory;
  std::vector<Context> contexts;
  std::vector<char*> stacks;
  std::vector<bool> done;
  Context scheduler;
  std::deque<int> runnable;
  int current = -1;
  std::array<Barrier, 16> named;
  std::vector<Barrier> warps;
  std::vector<std::array<float, 64>> shuffle;  // two exchange buffers per warp
  std::vector<int> shuffle_round;
  std::vector<std::array<uint32_t, 2 * 32 * 8>> exchange;  // warp_exchange's two buffers per warp
  std::vector<int> exchange_round;
};

Launch* launch_state = nullptr;

[[noreturn]] inline void die(const char* what) {
  std::fprintf(stderr, "glakernels emulator: %s (block %u,%u,%u thread %u)\n", what, blockIdx.x, blockIdx.y,
               blockIdx.z, threadIdx.x);
  std::abort();
}

// Leave the current fiber (parked or finished) for the next runnable one, or the scheduler.
inline void yield_to_next() {
  Launch& s = *launch_state;
  const int me = s.current;
  if (s.runnable.empty()) {
    bool all_done = true;
    for (bool d : s.done) all_done = all_done && d;
    if (!all_done) die("deadlock: every live thread waits at a barrier");
    s.current = -1;
    switch_context(s.contexts[me], s.scheduler);
    return;
  }
  const int next = s.runnable.front();
  s.runnable.pop_front();
  s.current = next;
  threadIdx = {unsigned(next), 0, 0};
  switch_context(s.contexts[me], s.contexts[next]);
}

inline void arrive_and_wait(Barrier& barrier) {
  Launch& s = *launch_state;
  if (++barrier.arrived == barrier.expected) {
    barrier.arrived = 0;
    for (int w : barrier.waiting) s.runnable.push_back(w);
    barrier.waiting.clear();
    return;
  }
  barrier.waiting.push_back(s.current);
  yield_to_next();
  threadIdx = {unsigned(s.current), 0, 0};
}

inline void fiber_main() {
  Launch& s = *launch_state;
  s.run(s.args);
  s.done[s.current] = true;
  yield_to_next();
  die("a finished thread was resumed");
}

}  // namespace gla_emu

namespace gla {

void fail_launch() { gla_emu::die("kernel called fail_launch() (bad launch configuration)"); }

void group_sync(int id, int count) {
  gla_emu::Barrier& barrier = gla_emu::launch_state->named[id];
  if (barrier.expected == 0) barrier.expected = count;
  if (barrier.expected != count) gla_emu::die("one barrier id used with two thread counts");
  gla_emu::arrive_and_wait(barrier);
}

float shfl_xor(float x, int lane_mask) {
  gla_emu::Launch& s = *gla_emu::launch_state;
  const unsigned warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  // alternating buffers: a lane can only overwrite buffer b after every lane has passed the
  // barrier of the next shuffle, i.e. after all reads of b, so one barrier per shuffle suffices
  const unsigned base = 32u * unsigned(s.shuffle_round[threadIdx.x]++ & 1);
  s.shuffle[warp][base + lane] = x;
  gla_emu::arrive_and_wait(s.warps[warp]);
  return s.shuffle[warp][base + (lane ^ unsigned(lane_mask))];
}

void warp_exchange(const uint32_t* mine, int words, uint32_t* all) {
  gla_emu::Launch& s = *gla_emu::launch_state;
  if (words > 8) gla_emu::die("warp_exchange of more than 8 words");
  const unsigned warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  // alternating buffers, as in shfl_xor
  const unsigned base = 32u * 8u * unsigned(s.exchange_round[threadIdx.x]++ & 1);
  for (int i = 0; i < words; ++i) s.exchange[warp][base + 8u * lane + unsigned(i)] = mine[i];
  gla_emu::arrive_and_wait(s.warps[warp]);
  for (unsigned l = 0; l < 32; ++l)
    for (int i = 0; i < words; ++i) all[l * unsigned(words) + unsigned(i)] = s.exchange[warp][base + 8u * l + unsigned(i)];
}

unsigned char* dynamic_smem() {  // 16-byte aligned, like CUDA's
  auto address = reinterpret_cast<uintptr_t>(gla_emu::launch_state->memory.data());
  return reinterpret_cast<unsigned char*>((address + 15) & ~uintptr_t(15));
}

unsigned dynamic_smem_bytes() { return unsigned(gla_emu::launch_state->smem_bytes); }

}  // namespace gla

namespace gla_emu {

template <class... A, size_t... I>
void invoke_impl(void (*kernel)(A...), void** args, std::index_sequence<I...>) {
  kernel(*static_cast<std::remove_cv_t<A>*>(args[I])...);
}
template <class... A>
void invoke(void (*kernel)(A...), void** args) {
  invoke_impl(kernel, args, std::index_sequence_for<A...>{});
}

struct Entry {
  const char* name;
  void (*run)(void**);
};

int launch(const Entry* entries, size_t n_entries, const char* name, unsigned gx, unsigned gy, unsigned gz,
           unsigned threads, size_t smem, void** args) {
  const Entry* entry = nullptr;
  for (size_t i = 0; i < n_entries; ++i) {
    if (std::strcmp(entries[i].name, name) == 0) entry = &entries[i];
  }
  if (entry == nullptr) return -1;
  if (threads % 32 != 0 || threads == 0 || threads > 1024) return -2;

  Launch s;
  s.run = entry->run;
  s.args = args;
  s.smem_bytes = smem;
  s.memory.resize(smem + 16);
  s.contexts.resize(threads);
  s.done.resize(threads);
  s.warps.resize(threads / 32);
  for (auto& w : s.warps) w.expected = 32;
  s.shuffle.resize(threads / 32);
  s.shuffle_round.assign(threads, 0);
  s.exchange.resize(threads / 32);
  s.exchange_round.assign(threads, 0);
  for (unsigned t = 0; t < threads; ++t) s.stacks.push_back(static_cast<char*>(std::malloc(kStackBytes)));
  launch_state = &s;
  blockDim = {threads, 1, 1};
  gridDim = {gx, gy, gz};

  for (unsigned z = 0; z < gz; ++z)
    for (unsigned y = 0; y < gy; ++y)
      for (unsigned x = 0; x < gx; ++x) {
        blockIdx = {x, y, z};
        std::fill(s.memory.begin(), s.memory.end(), (unsigned char)0xff);  // NaN poison
        for (auto& b : s.named) b = Barrier{};
        std::fill(s.shuffle_round.begin(), s.shuffle_round.end(), 0);
        std::fill(s.exchange_round.begin(), s.exchange_round.end(), 0);
        s.runnable.clear();
        for (unsigned t = 0; t < threads; ++t) {
          s.done[t] = false;
          start_context(s.contexts[t], s.stacks[t], kStackBytes, fiber_main);
          s.runnable.push_back(int(t));
        }
        const int first = s.runnable.front();
        s.runnable.pop_front();
        s.current = first;
        threadIdx = {unsigned(first), 0, 0};
        switch_context(s.scheduler, s.contexts[first]);
      }
  for (char* stack : s.stacks) std::free(stack);
  launch_state = nullptr;
  return 0;
}

}  // namespace gla_emu
