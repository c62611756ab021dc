// lstmkit native CPU kernels: whole-sequence forward and backward loops for LSTM, GRU and RNN.
//
// B batch (largest step), T steps, N rows (flat time-major, see layout.py), H hidden,
// P output size (H, or proj size), NG gates (LSTM 4: i f g o; GRU 3: r z n; RNN 1),
// L SIMD lanes (16 floats or 8 doubles), J = ceil(H / L) unit blocks.
//
// A layer's whole forward or backward in one direction (lstm_layer_forward, ...; the
// per-sequence products: input projection; dX and the weight gradients, see "Per-sequence
// products"), the recurrence, and the memory pool everything lives in. Python calls the
// layers' autograd nodes (NativeLSTMLayer; NativeOneStateLayer for the GRU and RNN: lstm_layer,
// one_state_layer), Python-free from apply to the gradients, or their forward alone for
// inference (lstm_infer, one_state_infer), and the single-step kernel (cell_step); the *_py
// functions at the end. native.py chooses the driver and routes the calls.
//
// Two drivers per family:
//   fused   small batches and recurrent matrices whose per-core share fits in L2, no
//           projection. The recurrent matrix is packed once per call into unit blocks
//           (J, K, NG, L); each worker owns a range of unit blocks for the whole sequence,
//           computes its gates' pre-activations in registers and applies the gate math to
//           them at once. One synchronisation per step, between the workers only. At batch 1
//           the LSTM's workers also project the input onto their own blocks first.
//   generic any case (projection, GRU reset-before, larger matrices and batches): each
//           step's recurrent product is one call of MKL's packed GEMM, W_hh reordered once
//           per call, or of oneDNN's matmul off Intel CPUs (StepProduct; at::mm without
//           either), the gate math a loop over rows right
//           after it; the batch rows split into independent per-thread parts when W_hh is
//           small, else each product and loop split across the threads. For the LSTM with
//           small row parts, each part's product can be the fused driver's instead ("own
//           product", gate math in its epilogue). native.py's _driver and _own_step_product
//           choose.
// Both share the per-unit-block gate math ("epilogues") below.

#include <ATen/EmptyTensor.h>
#include <c10/core/CPUAllocator.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/abs.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/equal.h>
#include <ATen/ops/add.h>
#include <ATen/ops/clamp.h>
#include <ATen/ops/div.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/tanh.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>
#include <ATen/autocast_mode.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <pthread.h>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define LSTMKIT_X86 1
#endif

namespace {

using at::Tensor;
using i64 = int64_t;

// ---- recycled memory for every buffer of a kernel call -------------------------------------
// Memory fresh from the operating system costs a page fault per 4 KiB page when first written:
// 0.9 us each on the benchmark VM (16 MiB filled in 4.7 ms fresh, 0.9 ms reused). A training
// step allocates its saved gates, cells and outputs anew (about 20 MiB at batch 32 / hidden
// 256), and glibc gives large blocks back to the system when they are freed, so every step
// paid ~5000 faults, a sixth of its time. Tensors from `pooled_empty` return their memory to a
// pool when they die instead, and the next call of the same size takes it back, already
// mapped. The pool keeps at most `limit` bytes of free blocks (release_memory() in
// native.py empties it); tensors that stay alive are the caller's, as with any allocator.
class RecyclingAllocator final : public c10::Allocator {
 public:
  static constexpr size_t HEADER = 64;            // holds the capacity; keeps data aligned
  static constexpr size_t MIN_POOLED = 256 << 10; // smaller blocks come from glibc's heap

  c10::DataPtr allocate(size_t n) override {
    if (n < MIN_POOLED) return c10::GetCPUAllocator()->allocate(n);
    char* block = take(n);
    if (!block) {
      size_t capacity = (n + 63) / 64 * 64;
      block = static_cast<char*>(std::aligned_alloc(64, HEADER + capacity));
      TORCH_CHECK(block, "lstmkit: out of memory allocating ", n, " bytes");
      *reinterpret_cast<size_t*>(block) = capacity;
    }
    return {block + HEADER, block, &give_back, c10::Device(c10::DeviceType::CPU)};
  }
  void copy_data(void* dest, const void* src, size_t count) const override {
    default_copy_data(dest, src, count);
  }

  size_t limit = size_t(512) << 20;
  size_t free_bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return free_bytes_;
  }
  void unlock_after_fork() { new (&mutex_) std::mutex(); }
  void release() {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& [capacity, block] : free_) std::free(block);
    free_.clear();
    free_bytes_ = 0;
  }

 private:
  // The smallest free block that holds n bytes, if it wastes at most a quarter.
  char* take(size_t n) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = free_.lower_bound(n);
    if (it == free_.end() || it->first > n + n / 4) return nullptr;
    char* block = it->second;
    free_bytes_ -= it->first;
    free_.erase(it);
    return block;
  }
  static void give_back(void* context);

  std::mutex mutex_;
  std::multimap<size_t, char*> free_;
  size_t free_bytes_ = 0;
};

// Never destroyed: tensors may die after static destructors have run (at interpreter exit).
RecyclingAllocator& recycling() {
  static auto* allocator = [] {
    auto* pool = new RecyclingAllocator();
    // A child forked while another thread held the pool's lock would wait for it forever.
    pthread_atfork(nullptr, nullptr, [] { recycling().unlock_after_fork(); });
    return pool;
  }();
  return *allocator;
}

void RecyclingAllocator::give_back(void* context) {
  char* block = static_cast<char*>(context);
  size_t capacity = *reinterpret_cast<size_t*>(block);
  RecyclingAllocator& pool = recycling();
  {
    std::lock_guard<std::mutex> lock(pool.mutex_);
    if (pool.free_bytes_ + capacity <= pool.limit) {
      pool.free_.emplace(capacity, block);
      pool.free_bytes_ += capacity;
      return;
    }
  }
  std::free(block);
}

// at::empty and Tensor::clone, with the memory from the pool above. Every buffer of a kernel
// call comes from here: the packed weights alone are 16 MiB at hidden 1024, and faulting them
// in anew cost 4 ms per call (6% of a forward at batch 128).
Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return at::detail::empty_generic(sizes, &recycling(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(options.dtype()), c10::nullopt);
}
// Whether t's values are not the bytes in its memory: a negated view (its sign is a flag) or a
// zero tensor (it has no memory). ATen's copies resolve both; the kernels' reads do not.
inline bool flagged(const Tensor& t) { return t.is_neg() || t._is_zerotensor(); }
// Whether t's elements are in its memory as they read, in order.
inline bool plain_memory(const Tensor& t) { return t.is_contiguous() && !flagged(t); }
// Copies of at most this many bytes from plain memory are a memcpy: a call's states are a few
// KiB, and each ATen copy (and the select or narrow before it) went through the dispatcher,
// about 1 us apiece, seven of them in a batch-1 forward.
constexpr size_t PLAIN_COPY_BYTES = 256 << 10;
inline bool memcpy_copies(const Tensor& t) {
  return plain_memory(t) && t.nbytes() <= PLAIN_COPY_BYTES;
}
Tensor pooled_clone(const Tensor& t) {
  Tensor copy = pooled_empty(t.sizes(), t.options());
  if (!memcpy_copies(t)) return copy.copy_(t);
  if (t.nbytes()) std::memcpy(copy.data_ptr(), t.data_ptr(), t.nbytes());
  return copy;
}
// The fused drivers' state pair (2, B, P): each step reads h from one half and writes the next
// into the other; both start as s (B, P).
Tensor state_pair(const Tensor& s) {
  Tensor pair = pooled_empty({2, s.size(0), s.size(1)}, s.options());
  if (!memcpy_copies(s)) {
    pair.select(0, 0).copy_(s);
    pair.select(0, 1).copy_(s);
  } else if (s.nbytes()) {
    auto* base = static_cast<char*>(pair.data_ptr());
    std::memcpy(base, s.data_ptr(), s.nbytes());
    std::memcpy(base + s.nbytes(), s.data_ptr(), s.nbytes());
  }
  return pair;
}
// A pooled copy of half k of a state pair.
Tensor state_of(const Tensor& pair, i64 k) {
  Tensor s = pooled_empty({pair.size(1), pair.size(2)}, pair.options());
  if (s.nbytes())
    std::memcpy(s.data_ptr(), static_cast<const char*>(pair.data_ptr()) + k * s.nbytes(),
                s.nbytes());
  return s;
}
// The dtype the kernels compute in for inputs of dtype t: float16 and bfloat16 in float32.
inline at::ScalarType compute_type(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 ? at::kFloat : t;
}
// t in dtype `type`: t itself if it is already, else a copy in pooled memory (float16 weights
// converted afresh at every call faulted in a page per 4 KiB of the copy); undefined stays so.
Tensor to_type(const Tensor& t, at::ScalarType type) {
  if (!t.defined() || (t.scalar_type() == type && !flagged(t))) return t;
  return pooled_empty(t.sizes(), t.options().dtype(type)).copy_(t);   // also resolves those
}

// ---- SIMD vectors (GCC/Clang vector extensions: AVX-512, AVX2 or SSE, as the machine has) ----

template <typename S> struct Vec;
template <> struct Vec<float> {
  typedef float V __attribute__((vector_size(64)));
  typedef float U __attribute__((vector_size(64), aligned(4)));
  typedef int32_t I __attribute__((vector_size(64)));
  static constexpr int L = 16;
};
template <> struct Vec<double> {
  typedef double V __attribute__((vector_size(64)));
  typedef double U __attribute__((vector_size(64), aligned(8)));
  typedef int64_t I __attribute__((vector_size(64)));
  static constexpr int L = 8;
};

template <typename S> using V = typename Vec<S>::V;

template <typename S>
inline V<S> load(const S* p, int n) {
  if (n == Vec<S>::L) return *reinterpret_cast<const typename Vec<S>::U*>(p);
  V<S> v = {};
  for (int i = 0; i < n; ++i) v[i] = p[i];
  return v;
}
template <typename S>
inline void store(S* p, V<S> v, int n) {
  if (n == Vec<S>::L) {
    *reinterpret_cast<typename Vec<S>::U*>(p) = v;
  } else {
    for (int i = 0; i < n; ++i) p[i] = v[i];
  }
}
// A streaming (non-temporal) store where p is aligned to a whole vector (else an ordinary one),
// for write-once buffers read back only after the loop that writes them (the saved gates in
// training, the GRU's d_gi): larger than the caches, their ordinary stores read every line in first
// (write-allocate) and push out of the caches what the next steps read. FlushDenormals' end
// orders a thread's streaming stores before its later stores (the parallel region's join), so
// no other thread may read a streamed buffer before the parallel region that wrote it ends (the
// fused driver's per-step release stores do not order them). AVX-512 builds only (elsewhere an
// ordinary store). Taken for buffers of at least stream_min_bytes (tests lower it).
i64 stream_min_bytes = 16 << 20;
template <typename S>
inline void stream(S* p, V<S> v, int n) {
#ifdef __AVX512F__
  if (n == Vec<S>::L && reinterpret_cast<uintptr_t>(p) % sizeof(V<S>) == 0) {
    if constexpr (std::is_same<S, float>::value) _mm512_stream_ps(p, (__m512)v);
    else _mm512_stream_pd(p, (__m512d)v);
    return;
  }
#endif
  store(p, v, n);
}
// stream() or store(), as `streaming` says.
template <typename S>
inline void put(bool streaming, S* p, V<S> v, int n) {
  streaming ? stream(p, v, n) : store(p, v, n);
}
inline bool streams(const Tensor& t) { return t.defined() && (i64)t.nbytes() >= stream_min_bytes; }
template <typename S> inline V<S> splat(S s) { return V<S>{} + s; }
// A slice of an optional bias vector (zero without one).
template <typename S>
inline V<S> load_bias(const S* bias, i64 at, int n) { return bias ? load(bias + at, n) : V<S>{}; }

// float: Cephes-style exp (about 1 ulp), vectorised: exp(x) = 2^n e^r, n = round(x log2 e),
// r = x - n ln 2 (in two parts), e^r by its polynomial. Inputs clamped so 2^n stays normal.
// e^r from x and n:
__attribute__((always_inline)) inline V<float> exp_remainder(V<float> x, V<float> n) {
  x = x - n * 0.693359375f + n * 2.12194440e-4f;
  V<float> z = x * x;
  V<float> y = splat(1.9875691500E-4f);
  y = y * x + 1.3981999507E-3f;
  y = y * x + 8.3334519073E-3f;
  y = y * x + 4.1665795894E-2f;
  y = y * x + 1.6666665459E-1f;
  y = y * x + 5.0000001201E-1f;
  return y * z + x + 1.0f;
}
// x clamped to [lo, hi], NaN kept NaN.
__attribute__((always_inline)) inline V<float> clamp_keeping_nan(V<float> x, float lo, float hi) {
#ifdef __AVX512F__
  // min and max return their second operand when one is NaN.
  return (V<float>)_mm512_min_ps((__m512)splat(hi), _mm512_max_ps((__m512)splat(lo), (__m512)x));
#else
  x = x < lo ? splat(lo) : x;                      // comparisons with NaN are false
  return x > hi ? splat(hi) : x;
#endif
}
#ifdef __AVX512F__
// With AVX-512 the rounding is one instruction and 2^n applied by scalef instead of built from
// its exponent bits (same results; 11 of the 17 instructions). Gate math per unit, the LSTM
// cell at 16 rows x 256 units: 2.5 -> 2.3 ns. x already clamped:
__attribute__((always_inline)) inline V<float> exp_clamped(V<float> x) {
  using VF = V<float>;
  VF n = (VF)_mm512_roundscale_ps((__m512)(x * 1.44269504088896341f),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return (VF)_mm512_scalef_ps((__m512)exp_remainder(x, n), (__m512)n);
}
#else
__attribute__((always_inline)) inline V<float> exp_clamped(V<float> x) {
  using VF = V<float>;
  using VI = Vec<float>::I;
  VF fx = x * 1.44269504088896341f + 0.5f;
  VF n = __builtin_convertvector(__builtin_convertvector(fx, VI), VF);
  n = n > fx ? n - 1.0f : n;                                      // floor
  VI e = (__builtin_convertvector(n, VI) + 127) << 23;
  return exp_remainder(x, n) * (VF)e;
}
#endif
__attribute__((always_inline)) inline V<float> vexp(V<float> x) {
  return exp_clamped(clamp_keeping_nan(x, -87.3f, 88.3f));
}

__attribute__((always_inline)) inline V<float> vsigmoid(V<float> x) { return 1.0f / (1.0f + vexp(-x)); }

// tanh(x) = x P(x^2) / Q(x^2) on [-9, 9] (beyond, tanh rounds to +-1 in float), P of degree 5
// and Q of degree 4 in x^2: a minimax fit of the relative error (2.5e-8 in exact arithmetic; made
// and measured by benchmarks/tanh_fit.py). In float32 at most 5 ulp (mean 0.42) over all floats in
// [2^-20, 12]; tiny x exact (P(0) = Q(0) = 1), odd, NaN stays NaN. 13 operations and a division
// instead of the 28 of 1 - 2 / (e^2x + 1) with a polynomial for small x (1.3 ulp): the LSTM
// cell went 2.09 -> 1.19 ns per unit in a C++ loop over 16 rows x 256 units.
struct Ratio { V<float> num, den; };
__attribute__((always_inline)) inline Ratio tanh_ratio(V<float> x) {
  using VF = V<float>;
  x = clamp_keeping_nan(x, -9.0f, 9.0f);
  VF u = x * x;
  VF p = splat(-1.0485915926626909e-11f);
  p = p * u + 2.8033618939167003e-08f;
  p = p * u + 2.6867409056050241e-05f;
  p = p * u + 0.0038095628924977908f;
  p = p * u + 0.13632458227116276f;
  p = p * u + 1.0f;
  VF q = splat(1.2102294783374953e-06f);
  q = q * u + 0.00038366205853692119f;
  q = q * u + 0.027028926985943346f;
  q = q * u + 0.46965789190955431f;
  q = q * u + 1.0f;
  return {x * p, q};
}
// Rounding can put the ratio an ulp past 1 near the clamp: clamped back.
__attribute__((always_inline)) inline V<float> vtanh(V<float> x) {
  Ratio t = tanh_ratio(x);
  return clamp_keeping_nan(t.num / t.den, -1.0f, 1.0f);
}
// 1 + e^-x = 1 / sigmoid(x), the exponent clamped to +-25 so that a product of three stays
// finite (sigmoid(-25) = 1.4e-11: the clamp moves a gate by less than that).
__attribute__((always_inline)) inline V<float> sigmoid_denominator(V<float> x) {
  return 1.0f + exp_clamped(clamp_keeping_nan(-x, -25.0f, 25.0f));
}

// double: exact libm per lane (float64 is for checking, not for speed).
inline V<double> vsigmoid(V<double> x) {
  for (int i = 0; i < 8; ++i) x[i] = 1.0 / (1.0 + std::exp(-x[i]));
  return x;
}
inline V<double> vtanh(V<double> x) {
  for (int i = 0; i < 8; ++i) x[i] = std::tanh(x[i]);
  return x;
}

template <typename S> inline V<S> vrelu(V<S> x) { return x > S(0) ? x : splat(S(0)); }

// LSTMVariant's activations by code, and their slopes from their outputs (as the reference's
// derivative_from_output). Gates: 0 sigmoid, 1 hard_sigmoid = clip(a / 6 + 1/2, 0, 1).
// Cell input and output: 0 tanh, 1 softsign = a / (1 + |a|), 2 hardtanh = clip(a, -1, 1),
// 3 identity.
template <typename S> inline V<S> vclip(V<S> x, S lo, S hi) {
  x = x < lo ? splat(lo) : x;
  return x > hi ? splat(hi) : x;
}
template <typename S> inline V<S> vabs(V<S> x) { return x < S(0) ? -x : x; }
template <typename S> inline V<S> gate_activation(int code, V<S> a) {
  return code == 0 ? vsigmoid(a) : vclip<S>(a * S(1.0 / 6.0) + S(0.5), S(0), S(1));
}
template <typename S> inline V<S> gate_slope(int code, V<S> y) {
  if (code == 0) return y * (S(1) - y);
  return ((y > S(0)) & (y < S(1))) ? splat(S(1.0 / 6.0)) : V<S>{};
}
template <typename S> inline V<S> cell_activation(int code, V<S> a) {
  switch (code) {
    case 0: return vtanh(a);
    case 1: return a / (S(1) + vabs<S>(a));
    case 2: return vclip<S>(a, S(-1), S(1));
    default: return a;
  }
}
template <typename S> inline V<S> cell_slope(int code, V<S> y) {
  switch (code) {
    case 0: return S(1) - y * y;
    case 1: { V<S> r = S(1) - vabs<S>(y); return r * r; }
    case 2: return vabs<S>(y) < S(1) ? splat(S(1)) : V<S>{};
    default: return splat(S(1));
  }
}

// ---- denormals: flush to zero inside the kernels, restore the caller's mode after -----------

struct FlushDenormals {
#ifdef LSTMKIT_X86
  unsigned saved;
  FlushDenormals() : saved(_mm_getcsr()) { _mm_setcsr(saved | 0x8040); }   // FTZ | DAZ
  ~FlushDenormals() {
    _mm_setcsr(saved);
    _mm_sfence();                     // the scope's streaming stores (see stream()) first
  }
#endif
};

// ---- the step layout ---------------------------------------------------------------------

struct Steps {
  std::vector<i64> size, offset, order;   // per step; order = processing order of the steps
  i64 batch = 0, rows = 0;
  bool reverse = false;
  Steps(const std::vector<i64>& batch_sizes, bool rev) : size(batch_sizes), reverse(rev) {
    TORCH_CHECK_VALUE(!size.empty(), "batch_sizes must not be empty");
    for (size_t t = 0; t < size.size(); ++t)
      TORCH_CHECK_VALUE(size[t] > 0 && (t == 0 || size[t] <= size[t - 1]),
                        "batch_sizes must be positive and never grow, got ",
                        at::IntArrayRef(size));
    for (i64 s : size) { offset.push_back(rows); rows += s; }
    batch = size[0];
    for (i64 i = 0; i < (i64)size.size(); ++i) order.push_back(rev ? (i64)size.size() - 1 - i : i);
  }
  i64 count() const { return (i64)size.size(); }
  // The step processed just before step t in the forward sweep (-1 at the start).
  i64 before(i64 t) const {
    i64 u = reverse ? t + 1 : t - 1;
    return (u < 0 || u >= count()) ? -1 : u;
  }
  // Row of step u holding sequence b's state, or -1 when that sequence is not active there.
  i64 row(i64 u, i64 b) const { return (u >= 0 && b < size[u]) ? offset[u] + b : -1; }
};

// ---- packed weights and the register-blocked product -------------------------------------

// Pack so that output unit j (of each of NG gates) and contraction index k live at
// P[((j / L) * K + k) * NG * L + q * L + j % L] = M(q, j, k), zero-padded past `units`.
// M(q, j, k) = W[q * sq + j * su + k * sc].
// Below this much work (floating-point operations) a parallel region costs more than it saves.
constexpr double SERIAL_FLOPS = 4e6;

#ifdef __AVX512F__
// out[k][l] = in[l * ld + k] for a 16 x 16 float tile: unpacks and lane shuffles, a sixteenth
// of the instructions of an element-by-element copy (which made packing a 1 MiB W_hh cost as
// much as 20 batch-1 steps).
inline void transpose16(const float* in, i64 ld, float (*out)[16]) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(in + i * ld);
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4)
    for (int j = 0; j < 2; ++j) {
      __m512d a = _mm512_castps_pd(t[i + j]), b = _mm512_castps_pd(t[i + j + 2]);
      r[i + 2 * j] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
      r[i + 2 * j + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    }
  for (int i = 0; i < 16; i += 8)
    for (int j = 0; j < 4; ++j) {
      t[i + j] = _mm512_shuffle_f32x4(r[i + j], r[i + j + 4], 0x88);
      t[i + j + 4] = _mm512_shuffle_f32x4(r[i + j], r[i + j + 4], 0xdd);
    }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0x88);
    r[j + 8] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0xdd);
  }
  for (int i = 0; i < 16; ++i) _mm512_storeu_ps(out[i], r[i]);
}
#endif

// The tile[k][l] = src[l * su + k * sc] copy of pack(), k < kn, l < n, zeros for l >= n.
template <typename S, int L, int KT>
inline void gather_tile(const S* src, i64 su, i64 sc, i64 n, i64 kn, S (&tile)[KT][L]) {
#ifdef __AVX512F__
  if constexpr (std::is_same<S, float>::value && L == 16 && KT == 16) {
    if (n == L && kn == KT && sc == 1) {
      transpose16(src, su, tile);
      return;
    }
  }
#endif
  for (i64 l = 0; l < n; ++l)
    for (i64 k = 0; k < kn; ++k) tile[k][l] = src[l * su + k * sc];
  for (i64 l = n; l < L; ++l)
    for (i64 k = 0; k < kn; ++k) tile[k][l] = S(0);
}

// Unit blocks [j0, j1) of one source's columns [k_offset, k_offset + K) of a packed matrix of KP
// columns in all.
template <typename S>
void pack_blocks(S* out, const Tensor& w, i64 ng, i64 units, i64 K, i64 KP, i64 k_offset, i64 sq,
                 i64 su, i64 sc, i64 j0, i64 j1) {
  constexpr int L = Vec<S>::L;
  constexpr i64 KT = 16;                 // contraction tile: L x KT elements transposed at once
  const S* W = w.data_ptr<S>();
  // Read along whichever of j (su == 1) and k is contiguous in W: a strided gather, one element
  // per cache line, made the packing of a 1 MiB matrix cost as much as 50 recurrent steps.
  S tile[KT][L];
  for (i64 jb = j0; jb < j1; ++jb) {
    const i64 n = std::min<i64>(L, units - jb * L);
    for (i64 q = 0; q < ng; ++q) {
      const S* Wq = W + q * sq + jb * L * su;
      for (i64 k0 = 0; k0 < K; k0 += KT) {
        const i64 kn = std::min<i64>(KT, K - k0);
        if (su == 1) {
          for (i64 k = 0; k < kn; ++k) {
            for (i64 l = 0; l < n; ++l) tile[k][l] = Wq[l + (k0 + k) * sc];
            for (i64 l = n; l < L; ++l) tile[k][l] = S(0);
          }
        } else {
          gather_tile<S, L, KT>(Wq + k0 * sc, su, sc, n, kn, tile);
        }
        for (i64 k = 0; k < kn; ++k)
          std::memcpy(out + ((jb * KP + k_offset + k0 + k) * ng + q) * L, tile[k], L * sizeof(S));
      }
    }
  }
}

// All unit blocks (see pack_blocks); serial below 32K elements (a parallel region costs more),
// two cores halve a 1 MiB pack.
template <typename S>
void pack_into(S* out, const Tensor& w, i64 ng, i64 units, i64 K, i64 KP, i64 k_offset, i64 sq,
               i64 su, i64 sc) {
  constexpr int L = Vec<S>::L;
  const i64 J = (units + L - 1) / L;
  const i64 grain = std::max<i64>(1, 32768 / std::max<i64>(1, K * ng * L));
  at::parallel_for(0, J, grain, [&](i64 j0, i64 j1) {
    pack_blocks<S>(out, w, ng, units, K, KP, k_offset, sq, su, sc, j0, j1);
  });
}

// Room for a packed matrix: (J, K, ng, L), J = ceil(units / L).
template <typename S>
Tensor packed_empty(i64 ng, i64 units, i64 K, const at::TensorOptions& options) {
  constexpr int L = Vec<S>::L;
  return pooled_empty({(units + L - 1) / L * K * ng * L}, options);
}

template <typename S>
Tensor pack(const Tensor& w, i64 ng, i64 units, i64 K, i64 sq, i64 su, i64 sc) {
  Tensor packed = packed_empty<S>(ng, units, K, w.options());
  pack_into<S>(packed.data_ptr<S>(), w, ng, units, K, K, 0, sq, su, sc);
  return packed;
}

// [W_a | W_b] packed as one (ng * units, K_a + K_b) matrix, each row-major (ng * units, K_x):
// the fused product's [x_t | h] operand without the concatenated copy (at batch 8 / hidden 128
// the copy was 4% of a forward).
template <typename S>
Tensor pack_side_by_side(const Tensor& a, const Tensor& b, i64 ng, i64 units) {
  const i64 Ka = a.size(1), Kb = b.size(1), K = Ka + Kb;
  Tensor packed = packed_empty<S>(ng, units, K, b.options());
  pack_into<S>(packed.data_ptr<S>(), a, ng, units, Ka, K, 0, units * Ka, Ka, 1);
  pack_into<S>(packed.data_ptr<S>(), b, ng, units, Kb, K, Ka, units * Kb, Kb, 1);
  return packed;
}

// A scalar from memory in every lane; on AVX-512 a broadcast load (a load port, no shuffle).
inline V<float> broadcast(const float* p) {
#ifdef __AVX512F__
  return (V<float>)_mm512_set1_ps(*p);
#else
  return splat(*p);
#endif
}
inline V<double> broadcast(const double* p) {
#ifdef __AVX512F__
  return (V<double>)_mm512_set1_pd(*p);
#else
  return splat(*p);
#endif
}

// acc[r][v] = sum_k z[r * zs + k] * w[v * vs + k * ks .. + L): R rows of z times NV vectors of
// packed weights (NV gates of one unit block, or NV unit blocks of one gate).
template <typename S, int R, int NV>
inline void block_product(const S* z, i64 zs, i64 K, const S* w, i64 vs, i64 ks,
                          V<S> (&acc)[R][NV]) {
  // With few rows there are too few accumulators to hide the FMA latency (4 cycles, 2 ports):
  // then even and odd k go to separate accumulators, summed at the end.
  constexpr int SPLIT = R * NV < 8 ? 2 : 1;
  V<S> part[SPLIT][R][NV];
#pragma GCC unroll 2
  for (int h = 0; h < SPLIT; ++h)
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) part[h][r][v] = V<S>{};
  i64 k = 0;
  for (; k + SPLIT <= K; k += SPLIT) {
#pragma GCC unroll 2
    for (int h = 0; h < SPLIT; ++h) {
      V<S> wv[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v)
        wv[v] = *reinterpret_cast<const V<S>*>(w + v * vs + (k + h) * ks);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        V<S> zb = broadcast(z + r * zs + k + h);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) part[h][r][v] += zb * wv[v];
      }
    }
  }
  for (; k < K; ++k)
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      V<S> zb = broadcast(z + r * zs + k);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v)
        part[0][r][v] += zb * *reinterpret_cast<const V<S>*>(w + v * vs + k * ks);
    }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      acc[r][v] = part[0][r][v];
      if (SPLIT == 2) acc[r][v] += part[SPLIT - 1][r][v];
    }
}

#ifdef __AVX512F__
constexpr int ROWS = 8;   // 8 rows x 2 vectors = 16 of the 32 vector registers accumulate
// The LSTM's groups of 4 and 6 rows take all four gates in one pass (16 or 24 accumulators),
// reading each packed weight vector once instead of twice. Interleaved medians, forward ms:
// batch 6 / hidden 256 1.95 -> 1.65 (one group of 6 instead of 4 + 2), batch 4 / hidden 128
// 0.61 -> 0.55, batch 8 / hidden 128 (row parts of 4) 0.87 -> 0.77. Groups of 8 rows two gates
// at a time measured as fast as groups of 6 or 4 in one pass at 16 and 32 rows.
constexpr int ALL_GATES_ROWS = 6;
#else
constexpr int ROWS = 4;
constexpr int ALL_GATES_ROWS = 2;   // 16 vector registers
#endif

// The product over one chunk [k0, k1) of the contraction. A sum that spans several chunks waits
// in `partial` ((B, J, NG, L) vectors) between them; the epilogue sees the complete sum only.
struct Chunk {
  i64 k0, k1, K, J;
  bool first() const { return k0 == 0; }
  bool last() const { return k1 == K; }
};

template <typename S, int R, int NV>
inline void finish(V<S> (&acc)[R][NV], S* partial, const Chunk& c, i64 b, i64 jb, int v_offset,
                   int ng, bool blocks, V<S> (*out)[4]) {
  constexpr int L = Vec<S>::L;
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) {
      // v indexes gates (v_offset + v) of block jb, or blocks (jb + v) of the single gate.
      i64 jbv = blocks ? jb + v : jb;
      int q = blocks ? 0 : v_offset + v;
      S* slot = partial ? partial + (((b + r) * c.J + jbv) * ng + q) * L : nullptr;
      if (!c.first()) acc[r][v] += *reinterpret_cast<V<S>*>(slot);
      if (!c.last()) *reinterpret_cast<V<S>*>(slot) = acc[r][v];
      else out[r][blocks ? v : q] = acc[r][v];
    }
}

template <typename S, int R, int NG, typename Epilogue>
inline void row_group(const S* z, i64 zs, const S* packed, i64 b, i64 jb0, i64 jb1,
                      const Chunk& c, S* partial, Epilogue& epilogue) {
  constexpr int L = Vec<S>::L;
  const i64 K = c.K, n = c.k1 - c.k0;
  const S* zc = z + b * zs + c.k0;
  V<S> done[R][4];
  if (NG == 1) {                        // one gate: several unit blocks at a time instead
    i64 jb = jb0;
    // One row: four blocks, 8 accumulators, enough to keep the FMA units busy. With two (4
    // accumulators) each FMA waited for the one before it: the batch-1 LSTM backward's product
    // streamed W_hh at 3.9 us per step and core against the forward's 3.0.
    for (; R == 1 && jb + 4 <= jb1; jb += 4) {
      V<S> acc[R][4];
      block_product<S, R, 4>(zc, zs, n, packed + (jb * K + c.k0) * L, K * L, L, acc);
      finish<S, R, 4>(acc, partial, c, b, jb, 0, 1, true, done);
      if (c.last())
        for (int r = 0; r < R; ++r)
          for (int v = 0; v < 4; ++v) epilogue(b + r, jb + v, &done[r][v]);
    }
    for (; jb + 2 <= jb1; jb += 2) {
      V<S> acc[R][2];
      block_product<S, R, 2>(zc, zs, n, packed + (jb * K + c.k0) * L, K * L, L, acc);
      finish<S, R, 2>(acc, partial, c, b, jb, 0, 1, true, done);
      if (c.last())
        for (int r = 0; r < R; ++r) {
          epilogue(b + r, jb, &done[r][0]);
          epilogue(b + r, jb + 1, &done[r][1]);
        }
    }
    if (jb < jb1) {
      V<S> acc[R][1];
      block_product<S, R, 1>(zc, zs, n, packed + (jb * K + c.k0) * L, K * L, L, acc);
      finish<S, R, 1>(acc, partial, c, b, jb, 0, 1, true, done);
      if (c.last())
        for (int r = 0; r < R; ++r) epilogue(b + r, jb, &done[r][0]);
    }
    return;
  }
  for (i64 jb = jb0; jb < jb1; ++jb) {
    const S* wp = packed + (jb * K + c.k0) * NG * L;
    if (R <= 2 || (NG == 4 && R <= ALL_GATES_ROWS)) { // few rows: all gates in one pass
      V<S> acc[R][NG];
      block_product<S, R, NG>(zc, zs, n, wp, L, NG * L, acc);
      finish<S, R, NG>(acc, partial, c, b, jb, 0, NG, false, done);
      if (c.last())
        for (int r = 0; r < R; ++r) epilogue(b + r, jb, done[r]);
      continue;
    }
    for (int q0 = 0; q0 < NG; q0 += 2) {               // two gates at a time
      if (q0 + 1 < NG) {
        V<S> acc[R][2];
        block_product<S, R, 2>(zc, zs, n, wp + q0 * L, L, NG * L, acc);
        finish<S, R, 2>(acc, partial, c, b, jb, q0, NG, false, done);
      } else {
        V<S> acc[R][1];
        block_product<S, R, 1>(zc, zs, n, wp + q0 * L, L, NG * L, acc);
        finish<S, R, 1>(acc, partial, c, b, jb, q0, NG, false, done);
      }
    }
    if (c.last())
      for (int r = 0; r < R; ++r) epilogue(b + r, jb, done[r]);
  }
}

// Contraction chunk so that one worker's share of the packed matrix stays in its L2 cache
// while every row group reuses it (768 KiB of the 1-2 MiB L2 of current x86 cores; tests set
// it tiny to exercise the chunked sums on small shapes).
i64 chunk_bytes = 768 * 1024;
// The weights one pass of every row group reads (see rows_times_blocks): 2**62, no slabs.
i64 slab_bytes = 256 * 1024;

template <typename S>
i64 chunk_size(i64 K, i64 blocks, i64 ng) {
  i64 bytes_per_k = std::max<i64>(1, blocks) * ng * Vec<S>::L * (i64)sizeof(S);
  return std::max<i64>(4, std::min<i64>(K, chunk_bytes / bytes_per_k));
}

// Scratch for chunked products: running sums and the chunk size, for one fused driver call.
template <typename S>
struct Chunking {
  Tensor sums;
  i64 J, ng, kc;
  Chunking(i64 B, i64 J_, i64 ng_, i64 K, const at::TensorOptions& options)
      : J(J_), ng(ng_), kc(chunk_size<S>(K, std::min<i64>(2, J_), ng_)) {
    if (kc < K) sums = pooled_empty({B * J * ng * Vec<S>::L}, options);
  }
  // The running sums of rows from `first_row` on.
  S* partial(i64 first_row = 0) const {
    return sums.defined() ? sums.data_ptr<S>() + first_row * J * ng * Vec<S>::L : nullptr;
  }
};

// For rows [0, rows) of z (B, K) and unit blocks [jb0, jb1) of J: the products in registers,
// each complete (row, block) handed to epilogue(b, jb, acc[NG]) at once. `chunking` holds
// (B, J, NG, L) running sums when K is split into chunks (may be null if kc >= K); z's row 0 is
// its row `first_row`.
template <typename S, int NG, typename Epilogue>
inline void rows_times_blocks(const S* z, i64 zs, i64 K, const S* packed, i64 rows, i64 jb0,
                              i64 jb1, const Chunking<S>* chunking, Epilogue&& epilogue,
                              i64 first_row = 0) {
  S* partial = chunking ? chunking->partial(first_row) : nullptr;
  i64 J = chunking ? chunking->J : 0;
  i64 kc = partial ? chunking->kc : K;
  // With several row groups, the blocks in slabs of at most slab_bytes of weights, every row
  // group through one slab before the next: each slab is read from memory (or L3) once per
  // call and then from L2, instead of once per row group (8 groups at 64 rows).
  const i64 block_bytes = std::max<i64>(1, kc * NG * Vec<S>::L * (i64)sizeof(S));
  const i64 slab = rows <= ROWS ? std::max<i64>(1, jb1 - jb0)
                                : std::max<i64>(NG == 1 ? 2 : 1, slab_bytes / block_bytes);
  for (i64 k0 = 0; k0 < K; k0 += kc) {
    Chunk c{k0, std::min(K, k0 + kc), K, J};
    for (i64 js = jb0; js < jb1; js += slab) {
      const i64 je = std::min(jb1, js + slab);
      i64 b = 0;
      for (; b + ROWS <= rows; b += ROWS)
        row_group<S, ROWS, NG>(z, zs, packed, b, js, je, c, partial, epilogue);
      if (NG == 4 && ALL_GATES_ROWS == 6 && rows - b >= 6) {
        row_group<S, 6, NG>(z, zs, packed, b, js, je, c, partial, epilogue);
        b += 6;
      }
      if (rows - b >= 4) { row_group<S, 4, NG>(z, zs, packed, b, js, je, c, partial, epilogue); b += 4; }
      if (rows - b >= 2) { row_group<S, 2, NG>(z, zs, packed, b, js, je, c, partial, epilogue); b += 2; }
      if (rows - b >= 1) row_group<S, 1, NG>(z, zs, packed, b, js, je, c, partial, epilogue);
    }
  }
}

// ---- workers that stay together for a whole sequence -------------------------------------


// Waiting for the other workers: spin (a step takes microseconds), and after ~30 us, which
// means a worker's thread lost its core, take its blocks and yield between checks. (Tests set
// it to 0, so that workers take each other's blocks all the time.)
int steal_after_spins = 600;

inline void relax(int& spins) {
#ifdef LSTMKIT_X86
  _mm_pause();
#endif
  if (++spins > steal_after_spins) std::this_thread::yield();
}

// Split J unit blocks among the workers: worker w's own blocks are [first(w), first(w + 1)).
struct Split {
  i64 J, workers;
  i64 first(i64 w) const { return J * w / workers; }
};

struct alignas(64) Counter { std::atomic<i64> value{0}; char pad[64 - sizeof(std::atomic<i64>)]; };

// Unit blocks [jb0, jb1), one worker's own, whose step products it began before the step's
// synchronisation (see run_steps); empty: none begun.
struct Begun {
  i64 jb0 = 0, jb1 = 0;
  bool contains(i64 jb) const { return jb0 <= jb && jb < jb1; }
};

// Run step(s, jb0, jb1, begun) over all J unit blocks, in pieces of G blocks, for s = 0..steps-1;
// step s + 1 starts when every block of step s is done. Each worker works through its own
// blocks first (so its share of the packed weights stays in its core's cache from step to
// step); a worker that has waited a few microseconds for the others takes their unclaimed
// pieces, so a thread the OS has descheduled (a busy machine) delays a step by one piece at
// most, not by a time slice. Any mapping of workers to threads works, including all of them on
// one thread.
//
// begin(s, jb0, jb1) -> bool starts a worker's own blocks [jb0, jb1) of step s before it waits
// for the others to finish step s - 1 (true if it did): at batch 1, the products over the
// worker's own units of h, which it has just written itself, while the other workers' units
// cross between the cores (a round trip between the two cores of the benchmark machine takes
// 270 ns, a whole step at batch 1 / hidden 128 1.8 us). It is called only when the worker did
// all its own pieces of step s - 1 itself; step() then gets those blocks as `begun` for its
// own pieces, and an empty range for pieces it takes from another worker (whose begun sums, if
// any, go unused).
template <typename Step, typename Begin>
void run_steps(i64 workers, i64 J, i64 steps, i64 G, Step&& step, Begin&& begin) {
  const i64 pieces = (J + G - 1) / G;
  Split split{pieces, workers};
  std::vector<Counter> next(workers);   // blocks claimed so far, counted over all steps
  // Pieces finished so far (over all steps) by the thread that runs workers [w0, ...), in
  // finished[w0]: one writer per counter, so a plain store publishes them (an atomic add on one
  // shared counter waits for its line to come back from the core that read it last).
  std::vector<Counter> finished(workers);
  auto all_finished = [&] {
    i64 sum = 0;
    for (auto& f : finished) sum += f.value.load(std::memory_order_acquire);
    return sum;
  };
  auto own = [&](i64 w) { return split.first(w + 1) - split.first(w); };
  auto own_blocks = [&](i64 w) {
    return Begun{split.first(w) * G, std::min(J, split.first(w + 1) * G)};
  };
  // Claim up to `most` pieces (G blocks each) of worker w's share in step s: [first, last), empty
  // when none is left. The owner claims all that is left of its share at once: a claim is a
  // locked instruction, which waits until the stores before it (the previous piece's h, on lines
  // the other cores have read) have reached the cache. Others take one piece at a time.
  auto claim = [&](i64 w, i64 s, i64 most) -> std::pair<i64, i64> {
    const i64 n = own(w);
    i64 current = next[w].value.load(std::memory_order_relaxed);
    while (current < (s + 1) * n) {
      i64 count = std::min(most, (s + 1) * n - current);
      if (next[w].value.compare_exchange_weak(current, current + count,
                                              std::memory_order_relaxed)) {
        i64 first = split.first(w) + current - s * n;
        return {first, first + count};
      }
    }
    return {0, 0};
  };
  // Worker w's pieces of step s, done by the thread that owns w or (stealing) by another; the
  // count done, published in `mine` (the doing thread's counter).
  auto drain = [&](i64 w, i64 s, Begun begun, Counter& mine, bool owner) {
    i64 count = 0;
    for (;;) {
      auto [first, last] = claim(w, s, owner ? own(w) : 1);
      if (first == last) break;
      for (i64 piece = first; piece < last; ++piece, ++count)
        step(s, piece * G, std::min(J, piece * G + G), begun);
    }
    if (count)
      mine.value.store(mine.value.load(std::memory_order_relaxed) + count,
                       std::memory_order_release);
    return count;
  };
  auto body = [&](i64 w0, i64 w1) {
    FlushDenormals ftz;
    std::vector<Begun> begun(w1 - w0);
    for (i64 s = 0; s < steps; ++s) {
      for (i64 w = w0; w < w1; ++w) {
        bool all_own = drain(w, s, begun[w - w0], finished[w0], true) == own(w);
        begun[w - w0] = Begun{};
        if (all_own && s + 1 < steps && own(w)) {
          Begun mine = own_blocks(w);
          if (begin(s + 1, mine.jb0, mine.jb1)) begun[w - w0] = mine;
        }
      }
      int spins = 0;
      while (all_finished() < (s + 1) * pieces) {
        if (spins > steal_after_spins)
          for (i64 w = 0; w < workers; ++w)
            if (w < w0 || w >= w1) drain(w, s, Begun{}, finished[w0], false);
        relax(spins);
      }
    }
  };
  if (workers <= 1) {
    body(0, 1);
  } else {
    at::parallel_for(0, workers, 1, body);
  }
}

// Without begun steps: step(s, jb0, jb1), in pieces of G blocks (by default two: one-gate
// products take blocks in pairs, or fours for one row).
template <typename Step>
void run_steps(i64 workers, i64 J, i64 steps, Step&& step, i64 G = 2) {
  run_steps(workers, J, steps, G, [&](i64 s, i64 jb0, i64 jb1, Begun) { step(s, jb0, jb1); },
            [](i64, i64, i64) { return false; });
}

// Below this many floating-point operations per step one worker runs the whole sequence: the
// per-step synchronisation of two costs more than half a step saves. Interleaved medians,
// forward / training ms at batch 1, one worker vs two: LSTM hidden 128 0.325 / 1.08 vs 0.242 /
// 0.94, hidden 96 0.218 / 0.80 vs 0.191 / 0.78; GRU 128 0.255 / 0.93 vs 0.215 / 0.88; RNN 256
// 0.300 / 0.98 vs 0.252 / 0.85; but LSTM hidden 64 (32 768 per step) no faster with two.
constexpr i64 SERIAL_STEP_FLOPS = 50000;

// The fused driver with the input x itself (batch 1) projects it for all steps before the loop,
// or, when that projection (N, 4H) would take more than fused_projection_ring_bytes, this many
// rows at a time, at the first step of each chunk of rows / B steps, into a ring of rows that
// the steps read from (see lstm_forward). Interleaved medians, forward at batch 1 (input 64),
// ring of 16 rows / all steps at once: hidden 256, length 1000 0.952-0.958, 300 0.973, 200
// 0.991 (training at 1000 0.977-0.982); hidden 64, length 1000 0.957-0.962, 600 0.964; but
// hidden 128, length 1000 0.997 (training 0.996-1.007), 300 1.017, 100 1.024-1.026; at length
// 100 hidden 256 0.986-0.999, 64 0.995. So 1 MiB: a ring from length 257 at hidden 256, 513 at
// 128 (no gain, no loss at 1000), 1025 at 64 (its gain at 600-1000 left out). Its memory no
// longer grows with the length either. Tests set both.
int fused_projection_rows = 16;
i64 fused_projection_ring_bytes = 1 << 20;

i64 worker_count(i64 J, i64 flops_per_step) {
  if (flops_per_step < SERIAL_STEP_FLOPS) return 1;
  return std::max<i64>(1, std::min<i64>(at::get_num_threads(), (J + 1) / 2));  // 2 blocks a claim
}

// Gate math over rows [first, rows) and all unit blocks, split across threads (generic driver;
// inside a row part, see run_row_parts, it runs on the part's thread), in pieces of at least
// this many units. It was 16384, which left a step of batch 32 / hidden 512 (16384 units, one
// generic part) to one thread: forward 30.7 -> 27.5 ms at 4096 (16 / 512 16.5 -> 15.1; 48 and
// 64 / 512, 32 and 128 / 1024 unchanged; 1024 no better than 4096).
constexpr i64 GATE_MATH_GRAIN_UNITS = 4096;
// f(jb, n) for the unit blocks jb of H units, n = min(L, H - jb L) the block's width: first the
// full blocks with n the constant L, so that (f inlined) their loads and stores compile to
// plain vector moves without the partial block's branches, then the partial block, if any.
template <typename S, typename F>
__attribute__((always_inline)) inline void for_unit_blocks(i64 H, F&& f) {
  constexpr int L = Vec<S>::L;
  const i64 full = H / L;
  for (i64 jb = 0; jb < full; ++jb) f(jb, L);
  if (full * L < H) f(full, (int)(H - full * L));
}

// f(n) for the unit block at unit j of H units, n = min(L, H - j) its width: a compile-time L
// for a full block, as in for_unit_blocks (f is inlined twice).
template <typename S, typename F>
__attribute__((always_inline)) inline auto at_width(i64 H, i64 j, F&& f) {
  if (j + Vec<S>::L <= H) return f(Vec<S>::L);
  return f((int)(H - j));
}

// The same in pairs: f(jb, Blocks<2>{}, L) for blocks jb and jb + 1 while both are full, then
// f(jb, Blocks<1>{}, n) for the rest (see ratio_cells).
template <int W> using Blocks = std::integral_constant<int, W>;
template <typename S, typename F>
__attribute__((always_inline)) inline void for_unit_block_pairs(i64 H, F&& f) {
  constexpr int L = Vec<S>::L;
  i64 jb = 0;
  for (; (jb + 2) * L <= H; jb += 2) f(jb, Blocks<2>{}, L);
  for (; jb * L < H; ++jb) at_width<S>(H, jb * L, [&](int n) __attribute__((always_inline)) {
    f(jb, Blocks<1>{}, n);
  });
}

template <typename F>
void for_rows(i64 rows, i64 units, F&& f, i64 first = 0) {
  i64 grain = std::max<i64>(1, GATE_MATH_GRAIN_UNITS / std::max<i64>(units, 1));
  at::parallel_for(first, rows, grain, [&](i64 b0, i64 b1) {
    FlushDenormals ftz;
    for (i64 b = b0; b < b1; ++b) f(b);
  });
}

// The generic driver's steps over batch rows split into independent parts. No batch row's
// recurrence reads another row, so with several parts each thread runs the whole sequence for
// its own rows: its step products single-threaded (MKL runs serially inside a parallel
// region), its gate math right after, on a product still in its cache, and no fork and join of
// the thread team per step; but each part reads all of W_hh at every step, so native.py's
// _driver asks for several parts only when W_hh fits in one core's L2. One part: each step's
// product and gate math are split across the threads instead. step(k, r0, r1) does step k (in
// the loop's order) for rows [r0, r1); a part skips the steps where none of its rows is active.
template <typename Step>
void run_row_parts(i64 steps, i64 B, i64 parts, Step&& step) {
  if (parts <= 1) {
    for (i64 k = 0; k < steps; ++k) step(k, 0, B);
    return;
  }
  at::parallel_for(0, parts, 1, [&](i64 p0, i64 p1) {
    c10::NoGradGuard no_grad;   // the pool's threads do not inherit the caller's grad mode
    for (i64 part = p0; part < p1; ++part)
      for (i64 k = 0; k < steps; ++k) step(k, B * part / parts, B * (part + 1) / parts);
  });
}


// ---- the per-step products of the generic driver: MKL's packed GEMM ---------------------
// Every ?gemm call reorders its right-hand matrix into MKL's blocked format before it
// multiplies; a recurrence multiplies by the same W_hh at every step. MKL's packed API
// (cblas_sgemm_pack once, cblas_sgemm_compute per step) reorders it once per call: at batch 32
// / hidden 256 (2 threads) a step's product runs at 353 GFLOP/s instead of torch.mm's 236, at
// batch 128 / hidden 1024 at 385 instead of 300. libtorch on x86 Linux carries MKL and exports
// these symbols; they are declared weak, so a torch without them (or float64, which has no
// exported packed API) takes at::mm.
#if defined(__linux__) && defined(LSTMKIT_X86)
extern "C" {
size_t cblas_sgemm_pack_get_size(int identifier, int m, int n, int k) __attribute__((weak));
void cblas_sgemm_pack(int layout, int identifier, int trans, int m, int n, int k, float alpha,
                      const float* src, int ld, float* dest) __attribute__((weak));
void cblas_sgemm_compute(int layout, int transa, int transb, int m, int n, int k,
                         const float* a, int lda, const float* b, int ldb, float beta, float* c,
                         int ldc) __attribute__((weak));
// Plain gemm (Fortran interface, column-major), for the layer's products (see gemm()).
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b,
            const int* ldb, const double* beta, double* c, const int* ldc) __attribute__((weak));
}
bool mkl_packed_gemm() {
  return cblas_sgemm_pack_get_size && cblas_sgemm_pack && cblas_sgemm_compute;
}
bool mkl_gemm() { return sgemm_ && dgemm_; }
#else
bool mkl_packed_gemm() { return false; }
bool mkl_gemm() { return false; }
#endif
// Call MKL's exported routines directly where they are there; tests turn it off to check the
// at::mm fallback as well.
bool use_mkl = true;

// oneDNN's matrix multiply, the one torch.nn.LSTM's fused primitive is built on: libtorch links
// oneDNN in whole and exports ATen's entry to its float32 matmul (out = a @ b into a given
// tensor, plain or transposed operands read in place, single-threaded when called inside a
// parallel region). MKL runs its AVX-512 kernels on Intel CPUs only: on an AMD EPYC (Zen 5,
// 2 threads) its sgemm ran at 160-195 GFLOP/s where oneDNN's ran at 400-450 (the products of
// a training step at batch 128 / hidden 1024), so native.py turns this on off Intel (see
// PRODUCT_LIBRARY there). Float32 only (oneDNN has no float64 matmul on CPUs); the generic
// driver's steps multiply through it too, with no packed form of W_hh to keep (oneDNN caches
// the product's plan, and its kernels reorder blocks of the weights as they go).
}  // namespace
namespace at::native {
TORCH_API void mkldnn_matmul(const Tensor& mat1, const Tensor& mat2, const Tensor& result,
                             float beta, float alpha);
}  // namespace at::native
namespace {
bool use_onednn = false;
// Per-sequence products of fewer floating-point operations than this take MKL even with
// use_onednn: each oneDNN call costs a few microseconds more (a primitive looked up, its memory
// descriptors made). Interleaved medians on the AMD EPYC, training ms with all on oneDNN / from
// 4e6 / from 16e6 / from 64e6 / all on MKL: LSTM batch 1 / hidden 64 0.388 / 0.311 / 0.305 /
// 0.304 / 0.303, 1 / 256 1.860 / 1.735 / 1.754 / 1.744 / 1.759, 8 / 128 1.995 / 1.936 / 1.940 /
// 2.275 / 2.681; GRU 1 / 64 1.029 / 0.795 / 0.785 / 0.774 / 0.781, 8 / 256 5.15 / 5.17 / 5.22 /
// 5.87 / 6.75.
double onednn_min_flops = 16e6;

// out = a @ b (+ out when accumulate) through oneDNN; out, a and b are float32 Tensors (views).
inline void onednn_mm(const Tensor& out, const Tensor& a, const Tensor& b, bool accumulate) {
  at::native::mkldnn_matmul(a, b, out, accumulate ? 1.0f : 0.0f, 1.0f);
}

// Whether oneDNN's matmul runs here: torch built with it, and a CPU it takes float32 on
// (AVX-512, or AVX-NE-CONVERT); checked once, on a small product against the exact result.
bool onednn_works() {
  try {
    Tensor a = at::arange(12, at::kFloat).reshape({3, 4});
    Tensor b = at::arange(20, at::kFloat).reshape({5, 4}).t();
    Tensor out = at::zeros({3, 5}, at::kFloat);
    onednn_mm(out, a, b, false);
    return at::equal(out, at::mm(a, b));
  } catch (const std::exception&) {
    return false;
  }
}

// Row-major views for BLAS: the stride of a dimension of size 1 is arbitrary (and may be
// smaller than BLAS accepts), so a dimension of size 1 counts as unit-stride and a leading
// dimension is never below the row length.
inline bool unit_stride(const Tensor& t, int dim) { return t.size(dim) == 1 || t.stride(dim) == 1; }
// Whether t (2-D) is what BLAS takes as a matrix with dimension `dim` contiguous: its lines along
// the other dimension do not overlap (an expanded tensor's stride 0 would make BLAS read past
// the memory behind it).
inline bool blas_layout(const Tensor& t, int dim) {
  return unit_stride(t, dim) && (t.size(1 - dim) == 1 || t.stride(1 - dim) >= t.size(dim));
}
inline i64 leading(const Tensor& t, int dim) {
  return std::max<i64>(t.stride(dim), t.size(1 - dim));
}

// A matrix in memory as BLAS takes it: `rows` x `cols` elements at p, strides rs and cs (in
// elements); a row range or the transpose of another costs no ATen call.
template <typename S>
struct Strided {
  S* p;
  i64 rows, cols, rs, cs;
  static Strided of(const Tensor& t) {
    return {t.data_ptr<S>(), t.size(0), t.size(1), t.stride(0), t.stride(1)};
  }
  Strided rows_at(i64 r0, i64 n) const { return {p + r0 * rs, n, cols, rs, cs}; }  // as Mat's
  Strided t() const { return {p, cols, rows, cs, rs}; }
  // As BLAS (column-major) sees this matrix's transpose: 'N' with leading dimension rs when its
  // rows are contiguous, 'T' with cs when its columns are; '\0' when neither.
  char trans() const {
    if ((cols == 1 || cs == 1) && (rows == 1 || rs >= cols)) return 'N';
    if ((rows == 1 || rs == 1) && (cols == 1 || cs >= rows)) return 'T';
    return '\0';     // e.g. an expanded input's rows, stride 0: at::mm takes those
  }
  int ld() const { return (int)(trans() == 'N' ? std::max(rs, cols) : std::max(cs, rows)); }
  Tensor tensor() const {
    return at::from_blob(p, {rows, cols}, {rs, cs},
                         at::TensorOptions().dtype(c10::CppTypeToScalarType<S>::value));
  }
};

// A row-major matrix in memory: `rows` rows of `cols` elements, `ld` apart (rows of a larger
// buffer, or some of its columns). The generic driver's per-step operands are these rather
// than Tensor views: a view costs nothing to make, a Tensor narrow an ATen call (about 1.5 us,
// several per step and part).
template <typename S>
struct Mat {
  S* p = nullptr;
  i64 rows = 0, cols = 0, ld = 0;
  Mat rows_at(i64 r0, i64 n) const { return {p + r0 * ld, n, cols, ld}; }
  Mat cols_at(i64 c0, i64 n) const { return {p + c0, rows, n, ld}; }
  S* row(i64 r) const { return p + r * ld; }
  // The same memory as a Tensor (the at::mm fallback).
  Tensor tensor() const { return Strided<S>{p, rows, cols, ld, 1}.tensor(); }
};
template <typename S>
Mat<S> mat(const Tensor& t) {      // a 2-D tensor of unit column stride
  TORCH_CHECK(t.dim() == 2 && blas_layout(t, 1), "mat: rows must be contiguous");
  return {t.data_ptr<S>(), t.size(0), t.size(1), leading(t, 0)};
}
// out = a + b, row by row.
template <typename S>
void add_rows(Mat<S> out, Mat<S> a, Mat<S> b) {
  for (i64 r = 0; r < out.rows; ++r)
    for (i64 c = 0; c < out.cols; ++c) out.row(r)[c] = a.row(r)[c] + b.row(r)[c];
}
template <typename S>
void copy_rows(Mat<S> out, Mat<S> a) {
  if (out.p == a.p) return;
  for (i64 r = 0; r < out.rows; ++r) std::memcpy(out.row(r), a.row(r), out.cols * sizeof(S));
}
// out[0, count) += a[0, count).
template <typename S>
void add_to(S* out, const S* a, i64 count) {
  constexpr int L = Vec<S>::L;
  for_unit_blocks<S>(count, [&](i64 jb, int n) __attribute__((always_inline)) {
    store(out + jb * L, load(out + jb * L, n) + load(a + jb * L, n), n);
  });
}

// out = a @ b, or out = add + a @ b, for the same b (K, N) at every step and at most `rows` rows
// in a.
template <typename S>
class StepProduct {
 public:
  StepProduct(const Tensor& b, i64 rows) : b_(b) {
    onednn_ = std::is_same<S, float>::value && use_onednn;
#if defined(__linux__) && defined(LSTMKIT_X86)
    if (!std::is_same<S, float>::value || onednn_ || !use_mkl || !mkl_packed_gemm()) return;
    constexpr int ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112, B_MATRIX = 162;
    K_ = b.size(0);
    N_ = b.size(1);
    Tensor src = b;
    int trans = NO_TRANS, ld = (int)leading(b, 0);
    if (!blas_layout(b, 1)) {
      if (blas_layout(b, 0)) {
        trans = TRANS;              // b's transpose is row-major: W itself, as given
        ld = (int)leading(b, 1);
      } else {
        src = b.contiguous();
        ld = (int)N_;
      }
    }
    size_t bytes = cblas_sgemm_pack_get_size(B_MATRIX, (int)rows, (int)N_, (int)K_);
    packed_ = pooled_empty({(i64)(bytes / sizeof(float)) + 1}, b.options());
    cblas_sgemm_pack(ROW_MAJOR, B_MATRIX, trans, (int)rows, (int)N_, (int)K_, 1.0f,
                     reinterpret_cast<const float*>(src.data_ptr()),
                     ld, reinterpret_cast<float*>(packed_.data_ptr()));
#endif
  }

  void operator()(Mat<S> out, Mat<S> a, Mat<S> add = {}) const {
    if (onednn_) {
      if (add.p) copy_rows(out, add);
      return onednn_mm(out.tensor(), a.tensor(), b_, add.p != nullptr);
    }
    if (!packed_.defined()) {
      Tensor o = out.tensor();
      if (add.p) at::addmm_out(o, add.tensor(), a.tensor(), b_);
      else at::mm_out(o, a.tensor(), b_);
      return;
    }
#if defined(__linux__) && defined(LSTMKIT_X86)
    constexpr int ROW_MAJOR = 101, NO_TRANS = 111, PACKED = 151;
    if (add.p) copy_rows(out, add);
    cblas_sgemm_compute(ROW_MAJOR, NO_TRANS, PACKED, (int)a.rows, (int)N_, (int)K_,
                        reinterpret_cast<const float*>(a.p), (int)std::max(a.ld, a.cols),
                        reinterpret_cast<const float*>(packed_.data_ptr()), (int)N_,
                        add.p ? 1.0f : 0.0f, reinterpret_cast<float*>(out.p),
                        (int)std::max(out.ld, out.cols));
#endif
  }

 private:
  Tensor b_, packed_;
  i64 K_ = 0, N_ = 0;
  bool onednn_ = false;
};

template <typename S> S* ptr(const Tensor& t) { return t.defined() ? t.data_ptr<S>() : nullptr; }

// f(scalar{}) for the tensor's dtype: float32 or float64.
template <typename F>
auto dispatch(at::ScalarType dtype, F&& f) -> decltype(f(float{})) {
  if (dtype == at::kFloat) return f(float{});
  TORCH_CHECK(dtype == at::kDouble, "native kernels take float32 or float64, got ", dtype);
  return f(double{});
}

#define LSTMKIT_DISPATCH(dtype, ...) \
  dispatch(dtype, [&](auto tag) { using scalar = decltype(tag); return (__VA_ARGS__)(); })

// ==========================================================================================
// LSTM
// ==========================================================================================
//   a = xproj[row] + bias + h W_hh^T;  i, f, o = sigma(a_i, a_f, a_o);  g = tanh(a_g)
//   (xproj = x W_ih^T; the bias b_ih + b_hh is added here, where xproj is read anyway: added
//   into the projection's product, it doubled that product's memory traffic)
//   c = f c_prev + i g;  m = o tanh(c);  h = m (W_hr^T with projection)
// With peepholes p = [p_i | p_f | p_o] (3H): a_i += p_i c_prev, a_f += p_f c_prev, a_o += p_o c.
// The cell's forms (LSTMVariant's, in the bits of `form`, see native.cell_form): CIFG f = 1 - i
// (a_f unused); a removed input, forget or output gate is 1 (Greff et al.'s NIG, NFG, NOG);
// the gates' activation (sigmoid or hard sigmoid), g's (phi) and the output's (psi, in
// m = o psi(c)), each by its code (see gate_activation, cell_activation).
// Zoneout (Krueger et al. 2016, LSTMVariant's zoneout_c and zoneout_h): each unit keeps its
// previous value with its mask's weight z, c = c~ + z_c (c_prev - c~), h = m + z_h (h_prev - m),
// where c~ = f c_prev + i g is the cell above and m = o psi(c~) (peepholes see c~ too). Masks
// (N, H) by row (drawn per call in training) or (1, H) for every row (the expectation in eval).
// With a projection zoneout_h mixes the projected h = m W_hr^T (masks (N or 1, P)), on the
// generic driver.
// Full gate recurrence (Greff et al.'s FGR, LSTMVariant's full_gate_recurrence): a_{i,f,o} +=
// q_{t-1} W_gg^T, q = the previous step's [i | f | o] as applied (q0 first); generic driver.
// Saved: gates (N, 4H) activated, cells (N, H) (c, after zoneout).
constexpr int GATE_CIFG = 1, NO_INPUT_GATE = 2, NO_FORGET_GATE = 4, NO_OUTPUT_GATE = 8;
constexpr int HARD_SIGMOID_GATES = 16, CELL_ACTIVATION_SHIFT = 5, OUTPUT_ACTIVATION_SHIFT = 7;
struct CellForm {
  int gate, cell, output;       // activation codes
  explicit CellForm(int form)
      : gate((form & HARD_SIGMOID_GATES) ? 1 : 0), cell((form >> CELL_ACTIVATION_SHIFT) & 3),
        output((form >> OUTPUT_ACTIVATION_SHIFT) & 3) {}
};

// A zoneout mask (see above): rows of `stride` units, stride 0 for one row for every row.
template <typename S>
struct ZoneoutMask {
  const S* p = nullptr;
  i64 stride = 0;
  ZoneoutMask() = default;
  explicit ZoneoutMask(const Tensor& mask)
      : p(ptr<S>(mask)), stride(mask.defined() && mask.size(0) > 1 ? mask.size(1) : 0) {}
  explicit operator bool() const { return p != nullptr; }
  __attribute__((always_inline)) inline V<S> at(i64 row, i64 j, int n) const {
    return load(p + row * stride + j, n);
  }
  // fresh + z (previous - fresh): zoneout's state, computed as torch.lerp does (from the
  // nearer end), so that a unit whose mask is 1 keeps exactly its previous value; fresh itself
  // without a mask.
  __attribute__((always_inline)) inline V<S> mix(i64 row, i64 j, V<S> fresh, V<S> previous,
                                                 int n) const {
    if (!p) return fresh;
    const V<S> z = at(row, j, n), d = previous - fresh;
    return z < S(0.5) ? fresh + z * d : previous - d * (S(1) - z);
  }
  // mix's backward for a state carried to the next step: dh (the gradient arriving at the mixed
  // state) plus the share the next step left in `carry`; keeps z of it in `carry` for the step
  // before and returns the rest, fresh's. (With a mask only.)
  __attribute__((always_inline)) inline V<S> split(i64 row, i64 j, V<S> dh, S* carry,
                                                   int n) const {
    const V<S> all = dh + load(carry, n), kept = all * at(row, j, n);
    store(carry, kept, n);
    return all - kept;
  }
};

// Recurrent dropout (Gal and Ghahramani 2016, LSTMVariant's recurrent_dropout): each step's
// product reads h d instead of h, with one mask d (B, P) (already scaled by 1 / keep) for the
// whole sequence. The drivers' operand buffers then hold h d, and the state h itself (the
// output, h_T, zoneout's h_prev) is kept in `h` (B, P).
template <typename S>
struct RecurrentDropout {
  const S* d = nullptr;
  S* h = nullptr;
  i64 P = 0;
  explicit operator bool() const { return d != nullptr; }
  // Where row b's previous h is at unit j: the state, or the operand itself (`operand`, at
  // row b, unit j) without dropout.
  __attribute__((always_inline)) inline const S* previous(i64 b, i64 j, const S* operand) const {
    return d ? h + b * P + j : operand;
  }
  // The new h m of row b at unit j, kept as the state; returns the operand, m d (m without).
  __attribute__((always_inline)) inline V<S> operand(i64 b, i64 j, V<S> m, int n) const {
    if (!d) return m;
    store(h + b * P + j, m, n);
    return m * load(d + b * P + j, n);
  }
  // h0's operand: h0 d, or h0 itself.
  Tensor initial(const Tensor& h0, const Tensor& mask) const {
    return d ? at::mul(h0, mask) : h0;
  }
};

// torch.nn's cell in float, every gate a ratio: i = 1 / D_i, f = 1 / D_f, o = 1 / D_o
// (D = 1 + e^-a), g = N_g / D_g, tanh(c) = N_c / D_c, and
//   c = f c_prev + i g = (c_prev D_i D_g + N_g D_f) / (D_f D_i D_g),   h = N_c / (D_o D_c):
// two divisions instead of five (the LSTM cell in a C++ loop over 16 rows x 256 units 1.19 ->
// 1.08 ns per unit). With `saved` (the (4H) gates row at this block, for the backward) each gate
// is divided out as well; c and h are the same either way, so inference and training give
// the same bits. h clamped to [-1, 1] as tanh is.
// W consecutive unit blocks at once (a[w] their pre-activations [i, f, g, o], c and saved at
// the first one's units), each statement for all W: independent chains of ~100 instructions
// the core overlaps, where one block at a time waited on its divisions' latency. W = 2 against
// one block at a time, forward, interleaved medians: batch 32 / hidden 128 0.970, 64 / 128
// 0.969, 32 / 512 0.992 (W = 4 in a first version: 0.962, 0.978, 0.995, and 64 / 512 1.013).
// With zoneout_c (`zone`, row `row`, the first block at unit j) the state c keeps
// c~ + z (c_prev - c~), and h's tanh reads c~. `streaming`: the saved gates take stream().
template <int W>
__attribute__((always_inline)) inline void ratio_cells(const V<float> (&a)[W][4], float* c,
                                                       int n, float* saved, i64 H,
                                                       V<float> (&m)[W],
                                                       const ZoneoutMask<float>& zone, i64 row,
                                                       i64 j, bool streaming) {
  constexpr int L = Vec<float>::L;
  V<float> d_i[W], d_f[W], d_o[W], cn[W];
  Ratio g[W];
  for (int w = 0; w < W; ++w) {
    d_i[w] = sigmoid_denominator(a[w][0]);
    d_f[w] = sigmoid_denominator(a[w][1]);
    d_o[w] = sigmoid_denominator(a[w][3]);
    g[w] = tanh_ratio(a[w][2]);
  }
  for (int w = 0; w < W; ++w) {
    V<float> d_ig = d_i[w] * g[w].den;
    const V<float> c_prev = load(c + w * L, n);
    cn[w] = (c_prev * d_ig + g[w].num * d_f[w]) / (d_f[w] * d_ig);
    store(c + w * L, zone.mix(row, j + w * L, cn[w], c_prev, n), n);
  }
  if (saved) {
    const V<float> one = splat(1.0f);
    for (int w = 0; w < W; ++w) {
      float* sw = saved + w * L;
      put(streaming, sw, one / d_i[w], n);
      put(streaming, sw + H, one / d_f[w], n);
      put(streaming, sw + 2 * H, clamp_keeping_nan(g[w].num / g[w].den, -1.0f, 1.0f), n);
      put(streaming, sw + 3 * H, one / d_o[w], n);
    }
  }
  for (int w = 0; w < W; ++w) {
    Ratio t = tanh_ratio(cn[w]);
    m[w] = clamp_keeping_nan(t.num / (d_o[w] * t.den), -1.0f, 1.0f);
  }
}

// Layer norm (Ba et al. 2016, LSTMVariant's layer_norm) inside the step, over one row at a
// time: the recurrent product v = r W_hh^T over its 4H values, LN_hh(v) = gain (v - mean) rstd
// + beta with rstd = 1 / sqrt(var + eps), before the input part and the biases are added; and
// the cell c~ over its H values before psi, m = o psi(LN_c(c~)) (the state and the output
// peephole keep c~). The input's LN_ih(x W_ih^T) is one sequence-wide torch call before the
// loop (lstm_variants.py), as the parameters' gradients are after it. A row's whole product
// is needed first, so only the generic driver (MKL's step products, the gate math by rows)
// runs it. Saved for the backward unless nothing will need one (N rows): the product before
// LN (h_pre, 4H), c~ (cand), s = psi(LN_c(c~)), and each LN's mean and rstd.
template <typename S>
struct LayerNorms {
  const S* gain_h = nullptr; const S* beta_h = nullptr;      // (4H), either may be absent
  const S* gain_c = nullptr; const S* beta_c = nullptr;      // (H)
  S eps = 0;                                                 // the forward's: LSTMVariant's
  S* h_pre = nullptr; S* mean_h = nullptr; S* rstd_h = nullptr;   // saved, or none
  S* cand = nullptr; S* s = nullptr; S* mean_c = nullptr; S* rstd_c = nullptr;
  S* scratch = nullptr;      // (B, 2H): c~ and o of a row when nothing is saved
  i64 H = 0;
  explicit operator bool() const { return H != 0; }

  static __attribute__((always_inline)) inline V<S> gain(const S* g, i64 j, int n) {
    return g ? load(g + j, n) : splat(S(1));
  }
  // Sum of the lanes below n.
  static __attribute__((always_inline)) inline S lanes_sum(V<S> v, int n) {
    S total = 0;
    for (int i = 0; i < n; ++i) total += v[i];
    return total;
  }
  // mean and rstd of v[0, count), two passes (the deviations summed, not the squares).
  static void moments(const S* v, i64 count, S eps, S& mean, S& rstd) {
    constexpr int L = Vec<S>::L;
    V<S> acc{};
    S total = 0;
    for_unit_blocks<S>(count, [&](i64 jb, int n) __attribute__((always_inline)) {
      if (n == L) acc += load(v + jb * L, n);
      else total += lanes_sum(load(v + jb * L, n), n);
    });
    mean = (total + lanes_sum(acc, L)) / S(count);
    const V<S> mv = splat(mean);
    V<S> sq{};
    total = 0;
    for_unit_blocks<S>(count, [&](i64 jb, int n) __attribute__((always_inline)) {
      const V<S> d = load(v + jb * L, n) - mv;
      if (n == L) sq += d * d;
      else total += lanes_sum(d * d, n);
    });
    rstd = S(1) / std::sqrt((total + lanes_sum(sq, L)) / S(count) + eps);
  }
  // out[0, F) = gain (v - mean) rstd + beta; out may be v.
  static void normalize(const S* v, i64 F, S mean, S rstd, const S* g, const S* beta, S* out) {
    constexpr int L = Vec<S>::L;
    const V<S> mv = splat(mean), rv = splat(rstd);
    for_unit_blocks<S>(F, [&](i64 jb, int n) __attribute__((always_inline)) {
      const i64 j = jb * L;
      store(out + j, (load(v + j, n) - mv) * rv * gain(g, j, n) + load_bias(beta, j, n), n);
    });
  }
  // The gradient reaching v[0, F) given d, the gradient of normalize's out:
  //   dv = rstd (e - mean(e) - x mean(e x)),  e = d gain,  x = (v - mean) rstd.
  // dv may be d. (Lanes past the row are zeros in d, so in both sums.)
  static void normalize_backward(const S* d, const S* v, i64 F, S mean, S rstd, const S* g,
                                 S* dv) {
    constexpr int L = Vec<S>::L;
    const V<S> mv = splat(mean), rv = splat(rstd);
    V<S> sum_e{}, sum_ex{};
    for_unit_blocks<S>(F, [&](i64 jb, int n) __attribute__((always_inline)) {
      const i64 j = jb * L;
      const V<S> e = load(d + j, n) * gain(g, j, n);
      sum_e += e;
      sum_ex += e * ((load(v + j, n) - mv) * rv);
    });
    const V<S> me = splat(lanes_sum(sum_e, L) / S(F)), mex = splat(lanes_sum(sum_ex, L) / S(F));
    for_unit_blocks<S>(F, [&](i64 jb, int n) __attribute__((always_inline)) {
      const i64 j = jb * L;
      const V<S> e = load(d + j, n) * gain(g, j, n);
      store(dv + j, rv * (e - me - (load(v + j, n) - mv) * rv * mex), n);
    });
  }
  // Row `row` of the step product v (4H), normalised in place; v saved first when training.
  void normalize_product(S* v, i64 row) const {
    S mean, rstd;
    moments(v, 4 * H, eps, mean, rstd);
    if (h_pre) {
      std::memcpy(h_pre + row * 4 * H, v, 4 * H * sizeof(S));
      mean_h[row] = mean;
      rstd_h[row] = rstd;
    }
    normalize(v, 4 * H, mean, rstd, gain_h, beta_h, v);
  }
  // Where row b (global `row`) keeps its c~ and o (H each) between the cell and its output.
  S* cand_row(i64 b, i64 row) const { return cand ? cand + row * H : scratch + b * 2 * H; }
  S* o_row(i64 b, S* saved_gates_row) const {
    return saved_gates_row ? saved_gates_row + 3 * H : scratch + b * 2 * H + H;
  }
};

template <typename S>
struct LSTMForwardGates {
  const S* xproj; const S* bias; S* c; S* gates; S* cells; i64 H;
  const S* peep = nullptr;                                   // (3H) peephole weights, or none
  int form = 0;                                              // the cell's form, see CellForm
  ZoneoutMask<S> zone_c, zone_h;                             // zoneout, or none
  LayerNorms<S> ln;                                          // layer norm, or none
  S* q_state = nullptr;      // full gate recurrence: (B, 3H), each row's [i | f | o] as applied
  // Global row `row` reads xproj's row (row & xproj_rows_mask): all ones for a projection of
  // every row, the ring's size - 1 for the fused driver's ring (see lstm_forward).
  i64 xproj_rows_mask = ~i64(0);
  bool stream_saved = false;        // the saved gates and cells take stream() (read after the loop)
  // Zoneout's h for the block at unit j of global row `row`: m itself without zoneout_h, else
  // mixed with the row's previous h (h_prev, the block's units). The drivers call it on
  // every block's result.
  __attribute__((always_inline)) inline V<S> zoned_h(i64 row, i64 j, V<S> m, const S* h_prev,
                                                     int n) const {
    return zone_h ? zone_h.mix(row, j, m, load(h_prev, n), n) : m;
  }
  // Pre-activations of row b (global row `row`), block jb -> writes c and the saved tensors,
  // returns m = o tanh(c) for the block. torch.nn's cell (with zoneout's masks, if any) takes a
  // straight-line copy inlined into the drivers' loops: the general one, branching on the form,
  // kept the compiler from inlining it and spilled registers (LSTM forward batch 32 / hidden
  // 256: 16% of the time).
  // W consecutive unit blocks from jb: acc[w] the products for block jb + w, m[w] its result;
  // n: the blocks' width, min(L, H - jb L) (L for all when W > 1; see for_unit_blocks).
  template <int W>
  __attribute__((always_inline)) inline void cell_blocks(i64 b, i64 row, i64 jb,
                                                         const V<S> (&acc)[W][4], int n,
                                                         V<S> (&m)[W]) const {
    if (form == 0 && !peep && !q_state) return standard<W>(b, row, jb, acc, n, m);
    for (int w = 0; w < W; ++w) m[w] = general(b, row, jb + w, acc[w]);
  }
  // The cell over every unit block of row b (global row `row`), two full blocks at a time (see
  // for_unit_block_pairs): product(jb, q, n) is block jb's product for gate q, and done(jb, m, n)
  // takes the block's result.
  template <typename Product, typename Done>
  __attribute__((always_inline)) inline void row_cells(i64 b, i64 row, Product&& product,
                                                       Done&& done) const {
    if (ln) return layer_norm_row_cells(b, row, product, done);
    for_unit_block_pairs<S>(H, [&](i64 jb, auto blocks, int n) __attribute__((always_inline)) {
      constexpr int W = decltype(blocks)::value;
      V<S> acc[W][4], m[W];
      for (int w = 0; w < W; ++w)
        for (int q = 0; q < 4; ++q) acc[w][q] = product(jb + w, q, n);
      cell_blocks<W>(b, row, jb, acc, n, m);
      for (int w = 0; w < W; ++w) done(jb + w, m[w], n);
    });
  }
  __attribute__((always_inline)) inline V<S> operator()(i64 b, i64 row, i64 jb, const V<S>* acc,
                                                         int n) const {
    V<S> one[1][4] = {{acc[0], acc[1], acc[2], acc[3]}}, m[1];
    cell_blocks<1>(b, row, jb, one, n, m);
    return m[0];
  }
  template <int W>
  __attribute__((always_inline)) inline void standard(i64 b, i64 row, i64 jb,
                                                      const V<S> (&acc)[W][4], int n,
                                                      V<S> (&m)[W]) const {
    constexpr int L = Vec<S>::L;
    const i64 j = jb * L;
    const S* x = xproj ? xproj + (row & xproj_rows_mask) * 4 * H : nullptr;
    S* cb = c + b * H + j;
    V<S> a[W][4];
    for (int w = 0; w < W; ++w)
      for (int q = 0; q < 4; ++q) a[w][q] = acc[w][q] + load_bias(bias, q * H + j + w * L, n);
    if (x)                                                  // none: the input is in acc
      for (int w = 0; w < W; ++w)
        for (int q = 0; q < 4; ++q) a[w][q] += load(x + q * H + j + w * L, n);
    S* gr = gates ? gates + row * 4 * H + j : nullptr;
    if constexpr (std::is_same_v<S, float>) {
      ratio_cells<W>(a, cb, n, gr, H, m, zone_c, row, j, stream_saved);
      if (gates)
        for (int w = 0; w < W; ++w)
          put(stream_saved, cells + row * H + j + w * L, load(cb + w * L, n), n);
    } else {
      for (int w = 0; w < W; ++w) {
        V<S> i = vsigmoid(a[w][0]), f = vsigmoid(a[w][1]), g = vtanh(a[w][2]);
        V<S> o = vsigmoid(a[w][3]);
        S* cw = cb + w * L;
        const V<S> c_prev = load(cw, n), cn = f * c_prev + i * g;
        const V<S> c_state = zone_c.mix(row, j + w * L, cn, c_prev, n);
        store(cw, c_state, n);
        if (gates) {
          S* gw = gr + w * L;
          put(stream_saved, gw, i, n); put(stream_saved, gw + H, f, n);
          put(stream_saved, gw + 2 * H, g, n); put(stream_saved, gw + 3 * H, o, n);
          put(stream_saved, cells + row * H + j + w * L, c_state, n);
        }
        m[w] = o * vtanh(cn);
      }
    }
  }
  __attribute__((noinline)) V<S> general(i64 b, i64 row, i64 jb, const V<S>* acc) const {
    V<S> o;
    const V<S> cn = cell(b, row, jb, acc, o);
    return o * cell_activation<S>(CellForm(form).output, cn);
  }
  // With layer norm: first every block's cell (c~ and o kept, see LayerNorms), then c~'s mean
  // and rstd over the row, then each block's m = o psi(LN_c(c~)) to done(jb, m, n).
  template <typename Product, typename Done>
  void layer_norm_row_cells(i64 b, i64 row, Product&& product, Done&& done) const {
    constexpr int L = Vec<S>::L;
    S* cand = ln.cand_row(b, row);
    S* o_row = ln.o_row(b, gates ? gates + row * 4 * H : nullptr);
    for_unit_blocks<S>(H, [&](i64 jb, int n) __attribute__((always_inline)) {
      V<S> acc[4], o;
      for (int q = 0; q < 4; ++q) acc[q] = product(jb, q, n);
      store(cand + jb * L, cell(b, row, jb, acc, o), n);
      if (!gates) store(o_row + jb * L, o, n);
    });
    S mean, rstd;
    LayerNorms<S>::moments(cand, H, ln.eps, mean, rstd);
    if (ln.mean_c) {
      ln.mean_c[row] = mean;
      ln.rstd_c[row] = rstd;
    }
    const int output = CellForm(form).output;
    const V<S> mv = splat(mean), rv = splat(rstd);
    for_unit_blocks<S>(H, [&](i64 jb, int n) __attribute__((always_inline)) {
      const i64 j = jb * L;
      const V<S> normal = (load(cand + j, n) - mv) * rv * LayerNorms<S>::gain(ln.gain_c, j, n) +
                          load_bias(ln.beta_c, j, n);
      const V<S> s = cell_activation<S>(output, normal);
      if (ln.s) store(ln.s + row * H + j, s, n);
      done(jb, load(o_row + j, n) * s, n);
    });
  }
  // The cell of block jb of row b (global `row`) for the general forms: stores the state c
  // (after zoneout), the gates full gate recurrence reads at the next step and, when saving,
  // the gates and cells; returns c~ and o.
  __attribute__((always_inline)) inline V<S> cell(i64 b, i64 row, i64 jb, const V<S>* acc,
                                                  V<S>& o_out) const {
    constexpr int L = Vec<S>::L;
    i64 j = jb * L;
    int n = (int)std::min<i64>(L, H - j);
    const S* x = xproj ? xproj + (row & xproj_rows_mask) * 4 * H : nullptr;  // none: in acc
    S* cb = c + b * H + j;
    V<S> c_prev = load(cb, n);
    V<S> a_i = acc[0] + load_bias(x, j, n) + load_bias(bias, j, n);
    V<S> a_f = acc[1] + load_bias(x, H + j, n) + load_bias(bias, H + j, n);
    V<S> a_o = acc[3] + load_bias(x, 3 * H + j, n) + load_bias(bias, 3 * H + j, n);
    if (peep) {
      a_i += load(peep + j, n) * c_prev;
      a_f += load(peep + H + j, n) * c_prev;
    }
    const V<S> one = splat(S(1));
    const CellForm act(form);
    V<S> i = (form & NO_INPUT_GATE) ? one : gate_activation<S>(act.gate, a_i);
    V<S> f = (form & GATE_CIFG) ? one - i
             : (form & NO_FORGET_GATE) ? one : gate_activation<S>(act.gate, a_f);
    V<S> g = cell_activation<S>(act.cell,
                             acc[2] + load_bias(x, 2 * H + j, n) + load_bias(bias, 2 * H + j, n));
    V<S> cn = f * c_prev + i * g;
    if (peep) a_o += load(peep + 2 * H + j, n) * cn;
    V<S> o = (form & NO_OUTPUT_GATE) ? one : gate_activation<S>(act.gate, a_o);
    const V<S> c_state = zone_c.mix(row, j, cn, c_prev, n);
    store(cb, c_state, n);
    if (q_state) {
      S* qr = q_state + b * 3 * H + j;
      store(qr, i, n); store(qr + H, f, n); store(qr + 2 * H, o, n);
    }
    if (gates) {
      S* gr = gates + row * 4 * H + j;
      put(stream_saved, gr, i, n); put(stream_saved, gr + H, f, n);
      put(stream_saved, gr + 2 * H, g, n); put(stream_saved, gr + 3 * H, o, n);
      put(stream_saved, cells + row * H + j, c_state, n);
    }
    o_out = o;
    return cn;
  }
};

// h_prev (N, P), the previous rows of the output (see previous_rows), made by the fused and
// own-product drivers as they go: each step's output row b is also stored as row b of the step
// processed next, where that row is active (in registers, instead of a pass over all N rows after
// the loop: 10-20 us of a training step at batch 1-8 on the calling thread); here, the rows
// whose sequence starts at their step, h0's.
template <typename S>
struct PreviousRows {
  Tensor rows;                  // h_prev, undefined when not wanted
  const Steps* st;
  i64 P;

  PreviousRows(bool wanted, const Tensor& h0, const Steps& steps)
      : st(&steps), P(h0.size(1)) {
    if (!wanted) return;
    rows = pooled_empty({steps.rows, P}, h0.options());
    const S* init = ptr<S>(h0);
    for (i64 s = 0; s < steps.count(); ++s) {
      const i64 t = steps.order[s], begun = s ? steps.size[steps.order[s - 1]] : 0;
      for (i64 b = begun; b < steps.size[t]; ++b)
        std::memcpy(ptr<S>(rows) + (steps.offset[t] + b) * P, init + b * P, P * sizeof(S));
    }
  }
  // Where processing step s stores its row b's h (row b of the next step's rows), and how many
  // of its rows go there; nullptr, 0 when none.
  std::pair<S*, i64> next(i64 s) const {
    if (!rows.defined() || s + 1 >= st->count()) return {nullptr, 0};
    const i64 u = st->order[s + 1];
    return {ptr<S>(rows) + st->offset[u] * P, st->size[u]};
  }
};

// With w_ih (generic driver, no projection), `xproj` is the input x (N, I) itself and each step
// multiplies [x_t | h] by [W_ih | W_hh]^T ("input in the step"): the same products as the
// projection of all steps before the loop, but the (N, 4H) projection is never written out and
// read back (13 MB at batch 32 / hidden 256 / length 100, mostly from DRAM after other work).
template <typename S>
std::vector<Tensor> lstm_forward(const Tensor& xproj, const Tensor& bias, const Tensor& h0,
                                 const Tensor& c0,
                                 const Tensor& w_hh, const c10::optional<Tensor>& w_hr_opt,
                                 const Steps& st, bool save, i64 parts, const Tensor& w_ih,
                                 bool own_product, const Tensor& peephole, int cell_form,
                                 const Tensor& zoneout_h, const Tensor& zoneout_c,
                                 const Tensor& recurrent_mask,
                                 const LayerNorms<S>& layer_norms = {},
                                 const Tensor& w_gate = {}, const Tensor& q0 = {}) {
  constexpr int L = Vec<S>::L;
  const i64 H = c0.size(1), P = h0.size(1), B = st.batch, N = st.rows;
  const i64 I = w_ih.defined() ? w_ih.size(1) : 0;
  TORCH_CHECK(!(layer_norms || w_gate.defined()) || (parts > 0 && !own_product && !I),
              "lstm_forward: layer norm and full gate recurrence run on the generic driver with "
              "MKL's step products, the input projected first");
  TORCH_CHECK(!zoneout_h.defined() || !w_hr_opt.has_value() || (parts > 0 && !own_product),
              "lstm_forward: zoneout_h with a projection runs on the generic driver");
  Tensor h_state = recurrent_mask.defined() ? pooled_clone(h0) : Tensor();
  const RecurrentDropout<S> drop{ptr<S>(recurrent_mask), ptr<S>(h_state), P};
  const Tensor h0_operand = drop.initial(h0, recurrent_mask);
  Tensor w_hr = w_hr_opt.has_value() ? w_hr_opt->contiguous() : Tensor();
  TORCH_CHECK(!I || (!w_hr.defined() && xproj.size(1) == I),
              "lstm_forward: the input x itself needs a layer without projection");
  Tensor out = pooled_empty({N, P}, xproj.options());
  Tensor gates = save ? pooled_empty({N, 4 * H}, xproj.options()) : Tensor();
  Tensor cells = save ? pooled_empty({N, H}, xproj.options()) : Tensor();
  Tensor c = pooled_clone(c0);
  LSTMForwardGates<S> gate_math{I ? nullptr : ptr<S>(xproj), ptr<S>(bias), ptr<S>(c),
                                ptr<S>(gates), ptr<S>(cells), H, ptr<S>(peephole), cell_form,
                                ZoneoutMask<S>(zoneout_c), ZoneoutMask<S>(zoneout_h),
                                layer_norms};
  gate_math.stream_saved = streams(gates) && !layer_norms;   // layer norm reads o back
  S* o_ptr = ptr<S>(out);
  const i64 J = (H + L - 1) / L;
  if (parts == 0 && !w_hr.defined()) {
    const PreviousRows<S> previous(save, h0, st);
    Tensor packed = packed_empty<S>(4, H, P, xproj.options());   // packed in step -1
    Tensor hbuf = state_pair(h0_operand);
    S* hb = ptr<S>(hbuf);
    const S* wp = ptr<S>(packed);
    i64 workers = worker_count(J, 8 * B * H * P);
    Chunking<S> chunks(B, J, 4, P, xproj.options());
    // Step -1 of run_steps below: each worker packs its own unit blocks of W_hh (and W_ih),
    // the ones it reads at every step, so they start out in its core's cache. (Packing there
    // rather than in a parallel region of its own, and W_ih on one thread: forward at batch 1,
    // length 100, new / old 0.94 at hidden 96 and 128, 0.95-0.97 at 256, training 0.97-0.98;
    // batch 2-8 unchanged.) With the input x (N, I) itself, each worker projects x onto its
    // blocks' columns (made by MKL across both cores, half of each worker's columns came from
    // the other core's cache): at step 0 for all steps, or, for a long sequence, `chunk_steps`
    // steps at a time at the first step of each chunk, into a ring of `ring` rows (global row r
    // in ring row r & (ring - 1)), so that the rows it reads stay in its cache beside the
    // weights (see fused_projection_rows).
    Tensor projection, packed_ih;
    const bool in_ring = N * 4 * H * (i64)sizeof(S) > fused_projection_ring_bytes;
    const i64 chunk_steps = in_ring ? std::max<i64>(1, fused_projection_rows / B) : st.count();
    i64 ring = 1;                       // a power of two, at least a chunk's rows
    while (ring < std::min(N, chunk_steps * B)) ring *= 2;
    const i64 rows_mask = in_ring ? ring - 1 : ~i64(0);
    if (I) {
      projection = pooled_empty({in_ring ? ring : N, 4 * H}, xproj.options());
      packed_ih = packed_empty<S>(4, H, I, xproj.options());
      gate_math.xproj = ptr<S>(projection);
      gate_math.xproj_rows_mask = rows_mask;
    }
    S* pp = ptr<S>(projection);
    const S* wip = ptr<S>(packed_ih);
    const S* xp = ptr<S>(xproj);
    c10::optional<Chunking<S>> input_chunks;
    if (I) input_chunks.emplace(std::min(N, chunk_steps * B), J, 4, I, xproj.options());
    // The projection of the chunk that starts at step s, for unit blocks [jb0, jb1): the
    // chunk's steps hold consecutive rows, in either order.
    auto project_chunk = [&](i64 s, i64 jb0, i64 jb1) {
      const i64 first = st.order[s], last = st.order[std::min(st.count(), s + chunk_steps) - 1];
      const i64 r0 = std::min(st.offset[first], st.offset[last]);
      const i64 r1 = std::max(st.offset[first] + st.size[first], st.offset[last] + st.size[last]);
      rows_times_blocks<S, 4>(xp + r0 * I, I, I, wip, r1 - r0, jb0, jb1, &*input_chunks,
                              [&](i64 row, i64 jb, const V<S>* acc) {
        i64 j = jb * L;
        int n = (int)std::min<i64>(L, H - j);
        S* out_row = pp + ((r0 + row) & rows_mask) * 4 * H;
        for (int q = 0; q < 4; ++q) store(out_row + q * H + j, acc[q], n);
      });
    };
    // At batch 1 each worker begins a step with the product over its own units of h (see
    // run_steps), kept in `begun_sums` (J, 4) until the rest of h has come from the other
    // cores; each worker's share is one piece, so one call of step() does all of it.
    // Interleaved medians, forward at batch 1, new / old at lengths 1000 (1.4-5.1 us per step
    // before) and 100: hidden 96 0.92 / 0.92-0.95, 128 0.94-0.95 / 0.97, 256 0.93 / 0.94-0.96.
    const bool begin_steps = B == 1 && workers > 1 && !chunks.partial();
    std::vector<V<S>> begun_sums(begin_steps ? J * 4 : 0);
    // The product over units [k0, k1) of h for block jb, added to acc.
    auto product_part = [&](const S* h, i64 jb, i64 k0, i64 k1, V<S>* acc) {
      if (k1 <= k0) return;
      V<S> part[1][4];
      block_product<S, 1, 4>(h + k0, P, k1 - k0, wp + (jb * P + k0) * 4 * L, L, 4 * L, part);
      for (int q = 0; q < 4; ++q) acc[q] += part[0][q];
    };
    auto own_units = [&](Begun begun) {
      return std::pair<i64, i64>{begun.jb0 * L, std::min(H, begun.jb1 * L)};
    };
    auto begin = [&](i64 s, i64 jb0, i64 jb1) {
      if (!begin_steps || s-- == 0) return false;
      const S* h_read = hb + (s % 2) * P;
      auto [k0, k1] = own_units(Begun{jb0, jb1});
      for (i64 jb = jb0; jb < jb1; ++jb) {
        V<S>* acc = &begun_sums[jb * 4];
        for (int q = 0; q < 4; ++q) acc[q] = V<S>{};
        product_part(h_read, jb, k0, k1, acc);
      }
      return true;
    };
    const i64 piece = begin_steps ? (J + workers - 1) / workers : 2;
    run_steps(workers, J, st.count() + 1, piece,
              [&](i64 s, i64 jb0, i64 jb1, Begun begun) {
      if (s-- == 0) {
        pack_blocks<S>(ptr<S>(packed), w_hh, 4, H, P, P, 0, H * P, P, 1, jb0, jb1);
        if (I) pack_blocks<S>(ptr<S>(packed_ih), w_ih, 4, H, I, I, 0, H * I, I, 1, jb0, jb1);
        return;
      }
      // The steps of a chunk read the ring rows made at its first step; the next chunk's
      // overwrite them only after all of its pieces are done (run_steps' steps are in order).
      if (I && s % chunk_steps == 0) project_chunk(s, jb0, jb1);
      i64 t = st.order[s], bs = st.size[t], off = st.offset[t];
      const S* h_read = hb + (s % 2) * B * P;
      S* h_write = hb + ((s + 1) % 2) * B * P;
      const auto [h_next, next_rows] = previous.next(s);
      auto epilogue = [&](i64 b, i64 jb, const V<S>* acc) {
        i64 j = jb * L;
        at_width<S>(H, j, [&](int n) __attribute__((always_inline)) {
          V<S> m = gate_math.zoned_h(off + b, j, gate_math(b, off + b, jb, acc, n),
                                     drop.previous(b, j, h_read + b * P + j), n);
          store(h_write + b * P + j, drop.operand(b, j, m, n), n);
          store(o_ptr + (off + b) * P + j, m, n);
          if (b < next_rows) store(h_next + b * P + j, m, n);
        });
      };
      if (begin_steps) {
        // The piece is its owner's whole share. Its sums in the same order whether the step
        // was begun (the owner's own units of h, in begun_sums) or not (step 0, after a theft,
        // or taken by another worker): the bits do not depend on the threads' timing.
        auto [k0, k1] = own_units(Begun{jb0, jb1});
        const bool was_begun = begun.contains(jb0);
        for (i64 jb = jb0; jb < jb1; ++jb) {
          V<S> fresh[4] = {};
          V<S>* acc = was_begun ? &begun_sums[jb * 4] : fresh;
          if (!was_begun) product_part(h_read, jb, k0, k1, acc);
          product_part(h_read, jb, 0, k0, acc);         // the rest of h: its other units
          product_part(h_read, jb, k1, P, acc);
          epilogue(0, jb, acc);
        }
      } else {
        rows_times_blocks<S, 4>(h_read, P, P, wp, bs, jb0, jb1, &chunks, epilogue);
      }
      for (i64 b = bs; b < B; ++b) {                  // inactive rows keep their state
        i64 j0 = std::min(H, jb0 * L), j1 = std::min(H, jb1 * L);
        std::memcpy(h_write + b * P + j0, h_read + b * P + j0, (j1 - j0) * sizeof(S));
      }
    }, begin);
    Tensor h_T = drop ? pooled_clone(h_state) : state_of(hbuf, st.count() % 2);
    return {out, h_T, c, gates, cells, Tensor(), previous.rows};
  }
  const S* x = ptr<S>(xproj);
  if (own_product && !w_hr.defined()) {
    // Row parts, each step's product our register-blocked one with the gate math in its
    // epilogue (see _own_step_product in native.py): z = [x_t | h] (B, K) twice, read at step s
    // from z[s % 2], the new h written into z[(s + 1) % 2].
    const i64 K = I + P;
    Tensor packed = I ? pack_side_by_side<S>(w_ih.contiguous(), w_hh.contiguous(), 4, H)
                      : pack<S>(w_hh, 4, H, K, H * K, K, 1);
    Tensor zbuf = pooled_empty({2, B, K}, xproj.options());
    zbuf[0].narrow(1, I, P).copy_(h0_operand);
    zbuf[1].narrow(1, I, P).copy_(h0_operand);
    S* zb = ptr<S>(zbuf);
    const S* wp = ptr<S>(packed);
    Chunking<S> chunks(B, J, 4, K, xproj.options());
    Tensor pre_buf = pooled_empty({B * J * 4 * L}, xproj.options());
    const PreviousRows<S> previous(save, h0, st);
    run_row_parts(st.count(), B, parts, [&](i64 s, i64 r0, i64 r1) {
      i64 t = st.order[s], off = st.offset[t], e = std::min(r1, st.size[t]);
      S* z_read = zb + (s % 2) * B * K;
      S* z_write = zb + ((s + 1) % 2) * B * K;
      const auto [h_next, next_rows] = previous.next(s);
      for (i64 b = r0; b < e && I; ++b)
        std::memcpy(z_read + b * K, x + (off + b) * I, I * sizeof(S));
      if (e > r0) {
        FlushDenormals ftz;
        // The products first, kept in `pre` (B, J, 4, L), then the gate math four unit blocks
        // an iteration, independent chains the core interleaves, as in the generic driver
        // (instead of each (row, block)'s gate math right after its product: forward 8 / 64
        // 0.96-0.99, 8 / 128 0.945-0.96, 16 / 64 0.96, 16 / 128 0.97; training 0.98-0.99).
        V<S>* pre = reinterpret_cast<V<S>*>(ptr<S>(pre_buf));
        rows_times_blocks<S, 4>(z_read + r0 * K, K, K, wp, e - r0, 0, J, &chunks,
                                [&](i64 rb, i64 jb, const V<S>* acc) {
          V<S>* slot = pre + ((r0 + rb) * J + jb) * 4;
          for (int q = 0; q < 4; ++q) slot[q] = acc[q];
        }, r0);
        for (i64 b = r0; b < e; ++b)
          gate_math.row_cells(b, off + b,
                              [&](i64 jb, int q, int) { return pre[(b * J + jb) * 4 + q]; },
                              [&](i64 jb, V<S> m, int n) {
            m = gate_math.zoned_h(off + b, jb * L, m,
                                  drop.previous(b, jb * L, z_read + b * K + I + jb * L), n);
            store(z_write + b * K + I + jb * L, drop.operand(b, jb * L, m, n), n);
            store(o_ptr + (off + b) * P + jb * L, m, n);
            if (b < next_rows) store(h_next + b * P + jb * L, m, n);
          });
      }
      for (i64 b = std::max(r0, e); b < r1; ++b)       // inactive rows keep their state
        std::memcpy(z_write + b * K + I, z_read + b * K + I, P * sizeof(S));
    });
    Tensor h_T = pooled_clone(drop ? h_state : zbuf[st.count() % 2].narrow(1, I, P));
    return {out, h_T, c, gates, cells, Tensor(), previous.rows};
  }
  Tensor w = w_hh;
  if (I) {                                 // [W_ih | W_hh] (4H, I + P)
    w = pooled_empty({4 * H, I + P}, w_hh.options());
    w.narrow(1, 0, I).copy_(w_ih);
    w.narrow(1, I, P).copy_(w_hh);
  }
  // z = [x_t | h] (B, I + P), the step product's left operand; just h without the input.
  Tensor z = pooled_empty({B, I + P}, xproj.options());
  z.narrow(1, I, P).copy_(h0_operand);
  Tensor rec = pooled_empty({B, 4 * H}, xproj.options());
  Tensor m = w_hr.defined() ? pooled_empty({B, H}, xproj.options()) : Tensor();
  StepProduct<S> recurrent(w.t(), B);
  c10::optional<StepProduct<S>> projection;
  if (w_hr.defined()) projection.emplace(w_hr.t(), B);
  // Full gate recurrence: q (B, 3H) the previous step's [i | f | o] (q0 first, written by the
  // cell), each step's aq = q W_gg^T added to a_i, a_f, a_o after LN_hh.
  const Tensor q = w_gate.defined() ? pooled_clone(q0) : Tensor();
  const Tensor aq = w_gate.defined() ? pooled_empty({B, 3 * H}, xproj.options()) : Tensor();
  c10::optional<StepProduct<S>> gate_recurrence;
  if (w_gate.defined()) gate_recurrence.emplace(w_gate.t(), B);
  gate_math.q_state = ptr<S>(q);
  const S* aqp = ptr<S>(aq);
  S* r = ptr<S>(rec);
  Mat<S> zm = mat<S>(z);
  S* target = m.defined() ? ptr<S>(m) : zm.p + I;
  const i64 ts = m.defined() ? H : I + P;
  run_row_parts(st.count(), B, parts, [&](i64 s, i64 r0, i64 r1) {
    i64 t = st.order[s], off = st.offset[t], e = std::min(r1, st.size[t]);
    if (e <= r0) return;
    for (i64 b = r0; b < e && I; ++b) std::memcpy(zm.row(b), x + (off + b) * I, I * sizeof(S));
    recurrent(mat<S>(rec).rows_at(r0, e - r0), zm.rows_at(r0, e - r0));
    if (gate_recurrence) (*gate_recurrence)(mat<S>(aq).rows_at(r0, e - r0),
                                            mat<S>(q).rows_at(r0, e - r0));
    for_rows(e, H, [&](i64 b) {
      S* rb = r + b * 4 * H;
      if (layer_norms) layer_norms.normalize_product(rb, off + b);
      if (aqp) {                                     // [a_i | a_f] += aq's first 2H, a_o its last H
        add_to(rb, aqp + b * 3 * H, 2 * H);
        add_to(rb + 3 * H, aqp + b * 3 * H + 2 * H, H);
      }
      gate_math.row_cells(b, off + b, [&](i64 jb, int q, int n) {
        return load(r + b * 4 * H + q * H + jb * L, n);
      }, [&](i64 jb, V<S> mv, int n) {
        if (m.defined()) return store(target + b * ts + jb * L, mv, n);
        // Without projection target is z's h, still h_prev here (the product has read it).
        mv = gate_math.zoned_h(off + b, jb * L, mv,
                               drop.previous(b, jb * L, target + b * ts + jb * L), n);
        store(target + b * ts + jb * L, drop.operand(b, jb * L, mv, n), n);
        store(o_ptr + (off + b) * P + jb * L, mv, n);
      });
    }, r0);
    if (m.defined()) {
      // h = m W_hr^T, then zoneout's mix with h_prev (still in z, or the state with dropout).
      Mat<S> rows = mat<S>(out).rows_at(off + r0, e - r0);
      (*projection)(rows, mat<S>(m).rows_at(r0, e - r0));
      if (!drop && !gate_math.zone_h) return copy_rows(zm.rows_at(r0, e - r0), rows);  // (I = 0)
      for (i64 b = r0; b < e; ++b)
        for_unit_blocks<S>(P, [&](i64 jb, int n) __attribute__((always_inline)) {
          const i64 j = jb * L;
          S* hb = rows.row(b - r0) + j;
          const V<S> h = gate_math.zoned_h(off + b, j, load(hb, n),
                                           drop.previous(b, j, zm.row(b) + j), n);
          if (gate_math.zone_h) store(hb, h, n);
          store(zm.row(b) + j, drop.operand(b, j, h, n), n);
        });
    }
  });
  return {out, drop ? pooled_clone(h_state) : z.narrow(1, I, P).contiguous(), c, gates, cells,
          q, Tensor()};
}

// Backward, per step in reverse order, dh including the output gradient (tanh and sigmoid
// shown; other activations take their slopes, see cell_slope and gate_slope):
//   dm = dh [W_hr];  dc = dc_next + dm o (1 - tanh(c)^2)
//   da = [dc g, dc c_prev, dc i, dm tanh(c)] * [i(1-i), f(1-f), 1-g^2, o(1-o)]
//   dh_prev = da W_hh;  dc_prev = dc f
// With zoneout (c = c~ + z_c (c_prev - c~), h = m + z_h (h_prev - m)) dh and dc are the
// gradients reaching the zoned h and c: m gets (1 - z_h) dh and h_prev z_h dh (kept in dh_carry
// (B, H) for the step before, then dh0), c~ gets (1 - z_c) dc and c_prev z_c dc; c~ (which
// psi and the output peephole saw) is recomputed as f c_prev + i g. With a projection zoneout_h
// mixes the projected h instead: lstm_backward's generic driver splits the gradient reaching it
// (a (B, P) carry) before W_hr's product, and the gate math has no zone_h.
template <typename S>
struct LSTMBackwardGates {
  const S* gates; const S* cells; const S* c0; S* dc; S* d_gates; const Steps* st; i64 H;
  const S* peep = nullptr;                                   // (3H) peephole weights, or none
  int form = 0;                                              // as LSTMForwardGates's
  ZoneoutMask<S> zone_c, zone_h;                             // zoneout, or none
  S* dh_carry = nullptr;                                     // (B, H) with zone_h
  LayerNorms<S> ln;                                          // layer norm (its saved rows)
  S* d_product = nullptr;            // with ln: (N, 4H), the gradient of the product before LN
  S* d_cell_norm = nullptr;          // with ln: (N, H), the gradient of LN_c(c~)
  // Full gate recurrence: (B, 3H), the gradient reaching row b's [i | f | o] of this step as
  // values (through the next step's q W_gg^T): it joins the gates' own before their slopes.
  const S* dq = nullptr;
  // dm: the gradient reaching h, m = o psi(c) (the zoned h with zoneout_h), for row b of step t,
  // block jb. With peepholes c also reaches a_o (dc += da_o p_o) and c_prev reaches a_i and a_f
  // (dc_prev += da_i p_i + da_f p_f).
  // With CIFG, f = 1 - i: i's gradient is dc (g - c_prev), a_f gets none. A removed gate was
  // saved as 1, where both gate activations' slopes are 0: its pre-activation gets no gradient
  // with no test here.
  // torch.nn's cell (with zoneout's masks, if any) inlined, the others called (as
  // LSTMForwardGates's).
  // n: the block's width, min(L, H - jb L) (see for_unit_blocks).
  __attribute__((always_inline)) inline void operator()(i64 t, i64 b, i64 jb, V<S> dm,
                                                        int n) const {
    if (form == 0 && !peep && !dq) return standard(t, b, jb, dm, n);
    general(t, b, jb, dm, n);
  }
  // zoneout_h: dh = dm as it arrived plus the next step's share (in dh_carry); keeps z dh there
  // for the step before and returns (1 - z) dh, m's.
  __attribute__((always_inline)) inline V<S> zoned_dm(i64 b, i64 row, i64 j, V<S> dm,
                                                      int n) const {
    return zone_h ? zone_h.split(row, j, dm, dh_carry + b * H + j, n) : dm;
  }
  // zoneout_c: splits dc into (1 - z) dc, c~'s (returned), and z dc, c_prev's (`kept`).
  __attribute__((always_inline)) inline V<S> zoned_dc(i64 row, i64 j, V<S> dc, V<S>& kept,
                                                      int n) const {
    kept = zone_c ? dc * zone_c.at(row, j, n) : V<S>{};
    return dc - kept;
  }
  // What the backward of row b of step t, block jb, reads: the saved gates and cells, c_prev,
  // and where dc and the gate gradients go.
  struct Saved {
    i64 j;
    V<S> i, f, g, o, c, c_prev;
    S* dc; S* da;
  };
  // Row b's dq at unit j, gate k of [i | f | o] (zeros without full gate recurrence).
  __attribute__((always_inline)) inline V<S> dq_at(i64 b, int k, i64 j, int n) const {
    return dq ? load(dq + b * 3 * H + k * H + j, n) : V<S>{};
  }
  __attribute__((always_inline)) inline Saved saved(i64 t, i64 b, i64 jb, int n) const {
    const i64 j = jb * Vec<S>::L, row = st->offset[t] + b, prev = st->row(st->before(t), b);
    const S* gr = gates + row * 4 * H + j;
    return {j, load(gr, n), load(gr + H, n), load(gr + 2 * H, n), load(gr + 3 * H, n),
            load(cells + row * H + j, n),
            prev >= 0 ? load(cells + prev * H + j, n) : load(c0 + b * H + j, n),
            dc + b * H + j, d_gates + row * 4 * H + j};
  }
  __attribute__((always_inline)) inline void standard(i64 t, i64 b, i64 jb, V<S> dm,
                                                      int n) const {
    const Saved k = saved(t, b, jb, n);
    const i64 row = st->offset[t] + b;
    dm = zoned_dm(b, row, k.j, dm, n);
    V<S> dc_kept;
    const V<S> dc_in = zoned_dc(row, k.j, load(k.dc, n), dc_kept, n);
    const V<S> one = splat(S(1)), s = vtanh(zone_c ? k.f * k.c_prev + k.i * k.g : k.c);  // c~
    V<S> dct = dc_in + dm * k.o * (one - s * s);
    store(k.da, dct * k.g * k.i * (one - k.i), n);
    store(k.da + H, dct * k.c_prev * k.f * (one - k.f), n);
    store(k.da + 2 * H, dct * k.i * (one - k.g * k.g), n);
    store(k.da + 3 * H, dm * s * k.o * (one - k.o), n);
    store(k.dc, dct * k.f + dc_kept, n);
  }
  // Row b of step t with layer norm (see LayerNorms), dm_row its dm (H units): with
  // x_c = (c~ - mean_c) rstd_c and s = psi(gain_c x_c + beta_c),
  //   dn_c = dm o psi'(s) (kept in d_cell_norm for gain_c's gradient), g_c = dn_c gain_c,
  //   dc~ += rstd_c (g_c - mean(g_c) - x_c mean(g_c x_c)),
  // the gates' gradients da as general's with that dc~, and with x_h = (h_pre - mean_h) rstd_h,
  // g_h = da gain_h, the product's d_product = rstd_h (g_h - mean(g_h) - x_h mean(g_h x_h)),
  // the operand of dh_prev = d_product W_hh and of dW_hh. (The means over the row's H and 4H
  // values: a partial block's lanes past the row are zeros in dm and da, so in every sum.)
  void layer_norm_row(i64 t, i64 b, const S* dm_row) const {
    constexpr int L = Vec<S>::L;
    const i64 row = st->offset[t] + b;
    const CellForm act(form);
    const S* cand = ln.cand + row * H;
    const S* s_row = ln.s + row * H;
    const S* gr = gates + row * 4 * H;
    S* dn = d_cell_norm + row * H;
    S* da = d_gates + row * 4 * H;
    const V<S> mean_c = splat(ln.mean_c[row]), rstd_c = splat(ln.rstd_c[row]);
    V<S> sum_g{}, sum_gx{};
    for_unit_blocks<S>(H, [&](i64 jb, int n) __attribute__((always_inline)) {
      const i64 j = jb * L;
      const V<S> dm = zoned_dm(b, row, j, load(dm_row + j, n), n);
      const V<S> o = load(gr + 3 * H + j, n), s = load(s_row + j, n);
      const V<S> dnv = dm * o * cell_slope<S>(act.output, s);
      store(dn + j, dnv, n);
      store(da + 3 * H + j, (dm * s + dq_at(b, 2, j, n)) * gate_slope<S>(act.gate, o), n);
      const V<S> g = dnv * LayerNorms<S>::gain(ln.gain_c, j, n);
      sum_g += g;
      sum_gx += g * ((load(cand + j, n) - mean_c) * rstd_c);
    });
    const V<S> mg = splat(LayerNorms<S>::lanes_sum(sum_g, L) / S(H));
    const V<S> mgx = splat(LayerNorms<S>::lanes_sum(sum_gx, L) / S(H));
    for_unit_blocks<S>(H, [&](i64 jb, int n) __attribute__((always_inline)) {
      const Saved k = saved(t, b, jb, n);
      const i64 j = k.j;
      V<S> dc_kept;
      const V<S> dc_in = zoned_dc(row, j, load(k.dc, n), dc_kept, n);
      const V<S> x = (load(cand + j, n) - mean_c) * rstd_c;
      const V<S> dct = dc_in + rstd_c * (load(dn + j, n) * LayerNorms<S>::gain(ln.gain_c, j, n) -
                                         mg - x * mgx);
      cell_gradients(k, b, dct, load(k.da + 3 * H, n), dc_kept, n);
    });
    LayerNorms<S>::normalize_backward(da, ln.h_pre + row * 4 * H, 4 * H, ln.mean_h[row],
                                      ln.rstd_h[row], ln.gain_h, d_product + row * 4 * H);
  }
  __attribute__((noinline)) void general(i64 t, i64 b, i64 jb, V<S> dm, int n) const {
    const Saved k = saved(t, b, jb, n);
    const i64 j = k.j, row = st->offset[t] + b;
    const CellForm act(form);
    dm = zoned_dm(b, row, j, dm, n);
    V<S> dc_kept;
    const V<S> dc_in = zoned_dc(row, j, load(k.dc, n), dc_kept, n);
    const V<S> c_cell = zone_c ? k.f * k.c_prev + k.i * k.g : k.c;               // c~
    const V<S> s = cell_activation<S>(act.output, c_cell);                       // psi(c~)
    const V<S> da_o = (dm * s + dq_at(b, 2, j, n)) * gate_slope<S>(act.gate, k.o);
    store(k.da + 3 * H, da_o, n);
    cell_gradients(k, b, dc_in + dm * k.o * cell_slope<S>(act.output, s), da_o, dc_kept, n);
  }
  // What general and layer_norm_row share once dc~ is known (dct, the gradient reaching c~
  // but for the output peephole's share) and da_o: the input, forget and candidate gates'
  // gradients (stored), their values' gradients dq from full gate recurrence joined before
  // the slopes, and dc_prev = dc~ f (+ the peepholes' and zoneout's shares, dc_kept).
  // With CIFG, f = 1 - i: f's gradient as a value, dq_f among it, reaches i negated.
  __attribute__((always_inline)) inline void cell_gradients(const Saved& k, i64 b, V<S> dct,
                                                            V<S> da_o, V<S> dc_kept,
                                                            int n) const {
    const i64 j = k.j;
    const CellForm act(form);
    const bool cifg = form & GATE_CIFG;
    if (peep) dct += da_o * load(peep + 2 * H + j, n);
    const V<S> dq_i = dq_at(b, 0, j, n), dq_f = dq_at(b, 1, j, n);
    const V<S> da_i = (dct * (cifg ? k.g - k.c_prev : k.g) + (cifg ? dq_i - dq_f : dq_i)) *
                      gate_slope<S>(act.gate, k.i);
    const V<S> da_f = cifg ? V<S>{} : (dct * k.c_prev + dq_f) * gate_slope<S>(act.gate, k.f);
    store(k.da, da_i, n);
    store(k.da + H, da_f, n);
    store(k.da + 2 * H, dct * k.i * cell_slope<S>(act.cell, k.g), n);
    V<S> dc_prev = dct * k.f;
    if (peep) dc_prev += da_i * load(peep + j, n) + da_f * load(peep + H + j, n);
    store(k.dc, dc_prev + dc_kept, n);
  }
};

template <typename S>
std::vector<Tensor> lstm_backward(const Tensor& d_out, const Tensor& d_hT, const Tensor& d_cT,
                                  const Tensor& c0, const Tensor& w_hh,
                                  const c10::optional<Tensor>& w_hr_opt, const Tensor& gates,
                                  const Tensor& cells, const Steps& st, i64 parts,
                                  bool own_product, const Tensor& peephole, int cell_form,
                                  const Tensor& zoneout_h, const Tensor& zoneout_c,
                                  const Tensor& dh_carry, const Tensor& recurrent_mask,
                                  const LayerNorms<S>& layer_norms = {},
                                  const Tensor& d_product = {},
                                  const Tensor& d_cell_norm = {}, const Tensor& w_gate = {},
                                  const Tensor& dq = {}) {
  constexpr int L = Vec<S>::L;
  TORCH_CHECK(!layer_norms || (parts > 0 && !own_product && d_product.defined() &&
                               d_cell_norm.defined()),
              "lstm_backward: layer norm runs on the generic driver with MKL's step products");
  TORCH_CHECK(!w_gate.defined() || (parts > 0 && !own_product && dq.defined()),
              "lstm_backward: full gate recurrence runs on the generic driver");
  const i64 H = c0.size(1), P = d_hT.size(1), B = st.batch, N = st.rows;
  Tensor w_hr = w_hr_opt.has_value() ? w_hr_opt->contiguous() : Tensor();
  Tensor d_gates = pooled_empty({N, 4 * H}, gates.options());
  Tensor dh = pooled_clone(d_hT), dc = pooled_clone(d_cT);
  // zoneout_h mixes m itself without a projection (the gate math splits dm), the projected h
  // with one (the loop below splits the gradient reaching it, before W_hr's product).
  const ZoneoutMask<S> zone_m(w_hr.defined() ? Tensor() : zoneout_h);
  const ZoneoutMask<S> zone_projected(w_hr.defined() ? zoneout_h : Tensor());
  LSTMBackwardGates<S> gate_math{ptr<S>(gates), ptr<S>(cells), ptr<S>(c0), ptr<S>(dc),
                                 ptr<S>(d_gates), &st, H, ptr<S>(peephole), cell_form,
                                 ZoneoutMask<S>(zoneout_c), zone_m,
                                 ptr<S>(dh_carry), layer_norms, ptr<S>(d_product),
                                 ptr<S>(d_cell_norm), ptr<S>(dq)};
  const S* dy = ptr<S>(d_out);
  S* dhp = ptr<S>(dh);
  const i64 J = (H + L - 1) / L;
  // With recurrent dropout the product's operand was h_prev d: dh_prev = (da W_hh) d.
  const S* drop = ptr<S>(recurrent_mask);
  auto dropped = [drop, P](i64 b, i64 j, V<S> v, int n) __attribute__((always_inline)) {
    return drop ? v * load(drop + b * P + j, n) : v;
  };
  if (parts == 0 && !w_hr.defined()) {
    // dh_prev[b, k] = sum_g da[b, g] W_hh[g, k]: output unit k, contraction over g in 4H.
    Tensor packed = pack<S>(w_hh, 1, H, 4 * H, 0, 1, H);
    const S* wp = ptr<S>(packed);
    i64 workers = worker_count(J, 8 * B * H * P);
    Chunking<S> chunks(B, J, 1, 4 * H, gates.options());
    const i64 S_ = st.count();
    // Step s: first the product for the step done at s - 1 (its da is complete: all workers
    // passed the barrier), then the gate math of step s for this worker's units.
    run_steps(workers, J, S_ + 1, [&](i64 s, i64 jb0, i64 jb1) {
      if (s > 0) {
        i64 tp = st.order[S_ - s];
        const S* da = ptr<S>(d_gates) + st.offset[tp] * 4 * H;
        rows_times_blocks<S, 1>(da, 4 * H, 4 * H, wp, st.size[tp], jb0, jb1,
                                &chunks, [&](i64 b, i64 jb, const V<S>* acc) {
          i64 j = jb * L;
          int n = (int)std::min<i64>(L, H - j);
          store(dhp + b * P + j, dropped(b, j, acc[0], n), n);
        });
      }
      if (s < S_) {
        i64 t = st.order[S_ - 1 - s], off = st.offset[t];
        for (i64 b = 0; b < st.size[t]; ++b)
          for (i64 jb = jb0; jb < jb1; ++jb) {
            i64 j = jb * L;
            at_width<S>(H, j, [&](int n) __attribute__((always_inline)) {
              gate_math(t, b, jb, load(dy + (off + b) * P + j, n) + load(dhp + b * P + j, n), n);
            });
          }
      }
    }, B == 1 ? (J + workers - 1) / workers : 2);   // batch 1: a share a piece, blocks by fours
    return {d_gates, dh, dc, Tensor()};
  }
  if (own_product && !w_hr.defined()) {
    // Row parts, each step's dh_prev = da W_hh our register-blocked product (as the fused
    // driver's, over all unit blocks of the part's rows).
    Tensor packed = pack<S>(w_hh, 1, H, 4 * H, 0, 1, H);
    const S* wp = ptr<S>(packed);
    Chunking<S> chunks(B, J, 1, 4 * H, gates.options());
    S* dg = ptr<S>(d_gates);
    run_row_parts(st.count(), B, parts, [&](i64 k, i64 r0, i64 r1) {
      i64 t = st.order[st.count() - 1 - k], off = st.offset[t], e = std::min(r1, st.size[t]);
      if (e <= r0) return;
      FlushDenormals ftz;
      for (i64 b = r0; b < e; ++b)
        for_unit_blocks<S>(H, [&](i64 jb, int n) __attribute__((always_inline)) {
          i64 j = jb * L;
          gate_math(t, b, jb, load(dy + (off + b) * P + j, n) + load(dhp + b * P + j, n), n);
        });
      rows_times_blocks<S, 1>(dg + (off + r0) * 4 * H, 4 * H, 4 * H, wp, e - r0, 0, J, &chunks,
                              [&](i64 rb, i64 jb, const V<S>* acc) {
        i64 j = jb * L;
        int n = (int)std::min<i64>(L, H - j);
        store(dhp + (r0 + rb) * P + j, dropped(r0 + rb, j, acc[0], n), n);
      }, r0);
    });
    return {d_gates, dh, dc, Tensor()};
  }
  Tensor d_h_rows = w_hr.defined() ? pooled_empty({N, P}, gates.options()) : Tensor();
  Tensor dm = pooled_empty({B, w_hr.defined() ? H : P}, gates.options());
  StepProduct<S> recurrent(w_hh, B);
  c10::optional<StepProduct<S>> projection;
  if (w_hr.defined()) projection.emplace(w_hr, B);
  // Full gate recurrence: dq_prev = [da_i | da_f | da_o] W_gg, as two products of d_gates'
  // columns ([i | f] and o) by W_gg's rows.
  c10::optional<StepProduct<S>> gate_if, gate_o;
  if (w_gate.defined()) {
    gate_if.emplace(w_gate.narrow(0, 0, 2 * H), B);
    gate_o.emplace(w_gate.narrow(0, 2 * H, H), B);
  }
  const S* dmp = ptr<S>(dm);
  run_row_parts(st.count(), B, parts, [&](i64 k, i64 r0, i64 r1) {
    i64 t = st.order[st.count() - 1 - k], off = st.offset[t], e = std::min(r1, st.size[t]);
    if (e <= r0) return;
    const i64 n = e - r0;
    Mat<S> dh_t = mat<S>(dh).rows_at(r0, n);
    if (w_hr.defined()) {
      Mat<S> d_rows = mat<S>(d_h_rows).rows_at(off + r0, n);
      add_rows(d_rows, mat<S>(d_out).rows_at(off + r0, n), dh_t);
      for (i64 b = r0; b < e && zone_projected; ++b)     // as the gate math's zoned_dm
        for_unit_blocks<S>(P, [&](i64 jb, int w) __attribute__((always_inline)) {
          S* d = d_rows.row(b - r0) + jb * L;
          store(d, zone_projected.split(off + b, jb * L, load(d, w),
                                        ptr<S>(dh_carry) + b * P + jb * L, w), w);
        });
      (*projection)(mat<S>(dm).rows_at(r0, n), d_rows);
    } else {
      add_rows(mat<S>(dm).rows_at(r0, n), mat<S>(d_out).rows_at(off + r0, n), dh_t);
    }
    for_rows(e, H, [&](i64 b) {
      if (layer_norms) return gate_math.layer_norm_row(t, b, dmp + b * H);
      for_unit_blocks<S>(H, [&](i64 jb, int n) __attribute__((always_inline)) {
        gate_math(t, b, jb, load(dmp + b * H + jb * L, n), n);
      });
    }, r0);
    recurrent(dh_t, mat<S>(layer_norms ? d_product : d_gates).rows_at(off + r0, n));
    if (gate_if) {
      Mat<S> da = mat<S>(d_gates).rows_at(off + r0, n), dq_t = mat<S>(dq).rows_at(r0, n);
      (*gate_if)(dq_t, da.cols_at(0, 2 * H));
      (*gate_o)(dq_t, da.cols_at(3 * H, H), dq_t);
    }
    for (i64 b = r0; b < e && drop; ++b)
      for_unit_blocks<S>(P, [&](i64 jb, int w) __attribute__((always_inline)) {
        store(dhp + b * P + jb * L, dropped(b, jb * L, load(dhp + b * P + jb * L, w), w), w);
      });
  });
  return {d_gates, dh, dc, d_h_rows};
}

// ==========================================================================================
// Elman RNN:  h = act(xproj[row] + bias + h_prev W_hh^T);  backward da = (dy + dh) act'(h),
// dh_prev = da W_hh, act' from the output: 1 - h^2 (tanh), [h > 0] (relu).
// ==========================================================================================

// The generic driver's forward for the RNN and the reset-after GRU: at each step, rec = u W_hh^T
// (G columns) for a part's active rows, then for each row and unit block the new h vector,
// hv = block(row, j, n, rec row, h row, b), stored as the state and as the output row (row: the
// sequence's row, b: the batch row). u is h, or h d with recurrent dropout's mask d (the GRU's).
// Returns h_T.
// prepare(row, rec_row), if given, sees each row's product first (the GRU's layer norm);
// before_product(off, r0, e), if given, runs at each step before its product, for the part's
// active rows [r0, e), the step's rows starting at sequence row off (the GRU's input product).
template <typename S, typename Block>
Tensor generic_forward(const Tensor& w_hh, const Tensor& h0, i64 G, S* out, const Steps& st,
                       i64 parts, Block&& block, const Tensor& recurrent_mask = {},
                       const std::function<void(i64, S*)>& prepare = {},
                       const std::function<void(i64, i64, i64)>& before_product = {}) {
  constexpr int L = Vec<S>::L;
  const i64 B = st.batch, H = h0.size(1);
  Tensor h = pooled_clone(h0);
  Tensor rec = pooled_empty({B, G}, h0.options());
  StepProduct<S> recurrent(w_hh.t(), B);
  S* r = ptr<S>(rec);
  S* hp = ptr<S>(h);
  const RecurrentDropout<S> drop{ptr<S>(recurrent_mask), hp, H};
  Tensor u = drop ? drop.initial(h0, recurrent_mask) : h;          // the product's operand
  S* up = ptr<S>(u);
  run_row_parts(st.count(), B, parts, [&](i64 s, i64 r0, i64 r1) {
    i64 t = st.order[s], off = st.offset[t], e = std::min(r1, st.size[t]);
    if (e <= r0) return;
    if (before_product) before_product(off, r0, e);
    recurrent(mat<S>(rec).rows_at(r0, e - r0), mat<S>(u).rows_at(r0, e - r0));
    for_rows(e, H, [&](i64 b) {
      if (prepare) prepare(off + b, r + b * G);
      for_unit_blocks<S>(H, [&](i64 jb, int n) __attribute__((always_inline)) {
        i64 j = jb * L;
        V<S> hv = block(off + b, j, n, r + b * G, hp + b * H, b);
        store(up + b * H + j, drop.operand(b, j, hv, n), n);       // and the state, with d
        store(out + (off + b) * H + j, hv, n);
      });
    }, r0);
  });
  return h;
}

template <typename S>
inline V<S> rnn_act(V<S> a, bool relu) { return relu ? vrelu<S>(a) : vtanh(a); }

template <typename S>
std::vector<Tensor> rnn_forward(const Tensor& xproj, const Tensor& bias, const Tensor& h0,
                                const Tensor& w_hh, const Steps& st, bool relu, i64 parts) {
  constexpr int L = Vec<S>::L;
  const i64 H = h0.size(1), B = st.batch, N = st.rows;
  const i64 J = (H + L - 1) / L;
  Tensor out = pooled_empty({N, H}, xproj.options());
  S* o_ptr = ptr<S>(out);
  const S* xp = ptr<S>(xproj);
  const S* bp = ptr<S>(bias);
  if (parts == 0) {
    Tensor packed = pack<S>(w_hh, 1, H, H, 0, H, 1);
    Tensor hbuf = state_pair(h0);
    S* hb = ptr<S>(hbuf);
    const S* wp = ptr<S>(packed);
    i64 workers = worker_count(J, 2 * B * H * H);
    Chunking<S> chunks(B, J, 1, H, xproj.options());
    run_steps(workers, J, st.count(), [&](i64 s, i64 jb0, i64 jb1) {
      i64 t = st.order[s], bs = st.size[t], off = st.offset[t];
      const S* h_read = hb + (s % 2) * B * H;
      S* h_write = hb + ((s + 1) % 2) * B * H;
      rows_times_blocks<S, 1>(h_read, H, H, wp, bs, jb0, jb1,
                              &chunks, [&](i64 b, i64 jb, const V<S>* acc) {
        i64 j = jb * L;
        int n = (int)std::min<i64>(L, H - j);
        V<S> h = rnn_act<S>(acc[0] + load(xp + (off + b) * H + j, n) + load_bias(bp, j, n), relu);
        store(h_write + b * H + j, h, n);
        store(o_ptr + (off + b) * H + j, h, n);
      });
      for (i64 b = bs; b < B; ++b) {
        i64 j0 = std::min(H, jb0 * L), j1 = std::min(H, jb1 * L);
        std::memcpy(h_write + b * H + j0, h_read + b * H + j0, (j1 - j0) * sizeof(S));
      }
    });
    return {out, state_of(hbuf, st.count() % 2)};
  }
  Tensor h = generic_forward<S>(w_hh, h0, H, o_ptr, st, parts,
                                [&](i64 row, i64 j, int n, const S* rec, const S*, i64) {
    return rnn_act<S>(load(rec + j, n) + load(xp + row * H + j, n) + load_bias(bp, j, n), relu);
  });
  return {out, h};
}

template <typename S>
inline void rnn_backward_block(const S* dy, const S* dh, const S* out, S* d_pre, i64 H, i64 row,
                               i64 b, i64 j, int n, bool relu) {
  V<S> da = load(dy + row * H + j, n) + load(dh + b * H + j, n);
  V<S> h = load(out + row * H + j, n);
  da = relu ? (h > S(0) ? da : splat(S(0))) : da * (S(1) - h * h);
  store(d_pre + row * H + j, da, n);
}

template <typename S>
std::vector<Tensor> rnn_backward(const Tensor& d_out, const Tensor& d_hT, const Tensor& w_hh,
                                 const Tensor& out, const Steps& st, bool relu, i64 parts) {
  constexpr int L = Vec<S>::L;
  const i64 H = d_hT.size(1), B = st.batch, N = st.rows;
  const i64 J = (H + L - 1) / L;
  Tensor d_pre = pooled_empty({N, H}, out.options());
  Tensor dh = pooled_clone(d_hT);
  const S* dy = ptr<S>(d_out);
  const S* op = ptr<S>(out);
  S* dp = ptr<S>(d_pre);
  S* dhp = ptr<S>(dh);
  if (parts == 0) {
    Tensor packed = pack<S>(w_hh, 1, H, H, 0, 1, H);
    const S* wp = ptr<S>(packed);
    i64 workers = worker_count(J, 2 * B * H * H);
    Chunking<S> chunks(B, J, 1, H, out.options());
    const i64 S_ = st.count();
    run_steps(workers, J, S_ + 1, [&](i64 s, i64 jb0, i64 jb1) {
      if (s > 0) {
        i64 tp = st.order[S_ - s];
        rows_times_blocks<S, 1>(dp + st.offset[tp] * H, H, H, wp, st.size[tp], jb0, jb1,
                                &chunks, [&](i64 b, i64 jb, const V<S>* acc) {
          i64 j = jb * L;
          store(dhp + b * H + j, acc[0], (int)std::min<i64>(L, H - j));
        });
      }
      if (s < S_) {
        i64 t = st.order[S_ - 1 - s], off = st.offset[t];
        for (i64 b = 0; b < st.size[t]; ++b)
          for (i64 jb = jb0; jb < jb1; ++jb) {
            i64 j = jb * L;
            rnn_backward_block(dy, dhp, op, dp, H, off + b, b, j, (int)std::min<i64>(L, H - j),
                               relu);
          }
      }
    });
    return {d_pre, dh};
  }
  StepProduct<S> recurrent(w_hh, B);
  run_row_parts(st.count(), B, parts, [&](i64 k, i64 r0, i64 r1) {
    i64 t = st.order[st.count() - 1 - k], off = st.offset[t], e = std::min(r1, st.size[t]);
    if (e <= r0) return;
    for_rows(e, H, [&](i64 b) {
      for (i64 jb = 0; jb < J; ++jb) {
        i64 j = jb * L;
        rnn_backward_block(dy, dhp, op, dp, H, off + b, b, j, (int)std::min<i64>(L, H - j),
                           relu);
      }
    }, r0);
    recurrent(mat<S>(dh).rows_at(r0, e - r0), mat<S>(d_pre).rows_at(off + r0, e - r0));
  });
  return {d_pre, dh};
}

// ==========================================================================================
// GRU. gi = x W_ih^T + b_ih (the projection before the loop, b_ih added here); gh = h W_hh^T + b_hh
//   r = sigma(gi_r + gh_r), z = sigma(gi_z + gh_z)
//   reset after:  n = tanh(gi_n + r gh_n)            stash [r | z | n | gh_n] (N, 4H)
//   reset before: n = tanh(gi_n + (r h) W_hn^T + b_hn)  stash [r | z | n] (N, 3H)
//   h' = n + z (h - n)
// With zoneout (GRUVariant's zoneout_h, masks as the LSTM's): h' + k (h - h'), mask k. With
// recurrent dropout's mask d (B, H) the products read u = h d instead of h (h itself above).
// GRUVariant's activations, in the bits of `form` (native.gru_form): the gates' (bit 0, as
// gate_activation's code) and the candidate's (bits 1-2, cell_activation's); 0 is torch.nn's,
// whose sigmoid and tanh are inlined. The drivers are compiled twice (`Custom`): with
// Custom false form is 0 at compile time and the branch on it is gone (it cost the plain GRU
// about 2%: training at batch 8 / hidden 256 3.61-3.65x torch.nn's against 3.67-3.74x).
template <typename S, bool Custom = true>
struct GRUActivations {
  int form = 0;
  int gate_code() const { return form & 1; }
  int candidate_code() const { return (form >> 1) & 3; }
  __attribute__((always_inline)) inline V<S> gate(V<S> a) const {
    return Custom && form ? gate_activation<S>(gate_code(), a) : vsigmoid(a);
  }
  __attribute__((always_inline)) inline V<S> candidate(V<S> a) const {
    return Custom && form ? cell_activation<S>(candidate_code(), a) : vtanh(a);
  }
  // The slopes from the outputs.
  __attribute__((always_inline)) inline V<S> gate_slope(V<S> y) const {
    return Custom && form ? ::gate_slope<S>(gate_code(), y) : y * (S(1) - y);
  }
  __attribute__((always_inline)) inline V<S> candidate_slope(V<S> y) const {
    return Custom && form ? cell_slope<S>(candidate_code(), y) : S(1) - y * y;
  }
};
// ==========================================================================================

// GRUVariant's layer norm of the recurrent products (see gru_variants.py): each row's product
// in two blocks, q = 0 the gates' [r | z] (2H) and q = 1 the candidate's n (H), each
// normalised over its own units (LayerNorms's arithmetic) before b_hh is added; with reset
// before, n's block is the product of (r u). The input side is normalised for all steps
// before the loop (layer_norm_rows). Saved unless nothing will need a backward: the products
// before LN, h_pre (N, 3H), and each block's mean and rstd, (N, 2).
template <typename S>
struct GRULayerNorms {
  LayerNorms<S> norm;           // its eps, and the (3H) gains and biases as gain_h, beta_h
  S* h_pre = nullptr; S* mean = nullptr; S* rstd = nullptr;
  i64 H = 0;
  explicit operator bool() const { return H != 0; }
  i64 start(int q) const { return q ? 2 * H : 0; }
  i64 width(int q) const { return q ? H : 2 * H; }
  // Block q of global row `row`'s product, at v, normalised in place (saved first).
  void normalize(S* v, i64 row, int q) const {
    const i64 at = start(q), F = width(q);
    S m, r;
    LayerNorms<S>::moments(v, F, norm.eps, m, r);
    if (h_pre) {
      std::memcpy(h_pre + row * 3 * H + at, v, F * sizeof(S));
      mean[row * 2 + q] = m;
      rstd[row * 2 + q] = r;
    }
    LayerNorms<S>::normalize(v, F, m, r, norm.gain_h ? norm.gain_h + at : nullptr,
                             norm.beta_h ? norm.beta_h + at : nullptr, v);
  }
  // The gradient of block q's product (to dv) from d, its LN output's, row `row`.
  void backward(const S* d, i64 row, int q, S* dv) const {
    const i64 at = start(q);
    LayerNorms<S>::normalize_backward(d, h_pre + row * 3 * H + at, width(q), mean[row * 2 + q],
                                      rstd[row * 2 + q], norm.gain_h ? norm.gain_h + at : nullptr,
                                      dv);
  }
};

template <typename S, bool Custom = true>
struct GRUForwardGates {    // reset after
  const S* gi; const S* b_ih; const S* b_hh; S* stash; i64 H;
  ZoneoutMask<S> zone = {};                                  // zoneout, or none
  GRUActivations<S, Custom> act = {};
  bool stream_stash = false;                                 // see stream()
  // Inlined into the drivers' loops, as LSTMForwardGates::standard.
  // n: the block's width, min(L, H - jb L) (see for_unit_blocks).
  __attribute__((always_inline)) inline V<S> operator()(i64 row, i64 jb, const V<S>* acc,
                                                         V<S> h_prev, int n) const {
    const S* g = gi + row * 3 * H + jb * Vec<S>::L;
    const V<S> x[3] = {load(g, n), load(g + H, n), load(g + 2 * H, n)};
    return from_products(row, jb, x, acc, h_prev, n);
  }
  // The same with the input's products of the block, x[3] (r, z, n), given (the single step).
  __attribute__((always_inline)) inline V<S> from_products(i64 row, i64 jb, const V<S>* x,
                                                            const V<S>* acc, V<S> h_prev,
                                                            int n) const {
    i64 j = jb * Vec<S>::L;
    V<S> br = {}, bz = {}, bn = {};
    if (b_hh) { br = load(b_hh + j, n); bz = load(b_hh + H + j, n); bn = load(b_hh + 2 * H + j, n); }
    const V<S> a_r = x[0] + load_bias(b_ih, j, n) + acc[0] + br;
    const V<S> a_z = x[1] + load_bias(b_ih, H + j, n) + acc[1] + bz;
    V<S> r = act.gate(a_r), z = act.gate(a_z);
    V<S> gh_n = acc[2] + bn;
    V<S> nn = act.candidate(x[2] + load_bias(b_ih, 2 * H + j, n) + r * gh_n);
    if (stash) {
      S* sr = stash + row * 4 * H + j;
      put(stream_stash, sr, r, n); put(stream_stash, sr + H, z, n);
      put(stream_stash, sr + 2 * H, nn, n); put(stream_stash, sr + 3 * H, gh_n, n);
    }
    const V<S> h = nn + z * (h_prev - nn);
    return zone.mix(row, j, h, h_prev, n);
  }
};

// The reset-before GRU's gate math for a unit block j (n units) (Cho et al.): r and z from the
// input's and the state's products of their rows, then n from the input's product of its rows
// and (r h) W_hn^T; the biases added here. The generic driver's and the single step's.
template <typename S, bool Custom = true>
struct GRUResetBeforeGates {
  const S* b_ih; const S* b_hh; i64 H;
  GRUActivations<S, Custom> act = {};
  // Gate q (0: r, 1: z) from the input's product x and the state's product h of its rows.
  __attribute__((always_inline)) inline V<S> gate(int q, V<S> x, V<S> h, i64 j, int n) const {
    V<S> b = b_hh ? load(b_hh + q * H + j, n) : V<S>{};
    return act.gate(x + load_bias(b_ih, q * H + j, n) + h + b);
  }
  // The candidate n from the input's product x of its rows and rh = (r h) W_hn^T.
  __attribute__((always_inline)) inline V<S> candidate(V<S> x, V<S> rh, i64 j, int n) const {
    V<S> b = b_hh ? load(b_hh + 2 * H + j, n) : V<S>{};
    return act.candidate(x + load_bias(b_ih, 2 * H + j, n) + rh + b);
  }
};

// gi: the input's products of all steps, x W_ih^T (N, 3H); or, undefined, x (N, I) and w_ih
// (3H, I) given instead: the reset-after generic driver (parts >= 1) then multiplies each step's
// rows of x by W_ih^T right before the recurrent product (see gru_layer_forward).
template <typename S, bool Custom = true>
std::vector<Tensor> gru_forward(const Tensor& gi, const Tensor& b_ih, const Tensor& h0,
                                const Tensor& w_hh,
                                const Tensor& b_hh, const Steps& st, bool reset_after,
                                bool save, i64 parts, const Tensor& zoneout,
                                const Tensor& recurrent_mask, int form,
                                const GRULayerNorms<S>& layer_norms = {},
                                const Tensor& x = {}, const Tensor& w_ih = {}) {
  constexpr int L = Vec<S>::L;
  const i64 H = h0.size(1), B = st.batch, N = st.rows;
  const i64 J = (H + L - 1) / L;
  TORCH_CHECK(!layer_norms || parts > 0,
              "gru_forward: layer norm runs on the generic driver with MKL's step products");
  TORCH_CHECK(gi.defined() != x.defined() && (gi.defined() || (reset_after && parts > 0)),
              "gru_forward: takes gi, or x and w_ih on the reset-after generic driver");
  Tensor out = pooled_empty({N, H}, h0.options());
  Tensor stash = save ? pooled_empty({N, reset_after ? 4 * H : 3 * H}, h0.options()) : Tensor();
  S* o_ptr = ptr<S>(out);
  if (reset_after) {
    GRUForwardGates<S, Custom> gate_math{ptr<S>(gi), ptr<S>(b_ih), ptr<S>(b_hh), ptr<S>(stash), H,
                                 ZoneoutMask<S>(zoneout), GRUActivations<S, Custom>{form},
                                 streams(stash)};
    if (parts == 0) {
      Tensor packed = pack<S>(w_hh, 3, H, H, H * H, H, 1);
      Tensor h_state = recurrent_mask.defined() ? pooled_clone(h0) : Tensor();
      const RecurrentDropout<S> drop{ptr<S>(recurrent_mask), ptr<S>(h_state), H};
      Tensor hbuf = state_pair(drop.initial(h0, recurrent_mask));
      S* hb = ptr<S>(hbuf);
      const S* wp = ptr<S>(packed);
      i64 workers = worker_count(J, 6 * B * H * H);
      Chunking<S> chunks(B, J, 3, H, gi.options());
      run_steps(workers, J, st.count(), [&](i64 s, i64 jb0, i64 jb1) {
        i64 t = st.order[s], bs = st.size[t], off = st.offset[t];
        const S* h_read = hb + (s % 2) * B * H;
        S* h_write = hb + ((s + 1) % 2) * B * H;
        rows_times_blocks<S, 3>(h_read, H, H, wp, bs, jb0, jb1,
                                &chunks, [&](i64 b, i64 jb, const V<S>* acc) {
          i64 j = jb * L;
          int n = (int)std::min<i64>(L, H - j);
          V<S> h = gate_math(off + b, jb, acc, load(drop.previous(b, j, h_read + b * H + j), n),
                             n);
          store(h_write + b * H + j, drop.operand(b, j, h, n), n);
          store(o_ptr + (off + b) * H + j, h, n);
        });
        for (i64 b = bs; b < B; ++b) {
          i64 j0 = std::min(H, jb0 * L), j1 = std::min(H, jb1 * L);
          std::memcpy(h_write + b * H + j0, h_read + b * H + j0, (j1 - j0) * sizeof(S));
        }
      });
      return {out, drop ? pooled_clone(h_state) : state_of(hbuf, st.count() % 2), stash};
    }
    // Without gi: each step's input products in gx (B, 3H), batch row b's in row b.
    Tensor gx = x.defined() ? pooled_empty({B, 3 * H}, h0.options()) : Tensor();
    c10::optional<StepProduct<S>> input_product;
    if (x.defined()) input_product.emplace(w_ih.t(), B);
    const S* gxp = ptr<S>(gx);
    Tensor h = generic_forward<S>(w_hh, h0, 3 * H, o_ptr, st, parts,
                                  [&](i64 row, i64 j, int n, const S* rec, const S* h_row, i64 b) {
      V<S> acc[3];
      for (int q = 0; q < 3; ++q) acc[q] = load(rec + q * H + j, n);
      if (gxp) {
        const S* g = gxp + b * 3 * H + j;
        const V<S> input[3] = {load(g, n), load(g + H, n), load(g + 2 * H, n)};
        return gate_math.from_products(row, j / L, input, acc, load(h_row + j, n), n);
      }
      return gate_math(row, j / L, acc, load(h_row + j, n), n);
    }, recurrent_mask, layer_norms ? std::function<void(i64, S*)>([&](i64 row, S* rec) {
      layer_norms.normalize(rec, row, 0);
      layer_norms.normalize(rec + 2 * H, row, 1);
    }) : std::function<void(i64, S*)>(), !x.defined() ? std::function<void(i64, i64, i64)>()
       : [&](i64 off, i64 r0, i64 e) {
      (*input_product)(mat<S>(gx).rows_at(r0, e - r0), mat<S>(x).rows_at(off + r0, e - r0));
    });
    return {out, h, stash};
  }
  // Reset before: the reset gate scales h before the second product, so each step is
  // [r z] product -> gate math -> (r h) W_hn^T product -> gate math (h d for h in both products
  // with recurrent dropout's mask d).
  Tensor h = pooled_clone(h0);
  const RecurrentDropout<S> drop{ptr<S>(recurrent_mask), ptr<S>(h), H};
  Tensor u = drop ? drop.initial(h0, recurrent_mask) : h;          // the products' operand
  S* up = ptr<S>(u);
  Tensor rec = pooled_empty({B, 2 * H}, gi.options());
  Tensor rh = pooled_empty({B, H}, gi.options());
  Tensor rec_n = pooled_empty({B, H}, gi.options());
  Tensor zbuf = pooled_empty({B, H}, gi.options());
  StepProduct<S> recurrent_rz(w_hh.narrow(0, 0, 2 * H).t(), B);
  StepProduct<S> recurrent_n(w_hh.narrow(0, 2 * H, H).t(), B);
  const S* gp = ptr<S>(gi);
  GRUResetBeforeGates<S, Custom> gates{ptr<S>(b_ih), ptr<S>(b_hh), H, GRUActivations<S, Custom>{form}};
  const ZoneoutMask<S> zone(zoneout);
  S* sp = ptr<S>(stash);
  S* r_ = ptr<S>(rec);
  S* rn = ptr<S>(rec_n);
  S* hp = ptr<S>(h);
  S* rhp = ptr<S>(rh);
  S* zp = ptr<S>(zbuf);
  run_row_parts(st.count(), B, parts, [&](i64 s, i64 r0, i64 r1) {
    i64 t = st.order[s], off = st.offset[t], e = std::min(r1, st.size[t]);
    if (e <= r0) return;
    recurrent_rz(mat<S>(rec).rows_at(r0, e - r0), mat<S>(u).rows_at(r0, e - r0));
    for_rows(e, H, [&](i64 b) {
      if (layer_norms) layer_norms.normalize(r_ + b * 2 * H, off + b, 0);
      for (i64 jb = 0; jb < J; ++jb) {
        i64 j = jb * L;
        int n = (int)std::min<i64>(L, H - j);
        const S* g = gp + (off + b) * 3 * H + j;
        V<S> r = gates.gate(0, load(g, n), load(r_ + b * 2 * H + j, n), j, n);
        V<S> z = gates.gate(1, load(g + H, n), load(r_ + b * 2 * H + H + j, n), j, n);
        store(rhp + b * H + j, r * load(up + b * H + j, n), n);
        store(zp + b * H + j, z, n);
        if (sp) { store(sp + (off + b) * 3 * H + j, r, n); store(sp + (off + b) * 3 * H + H + j, z, n); }
      }
    }, r0);
    recurrent_n(mat<S>(rec_n).rows_at(r0, e - r0), mat<S>(rh).rows_at(r0, e - r0));
    for_rows(e, H, [&](i64 b) {
      if (layer_norms) layer_norms.normalize(rn + b * H, off + b, 1);
      for (i64 jb = 0; jb < J; ++jb) {
        i64 j = jb * L;
        int n = (int)std::min<i64>(L, H - j);
        V<S> nn = gates.candidate(load(gp + (off + b) * 3 * H + 2 * H + j, n),
                                  load(rn + b * H + j, n), j, n);
        V<S> z = load(zp + b * H + j, n), h_prev = load(hp + b * H + j, n);
        V<S> hv = nn + z * (h_prev - nn);
        hv = zone.mix(off + b, j, hv, h_prev, n);
        if (sp) store(sp + (off + b) * 3 * H + 2 * H + j, nn, n);
        store(up + b * H + j, drop.operand(b, j, hv, n), n);       // and the state, with d
        store(o_ptr + (off + b) * H + j, hv, n);
      }
    }, r0);
  });
  return {out, h, stash};
}

// Backward, dh including the output gradient:
//   dn = dh (1 - z);  da_n = dn (1 - n^2);  da_z = dh (h - n) z (1 - z)
//   reset after:  da_r = da_n gh_n r (1 - r);  d_gh = [da_r, da_z, da_n r]
//                 dh_prev = dh z + d_gh W_hh
//   reset before: d(rh) = da_n W_hn;  da_r = d(rh) h r (1 - r)
//                 dh_prev = dh z + d(rh) r + [da_r, da_z] W_h{r,z}
// With zoneout's mask k the gate math gets (1 - k) dh and h_prev k dh besides. With recurrent
// dropout's mask d the products read u = h d: their share of dh_prev is multiplied by d, and
// (reset before) da_r = d(rh) u r (1 - r), dh_prev gets d(rh) r d.
// Returns d_gi (N, 3H) = [da_r | da_z | da_n], d_gh (N, 3H) (reset after; = d_gi before), dh0.
template <typename S, bool Custom = true>
struct GRUBackwardGates {   // reset after
  const S* dy; const S* out; const S* h0; const S* stash; S* d_gi; S* d_gh; S* carry;
  const Steps* st; i64 H;
  ZoneoutMask<S> zone = {};                                  // zoneout, or none
  GRUActivations<S, Custom> act = {};
  bool stream_d_gi = false;         // see stream(): d_gi is read after the loop, d_gh in it
  // n: the block's width, min(L, H - jb L) (see for_unit_blocks).
  __attribute__((always_inline)) inline void operator()(i64 t, i64 b, i64 jb, V<S> dh_next,
                                                        int n) const {
    i64 j = jb * Vec<S>::L;
    i64 row = st->offset[t] + b;
    i64 prev = st->row(st->before(t), b);
    V<S> h_prev = prev >= 0 ? load(out + prev * H + j, n) : load(h0 + b * H + j, n);
    const S* s = stash + row * 4 * H + j;
    V<S> r = load(s, n), z = load(s + H, n), nn = load(s + 2 * H, n), gh_n = load(s + 3 * H, n);
    V<S> dh = load(dy + row * H + j, n) + dh_next, kept{};
    if (zone) {
      kept = dh * zone.at(row, j, n);
      dh = dh - kept;
    }
    V<S> da_n = dh * (S(1) - z) * act.candidate_slope(nn);
    V<S> da_z = dh * (h_prev - nn) * act.gate_slope(z);
    V<S> da_r = da_n * gh_n * act.gate_slope(r);
    S* gi = d_gi + row * 3 * H + j;
    S* gh = d_gh + row * 3 * H + j;
    put(stream_d_gi, gi, da_r, n); put(stream_d_gi, gi + H, da_z, n);
    put(stream_d_gi, gi + 2 * H, da_n, n);
    store(gh, da_r, n); store(gh + H, da_z, n); store(gh + 2 * H, da_n * r, n);
    store(carry + b * H + j, zone ? dh * z + kept : dh * z, n);
  }
};

template <typename S, bool Custom = true>
std::vector<Tensor> gru_backward(const Tensor& d_out, const Tensor& d_hT, const Tensor& h0,
                                 const Tensor& w_hh, const Tensor& out, const Tensor& stash,
                                 const Steps& st, bool reset_after, i64 parts,
                                 const Tensor& zoneout, const Tensor& recurrent_mask, int form,
                                 const GRULayerNorms<S>& layer_norms = {},
                                 const Tensor& d_product = {}) {
  constexpr int L = Vec<S>::L;
  const i64 H = d_hT.size(1), B = st.batch, N = st.rows;
  const i64 J = (H + L - 1) / L;
  TORCH_CHECK(!layer_norms || (parts > 0 && d_product.defined()),
              "gru_backward: layer norm runs on the generic driver with MKL's step products");
  S* dpp = ptr<S>(d_product);     // with layer norm: (N, 3H), the products' gradients
  Tensor d_gi = pooled_empty({N, 3 * H}, out.options());
  Tensor dh = pooled_clone(d_hT);
  Tensor carry = pooled_empty({B, H}, out.options());
  S* dhp = ptr<S>(dh);
  S* cp = ptr<S>(carry);
  const S* drop = ptr<S>(recurrent_mask);
  const GRUActivations<S, Custom> act{form};
  // dh = carry + product d (the product's share times recurrent dropout's mask), rows [r0, e).
  auto dropped_rows = [&](i64 r0, i64 e) {
    for (i64 b = r0; b < e; ++b)
      for_unit_blocks<S>(H, [&](i64 jb, int n) __attribute__((always_inline)) {
        const i64 at = b * H + jb * L;
        store(dhp + at, load(dhp + at, n) * load(drop + at, n) + load(cp + at, n), n);
      });
  };
  if (reset_after) {
    Tensor d_gh = pooled_empty({N, 3 * H}, out.options());
    GRUBackwardGates<S, Custom> gate_math{ptr<S>(d_out), ptr<S>(out), ptr<S>(h0), ptr<S>(stash),
                                  ptr<S>(d_gi), ptr<S>(d_gh), cp, &st, H,
                                  ZoneoutMask<S>(zoneout), GRUActivations<S, Custom>{form},
                                  streams(d_gi)};
    if (parts == 0) {
      Tensor packed = pack<S>(w_hh, 1, H, 3 * H, 0, 1, H);
      const S* wp = ptr<S>(packed);
      i64 workers = worker_count(J, 6 * B * H * H);
      Chunking<S> chunks(B, J, 1, 3 * H, out.options());
      const i64 S_ = st.count();
      run_steps(workers, J, S_ + 1, [&](i64 s, i64 jb0, i64 jb1) {
        if (s > 0) {
          i64 tp = st.order[S_ - s];
          rows_times_blocks<S, 1>(ptr<S>(d_gh) + st.offset[tp] * 3 * H, 3 * H, 3 * H, wp,
                                  st.size[tp], jb0, jb1, &chunks, [&](i64 b, i64 jb, const V<S>* acc) {
            i64 j = jb * L;
            int n = (int)std::min<i64>(L, H - j);
            const V<S> product = drop ? acc[0] * load(drop + b * H + j, n) : acc[0];
            store(dhp + b * H + j, product + load(cp + b * H + j, n), n);
          });
        }
        if (s < S_) {
          i64 t = st.order[S_ - 1 - s];
          for (i64 b = 0; b < st.size[t]; ++b)
            for (i64 jb = jb0; jb < jb1; ++jb) {
              i64 j = jb * L;
              int n = (int)std::min<i64>(L, H - j);
              gate_math(t, b, jb, load(dhp + b * H + j, n), n);
            }
        }
      });
      return {d_gi, d_gh, dh};
    }
    StepProduct<S> recurrent(w_hh, B);
    run_row_parts(st.count(), B, parts, [&](i64 k, i64 r0, i64 r1) {
      i64 t = st.order[st.count() - 1 - k], off = st.offset[t], e = std::min(r1, st.size[t]);
      if (e <= r0) return;
      for_rows(e, H, [&](i64 b) {
        for_unit_blocks<S>(H, [&](i64 jb, int n) __attribute__((always_inline)) {
          gate_math(t, b, jb, load(dhp + b * H + jb * L, n), n);
        });
        if (!layer_norms) return;
        const i64 row = off + b;
        const S* dg = ptr<S>(d_gh) + row * 3 * H;
        layer_norms.backward(dg, row, 0, dpp + row * 3 * H);
        layer_norms.backward(dg + 2 * H, row, 1, dpp + row * 3 * H + 2 * H);
      }, r0);
      const Tensor& d_rec = layer_norms ? d_product : d_gh;      // the product's gradient
      if (!drop) {
        recurrent(mat<S>(dh).rows_at(r0, e - r0), mat<S>(d_rec).rows_at(off + r0, e - r0),
                  mat<S>(carry).rows_at(r0, e - r0));
        return;
      }
      recurrent(mat<S>(dh).rows_at(r0, e - r0), mat<S>(d_rec).rows_at(off + r0, e - r0));
      dropped_rows(r0, e);
    });
    return {d_gi, d_gh, dh};
  }
  const S* dy = ptr<S>(d_out);
  const S* op = ptr<S>(out);
  const S* hp0 = ptr<S>(h0);
  const S* sp = ptr<S>(stash);
  S* gp = ptr<S>(d_gi);
  StepProduct<S> recurrent_rz(w_hh.narrow(0, 0, 2 * H), B);
  StepProduct<S> recurrent_n(w_hh.narrow(0, 2 * H, H), B);
  Tensor d_rh = pooled_empty({B, H}, out.options());
  Tensor dh_t = pooled_empty({B, H}, out.options());
  S* drh = ptr<S>(d_rh);
  S* dht = ptr<S>(dh_t);
  const ZoneoutMask<S> zone(zoneout);
  run_row_parts(st.count(), B, parts, [&](i64 k, i64 r0, i64 r1) {
    i64 t = st.order[st.count() - 1 - k], off = st.offset[t], e = std::min(r1, st.size[t]);
    if (e <= r0) return;
    const i64 n_rows = e - r0;
    i64 tb = st.before(t);
    auto h_prev_at = [&](i64 b, i64 j, int n) {
      i64 prev = st.row(tb, b);
      return prev >= 0 ? load(op + prev * H + j, n) : load(hp0 + b * H + j, n);
    };
    for_rows(e, H, [&](i64 b) {
      for (i64 jb = 0; jb < J; ++jb) {
        i64 j = jb * L;
        int n = (int)std::min<i64>(L, H - j);
        i64 row = off + b;
        const S* sr = sp + row * 3 * H + j;
        V<S> z = load(sr + H, n), nn = load(sr + 2 * H, n);
        V<S> dh = load(dy + row * H + j, n) + load(dhp + b * H + j, n);
        if (zone) {                      // h_prev's share k dh in the carry until the step's end
          const V<S> kept = dh * zone.at(row, j, n);
          store(cp + b * H + j, kept, n);
          dh = dh - kept;
        }
        store(dht + b * H + j, dh, n);
        store(gp + row * 3 * H + 2 * H + j, dh * (S(1) - z) * act.candidate_slope(nn), n);
        store(gp + row * 3 * H + H + j, dh * (h_prev_at(b, j, n) - nn) * act.gate_slope(z), n);
      }
      if (layer_norms)
        layer_norms.backward(gp + (off + b) * 3 * H + 2 * H, off + b, 1,
                             dpp + (off + b) * 3 * H + 2 * H);
    }, r0);
    // The products' gradients: d_gi's columns, or through layer norm d_product's.
    const Tensor& d_rec = layer_norms ? d_product : d_gi;
    recurrent_n(mat<S>(d_rh).rows_at(r0, n_rows),
                mat<S>(d_rec).rows_at(off + r0, n_rows).cols_at(2 * H, H));
    for_rows(e, H, [&](i64 b) {
      for (i64 jb = 0; jb < J; ++jb) {
        i64 j = jb * L;
        int n = (int)std::min<i64>(L, H - j);
        i64 row = off + b;
        V<S> r = load(sp + row * 3 * H + j, n), z = load(sp + row * 3 * H + H + j, n);
        // rh = r u, u = h_prev (h_prev d with the products' operand masked): da_r from u,
        // h_prev's share of d(rh) r through u.
        const V<S> d_rh = load(drh + b * H + j, n);
        V<S> u = h_prev_at(b, j, n), d_u = d_rh * r;
        if (drop) {
          const V<S> mask = load(drop + b * H + j, n);
          u = u * mask;
          d_u = d_u * mask;
        }
        store(gp + row * 3 * H + j, d_rh * u * act.gate_slope(r), n);
        V<S> to_prev = load(dht + b * H + j, n) * z + d_u;
        store(cp + b * H + j, zone ? to_prev + load(cp + b * H + j, n) : to_prev, n);
      }
      if (layer_norms)
        layer_norms.backward(gp + (off + b) * 3 * H, off + b, 0, dpp + (off + b) * 3 * H);
    }, r0);
    if (!drop) {
      recurrent_rz(mat<S>(dh).rows_at(r0, n_rows),
                   mat<S>(d_rec).rows_at(off + r0, n_rows).cols_at(0, 2 * H),
                   mat<S>(carry).rows_at(r0, n_rows));
      return;
    }
    recurrent_rz(mat<S>(dh).rows_at(r0, n_rows),
                 mat<S>(d_rec).rows_at(off + r0, n_rows).cols_at(0, 2 * H));
    dropped_rows(r0, e);
  });
  return {d_gi, d_gi, dh};
}

// ---- one step of a cell on the weights as given (the single-step API) ----------------------
// A step of online inference reads every weight once: at batch 1 a matrix-vector product per
// gate, bound by the cache's bandwidth. It reads W_ih and W_hh in their own row-major layout,
// L rows at a time, so nothing is packed per call, and nothing is cached between calls either:
// a cache can only be checked through autograd's version counter, which misses an in-place
// change made through `.data` (then every later step ran with the old weights).

// The vector whose lane l is the sum of acc[l]'s lanes, for N = L vectors. At each level the n
// vectors left are folded in pairs (i, i + n / 2) into n / 2 vectors, each holding both at half
// the width: with n vectors left, vector i holds acc[i + s n] in its segment s of n lanes, so
// after the last level lane l holds acc[l]. log2(L) levels of two shuffles and an add per pair.
constexpr int fold_lane(int L, int width, int p, bool upper) {
  const int half = width / 2, segment = p / half;
  return (segment % 2) * L + (segment / 2) * width + p % half + (upper ? half : 0);
}
template <typename S, int Width, size_t... P>
__attribute__((always_inline)) inline V<S> fold_pair(V<S> a, V<S> b, std::index_sequence<P...>) {
  constexpr int L = Vec<S>::L;
  return __builtin_shufflevector(a, b, fold_lane(L, Width, P, false)...) +
         __builtin_shufflevector(a, b, fold_lane(L, Width, P, true)...);
}
template <typename S, int N = Vec<S>::L>
__attribute__((always_inline)) inline V<S> lane_sums(V<S>* acc) {
  if constexpr (N == 1) {
    return acc[0];
  } else {
    for (int i = 0; i < N / 2; ++i)
      acc[i] = fold_pair<S, N>(acc[i], acc[i + N / 2], std::make_index_sequence<Vec<S>::L>{});
    return lane_sums<S, N / 2>(acc);
  }
}

// n weights from p in the compute type S: as stored (W = S), or float16 / bfloat16 widened to
// float32, which holds each of their values exactly. The single-step kernels read the weights
// of low-precision cells this way: converting them to float32 first, a copy of 2 MiB per step at
// hidden 256 (fresh memory: page faults), cost more than the step.
template <typename S, typename W>
__attribute__((always_inline)) inline V<S> load_weights(const W* p, int n) {
  if constexpr (std::is_same<W, S>::value) {
    return load(p, n);
  } else {
    static_assert(std::is_same<S, float>::value &&
                  (std::is_same<W, c10::Half>::value || std::is_same<W, c10::BFloat16>::value),
                  "load_weights widens float16 and bfloat16 to float32 only");
    // bfloat16 is the top half of a float32's bits: widened by a 16-bit shift.
#if defined(__AVX512F__)
    if (n == Vec<S>::L) {
      __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
      if constexpr (std::is_same<W, c10::Half>::value) return (V<S>)_mm512_cvtph_ps(raw);
      return (V<S>)_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
    }
#elif defined(__AVX2__) && defined(__F16C__)
    if (n == Vec<S>::L) {                       // the 16 floats as two halves of 8
      alignas(64) float wide[16];
      for (int half = 0; half < 2; ++half) {
        __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8 * half));
        __m256 v;
        if constexpr (std::is_same<W, c10::Half>::value) v = _mm256_cvtph_ps(raw);
        else v = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
        _mm256_store_ps(wide + 8 * half, v);
      }
      return load(wide, 16);
    }
#endif
    V<S> v = {};
    for (int i = 0; i < n; ++i) v[i] = static_cast<float>(p[i]);
    return v;
  }
}

// acc[b][l] += w[l ld + k] z[b zs + k] lane by lane over k < K, for NB rows of z and the
// first `rows` (<= R) of the R rows at w (the lanes are summed by lane_sums): each weight vector
// loaded once for the NB rows. One running pointer down the rows: with one per row (16) the
// compiler kept some of them on the stack and reloaded them at every step of k (batch 1 /
// hidden 256, 17.9 -> 16.9 us per step).
template <typename S, int NB, int R, typename W>
__attribute__((always_inline)) inline void accumulate_rows(V<S> (&acc)[NB][R], int rows,
                                                           const W* w, i64 ld, const S* z,
                                                           i64 zs, i64 K) {
  constexpr int L = Vec<S>::L;
  auto chunk = [&](i64 k, int n) __attribute__((always_inline)) {
    V<S> zv[NB];
    for (int b = 0; b < NB; ++b) zv[b] = load(z + b * zs + k, n);
    const W* p = w + k;
    for (int l = 0; l < rows; ++l, p += ld) {
      V<S> wv = load_weights<S>(p, n);
      for (int b = 0; b < NB; ++b) acc[b][l] += wv * zv[b];
    }
  };
  i64 k = 0;
  for (; k + L <= K; k += L) chunk(k, L);
  if (k < K) chunk(k, (int)(K - k));
}

// Products for the NB batch rows of x and h from row b0 with the n weight rows from `row` (a
// gate's unit block) of W_ih (if with_x) and W_hh (if with_h), summed: (NB, L) partial sums made
// R = L / NB weight rows at a time (NB x R accumulators), each row's L summed by lane_sums into
// out[(b0 + b) stride].
template <typename S, int NB, typename W>
__attribute__((always_inline)) inline void gate_rows(V<S>* out, i64 stride, i64 row, int n,
                                                     i64 b0, bool with_x, bool with_h,
                                                     const S* x, const W* w_ih, i64 I,
                                                     const S* h, const W* w_hh, i64 H) {
  constexpr int L = Vec<S>::L, R = L / NB;
  V<S> sums[NB][L] = {};
  for (int r0 = 0; r0 < n; r0 += R) {
    V<S> acc[NB][R] = {};
    // R for a full block (n the constant L): the accumulators stay in registers.
    const int rows = n == L ? R : std::min(R, n - r0);
    if (with_x) accumulate_rows<S, NB, R>(acc, rows, w_ih + (row + r0) * I, I, x + b0 * I, I, I);
    if (with_h) accumulate_rows<S, NB, R>(acc, rows, w_hh + (row + r0) * H, H, h + b0 * H, H, H);
    for (int b = 0; b < NB; ++b)
      for (int l = 0; l < R; ++l) sums[b][r0 + l] = acc[b][l];
  }
  for (int b = 0; b < NB; ++b) out[(b0 + b) * stride] = lane_sums<S>(sums[b]);
}

// gate_rows for all B batch rows: four at a time (each weight vector loaded serves the four),
// then one at a time. Two at a time was slower than one: LSTM per step, batch 2 / hidden 256,
// 26.0 against 23.4 us; four at a time, batch 4, 28.4 against 34.0, batch 8, 50.4 against 55.8.
template <typename S, typename W>
__attribute__((always_inline)) inline void batch_rows(V<S>* out, i64 stride, i64 row, int n,
                                                      i64 B, bool with_x, bool with_h,
                                                      const S* x, const W* w_ih, i64 I,
                                                      const S* h, const W* w_hh, i64 H) {
  i64 b = 0;
  for (; b + 4 <= B; b += 4)
    gate_rows<S, 4>(out, stride, row, n, b, with_x, with_h, x, w_ih, I, h, w_hh, H);
  for (; b < B; ++b)
    gate_rows<S, 1>(out, stride, row, n, b, with_x, with_h, x, w_ih, I, h, w_hh, H);
}

// The single-step cells.
enum class CellKind { LSTM = 0, GRU = 1, RNN_TANH = 2, RNN_RELU = 3, GRU_RESET_BEFORE = 4 };
// (native.py's CELL_KINDS)

// One step of a cell for the single-step API, inference only: x (B, I), h (B, H), c (B, H) for
// the LSTM, w_ih (G H, I), w_hh (G H, H), b_ih and b_hh (G H) or undefined, all contiguous ->
// h' (and c'). torch.nn's cells: the LSTM (gates i, f, g, o), the GRU with the reset gate applied
// after the product (r, z, n), the Elman RNN (tanh or relu). The unit blocks are split over
// the cores, the same blocks on the same thread every call, so that each core's rows of the
// weights (1 MiB of the LSTM's 2 at hidden and input 256) stay in its L2 cache from call to
// call. Each block's rows of a gate are read once for all batch rows (see batch_rows). W: the
// weights' element type, S or (S float32) float16 / bfloat16 (see load_weights). The LSTM
// also takes LSTMVariant's elementwise changes: peepholes (3H) or undefined, and the cell's
// form (see CellForm).
template <typename S, CellKind kind, typename W = S>
std::vector<Tensor> cell_step(const Tensor& x, const Tensor& h, const Tensor& c,
                              const Tensor& w_ih, const Tensor& w_hh, const Tensor& b_ih,
                              const Tensor& b_hh, const Tensor& peephole = {}, int form = 0) {
  constexpr int L = Vec<S>::L;
  const i64 B = x.size(0), I = x.size(1), H = h.size(1);
  // Products per block and batch row: the LSTM's four gates (input and state summed), the GRU's
  // input products of r, z, n and then its state products (n needs them apart), the RNN's one.
  constexpr int G = kind == CellKind::LSTM ? 4 : kind == CellKind::GRU ? 3 : 1;
  constexpr int slots = kind == CellKind::GRU ? 6 : G;
  Tensor h_new = pooled_empty({B, H}, x.options());
  Tensor c_new = kind == CellKind::LSTM ? pooled_clone(c) : Tensor();
  // The LSTM's a = (x W_ih^T + b_ih) + (h W_hh^T + b_hh): b_ih where the layer's projected
  // input row goes (row 0 for every batch row), b_hh as the bias.
  LSTMForwardGates<S> lstm{ptr<S>(b_ih), ptr<S>(b_hh), ptr<S>(c_new), nullptr, nullptr, H,
                           ptr<S>(peephole), form};
  GRUForwardGates<S, false> gru{nullptr, ptr<S>(b_ih), ptr<S>(b_hh), nullptr, H};
  const S* xs = ptr<S>(x);
  const S* hs = ptr<S>(h);
  const W* wi = ptr<W>(w_ih);
  const W* wh = ptr<W>(w_hh);
  const S* bi = ptr<S>(b_ih);
  const S* bh = ptr<S>(b_hh);
  S* hp = ptr<S>(h_new);
  const i64 J = (H + L - 1) / L;
  run_steps(worker_count(J, 2 * G * B * H * (I + H)), J, 1, [&](i64, i64 jb0, i64 jb1) {
    thread_local std::vector<V<S>> pre;                 // (B, slots), one block's products
    pre.resize(B * slots);
    for (i64 jb = jb0; jb < jb1; ++jb) {
      const i64 j = jb * L;
      at_width<S>(H, j, [&](int n) __attribute__((always_inline)) {
        for (int slot = 0; slot < slots; ++slot) {
          const int q = slot % G;
          const bool with_x = kind != CellKind::GRU || slot < G;
          const bool with_h = kind != CellKind::GRU || slot >= G;
          batch_rows<S>(&pre[slot], slots, q * H + j, n, B, with_x, with_h, xs, wi, I, hs, wh, H);
        }
        for (i64 b = 0; b < B; ++b) {
          const V<S>* p = &pre[b * slots];
          V<S> out;
          if constexpr (kind == CellKind::LSTM) {
            out = lstm(b, 0, jb, p, n);
          } else if constexpr (kind == CellKind::GRU) {
            out = gru.from_products(b, jb, p, p + 3, load(hs + b * H + j, n), n);
          } else {
            out = rnn_act<S>(p[0] + load_bias(bi, j, n) + load_bias(bh, j, n),
                             kind == CellKind::RNN_RELU);
          }
          store(hp + b * H + j, out, n);
        }
      });
    }
  });
  if constexpr (kind == CellKind::LSTM) return {h_new, c_new};
  return {h_new};
}

// The reset-before GRU's single step (see GRUResetBeforeGates), in two phases as its generic
// driver's, since the candidate's product needs r h whole: run_steps' step 0 makes each
// block's r and z (the input's and the state's products apart, as the driver sums them), r h,
// z and the input's product of n into buffers of the call; step 1 the candidate's product over
// r h, the candidate and h'. Arguments (and W) as cell_step's.
template <typename S, typename W = S>
std::vector<Tensor> gru_reset_before_step(const Tensor& x, const Tensor& h, const Tensor& w_ih,
                                          const Tensor& w_hh, const Tensor& b_ih,
                                          const Tensor& b_hh) {
  constexpr int L = Vec<S>::L;
  const i64 B = x.size(0), I = x.size(1), H = h.size(1);
  Tensor h_new = pooled_empty({B, H}, x.options());
  Tensor rh = pooled_empty({B, H}, x.options()), z = pooled_empty({B, H}, x.options());
  Tensor x_n = pooled_empty({B, H}, x.options());
  GRUResetBeforeGates<S, false> gates{ptr<S>(b_ih), ptr<S>(b_hh), H};
  const S* xs = ptr<S>(x);
  const S* hs = ptr<S>(h);
  const W* wi = ptr<W>(w_ih);
  const W* wh = ptr<W>(w_hh);
  S* hp = ptr<S>(h_new);
  S* rhp = ptr<S>(rh);
  S* zp = ptr<S>(z);
  S* xnp = ptr<S>(x_n);
  const i64 J = (H + L - 1) / L;
  // Products per block and batch row: step 0 the input's of r, z, n, then the state's of r, z;
  // step 1 the candidate's, (r h) W_hn^T.
  constexpr int slots = 5;
  run_steps(worker_count(J, 6 * B * H * (I + H)), J, 2, [&](i64 s, i64 jb0, i64 jb1) {
    thread_local std::vector<V<S>> pre;                 // (B, slots), one block's products
    pre.resize(B * slots);
    for (i64 jb = jb0; jb < jb1; ++jb) {
      const i64 j = jb * L;
      at_width<S>(H, j, [&](int n) __attribute__((always_inline)) {
        auto products = [&](int slot, i64 row, bool with_x, const S* state) {
          batch_rows<S>(&pre[slot], slots, row, n, B, with_x, !with_x, xs, wi, I, state, wh, H);
        };
        if (s == 0) {
          for (int q = 0; q < 3; ++q) products(q, q * H + j, true, hs);
          for (int q = 0; q < 2; ++q) products(3 + q, q * H + j, false, hs);
          for (i64 b = 0; b < B; ++b) {
            const V<S>* p = &pre[b * slots];
            V<S> r = gates.gate(0, p[0], p[3], j, n);
            store(zp + b * H + j, gates.gate(1, p[1], p[4], j, n), n);
            store(rhp + b * H + j, r * load(hs + b * H + j, n), n);
            store(xnp + b * H + j, p[2], n);
          }
        } else {
          products(0, 2 * H + j, false, rhp);
          for (i64 b = 0; b < B; ++b) {
            V<S> nn = gates.candidate(load(xnp + b * H + j, n), pre[b * slots], j, n);
            V<S> hv = load(hs + b * H + j, n);
            store(hp + b * H + j, nn + load(zp + b * H + j, n) * (hv - nn), n);
          }
        }
      });
    }
  });
  return {h_new};
}

// ==========================================================================================
// Per-sequence products: the input projection of all steps before the loop; after the backward
// loop, dX and the weight and bias gradients. Large matrix products, here rather than in Python
// so that a layer's whole forward or backward is one call: at batch 1 the two dozen ATen and
// Python calls around the loops (views, copies, splits, each 1-5 us) cost as much as the loops.
// ==========================================================================================

// out = a @ b: out (M, N), a (M, K), b (K, N).
template <typename S>
void gemm(Strided<S> out, Strided<S> a, Strided<S> b) {
  if (out.rows == 0 || out.cols == 0) return;
  if (a.cols == 0) {
    out.tensor().zero_();
    return;
  }
  if (std::is_same<S, float>::value && use_onednn && out.trans() == 'N' && a.trans() &&
      b.trans() && 2.0 * out.rows * out.cols * a.cols >= onednn_min_flops)
    return onednn_mm(out.tensor(), a.tensor(), b.tensor(), false);
#if defined(__linux__) && defined(LSTMKIT_X86)
  if (use_mkl && mkl_gemm() && out.trans() == 'N' && a.trans() && b.trans()) {
    // Column-major: out^T (N, M) = b^T a^T.
    const char ta = b.trans(), tb = a.trans();
    const int m = (int)out.cols, n = (int)out.rows, k = (int)a.cols;
    const int lda = b.ld(), ldb = a.ld(), ldc = out.ld();
    const S one = 1, zero = 0;
    if constexpr (std::is_same<S, float>::value)
      sgemm_(&ta, &tb, &m, &n, &k, &one, b.p, &lda, a.p, &ldb, &zero, out.p, &ldc);
    else
      dgemm_(&ta, &tb, &m, &n, &k, &one, b.p, &lda, a.p, &ldb, &zero, out.p, &ldc);
    return;
  }
#endif
  Tensor o = out.tensor();
  at::mm_out(o, a.tensor(), b.tensor());
}

// Products to run together: out = a @ b for each queued (out, a, b), in one parallel region.
// Each product is cut into row slices, one per thread, and each slice is one single-threaded
// matrix multiply: for the products of a layer (dX, the weight gradients) this replaces
// several multi-threaded calls, each with its own fork and join of the thread team, by one.
struct Products {
  std::vector<Tensor> outs, as, bs;
  // Sums over rows, a^T b for a (N, C) and b (N, G) row-major: in `sums` after run(), one
  // (C, G) partial sum per thread (threads, C, G), to be added up by the reader (see
  // transposed_sum).
  // A sum's `fill` (may be empty): fill(n0, n1) writes rows [n0, n1) of its a, called by the
  // thread that sums over them right before its product, so that a is made in parallel and
  // read from that core's cache.
  std::vector<Tensor> sum_as, sum_bs;
  std::vector<std::function<void(i64, i64)>> sum_fills;
  std::vector<Tensor> sums;
  void add(const Tensor& out, const Tensor& a, const Tensor& b) {
    outs.push_back(out); as.push_back(a); bs.push_back(b);
  }
  size_t add_sum(const Tensor& a, const Tensor& b, std::function<void(i64, i64)> fill = {}) {
    sum_as.push_back(a); sum_bs.push_back(b); sum_fills.push_back(std::move(fill));
    return sum_as.size() - 1;
  }
  void run() {
    double flops = 0;
    for (size_t i = 0; i < outs.size(); ++i)
      flops += 2.0 * outs[i].size(0) * outs[i].size(1) * as[i].size(1);
    for (size_t i = 0; i < sum_as.size(); ++i)
      flops += 2.0 * sum_as[i].numel() * sum_bs[i].size(1);
    // Small products (batch 1, short sequences) run on the calling thread: waking the thread
    // team costs more than the product, and far more when another process holds the other core.
    const i64 threads = flops < SERIAL_FLOPS ? 1 : std::max<i64>(1, at::get_num_threads());
    sums.clear();
    for (size_t i = 0; i < sum_as.size(); ++i)
      sums.push_back(pooled_empty({threads, sum_as[i].size(1), sum_bs[i].size(1)},
                                  sum_bs[i].options()));
    // Thread `part` takes row slice `part` of every product: each thread gets an equal share of
    // every product. (Numbering the tasks product-major instead gave one thread both halves of
    // the largest product, dW_hh, and the other thread the small ones.) In a sum over rows the
    // slice is of the rows summed over, into the thread's own partial sum.
    auto slices = [&](i64 p0, i64 p1) {
      c10::NoGradGuard no_grad;   // grad mode is thread-local: the pool's threads lack it
      for (i64 part = p0; part < p1; ++part) {
        for (size_t i = 0; i < outs.size(); ++i) {
          i64 M = outs[i].size(0), r0 = M * part / threads, r1 = M * (part + 1) / threads;
          if (r1 <= r0) continue;
          LSTMKIT_DISPATCH(outs[i].scalar_type(), [&] {
            gemm(Strided<scalar>::of(outs[i]).rows_at(r0, r1 - r0),
                 Strided<scalar>::of(as[i]).rows_at(r0, r1 - r0), Strided<scalar>::of(bs[i]));
          });
        }
        for (size_t i = 0; i < sum_as.size(); ++i) {
          i64 N = sum_as[i].size(0), n0 = N * part / threads, n1 = N * (part + 1) / threads;
          if (sum_fills[i] && n1 > n0) sum_fills[i](n0, n1);
          LSTMKIT_DISPATCH(sum_as[i].scalar_type(), [&] {
            const i64 C = sums[i].size(1), G = sums[i].size(2);
            gemm(Strided<scalar>{sums[i].data_ptr<scalar>() + part * C * G, C, G, G, 1},
                 Strided<scalar>::of(sum_as[i]).rows_at(n0, n1 - n0).t(),
                 Strided<scalar>::of(sum_bs[i]).rows_at(n0, n1 - n0));
          });
        }
      }
    };
    if (threads == 1) slices(0, 1);
    else at::parallel_for(0, threads, 1, slices);
  }
};

// out (G, n)[g][c] = sum over t of parts (T, C, G)[t][row + c][g]: rows [row, row + n) of a
// sum of partial sums, added up and transposed in one pass. ATen's transposing copy ran at
// 8-13 GB/s (4.1 ms for W_hh's gradient at hidden 1024); here 16 x 16 tiles are added as
// vectors and transposed in registers.
template <typename S>
void transposed_sum(const Tensor& parts, i64 row, i64 n, const Tensor& out) {
  const i64 T = parts.size(0), C = parts.size(1), G = parts.size(2);
  const S* src = parts.data_ptr<S>();
  S* dst = out.data_ptr<S>();
  constexpr i64 TILE = 16;
  auto element = [&](i64 g, i64 c) {
    S total = 0;
    for (i64 t = 0; t < T; ++t) total += src[(t * C + row + c) * G + g];
    dst[g * n + c] = total;
  };
  // Pieces of 4096 elements: at batch 8 / hidden 64 (256 x 64 per gradient) both threads take
  // part, and each reads half of the other core's partial sum (it was one piece of 16384:
  // training 8 / 64 0.962-0.982, 16 / 64 0.974-0.979, larger shapes unchanged).
  const i64 grain = std::max<i64>(1, 4096 / std::max<i64>(1, n * TILE));
  at::parallel_for(0, (G + TILE - 1) / TILE, grain, [&](i64 gt0, i64 gt1) {
    for (i64 gt = gt0; gt < gt1; ++gt) {
      const i64 g0 = gt * TILE, gn = std::min(TILE, G - g0);
      for (i64 c0 = 0; c0 < n; c0 += TILE) {
        const i64 cn = std::min(TILE, n - c0);
#ifdef __AVX512F__
        if constexpr (std::is_same<S, float>::value) {
          if (gn == TILE && cn == TILE) {
            alignas(64) float rows[TILE][TILE], cols[TILE][TILE];
            for (i64 c = 0; c < TILE; ++c) {
              __m512 v = _mm512_loadu_ps(src + (row + c0 + c) * G + g0);
              for (i64 t = 1; t < T; ++t)
                v = _mm512_add_ps(v, _mm512_loadu_ps(src + (t * C + row + c0 + c) * G + g0));
              _mm512_store_ps(rows[c], v);
            }
            transpose16(&rows[0][0], TILE, cols);
            for (i64 g = 0; g < TILE; ++g) std::memcpy(dst + (g0 + g) * n + c0, cols[g], sizeof(cols[g]));
            continue;
          }
        }
#endif
        for (i64 g = g0; g < g0 + gn; ++g)
          for (i64 c = c0; c < c0 + cn; ++c) element(g, c);
      }
    }
  });
}

// x (N, K) W^T (G, K): every step's input part, in pooled memory. The kernels add the biases as
// they read it (added into this product, the bias doubled its memory traffic).
Tensor input_projection(const Tensor& x, const Tensor& w) {
  Tensor out = pooled_empty({x.size(0), w.size(0)}, x.options());
  Products jobs;
  jobs.add(out, x, w.t());
  jobs.run();
  return out;
}

// Rows [n0, n1) of `into`: for each row of `sequence` (N, F), the state its step started from
// (see layout.py), from `initial` (B, F) at the first step; rows of unit column stride,
// possibly columns of a wider buffer (the stacked operand of WeightGradients).
void previous_rows_range(const Tensor& into, const Tensor& sequence, const Tensor& initial,
                         const Steps& st, i64 n0, i64 n1) {
  const size_t bytes = sequence.size(1) * sequence.element_size();
  const size_t into_row = leading(into, 0) * into.element_size();
  const char* seq = static_cast<const char*>(sequence.data_ptr());
  const char* init = static_cast<const char*>(initial.data_ptr());
  char* res = static_cast<char*>(into.data_ptr());
  // The step of row n0: offsets grow with the step (in time order, either direction).
  i64 t = std::upper_bound(st.offset.begin(), st.offset.end(), n0) - st.offset.begin() - 1;
  for (i64 r = n0; r < n1; ++t) {
    const i64 u = st.before(t);
    for (i64 b = r - st.offset[t]; b < st.size[t] && r < n1; ++b, ++r) {
      i64 src = st.row(u, b);
      std::memcpy(res + r * into_row, src >= 0 ? seq + src * bytes : init + b * bytes, bytes);
    }
  }
}

void check_previous_rows(const Tensor& into, const Tensor& sequence, const Tensor& initial) {
  TORCH_CHECK(into.dim() == 2 && into.size(0) == sequence.size(0) &&
              into.size(1) == sequence.size(1) &&
              into.scalar_type() == sequence.scalar_type() && unit_stride(into, 1) &&
              sequence.is_contiguous() && initial.is_contiguous(),
              "previous_rows: `into` must be ", sequence.sizes(), " with unit column stride");
}

// All rows (see previous_rows_range), in parallel when there is much to copy (3.2 MB at batch
// 32 / hidden 256 / length 100, mostly not in cache: 0.47 ms on one thread inside a training
// step).
void previous_rows(const Tensor& into, const Tensor& sequence, const Tensor& initial,
                   const Steps& st) {
  check_previous_rows(into, sequence, initial);
  const i64 bytes = sequence.size(1) * sequence.element_size();
  at::parallel_for(0, sequence.size(0), std::max<i64>(1, (1 << 18) / std::max<i64>(1, bytes)),
                   [&](i64 n0, i64 n1) {
    previous_rows_range(into, sequence, initial, st, n0, n1);
  });
}

// The gradients of the weights a pre-activation d_pre (N, G) came through: dW_x = d_pre^T x
// (G, I), dW_h = d_pre^T h_prev (G, P) and db = d_pre.sum(0) (G,), queued in `jobs`, in one of
// two ways:
// - stacked: one product [x | h_prev | 1]^T d_pre, which reads d_pre, the largest operand, once
//   instead of once per gradient, each thread summing over its share of the N rows (see
//   take() for the sum of the threads' partial sums);
// - separate: a product per gradient, d_pre^T x and so on, split by output rows, each written
//   straight into its own tensor: no stacked copy of x and h_prev, no partial sums.
// Stacked from STACKED_MIN_ROWS rows, while the threads' partial sums (threads x count x G)
// take no more memory than d_pre (N x G), that is threads x count <= N: beyond that writing and
// adding them costs more than reading d_pre again, and their memory grows with the thread count
// (64 threads would hold 64 of them). LSTM training step, length 100 (N = 100 x batch), input
// 64, two threads, interleaved medians, stacked / separate: batch 1 hidden 64-1024 1.01-1.13,
// batch 4 1.02-1.05; batch 8 hidden 32 0.98, 64 1.00, 128 0.97, 256 0.99 (2 x 321 <= 800),
// but 512 1.02 and 1024 1.07 (2 x 577 > 800); batch 16 hidden 128 0.93, 256 0.95; 32 / 64 0.92.
// `x` undefined: dW_x not wanted; `sequence` undefined: dW_h not wanted, else h_prev is the
// previous rows of `sequence` (N, P) from `initial` (B, P), or `sequence` itself when `initial`
// is undefined (the LSTM saves h_prev, see NativeLSTMLayer).
constexpr i64 STACKED_MIN_ROWS = 800;
int weight_products_form = 0;     // 0 by size as above; tests set 1 (separate) or 2 (stacked)
bool stacked_weight_products(i64 N, i64 count, i64 threads) {
  if (weight_products_form) return weight_products_form == 2;
  return N >= STACKED_MIN_ROWS && threads * count <= N;
}

struct WeightGradients {
  i64 stacked_sum = -1;           // stacked: the index of its sum in the Products
  Tensor separate[3];             // separate: dW_x, dW_h, db
  i64 x_cols = 0, h_cols = 0;
  bool bias = false;
  WeightGradients(Products& jobs, const Tensor& d_pre, const Tensor& x, const Tensor& sequence,
                  const Tensor& initial, const Steps& st, bool with_bias)
      : x_cols(x.defined() ? x.size(1) : 0), h_cols(sequence.defined() ? sequence.size(1) : 0),
        bias(with_bias) {
    const i64 count = x_cols + h_cols + (bias ? 1 : 0), N = d_pre.size(0), G = d_pre.size(1);
    if (count == 0) return;
    if (!stacked_weight_products(N, count, at::get_num_threads())) {
      if (x_cols) {
        separate[0] = pooled_empty({G, x_cols}, d_pre.options());
        jobs.add(separate[0], d_pre.t(), x);
      }
      if (h_cols) {
        Tensor h_prev = sequence;
        if (initial.defined()) {
          h_prev = pooled_empty(sequence.sizes(), sequence.options());
          previous_rows(h_prev, sequence, initial, st);
        }
        separate[1] = pooled_empty({G, h_cols}, d_pre.options());
        jobs.add(separate[1], d_pre.t(), h_prev);
      }
      if (bias) {
        separate[2] = pooled_empty({G}, d_pre.options());
        jobs.add(separate[2].view({G, 1}), d_pre.t(),
                 pooled_empty({N, 1}, d_pre.options()).fill_(1));
      }
      return;
    }
    // [x | h_prev | 1], each thread writing the rows it sums over (Products' fill). Made before
    // the products by ATen's copies, it cost 160 us of a 7 ms training step at batch 32 /
    // hidden 128 and was read back from L3.
    Tensor stacked = pooled_empty({N, count}, d_pre.options());
    TORCH_CHECK((!x_cols || x.scalar_type() == d_pre.scalar_type()) &&
                (!h_cols || sequence.scalar_type() == d_pre.scalar_type()),
                "WeightGradients: x and the states must have the gradient's dtype");
    if (h_cols && initial.defined())
      check_previous_rows(stacked.narrow(1, x_cols, h_cols), sequence, initial);
    auto fill = [stacked, x = x_cols ? x.contiguous() : x,
                 sequence = h_cols ? sequence.contiguous() : sequence, initial, &st,
                 x_cols = x_cols, h_cols = h_cols, bias = bias, count](i64 n0, i64 n1) {
      const i64 item = stacked.element_size(), row = count * item;
      char* out = static_cast<char*>(stacked.data_ptr());
      // Rows [n0, n1) of `from` (N, cols) into columns [col, col + cols).
      auto copy_columns = [&](const Tensor& from, i64 col, i64 cols) {
        const char* src = static_cast<const char*>(from.data_ptr());
        for (i64 r = n0; r < n1; ++r)
          std::memcpy(out + r * row + col * item, src + r * cols * item, cols * item);
      };
      if (x_cols) copy_columns(x, 0, x_cols);
      if (h_cols && initial.defined())
        previous_rows_range(stacked.narrow(1, x_cols, h_cols), sequence, initial, st, n0, n1);
      else if (h_cols)
        copy_columns(sequence, x_cols, h_cols);
      if (bias) {
        const float one_f = 1;
        const double one_d = 1;
        const void* one = item == 4 ? (const void*)&one_f : (const void*)&one_d;
        for (i64 r = n0; r < n1; ++r) std::memcpy(out + r * row + (count - 1) * item, one, item);
      }
    };
    // The transpose [x | h_prev | 1]^T d_pre (count, G), each thread's share of the rows summed
    // after: MKL runs this form faster than d_pre^T [x | h_prev | 1] split by output rows
    // (one core, batch 32 / hidden 128 / length 100: 1.91 vs 2.28 ms; 32 / 256 6.18 vs 6.74;
    // 8 / 128 0.44 vs 0.55), and the transposing copies that make dW_x and dW_h of its rows
    // replace the column copies the other form needed.
    stacked_sum = (i64)jobs.add_sum(stacked, d_pre, fill);
  }
  // {dW_x, dW_h, db} after jobs.run(), undefined where not wanted: stacked, dW_x and dW_h the
  // transposed rows of the sum, db (G,) its last row.
  std::vector<Tensor> take(const Products& jobs) const {
    if (stacked_sum < 0) return {separate[0], separate[1], separate[2]};
    const Tensor& parts = jobs.sums[stacked_sum];
    const i64 G = parts.size(2);
    std::vector<Tensor> grads(3);
    const i64 widths[3] = {x_cols, h_cols, bias ? 1 : 0};
    for (i64 k = 0, row = 0; k < 3; row += widths[k], ++k) {
      if (!widths[k]) continue;
      grads[k] = pooled_empty(k == 2 ? std::vector<i64>{G} : std::vector<i64>{G, widths[k]},
                              parts.options());
      if (parts.scalar_type() == at::kFloat) transposed_sum<float>(parts, row, widths[k], grads[k]);
      else transposed_sum<double>(parts, row, widths[k], grads[k]);
    }
    return grads;
  }
};

// The gradient arriving at a Function's output: in the compute dtype and contiguous; copied
// into pooled memory when it is not (the gradient of out.sum() is a broadcast, and a fresh copy
// of it faults in a page per 4 KiB).
Tensor incoming(const Tensor& d, at::ScalarType dtype) {
  Tensor t = d.to(dtype);
  return plain_memory(t) ? t : pooled_clone(t);
}

inline Tensor optional_contiguous(const c10::optional<Tensor>& t) {
  return t.has_value() && t->defined() ? t->contiguous() : Tensor();
}
// An optional tensor as an undefined Tensor when absent, and back.
inline Tensor given(const c10::optional<Tensor>& t) {
  return t.has_value() && t->defined() ? *t : Tensor();
}
inline c10::optional<Tensor> maybe(const Tensor& t) {
  return t.defined() ? c10::optional<Tensor>(t) : c10::nullopt;
}

// psi(c) of the LSTM's output m = o psi(c) for a cell form (see CellForm), over a whole tensor.
Tensor output_activation(const Tensor& c, int form) {
  switch (CellForm(form).output) {
    case 0: return at::tanh(c);
    case 1: return at::div(c, at::add(at::abs(c), 1));
    case 2: return at::clamp(c, -1, 1);
    default: return c;
  }
}

// b_ih + b_hh, or whichever is given (undefined for none): the LSTM's and RNN's one bias.
Tensor bias_sum(const Tensor& b_ih, const Tensor& b_hh) {
  if (!b_ih.defined() || !b_hh.defined()) return b_ih.defined() ? b_ih : b_hh;
  const auto dtype = b_ih.scalar_type();
  if (dtype != b_hh.scalar_type() || b_ih.sizes() != b_hh.sizes() || !b_ih.is_contiguous() ||
      !b_hh.is_contiguous() || (dtype != at::kFloat && dtype != at::kDouble))
    return at::add(b_ih, b_hh);
  // A loop rather than at::add, whose dispatch costs more than this sum of a few KiB.
  Tensor sum = pooled_empty(b_ih.sizes(), b_ih.options());
  return LSTMKIT_DISPATCH(b_ih.scalar_type(), [&] {
    const scalar* a = b_ih.data_ptr<scalar>();
    const scalar* b = b_hh.data_ptr<scalar>();
    scalar* out = sum.data_ptr<scalar>();
    for (i64 i = 0, n = sum.numel(); i < n; ++i) out[i] = a[i] + b[i];
    return sum;
  });
}

// ---- dispatch by dtype -------------------------------------------------------------------

void check_cpu(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU, got ", t.device());
}

// The first shape mismatch of several checks, in words, kept in `wrong`: t (undefined: not
// given, no check) against its expected shape, unless an earlier check already failed.
void expect_shape(std::string& wrong, const char* name, const Tensor& t,
                  at::IntArrayRef expected) {
  if (!wrong.empty() || !t.defined() || t.sizes() == expected) return;
  wrong = c10::str(name, " must have shape ", expected, ", got ", t.sizes());
}

// A layer's weights against its input x (N, I) and states, before a kernel reads them with the
// strides those imply: w_ih (G H, I), w_hh (G H, P), the biases (G H), w_hr (P, H), the
// peepholes (3H). A parameter replaced by one of another shape was read out of step, or past
// its end, with no error. What is wrong, in words, or empty when they fit.
std::string layer_weights_mismatch(i64 gates, const Tensor& x, i64 H, i64 P, const Tensor& w_ih,
                                   const Tensor& w_hh, const Tensor& b_ih, const Tensor& b_hh,
                                   const Tensor& w_hr = {}, const Tensor& w_peephole = {}) {
  std::string wrong;
  expect_shape(wrong, "w_ih", w_ih, {gates * H, x.size(-1)});   // x: rows, or (T, B, I)
  expect_shape(wrong, "w_hh", w_hh, {gates * H, P});
  expect_shape(wrong, "b_ih", b_ih, {gates * H});
  expect_shape(wrong, "b_hh", b_hh, {gates * H});
  expect_shape(wrong, "w_hr", w_hr, {P, H});
  expect_shape(wrong, "w_peephole", w_peephole, {3 * H});
  return wrong;
}

// The same as a ValueError (see layer_weights_mismatch).
void check_layer_weights(i64 gates, const Tensor& x, i64 H, i64 P, const Tensor& w_ih,
                         const Tensor& w_hh, const c10::optional<Tensor>& b_ih,
                         const c10::optional<Tensor>& b_hh,
                         const c10::optional<Tensor>& w_hr = c10::nullopt,
                         const c10::optional<Tensor>& w_peephole = c10::nullopt) {
  const std::string wrong = layer_weights_mismatch(gates, x, H, P, w_ih, w_hh, given(b_ih),
                                                   given(b_hh), given(w_hr), given(w_peephole));
  TORCH_CHECK_VALUE(wrong.empty(), wrong);
}

// A per-sequence mask (B, F) as one row for each of the N rows, (N, F): row b of each step's
// rows gets the mask's row b (recurrent dropout's operand of dW_hh).
Tensor mask_of_each_row(const Tensor& mask, const Steps& st) {
  Tensor batch_row = at::empty({st.rows}, at::kLong);
  int64_t* r = batch_row.data_ptr<int64_t>();
  for (size_t t = 0; t < st.offset.size(); ++t)
    for (i64 b = 0; b < st.size[t]; ++b) r[st.offset[t] + b] = b;
  return mask.index_select(0, batch_row);
}

// A zoneout mask against its layer: (N, width) or (1, width), else a ValueError; the mask
// contiguous, undefined when not given. (Its dtype is x's: the callers convert it with x.)
Tensor checked_zoneout_mask(const char* name, const c10::optional<Tensor>& mask, const Tensor& x,
                            i64 width) {
  if (!mask.has_value()) return Tensor();
  const Tensor& z = *mask;
  TORCH_CHECK_VALUE(z.dim() == 2 && (z.size(0) == x.size(0) || z.size(0) == 1) &&
                        z.size(1) == width,
                    name, " must have shape (", x.size(0), ", ", width, ") or (1, ", width,
                    "), got ", z.sizes());
  return z.contiguous();
}

// Recurrent dropout's mask against h0: the same shape, else a ValueError; contiguous, undefined
// when not given.
Tensor checked_recurrent_mask(const c10::optional<Tensor>& mask, const Tensor& h0) {
  Tensor d = optional_contiguous(mask);
  TORCH_CHECK_VALUE(!d.defined() || d.sizes() == h0.sizes(), "recurrent must have h0's shape ",
                    h0.sizes(), ", got ", d.sizes());
  return d;
}

// The layers' batch sizes against x's rows and h0's batch (what the loops read), else a
// ValueError.
void check_steps(const Steps& st, const Tensor& x, const Tensor& h0) {
  TORCH_CHECK_VALUE(x.dim() == 2 && h0.dim() == 2 && st.rows == x.size(0) &&
                        st.batch == h0.size(0),
                    "batch_sizes (", st.rows, " rows, batch ", st.batch, ") do not fit x's ",
                    x.sizes(), " and h0's ", h0.sizes());
}

// One LSTM layer, one direction: x (N, I) -> out (N, P), h_T, c_T, gates, cells (see
// lstm_forward). With input_in_step (generic driver, no projection) the input is multiplied
// inside each step's product; else projected for all steps first. zoneout_h (N or 1, P),
// zoneout_c (N or 1, H): zoneout's masks; recurrent (B, P):
// recurrent dropout's mask.
std::vector<Tensor> lstm_layer_forward(Tensor x, c10::optional<Tensor> b_ih,
                                       c10::optional<Tensor> b_hh, Tensor h0, Tensor c0,
                                       Tensor w_ih, Tensor w_hh, c10::optional<Tensor> w_hr,
                                       std::vector<i64> batch_sizes, bool reverse, bool save,
                                       i64 parts, bool input_in_step, bool own_product,
                                       c10::optional<Tensor> w_peephole, i64 cell_form,
                                       c10::optional<Tensor> zoneout_h,
                                       c10::optional<Tensor> zoneout_c,
                                       c10::optional<Tensor> recurrent) {
  check_cpu(x, "x");
  check_layer_weights(4, x, c0.size(1), h0.size(1), w_ih, w_hh, b_ih, b_hh, w_hr, w_peephole);
  TORCH_CHECK_VALUE(c0.dim() == 2 && h0.dim() == 2 && c0.size(0) == h0.size(0),
                    "c0 must have h0's batch ", h0.size(0), ", got ", c0.sizes());
  Tensor zone_h = checked_zoneout_mask("zoneout_h", zoneout_h, x, h0.size(1));
  Tensor zone_c = checked_zoneout_mask("zoneout_c", zoneout_c, x, c0.size(1));
  Tensor dropout = checked_recurrent_mask(recurrent, h0);
  for (auto* t : {&h0, &c0, &w_ih, &w_hh}) *t = t->contiguous();
  Tensor bias = bias_sum(optional_contiguous(b_ih), optional_contiguous(b_hh));
  Steps st(batch_sizes, reverse);
  check_steps(st, x, h0);
  // At batch 1 the fused driver (parts 0) projects the input itself (see lstm_forward).
  // Interleaved medians, forward ms, MKL's projection vs the workers': hidden 64 0.153 vs
  // 0.142, 256 0.701 vs 0.653; at batch 2 / hidden 256 0.884 vs 0.911, at batch 6 / hidden 64
  // 0.389 vs 0.417 (there MKL's product of the 600 rows is the faster one).
  const bool take_x =
      input_in_step || (parts == 0 && !w_hr.has_value() && batch_sizes[0] == 1);
  Tensor input = take_x ? x.contiguous() : input_projection(x, w_ih);
  return LSTMKIT_DISPATCH(x.scalar_type(), [&] {
    return lstm_forward<scalar>(input, bias, h0, c0, w_hh, w_hr, st, save, parts,
                                take_x ? w_ih : Tensor(), own_product,
                                optional_contiguous(w_peephole), (int)cell_form, zone_h,
                                zone_c, dropout);
  });
}

// The whole backward of one LSTM layer, one direction: the step loop, then dX = d_gates W_ih,
// the weight and bias gradients and dW_hr in one parallel region. h_prev (N, P): the state
// each row's step started from (the previous rows of the output, see previous_rows); h0
// itself is not needed. needs: which of (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, w_peephole)
// want a gradient. zoneout_h, zoneout_c, recurrent: the forward's masks (it checked them).
// Returns dx, dh0, dc0, dw_ih, dw_hh, db (the gradient of b_ih + b_hh), dw_hr, dw_peephole,
// undefined where not wanted.
std::vector<Tensor> lstm_layer_backward(Tensor d_out, Tensor d_hT, Tensor d_cT, Tensor x,
                                        Tensor c0, Tensor w_ih, Tensor w_hh,
                                        c10::optional<Tensor> w_hr, Tensor h_prev, Tensor gates,
                                        Tensor cells, std::vector<i64> batch_sizes, bool reverse,
                                        i64 parts, bool own_product, std::vector<bool> needs,
                                        c10::optional<Tensor> w_peephole, i64 cell_form,
                                        c10::optional<Tensor> zoneout_h,
                                        c10::optional<Tensor> zoneout_c,
                                        c10::optional<Tensor> recurrent) {
  TORCH_CHECK(needs.size() == 9, "lstm_layer_backward: needs has 9 flags, got ", needs.size());
  const auto dtype = gates.scalar_type();
  d_out = incoming(d_out, dtype); d_hT = incoming(d_hT, dtype); d_cT = incoming(d_cT, dtype);
  for (auto* t : {&c0, &w_hh, &h_prev, &gates, &cells}) *t = t->contiguous();
  Tensor w_hr_c = optional_contiguous(w_hr);
  Steps st(batch_sizes, reverse);
  Tensor peephole = optional_contiguous(w_peephole);
  Tensor zone_h = optional_contiguous(zoneout_h), zone_c = optional_contiguous(zoneout_c);
  Tensor dropout = optional_contiguous(recurrent);
  const i64 H = cells.size(1);
  // With zoneout_h, the share of each step's dh that goes to the step before (see
  // LSTMBackwardGates and lstm_backward), added to dh0 at the end.
  Tensor dh_carry =
      zone_h.defined() ? pooled_empty({st.batch, d_hT.size(1)}, gates.options()).zero_()
                       : Tensor();
  auto loop = LSTMKIT_DISPATCH(dtype, [&] {
    return lstm_backward<scalar>(d_out, d_hT, d_cT, c0, w_hh, w_hr, gates, cells, st, parts,
                                 own_product, peephole, (int)cell_form, zone_h, zone_c,
                                 dh_carry, dropout);
  });
  if (dh_carry.defined()) loop[1].add_(dh_carry);
  const Tensor& d_gates = loop[0];
  // Each row's c_prev (N, H), made once if wanted.
  Tensor c_prev;
  auto previous_cells = [&]() {
    if (!c_prev.defined()) {
      c_prev = pooled_empty(cells.sizes(), cells.options());
      previous_rows(c_prev, cells, c0, st);
    }
    return c_prev;
  };
  // c~, the cell psi and the output peephole saw: cells itself without zoneout_c, else
  // f c_prev + i g (see LSTMBackwardGates).
  Tensor c_cell = cells;
  if (zone_c.defined() && ((w_hr_c.defined() && needs[7]) || (peephole.defined() && needs[8])))
    c_cell = at::addcmul(at::mul(gates.narrow(1, H, H), previous_cells()), gates.narrow(1, 0, H),
                         gates.narrow(1, 2 * H, H));
  Products jobs;
  Tensor dx;
  if (needs[0]) {
    dx = pooled_empty(x.sizes(), x.options());
    jobs.add(dx, d_gates, w_ih);
  }
  // W_hh's operand: the previous rows of h, times the dropout mask of their batch row.
  if (dropout.defined() && needs[4])
    h_prev = at::mul(h_prev, mask_of_each_row(dropout, st));
  WeightGradients weights(jobs, d_gates, needs[3] ? x : Tensor(), needs[4] ? h_prev : Tensor(),
                          Tensor(), st, needs[5] || needs[6]);
  Tensor dw_hr;
  if (w_hr_c.defined() && needs[7]) {
    // o psi(c~): W_hr's operand.
    Tensor m = at::mul(gates.narrow(1, 3 * H, H), output_activation(c_cell, (int)cell_form));
    dw_hr = pooled_empty(w_hr_c.sizes(), w_hr_c.options());
    jobs.add(dw_hr, loop[3].t(), m);
  }
  jobs.run();
  auto w = weights.take(jobs);
  Tensor dw_peephole;
  if (peephole.defined() && needs[8]) {
    // dp_i = sum over rows of da_i c_prev, dp_f of da_f c_prev, dp_o of da_o c~.
    previous_cells();
    dw_peephole = at::cat({at::sum(at::mul(d_gates.narrow(1, 0, H), c_prev), {0}),
                           at::sum(at::mul(d_gates.narrow(1, H, H), c_prev), {0}),
                           at::sum(at::mul(d_gates.narrow(1, 3 * H, H), c_cell), {0})});
  }
  return {dx, loop[1], loop[2], w[0], w[1], w[2], dw_hr, dw_peephole};
}

constexpr int CELL_GATES[] = {4, 3, 1, 1, 3};        // by CellKind

// Whether a cell's weights (those given) are of x's dtype, on the CPU.
bool cell_weights_on_cpu(const Tensor& x, const Tensor& w_ih, const Tensor& w_hh,
                         const Tensor& b_ih, const Tensor& b_hh, const Tensor& peephole = {}) {
  auto fits = [&](const Tensor& t) {
    return !t.defined() || (t.scalar_type() == x.scalar_type() && t.is_cpu());
  };
  return fits(w_ih) && fits(w_hh) && fits(b_ih) && fits(b_hh) && fits(peephole);
}

// The single-step kernel of a CellKind, in compute type S on weights of element type W.
template <typename S, typename W>
std::vector<Tensor> cell_of_kind(int kind, const Tensor& x, const Tensor& h, const Tensor& c,
                                 const Tensor& w_ih, const Tensor& w_hh, const Tensor& b_ih,
                                 const Tensor& b_hh, const Tensor& peephole, int form) {
  switch (static_cast<CellKind>(kind)) {
    case CellKind::LSTM:
      return cell_step<S, CellKind::LSTM, W>(x, h, c, w_ih, w_hh, b_ih, b_hh, peephole, form);
    case CellKind::GRU: return cell_step<S, CellKind::GRU, W>(x, h, c, w_ih, w_hh, b_ih, b_hh);
    case CellKind::RNN_TANH:
      return cell_step<S, CellKind::RNN_TANH, W>(x, h, c, w_ih, w_hh, b_ih, b_hh);
    case CellKind::RNN_RELU:
      return cell_step<S, CellKind::RNN_RELU, W>(x, h, c, w_ih, w_hh, b_ih, b_hh);
    default: return gru_reset_before_step<S, W>(x, h, w_ih, w_hh, b_ih, b_hh);
  }
}

// One step of the single-step API (see cell_step), its arguments checked by the caller; kind:
// CellKind's value (native.py's CELL_KINDS); c, b_ih, b_hh and the LSTM's peephole contiguous
// or undefined, form the LSTM's CellForm (0 for the others); float32, float64, or float16 /
// bfloat16, computed in float32 (the weights widened as the kernel reads them, the rest here)
// and returned in their dtype. Returns [h', c'] for the LSTM, [h'] otherwise.
std::vector<Tensor> run_cell(int kind, Tensor x, Tensor h, const Tensor& c, Tensor w_ih,
                             Tensor w_hh, const Tensor& b_ih, const Tensor& b_hh,
                             const Tensor& peephole = {}, int form = 0) {
  for (auto* t : {&x, &h, &w_ih, &w_hh}) *t = t->contiguous();
  const at::ScalarType dtype = x.scalar_type();
  if (compute_type(dtype) != dtype) {                   // float16 or bfloat16
    auto wide = [](const Tensor& t) { return to_type(t, at::kFloat); };
    std::vector<Tensor> out =
        dtype == at::kHalf
            ? cell_of_kind<float, c10::Half>(kind, wide(x), wide(h), wide(c), w_ih, w_hh,
                                             wide(b_ih), wide(b_hh), wide(peephole), form)
            : cell_of_kind<float, c10::BFloat16>(kind, wide(x), wide(h), wide(c), w_ih, w_hh,
                                                 wide(b_ih), wide(b_hh), wide(peephole), form);
    for (Tensor& t : out) t = t.to(dtype);
    return out;
  }
  return LSTMKIT_DISPATCH(dtype, [&] {
    return cell_of_kind<scalar, scalar>(kind, x, h, c, w_ih, w_hh, b_ih, b_hh, peephole, form);
  });
}

// w_peephole and cell_form: the LSTM's elementwise variants (see cell_step), none for the
// others.
std::vector<Tensor> cell_step_py(int kind, Tensor x, Tensor h, c10::optional<Tensor> c,
                                 Tensor w_ih, Tensor w_hh, c10::optional<Tensor> b_ih,
                                 c10::optional<Tensor> b_hh, c10::optional<Tensor> w_peephole,
                                 i64 cell_form) {
  TORCH_CHECK(0 <= kind && kind <= static_cast<int>(CellKind::GRU_RESET_BEFORE),
              "cell_step: kind must be 0-4, got ", kind);
  const bool lstm = kind == static_cast<int>(CellKind::LSTM);
  TORCH_CHECK(c.has_value() == lstm, "cell_step: the LSTM takes c, the others do not");
  TORCH_CHECK(lstm || (!w_peephole.has_value() && cell_form == 0),
              "cell_step: only the LSTM takes peepholes and a cell form");
  check_cpu(x, "x");
  const i64 H = h.size(1);
  check_layer_weights(CELL_GATES[kind], x, H, H, w_ih, w_hh, b_ih, b_hh, c10::nullopt,
                      w_peephole);
  Tensor bi = optional_contiguous(b_ih), bh = optional_contiguous(b_hh);
  Tensor peephole = optional_contiguous(w_peephole);
  TORCH_CHECK_VALUE(cell_weights_on_cpu(x, w_ih, w_hh, bi, bh, peephole),
                    "the weights must be ", x.scalar_type(), " on the CPU as x is, got w_ih ",
                    w_ih.scalar_type(), " on ", w_ih.device(), ", w_hh ", w_hh.scalar_type(),
                    " on ", w_hh.device());
  return run_cell(kind, x, h, optional_contiguous(c), w_ih, w_hh, bi, bh, peephole,
                  (int)cell_form);
}

// The cells' fast path (see _CellBase.forward): the step, as cell_step, when the call fits the
// kernel as it is, None otherwise, for the general path (which checks everything and words the
// errors). It fits with grad mode and CPU autocast off, and x (B, I) with B > 0 and each state
// (B, H) tensors (not subclasses) on the CPU of the weights' dtype (one computed in float32 or
// float64: float16 and bfloat16 too); hx the tuple (h, c) for the LSTM, h for the others. These
// checks in Python took 2.4 us of a 10.6 us step (LSTMCell, batch 1 / hidden 64).
py::object cell_step_if_py(int kind, py::handle x_obj, py::handle hx, const Tensor& w_ih,
                           const Tensor& w_hh, const c10::optional<Tensor>& b_ih,
                           const c10::optional<Tensor>& b_hh) {
  TORCH_CHECK(0 <= kind && kind <= static_cast<int>(CellKind::GRU_RESET_BEFORE),
              "cell_step_if: kind must be 0-4, got ", kind);
  if (at::GradMode::is_enabled() || at::autocast::is_autocast_enabled(at::kCPU)) return py::none();
  const bool lstm = kind == static_cast<int>(CellKind::LSTM);
  PyObject* states[2] = {hx.ptr(), nullptr};
  if (lstm) {
    if (!PyTuple_Check(hx.ptr()) || PyTuple_GET_SIZE(hx.ptr()) != 2) return py::none();
    states[0] = PyTuple_GET_ITEM(hx.ptr(), 0);
    states[1] = PyTuple_GET_ITEM(hx.ptr(), 1);
  }
  const auto dtype = w_ih.scalar_type();
  const auto computed = compute_type(dtype);
  if (!(computed == at::kFloat || computed == at::kDouble) || w_ih.dim() != 2 || w_hh.dim() != 2)
    return py::none();
  auto fits = [&](PyObject* obj, i64 rows, i64 cols) {
    if (!THPVariable_CheckExact(obj)) return false;
    const Tensor& t = THPVariable_Unpack(obj);
    return t.dim() == 2 && t.size(0) == rows && t.size(1) == cols && t.scalar_type() == dtype &&
           t.is_cpu() && !t.is_conj() && !t.is_neg();
  };
  if (!THPVariable_CheckExact(x_obj.ptr())) return py::none();
  const Tensor& x = THPVariable_Unpack(x_obj.ptr());
  const i64 B = x.dim() == 2 ? x.size(0) : 0, H = w_hh.size(1);
  if (B == 0 || !fits(x_obj.ptr(), B, w_ih.size(1)) || !fits(states[0], B, H) ||
      (lstm && !fits(states[1], B, H)))
    return py::none();
  Tensor bi = optional_contiguous(b_ih), bh = optional_contiguous(b_hh);
  if (!layer_weights_mismatch(CELL_GATES[kind], x, H, H, w_ih, w_hh, bi, bh).empty() ||
      !cell_weights_on_cpu(x, w_ih, w_hh, bi, bh))
    return py::none();
  std::vector<Tensor> out = run_cell(
      kind, x, THPVariable_Unpack(states[0]),
      lstm ? THPVariable_Unpack(states[1]).contiguous() : Tensor(), w_ih, w_hh, bi, bh);
  if (lstm) return py::make_tuple(out[0], out[1]);
  return py::cast(out[0]);
}

// One Elman RNN layer, one direction: x (N, I) -> out (N, H), h_T.
std::vector<Tensor> rnn_layer_forward(Tensor x, c10::optional<Tensor> b_ih,
                                      c10::optional<Tensor> b_hh, Tensor h0, Tensor w_ih,
                                      Tensor w_hh, std::vector<i64> batch_sizes, bool reverse,
                                      bool relu, i64 parts) {
  check_cpu(x, "x");
  check_layer_weights(1, x, h0.size(1), h0.size(1), w_ih, w_hh, b_ih, b_hh);
  for (auto* t : {&h0, &w_hh}) *t = t->contiguous();
  Tensor bias = bias_sum(optional_contiguous(b_ih), optional_contiguous(b_hh));
  Steps st(batch_sizes, reverse);
  check_steps(st, x, h0);
  Tensor xproj = input_projection(x, w_ih);
  return LSTMKIT_DISPATCH(x.scalar_type(), [&] {
    return rnn_forward<scalar>(xproj, bias, h0, w_hh, st, relu, parts);
  });
}

// The whole backward of one RNN layer, one direction. needs: (x, h0, w_ih, w_hh, b_ih, b_hh).
// Returns dx, dh0, dw_ih, dw_hh, db (the gradient of b_ih + b_hh).
std::vector<Tensor> rnn_layer_backward(Tensor d_out, Tensor d_hT, Tensor x, Tensor h0,
                                       Tensor w_ih, Tensor w_hh, Tensor out,
                                       std::vector<i64> batch_sizes, bool reverse, bool relu,
                                       i64 parts, std::vector<bool> needs) {
  TORCH_CHECK(needs.size() == 6, "rnn_layer_backward: needs has 6 flags, got ", needs.size());
  const auto dtype = out.scalar_type();
  d_out = incoming(d_out, dtype); d_hT = incoming(d_hT, dtype);
  for (auto* t : {&h0, &w_hh, &out}) *t = t->contiguous();
  Steps st(batch_sizes, reverse);
  auto loop = LSTMKIT_DISPATCH(dtype, [&] {
    return rnn_backward<scalar>(d_out, d_hT, w_hh, out, st, relu, parts);
  });
  Products jobs;
  Tensor dx;
  if (needs[0]) {
    dx = pooled_empty(x.sizes(), x.options());
    jobs.add(dx, loop[0], w_ih);
  }
  WeightGradients weights(jobs, loop[0], needs[2] ? x : Tensor(), needs[3] ? out : Tensor(), h0,
                          st, needs[4] || needs[5]);
  jobs.run();
  auto w = weights.take(jobs);
  return {dx, loop[1], w[0], w[1], w[2]};
}

// ---- the LSTM with layer norm: the step loops of LSTMVariantFunction -----------------------
// Its Python Function (lstm_variants.py) does what is sequence-wide with torch (the input's
// layer norm before the loop; the layer norms' parameter gradients, dX and the weight
// gradients after it) and calls these two for the loops, which would otherwise be Python
// loops of torch operations per step. Tensors in one compute dtype (float32 or float64).

// An optional parameter vector: absent, or (size,) of `dtype` on the CPU; else a ValueError
// naming it.
void check_vector(const char* name, const c10::optional<Tensor>& t, i64 size,
                  at::ScalarType dtype) {
  TORCH_CHECK_VALUE(!t.has_value() || (t->dim() == 1 && t->size(0) == size &&
                                       t->scalar_type() == dtype && t->device().is_cpu()),
                    name, " must be a (", size, ",) tensor of ", dtype, " on the CPU, got ",
                    t.has_value() ? c10::str(t->sizes(), " ", t->scalar_type(), " on ",
                                             t->device())
                                  : std::string());
}

// Full gate recurrence's W_gg (3H, 3H) against its state q (B, 3H) (q0 in the forward, d_qT in
// the backward; B = like's batch): both or neither, else a ValueError. Returns W_gg contiguous,
// undefined when not given.
Tensor checked_gate_recurrence(const c10::optional<Tensor>& w_gate,
                               const c10::optional<Tensor>& q, const Tensor& like, i64 H,
                               at::ScalarType dtype) {
  TORCH_CHECK_VALUE(w_gate.has_value() == q.has_value(),
                    "full gate recurrence needs both w_gate and its state q (q0 or d_qT), got ",
                    w_gate.has_value() ? "w_gate alone" : "q alone");
  if (!w_gate.has_value()) return Tensor();
  TORCH_CHECK_VALUE(w_gate->dim() == 2 && w_gate->size(0) == 3 * H && w_gate->size(1) == 3 * H &&
                        w_gate->scalar_type() == dtype && w_gate->device().is_cpu(),
                    "w_gate must be a (", 3 * H, ", ", 3 * H, ") tensor of ", dtype,
                    " on the CPU, got ", w_gate->sizes(), " ", w_gate->scalar_type());
  TORCH_CHECK_VALUE(q->dim() == 2 && q->size(0) == like.size(0) && q->size(1) == 3 * H &&
                        q->device().is_cpu(),
                    "the gate state q must have shape (", like.size(0), ", ", 3 * H, "), got ",
                    q->sizes());
  return w_gate->contiguous();
}

// Layer norm over the rows of v (N, F), what the sequence-wide input side needs (torch's
// native_layer_norm and its backward write fresh tensors, and at batch 64 / hidden 512 / length
// 100 faulting in their 52 MB cost as much as the arithmetic: 17.5 ms against 7-8 for a
// product of that size into recycled memory). Returns out (N, F) = gain (v - mean) rstd + beta
// (into `into` when given, a (N, F) view of unit column stride: the GRU's column blocks), mean
// and rstd (N, 1); gain and beta may be absent. v may be a view with unit column stride.
std::vector<Tensor> layer_norm_rows(Tensor v, c10::optional<Tensor> gain,
                                    c10::optional<Tensor> beta, double eps,
                                    c10::optional<Tensor> into) {
  check_cpu(v, "v");
  TORCH_CHECK_VALUE(v.dim() == 2, "layer_norm_rows: v must be (N, F), got ", v.sizes());
  if (!unit_stride(v, 1)) v = v.contiguous();
  const i64 N = v.size(0), F = v.size(1);
  Tensor out = into.has_value() ? *into : pooled_empty({N, F}, v.options());
  TORCH_CHECK_VALUE(out.sizes() == v.sizes() && unit_stride(out, 1) &&
                        out.scalar_type() == v.scalar_type(),
                    "layer_norm_rows: `into` must be ", v.sizes(), " of unit column stride, got ",
                    out.sizes());
  check_vector("gain", gain, F, v.scalar_type());
  check_vector("beta", beta, F, v.scalar_type());
  Tensor mean = pooled_empty({N, 1}, v.options()), rstd = pooled_empty({N, 1}, v.options());
  Tensor g = optional_contiguous(gain), b = optional_contiguous(beta);
  const i64 vs = leading(v, 0), os = leading(out, 0);
  LSTMKIT_DISPATCH(v.scalar_type(), [&] {
    const scalar* vp = ptr<scalar>(v);
    const scalar* gp = ptr<scalar>(g);
    const scalar* bp = ptr<scalar>(b);
    scalar* op = ptr<scalar>(out);
    scalar* mp = ptr<scalar>(mean);
    scalar* rp = ptr<scalar>(rstd);
    at::parallel_for(0, N, std::max<i64>(1, GATE_MATH_GRAIN_UNITS / std::max<i64>(F, 1)),
                     [&](i64 r0, i64 r1) {
      for (i64 r = r0; r < r1; ++r) {
        LayerNorms<scalar>::moments(vp + r * vs, F, (scalar)eps, mp[r], rp[r]);
        LayerNorms<scalar>::normalize(vp + r * vs, F, mp[r], rp[r], gp, bp, op + r * os);
      }
    });
    return 0;
  });
  return {out, mean, rstd};
}

// The gradient of layer_norm_rows's v given d (N, F), the gradient of its out, and what it
// returned (see LayerNorms::normalize_backward), into `into` when given (as layer_norm_rows's);
// d, v, mean and rstd may be views with unit column stride. (The gain's and bias's gradients,
// sums over the rows, are torch's.)
Tensor layer_norm_rows_backward(Tensor d, Tensor v, Tensor mean, Tensor rstd,
                                c10::optional<Tensor> gain, c10::optional<Tensor> into) {
  check_cpu(v, "v");
  TORCH_CHECK_VALUE(d.dim() == 2 && d.sizes() == v.sizes() && mean.numel() == v.size(0) &&
                        rstd.numel() == v.size(0) && d.scalar_type() == v.scalar_type(),
                    "layer_norm_rows_backward: d and v (N, F) of one dtype, mean and rstd (N, 1); "
                    "got ", d.sizes(), ", ", v.sizes(), ", ", mean.sizes(), ", ", rstd.sizes());
  for (Tensor* t : {&d, &v})
    if (!unit_stride(*t, 1)) *t = t->contiguous();
  mean = mean.reshape({-1, 1});
  rstd = rstd.reshape({-1, 1});
  const i64 N = v.size(0), F = v.size(1);
  Tensor dv = into.has_value() ? *into : pooled_empty({N, F}, v.options());
  TORCH_CHECK_VALUE(dv.sizes() == v.sizes() && unit_stride(dv, 1) &&
                        dv.scalar_type() == v.scalar_type(),
                    "layer_norm_rows_backward: `into` must be ", v.sizes(),
                    " of unit column stride, got ", dv.sizes());
  check_vector("gain", gain, F, v.scalar_type());
  Tensor g = optional_contiguous(gain);
  const i64 ds = leading(d, 0), vs = leading(v, 0), os = leading(dv, 0);
  const i64 ms = mean.stride(0), rs = rstd.stride(0);
  LSTMKIT_DISPATCH(v.scalar_type(), [&] {
    const scalar* dp = ptr<scalar>(d);
    const scalar* vp = ptr<scalar>(v);
    const scalar* gp = ptr<scalar>(g);
    const scalar* mp = ptr<scalar>(mean);
    const scalar* rp = ptr<scalar>(rstd);
    scalar* out = ptr<scalar>(dv);
    at::parallel_for(0, N, std::max<i64>(1, GATE_MATH_GRAIN_UNITS / std::max<i64>(F, 1)),
                     [&](i64 r0, i64 r1) {
      for (i64 r = r0; r < r1; ++r) {
        LayerNorms<scalar>::normalize_backward(dp + r * ds, vp + r * vs, F, mp[r * ms],
                                               rp[r * rs], gp, out + r * os);
      }
    });
    return 0;
  });
  return dv;
}

// LayerNorms's gains and biases (undefined: absent), contiguous (they must outlive it).
template <typename S>
LayerNorms<S> layer_norms_of(const Tensor& gain_h, const Tensor& beta_h, const Tensor& gain_c,
                             const Tensor& beta_c, double eps, i64 H) {
  LayerNorms<S> ln;
  ln.gain_h = ptr<S>(gain_h);
  ln.beta_h = ptr<S>(beta_h);
  ln.gain_c = ptr<S>(gain_c);
  ln.beta_c = ptr<S>(beta_c);
  ln.eps = (S)eps;
  ln.H = H;
  return ln;
}

// The recurrent layer norm's gain and bias (gates x H: the LSTM's 4H, the GRU's 3H) and the
// LSTM's cell's (H), each absent or a vector of `dtype`, else a ValueError.
void check_layer_norm_parameters(i64 H, const c10::optional<Tensor>& gain_h,
                                 const c10::optional<Tensor>& beta_h,
                                 const c10::optional<Tensor>& gain_c,
                                 const c10::optional<Tensor>& beta_c, at::ScalarType dtype,
                                 i64 gates = 4) {
  check_vector("ln_hh_weight", gain_h, gates * H, dtype);
  check_vector("ln_hh_bias", beta_h, gates * H, dtype);
  check_vector("ln_cell_weight", gain_c, H, dtype);
  check_vector("ln_cell_bias", beta_c, H, dtype);
}

// The LSTM variants' native loops (LSTMVariantFunction's, lstm_variants.py): every variant,
// layer norm and full gate recurrence included, on the generic driver with `parts` row parts.
// The forward: xproj (N, 4H) = [LN_ih](x W_ih^T) (the biases not added: the loop adds
// b_ih + b_hh), h0 (B, P), c0 (B, H), w_hh (4H, P), w_hr (P, H), the elementwise variants as
// lstm_layer_forward's; full gate recurrence's w_gate (3H, 3H) with q0 (B, 3H), the previous
// step's [i | f | o] (both or neither); with `layer_norm` the layer norms' gains and biases
// (ln_hh (4H), ln_cell (H), each may be absent).
// Returns out (N, P), h_T, c_T, q_T (B, 3H) (undefined without w_gate) and, when `save`, gates
// (N, 4H) activated, cells (N, H) (after zoneout); with layer norm also cand (N, H) c~, s (N, H)
// psi(LN_c(c~)), h_pre (N, 4H) the step products before LN, mean_h, rstd_h, mean_c, rstd_c
// (N, 1) (lstm_variants.py's stash; undefined without).
std::vector<Tensor> lstm_variant_loops_forward(
    Tensor xproj, c10::optional<Tensor> b_ih, c10::optional<Tensor> b_hh, Tensor h0, Tensor c0,
    Tensor w_hh, c10::optional<Tensor> w_hr, c10::optional<Tensor> w_peephole, i64 cell_form,
    c10::optional<Tensor> zoneout_h, c10::optional<Tensor> zoneout_c,
    c10::optional<Tensor> recurrent, c10::optional<Tensor> w_gate, c10::optional<Tensor> q0,
    bool layer_norm, c10::optional<Tensor> ln_hh_weight, c10::optional<Tensor> ln_hh_bias,
    c10::optional<Tensor> ln_cell_weight, c10::optional<Tensor> ln_cell_bias, double eps,
    std::vector<i64> batch_sizes, bool reverse, bool save, i64 parts) {
  check_cpu(xproj, "x");
  const i64 H = c0.size(1), P = h0.size(1), B = h0.size(0), N = xproj.size(0);
  TORCH_CHECK_VALUE(xproj.dim() == 2 && xproj.size(1) == 4 * H,
                    "lstm_variant_loops_forward: xproj must be (N, 4H) = (N, ", 4 * H,
                    "), got ", xproj.sizes());
  check_layer_weights(4, xproj, H, P, Tensor(), w_hh, b_ih, b_hh, w_hr,
                      w_peephole);
  check_layer_norm_parameters(H, ln_hh_weight, ln_hh_bias, ln_cell_weight, ln_cell_bias,
                              xproj.scalar_type());
  TORCH_CHECK_VALUE(layer_norm || !(ln_hh_weight || ln_hh_bias || ln_cell_weight ||
                                    ln_cell_bias),
                    "lstm_variant_loops_forward: layer-norm parameters given with "
                    "layer_norm=False");
  const Tensor gate_weights = checked_gate_recurrence(w_gate, q0, h0, H, xproj.scalar_type());
  TORCH_CHECK_VALUE(!q0.has_value() || q0->scalar_type() == xproj.scalar_type(),
                    "q0 must be of x's dtype ", xproj.scalar_type(), ", got ", q0->scalar_type());
  std::string wrong;
  expect_shape(wrong, "c0", c0, {B, H});                     // (h0 gives B; c0 is read for B)
  TORCH_CHECK_VALUE(wrong.empty(), "lstm_variant_loops_forward: ", wrong);
  TORCH_CHECK_VALUE(parts >= 1, "lstm_variant_loops_forward: parts must be >= 1, got ", parts);
  Tensor zone_h = checked_zoneout_mask("zoneout_h", zoneout_h, xproj, P);
  Tensor zone_c = checked_zoneout_mask("zoneout_c", zoneout_c, xproj, H);
  Tensor dropout = checked_recurrent_mask(recurrent, h0);
  xproj = xproj.contiguous();
  for (auto* t : {&h0, &c0, &w_hh}) *t = t->contiguous();
  Tensor bias = bias_sum(optional_contiguous(b_ih), optional_contiguous(b_hh));
  Steps st(batch_sizes, reverse);
  check_steps(st, xproj, h0);
  const auto options = xproj.options();
  Tensor cand, s, h_pre, mean_h, rstd_h, mean_c, rstd_c, scratch;
  if (layer_norm && save) {
    cand = pooled_empty({N, H}, options);
    s = pooled_empty({N, H}, options);
    h_pre = pooled_empty({N, 4 * H}, options);
    for (Tensor* t : {&mean_h, &rstd_h, &mean_c, &rstd_c}) *t = pooled_empty({N, 1}, options);
  } else if (layer_norm) {
    scratch = pooled_empty({B, 2 * H}, options);
  }
  const Tensor gain_h = optional_contiguous(ln_hh_weight);
  const Tensor beta_h = optional_contiguous(ln_hh_bias);
  const Tensor gain_c = optional_contiguous(ln_cell_weight);
  const Tensor beta_c = optional_contiguous(ln_cell_bias);
  return LSTMKIT_DISPATCH(xproj.scalar_type(), [&] {
    LayerNorms<scalar> ln;
    if (layer_norm) {
      ln = layer_norms_of<scalar>(gain_h, beta_h, gain_c, beta_c, eps, H);
      ln.h_pre = ptr<scalar>(h_pre); ln.mean_h = ptr<scalar>(mean_h);
      ln.rstd_h = ptr<scalar>(rstd_h); ln.cand = ptr<scalar>(cand); ln.s = ptr<scalar>(s);
      ln.mean_c = ptr<scalar>(mean_c); ln.rstd_c = ptr<scalar>(rstd_c);
      ln.scratch = ptr<scalar>(scratch);
    }
    auto r = lstm_forward<scalar>(xproj, bias, h0, c0, w_hh, w_hr, st, save, parts, Tensor(),
                                  false, optional_contiguous(w_peephole), (int)cell_form,
                                  zone_h, zone_c, dropout, ln, gate_weights,
                                  optional_contiguous(q0));
    return std::vector<Tensor>{r[0], r[1], r[2], r[5], r[3], r[4], cand, s, h_pre, mean_h,
                               rstd_h, mean_c, rstd_c};
  });
}

// The backward loop of lstm_variant_loops_forward, given what it saved and the gradients
// arriving at out, h_T, c_T and q_T (d_qT, with w_gate): returns d_gates (N, 4H) (the gradient
// of the pre-activations a), d_product (N, 4H) (of the step products before LN_hh: dh_prev =
// d_product W_hh, and dW_hh's operand; d_gates itself without layer norm), d_cell_norm (N, H)
// (of LN_c(c~), undefined without layer norm), d_h_tilde (N, P) (of each step's h before the
// projection, undefined without one), dh0, dc0, dq0 (undefined without w_gate).
std::vector<Tensor> lstm_variant_loops_backward(
    Tensor d_out, Tensor d_hT, Tensor d_cT, c10::optional<Tensor> d_qT, Tensor c0, Tensor w_hh,
    c10::optional<Tensor> w_hr, c10::optional<Tensor> w_gate, Tensor gates, Tensor cells,
    bool layer_norm, c10::optional<Tensor> cand, c10::optional<Tensor> s,
    c10::optional<Tensor> h_pre, c10::optional<Tensor> mean_h, c10::optional<Tensor> rstd_h,
    c10::optional<Tensor> mean_c, c10::optional<Tensor> rstd_c,
    c10::optional<Tensor> ln_hh_weight, c10::optional<Tensor> ln_cell_weight,
    c10::optional<Tensor> w_peephole, i64 cell_form, c10::optional<Tensor> zoneout_h,
    c10::optional<Tensor> zoneout_c, c10::optional<Tensor> recurrent,
    std::vector<i64> batch_sizes, bool reverse, i64 parts) {
  const auto dtype = gates.scalar_type();
  const i64 H = cells.size(1), N = gates.size(0);
  TORCH_CHECK_VALUE(parts >= 1, "lstm_variant_loops_backward: parts must be >= 1, got ", parts);
  check_layer_norm_parameters(H, ln_hh_weight, c10::nullopt, ln_cell_weight, c10::nullopt,
                              dtype);
  const i64 B = c0.size(0), P = d_hT.size(1);
  // What the forward saved, and the arriving gradients, against each other: a wrong shape
  // would be read out of bounds.
  std::string wrong = layer_weights_mismatch(4, gates.narrow(1, 0, 0), H, P, Tensor(), w_hh,
                                             Tensor(), Tensor(), given(w_hr), given(w_peephole));
  expect_shape(wrong, "gates", gates, {N, 4 * H});
  // With layer norm, its stash (as the forward returned it) in this order, and each one's width.
  const std::array<std::tuple<const char*, c10::optional<Tensor>*, i64>, 7> ln_stash = {{
      {"h_pre", &h_pre, 4 * H}, {"mean_h", &mean_h, 1}, {"rstd_h", &rstd_h, 1},
      {"cand", &cand, H}, {"s", &s, H}, {"mean_c", &mean_c, 1}, {"rstd_c", &rstd_c, 1}}};
  for (const auto& [name, t, width] : ln_stash) {
    if (!layer_norm) break;
    TORCH_CHECK_VALUE(t->has_value(), "lstm_variant_loops_backward: layer norm needs ", name);
    expect_shape(wrong, name, **t, {N, width});
  }
  expect_shape(wrong, "d_out", d_out, {N, P});
  expect_shape(wrong, "d_hT", d_hT, {B, P});
  expect_shape(wrong, "d_cT", d_cT, {B, H});
  expect_shape(wrong, "cells", cells, {N, H});
  expect_shape(wrong, "c0", c0, {B, H});
  TORCH_CHECK_VALUE(wrong.empty(), "lstm_variant_loops_backward: ", wrong);
  const Tensor gate_weights = checked_gate_recurrence(w_gate, d_qT, c0, H, dtype);
  checked_zoneout_mask("zoneout_h", zoneout_h, gates, P);
  checked_zoneout_mask("zoneout_c", zoneout_c, gates, H);
  checked_recurrent_mask(recurrent, d_hT);
  d_out = incoming(d_out, dtype); d_hT = incoming(d_hT, dtype); d_cT = incoming(d_cT, dtype);
  for (Tensor* t : {&c0, &w_hh, &gates, &cells}) *t = t->contiguous();
  Steps st(batch_sizes, reverse);
  TORCH_CHECK_VALUE(st.rows == N && st.batch == B, "lstm_variant_loops_backward: batch_sizes ",
                    at::IntArrayRef(batch_sizes), " do not fit the ", N, " saved rows of batch ",
                    B);
  Tensor zone_h = optional_contiguous(zoneout_h), zone_c = optional_contiguous(zoneout_c);
  Tensor dh_carry = zone_h.defined() ? pooled_empty({st.batch, P}, gates.options()).zero_()
                                     : Tensor();
  Tensor d_product = layer_norm ? pooled_empty({N, 4 * H}, gates.options()) : Tensor();
  Tensor d_cell_norm = layer_norm ? pooled_empty({N, H}, gates.options()) : Tensor();
  Tensor dq = gate_weights.defined() ? pooled_clone(incoming(*d_qT, dtype)) : Tensor();
  const Tensor gain_h = optional_contiguous(ln_hh_weight);
  const Tensor gain_c = optional_contiguous(ln_cell_weight);
  std::array<Tensor, 7> stash;
  for (size_t i = 0; i < ln_stash.size() && layer_norm; ++i)
    stash[i] = std::get<1>(ln_stash[i])->value().contiguous();
  auto loop = LSTMKIT_DISPATCH(dtype, [&] {
    LayerNorms<scalar> ln;
    if (layer_norm) {
      ln = layer_norms_of<scalar>(gain_h, Tensor(), gain_c, Tensor(), 0.0, H);
      ln.h_pre = ptr<scalar>(stash[0]); ln.mean_h = ptr<scalar>(stash[1]);
      ln.rstd_h = ptr<scalar>(stash[2]); ln.cand = ptr<scalar>(stash[3]);
      ln.s = ptr<scalar>(stash[4]); ln.mean_c = ptr<scalar>(stash[5]);
      ln.rstd_c = ptr<scalar>(stash[6]);
    }
    return lstm_backward<scalar>(d_out, d_hT, d_cT, c0, w_hh, w_hr, gates, cells, st, parts,
                                 false, optional_contiguous(w_peephole), (int)cell_form, zone_h,
                                 zone_c, dh_carry, optional_contiguous(recurrent), ln, d_product,
                                 d_cell_norm, gate_weights, dq);
  });
  if (dh_carry.defined()) loop[1].add_(dh_carry);
  return {loop[0], layer_norm ? d_product : loop[0], d_cell_norm, loop[3], loop[1], loop[2], dq};
}

// The GRU variants' native loops (GRUVariantFunction's: every variant, its layer norm with
// GRULayerNorms), as the LSTM's above. gi (N, 3H): the input's products (after their layer
// norm), without b_ih; the rest as gru_layer_forward's, and with `layer_norm` ln_hh's (3H) gain
// and bias (either may be absent). Returns out (N, H), h_T and, when `save`, the stash (N, 4H)
// [r | z | n | gh_n] ((N, 3H) [r | z | n] reset before); with layer norm also h_pre (N, 3H)
// (the recurrent products before LN), mean_h and rstd_h (N, 2) (their blocks' [r | z] and n).
std::vector<Tensor> gru_variant_loops_forward(
    Tensor gi, c10::optional<Tensor> b_ih, c10::optional<Tensor> b_hh, Tensor h0, Tensor w_hh,
    c10::optional<Tensor> zoneout_h, c10::optional<Tensor> recurrent, bool layer_norm,
    c10::optional<Tensor> ln_hh_weight, c10::optional<Tensor> ln_hh_bias, double eps,
    std::vector<i64> batch_sizes, bool reverse, bool reset_after, bool save, i64 parts,
    i64 form) {
  check_cpu(gi, "x");
  const i64 H = h0.size(1), N = gi.size(0);
  TORCH_CHECK_VALUE(gi.dim() == 2 && gi.size(1) == 3 * H,
                    "gru_variant_loops_forward: gi must be (N, 3H) = (N, ", 3 * H, "), got ",
                    gi.sizes());
  check_layer_weights(3, gi, H, H, Tensor(), w_hh, b_ih, b_hh);
  check_layer_norm_parameters(H, ln_hh_weight, ln_hh_bias, c10::nullopt, c10::nullopt,
                              gi.scalar_type(), 3);
  TORCH_CHECK_VALUE(layer_norm || !(ln_hh_weight || ln_hh_bias),
                    "gru_variant_loops_forward: layer-norm parameters given with "
                    "layer_norm=False");
  TORCH_CHECK_VALUE(parts >= 1, "gru_variant_loops_forward: parts must be >= 1, got ", parts);
  Tensor zone = checked_zoneout_mask("zoneout_h", zoneout_h, gi, H);
  Tensor dropout = checked_recurrent_mask(recurrent, h0);
  gi = gi.contiguous();
  for (auto* t : {&h0, &w_hh}) *t = t->contiguous();
  Steps st(batch_sizes, reverse);
  check_steps(st, gi, h0);
  Tensor h_pre, mean, rstd;
  if (save && layer_norm) {
    h_pre = pooled_empty({N, 3 * H}, gi.options());
    mean = pooled_empty({N, 2}, gi.options());
    rstd = pooled_empty({N, 2}, gi.options());
  }
  const Tensor gain = optional_contiguous(ln_hh_weight), beta = optional_contiguous(ln_hh_bias);
  return LSTMKIT_DISPATCH(gi.scalar_type(), [&] {
    GRULayerNorms<scalar> ln;
    if (layer_norm) {
      ln.norm = layer_norms_of<scalar>(gain, beta, Tensor(), Tensor(), eps, H);
      ln.h_pre = ptr<scalar>(h_pre); ln.mean = ptr<scalar>(mean); ln.rstd = ptr<scalar>(rstd);
      ln.H = H;
    }
    auto r = gru_forward<scalar>(gi, optional_contiguous(b_ih), h0, w_hh,
                                 optional_contiguous(b_hh), st, reset_after, save, parts, zone,
                                 dropout, (int)form, ln);
    return std::vector<Tensor>{r[0], r[1], r[2], h_pre, mean, rstd};
  });
}

// The backward loop of gru_variant_loops_forward, given what it saved (h_pre, mean and rstd
// with layer norm, else none) and the gradients arriving at out and h_T: returns d_gi (N, 3H)
// (the gradient of the input's side, [da_r | da_z | da_n]), d_gh (N, 3H) (of the recurrent
// products after LN, for ln_hh's gain and bias), d_product (N, 3H) (before LN: dW_hh's operand;
// undefined without layer norm, where it is d_gh) and dh0.
std::vector<Tensor> gru_variant_loops_backward(
    Tensor d_out, Tensor d_hT, Tensor h0, Tensor w_hh, Tensor out, Tensor stash,
    c10::optional<Tensor> h_pre, c10::optional<Tensor> mean, c10::optional<Tensor> rstd,
    c10::optional<Tensor> ln_hh_weight, c10::optional<Tensor> zoneout_h,
    c10::optional<Tensor> recurrent, std::vector<i64> batch_sizes, bool reverse,
    bool reset_after, i64 parts, i64 form) {
  const auto dtype = out.scalar_type();
  const i64 H = out.size(1), N = out.size(0);
  const bool layer_norm = h_pre.has_value();
  TORCH_CHECK_VALUE(layer_norm == mean.has_value() && layer_norm == rstd.has_value(),
                    "gru_variant_loops_backward: layer norm needs h_pre, mean and rstd, all "
                    "three");
  TORCH_CHECK_VALUE(parts >= 1, "gru_variant_loops_backward: parts must be >= 1, got ", parts);
  check_layer_norm_parameters(H, ln_hh_weight, c10::nullopt, c10::nullopt, c10::nullopt, dtype,
                              3);
  const i64 B = h0.size(0);
  std::string wrong = layer_weights_mismatch(3, out.narrow(1, 0, 0), H, H, Tensor(), w_hh,
                                             Tensor(), Tensor());
  expect_shape(wrong, "stash", stash, {N, (reset_after ? 4 : 3) * H});
  if (layer_norm) {
    expect_shape(wrong, "h_pre", *h_pre, {N, 3 * H});
    for (const Tensor* t : {&*mean, &*rstd}) expect_shape(wrong, "mean and rstd", *t, {N, 2});
  }
  expect_shape(wrong, "d_out", d_out, {N, H});
  expect_shape(wrong, "d_hT", d_hT, {B, H});
  expect_shape(wrong, "h0", h0, {B, H});
  TORCH_CHECK_VALUE(wrong.empty(), "gru_variant_loops_backward: ", wrong);
  checked_zoneout_mask("zoneout_h", zoneout_h, out, H);
  checked_recurrent_mask(recurrent, h0);
  d_out = incoming(d_out, dtype); d_hT = incoming(d_hT, dtype);
  for (Tensor* t : {&h0, &w_hh, &out, &stash}) *t = t->contiguous();
  Tensor pre = optional_contiguous(h_pre), means = optional_contiguous(mean);
  Tensor rstds = optional_contiguous(rstd);
  Steps st(batch_sizes, reverse);
  TORCH_CHECK_VALUE(st.rows == N && st.batch == B, "gru_variant_loops_backward: batch_sizes ",
                    at::IntArrayRef(batch_sizes), " do not fit the ", N, " saved rows of batch ",
                    B);
  Tensor d_product = layer_norm ? pooled_empty({N, 3 * H}, out.options()) : Tensor();
  const Tensor gain = optional_contiguous(ln_hh_weight);
  auto loop = LSTMKIT_DISPATCH(dtype, [&] {
    GRULayerNorms<scalar> ln;
    if (layer_norm) {
      ln.norm = layer_norms_of<scalar>(gain, Tensor(), Tensor(), Tensor(), 0.0, H);
      ln.h_pre = ptr<scalar>(pre); ln.mean = ptr<scalar>(means); ln.rstd = ptr<scalar>(rstds);
      ln.H = H;
    }
    return gru_backward<scalar>(d_out, d_hT, h0, w_hh, out, stash, st, reset_after, parts,
                                optional_contiguous(zoneout_h), optional_contiguous(recurrent),
                                (int)form, ln, d_product);
  });
  return {loop[0], loop[1], d_product, loop[2]};
}

// One GRU layer, one direction: x (N, I) -> out (N, H), h_T, stash. zoneout_h (N or 1, H):
// zoneout's mask; recurrent (B, H): recurrent dropout's; form: the activations (GRUActivations).
std::vector<Tensor> gru_layer_forward(Tensor x, c10::optional<Tensor> b_ih,
                                      c10::optional<Tensor> b_hh, Tensor h0, Tensor w_ih,
                                      Tensor w_hh, std::vector<i64> batch_sizes, bool reverse,
                                      bool reset_after, bool save, i64 parts,
                                      const c10::optional<Tensor>& zoneout_h,
                                      const c10::optional<Tensor>& recurrent, i64 form) {
  check_cpu(x, "x");
  check_layer_weights(3, x, h0.size(1), h0.size(1), w_ih, w_hh, b_ih, b_hh);
  Tensor zone = checked_zoneout_mask("zoneout_h", zoneout_h, x, h0.size(1));
  Tensor dropout = checked_recurrent_mask(recurrent, h0);
  for (auto* t : {&h0, &w_hh}) *t = t->contiguous();
  Steps st(batch_sizes, reverse);
  check_steps(st, x, h0);
  // The reset-after generic driver with one part (W_hh too large for row parts, or one thread;
  // see native.py's _driver) multiplies each step's input by W_ih^T right before the recurrent
  // product, into a (B, 3H) buffer the gate math reads from the cache, instead of projecting
  // all steps first into an (N, 3H) one read back from memory (31 MB at batch 128 / hidden 1024
  // / length 20).
  // Alternating processes, ms, all steps first / each step: batch 128 / hidden 1024 / length
  // 20, forward in training 61.0 / 59.0, inference 59.4 / 58.1; 64 / 512 / 100, inference 43.9
  // / 41.7, training 138.8 / 136.8. With row parts it lost (32 / 256: 6.23 / 6.40 inference,
  // 21.24 / 21.40 training; 16 / 384: 6.65 / 6.98, 21.42 / 21.92): MKL's calls on a part's
  // few rows cost more than the projection's passes over memory. (Without input columns the
  // projection's gemm() writes the zeros.)
  const bool input_per_step = parts == 1 && reset_after && x.size(1) > 0;
  Tensor gi = input_per_step ? Tensor() : input_projection(x, w_ih);
  return LSTMKIT_DISPATCH(x.scalar_type(), [&] {
    // torch.nn's activations (form 0) on the drivers compiled without the branch on form.
    auto run = [&](auto custom) {
      return gru_forward<scalar, decltype(custom)::value>(
          gi, optional_contiguous(b_ih), h0, w_hh, optional_contiguous(b_hh), st, reset_after,
          save, parts, zone, dropout, (int)form, {},
          input_per_step ? x.contiguous() : Tensor(), w_ih);
    };
    return form ? run(std::true_type{}) : run(std::false_type{});
  });
}

// The whole backward of one GRU layer, one direction. needs: (x, h0, w_ih, w_hh, b_ih, b_hh);
// zoneout_h, recurrent: the forward's masks or undefined; form: its activations.
// Returns dx, dh0, dw_ih, dw_hh, db_ih, db_hh; reset before, b_ih and b_hh enter as one sum and
// db_ih is its gradient (db_hh undefined).
std::vector<Tensor> gru_layer_backward(Tensor d_out, Tensor d_hT, Tensor x, Tensor h0,
                                       Tensor w_ih, Tensor w_hh, Tensor out, Tensor stash,
                                       std::vector<i64> batch_sizes, bool reverse, bool reset_after,
                                       i64 parts, std::vector<bool> needs,
                                       const Tensor& zoneout_h, const Tensor& recurrent,
                                       i64 form) {
  TORCH_CHECK(needs.size() == 6, "gru_layer_backward: needs has 6 flags, got ", needs.size());
  const auto dtype = out.scalar_type();
  d_out = incoming(d_out, dtype); d_hT = incoming(d_hT, dtype);
  for (auto* t : {&h0, &w_hh, &out, &stash}) *t = t->contiguous();
  const i64 H = out.size(1);
  Steps st(batch_sizes, reverse);
  const Tensor dropout = recurrent.defined() ? recurrent.contiguous() : Tensor();
  auto loop = LSTMKIT_DISPATCH(dtype, [&] {
    auto run = [&](auto custom) {             // as gru_layer_forward's
      return gru_backward<scalar, decltype(custom)::value>(
          d_out, d_hT, h0, w_hh, out, stash, st, reset_after, parts,
          zoneout_h.defined() ? zoneout_h.contiguous() : Tensor(), dropout, (int)form);
    };
    return form ? run(std::true_type{}) : run(std::false_type{});
  });
  const Tensor &d_gi = loop[0], &d_gh = loop[1];
  Products jobs;
  Tensor dx, dw_hh;
  if (needs[0]) {
    dx = pooled_empty(x.sizes(), x.options());
    jobs.add(dx, d_gi, w_ih);
  }
  // Reset after, b_hh's gradient is d_gh's column sums; reset before, b_ih and b_hh are one.
  WeightGradients input_side(jobs, d_gi, needs[2] ? x : Tensor(), Tensor(), h0, st,
                             needs[4] || (!reset_after && needs[5]));
  // With recurrent dropout the products' operand is each row's h_prev times its batch row's mask.
  Tensor u_prev;
  if (dropout.defined() && needs[3]) {
    u_prev = pooled_empty(out.sizes(), out.options());
    previous_rows(u_prev, out, h0, st);
    u_prev.mul_(mask_of_each_row(dropout, st));
  }
  c10::optional<WeightGradients> hidden_side;
  if (reset_after && u_prev.defined()) {
    hidden_side.emplace(jobs, d_gh, Tensor(), u_prev, Tensor(), st, needs[5]);
  } else if (reset_after) {
    hidden_side.emplace(jobs, d_gh, Tensor(), needs[3] ? out : Tensor(), h0, st, needs[5]);
  } else if (needs[3]) {
    // W_hr and W_hz multiply h_prev (u_prev with dropout), W_hn multiplies r * h_prev.
    Tensor h_prev = u_prev;
    if (!h_prev.defined()) {
      h_prev = pooled_empty(out.sizes(), out.options());
      previous_rows(h_prev, out, h0, st);
    }
    Tensor r_h = at::mul(stash.narrow(1, 0, H), h_prev);
    dw_hh = pooled_empty(w_hh.sizes(), w_hh.options());
    jobs.add(dw_hh.narrow(0, 0, 2 * H), d_gi.narrow(1, 0, 2 * H).t(), h_prev);
    jobs.add(dw_hh.narrow(0, 2 * H, H), d_gi.narrow(1, 2 * H, H).t(), r_h);
  }
  jobs.run();
  auto in = input_side.take(jobs);
  Tensor db_hh;
  if (hidden_side) {
    auto hidden = hidden_side->take(jobs);
    dw_hh = hidden[1];
    db_hh = hidden[2];
  }
  return {dx, loop[2], in[0], dw_hh, in[2], db_hh};
}

// ---- the layers' autograd nodes, in C++ ------------------------------------------------
//
// C++ autograd Functions rather than Python ones: at batch 1 the Python Function's plumbing
// (apply, saving, the Python backward, its casts and zero gradients) cost 40-60 us per LSTM
// training step around 300 us of kernels. Same semantics as the Python Functions of lstm.py,
// gru.py and rnn.py: inputs in float16 or bfloat16 are computed in float32 and the results and
// gradients cast back; where b_ih and b_hh enter as one sum each gets its own copy of its
// gradient; double backward raises, as @once_differentiable does.

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The gradient arriving at an output, zeros of `sizes` when it has none (materialize_grads is
// off: most callers use only `out`, and zeros that no one reads need not be made for h_T, c_T).
inline Tensor arriving(const Tensor& g, at::IntArrayRef sizes, const at::TensorOptions& options) {
  return g.defined() ? g : pooled_empty(sizes, options).zero_();
}

// Tensors in the compute dtype of the first (see compute_type), converted in pooled memory;
// undefined ones stay undefined.
template <size_t K>
std::array<Tensor, K> in_compute_type(const std::array<Tensor, K>& inputs) {
  const at::ScalarType type = compute_type(inputs[0].scalar_type());
  std::array<Tensor, K> in;
  for (size_t k = 0; k < K; ++k) in[k] = to_type(inputs[k], type);
  return in;
}

// A node's tensor inputs in the compute dtype of x (the first); their dtypes are kept in
// ctx->saved_data["types"] (-1 for an input not given), for the gradients and for `needs`.
template <size_t K>
std::array<Tensor, K> compute_inputs(AutogradContext* ctx, const std::array<Tensor, K>& inputs) {
  std::vector<i64> types(K);
  for (size_t k = 0; k < K; ++k)
    types[k] = inputs[k].defined() ? (i64)inputs[k].scalar_type() : -1;
  ctx->saved_data["types"] = types;
  ctx->set_materialize_grads(false);
  return in_compute_type(inputs);
}

// Which of the node's tensor inputs want a gradient (its edges count only the tensors given).
inline std::vector<bool> inputs_needing_grad(AutogradContext* ctx) {
  const std::vector<i64> types = ctx->saved_data["types"].toIntVector();
  std::vector<bool> needs(types.size(), false);
  for (size_t k = 0, edge = 0; k < types.size(); ++k)
    if (types[k] >= 0) needs[k] = ctx->needs_input_grad(edge++);
  return needs;
}

// The gradients of b_ih and b_hh entering as one sum with gradient db: db for each that wants
// one, the second a copy (autograd must never be handed one tensor twice).
inline std::pair<Tensor, Tensor> bias_gradients(const Tensor& db, bool ih, bool hh) {
  return {ih ? db : Tensor(), hh ? (ih ? pooled_clone(db) : db) : Tensor()};
}

// The node's result: one gradient per forward argument (`arguments` of them; the tensor inputs
// first, as `grads`), each in its input's dtype; under create_graph, results whose use in a
// further backward pass raises, as @once_differentiable makes them.
inline variable_list node_gradients(AutogradContext* ctx, std::vector<Tensor> grads,
                                    size_t arguments, bool create_graph) {
  const std::vector<i64> types = ctx->saved_data["types"].toIntVector();
  variable_list result(arguments);
  for (size_t k = 0; k < grads.size(); ++k)
    if (types[k] >= 0) result[k] = to_type(grads[k], (at::ScalarType)types[k]);
  if (!create_graph) return result;
  variable_list fakes;
  for (const Tensor& t : result)
    fakes.push_back(t.defined() ? t.detach().requires_grad_(true) : Tensor());
  auto error = std::make_shared<torch::autograd::DelayedError>(
      "trying to differentiate twice a function that was marked with @once_differentiable "
      "(a native recurrent layer's backward)", (int64_t)fakes.size());
  return (*error)(std::move(fakes));
}

// How a layer node's x and results are shaped: as rows (x (N, I), out (N, P), h_T (B, P), c_T
// (B, H)), or as lstmkit.LSTM's (x and out (T, B, .), or (B, T, .) batch-first; h_T and c_T
// (1, B, .)), so that the module's direct call needs no view of its own around the node: each
// view is an autograd node more, forward and backward, and at batch 1-8 the Python and autograd
// work around the kernels is a fifth of a training step.
enum class NodeShapes : i64 { ROWS = 0, TIME_MAJOR = 1, BATCH_FIRST = 2 };

// The time-major rows (T * B, F) of a module-shaped sequence (T, B, F) or (B, T, F).
inline Tensor sequence_rows(const Tensor& sequence, NodeShapes shapes) {
  if (shapes == NodeShapes::ROWS) return sequence;
  Tensor time_major = shapes == NodeShapes::BATCH_FIRST ? sequence.transpose(0, 1) : sequence;
  return time_major.reshape({time_major.size(0) * time_major.size(1), time_major.size(2)});
}

// A tensor of its own over a view's elements (same storage, offset, sizes and strides), not a
// view: a node's output that is a view of a tensor made inside the node may not be changed in
// place (autograd refuses), and the caller may change the module's output in place
// (out += residual), as with torch.nn.
inline Tensor own_tensor(const Tensor& view) {
  return at::empty({0}, view.options())
      .set_(view.storage(), view.storage_offset(), view.sizes(), view.strides());
}

// Rows (T * B, F) in a module's shape (see NodeShapes); `own`: as a tensor of its own.
inline Tensor module_sequence(const Tensor& rows, i64 T, i64 B, NodeShapes shapes, bool own) {
  if (shapes == NodeShapes::ROWS) return rows;
  Tensor shaped = rows.view({T, B, rows.size(1)});
  if (shapes == NodeShapes::BATCH_FIRST) shaped = shaped.transpose(0, 1);
  return own ? own_tensor(shaped) : shaped;
}

// A state (B, F) as the module's (1, B, F), a tensor of its own.
inline Tensor module_state(const Tensor& state, NodeShapes shapes) {
  return shapes == NodeShapes::ROWS ? state : own_tensor(state.unsqueeze(0));
}

struct NativeLSTMLayer : public torch::autograd::Function<NativeLSTMLayer> {
  // Tensors x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, w_peephole, zoneout_h, zoneout_c,
  // recurrent (as NativeLSTMFunction's; the masks get no gradient);
  // plan = {parts, input_in_step, own_product, backward parts, backward own_product} (native.py);
  // shapes: x's and the results' (NodeShapes; h0 and c0 are (B, .) in every case).
  static variable_list forward(
      AutogradContext* ctx, const Tensor& x, const Tensor& h0, const Tensor& c0,
      const Tensor& w_ih, const Tensor& w_hh, const c10::optional<Tensor>& b_ih,
      const c10::optional<Tensor>& b_hh, const c10::optional<Tensor>& w_hr,
      const c10::optional<Tensor>& w_peephole, const c10::optional<Tensor>& zoneout_h,
      const c10::optional<Tensor>& zoneout_c, const c10::optional<Tensor>& recurrent,
      const std::vector<i64>& batch_sizes, bool reverse, i64 form, const std::vector<i64>& plan,
      i64 shapes) {
    TORCH_CHECK(plan.size() == 5, "lstm_layer: plan has 5 entries, got ", plan.size());
    const NodeShapes node_shapes = static_cast<NodeShapes>(shapes);
    // The rows of a module-shaped x: a view of x.detach(), not of x, which would be a view made
    // here in no-grad mode, whose grad_fn autograd reads (and refuses) when it words its error
    // for an x changed in place before the backward. detach() shares x's version counter, so
    // that change is still caught, with torch's usual message.
    const Tensor rows = node_shapes == NodeShapes::ROWS ? x : sequence_rows(x.detach(), node_shapes);
    auto in = compute_inputs<12>(ctx, {rows, h0, c0, w_ih, w_hh, given(b_ih), given(b_hh),
                                       given(w_hr), given(w_peephole), given(zoneout_h),
                                       given(zoneout_c), given(recurrent)});
    auto r = lstm_layer_forward(in[0], maybe(in[5]), maybe(in[6]), in[1], in[2], in[3], in[4],
                                maybe(in[7]), batch_sizes, reverse, true, plan[0], plan[1] != 0,
                                plan[2] != 0, maybe(in[8]), form, maybe(in[9]), maybe(in[10]),
                                maybe(in[11]));
    // r: out, h_T, c_T, gates, cells, q (none here), h_prev (from the fused and own-product
    // drivers, see PreviousRows). Saved: what lstm.py's Functions save, but the previous
    // rows of the output (dW_hh's operand) instead of the output itself: the caller may edit
    // the output in place (out += residual), as with torch.nn, without a copy of it (the copy
    // and its autograd node cost 25 us of a 470 us training step at batch 1 / hidden 64).
    // h0 is not saved: the backward never reads it.
    Tensor h_prev = r[6];                  // made by the step loop, or here
    if (!h_prev.defined()) {
      h_prev = pooled_empty(r[0].sizes(), r[0].options());
      previous_rows(h_prev, r[0], in[1].contiguous(), Steps(batch_sizes, reverse));
    }
    ctx->save_for_backward({in[0], in[2], in[3], in[4], in[7], h_prev, r[3], r[4], in[8],
                            in[9], in[10], in[11]});
    ctx->saved_data["batch_sizes"] = batch_sizes;
    ctx->saved_data["reverse"] = reverse;
    ctx->saved_data["form"] = form;
    ctx->saved_data["parts"] = plan[3];
    ctx->saved_data["own"] = plan[4] != 0;
    ctx->saved_data["shapes"] = shapes;
    const i64 T = (i64)batch_sizes.size(), B = batch_sizes.empty() ? 0 : batch_sizes[0];
    return {module_sequence(to_type(r[0], x.scalar_type()), T, B, node_shapes, true),
            module_state(to_type(r[1], h0.scalar_type()), node_shapes),
            module_state(to_type(r[2], c0.scalar_type()), node_shapes)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const bool create_graph = c10::GradMode::is_enabled();
    std::vector<Tensor> per_input;
    {
      c10::NoGradGuard no_grad;
      // x c0 w_ih w_hh w_hr h_prev gates cells w_peephole zoneout_h zoneout_c recurrent
      auto s = ctx->get_saved_variables();
      std::vector<bool> needs = inputs_needing_grad(ctx);
      needs.resize(9);                                         // the masks get none
      const std::vector<i64> batch_sizes = ctx->saved_data["batch_sizes"].toIntVector();
      const auto shapes = static_cast<NodeShapes>(ctx->saved_data["shapes"].toInt());
      if (shapes != NodeShapes::ROWS) {                        // the module's shapes as rows
        if (grads[0].defined()) grads[0] = sequence_rows(grads[0], shapes);
        for (int k : {1, 2})
          if (grads[k].defined()) grads[k] = grads[k].select(0, 0);
      }
      const Tensor& h_prev = s[5];
      auto g = lstm_layer_backward(
          arriving(grads[0], h_prev.sizes(), h_prev.options()),
          arriving(grads[1], {batch_sizes[0], h_prev.size(1)}, h_prev.options()),
          arriving(grads[2], s[1].sizes(), s[1].options()), s[0], s[1], s[2], s[3], maybe(s[4]),
          h_prev, s[6], s[7], batch_sizes, ctx->saved_data["reverse"].toBool(),
          ctx->saved_data["parts"].toInt(), ctx->saved_data["own"].toBool(), needs,
          maybe(s[8]), ctx->saved_data["form"].toInt(), maybe(s[9]), maybe(s[10]), maybe(s[11]));
      // g: dx, dh0, dc0, dw_ih, dw_hh, db, dw_hr, dw_peephole
      if (g[0].defined())
        g[0] = module_sequence(g[0], (i64)batch_sizes.size(), batch_sizes[0], shapes, false);
      auto [db_ih, db_hh] = bias_gradients(g[5], needs[5], needs[6]);
      per_input = {g[0], g[1], g[2], g[3], g[4], db_ih, db_hh, g[6], g[7]};
    }
    return node_gradients(ctx, per_input, 17, create_graph);
  }
};

// The GRU's and RNN's node (one state each): `gru` picks the family, `option` is the GRU's
// reset_after or the RNN's relu.
struct NativeOneStateLayer : public torch::autograd::Function<NativeOneStateLayer> {
  // Tensors x, h0, w_ih, w_hh, b_ih, b_hh, zoneout_h, recurrent (as NativeGRUFunction's,
  // NativeRNNFunction's; the GRU's masks get no gradient); parts: the driver; form: the GRU's
  // activations.
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& h0,
                               const Tensor& w_ih, const Tensor& w_hh,
                               const c10::optional<Tensor>& b_ih,
                               const c10::optional<Tensor>& b_hh,
                               const c10::optional<Tensor>& zoneout_h,
                               const c10::optional<Tensor>& recurrent,
                               const std::vector<i64>& batch_sizes, bool reverse, bool gru,
                               bool option, i64 parts, i64 form) {
    auto in = compute_inputs<8>(ctx, {x, h0, w_ih, w_hh, given(b_ih), given(b_hh),
                                      given(zoneout_h), given(recurrent)});
    // r: out, h_T[, stash]. Their backward loops read the previous rows from out itself.
    auto r = gru ? gru_layer_forward(in[0], maybe(in[4]), maybe(in[5]), in[1], in[2], in[3],
                                     batch_sizes, reverse, option, true, parts, maybe(in[6]),
                                     maybe(in[7]), form)
                 : rnn_layer_forward(in[0], maybe(in[4]), maybe(in[5]), in[1], in[2], in[3],
                                     batch_sizes, reverse, option, parts);
    // In float16/bfloat16 the output saved (r[0], float32) is not the one returned, which the
    // caller may then edit in place without a copy (saves_no_output in native.py).
    ctx->save_for_backward({in[0], in[1], in[2], in[3], r[0], gru ? r[2] : Tensor(), in[6],
                            in[7]});
    ctx->saved_data["batch_sizes"] = batch_sizes;
    ctx->saved_data["reverse"] = reverse;
    ctx->saved_data["gru"] = gru;
    ctx->saved_data["option"] = option;
    ctx->saved_data["parts"] = parts;
    ctx->saved_data["form"] = form;
    return {to_type(r[0], x.scalar_type()), to_type(r[1], h0.scalar_type())};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const bool create_graph = c10::GradMode::is_enabled();
    std::vector<Tensor> g;
    {
      c10::NoGradGuard no_grad;
      // x h0 w_ih w_hh out, the GRU's stash and masks (or undefined)
      auto s = ctx->get_saved_variables();
      std::vector<bool> needs = inputs_needing_grad(ctx);
      needs.resize(6);                                         // the masks get none
      const bool gru = ctx->saved_data["gru"].toBool(), option = ctx->saved_data["option"].toBool();
      const std::vector<i64> batch_sizes = ctx->saved_data["batch_sizes"].toIntVector();
      const bool reverse = ctx->saved_data["reverse"].toBool();
      const i64 parts = ctx->saved_data["parts"].toInt();
      Tensor d_out = arriving(grads[0], s[4].sizes(), s[4].options());
      Tensor d_hT = arriving(grads[1], s[1].sizes(), s[1].options());
      // GRU: dx, dh0, dw_ih, dw_hh, db_ih, db_hh, but reset before db_ih is the gradient of
      // b_ih + b_hh; RNN: dx, dh0, dw_ih, dw_hh and that of b_ih + b_hh.
      g = gru ? gru_layer_backward(d_out, d_hT, s[0], s[1], s[2], s[3], s[4], s[5], batch_sizes,
                                   reverse, option, parts, needs, s[6], s[7],
                                   ctx->saved_data["form"].toInt())
              : rnn_layer_backward(d_out, d_hT, s[0], s[1], s[2], s[3], s[4], batch_sizes, reverse,
                                   option, parts, needs);
      g.resize(6);
      if (!(gru && option)) std::tie(g[4], g[5]) = bias_gradients(g[4], needs[4], needs[5]);
    }
    return node_gradients(ctx, g, 14, create_graph);
  }
};

std::vector<Tensor> lstm_layer_py(Tensor x, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh,
                                  c10::optional<Tensor> b_ih, c10::optional<Tensor> b_hh,
                                  c10::optional<Tensor> w_hr, c10::optional<Tensor> w_peephole,
                                  c10::optional<Tensor> zoneout_h,
                                  c10::optional<Tensor> zoneout_c,
                                  c10::optional<Tensor> recurrent,
                                  std::vector<i64> batch_sizes, bool reverse, i64 form,
                                  std::vector<i64> plan) {
  check_cpu(x, "x");
  check_layer_weights(4, x, c0.size(1), h0.size(1), w_ih, w_hh, b_ih, b_hh, w_hr, w_peephole);
  return NativeLSTMLayer::apply(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, w_peephole, zoneout_h,
                                zoneout_c, recurrent, batch_sizes, reverse, form, plan,
                                (i64)NodeShapes::ROWS);
}

// A GRU (gru, option = reset_after) or RNN (option = relu) layer through its autograd node;
// zoneout_h, recurrent: the GRU's masks, or none; form: the GRU's activations, or 0.
std::vector<Tensor> one_state_layer_py(Tensor x, Tensor h0, Tensor w_ih, Tensor w_hh,
                                       c10::optional<Tensor> b_ih, c10::optional<Tensor> b_hh,
                                       c10::optional<Tensor> zoneout_h,
                                       c10::optional<Tensor> recurrent,
                                       std::vector<i64> batch_sizes, bool reverse, bool gru,
                                       bool option, i64 parts, i64 form) {
  check_cpu(x, "x");
  check_layer_weights(gru ? 3 : 1, x, h0.size(1), h0.size(1), w_ih, w_hh, b_ih, b_hh);
  TORCH_CHECK_VALUE(gru || !(zoneout_h.has_value() || recurrent.has_value() || form),
                    "the native RNN has no zoneout, recurrent dropout or other activations");
  return NativeOneStateLayer::apply(x, h0, w_ih, w_hh, b_ih, b_hh, zoneout_h, recurrent,
                                    batch_sizes, reverse, gru, option, parts, form);
}

// Inference: lstm_layer's arguments and conversions without its autograd node, nothing saved.
// plan = {parts, input_in_step, own_product} (native.py's _lstm_plan). Tensors of any dtype
// the kernels take, float16/bfloat16 computed in float32; returns out, h_T, c_T in the dtypes
// of x, h0, c0.
std::vector<Tensor> lstm_infer_py(Tensor x, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh,
                                  c10::optional<Tensor> b_ih, c10::optional<Tensor> b_hh,
                                  c10::optional<Tensor> w_hr, c10::optional<Tensor> w_peephole,
                                  c10::optional<Tensor> zoneout_h,
                                  c10::optional<Tensor> zoneout_c,
                                  c10::optional<Tensor> recurrent,
                                  std::vector<i64> batch_sizes, bool reverse, i64 form,
                                  std::vector<i64> plan) {
  TORCH_CHECK(plan.size() == 3, "lstm_infer: plan has 3 entries, got ", plan.size());
  auto in = in_compute_type<12>({x, h0, c0, w_ih, w_hh, given(b_ih), given(b_hh), given(w_hr),
                                 given(w_peephole), given(zoneout_h), given(zoneout_c),
                                 given(recurrent)});
  auto r = lstm_layer_forward(in[0], maybe(in[5]), maybe(in[6]), in[1], in[2], in[3], in[4],
                              maybe(in[7]), batch_sizes, reverse, false, plan[0], plan[1] != 0,
                              plan[2] != 0, maybe(in[8]), form, maybe(in[9]), maybe(in[10]),
                              maybe(in[11]));
  return {to_type(r[0], x.scalar_type()), to_type(r[1], h0.scalar_type()),
          to_type(r[2], c0.scalar_type())};
}

// lstmkit.LSTM's direct call (see _runs_directly in nn/recurrent.py): x (T, B, I), or (B, T, I)
// with batch_first; hx = (h0, c0), each (1, B, H), or None for zeros of the module's hidden size
// (not w_hh's, which the kernel checks against it). plan: lstm_infer's (3 entries) in inference,
// lstm_layer's (5) for the autograd node. Returns out in x's layout and h_T, c_T (1, B, H): the
// module's reshapes done here and, in training, inside the node, where they cost no Python call
// and no autograd node (at batch 1-8 a tenth of a training step's Python and autograd work).
std::vector<Tensor> lstm_module_py(Tensor x, c10::optional<Tensor> h0, c10::optional<Tensor> c0,
                                   Tensor w_ih, Tensor w_hh, c10::optional<Tensor> b_ih,
                                   c10::optional<Tensor> b_hh, bool batch_first, i64 hidden,
                                   std::vector<i64> plan) {
  TORCH_CHECK_VALUE(x.dim() == 3 && h0.has_value() == c0.has_value(),
                    "lstm_module: x (T, B, I) and both states or neither");
  check_cpu(x, "x");
  const i64 T = x.size(batch_first ? 1 : 0), B = x.size(batch_first ? 0 : 1);
  Tensor zeros;                       // read only by the kernel
  auto first = [&](const c10::optional<Tensor>& state) {
    if (state.has_value()) return state->select(0, 0);
    if (!zeros.defined()) zeros = at::zeros({B, hidden}, x.options());
    return zeros;
  };
  Tensor h_start = first(h0), c_start = first(c0);
  check_layer_weights(4, x, c_start.size(1), h_start.size(1), w_ih, w_hh, b_ih, b_hh);
  const auto shapes = batch_first ? NodeShapes::BATCH_FIRST : NodeShapes::TIME_MAJOR;
  const c10::optional<Tensor> none;
  if (plan.size() == 5)
    return NativeLSTMLayer::apply(x, h_start, c_start, w_ih, w_hh, b_ih, b_hh, none, none,
                                  none, none, none, std::vector<i64>(T, B), false, (i64)0, plan,
                                  (i64)shapes);
  auto r = lstm_infer_py(sequence_rows(x, shapes), h_start, c_start, w_ih, w_hh, b_ih, b_hh, {},
                         {}, {}, {}, {}, std::vector<i64>(T, B), false, 0, plan);
  return {module_sequence(r[0], T, B, shapes, false), r[1].unsqueeze(0), r[2].unsqueeze(0)};
}

// Inference: one_state_layer's, the same way. Returns out, h_T in the dtypes of x, h0.
std::vector<Tensor> one_state_infer_py(Tensor x, Tensor h0, Tensor w_ih, Tensor w_hh,
                                       c10::optional<Tensor> b_ih, c10::optional<Tensor> b_hh,
                                       c10::optional<Tensor> zoneout_h,
                                       c10::optional<Tensor> recurrent,
                                       std::vector<i64> batch_sizes, bool reverse, bool gru,
                                       bool option, i64 parts, i64 form) {
  TORCH_CHECK_VALUE(gru || !(zoneout_h.has_value() || recurrent.has_value() || form),
                    "the native RNN has no zoneout, recurrent dropout or other activations");
  auto in = in_compute_type<8>({x, h0, w_ih, w_hh, given(b_ih), given(b_hh), given(zoneout_h),
                                given(recurrent)});
  auto r = gru ? gru_layer_forward(in[0], maybe(in[4]), maybe(in[5]), in[1], in[2], in[3],
                                   batch_sizes, reverse, option, false, parts, maybe(in[6]),
                                   maybe(in[7]), form)
               : rnn_layer_forward(in[0], maybe(in[4]), maybe(in[5]), in[1], in[2], in[3],
                                   batch_sizes, reverse, option, parts);
  return {to_type(r[0], x.scalar_type()), to_type(r[1], h0.scalar_type())};
}

// out[i] = as[i] @ bs[i] for every i, in one parallel region (Products).
void products_py(std::vector<Tensor> outs, std::vector<Tensor> as, std::vector<Tensor> bs) {
  TORCH_CHECK(outs.size() == as.size() && as.size() == bs.size(),
              "products: lists of different lengths");
  for (size_t i = 0; i < outs.size(); ++i) {
    const Tensor &o = outs[i], &a = as[i], &b = bs[i];
    TORCH_CHECK_VALUE(o.dim() == 2 && a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(0) &&
                          o.size(0) == a.size(0) && o.size(1) == b.size(1) &&
                          a.scalar_type() == o.scalar_type() &&
                          b.scalar_type() == o.scalar_type(),
                      "products: out ", o.sizes(), " = a ", a.sizes(), " @ b ", b.sizes(),
                      " do not fit (or their dtypes differ)");
    for (const Tensor* t : {&o, &a, &b}) check_cpu(*t, "products' operands");
  }
  Products jobs{outs, as, bs};
  jobs.run();
}

// Masks of independent Bernoulli(p) draws, 0 or 1 (zoneout's and recurrent dropout's), (rows,
// cols) of like's dtype: element k is 1 where u_k < p, u_k the top 24 bits of the k-th output
// of SplitMix64 (Steele et al. 2014: state seed + (k + 1) golden, then its mixing function; it
// passes BigCrush), a uniform in [0, 1) on a 2^-24 grid. Counter-based, so the elements are
// drawn in parallel and the result does not depend on the threads. torch.bernoulli draws one
// element at a time from one stream: 20 ms for the two zoneout masks of a layer at batch 64 /
// hidden 512 / length 100, most of what zoneout added to a training step there.
Tensor bernoulli_mask_py(i64 rows, i64 cols, double p, int64_t seed, const Tensor& like) {
  TORCH_CHECK_VALUE(rows >= 0 && cols >= 0, "bernoulli_mask: rows and cols must be >= 0, got ",
                    rows, " and ", cols);
  TORCH_CHECK_VALUE(p >= 0.0 && p <= 1.0, "bernoulli_mask: p must be in [0, 1], got ", p);
  const at::ScalarType type = like.scalar_type();
  const bool direct = type == at::kFloat || type == at::kDouble;
  Tensor mask = pooled_empty({rows, cols}, like.options().dtype(direct ? type : at::kFloat));
  // u < p with u = m 2^-24, m an integer below 2^24: m < ceil(p 2^24), exactly.
  const uint64_t threshold = (uint64_t)std::ceil(p * 16777216.0);
  const uint64_t base = (uint64_t)seed;
  constexpr uint64_t golden = 0x9E3779B97F4A7C15ull;
  dispatch(mask.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    T* out = mask.data_ptr<T>();
    at::parallel_for(0, rows * cols, 1 << 16, [&](i64 k0, i64 k1) {
      for (i64 k = k0; k < k1; ++k) {
        uint64_t z = base + (uint64_t)(k + 1) * golden;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        z ^= z >> 31;
        out[k] = (z >> 40) < threshold ? T(1) : T(0);
      }
    });
  });
  return direct ? mask : mask.to(type);
}

// For the benchmark's products bound (bench.products_seconds): `steps` times out = a @ b, a
// (B, K), b (K, N), as the generic driver multiplies: MKL's packed GEMM with b packed once
// (at::mm without it), the rows in `parts` independent per-thread parts (1: each product split
// across the threads), the same operand and result buffers at every step, as the loop's stay
// in cache: the recurrence's products alone, with no gate math and no memory traffic besides.
Tensor step_products_py(Tensor a, Tensor b, i64 steps, i64 parts) {
  a = a.contiguous();
  check_cpu(a, "a");
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(0) &&
              a.scalar_type() == b.scalar_type(), "step_products: a (B, K), b (K, N)");
  const i64 B = a.size(0);
  Tensor out = pooled_empty({B, b.size(1)}, a.options());
  return dispatch(a.scalar_type(), [&](auto tag) {
    using S = decltype(tag);
    StepProduct<S> product(b, B);
    run_row_parts(steps, B, parts, [&](i64, i64 r0, i64 r1) {
      product(mat<S>(out).rows_at(r0, r1 - r0), mat<S>(a).rows_at(r0, r1 - r0));
    });
    return out;
  });
}

// previous_rows (above) for Python: the tests check it into the columns of a wider buffer.
void previous_rows_py(Tensor into, Tensor sequence, Tensor initial, std::vector<i64> batch_sizes,
                      bool reverse) {
  previous_rows(into, sequence.contiguous(), initial.contiguous(), Steps(batch_sizes, reverse));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lstmkit native CPU recurrences (see _native.cpp)";
  m.def("lstm_layer", &lstm_layer_py);
  m.def("one_state_layer", &one_state_layer_py);
  m.def("lstm_infer", &lstm_infer_py);
  m.def("lstm_module", &lstm_module_py);
  m.def("lstm_variant_loops_forward", &lstm_variant_loops_forward);
  m.def("lstm_variant_loops_backward", &lstm_variant_loops_backward);
  m.def("gru_variant_loops_forward", &gru_variant_loops_forward);
  m.def("gru_variant_loops_backward", &gru_variant_loops_backward);
  m.def("layer_norm_rows", &layer_norm_rows, py::arg("v"), py::arg("gain"), py::arg("beta"),
        py::arg("eps"), py::arg("into") = py::none());
  m.def("layer_norm_rows_backward", &layer_norm_rows_backward, py::arg("d"), py::arg("v"),
        py::arg("mean"), py::arg("rstd"), py::arg("gain"), py::arg("into") = py::none());
  m.def("one_state_infer", &one_state_infer_py);
  m.def("cell_step", &cell_step_py, py::arg("kind"), py::arg("x"), py::arg("h"), py::arg("c"),
        py::arg("w_ih"), py::arg("w_hh"), py::arg("b_ih"), py::arg("b_hh"),
        py::arg("w_peephole") = py::none(), py::arg("cell_form") = 0);
  m.def("cell_step_if", &cell_step_if_py);
  m.def("previous_rows", &previous_rows_py);
  m.def("products", &products_py);
  m.def("bernoulli_mask", &bernoulli_mask_py);
  m.def("step_products", &step_products_py);
  m.def("pooled_empty", [](std::vector<i64> sizes, const Tensor& like) {
    return pooled_empty(sizes, like.options());
  }, "like.new_empty(sizes) on the CPU, its memory from the recycling pool.");
  m.def("pool_free_bytes", [] { return recycling().free_bytes(); },
        "Bytes of free memory the recycling pool holds.");
  m.def("release_pool", [] { recycling().release(); },
        "Give the recycling pool's free memory back to the system.");
  m.def("set_pool_limit", [](size_t bytes) { return std::exchange(recycling().limit, bytes); },
        "Set the most free memory the recycling pool keeps (bytes); returns the previous value.");
  m.def("set_steal_after_spins", [](int spins) { return std::exchange(steal_after_spins, spins); },
        "Set how long a fused-driver worker waits for the others before it takes their unclaimed "
        "blocks (spins of ~50 ns); returns the previous value.");
  m.def("set_fused_projection_ring", [](int rows, i64 bytes) {
    TORCH_CHECK(rows >= 1, "rows: at least 1, got ", rows);
    return std::make_pair(std::exchange(fused_projection_rows, rows),
                          std::exchange(fused_projection_ring_bytes, bytes));
  }, "Set the fused driver's projection ring at batch 1: `rows` rows at a time once the "
     "projection of all steps would take more than `bytes`; returns the previous pair.");
  m.def("set_stream_min_bytes", [](i64 bytes) { return std::exchange(stream_min_bytes, bytes); },
        "Set the size from which the saved gates (and the GRU's d_gi) take streaming stores; "
        "returns the previous value.");
  m.def("set_slab_bytes", [](i64 bytes) { return std::exchange(slab_bytes, bytes); },
        "Set the weights (bytes) each pass of the row groups reads in our own products; returns "
        "the previous value.");
  m.def("set_chunk_bytes", [](i64 bytes) { return std::exchange(chunk_bytes, bytes); },
        "Set the L2 budget of the packed-matrix chunks (bytes); returns the previous value.");
  m.def("stacked_weight_products", &stacked_weight_products,
        "Whether the weight gradients of N rows and `count` stacked columns ([x | h_prev | 1]) "
        "are one stacked product with `threads` threads (see WeightGradients).");
  m.def("set_weight_products_form", [](int form) {
    TORCH_CHECK(form >= 0 && form <= 2, "form: 0 (by size), 1 (separate) or 2 (stacked), got ",
                form);
    return std::exchange(weight_products_form, form);
  }, "How weight gradients are computed: 0 by size, 1 separate products, 2 one stacked "
     "product (see WeightGradients); returns the previous form.");
  m.def("mkl_packed_gemm", [] { return mkl_packed_gemm() && mkl_gemm(); },
        "Whether MKL's packed GEMM (the generic driver's float32 steps) and gemm (the layer's "
        "products) are there to call directly.");
  m.def("onednn_works", &onednn_works,
        "Whether oneDNN's float32 matmul runs on this machine (torch built with it, a CPU it "
        "takes).");
  m.def("uses_onednn", [] { return use_onednn; }, "Whether float32 products run on oneDNN.");
  m.def("set_onednn_min_flops", [](double flops) { return std::exchange(onednn_min_flops, flops); },
        "Set the size (floating-point operations) below which a per-sequence product takes MKL "
        "even on oneDNN; returns the previous value.");
  m.def("set_use_onednn", [](bool on) { return std::exchange(use_onednn, on); },
        "Multiply float32 products through oneDNN (True) instead of MKL or at::mm; returns the "
        "previous value.");
  m.def("set_use_mkl", [](bool on) { return std::exchange(use_mkl, on); },
        "Call MKL's packed GEMM and gemm directly when there (True, default), or at::mm; returns "
        "the previous value.");
}
