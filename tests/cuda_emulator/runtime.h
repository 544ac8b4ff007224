// The emulator's launch machinery: one OS thread per CUDA thread of a block, blocks run one
// after another, shared memory poisoned with NaNs before every block so that reading what
// was never written shows up in the results. Included once, after the kernels.
#pragma once

#include <algorithm>
#include <array>
#include <barrier>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

thread_local gla_emu_dim3 threadIdx;
thread_local gla_emu_dim3 blockIdx;
gla_emu_dim3 blockDim;
gla_emu_dim3 gridDim;

namespace gla_emu {

struct Poison {
  std::vector<unsigned char>* memory;
  void operator()() noexcept { std::fill(memory->begin(), memory->end(), (unsigned char)0xff); }
};

struct Launch {
  explicit Launch(unsigned threads, size_t smem)
      : smem_bytes(smem), memory(smem + 16, 0xff), block_barrier(threads, Poison{&memory}),
        shuffle((threads + 31) / 32) {
    for (unsigned w = 0; w < (threads + 31) / 32; ++w) warp_barriers.emplace_back(std::make_unique<std::barrier<>>(32));
  }
  size_t smem_bytes;
  std::vector<unsigned char> memory;
  std::barrier<Poison> block_barrier;
  std::mutex named_mutex;
  std::unique_ptr<std::barrier<>> named[16];
  int named_count[16] = {};
  std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
  std::vector<std::array<float, 32>> shuffle;
};

Launch* current = nullptr;

}  // namespace gla_emu

namespace gla {

void fail_launch() {
  std::fprintf(stderr, "glakernels emulator: kernel called fail_launch() (bad launch configuration)\n");
  std::abort();
}

void group_sync(int id, int count) {
  auto* launch = gla_emu::current;
  std::barrier<>* barrier;
  {
    std::lock_guard<std::mutex> lock(launch->named_mutex);
    if (!launch->named[id]) {
      launch->named[id] = std::make_unique<std::barrier<>>(count);
      launch->named_count[id] = count;
    } else if (launch->named_count[id] != count) {
      std::fprintf(stderr, "glakernels emulator: barrier %d used with counts %d and %d\n", id,
                   launch->named_count[id], count);
      std::abort();
    }
    barrier = launch->named[id].get();
  }
  barrier->arrive_and_wait();
}

float shfl_xor(float x, int lane_mask) {
  auto* launch = gla_emu::current;
  const unsigned warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  launch->shuffle[warp][lane] = x;
  launch->warp_barriers[warp]->arrive_and_wait();
  const float y = launch->shuffle[warp][lane ^ unsigned(lane_mask)];
  launch->warp_barriers[warp]->arrive_and_wait();
  return y;
}

unsigned char* dynamic_smem() {
  // 16-byte aligned, like CUDA's dynamic shared memory
  auto address = reinterpret_cast<uintptr_t>(gla_emu::current->memory.data());
  return reinterpret_cast<unsigned char*>((address + 15) & ~uintptr_t(15));
}

unsigned dynamic_smem_bytes() { return unsigned(gla_emu::current->smem_bytes); }

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
  Launch state(threads, smem);
  current = &state;
  blockDim = {threads, 1, 1};
  gridDim = {gx, gy, gz};
  std::vector<std::thread> workers;
  for (unsigned t = 0; t < threads; ++t) {
    workers.emplace_back([&, t] {
      threadIdx = {t, 0, 0};
      for (unsigned z = 0; z < gz; ++z)
        for (unsigned y = 0; y < gy; ++y)
          for (unsigned x = 0; x < gx; ++x) {
            blockIdx = {x, y, z};
            entry->run(args);
            state.block_barrier.arrive_and_wait();
          }
    });
  }
  for (auto& w : workers) w.join();
  current = nullptr;
  return 0;
}

}  // namespace gla_emu
