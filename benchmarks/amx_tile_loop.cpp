// The AMX int8 ceilings of this machine, measured with standalone tile loops (no pyclipq, no torch):
// what the AMX kernel table (csrc/cpu/kernels_amx.cpp) can reach at best, and what limits it.
//
//   g++ -O2 -mamx-tile -mamx-int8 -pthread benchmarks/amx_tile_loop.cpp -o /tmp/amx_tile_loop
//   /tmp/amx_tile_loop [threads=1,2]
//
// Each loop runs on every thread at once (pinned to CPUs 0..threads-1) and prints TOP/s summed
// over threads (2 ops per multiply-add):
// * peak:        tdpbssd on 4 independent accumulators, operands never reloaded (register-only);
// * 2x2 step:    the kernel's K step: 2 activation + 2 weight tile loads from L1, 4 tdpbssd;
// * weights only: the same with the activation tiles kept (2 loads per 4 tdpbssd);
// * acts only:   the same with the weight tiles kept.
// Linux only (arch_prctl for tile data).
#include <immintrin.h>
#include <pthread.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

namespace {

struct alignas(64) TileConfig {
  uint8_t palette_id, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

enum Loop { kPeak, kStep, kWeightsOnly, kActsOnly };
const char* kNames[] = {"peak (register-only)", "2x2 step (4 loads)", "weights reloaded only", "acts reloaded only"};

constexpr int kSteps = 12;  // K = 768, the ViT-B/32 width
constexpr long kIters = 400000;

double run_loop(Loop loop) {
  alignas(64) static thread_local int8_t acts[32 * 768], weights[2 * kSteps * 1024];
  alignas(64) static thread_local int32_t out[256];
  std::memset(acts, 1, sizeof acts);
  std::memset(weights, 1, sizeof weights);
  TileConfig cfg;
  std::memset(&cfg, 0, sizeof cfg);
  cfg.palette_id = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  asm volatile("" ::: "memory");
  _tile_loadconfig(&cfg);
  _tile_loadd(4, acts, 768);
  _tile_loadd(5, acts + 16 * 768, 768);
  _tile_loadd(6, weights, 64);
  _tile_loadd(7, weights + kSteps * 1024, 64);
  const auto t0 = std::chrono::steady_clock::now();
  for (long i = 0; i < kIters; ++i) {
    const long s = i % kSteps;
    if (loop == kStep || loop == kWeightsOnly) {
      _tile_loadd(6, weights + s * 1024, 64);
      _tile_loadd(7, weights + (kSteps + s) * 1024, 64);
    }
    if (loop == kStep || loop == kActsOnly) {
      _tile_loadd(4, acts + s * 64, 768);
      _tile_loadd(5, acts + 16 * 768 + s * 64, 768);
    }
    _tile_dpbssd(0, 4, 6);
    _tile_dpbssd(1, 4, 7);
    _tile_dpbssd(2, 5, 6);
    _tile_dpbssd(3, 5, 7);
  }
  _tile_stored(0, out, 64);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  _tile_release();
  return kIters * 4.0 * 16 * 16 * 64 * 2 / seconds / 1e12;
}

double run_threads(Loop loop, int threads) {
  std::vector<double> tops(threads);
  std::vector<std::thread> pool;
  std::atomic<int> ready{0};
  for (int t = 0; t < threads; ++t)
    pool.emplace_back([&, t] {
      cpu_set_t set;
      CPU_ZERO(&set);
      CPU_SET(t, &set);
      pthread_setaffinity_np(pthread_self(), sizeof set, &set);
      for (++ready; ready.load() < threads;) {
      }
      tops[t] = run_loop(loop);
    });
  for (auto& th : pool) th.join();
  double sum = 0;
  for (double v : tops) sum += v;
  return sum;
}

}  // namespace

int main(int argc, char** argv) {
  if (syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) != 0) {
    std::perror("arch_prctl(ARCH_REQ_XCOMP_PERM)");
    return 1;
  }
  std::vector<int> thread_counts;
  for (const char* p = argc > 1 ? argv[1] : "1,2"; *p;) {
    thread_counts.push_back(std::atoi(p));
    while (*p && *p != ',') ++p;
    if (*p == ',') ++p;
  }
  std::printf("{\"tile_loops_tops\": {");
  for (int l = kPeak; l <= kActsOnly; ++l) {
    std::printf("%s\"%s\": {", l ? ", " : "", kNames[l]);
    for (size_t i = 0; i < thread_counts.size(); ++i) {
      double best = 0;
      for (int rep = 0; rep < 3; ++rep) best = std::max(best, run_threads(static_cast<Loop>(l), thread_counts[i]));
      std::printf("%s\"%d\": %.2f", i ? ", " : "", thread_counts[i], best);
    }
    std::printf("}");
  }
  std::printf("}}\n");
  return 0;
}
