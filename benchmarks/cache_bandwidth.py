"""Read bandwidth of one core from its own caches, the floor of an LSTM step at batch 1.

At batch 1 each step multiplies one row by the whole recurrent matrix: every weight is read
once per step and used once, so a step cannot take less than the packed W_hh's bytes over
the cores' cache read bandwidth. This times sequential reads of a buffer that stays in one
core's cache (AVX-512 or AVX2 loads into 8 independent sums, compiled with the same flags as
the native kernels), on one core and on two at once, each thread its own buffer:

    python benchmarks/cache_bandwidth.py
    python benchmarks/cache_bandwidth.py --sizes 32,512,1024 --passes 4000

and prints, for batch 1 / hidden 256, the resulting floor per step and the largest speedup
over torch.nn.LSTM that it allows (torch.nn timed here too).
"""

import argparse
import statistics
import threading
import time

import torch
from torch.utils.cpp_extension import load_inline

from lstmkit.bench import matmul_rate
from lstmkit.kernels import native

_SOURCE = r"""
#include <torch/extension.h>
#include <chrono>

// Seconds per pass over `data` (the best of `rounds` timings of `passes` passes).
double read_pass(torch::Tensor data, int64_t passes, int64_t rounds) {
  typedef float V __attribute__((vector_size(64)));
  const float* p = data.data_ptr<float>();
  const int64_t n = data.numel() / 128 * 128;
  double best = 1e30;
  V sums[8] = {};
  {
    pybind11::gil_scoped_release release;
    for (int64_t round = 0; round < rounds; ++round) {
      auto start = std::chrono::steady_clock::now();
      for (int64_t pass = 0; pass < passes; ++pass)
        for (int64_t i = 0; i < n; i += 128)
          for (int k = 0; k < 8; ++k) sums[k] += *reinterpret_cast<const V*>(p + i + 16 * k);
      std::chrono::duration<double> took = std::chrono::steady_clock::now() - start;
      best = std::min(best, took.count() / passes);
    }
  }
  V total = sums[0];
  for (int k = 1; k < 8; ++k) total += sums[k];
  if (total[0] == 1234.5f) best += 1e-30;   // keeps the loads
  return best;
}
"""


def _module():
    return load_inline("lstmkit_cache_bandwidth", cpp_sources=_SOURCE, functions=["read_pass"],
                       extra_cflags=native._compiler_flags())


def bandwidth(module, kib: int, threads: int, passes: int, rounds: int = 5) -> float:
    """GB/s per core reading a kib-KiB buffer of its own, with `threads` cores at once."""
    buffers = [torch.ones(kib * 256) for _ in range(threads)]
    results = [0.0] * threads

    def run(k):
        results[k] = module.read_pass(buffers[k], passes, rounds)

    workers = [threading.Thread(target=run, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return kib * 1024 / max(results) / 1e9


def torch_lstm_step_us(hidden: int, input_size: int, steps: int, repeats: int = 31) -> float:
    lstm = torch.nn.LSTM(input_size, hidden)
    x = torch.randn(steps, 1, input_size)
    times = []
    with torch.no_grad():
        for _ in range(repeats + 3):
            start = time.perf_counter()
            lstm(x)
            times.append(time.perf_counter() - start)
    return statistics.median(times[3:]) / steps * 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="32,256,512,1024,1536",
                        help="buffer sizes per core, KiB")
    parser.add_argument("--passes", type=int, default=2000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--input-size", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(2)
    module = _module()
    print("KiB per core   one core GB/s   each of two cores GB/s")
    for kib in (int(s) for s in args.sizes.split(",")):
        passes = max(10, args.passes * 512 // max(kib, 1))
        print(f"{kib:>11}   {bandwidth(module, kib, 1, passes):>13.1f}   "
              f"{bandwidth(module, kib, 2, passes):>22.1f}")
    H, I = args.hidden, args.input_size
    w_hh_kib = 4 * H * H * 4 / 1024
    per_core = bandwidth(module, int(w_hh_kib // 2), 2, args.passes)
    floor_us = w_hh_kib * 1024 / (2 * per_core * 1e9) * 1e6
    rate = matmul_rate()                          # GFLOP/s, both cores
    projection_us = 2 * I * 4 * H / (rate * 1e9) * 1e6
    theirs = torch_lstm_step_us(H, I, 100)
    print(f"\nbatch 1 / hidden {H}: W_hh is {w_hh_kib:.0f} KiB, half on each core at "
          f"{per_core:.1f} GB/s: at least {floor_us:.2f} us per step, "
          f"{floor_us + projection_us:.2f} with the input projection at the matmul rate "
          f"({rate:.0f} GFLOP/s); torch.nn.LSTM takes "
          f"{theirs:.2f} us per step (length 100): at most "
          f"{theirs / (floor_us + projection_us):.2f}x")


if __name__ == "__main__":
    main()
