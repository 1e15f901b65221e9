// Fused softcapped cross-entropy: loss and logits gradient in one pass over the logits.
//
// Contract (DESIGN.md §2.1; the spec is kernels/reference.py): for each row i of logits
// z [N, V], s = cap*tanh(z/cap) | cap*sigmoid(z/scale) | z, loss_i = logsumexp(s) -
// s[t_i] in fp32, and the gradient row dz_i = row_scale_i * (softmax(s) - onehot(t_i)) *
// ds/dz, written in the logits' dtype.  row_scale_i is *grad_scale (1/count for a mean,
// 1 for a sum) for a kept row, 0 for an ignored row (exact zeros), NaN for a target
// outside [0, V) (that row's loss is NaN too; the target is never used as an address).
//
// Bytes: the op must read N*V logits and write N*V gradients; everything else is O(N).
// The staged kernel (v2, below) takes 16-bit logits with a capped kind whose bound is the
// softmax reference; the two v1 kernels take the rest:
//   cached    one CTA of 1024 threads per row; the row is loaded once with 16-byte
//             streaming loads into registers (raw dtype, kLoads packs per thread),
//             reduced to (max, sum-exp), and the gradient is computed from the
//             registers.  Used when V is a multiple of the pack width, the row start
//             is 16-byte aligned and V <= 1024 * pack * 8 (65536 for 16-bit logits,
//             32768 for fp32).  V = 50304 (the GPT vocab) uses kLoads = 8: 32 registers
//             of cache per thread, so the 64-register budget of a 1024-thread CTA holds.
//   streaming any V and alignment: scalar loads, an online max/sum-exp sweep, then a
//             second sweep that re-reads the row (mostly from L2) for the gradient.
// Special-function cost: s needs exp + reciprocal, softmax one exp; the cached kernel
// evaluates s twice (it caches raw logits to stay in registers), so sigmoid costs
// 6 MUFU ops per element.  See bench/NOTES.md for what is measured and what is next.
//
// For the capped kinds s is bounded, so when the bound keeps exp(s - bound) in fp32's
// normal range (cap <= 40 for tanh, cap <= 80 for sigmoid) the bound is used as the
// softmax reference instead of the row max: one exp per element instead of two in
// the first sweep, and no max reduction.

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <tuple>

namespace speedrun {
namespace {

constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxCachedLoads = 8;

enum CapKind : int64_t { kNone = 0, kTanh = 1, kSigmoid = 2 };

// Conversions written with the hardware's own operations: c10's generic ones compile
// to longer integer sequences that made the register-cached bf16 kernel spill.
// bf16 -> fp32 is a 16-bit shift.
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(at::Half x) { return static_cast<float>(x); }
__device__ __forceinline__ float to_float(at::BFloat16 x) { return __uint_as_float(static_cast<uint32_t>(x.x) << 16); }

// Narrowing stores with the hardware round-to-nearest-even conversions (cvt.rn).
template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ at::Half from_float<at::Half>(float x) {
  return at::Half(__half_as_ushort(__float2half_rn(x)), at::Half::from_bits());
}
template <>
__device__ __forceinline__ at::BFloat16 from_float<at::BFloat16>(float x) {
  return at::BFloat16(__bfloat16_as_ushort(__float2bfloat16_rn(x)), at::BFloat16::from_bits());
}

struct CapParams {
  int kind;
  float cap;
  float inv_cap;
  float inv_scale;
  bool fixed_reference;  // use `reference` instead of the row max
  float reference;
};

__device__ __forceinline__ float capped(float z, const CapParams& p) {
  if (p.kind == kTanh) {
    // tanh(x) = 1 - 2 / (exp(2x) + 1): exp overflowing to inf gives 1, underflow -1.
    const float e = __expf(2.f * z * p.inv_cap);
    return p.cap * (1.f - 2.f * __frcp_rn(e + 1.f));
  }
  if (p.kind == kSigmoid) {
    return p.cap * __frcp_rn(1.f + __expf(-z * p.inv_scale));
  }
  return z;
}

// ds/dz expressed through s, so no second transcendental is needed.
__device__ __forceinline__ float capped_derivative(float s, const CapParams& p) {
  if (p.kind == kTanh) {
    const float t = s * p.inv_cap;
    return 1.f - t * t;
  }
  if (p.kind == kSigmoid) {
    return s * (1.f - s * p.inv_cap) * p.inv_scale;
  }
  return 1.f;
}

// A running softmax normalizer: sum of exp(s - max) over the values seen.
struct MaxSum {
  float max;
  float sum;
};

__device__ __forceinline__ MaxSum combine(MaxSum a, MaxSum b) {
  const float m = fmaxf(a.max, b.max);
  if (m == -INFINITY) return {m, 0.f};
  return {m, a.sum * __expf(a.max - m) + b.sum * __expf(b.max - m)};
}

// Block-wide combine; every thread gets the result.
__device__ MaxSum block_reduce(MaxSum value) {
  __shared__ MaxSum warp_results[kWarps];
  __shared__ MaxSum result;
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    MaxSum other{__shfl_xor_sync(0xffffffffu, value.max, offset),
                 __shfl_xor_sync(0xffffffffu, value.sum, offset)};
    value = combine(value, other);
  }
  if (lane == 0) warp_results[warp] = value;
  __syncthreads();
  if (warp == 0) {
    value = warp_results[lane];  // kWarps == 32
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) {
      MaxSum other{__shfl_xor_sync(0xffffffffu, value.max, offset),
                   __shfl_xor_sync(0xffffffffu, value.sum, offset)};
      value = combine(value, other);
    }
    if (lane == 0) result = value;
  }
  __syncthreads();
  return result;
}

// Per-row quantities every thread needs: the target and the gradient's row factor.
struct RowInfo {
  int64_t target;
  bool in_range;
  float grad_factor;
};

__device__ __forceinline__ RowInfo row_info(const int64_t* targets, int64_t row, int64_t n_cols,
                                            int64_t ignore_index, const float* grad_scale) {
  RowInfo info;
  info.target = targets[row];
  const bool kept = info.target != ignore_index;
  info.in_range = info.target >= 0 && info.target < n_cols;
  info.grad_factor = !kept ? 0.f : (info.in_range ? *grad_scale : NAN);
  return info;
}

// Thread 0 writes the row's loss from the reduced normalizer.
template <typename T>
__device__ __forceinline__ void write_loss(const T* row_in, const RowInfo& info, int64_t ignore_index,
                                           float lse, const CapParams& p, float* loss, int64_t row) {
  if (threadIdx.x != 0) return;
  if (info.target == ignore_index) {
    loss[row] = 0.f;
  } else if (!info.in_range) {
    loss[row] = NAN;
  } else {
    loss[row] = lse - capped(to_float(row_in[info.target]), p);
  }
}

__device__ __forceinline__ float gradient(float s, float lse, bool is_target, float factor,
                                          const CapParams& p) {
  const float prob = __expf(s - lse);
  return (prob - (is_target ? 1.f : 0.f)) * capped_derivative(s, p) * factor;
}

// 16 bytes of logits: 8 bf16/fp16 or 4 fp32.
template <typename T>
struct alignas(16) Pack {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

// An empty asm that "modifies" the pack: the compiler must then recompute values derived
// from it instead of keeping the fp32 copies of the first sweep alive (which spilled).
template <typename T>
__device__ __forceinline__ void forget_derived_values(Pack<T>& pack) {
  uint32_t* words = reinterpret_cast<uint32_t*>(&pack);
#pragma unroll
  for (int w = 0; w < 4; ++w) asm volatile("" : "+r"(words[w]));
}

template <typename T>
__device__ __forceinline__ Pack<T> load_streaming(const T* address) {
  const uint4 raw = __ldcs(reinterpret_cast<const uint4*>(address));
  return *reinterpret_cast<const Pack<T>*>(&raw);
}

template <typename T>
__device__ __forceinline__ void store_streaming(T* address, const Pack<T>& pack) {
  __stcs(reinterpret_cast<uint4*>(address), *reinterpret_cast<const uint4*>(&pack));
}

template <typename T, int kLoads>
__global__ void __launch_bounds__(kThreads, 1)
softcap_ce_cached_kernel(const T* __restrict__ logits, int64_t row_stride, int64_t n_cols,
                         const int64_t* __restrict__ targets, const float* __restrict__ grad_scale,
                         int64_t ignore_index, CapParams p, float* __restrict__ loss,
                         T* __restrict__ grad, bool need_grad) {
  constexpr int kVec = Pack<T>::kSize;
  const int64_t row = blockIdx.x;
  const T* row_in = logits + row * row_stride;
  const int n_packs = static_cast<int>(n_cols / kVec);

  // Issue every load of the row before using any: kLoads 16-byte loads in flight per thread.
  Pack<T> cache[kLoads];
#pragma unroll
  for (int i = 0; i < kLoads; ++i) {
    const int pack = i * kThreads + threadIdx.x;
    if (pack < n_packs) cache[i] = load_streaming(row_in + static_cast<int64_t>(pack) * kVec);
  }
  const RowInfo info = row_info(targets, row, n_cols, ignore_index, grad_scale);

  MaxSum local{p.fixed_reference ? p.reference : -INFINITY, 0.f};
#pragma unroll
  for (int i = 0; i < kLoads; ++i) {
    if (i * kThreads + threadIdx.x < n_packs) {
      float s[kVec];
      float pack_max = -INFINITY;
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        s[j] = capped(to_float(cache[i].v[j]), p);
        pack_max = fmaxf(pack_max, s[j]);
      }
      if (!p.fixed_reference && pack_max > local.max) {
        local.sum *= __expf(local.max - pack_max);
        local.max = pack_max;
      }
      if (local.max != -INFINITY) {  // all -inf so far (kind none): every term is 0
#pragma unroll
        for (int j = 0; j < kVec; ++j) local.sum += __expf(s[j] - local.max);
      }
    }
  }
  const MaxSum total = block_reduce(local);
  const float lse = total.max + __logf(total.sum);
  write_loss(row_in, info, ignore_index, lse, p, loss, row);
  if (!need_grad) return;

  T* row_grad = grad + row * n_cols;
#pragma unroll
  for (int i = 0; i < kLoads; ++i) {
    const int pack = i * kThreads + threadIdx.x;
    if (pack < n_packs) {
      forget_derived_values(cache[i]);
      Pack<T> out;
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const float s = capped(to_float(cache[i].v[j]), p);
        const bool is_target = static_cast<int64_t>(pack) * kVec + j == info.target;
        out.v[j] = from_float<T>(gradient(s, lse, is_target, info.grad_factor, p));
      }
      store_streaming(row_grad + static_cast<int64_t>(pack) * kVec, out);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 1)
softcap_ce_streaming_kernel(const T* __restrict__ logits, int64_t row_stride, int64_t n_cols,
                            const int64_t* __restrict__ targets, const float* __restrict__ grad_scale,
                            int64_t ignore_index, CapParams p, float* __restrict__ loss,
                            T* __restrict__ grad, bool need_grad) {
  const int64_t row = blockIdx.x;
  const T* row_in = logits + row * row_stride;
  const RowInfo info = row_info(targets, row, n_cols, ignore_index, grad_scale);

  MaxSum local{p.fixed_reference ? p.reference : -INFINITY, 0.f};
  for (int64_t col = threadIdx.x; col < n_cols; col += kThreads) {
    const float s = capped(to_float(row_in[col]), p);
    if (!p.fixed_reference && s > local.max) {
      local.sum = local.sum * __expf(local.max - s) + 1.f;
      local.max = s;
    } else if (local.max != -INFINITY) {  // all -inf so far (kind none): the term is 0
      local.sum += __expf(s - local.max);
    }
  }
  const MaxSum total = block_reduce(local);
  const float lse = total.max + __logf(total.sum);
  write_loss(row_in, info, ignore_index, lse, p, loss, row);
  if (!need_grad) return;

  T* row_grad = grad + row * n_cols;
  for (int64_t col = threadIdx.x; col < n_cols; col += kThreads) {
    const float s = capped(to_float(row_in[col]), p);
    row_grad[col] = from_float<T>(gradient(s, lse, col == info.target, info.grad_factor, p));
  }
}

// ---- v2: the row staged in shared memory, two CTAs per SM ------------------------------
//
// The case the speedrun runs (16-bit logits, a capped kind whose bound is the softmax
// reference, 16-byte aligned rows that fit in shared memory) takes a persistent kernel of
// kStagedThreads threads, two CTAs per SM.  Each CTA stages its row in shared memory in
// kStagedChunks pieces with cp.async.bulk, each completing on its own mbarrier; as soon as
// the gradient pass has finished with a piece, the copy of the same piece of the CTA's
// next row is issued, so the next row streams in while this one computes, and the other
// CTA's row overlaps both: >= 2 rows in flight per SM.  DRAM still sees one read of the
// logits and one write of the gradient.
//
// The math, for both capped kinds, goes through a in [0, 1]:
//   sigmoid  a = 1 - sigmoid(z/scale) = 1/(1 + 2^(z*log2e/scale)),  s = cap - cap*a,
//            ds/dz = (cap/scale) * a(1-a)
//   tanh     a = 1/(1 + 2^(2z*log2e/cap)),  tanh(z/cap) = 1 - 2a,   s = cap - 2cap*a,
//            ds/dz = 4 * a(1-a)
// so s - cap = -R*cap*a (R = 1, 2) and the softmax term exp(s - cap) = 2^(a * m2).
//   Loss pass   y = a*m2 = rcp.approx((1 + ex2.approx(z*m1)) / m2), sum += ex2.approx(y): 3 MUFU
//               (the loss needs fp32 accuracy: ~2^-22 per op, see the test's error
//               model; tanh.approx's 2^-11 would cost ~1e-3 of loss).  a is then stored
//               over its own logit in shared memory as a 16-bit fixed-point number
//               q = round(a * 65535), which the gradient pass reads back.
//   Gradient    g = 2^(q*m2/65535 + c) * q(65535 - q) with c = (cap - lse)*log2e +
//               log2(K / 65535^2), K the row factor times ds/dz's constant: 1 MUFU.  The fixed-point a
//               costs <= R*cap/131072 relative in g (2.3e-4 at cap 30): a twentieth of
//               a bf16 ulp, and half an fp16 ulp (both inside the contract's 1e-2, 2e-3).
// So 4 MUFU per element, and every other step is a single full-rate instruction
// (bf16 <-> fp32 are shifts and cvt.rn.bf16x2, q <-> fp32 goes through 2^23's mantissa).
// K = 0 (ignored row) gives 2^-inf = 0, exact zeros; K = NaN (target out of range) NaN.

constexpr int kStagedThreads = 512;
constexpr int kStagedChunks = 4;
constexpr int kPackElems = 8;          // 16 bytes of 16-bit logits
constexpr float kQuantum = 65535.f;    // a in [0, 1] as a 16-bit fixed-point number
constexpr float kMantissaMagic = 8388608.f;  // 2^23: an integer < 2^16 lands in the low bits
constexpr float kLog2e = 1.4426950408889634f;

struct StagedParams {
  float m1;       // z * m1 is the exponent of 2 in a's denominator
  float inv_m2;   // 1 / m2, where a * m2 = (s - cap) * log2e: rcp(inv_m2 * (1 + w)) = a * m2
  float q_per_y;  // kQuantum / m2: (a * m2) * q_per_y = a * kQuantum
  float m2_q;     // m2 / kQuantum: q * m2_q = a * m2 from the fixed-point a
  float cap;
  float cap_r;    // R * cap: s = cap - cap_r * a
  float dsdz;     // ds/dz = dsdz * a(1-a)
};

__device__ __forceinline__ float ex2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float rcp_approx(float x) {
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Two 16-bit values of one 32-bit word as fp32, and back with round-to-nearest-even.
__device__ __forceinline__ float2 unpack2(uint32_t w, at::BFloat16) {
  return {__uint_as_float(w << 16), __uint_as_float(w & 0xffff0000u)};
}
__device__ __forceinline__ float2 unpack2(uint32_t w, at::Half) {
  float lo, hi;
  asm("{\n .reg .f16 l, h;\n mov.b32 {l, h}, %2;\n cvt.f32.f16 %0, l;\n cvt.f32.f16 %1, h;\n}"
      : "=f"(lo), "=f"(hi) : "r"(w));
  return {lo, hi};
}
__device__ __forceinline__ uint32_t pack2(float lo, float hi, at::BFloat16) {
  uint32_t w;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(w) : "f"(hi), "f"(lo));
  return w;
}
__device__ __forceinline__ uint32_t pack2(float lo, float hi, at::Half) {
  uint32_t w;
  asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(w) : "f"(hi), "f"(lo));
  return w;
}

__device__ __forceinline__ uint32_t smem_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void mbarrier_init(uint64_t* bar) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_address(bar)) : "memory");
}

__device__ __forceinline__ void mbarrier_wait(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{\n .reg .pred done;\n WAIT:\n"
      " mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      " @!done bra WAIT;\n}" ::"r"(smem_address(bar)), "r"(parity) : "memory");
}

// Thread 0 only: copy `bytes` (a multiple of 16) from global to shared memory; completes on bar.
__device__ __forceinline__ void bulk_load(void* dst, const void* src, uint32_t bytes, uint64_t* bar) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_address(bar)), "r"(bytes)
               : "memory");
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                   smem_address(dst)), "l"(src), "r"(bytes), "r"(smem_address(bar))
               : "memory");
}

// The packs [begin, end) of chunk c of a row of n_packs packs.
__device__ __forceinline__ void chunk_range(int n_packs, int c, int& begin, int& end) {
  const int per_chunk = (n_packs + kStagedChunks - 1) / kStagedChunks;
  begin = min(n_packs, c * per_chunk);
  end = min(n_packs, begin + per_chunk);
}

// Sum over the CTA; every thread gets the result.  Callers separate two uses by a barrier.
__device__ __forceinline__ float block_sum(float value, float* scratch) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) scratch[warp] = value;
  __syncthreads();
  value = lane < kStagedThreads / 32 ? scratch[lane] : 0.f;
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;
}

// One fp16 value (low 16 bits of b) to e5m2 bits with round-to-nearest-even: e5m2 is the
// top byte of fp16, so RNE is an integer add on the magnitude; overflow carries into inf
// (as torch's cast: no saturation), NaN stays NaN.  (The hardware's f16x2 -> e5m2x2
// conversion exists only with .satfinite, which would turn overflow into 57344.)
__device__ __forceinline__ uint32_t e5m2_of_f16(uint32_t b) {
  const uint32_t a = b & 0x7fffu;
  const uint32_t r = a > 0x7c00u ? 0x7fu : (a + 0x7fu + ((a >> 8) & 1u)) >> 8;
  return r | ((b >> 8) & 0x80u);
}

// Two bf16 gradients (one word, as pack2 writes them) to two e5m2 bytes in the low 16 bits:
// e5m2(bf16(g * scale)), the unfused path's grad.mul(grad_scale).to(e5m2).  A bf16 value of
// magnitude >= 2^-16 (e5m2's smallest subnormal) is exact in fp16, smaller ones round to 0
// in e5m2 either way, and fp16 overflow is inf: the fp16 step adds no rounding of its own.
// Exact for every value; the hot loop takes e5m2x2_fast and comes here only on overflow.
__device__ __forceinline__ uint32_t e5m2x2_of_bf16x2(uint32_t w, float scale) {
  const float2 g = unpack2(w, at::BFloat16{});
  const float2 v = unpack2(pack2(g.x * scale, g.y * scale, at::BFloat16{}), at::BFloat16{});
  const uint32_t h = pack2(v.x, v.y, at::Half{});
  return e5m2_of_f16(h & 0xffffu) | (e5m2_of_f16(h >> 16) << 8);
}

// e5m2 rounds magnitudes from here up to inf (57344 is the largest finite value).
constexpr float kE5M2Overflow = 61440.f;

// As e5m2x2_of_bf16x2 with the hardware's f16x2 -> e5m2x2 conversion (one instruction for
// two values, RNE), which saturates instead of overflowing: equal below kE5M2Overflow (NaN
// stays NaN); `largest` collects the magnitudes so the caller can redo a pack that overflows.
__device__ __forceinline__ uint32_t e5m2x2_fast(uint32_t w, float scale, float& largest) {
  const float2 g = unpack2(w, at::BFloat16{});
  const float2 v = unpack2(pack2(g.x * scale, g.y * scale, at::BFloat16{}), at::BFloat16{});
  largest = fmaxf(largest, fmaxf(fabsf(v.x), fabsf(v.y)));
  uint16_t q;
  asm("cvt.rn.satfinite.e5m2x2.f16x2 %0, %1;" : "=h"(q) : "r"(pack2(v.x, v.y, at::Half{})));
  return q;
}

// kE5M2 (the fused FP8 head's loss pass, bf16 only): instead of the gradient in T, write
// g8 = e5m2(bf16(bf16(g) * e5m2_scale)) row-major into g8 (row stride g8_ld bytes), 8 bytes
// per pack: y is read once for the loss and the e5m2 gradient together.
template <typename T, int kKind, bool kE5M2>
__global__ void __launch_bounds__(kStagedThreads, 2)
softcap_ce_staged_kernel(const T* __restrict__ logits, int64_t row_stride, int n_cols, int n_rows,
                         const int64_t* __restrict__ targets, const float* __restrict__ grad_scale,
                         int64_t ignore_index, StagedParams p, float* __restrict__ loss,
                         T* __restrict__ grad, bool need_grad, uint8_t* __restrict__ g8, int64_t g8_ld,
                         float e5m2_scale) {
  static_assert(kKind == kTanh || kKind == kSigmoid, "the staged kernel is for the capped kinds");
  static_assert(!kE5M2 || sizeof(T) == 2, "the e5m2 variant rounds through the 16-bit logits' dtype");
  extern __shared__ uint4 row_smem[];  // the row, n_cols / 8 packs
  __shared__ uint64_t bars[kStagedChunks];
  __shared__ float scratch[kStagedThreads / 32];
  const int tid = threadIdx.x;
  const int n_packs = n_cols / kPackElems;

  auto issue_row = [&](int row, int c) {
    int begin, end;
    chunk_range(n_packs, c, begin, end);
    if (begin < end) {
      const T* src = logits + static_cast<int64_t>(row) * row_stride + begin * kPackElems;
      bulk_load(row_smem + begin, src, static_cast<uint32_t>(end - begin) * 16u, &bars[c]);
    }
  };
  if (tid == 0) {
    for (int c = 0; c < kStagedChunks; ++c) mbarrier_init(&bars[c]);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    if (blockIdx.x < n_rows)
      for (int c = 0; c < kStagedChunks; ++c) issue_row(blockIdx.x, c);
  }
  __syncthreads();

  uint32_t parity = 0;
  for (int row = blockIdx.x; row < n_rows; row += gridDim.x, parity ^= 1) {
    const int next = row + gridDim.x;
    const int64_t target = targets[row];
    const bool kept = target != ignore_index;
    const bool in_range = target >= 0 && target < n_cols;
    // The target's logit for the loss, read before the loss pass overwrites the row.
    float z_target = 0.f;
    if (tid == 0 && kept && in_range) z_target = to_float(logits[static_cast<int64_t>(row) * row_stride + target]);

    // Loss pass: sum of exp(s - cap) over the row; a goes back over z as a 16-bit number.
    float sum = 0.f;
    for (int c = 0; c < kStagedChunks; ++c) {
      int begin, end;
      chunk_range(n_packs, c, begin, end);
      if (begin >= end) continue;
      mbarrier_wait(&bars[c], parity);
#pragma unroll 1
      for (int pack = begin + tid; pack < end; pack += kStagedThreads) {
        const uint4 raw = row_smem[pack];
        const uint32_t in[4] = {raw.x, raw.y, raw.z, raw.w};
        uint32_t out[4];
#pragma unroll
        for (int w = 0; w < 4; ++w) {
          const float2 z = unpack2(in[w], T{});
          // y = a * m2 = (s - cap) * log2e directly: m2 rides in the reciprocal's argument.
          const float y0 = rcp_approx(fmaf(ex2_approx(z.x * p.m1), p.inv_m2, p.inv_m2));
          const float y1 = rcp_approx(fmaf(ex2_approx(z.y * p.m1), p.inv_m2, p.inv_m2));
          sum += ex2_approx(y0) + ex2_approx(y1);
          // a * 65535 + 2^23 rounds a to 16 bits and leaves them in the low mantissa bits.
          const uint32_t q0 = __float_as_uint(fmaf(y0, p.q_per_y, kMantissaMagic));
          const uint32_t q1 = __float_as_uint(fmaf(y1, p.q_per_y, kMantissaMagic));
          out[w] = __byte_perm(q0, q1, 0x5410);
        }
        row_smem[pack] = make_uint4(out[0], out[1], out[2], out[3]);
      }
    }
    const float total = block_sum(sum, scratch);
    const float lse = p.cap + logf(total);  // NaN logits make total NaN: the row's loss and grad are NaN
    if (tid == 0) {
      float row_loss = 0.f;
      if (kept) {
        // The target's s with the accurate library functions (once per row).
        const float a = 1.f / (1.f + exp2f(z_target * p.m1));
        row_loss = in_range ? lse - (p.cap - p.cap_r * a) : NAN;
      }
      loss[row] = row_loss;
    }

    // Gradient pass: g = K * softmax * ds/dz = 2^(q * m2_q + c0) * q(65535 - q), with K and
    // the fixed point's 1/65535^2 folded into the exponent as log2(K / 65535^2).  (A
    // product below 2^-126 flushes to 0: gradient elements under ~1e-33, far below the
    // rounding of the terms the contract compares.)
    const float factor = !kept ? 0.f : (in_range ? *grad_scale : NAN);
    const float k = factor * p.dsdz;
    const float c0 = (p.cap - lse) * kLog2e + log2f(k) - 2.f * log2f(kQuantum);
    T* row_grad = kE5M2 ? nullptr : grad + static_cast<int64_t>(row) * n_cols;
    uint8_t* row_g8 = kE5M2 ? g8 + static_cast<int64_t>(row) * g8_ld : nullptr;
    const int target_pack = kept && in_range ? static_cast<int>(target) / kPackElems : -1;
    for (int c = 0; c < kStagedChunks; ++c) {
      int begin, end;
      chunk_range(n_packs, c, begin, end);
      if (need_grad && begin < end) {
#pragma unroll 1
        for (int pack = begin + tid; pack < end; pack += kStagedThreads) {
          const uint4 raw = row_smem[pack];
          const uint32_t in[4] = {raw.x, raw.y, raw.z, raw.w};
          uint32_t out[4];
#pragma unroll
          for (int w = 0; w < 4; ++w) {
            // The 16-bit q back into 2^23's mantissa: f = 2^23 + q exactly, so q = f - 2^23
            // and 65535 - q = (65535 + 2^23) - f are exact too.
            const float f0 = __uint_as_float(__byte_perm(in[w], 0x4b000000u, 0x7610));
            const float f1 = __uint_as_float(__byte_perm(in[w], 0x4b000000u, 0x7632));
            const float q0 = f0 - kMantissaMagic, q1 = f1 - kMantissaMagic;
            const float d0 = q0 * ((kQuantum + kMantissaMagic) - f0);
            const float d1 = q1 * ((kQuantum + kMantissaMagic) - f1);
            out[w] = pack2(ex2_approx(fmaf(q0, p.m2_q, c0)) * d0, ex2_approx(fmaf(q1, p.m2_q, c0)) * d1, T{});
          }
          if constexpr (kE5M2) {
            float largest = 0.f;
            uint32_t lo = e5m2x2_fast(out[0], e5m2_scale, largest) | (e5m2x2_fast(out[1], e5m2_scale, largest) << 16);
            uint32_t hi = e5m2x2_fast(out[2], e5m2_scale, largest) | (e5m2x2_fast(out[3], e5m2_scale, largest) << 16);
            if (largest >= kE5M2Overflow) {  // rare (grad_scale sized for the gradient): exact overflow to inf
              lo = e5m2x2_of_bf16x2(out[0], e5m2_scale) | (e5m2x2_of_bf16x2(out[1], e5m2_scale) << 16);
              hi = e5m2x2_of_bf16x2(out[2], e5m2_scale) | (e5m2x2_of_bf16x2(out[3], e5m2_scale) << 16);
            }
            __stcs(reinterpret_cast<uint2*>(row_g8) + pack, make_uint2(lo, hi));
          } else {
            __stcs(reinterpret_cast<uint4*>(row_grad) + pack, make_uint4(out[0], out[1], out[2], out[3]));
          }
        }
        // The target's element: its thread, after its own store of that pack, subtracts
        // K * ds/dz (the one-hot term); program order keeps the second store last.
        if (target_pack >= begin && target_pack < end && target_pack % kStagedThreads == tid) {
          const uint16_t bits = reinterpret_cast<const uint16_t*>(row_smem)[target];
          const float q = static_cast<float>(bits);
          const float d = q * (kQuantum - q);
          const float g = ex2_approx(fmaf(q, p.m2_q, c0)) * d - k * d * (1.f / (kQuantum * kQuantum));
          if constexpr (kE5M2) {
            row_g8[target] = static_cast<uint8_t>(e5m2x2_of_bf16x2(pack2(g, 0.f, T{}), e5m2_scale));
          } else {
            row_grad[target] = from_float<T>(g);
          }
        }
      }
      // Every thread is done with chunk c (its generic reads and writes ordered before the
      // async proxy's write): the next row's copy may overwrite it.
      asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
      __syncthreads();
      if (tid == 0 && next < n_rows) issue_row(next, c);
    }
  }
}

// grad[row, :] *= factor[row * factor_stride], skipped on the device when the factor is 1
// (the usual loss.backward() of a mean or sum), so that case costs one tiny launch and no
// pass over the gradient.
template <typename T>
__global__ void scale_rows_kernel(T* __restrict__ grad, int64_t n_cols, const float* __restrict__ factor,
                                  int64_t factor_stride) {
  const int64_t row = blockIdx.x;
  const float f = factor[row * factor_stride];
  if (f == 1.f) return;
  T* row_grad = grad + row * n_cols;
  for (int64_t col = threadIdx.x; col < n_cols; col += blockDim.x) {
    row_grad[col] = from_float<T>(to_float(row_grad[col]) * f);
  }
}

CapParams make_cap_params(double cap, int64_t kind, double scale) {
  CapParams p{};
  p.kind = static_cast<int>(kind);
  p.cap = static_cast<float>(cap);
  p.inv_cap = static_cast<float>(1.0 / cap);
  p.inv_scale = static_cast<float>(1.0 / scale);
  // exp(s - cap) >= exp(-2 cap) (tanh) or exp(-cap) (sigmoid) stays a normal fp32 (> 1e-38)
  // for these bounds, so the bound can replace the row max as the softmax reference.
  p.fixed_reference = (kind == kTanh && cap <= 40.0) || (kind == kSigmoid && cap <= 80.0);
  p.reference = p.fixed_reference ? static_cast<float>(cap) : -INFINITY;
  return p;
}

StagedParams make_staged_params(const CapParams& c, int64_t kind, double scale) {
  StagedParams p{};
  const double log2e = 1.4426950408889634;
  const double r = kind == kTanh ? 2.0 : 1.0;
  p.m1 = static_cast<float>(kind == kTanh ? 2.0 * log2e / c.cap : log2e / scale);
  p.inv_m2 = static_cast<float>(-1.0 / (r * c.cap * log2e));
  p.q_per_y = static_cast<float>(-kQuantum / (r * c.cap * log2e));
  p.m2_q = static_cast<float>(-r * c.cap * log2e / kQuantum);
  p.cap = c.cap;
  p.cap_r = static_cast<float>(r * c.cap);
  p.dsdz = static_cast<float>(kind == kTanh ? 4.0 : c.cap / scale);
  return p;
}

// Launches the staged kernel if the row fits in shared memory; false if it does not.
// kE5M2: g8 (e5m2 bits, row stride g8.stride(0)) receives the gradient instead of grad.
template <typename T, int kKind, bool kE5M2 = false>
bool launch_staged(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& grad_scale,
                   int64_t ignore_index, const StagedParams& p, at::Tensor& loss, at::Tensor& grad,
                   bool need_grad, cudaStream_t stream, at::Tensor* g8 = nullptr, float e5m2_scale = 1.f) {
  const auto kernel = softcap_ce_staged_kernel<T, kKind, kE5M2>;
  const int64_t n_rows = logits.size(0), n_cols = logits.size(1);
  const int64_t row_bytes = n_cols * static_cast<int64_t>(sizeof(T));
  int device = 0, max_smem = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  cudaFuncAttributes attributes{};
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
  if (row_bytes + static_cast<int64_t>(attributes.sharedSizeBytes) > max_smem) return false;
  const int smem = static_cast<int>(row_bytes);
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kStagedThreads, smem));
  if (per_sm == 0) return false;
  const int64_t grid = std::min<int64_t>(n_rows, static_cast<int64_t>(per_sm) * sms);
  kernel<<<static_cast<unsigned>(grid), kStagedThreads, smem, stream>>>(
      logits.data_ptr<T>(), logits.stride(0), static_cast<int>(n_cols), static_cast<int>(n_rows),
      targets.data_ptr<int64_t>(), grad_scale.data_ptr<float>(), ignore_index, p, loss.data_ptr<float>(),
      need_grad && !kE5M2 ? grad.data_ptr<T>() : nullptr, need_grad,
      kE5M2 ? reinterpret_cast<uint8_t*>(g8->data_ptr()) : nullptr, kE5M2 ? g8->stride(0) : 0, e5m2_scale);
  return true;
}

template <typename T, int kLoads>
void launch_cached(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& grad_scale,
                   int64_t ignore_index, const CapParams& p, at::Tensor& loss, at::Tensor& grad,
                   bool need_grad, cudaStream_t stream) {
  softcap_ce_cached_kernel<T, kLoads><<<logits.size(0), kThreads, 0, stream>>>(
      logits.data_ptr<T>(), logits.stride(0), logits.size(1), targets.data_ptr<int64_t>(),
      grad_scale.data_ptr<float>(), ignore_index, p, loss.data_ptr<float>(),
      need_grad ? grad.data_ptr<T>() : nullptr, need_grad);
}

template <typename T>
void launch(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& grad_scale,
            int64_t ignore_index, const CapParams& p, double scale, at::Tensor& loss, at::Tensor& grad,
            bool need_grad, cudaStream_t stream) {
  constexpr int kVec = Pack<T>::kSize;
  const int64_t n_cols = logits.size(1);
  const bool aligned = reinterpret_cast<uintptr_t>(logits.data_ptr()) % 16 == 0 &&
                       logits.stride(0) % kVec == 0 && n_cols % kVec == 0;
  if constexpr (sizeof(T) == 2) {
    // v2 (staged rows) for the capped kinds whose bound is the softmax reference.
    const bool fits_int = n_cols < (int64_t{1} << 30) && logits.size(0) < (int64_t{1} << 31);
    if (aligned && fits_int && p.fixed_reference && (p.kind == kTanh || p.kind == kSigmoid)) {
      const StagedParams staged = make_staged_params(p, p.kind, scale);
      const bool launched =
          p.kind == kTanh
              ? launch_staged<T, kTanh>(logits, targets, grad_scale, ignore_index, staged, loss, grad, need_grad, stream)
              : launch_staged<T, kSigmoid>(logits, targets, grad_scale, ignore_index, staged, loss, grad, need_grad,
                                           stream);
      if (launched) return;
    }
  }
  const int64_t loads = (n_cols / kVec + kThreads - 1) / kThreads;
  if (aligned && loads <= kMaxCachedLoads) {
    // The exact pack count per thread: registers are the budget, so no rounding up.
    switch (loads) {
      case 0:
      case 1: return launch_cached<T, 1>(logits, targets, grad_scale, ignore_index, p, loss, grad, need_grad, stream);
      case 2: return launch_cached<T, 2>(logits, targets, grad_scale, ignore_index, p, loss, grad, need_grad, stream);
      case 3: return launch_cached<T, 3>(logits, targets, grad_scale, ignore_index, p, loss, grad, need_grad, stream);
      case 4: return launch_cached<T, 4>(logits, targets, grad_scale, ignore_index, p, loss, grad, need_grad, stream);
      case 5: return launch_cached<T, 5>(logits, targets, grad_scale, ignore_index, p, loss, grad, need_grad, stream);
      case 6: return launch_cached<T, 6>(logits, targets, grad_scale, ignore_index, p, loss, grad, need_grad, stream);
      case 7: return launch_cached<T, 7>(logits, targets, grad_scale, ignore_index, p, loss, grad, need_grad, stream);
      default: return launch_cached<T, 8>(logits, targets, grad_scale, ignore_index, p, loss, grad, need_grad, stream);
    }
  }
  softcap_ce_streaming_kernel<T><<<logits.size(0), kThreads, 0, stream>>>(
      logits.data_ptr<T>(), logits.stride(0), n_cols, targets.data_ptr<int64_t>(),
      grad_scale.data_ptr<float>(), ignore_index, p, loss.data_ptr<float>(),
      need_grad ? grad.data_ptr<T>() : nullptr, need_grad);
}

// Calls body(T{}) for the logits dtypes of the contract; fp64 is not compiled.
template <typename Body>
void dispatch_dtype(at::ScalarType type, const char* op, Body&& body) {
  switch (type) {
    case at::kFloat: return body(float{});
    case at::kHalf: return body(at::Half{});
    case at::kBFloat16: return body(at::BFloat16{});
    default: TORCH_CHECK(false, op, ": logits must be float32, float16 or bfloat16, got ", type);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> softcap_ce_forward(const at::Tensor& logits, const at::Tensor& targets,
                                                      const at::Tensor& grad_scale, double cap, int64_t kind,
                                                      double scale, int64_t ignore_index, bool need_grad) {
  // The Python wrapper validates arguments with clear messages; these checks guard the
  // raw op against direct misuse, since a wrong shape here would mean a wild access.
  TORCH_CHECK(logits.is_cuda() && logits.dim() == 2 && logits.stride(1) == 1,
              "softcap_ce_forward: logits must be a 2-D CUDA tensor with unit column stride");
  TORCH_CHECK(targets.is_cuda() && targets.dim() == 1 && targets.size(0) == logits.size(0),
              "softcap_ce_forward: targets must be a CUDA tensor of shape [N]");
  TORCH_CHECK(grad_scale.is_cuda() && grad_scale.scalar_type() == at::kFloat && grad_scale.numel() == 1,
              "softcap_ce_forward: grad_scale must be a 1-element fp32 CUDA tensor");
  TORCH_CHECK(kind == kNone || kind == kTanh || kind == kSigmoid, "softcap_ce_forward: bad kind ", kind);
  TORCH_CHECK(logits.size(1) > 0, "softcap_ce_forward: V must be positive");
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor targets64 = targets.to(at::kLong).contiguous();
  const at::Tensor scale_value = grad_scale.contiguous();
  at::Tensor loss = at::empty({logits.size(0)}, logits.options().dtype(at::kFloat));
  at::Tensor grad = need_grad ? at::empty(logits.sizes(), logits.options()) : at::empty({0}, logits.options());
  if (logits.size(0) == 0) return {loss, grad};
  const CapParams p = make_cap_params(cap, kind, scale);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_dtype(logits.scalar_type(), "softcap_ce_forward", [&](auto type_tag) {
    using T = decltype(type_tag);
    launch<T>(logits, targets64, scale_value, ignore_index, p, scale, loss, grad, need_grad, stream);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {loss, grad};
}

// The fused FP8 head's loss pass: (per-row loss [N], g8 [N, pad16(V)] e5m2) from bf16 logits,
// g8 = e5m2(bf16(bf16(dloss/dz) * grad_scale)) with the row factor *factor (1/count for a
// mean, 1 for a sum; the upstream gradient is applied after the backward GEMMs).  Only the
// staged kernel's case: a capped kind with the fixed reference, 16-byte aligned rows of a
// multiple of 8 columns that fit in shared memory (the Python wrapper checks the same).
std::tuple<at::Tensor, at::Tensor> softcap_ce_forward_e5m2(const at::Tensor& logits, const at::Tensor& targets,
                                                           const at::Tensor& factor, double cap, int64_t kind,
                                                           double scale, int64_t ignore_index, double grad_scale) {
  TORCH_CHECK(logits.is_cuda() && logits.dim() == 2 && logits.stride(1) == 1 && logits.scalar_type() == at::kBFloat16,
              "softcap_ce_forward_e5m2: logits must be a 2-D bf16 CUDA tensor with unit column stride");
  TORCH_CHECK(targets.is_cuda() && targets.dim() == 1 && targets.size(0) == logits.size(0),
              "softcap_ce_forward_e5m2: targets must be a CUDA tensor of shape [N]");
  TORCH_CHECK(factor.is_cuda() && factor.scalar_type() == at::kFloat && factor.numel() == 1,
              "softcap_ce_forward_e5m2: factor must be a 1-element fp32 CUDA tensor");
  const CapParams p = make_cap_params(cap, kind, scale);
  TORCH_CHECK((kind == kTanh || kind == kSigmoid) && p.fixed_reference,
              "softcap_ce_forward_e5m2: needs kind tanh (cap <= 40) or sigmoid (cap <= 80)");
  const int64_t rows = logits.size(0), cols = logits.size(1);
  TORCH_CHECK(cols > 0 && cols % kPackElems == 0 && logits.stride(0) % kPackElems == 0 &&
                  reinterpret_cast<uintptr_t>(logits.data_ptr()) % 16 == 0 && cols < (int64_t{1} << 30) &&
                  rows < (int64_t{1} << 31),
              "softcap_ce_forward_e5m2: rows must be 16-byte aligned with V a positive multiple of 8");
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor targets64 = targets.to(at::kLong).contiguous();
  at::Tensor loss = at::empty({rows}, logits.options().dtype(at::kFloat));
  at::Tensor g8 = at::empty({rows, (cols + 15) / 16 * 16}, logits.options().dtype(at::kFloat8_e5m2));
  if (rows == 0) return {loss, g8};
  const StagedParams staged = make_staged_params(p, kind, scale);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  at::Tensor no_grad = at::empty({0}, logits.options());
  const at::Tensor f = factor.contiguous();
  const float e5m2_scale = static_cast<float>(grad_scale);
  const bool launched =
      kind == kTanh ? launch_staged<at::BFloat16, kTanh, true>(logits, targets64, f, ignore_index, staged, loss,
                                                               no_grad, true, stream, &g8, e5m2_scale)
                    : launch_staged<at::BFloat16, kSigmoid, true>(logits, targets64, f, ignore_index, staged, loss,
                                                                  no_grad, true, stream, &g8, e5m2_scale);
  TORCH_CHECK(launched, "softcap_ce_forward_e5m2: a row of ", cols, " bf16 logits does not fit in shared memory");
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {loss, g8};
}

void softcap_ce_scale_rows_(at::Tensor& grad, const at::Tensor& factor) {
  TORCH_CHECK(grad.is_cuda() && grad.dim() == 2 && grad.is_contiguous(),
              "softcap_ce_scale_rows_: grad must be a contiguous 2-D CUDA tensor");
  TORCH_CHECK(factor.is_cuda() && factor.scalar_type() == at::kFloat &&
                  (factor.numel() == 1 || factor.numel() == grad.size(0)),
              "softcap_ce_scale_rows_: factor must be fp32 with 1 or N elements");
  if (grad.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(grad.device());
  const at::Tensor f = factor.contiguous();
  const int64_t factor_stride = f.numel() == 1 ? 0 : 1;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_dtype(grad.scalar_type(), "softcap_ce_scale_rows_", [&](auto type_tag) {
    using T = decltype(type_tag);
    scale_rows_kernel<T><<<grad.size(0), 256, 0, stream>>>(grad.data_ptr<T>(), grad.size(1), f.data_ptr<float>(),
                                                           factor_stride);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace speedrun
