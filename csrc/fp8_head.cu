// The FP8 LM head on Hopper: per-tensor-scaled fp8 casts (with the transposed copies the
// backward GEMMs need) and one hand-written FP8 GEMM (TMA + wgmma, warp-specialized,
// persistent), plus the e5m2 gradient of the softcapped cross-entropy for the fused head.
// No CUTLASS: every PTX instruction used is written out below.  Contract: DESIGN.md §2.2,
// the spec is kernels/reference.py (fp8_linear, linear_softcap_cross_entropy).
//
// ---- The GEMM --------------------------------------------------------------------------
// C[M, N] = alpha * A[M, K] . B[N, K]^T, A and B fp8 and BOTH K-major (rows of K contiguous
// bytes): wgmma reads 8-bit operands only K-major from shared memory, so the three head
// products are arranged as
//     y  [Ntok, V]  = x8   [Ntok, K] . w8   [V, K]^T      A e4m3, B e4m3, bf16 out
//     dx [Ntok, K]  = g8   [Ntok, V] . w8T  [K, V]^T      A e5m2, B e4m3, bf16 out
//     dW [V, K]     = g8T  [V, Ntok] . x8T  [K, Ntok]^T   A e5m2, B e4m3, fp32 out
// where w8T, x8T and g8T are transposed copies written by the cast kernels (and by the
// e5m2 cross-entropy gradient kernel) in the same pass that writes w8, x8 and g8.
//
// Two accumulation modes (template kPromote, runtime `promote` of the op):
//   fast      one wgmma chain over all of K, like _scaled_mm(use_fast_accum=True).  Hopper
//             keeps an fp8 wgmma's running sum with ~14 significant bits (truncated; the
//             DeepSeek-V3 report), so the error grows with K: fine for y (K = 768), a few %
//             for dx and dW (K ~ 50k).  Tile 128 x 256 x 128, 4 stages of 48 KiB (3 with
//             bf16 out, whose epilogue stages the tile for a TMA store: see Epilogue).
//   promoted  every k-block (128 of K) is a fresh chain (scale_d = 0 on its first wgmma),
//             waited for and added into fp32 registers (FADD): the error stays that of 4
//             truncated steps whatever K (DeepGEMM's scheme; model and emulation in
//             tests/test_fp8_head.py).  The fp32 copy doubles the registers per output, so
//             the tile is 128 x 128 x 128 (64 + 64 floats per consumer thread, wgmma
//             m64n128k32), 6 stages of 32 KiB.
// Fast mode, tile 128 x 256 x 128 (BM x BN x BK):
//   stage = A tile 128 rows x 128 B (16 KiB) + B tile 256 rows x 128 B (32 KiB) = 48 KiB,
//   fp32 out: 4 stages = 192 KiB; bf16 out: 3 stages + the 64 KiB store tile = 208 KiB;
//   + the mbarriers, under the 227 KiB an sm_90 CTA may use; 1 CTA/SM.  Promoted:
//   stage = 16 + 16 KiB, 6 stages = 192 KiB.
// 384 threads = 3 warpgroups:
//   WG0   producer: one elected thread issues the TMA loads of every stage; the warpgroup
//         gives its registers back (setmaxnreg.dec 40).
//   WG1-2 consumers ("cooperative"): both work on the same 128 x 256 tile, WG1 on rows
//         0-63 and WG2 on rows 64-127, each with wgmma m64n256k32 (4 per k-block of 128):
//         128 fp32 accumulators per thread (promoted: m64n128k32, 64 + 64 for the fp32
//         sum); setmaxnreg.inc 232 (40*128 + 232*256 = 64512 of the SM's 65536
//         registers; ptxas still allots the code 168, which bounds what fits).
// Persistent: grid = min(#tiles, #SMs) (clusters: see below); CTA b takes tiles b,
// b + grid, ...  Tiles are
// ordered in groups of group_m row-tiles (all column tiles of a group before the next
// group, row fastest inside it), so the CTAs of one wave share A rows and B rows in L2:
// whole rows of tiles per wave when the column tiles fit a wave (dx, dW: an A row panel
// is 128 x ~50k bytes, read by all its column tiles at once), else kGroupMWide row tiles
// (y: w8 is re-read from DRAM once per group; arithmetic in bench/NOTES.md).  The
// producer runs ahead across tile boundaries, so the next tile's first stages load
// during the consumers' epilogue.
// Pipeline: full[s] (1 arrival + the transaction bytes of the TMA loads) and empty[s]
// (8 arrivals: lane 0 of each consumer warp after its wgmmas on stage s completed; 16,
// both CTAs' warps, in a promoted cluster: see Clusters).
// Fast: consumers keep one k-block of wgmmas in flight (wait_group 1) before releasing
// the previous stage.  Promoted: each k-block is waited for (wait_group 0), its stage
// released, then added into fp32; the other consumer warpgroup's wgmmas can run on the
// tensor cores while one adds.
//
// Clusters (promoted instances, kClusterPromoted = 2; 1 restores the plain launch).  A
// promoted 128 x 128 tile needs 32 KiB of operands per k-block per 748 cycles of wgmma:
// ~10 TB/s from L2 over 132 SMs, likely more than H100's L2 gives (bench/NOTES.md).  So
// two CTAs on vertically adjacent row tiles (2m, 2m + 1) of one column tile run as a
// cluster (cudaLaunchKernelEx, cluster dimension 2): they need the same B k-block, and
// CTA r loads only B rows 64r..64r+63 of it (8 KiB) with a multicast TMA load
// (.multicast::cluster, CTA mask 0b11) that writes the slice into both CTAs' stage
// buffers at the same offset and counts its bytes on both CTAs' full[s].  Per CTA and
// k-block: A 16 KiB + B 8 KiB = 24 KiB from L2 instead of 32 KiB (7.6 TB/s).
//   full[s]:  1 arrival (own producer's arrive.expect_tx of A + the whole B tile = 32 KiB)
//             plus the bytes; the peer's slice may land before the expect_tx (the tx
//             count goes negative for a while; the pending arrival keeps the phase open).
//   empty[s]: 16 arrivals, the 8 consumer warps of BOTH CTAs (mapa + remote
//             mbarrier.arrive.shared::cluster), because both producers write into both
//             CTAs' stage s.  So a producer refills stage s only when both CTAs' consumers
//             are done with it, and the peer's multicast into stage s for round j + 1
//             cannot start before this CTA's consumers saw round j's full[s] complete.
//   Start: barrier.cluster after mbarrier.init, before any multicast or remote arrive.
//   Exit:  barrier.cluster again, as the peer's consumers arrive on this CTA's empty
//          barriers up to their last k-block.  (Every multicast into this CTA is for a
//          k-block its own consumers wait for, so no load is in flight by then.)
// Schedule: the persistent loop runs over cluster tiles (row-tile pairs x column tiles,
// grouped as below); both CTAs of a cluster take the same cluster tiles, so they go
// through the same k-blocks in the same order and leave the loop together.  Ragged edges:
// with an odd number of row tiles the last pair's second row tile does not exist; its CTA
// (a "phantom" tile) still serves its half of the multicast and takes part in both
// barriers (expects only the 16 KiB of B, releases each stage to both CTAs) but loads no
// A, runs no wgmma and stores nothing.  (The alternative, taking row tiles only in pairs
// and leaving the odd one to a second pass, would need a second schedule; the phantom
// costs one idle CTA for one tile, 1 / 393 of dW's rows.)  A B slice whose first row is
// past N (ragged N, second half of the last column tile) is loaded from row N - 1 instead,
// so no box lies wholly outside the tensor; its rows only feed columns >= N, never stored.
// The grid is min(cluster tiles, cudaOccupancyMaxActiveClusters) clusters: the two CTAs
// of a cluster must sit in one GPC, so fewer than #SMs / 2 clusters may fit at once.
//
// Shared-memory layout and the wgmma descriptors.  Each TMA box is {128 bytes of K,
// rows} with CU_TENSOR_MAP_SWIZZLE_128B: row r of the box lands at byte r*128 of the
// stage buffer, and inside the row the 16-byte chunk c is stored at chunk c ^ (r % 8).
// That is exactly wgmma's K-major "128B swizzle" canonical layout: core matrices of
// 8 rows x 16 bytes, 8 rows x 128 B = 1024 B per swizzle atom, atoms stacked along M/N.
// Descriptor fields (PTX ISA "matrix descriptor"): start address >> 4 (bits 0-13);
// leading-dimension byte offset (bits 16-29), unused for swizzled K-major layouts whose
// K extent per instruction (32 B) lies inside one 128 B row: set to 1 by convention;
// stride-dimension byte offset = 1024 B (>> 4 = 64, bits 32-45), the distance between
// consecutive 8-row groups; base offset 0 (bits 49-51) because every stage buffer is
// 1024-byte aligned; layout type 1 = 128B swizzle (bits 62-63).  The k-th k32 step of a
// k-block starts 32*k bytes into the row: the descriptor's start address advances by
// 32*k (the hardware applies the XOR swizzle to the computed address bits, which is why
// the buffers must be 1024-byte aligned).  Consumer WG c reads A rows 64c..64c+63:
// start + 64*128*c bytes, a multiple of 1024.
//
// Ragged shapes.  TMA boxes that cross the tensor's end are zero-filled (OOB fill NONE
// = zeros) and still count their full bytes on the mbarrier, so a ragged K adds zeros
// to the dot products and ragged M/N rows are zeros that the predicated stores drop.
// TMA requirements: the global address 16-byte aligned and every row stride a
// multiple of 16 bytes.  All fp8 operands are written by our own kernels into buffers
// whose row stride is rounded up to 16 bytes (the tensor map's dims stay the logical
// sizes), so every M, N, K >= 1 works; the raw op checks the alignment again.
//
// Accumulator layout (wgmma m64nN, fp32, N/2 per thread): warp w owns rows 16w..16w+15;
// lane l holds, for every 8-column group j, d[4j+0..1] = row 16w + l/4, columns
// 8j + 2(l%4) + {0,1}, and d[4j+2..3] = the same columns of row 16w + l/4 + 8.
// Epilogue, fast bf16 (y): each consumer warpgroup writes alpha * acc as bf16 into its own
// 32 KiB staging area (4 boxes of 64 rows x 128 B, 128B-swizzled: conflict-free), fences
// it for the async proxy and one thread issues 4 TMA stores (cp.async.bulk.tensor, bulk
// group) without waiting: the warpgroup goes on to the next tile's wgmmas while the TMA
// unit writes y, and waits for the store to have read the area only before refilling it
// a tile later.  That costs 64 KiB of shared memory, so this instance has 3 stages.  TMA
// clips the boxes at the tensor's end.  Other instances, and y when c's base or row
// stride is not 16-byte aligned: alpha * acc stored as pairs (bf16x2 or float2)
// straight from registers, predicated on the bounds (dx and dW outputs are 1.5 % and
// 3 % of y's bytes).
//
// ---- Casts -------------------------------------------------------------------------
// cast_fp8_kernel: 64 x 64 tiles; q = fp8(round_to_src_dtype(v * scale)) exactly like
// the reference's v.mul(scale).to(fp8) (the product is rounded to the input's dtype
// first); e4m3 saturates to +-448 (the reference's cast on the CPU), e5m2 keeps
// overflow as +-inf.  Writes q row-major and, through shared memory, transposed.
//
// ---- The e5m2 cross-entropy gradient -----------------------------------------------
// ce_grad_e5m2_kernel: from the bf16 logits y, the per-row loss of the forward and the
// per-row factor (upstream gradient * 1/count, 0 for ignored rows), recomputes
// g = (softmax(s) - onehot) * ds/dz * factor per element with lse = loss + s[target],
// rounds it to bf16 (the logits' dtype, as the unfused path would) and writes
// e5m2(g * grad_scale) row-major (g8) and transposed (g8T) for the two backward GEMMs:
// 2 bytes per element written instead of the 2 of a bf16 gradient plus the 2 + 2 + 2 of
// a separate cast-and-transpose pass.

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cuda.h>  // CUtensorMap and its enums only: the encoder is fetched at run time
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <mutex>
#include <tuple>
#include <type_traits>

namespace speedrun {
namespace {

// ---- GEMM configuration ---------------------------------------------------------------
constexpr int kBM = 128;
constexpr int kBK = 128;  // bytes of K per stage row: exactly one 128-byte swizzle span; the promotion interval
constexpr int kThreads = 384;
constexpr int kConsumerWarps = 8;
constexpr int kStageBytesA = kBM * kBK;
// Fast accumulation: 128 x 256 tiles, 4 stages of 48 KiB (3 and a 64 KiB store tile with bf16 out).
constexpr int kBNFast = 256;
constexpr int kStagesFast = 4;
// Promoted: 128 x 128 tiles (the fp32 copy doubles the accumulator registers: 64 + 64 per
// thread instead of 128 + 128, which would not fit 255), 6 stages of 32 KiB.
constexpr int kBNPromoted = 128;
constexpr int kStagesPromoted = 6;
// Promoted instances run as clusters of this many CTAs on vertically adjacent row tiles
// that share the B k-block, each loading 1/kClusterPromoted of it and multicasting it to
// all (header, "Clusters").  1 = no cluster (plain launch, every CTA loads its whole B
// tile), kept so a GPU session can compare; 2 is the design.
constexpr int kClusterPromoted = 2;
static_assert(kClusterPromoted == 1 || kClusterPromoted == 2, "a cluster of 1 or 2 CTAs");
// Fast with bf16 output (y): the tile is staged in shared memory for a TMA store that runs
// while the next tile's mainloop does (64 KiB), so 3 stages.
constexpr int kStagesFastTmaStore = 3;
constexpr int kStoreTileBytes = kBM * kBNFast * 2;
// Stage buffers (1024-aligned), [the store tile,] then 2 * stages mbarriers; +1024 for
// aligning the base.
constexpr int kSmemBytesFast = kStagesFast * (kStageBytesA + kBNFast * kBK) + 2 * kStagesFast * 8 + 1024;
constexpr int kStageBytesFast = kStageBytesA + kBNFast * kBK;
constexpr int kSmemBytesFastTmaStore = kStagesFastTmaStore * kStageBytesFast + kStoreTileBytes + 2 * kStagesFastTmaStore * 8 + 1024;
constexpr int kSmemBytesPromoted = kStagesPromoted * (kStageBytesA + kBNPromoted * kBK) + 2 * kStagesPromoted * 8 + 1024;
// The TMA store box: 64 bf16 columns (128 bytes, the 128B swizzle span) x 64 rows, one
// consumer warpgroup's rows; a tile is 4 boxes per warpgroup.
constexpr int kStoreBoxCols = 64;
constexpr int kStoreBoxBytes = kStoreBoxCols * 2 * 64;
// Tile order: a y-like GEMM (more column tiles than CTAs) walks groups of kGroupMWide row
// tiles; one whose column tiles fit a wave takes whole rows per wave instead (bench/NOTES.md).
constexpr int kGroupMWide = 32;

template <bool kPromote, bool kTmaStore>
struct GemmConfig {
  static_assert(!(kPromote && kTmaStore), "the TMA-store epilogue is the fast bf16 kernel's");
  static constexpr int kBN = kPromote ? kBNPromoted : kBNFast;
  static constexpr int kStages = kPromote ? kStagesPromoted : kTmaStore ? kStagesFastTmaStore : kStagesFast;
  static constexpr int kSmemBytes = kPromote ? kSmemBytesPromoted : kTmaStore ? kSmemBytesFastTmaStore : kSmemBytesFast;
  static constexpr int kStoreBytes = kTmaStore ? kStoreTileBytes : 0;
  static constexpr int kAccum = kBN / 2;  // fp32 accumulators per consumer thread for m64 x kBN
  static constexpr int kStageBytesB = kBN * kBK;
  static constexpr int kStageBytes = kStageBytesA + kStageBytesB;
  // CTAs per cluster (sharing the B k-block by TMA multicast) and the B rows each loads.
  static constexpr int kCluster = kPromote ? kClusterPromoted : 1;
  static constexpr int kSliceRowsB = kBN / kCluster;
  static_assert((kSliceRowsB * kBK) % 1024 == 0, "each CTA's B slice must start on a swizzle atom");
  static_assert(kStageBytesA % 1024 == 0 && kStageBytesB % 1024 == 0, "stage buffers must stay 1024-aligned");
  static_assert(kSmemBytes <= 227 * 1024, "shared memory budget of an sm_90 CTA");
};

// ---- PTX wrappers ------------------------------------------------------------------------
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)), "r"(count) : "memory");
}

__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)), "r"(bytes)
               : "memory");
}

__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_addr(bar)) : "memory");
}

// Blocks until the phase of parity `parity` of the barrier has completed.
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "WAIT_LOOP:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT_LOOP;\n"
      "}\n" ::"r"(smem_addr(bar)),
      "r"(parity)
      : "memory");
}

// 2-D TMA load of the box at (inner, outer) element coordinates into shared memory;
// completion is signalled on `bar` as transaction bytes.
__device__ __forceinline__ void tma_load_2d(void* dst, const CUtensorMap* map, uint64_t* bar, int inner,
                                            int outer) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], [%2];" ::"r"(
          smem_addr(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(smem_addr(bar)), "r"(inner), "r"(outer)
      : "memory");
}

// The same load sent to every CTA of the cluster whose bit is set in `cta_mask`: the box
// lands at dst's offset in each one's shared memory, and each one's mbarrier at bar's
// offset gets the transaction bytes.
__device__ __forceinline__ void tma_load_2d_multicast(void* dst, const CUtensorMap* map, uint64_t* bar,
                                                      uint16_t cta_mask, int inner, int outer) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster"
      " [%0], [%1, {%4, %5}], [%2], %3;" ::"r"(smem_addr(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(smem_addr(bar)), "h"(cta_mask), "r"(inner), "r"(outer)
      : "memory");
}

// Arrives on the mbarrier at bar's offset in the shared memory of cluster CTA `cta`
// (possibly this one).  Default semantics (release at CTA scope): .release.cluster
// compiles to a MEMBAR.ALL.GPU per arrival, and nothing needs it: the arrival only says
// that this warp's wgmmas, already completed by wgmma.wait_group, are done reading the
// stage; the refill that waits on it is a TMA write issued after the producer's wait.
__device__ __forceinline__ void mbar_arrive_cluster(uint64_t* bar, uint32_t cta) {
  asm volatile(
      "{\n.reg .b32 remote;\n"
      "mapa.shared::cluster.u32 remote, %0, %1;\n"
      "mbarrier.arrive.shared::cluster.b64 _, [remote];\n}\n" ::"r"(smem_addr(bar)),
      "r"(cta)
      : "memory");
}

__device__ __forceinline__ uint32_t cluster_rank() {
  uint32_t rank;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(rank));
  return rank;
}

// Every (non-exited) thread of the cluster: barrier.cluster, release/acquire.
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release;\nbarrier.cluster.wait.acquire;" ::: "memory");
}

// 2-D TMA store of the box at (inner, outer) element coordinates from shared memory, in
// this thread's bulk group; elements outside the tensor are not written.
__device__ __forceinline__ void tma_store_2d(const CUtensorMap* map, const void* src, int inner, int outer) {
  asm volatile("cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%2, %3}], [%1];" ::"l"(
                   reinterpret_cast<uint64_t>(map)),
               "r"(smem_addr(src)), "r"(inner), "r"(outer)
               : "memory");
}
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;" ::: "memory"); }
// Until this thread's committed bulk stores have read their shared memory (it may be reused).
__device__ __forceinline__ void bulk_wait_read() { asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory"); }
// Until they have completed (before the CTA exits).
__device__ __forceinline__ void bulk_wait_all() { asm volatile("cp.async.bulk.wait_group 0;" ::: "memory"); }
// Generic-proxy writes to shared memory made visible to the async proxy (the TMA unit).
__device__ __forceinline__ void fence_async_shared() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }
// Barrier `id` (1..15; 0 is __syncthreads) over `threads` threads.
__device__ __forceinline__ void named_barrier(uint32_t id, uint32_t threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}

__device__ __forceinline__ void tma_prefetch_descriptor(const CUtensorMap* map) {
  asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}

// K-major, 128B-swizzled operand descriptor (see the header comment for every field).
__device__ __forceinline__ uint64_t smem_descriptor(const void* p) {
  const uint64_t address = smem_addr(p);
  uint64_t desc = (address & 0x3FFFF) >> 4;  // start address, bits 0-13
  desc |= uint64_t(1) << 16;                  // leading byte offset >> 4 (unused here)
  desc |= uint64_t(1024 >> 4) << 32;          // stride byte offset >> 4: 8 rows x 128 B
  desc |= uint64_t(1) << 62;                  // layout: 128-byte swizzle
  return desc;
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(kPending) : "memory");
}

// Keeps the compiler from moving accumulator reads/writes across the asynchronous wgmma.
template <int kAccum>
__device__ __forceinline__ void fence_accumulators(float (&d)[kAccum]) {
#pragma unroll
  for (int i = 0; i < kAccum; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

template <uint32_t kRegisters>
__device__ __forceinline__ void registers_decrease() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(kRegisters));
}
template <uint32_t kRegisters>
__device__ __forceinline__ void registers_increase() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(kRegisters));
}

// D[64 x N] (+)= A[64x32] * B[Nx32]^T, N = 2 * (accumulators per thread); A e4m3 or e5m2,
// B e4m3; both K-major in smem (descriptors).  scale_d == 0 overwrites D (the first k-step
// of a wgmma chain), 1 accumulates.  The operand lists are spelled by macros: 128 or 64
// "+f" registers.
#define SPEEDRUN_ACC8(i) "+f"(d[(i)]), "+f"(d[(i) + 1]), "+f"(d[(i) + 2]), "+f"(d[(i) + 3]), "+f"(d[(i) + 4]), "+f"(d[(i) + 5]), "+f"(d[(i) + 6]), "+f"(d[(i) + 7])
#define SPEEDRUN_ACC64(i) SPEEDRUN_ACC8((i) + 0), SPEEDRUN_ACC8((i) + 8), SPEEDRUN_ACC8((i) + 16), SPEEDRUN_ACC8((i) + 24), SPEEDRUN_ACC8((i) + 32), SPEEDRUN_ACC8((i) + 40), SPEEDRUN_ACC8((i) + 48), SPEEDRUN_ACC8((i) + 56)
#define SPEEDRUN_WGMMA_N256(A_TYPE)                                                          \
  asm volatile(                                                                              \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"                                            \
      "wgmma.mma_async.sync.aligned.m64n256k32.f32." A_TYPE ".e4m3 "                         \
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, "\
      "%128, %129, p, 1, 1;\n}\n"                                                             \
      : SPEEDRUN_ACC64(0), SPEEDRUN_ACC64(64)                                                \
      : "l"(desc_a), "l"(desc_b), "r"(scale_d))
#define SPEEDRUN_WGMMA_N128(A_TYPE)                                                          \
  asm volatile(                                                                              \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                             \
      "wgmma.mma_async.sync.aligned.m64n128k32.f32." A_TYPE ".e4m3 "                         \
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "\
      "%64, %65, p, 1, 1;\n}\n"                                                               \
      : SPEEDRUN_ACC64(0)                                                                    \
      : "l"(desc_a), "l"(desc_b), "r"(scale_d))

template <bool kAE5M2, int kAccum>
__device__ __forceinline__ void wgmma_k32(float (&d)[kAccum], uint64_t desc_a, uint64_t desc_b, uint32_t scale_d) {
  static_assert(kAccum == 128 || kAccum == 64, "wgmma m64n256k32 or m64n128k32");
  if constexpr (kAccum == 128) {
    if constexpr (kAE5M2) {
      SPEEDRUN_WGMMA_N256("e5m2");
    } else {
      SPEEDRUN_WGMMA_N256("e4m3");
    }
  } else {
    if constexpr (kAE5M2) {
      SPEEDRUN_WGMMA_N128("e5m2");
    } else {
      SPEEDRUN_WGMMA_N128("e4m3");
    }
  }
}
#undef SPEEDRUN_WGMMA_N128
#undef SPEEDRUN_WGMMA_N256
#undef SPEEDRUN_ACC64
#undef SPEEDRUN_ACC8

// ---- The GEMM kernel ------------------------------------------------------------------------

struct TileCoord {
  int m;
  int n;
};

// Tile t -> (row tile, column tile), grouped by group_m row tiles (see the header).
__device__ __forceinline__ TileCoord tile_coord(int t, int tiles_m, int tiles_n, int group_m) {
  const int per_group = group_m * tiles_n;
  const int group = t / per_group;
  const int first_m = group * group_m;
  const int group_rows = min(tiles_m - first_m, group_m);
  const int in_group = t - group * per_group;
  return {first_m + in_group % group_rows, in_group / group_rows};
}

__device__ __forceinline__ void store_pair(__nv_bfloat16* c, int64_t offset, float v0, float v1, bool both,
                                           bool vector_ok) {
  if (both && vector_ok) {
    *reinterpret_cast<__nv_bfloat162*>(c + offset) = __floats2bfloat162_rn(v0, v1);
  } else {
    c[offset] = __float2bfloat16_rn(v0);
    if (both) c[offset + 1] = __float2bfloat16_rn(v1);
  }
}

__device__ __forceinline__ void store_pair(float* c, int64_t offset, float v0, float v1, bool both,
                                           bool vector_ok) {
  if (both && vector_ok) {
    *reinterpret_cast<float2*>(c + offset) = make_float2(v0, v1);
  } else {
    c[offset] = v0;
    if (both) c[offset + 1] = v1;
  }
}

// The epilogue of one consumer thread: alpha * d, predicated pair stores straight from
// the wgmma fragment (kAccum / 4 groups of 8 columns).
template <int kAccum, typename OutT>
__device__ __forceinline__ void store_fragment(const float (&d)[kAccum], OutT* __restrict__ c, int row0, int col0,
                                               int M, int N, int64_t ldc, float alpha, bool vector_ok) {
#pragma unroll
  for (int j = 0; j < kAccum / 4; ++j) {
    const int col = col0 + 8 * j;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = row0 + 8 * h;
      if (row < M && col < N) {
        store_pair(c, static_cast<int64_t>(row) * ldc + col, d[4 * j + 2 * h] * alpha, d[4 * j + 2 * h + 1] * alpha,
                   col + 1 < N, vector_ok);
      }
    }
  }
}

// The TMA-store epilogue of one consumer thread: alpha * d as bf16 pairs into its
// warpgroup's 64 x 256 staging area, laid out as 4 boxes of 64 rows x 128 bytes with the
// 128B swizzle the store's tensor map names (16-byte chunk q of row r at chunk q ^ (r % 8)).
// A warp's 32 four-byte writes (8 rows x 4 lanes, one chunk of each row) hit 32 distinct
// banks.  `row` is the thread's first row in the warpgroup (the second is row + 8).
// Written with st.shared (a generic store would cost an address-space check each).
__device__ __forceinline__ void stage_fragment(const float (&d)[128], const uint8_t* area, int row, int lane,
                                               float alpha) {
  const uint32_t base = smem_addr(area) + (lane % 4) * 4;
#pragma unroll
  for (int j = 0; j < 32; ++j) {  // 8-column group j: box j / 8, chunk j % 8 of its rows
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = row + 8 * h;
      const __nv_bfloat162 v = __floats2bfloat162_rn(d[4 * j + 2 * h] * alpha, d[4 * j + 2 * h + 1] * alpha);
      const uint32_t dst = base + (j / 8) * kStoreBoxBytes + r * 128 + (((j % 8) ^ (r % 8)) * 16);
      asm volatile("st.shared.b32 [%0], %1;" ::"r"(dst), "r"(*reinterpret_cast<const uint32_t*>(&v)) : "memory");
    }
  }
}

// C[M, N] = alpha * A[M, K] . B[N, K]^T; A e4m3 (kAE5M2 false) or e5m2, B e4m3; OutT
// __nv_bfloat16 or float.  kPromote: fp32 promotion of every k-block (GemmConfig).
// `vector_ok`: pairs of columns may be stored as one 4/8-byte access (ldc even, c aligned).
// `tma_store` (fast bf16 instances only): the tile goes out through shared memory and
// map_c's TMA store, asynchronously, while this warpgroup starts its next tile; else the
// stores come straight from the registers.
template <bool kAE5M2, typename OutT, bool kPromote>
__global__ void __launch_bounds__(kThreads, 1)
fp8_gemm_kernel(const __grid_constant__ CUtensorMap map_a, const __grid_constant__ CUtensorMap map_b,
                const __grid_constant__ CUtensorMap map_c, OutT* __restrict__ c, int M, int N, int K, int64_t ldc,
                float alpha, bool vector_ok, bool tma_store, int group_m) {
  constexpr bool kTmaStore = !kPromote && std::is_same_v<OutT, __nv_bfloat16>;
  using Cfg = GemmConfig<kPromote, kTmaStore>;
  constexpr int kStages = Cfg::kStages;
  constexpr int kStageBytes = Cfg::kStageBytes;
  constexpr int kCluster = Cfg::kCluster;
  extern __shared__ uint8_t smem_raw[];
  // The dynamic shared-memory base is only 16-byte aligned by the language: align it to
  // 1024 bytes (the 128B swizzle atom) by hand; the shared-memory size has the slack for it.
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  uint8_t* store_tile = smem + kStages * kStageBytes;  // kStoreBytes (0 without the TMA store)
  uint64_t* full = reinterpret_cast<uint64_t*>(store_tile + Cfg::kStoreBytes);
  uint64_t* empty = full + kStages;

  const int tiles_m = (M + kBM - 1) / kBM;
  const int tiles_n = (N + Cfg::kBN - 1) / Cfg::kBN;
  // The schedule is over cluster tiles: kCluster vertically adjacent row tiles of one
  // column tile, CTA `rank` of the cluster taking row tile kCluster * m + rank.  Both CTAs
  // of a cluster walk the same cluster tiles, so they load the same B k-blocks in step and
  // leave the loop together; a row tile past tiles_m (odd tiles_m, last cluster row) is a
  // "phantom": its CTA loads and computes no A, but still loads and multicasts its B slice
  // and takes part in the barriers (header, "Clusters").
  const int cluster_rows = (tiles_m + kCluster - 1) / kCluster;
  const int tiles = cluster_rows * tiles_n;
  const int k_blocks = (K + kBK - 1) / kBK;
  const int warpgroup = threadIdx.x / 128;
  const uint32_t rank = kCluster > 1 ? cluster_rank() : 0;
  const int first_tile = blockIdx.x / kCluster;
  const int tile_stride = gridDim.x / kCluster;

  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbar_init(&full[s], 1);
      // A stage is free once every consumer warp of every CTA that reads this CTA's B slice
      // (the whole cluster) is done with it.
      mbar_init(&empty[s], kConsumerWarps * kCluster);
    }
    // Make the initialized barriers visible to the TMA unit (the async proxy) and, below,
    // to the cluster's other CTA.
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  // The peer's barriers must be initialized before this CTA multicasts into them or
  // arrives on them remotely.
  if constexpr (kCluster > 1) {
    cluster_sync();
  } else {
    __syncthreads();
  }

  if (warpgroup == 0) {
    // ---- producer ----
    registers_decrease<40>();
    if (threadIdx.x == 0) {
      tma_prefetch_descriptor(&map_a);
      tma_prefetch_descriptor(&map_b);
      if (kTmaStore && tma_store) tma_prefetch_descriptor(&map_c);
      int stage = 0;
      uint32_t phase = 0;
      for (int t = first_tile; t < tiles; t += tile_stride) {
        const TileCoord tile = tile_coord(t, cluster_rows, tiles_n, group_m);
        const int tile_m = tile.m * kCluster + static_cast<int>(rank);
        const bool phantom = tile_m >= tiles_m;
        for (int kb = 0; kb < k_blocks; ++kb) {
          // A fresh barrier counts as having completed the phase before phase 0, so the
          // first pass over the stages does not wait (parity phase ^ 1 == 1).
          mbar_wait(&empty[stage], phase ^ 1);
          uint8_t* a = smem + stage * kStageBytes;
          uint8_t* b = a + kStageBytesA;
          // Out-of-bounds parts of a box are zero-filled and still counted: always the full
          // bytes of B (every slice, this CTA's and the peer's multicast) and of A unless
          // this tile is a phantom, which loads none.
          mbar_arrive_expect_tx(&full[stage], phantom ? Cfg::kStageBytesB : kStageBytes);
          if (!phantom) tma_load_2d(a, &map_a, &full[stage], kb * kBK, tile_m * kBM);
          if constexpr (kCluster > 1) {
            // A slice that would start past B's last row (ragged N) starts at that row
            // instead: the box then overlaps the tensor (never relying on an entirely
            // out-of-bounds box), and whatever it holds only feeds output columns >= N,
            // which are never stored.
            const int slice_row = min(tile.n * Cfg::kBN + static_cast<int>(rank) * Cfg::kSliceRowsB, N - 1);
            tma_load_2d_multicast(b + rank * Cfg::kSliceRowsB * kBK, &map_b, &full[stage], (1u << kCluster) - 1,
                                  kb * kBK, slice_row);
          } else {
            tma_load_2d(b, &map_b, &full[stage], kb * kBK, tile.n * Cfg::kBN);
          }
          if (++stage == kStages) {
            stage = 0;
            phase ^= 1;
          }
        }
      }
    }
  } else {
    // ---- consumers ----
    registers_increase<232>();
    const int consumer = warpgroup - 1;  // rows 64*consumer .. +63 of the tile
    const int warp = (threadIdx.x / 32) % 4;
    const int lane = threadIdx.x % 32;
    // acc: the wgmma accumulator (all of K when fast, one k-block when promoted);
    // total: the fp32 sum of the promoted k-blocks.
    float acc[Cfg::kAccum];
    float total[kPromote ? Cfg::kAccum : 1];
#pragma unroll
    for (int i = 0; i < Cfg::kAccum; ++i) acc[i] = 0.f;
    int stage = 0;
    uint32_t phase = 0;
    for (int t = first_tile; t < tiles; t += tile_stride) {
      const TileCoord tile = tile_coord(t, cluster_rows, tiles_n, group_m);
      const int tile_m = tile.m * kCluster + static_cast<int>(rank);
      const bool phantom = tile_m >= tiles_m;  // only with kCluster > 1: no A, no math, no stores
      if constexpr (kPromote) {
#pragma unroll
        for (int i = 0; i < Cfg::kAccum; ++i) total[i] = 0.f;
      }
      int previous = 0;
      for (int kb = 0; kb < k_blocks; ++kb) {
        mbar_wait(&full[stage], phase);
        if (kCluster > 1 && phantom) {
          // Nothing to compute, but the stage's B slices are the cluster's: release it to
          // every CTA of the cluster like a real k-block.
          if (lane == 0) {
#pragma unroll
            for (int cta = 0; cta < kCluster; ++cta) mbar_arrive_cluster(&empty[stage], cta);
          }
          if (++stage == kStages) {
            stage = 0;
            phase ^= 1;
          }
          continue;
        }
        const uint8_t* a = smem + stage * kStageBytes + consumer * 64 * kBK;
        const uint8_t* b = smem + stage * kStageBytes + kStageBytesA;
        const uint64_t desc_a = smem_descriptor(a);
        const uint64_t desc_b = smem_descriptor(b);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < kBK / 32; ++kk) {
          // +2 in the start-address field = +32 bytes = the next 32 fp8 values of K.  A
          // promoted k-block starts a fresh chain (scale_d 0 at kk == 0).
          const uint32_t scale_d = kPromote ? kk != 0 : (kb | kk) != 0;
          wgmma_k32<kAE5M2>(acc, desc_a + 2 * kk, desc_b + 2 * kk, scale_d);
        }
        wgmma_commit();
        if constexpr (kPromote) {
          // Promotion (DeepGEMM's scheme): wait for this k-block's chain, release its
          // stage, add the chain into fp32.  This warpgroup's tensor-core work pauses for
          // the 64 FADDs; the other consumer warpgroup's wgmmas fill the gap.
          wgmma_wait<0>();
          fence_accumulators(acc);
          if (lane == 0) {
            if constexpr (kCluster > 1) {
              // Both CTAs' producers refill this stage (each its B slice into both), so
              // both must learn that this warp is done with it.
#pragma unroll
              for (int cta = 0; cta < kCluster; ++cta) mbar_arrive_cluster(&empty[stage], cta);
            } else {
              mbar_arrive(&empty[stage]);
            }
          }
#pragma unroll
          for (int i = 0; i < Cfg::kAccum; ++i) total[i] += acc[i];
        } else if (kb > 0) {
          // The previous k-block's wgmmas are done: its stage may be refilled.
          wgmma_wait<1>();
          if (lane == 0) mbar_arrive(&empty[previous]);
        }
        previous = stage;
        if (++stage == kStages) {
          stage = 0;
          phase ^= 1;
        }
      }
      const int row0 = tile_m * kBM + consumer * 64 + warp * 16 + lane / 4;
      const int col0 = tile.n * Cfg::kBN + 2 * (lane % 4);
      if constexpr (kPromote) {
        if (!phantom) store_fragment(total, c, row0, col0, M, N, ldc, alpha, vector_ok);
      } else {
        wgmma_wait<0>();
        fence_accumulators(acc);
        if (lane == 0) mbar_arrive(&empty[previous]);
        if constexpr (kTmaStore) {
          if (tma_store) {
            // This warpgroup's staging area may still be read by the TMA store of its
            // previous tile (issued a whole mainloop ago, so normally done): its issuing
            // thread waits, then the warpgroup writes, fences for the async proxy, and
            // the issuing thread sends the 4 boxes without waiting for them.
            uint8_t* area = store_tile + consumer * 4 * kStoreBoxBytes;
            const bool issuer = threadIdx.x % 128 == 0;
            if (issuer) bulk_wait_read();
            named_barrier(1 + consumer, 128);
            stage_fragment(acc, area, warp * 16 + lane / 4, lane, alpha);
            fence_async_shared();
            named_barrier(1 + consumer, 128);
            if (issuer) {
#pragma unroll
              for (int box = 0; box < 4; ++box) {
                tma_store_2d(&map_c, area + box * kStoreBoxBytes, tile.n * Cfg::kBN + box * kStoreBoxCols,
                             tile_m * kBM + consumer * 64);
              }
              bulk_commit();
            }
            continue;
          }
        }
        store_fragment(acc, c, row0, col0, M, N, ldc, alpha, vector_ok);
      }
    }
    // The last tile's stores must finish before the CTA (and its shared memory) goes away.
    if (kTmaStore && tma_store && threadIdx.x % 128 == 0) bulk_wait_all();
  }
  // The peer's consumers arrive on this CTA's empty barriers up to their last k-block
  // (its multicast data all landed before this CTA's own consumers could finish): no CTA
  // of the cluster may exit, and free its shared memory, before all are done.
  if constexpr (kCluster > 1) cluster_sync();
}

// ---- Casts to fp8 ---------------------------------------------------------------------------

__device__ __forceinline__ float load_float(const float* p) { return *p; }
__device__ __forceinline__ float load_float(const at::BFloat16* p) {
  return __uint_as_float(static_cast<uint32_t>(reinterpret_cast<const uint16_t*>(p)[0]) << 16);
}
__device__ __forceinline__ float load_float(const at::Half* p) {
  return __half2float(*reinterpret_cast<const __half*>(p));
}

// The product v * scale rounded to the source dtype, as torch's v.mul(scale) would be.
__device__ __forceinline__ float round_like(float v, const float*) { return v; }
__device__ __forceinline__ float round_like(float v, const at::BFloat16*) {
  return __bfloat162float(__float2bfloat16_rn(v));
}
__device__ __forceinline__ float round_like(float v, const at::Half*) { return __half2float(__float2half_rn(v)); }

template <bool kE5M2>
__device__ __forceinline__ uint8_t to_fp8(float v) {
  if constexpr (kE5M2) {
    return static_cast<uint8_t>(__nv_cvt_float_to_fp8(v, __NV_NOSAT, __NV_E5M2));
  } else {
    return static_cast<uint8_t>(__nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3));
  }
}

constexpr int kCastTile = 64;
constexpr int kCastThreads = 256;

// Writes `tile` (kCastTile x kCastTile bytes, [row][col] of the source) transposed:
// dst_t[col, row].  Each warp writes 32 consecutive bytes of a dst_t row.
__device__ __forceinline__ void store_transposed(const uint8_t (&tile)[kCastTile][kCastTile + 1], int64_t row0,
                                                 int64_t col0, int64_t rows, int64_t cols, uint8_t* dst_t,
                                                 int64_t dst_t_ld) {
  const int tx = threadIdx.x % kCastTile;
  const int ty = threadIdx.x / kCastTile;
  for (int r = ty; r < kCastTile; r += kCastThreads / kCastTile) {
    const int64_t t_row = col0 + r;
    const int64_t t_col = row0 + tx;
    if (t_row < cols && t_col < rows) dst_t[t_row * dst_t_ld + t_col] = tile[tx][r];
  }
}

// dst[r, c] = fp8(src[r, c] * scale), and dst_t[c, r] the same value if dst_t != nullptr.
template <typename Src, bool kE5M2>
__global__ void __launch_bounds__(kCastThreads)
cast_fp8_kernel(const Src* __restrict__ src, int64_t rows, int64_t cols, int64_t src_ld, float scale,
                uint8_t* __restrict__ dst, int64_t dst_ld, uint8_t* __restrict__ dst_t, int64_t dst_t_ld) {
  __shared__ uint8_t tile[kCastTile][kCastTile + 1];
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kCastTile;
  const int64_t col0 = static_cast<int64_t>(blockIdx.y) * kCastTile;
  const int tx = threadIdx.x % kCastTile;
  const int ty = threadIdx.x / kCastTile;
  for (int r = ty; r < kCastTile; r += kCastThreads / kCastTile) {
    const int64_t row = row0 + r;
    const int64_t col = col0 + tx;
    uint8_t q = 0;
    if (row < rows && col < cols) {
      q = to_fp8<kE5M2>(round_like(load_float(src + row * src_ld + col) * scale, src));
      dst[row * dst_ld + col] = q;
    }
    tile[r][tx] = q;
  }
  if (dst_t == nullptr) return;
  __syncthreads();
  store_transposed(tile, row0, col0, rows, cols, dst_t, dst_t_ld);
}

// ---- The e5m2 gradient of the softcapped cross-entropy ---------------------------------------

enum CapKind : int64_t { kNone = 0, kTanh = 1, kSigmoid = 2 };

struct CapParams {
  int kind;
  float cap;
  float inv_cap;
  float inv_scale;
};

__device__ __forceinline__ float capped(float z, const CapParams& p) {
  if (p.kind == kTanh) {  // cap * tanh(z / cap) = cap * (1 - 2 / (exp(2z / cap) + 1))
    return p.cap * (1.f - 2.f * __frcp_rn(__expf(2.f * z * p.inv_cap) + 1.f));
  }
  if (p.kind == kSigmoid) return p.cap * __frcp_rn(1.f + __expf(-z * p.inv_scale));
  return z;
}

// ds/dz written through s.
__device__ __forceinline__ float capped_derivative(float s, const CapParams& p) {
  if (p.kind == kTanh) {
    const float t = s * p.inv_cap;
    return 1.f - t * t;
  }
  if (p.kind == kSigmoid) return s * (1.f - s * p.inv_cap) * p.inv_scale;
  return 1.f;
}

// g8[r, c] = e5m2(bf16(bf16(dloss/dz[r, c]) * grad_scale)) and g8t[c, r] the same, from the
// bf16 logits z, the forward's per-row loss and the per-row factor of the incoming gradient.
__global__ void __launch_bounds__(kCastThreads)
ce_grad_e5m2_kernel(const at::BFloat16* __restrict__ logits, int64_t rows, int64_t cols, int64_t ld,
                    const int64_t* __restrict__ targets, const float* __restrict__ row_loss,
                    const float* __restrict__ row_factor, int64_t factor_stride, int64_t ignore_index,
                    CapParams p, float grad_scale, uint8_t* __restrict__ g8, int64_t g8_ld,
                    uint8_t* __restrict__ g8t, int64_t g8t_ld) {
  __shared__ uint8_t tile[kCastTile][kCastTile + 1];
  __shared__ float lse_of[kCastTile];
  __shared__ float factor_of[kCastTile];
  __shared__ int64_t target_of[kCastTile];
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kCastTile;
  const int64_t col0 = static_cast<int64_t>(blockIdx.y) * kCastTile;
  if (threadIdx.x < kCastTile) {
    const int64_t row = row0 + threadIdx.x;
    float lse = 0.f, factor = 0.f;
    int64_t target = -1;
    if (row < rows) {
      target = targets[row];
      const bool kept = target != ignore_index;
      const bool in_range = target >= 0 && target < cols;
      // loss = lse - s[target] in the forward, so lse = loss + s[target]; the target is
      // used as an address only when it is in range.
      lse = row_loss[row] + (in_range ? capped(load_float(logits + row * ld + target), p) : 0.f);
      factor = !kept ? 0.f : (in_range ? row_factor[row * factor_stride] : NAN);
    }
    lse_of[threadIdx.x] = lse;
    factor_of[threadIdx.x] = factor;
    target_of[threadIdx.x] = target;
  }
  __syncthreads();
  const int tx = threadIdx.x % kCastTile;
  const int ty = threadIdx.x / kCastTile;
  for (int r = ty; r < kCastTile; r += kCastThreads / kCastTile) {
    const int64_t row = row0 + r;
    const int64_t col = col0 + tx;
    uint8_t q = 0;
    if (row < rows && col < cols) {
      const float s = capped(load_float(logits + row * ld + col), p);
      const float prob = __expf(s - lse_of[r]);
      const float g = (prob - (col == target_of[r] ? 1.f : 0.f)) * capped_derivative(s, p) * factor_of[r];
      const float g_bf16 = __bfloat162float(__float2bfloat16_rn(g));
      q = to_fp8<true>(__bfloat162float(__float2bfloat16_rn(g_bf16 * grad_scale)));
      g8[row * g8_ld + col] = q;
    }
    tile[r][tx] = q;
  }
  __syncthreads();
  store_transposed(tile, row0, col0, rows, cols, g8t, g8t_ld);
}

// ---- Byte transpose (the fused head's g8^T) -------------------------------------------------
// dst[c, r] = src[r, c] for fp8 bytes, 64 x 64 tiles through shared memory, 16-byte loads and
// 16-byte stores: each thread loads 16 bytes of a source row, and writes 16 consecutive bytes
// of a destination row (16 source rows of one column).  Both row strides are multiples of 16
// (fp8_buffers' padding), so every access is aligned and inside the padded rows; source rows
// past the end are zeros in the tile, landing only in dst's pad columns.
constexpr int kTransposeTile = 64;
constexpr int kTransposeThreads = 256;
constexpr int kTransposeStoreBytes = 16;

__global__ void __launch_bounds__(kTransposeThreads)
transpose_bytes_kernel(const uint8_t* __restrict__ src, int64_t rows, int64_t cols, int64_t src_ld,
                       uint8_t* __restrict__ dst, int64_t dst_ld) {
  static_assert(kTransposeTile * kTransposeTile == kTransposeThreads * kTransposeStoreBytes, "one uint4 per thread");
  __shared__ alignas(16) uint8_t tile[kTransposeTile][kTransposeTile];
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTransposeTile;
  const int64_t col0 = static_cast<int64_t>(blockIdx.y) * kTransposeTile;
  {
    // A warp reads 8 rows x 64 bytes (whole sectors) and writes 512 contiguous bytes of the tile.
    const int r = threadIdx.x / 4, seg = 16 * (threadIdx.x % 4);
    uint4 v = make_uint4(0u, 0u, 0u, 0u);
    if (row0 + r < rows && col0 + seg < src_ld) v = *reinterpret_cast<const uint4*>(src + (row0 + r) * src_ld + col0 + seg);
    *reinterpret_cast<uint4*>(&tile[r][seg]) = v;
  }
  __syncthreads();
  // A warp reads 32 consecutive bytes of each tile row it gathers: no bank conflicts.
  const int c = threadIdx.x % kTransposeTile, r0 = 16 * (threadIdx.x / kTransposeTile);
  if (col0 + c >= cols || row0 + r0 >= dst_ld) return;
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    w[i] = tile[r0 + 4 * i][c] | (tile[r0 + 4 * i + 1][c] << 8) | (tile[r0 + 4 * i + 2][c] << 16) |
           (static_cast<uint32_t>(tile[r0 + 4 * i + 3][c]) << 24);
  }
  *reinterpret_cast<uint4*>(dst + (col0 + c) * dst_ld + row0 + r0) = make_uint4(w[0], w[1], w[2], w[3]);
}

// ---- Host side ------------------------------------------------------------------------------

// cuTensorMapEncodeTiled from the driver, fetched through the runtime, so the extension
// needs no -lcuda at link time.
using EncodeTiledFn = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                   const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                   CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

EncodeTiledFn encode_tiled() {
  static EncodeTiledFn fn = nullptr;
  static std::once_flag once;
  std::call_once(once, [] {
    void* entry = nullptr;
    cudaDriverEntryPointQueryResult query = cudaDriverEntryPointSymbolNotFound;
    const cudaError_t err =
        cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &entry, 12000, cudaEnableDefault, &query);
    if (err == cudaSuccess && query == cudaDriverEntryPointSuccess) fn = reinterpret_cast<EncodeTiledFn>(entry);
  });
  TORCH_CHECK(fn != nullptr, "fp8_gemm: cuTensorMapEncodeTiled is not available from the CUDA driver");
  return fn;
}

int64_t round_up16(int64_t v) { return (v + 15) / 16 * 16; }

// The tensor map of a K-major fp8 operand: `rows` rows of `k` logical bytes, `row_bytes`
// apart; boxes of kBK bytes x box_rows rows, 128-byte swizzle, zero fill out of bounds.
CUtensorMap operand_map(const at::Tensor& t, int64_t k, int box_rows) {
  const int64_t rows = t.size(0);
  const int64_t row_bytes = t.stride(0);
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0,
              "fp8_gemm: TMA needs 16-byte aligned operands");
  TORCH_CHECK(row_bytes % 16 == 0, "fp8_gemm: TMA needs a row stride that is a multiple of 16 bytes, got ",
              row_bytes);
  CUtensorMap map;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(k), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(row_bytes)};
  const cuuint32_t box[2] = {static_cast<cuuint32_t>(kBK), static_cast<cuuint32_t>(box_rows)};
  const cuuint32_t element_strides[2] = {1, 1};
  const CUresult res = encode_tiled()(&map, CU_TENSOR_MAP_DATA_TYPE_UINT8, 2, t.data_ptr(), dims, strides, box,
                                      element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                      CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  TORCH_CHECK(res == CUDA_SUCCESS, "fp8_gemm: cuTensorMapEncodeTiled failed with error ", static_cast<int>(res));
  return map;
}

// The TMA-store map of a bf16 output c [M, N]: boxes of 64 columns (128 bytes) x 64 rows,
// 128-byte swizzle (the staging layout of stage_fragment).  The caller checked TMA's rules.
CUtensorMap output_map(const at::Tensor& c) {
  CUtensorMap map;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(c.size(1)), static_cast<cuuint64_t>(c.size(0))};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(c.stride(0) * 2)};
  const cuuint32_t box[2] = {static_cast<cuuint32_t>(kStoreBoxCols), 64};
  const cuuint32_t element_strides[2] = {1, 1};
  const CUresult res = encode_tiled()(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, c.data_ptr(), dims, strides, box,
                                      element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                      CU_TENSOR_MAP_L2_PROMOTION_NONE, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  TORCH_CHECK(res == CUDA_SUCCESS, "fp8_gemm: cuTensorMapEncodeTiled (output) failed with error ",
              static_cast<int>(res));
  return map;
}

template <bool kAE5M2, typename OutT, bool kPromote>
void launch_gemm(const at::Tensor& a, const at::Tensor& b, int64_t k, float alpha, at::Tensor& c) {
  constexpr bool kTmaStore = !kPromote && std::is_same_v<OutT, __nv_bfloat16>;
  using Cfg = GemmConfig<kPromote, kTmaStore>;
  const int M = static_cast<int>(a.size(0));
  const int N = static_cast<int>(b.size(0));
  const CUtensorMap map_a = operand_map(a, k, kBM);
  // Each CTA loads its slice of the B tile (all of it without a cluster).
  const CUtensorMap map_b = operand_map(b, k, Cfg::kSliceRowsB);
  auto kernel = fp8_gemm_kernel<kAE5M2, OutT, kPromote>;
  // Per device and cheap: set on every launch rather than caching per process.
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes));
  const int tiles_m = (M + kBM - 1) / kBM;
  const int tiles_n = (N + Cfg::kBN - 1) / Cfg::kBN;
  // Cluster tiles: kCluster row tiles of one column tile (the kernel's schedule).
  const int64_t tiles = static_cast<int64_t>((tiles_m + Cfg::kCluster - 1) / Cfg::kCluster) * tiles_n;
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  cudaLaunchConfig_t config{};
  cudaLaunchAttribute attribute{};
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = Cfg::kSmemBytes;
  config.stream = at::cuda::getCurrentCUDAStream();
  attribute.id = cudaLaunchAttributeClusterDimension;
  attribute.val.clusterDim.x = Cfg::kCluster;
  attribute.val.clusterDim.y = 1;
  attribute.val.clusterDim.z = 1;
  config.attrs = &attribute;
  config.numAttrs = Cfg::kCluster > 1 ? 1 : 0;  // without a cluster: an ordinary launch
  // Persistent: as many clusters as can be resident at once (a cluster's CTAs share a GPC,
  // so with 1 CTA/SM that can be fewer than #SMs / kCluster), never more than the tiles.
  int resident = sms;
  if constexpr (Cfg::kCluster > 1) {
    config.gridDim = dim3(sms / Cfg::kCluster * Cfg::kCluster);
    C10_CUDA_CHECK(cudaOccupancyMaxActiveClusters(&resident, kernel, &config));
    TORCH_CHECK(resident >= 1, "fp8_gemm: no cluster of ", Cfg::kCluster, " CTAs fits this device");
  }
  const int clusters = static_cast<int>(std::min<int64_t>(tiles, resident));
  config.gridDim = dim3(clusters * Cfg::kCluster);
  // Few column tiles (dx, dW: N = 768): a wave takes whole rows of (cluster) tiles, so the
  // CTAs that share an A row panel (K = 50304 bytes per row) run together and read it once
  // from DRAM.  Many (y): groups of kGroupMWide row tiles, so w8 is re-read once per group.
  const int group_m = tiles_n <= clusters ? std::max(1, clusters / tiles_n) : kGroupMWide;
  const bool vector_ok = c.stride(0) % 2 == 0 && reinterpret_cast<uintptr_t>(c.data_ptr()) % 8 == 0;
  // TMA stores need a 16-byte aligned base and row stride (N % 8 == 0 for a dense bf16 c);
  // other shapes take the register stores.
  const bool tma_store = kTmaStore && reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 == 0 &&
                         (c.stride(0) * static_cast<int64_t>(sizeof(OutT))) % 16 == 0;
  CUtensorMap map_c{};
  if (tma_store) map_c = output_map(c);
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, map_a, map_b, map_c, reinterpret_cast<OutT*>(c.data_ptr()), M,
                                    N, static_cast<int>(k), static_cast<int64_t>(c.stride(0)), alpha, vector_ok,
                                    tma_store, group_m));
}

template <bool kAE5M2, typename OutT>
void launch_gemm(const at::Tensor& a, const at::Tensor& b, int64_t k, float alpha, bool promote, at::Tensor& c) {
  if (promote) launch_gemm<kAE5M2, OutT, true>(a, b, k, alpha, c);
  else launch_gemm<kAE5M2, OutT, false>(a, b, k, alpha, c);
}

bool is_fp8(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat8_e4m3fn || t.scalar_type() == at::kFloat8_e5m2;
}

CapParams make_cap_params(double cap, int64_t kind, double scale) {
  CapParams p{};
  p.kind = static_cast<int>(kind);
  p.cap = static_cast<float>(cap);
  p.inv_cap = static_cast<float>(1.0 / cap);
  p.inv_scale = static_cast<float>(1.0 / scale);
  return p;
}

// Row-major fp8 [rows, round_up16(cols)] and, if asked, the transpose [cols, round_up16(rows)]:
// padded row strides keep TMA's 16-byte rule for any shape (the pads are never read).
std::tuple<at::Tensor, at::Tensor> fp8_buffers(int64_t rows, int64_t cols, at::ScalarType type, bool transpose,
                                               const at::TensorOptions& options) {
  at::Tensor q = at::empty({rows, round_up16(cols)}, options.dtype(type));
  at::Tensor qt = transpose ? at::empty({cols, round_up16(rows)}, options.dtype(type)) : at::empty({0}, options.dtype(type));
  return {q, qt};
}

dim3 tile_grid(int64_t rows, int64_t cols) {
  const int64_t row_tiles = (rows + kCastTile - 1) / kCastTile;
  const int64_t col_tiles = (cols + kCastTile - 1) / kCastTile;
  TORCH_CHECK(row_tiles < (int64_t(1) << 31) && col_tiles <= 65535, "fp8 cast: shape too large");
  return dim3(static_cast<unsigned>(row_tiles), static_cast<unsigned>(col_tiles));
}

}  // namespace

// (q, qt): q = fp8(src * scale) [R, pad16(C)], qt its transpose [C, pad16(R)] or [0].
std::tuple<at::Tensor, at::Tensor> fp8_cast(const at::Tensor& src, double scale, bool e5m2, bool transpose) {
  TORCH_CHECK(src.is_cuda() && src.dim() == 2 && src.stride(1) == 1,
              "fp8_cast: src must be a 2-D CUDA tensor with unit column stride");
  TORCH_CHECK(src.scalar_type() == at::kFloat || src.scalar_type() == at::kBFloat16 ||
                  src.scalar_type() == at::kHalf,
              "fp8_cast: src must be float32, bfloat16 or float16, got ", src.scalar_type());
  const c10::cuda::CUDAGuard guard(src.device());
  const int64_t rows = src.size(0), cols = src.size(1);
  auto [q, qt] = fp8_buffers(rows, cols, e5m2 ? at::kFloat8_e5m2 : at::kFloat8_e4m3fn, transpose, src.options());
  if (src.numel() == 0) return {q, qt};
  const dim3 grid = tile_grid(rows, cols);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  uint8_t* dst = reinterpret_cast<uint8_t*>(q.data_ptr());
  uint8_t* dst_t = transpose ? reinterpret_cast<uint8_t*>(qt.data_ptr()) : nullptr;
  const int64_t dst_t_ld = transpose ? qt.stride(0) : 0;
  auto run = [&](auto type_tag) {
    using T = decltype(type_tag);
    const T* s = reinterpret_cast<const T*>(src.data_ptr());
    if (e5m2) {
      cast_fp8_kernel<T, true><<<grid, kCastThreads, 0, stream>>>(s, rows, cols, src.stride(0), static_cast<float>(scale),
                                                                  dst, q.stride(0), dst_t, dst_t_ld);
    } else {
      cast_fp8_kernel<T, false><<<grid, kCastThreads, 0, stream>>>(s, rows, cols, src.stride(0), static_cast<float>(scale),
                                                                   dst, q.stride(0), dst_t, dst_t_ld);
    }
  };
  switch (src.scalar_type()) {
    case at::kFloat: run(float{}); break;
    case at::kHalf: run(at::Half{}); break;
    default: run(at::BFloat16{}); break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {q, qt};
}

// c[M, N] = alpha * a[:, :k] . b[:, :k]^T in bf16 (or fp32 if out_fp32); a e4m3/e5m2 [M, >= k],
// b e4m3 [N, >= k], both with unit column stride and 16-byte aligned rows.  promote: the
// wgmma chain restarts every 128 of K and is added into fp32 (else one chain over K).
at::Tensor fp8_gemm(const at::Tensor& a, const at::Tensor& b, int64_t k, double alpha, bool out_fp32, bool promote) {
  TORCH_CHECK(a.is_cuda() && b.is_cuda() && a.device() == b.device(), "fp8_gemm: a and b must be on one CUDA device");
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.stride(1) == 1 && b.stride(1) == 1,
              "fp8_gemm: a and b must be 2-D with unit column stride");
  TORCH_CHECK(is_fp8(a) && b.scalar_type() == at::kFloat8_e4m3fn,
              "fp8_gemm: a must be float8_e4m3fn or float8_e5m2 and b float8_e4m3fn, got ", a.scalar_type(), " and ",
              b.scalar_type());
  TORCH_CHECK(k >= 1 && k <= a.size(1) && k <= b.size(1), "fp8_gemm: k must be in [1, min(a.size(1), b.size(1))]");
  TORCH_CHECK(a.size(0) >= 1 && b.size(0) >= 1 && a.size(0) < (int64_t(1) << 31) &&
                  b.size(0) < (int64_t(1) << 31) && k < (int64_t(1) << 31),
              "fp8_gemm: M, N and K must be in [1, 2**31)");
  const c10::cuda::CUDAGuard guard(a.device());
  at::Tensor c = at::empty({a.size(0), b.size(0)}, a.options().dtype(out_fp32 ? at::kFloat : at::kBFloat16));
  const bool a_e5m2 = a.scalar_type() == at::kFloat8_e5m2;
  const float f = static_cast<float>(alpha);
  if (a_e5m2 && out_fp32) launch_gemm<true, float>(a, b, k, f, promote, c);
  else if (a_e5m2) launch_gemm<true, __nv_bfloat16>(a, b, k, f, promote, c);
  else if (out_fp32) launch_gemm<false, float>(a, b, k, f, promote, c);
  else launch_gemm<false, __nv_bfloat16>(a, b, k, f, promote, c);
  return c;
}

// (g8, g8t): the e5m2 gradient of the softcapped cross-entropy w.r.t. the bf16 logits,
// times grad_scale, row-major [N, pad16(V)] and transposed [V, pad16(N)].
std::tuple<at::Tensor, at::Tensor> fp8_ce_grad_e5m2(const at::Tensor& logits, const at::Tensor& targets,
                                                    const at::Tensor& row_loss, const at::Tensor& row_factor,
                                                    double cap, int64_t kind, double scale, int64_t ignore_index,
                                                    double grad_scale) {
  TORCH_CHECK(logits.is_cuda() && logits.dim() == 2 && logits.stride(1) == 1 &&
                  logits.scalar_type() == at::kBFloat16,
              "fp8_ce_grad_e5m2: logits must be a 2-D bf16 CUDA tensor with unit column stride");
  const int64_t rows = logits.size(0), cols = logits.size(1);
  TORCH_CHECK(targets.is_cuda() && targets.dim() == 1 && targets.size(0) == rows,
              "fp8_ce_grad_e5m2: targets must be a CUDA tensor of shape [N]");
  TORCH_CHECK(row_loss.is_cuda() && row_loss.scalar_type() == at::kFloat && row_loss.numel() == rows,
              "fp8_ce_grad_e5m2: row_loss must be fp32 [N]");
  TORCH_CHECK(row_factor.is_cuda() && row_factor.scalar_type() == at::kFloat &&
                  (row_factor.numel() == 1 || row_factor.numel() == rows),
              "fp8_ce_grad_e5m2: row_factor must be fp32 with 1 or N elements");
  TORCH_CHECK(kind == kNone || kind == kTanh || kind == kSigmoid, "fp8_ce_grad_e5m2: bad kind ", kind);
  const c10::cuda::CUDAGuard guard(logits.device());
  auto [g8, g8t] = fp8_buffers(rows, cols, at::kFloat8_e5m2, true, logits.options());
  if (logits.numel() == 0) return {g8, g8t};
  const at::Tensor targets64 = targets.to(at::kLong).contiguous();
  const at::Tensor loss = row_loss.contiguous();
  const at::Tensor factor = row_factor.contiguous();
  ce_grad_e5m2_kernel<<<tile_grid(rows, cols), kCastThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const at::BFloat16*>(logits.data_ptr()), rows, cols, logits.stride(0),
      targets64.data_ptr<int64_t>(), loss.data_ptr<float>(), factor.data_ptr<float>(),
      factor.numel() == 1 ? 0 : 1, ignore_index, make_cap_params(cap, kind, scale), static_cast<float>(grad_scale),
      reinterpret_cast<uint8_t*>(g8.data_ptr()), g8.stride(0), reinterpret_cast<uint8_t*>(g8t.data_ptr()),
      g8t.stride(0));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {g8, g8t};
}


// qt [cols, pad16(rows)]: the transpose of the first `cols` columns of the fp8 q [rows, >= cols],
// whose row stride is a multiple of 16 bytes (as every fp8 buffer of this file).
at::Tensor fp8_transpose(const at::Tensor& q, int64_t cols) {
  TORCH_CHECK(q.is_cuda() && q.dim() == 2 && q.stride(1) == 1 && is_fp8(q),
              "fp8_transpose: q must be a 2-D fp8 CUDA tensor with unit column stride");
  TORCH_CHECK(cols >= 0 && cols <= q.size(1) && q.stride(0) % 16 == 0 && q.size(1) % 16 == 0 &&
                  reinterpret_cast<uintptr_t>(q.data_ptr()) % 16 == 0,
              "fp8_transpose: q's rows must be 16-byte aligned and padded to 16 bytes, with cols <= q.size(1)");
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t rows = q.size(0);
  at::Tensor qt = at::empty({cols, round_up16(rows)}, q.options());
  if (rows == 0 || cols == 0) return qt;
  const int64_t row_tiles = (rows + kTransposeTile - 1) / kTransposeTile;
  const int64_t col_tiles = (cols + kTransposeTile - 1) / kTransposeTile;
  TORCH_CHECK(row_tiles < (int64_t(1) << 31) && col_tiles <= 65535, "fp8_transpose: shape too large");
  transpose_bytes_kernel<<<dim3(static_cast<unsigned>(row_tiles), static_cast<unsigned>(col_tiles)),
                           kTransposeThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const uint8_t*>(q.data_ptr()), rows, cols, q.stride(0),
      reinterpret_cast<uint8_t*>(qt.data_ptr()), qt.stride(0));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return qt;
}

}  // namespace speedrun
