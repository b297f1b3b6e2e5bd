// jaxinfer's int8 x int8 -> int32 dot for XLA CPU, registered as the FFI target "jaxinfer_int8_dot".
//
// y[m, n] = sum_k x[m, k] * w[n, k], exactly (int32 sums wrap like XLA's). x is [M, K], w is [N, K]
// (K contiguous: how jaxinfer stores int8 MatMul/Gemm weights), y is [M, N]. "jaxinfer_int8_dot_zp"
// takes a zero point per row of x as well, zp [M] int32, and gives sum_k (x[m, k] - zp[m]) * w[n, k]:
// the zero point is folded into the one pass (AVX2: x - zp as x is widened; VNNI: (128 + zp) times the
// weight sums it takes anyway), where a row of ones appended to x (for the column sums of w) cost a
// second pass over w. Its x may be uint8 (an ONNX DynamicQuantizeLinear output, with zp shifted down by 128 by the
// caller): the VNNI packing's x + 128 is then x's own bytes (the AVX2 path shifts a copy to int8 first), where an
// XLA loop had converted every such activation to int8 before its product (bert_dynamic b8 494 -> 440 us, session
// 28). Built first for few rows, where XLA CPU's int8 library dot is compute-bound well
// below the memory's speed (docs/status.md, issue 6) and at one row XLA's own loops take ~30x longer
// than reading the weight; with VNNI it also beats that dot at many rows (the panels below).
//
// How (AVX-512 VNNI, where the CPU has it): x is offset to uint8 (x + 128) and packed so that one
// step's rows lie together, 64 values per row and step, zero-padded to a multiple of 64; each weight
// row is read once, 64 values at a time, and multiplied into up to 8 rows' accumulators with vpdpbusd
// (four uint8 x int8 products summed into int32: exact, no saturation), two weight rows at a time
// for 5-8 rows of x so that each packed x load serves both. One more vpdpbusd per step against a vector
// of ones gives the weight row's sum, and sum (x + 128) w - (128 + zp) sum w is the wanted sum. A K that
// is not a multiple of 64 ends with a masked load of the weight. The weight rows ~16 KB ahead are
// prefetched into L2 (8 x 1024 x 4096 streaming from memory: 0.16-0.19 ms per product against 0.29
// with a one-block T0 prefetch and ~0.26 without), and 16 sums are reduced at once by a transposing add
// tree. Against the AVX2 path on the same weights (session 19): 1.6-2.3x at 8-32 rows.
// Without VNNI (AVX2): x - zp is widened to int16 once per call and packed likewise (16 values per row
// and step); each weight row is read 16 values at a time, widened to int16 and multiplied into up to
// 8 rows' accumulators with vpmaddwd (pairs of int16 products summed into int32: exact for any int8
// values, unlike vpmaddubsw, which saturates). Either way the weight rows are split into chunks that
// XLA's intra-op thread pool and the calling thread take from a shared counter; the caller waits only
// for chunks already taken, so a busy pool never stalls it. jaxinfer_int8_dot_isa() reports the path
// in use and can narrow it (tests run both).
// From 16 rows of x (24 where K >= 1024) the VNNI path packs each group of 64 weight rows into column panels
// instead (PackPanels) and multiplies every row of x against them: 4 values of one x row broadcast to all
// lanes times 4 values of 16 columns per vpdpbusd, so each lane sums one output and there are no
// horizontal sums, which at short K outweighed the dots. 4 rows x 4 panels = 16 accumulators: with 24
// (6 rows) GCC stored every accumulator to the stack each step and the kernel ran at half the speed.
// Packed x and the panels live in per-thread scratch reused across calls (fresh large buffers cost page
// faults on every call); every thread packs a share of x's rows before any multiplies them.
// "jaxinfer_int8_conv" is a convolution as the same product: x is an NHWC image, and its patch matrix
// (patches.h: one row per output pixel, the window's values in an OHWI filter's order, the input's
// zero point where the window leaves the image) is packed straight from the image against the
// flattened filter [N, KH KW C], each work item packing its own rows (at most kPatchRowBytes), so the
// patch matrix is never written out whole. With VNNI it always takes the panels (from 16 rows): 8-bit
// layers ran 1.3-8x faster than the exact float32 convolution (benchmarks/int8_dot.py, session 20).
// Windows whose rows hold at most 64 bytes (a 3-channel stem) are packed a 64-byte load and store per
// window row (patches.h ShortRows). "jaxinfer_int8_conv_requant" finishes each work item's sums with a
// TFLite output stage (requant.h: bias, fixed-point multiplier and shift, zero point, clamp) into int8, so
// a TFLite int8 layer is one call and the int32 sums never leave the thread's scratch.
// "jaxinfer_int8_dot_dyn" takes float32 x and quantizes each row to int8 itself (QuantizeRow: the numbers
// of jaxinfer.arith.quantize_rows), then runs the same product and leaves float sums times the row scales
// (RowScale, per finished work item): where XLA ran ~5 small fusions around each dot of an int8-dynamic
// model (two-stage absmax, the scale, the int8 values, the row scales), 4.4 -> 3.2 ms on the 4-layer
// d 1024 encoder at 8 tokens (session 21). The weight's scales stay in XLA's fusion with the bias. With the
// panels, every thread quantizes a share of the rows straight into the packed x (PackPanelRows), where the
// calling thread had quantized them all first: [128, 1024] x [1024, 1024] 0.34 -> 0.28-0.31 ms, the encoder's
// 24 products at 4 x 32 tokens 16.9 -> 15.6 ms of thunk time (session 31).
// "jaxinfer_int8_dot_hybrid" does the same for TFLite dynamic-range (hybrid) layers, quantizing each row
// as jaxinfer's TFLite converter does (HybridRow: float64 scale and zero point, round half away from zero)
// and finishing with the weight's scales, the bias and the fused clamp (HybridFinish): the hybrid MLP
// fixture 0.119 -> 0.061 ms at batch 8 (session 21). One row of x takes 8 weight rows per block, whose 8
// products and 8 weight sums one add tree reduces.
// "jaxinfer_dynamic_quantize" is ONNX DynamicQuantizeLinear of a whole tensor (uint8, the converter's
// numbers), which onnxruntime's dynamic-quantized models put before every MatMulInteger.
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "helpers.h"
#include "patches.h"
#include "requant.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kRowsPerPass = 8;       // accumulators held in registers: one per row
// Under this many multiply-adds one thread is quicker. It was 4M while a call's second thread came from XLA's pool
// (waking one cost more than it saved: [8, 256] x [256, 512] 42 vs ~10 us); the spinning helpers (helpers.h) are
// there in a microsecond, and from 64K two threads win: [8, 512] x [512, 512] ~27 -> ~22 us, TFLite hybrid_mlp
// b8 ~56 -> ~42 us, conv_int8 b1 ~160 -> ~125 us (alternating builds, session 23).
constexpr int64_t kSerialMacs = 65536;
constexpr int64_t kOfferMacs = 1 << 23;  // from this many, the job is offered to XLA's pool too (ShareWith)
constexpr int32_t kMinZp = -32768 + 128, kMaxZp = 32767 - 128;  // x - zp fits int16 for any int8 x

constexpr int64_t kPrefetchBytes = 16 << 10;  // how far ahead the VNNI path asks for weights
constexpr int64_t kPanelMinRows = 16;  // from this many rows of x the VNNI path packs w into column panels,
constexpr int64_t kPanelLongK = 1024;  // and from kPanelLongRows where K is at least this (at 16 rows of a
constexpr int64_t kPanelLongRows = 24;  // long K the row path was as quick, its sums amortized)
constexpr int kPanelRows = 4;          // rows of x per register block: 4 x 4 panels = 16 accumulators,
constexpr int kPanelMaxRows = 8;       // or 8 x 2, 8 x 1 for at most 32 columns
constexpr int kPanels = 4;             // panels of 16 columns packed and multiplied at a time
// Packed panels are multiplied a slice of K at a time (every row block of the item against one slice, then
// the next), so that a slice stays in L2: 4 panels of K 4096 take 256 KB. Slicing at 16-64 KB (to stay in L1)
// timed the same as none. The loop over slices also keeps GCC 12 from copying every accumulator to another
// register and back on each step, as it did with a single loop over K (59 instructions per 16 vpdpbusd, one
// spill, against 28; KeepInRegister): [128, 1024] x [1024, 4096] 1.64 -> 1.22 ms, [128, 1024] x [1024, 1024]
// 0.40 -> 0.27.
constexpr int64_t kPanelSliceBytes = 256 << 10;
constexpr int64_t kPatchRowBytes = 256 << 10;  // a convolution's work item packs at most this much of x

enum Isa : int { kAvx2 = 1, kVnni = 2 };

int Supported() {
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vnni"))
    return kVnni;
  return __builtin_cpu_supports("avx2") ? kAvx2 : 0;
}

std::atomic<int> g_isa{-1};  // the path in use; -1 until first asked

int CurrentIsa() {
  int isa = g_isa.load(std::memory_order_relaxed);
  if (isa < 0) {
    isa = Supported();
    g_isa.store(isa, std::memory_order_relaxed);
  }
  return isa;
}

using Patches = jaxinfer::Patches<int8_t>;

// A float x [M, K] that the product quantizes per row itself (QuantizeRow), each row's scale into scales [M].
struct FloatRows {
  const float* x;
  float* scales;
};

struct Job {
  const int8_t* x8 = nullptr;
  const int32_t* zp = nullptr;  // per row of x (the caller's, or zp_store where some were clamped), or none
  std::vector<int32_t> zp_store;
  const int8_t* w = nullptr;
  int32_t* y = nullptr;
  int64_t M = 0, K = 0, N = 0, K16 = 0, chunk = 0, chunks = 0;
  std::vector<int16_t> x16_store;
  int16_t* x16 = nullptr;  // AVX2: per 8-row block b, [K16 / 16][rows in b][16] int16, 64-byte aligned
  int64_t K64 = 0;         // VNNI: K rounded up to a multiple of 64
  std::vector<uint8_t> xu_store;
  uint8_t* xu = nullptr;   // VNNI: per 8-row block b, [K64 / 64][rows in b][64] x + 128, 64-byte aligned
  bool panels = false;     // VNNI column panels (else the row paths)
  int64_t Kp = 0, row_chunk = 0, row_chunks = 0;  // panels: K rounded up to 4; rows per work item
  std::vector<uint8_t> xr_store;
  uint8_t* xr = nullptr;   // panels: [M][Kp] x + 128, row-major, zero past K
  const Patches* patches = nullptr;  // x's rows are these patches (x8 is null where the panels take them)
  const float* sx = nullptr;  // dynamic quantization: per row of x its scale; each finished chunk of y is
                              // then rewritten in place as float (RowScale, or HybridFinish with ws)
  const FloatRows* floats = nullptr;  // dynamic quantization with panels: x quantized per row as it is packed
                                      // (PackPanelRows), the scales written to floats->scales (sx is that array)
  const float* ws = nullptr;  // hybrid: per column the weight's scale; y = sums * (sx ws) (+ bias, clamped)
  const float* bias = nullptr;
  bool one_ws = false, one_bias = false;  // one value for every column
  float lo = 0, hi = 0;
  bool finish = false;
  const jaxinfer::OutputStage* stage = nullptr;  // with y8: each finished chunk of y requantized into y8
  int8_t* y8 = nullptr;
  uint8_t flip = 0x80;  // VNNI packing stores x ^ flip: x + 128 of int8 x, or uint8 x's own bytes (the same
                        // values: uint8 x is the int8 x + 128 that the caller's zero point, shifted by 128, expects)
  int64_t pack_rows = 0, pack_chunks = 0;  // panels: x is packed in chunks of rows first, by every thread
  std::atomic<int64_t> pack_next{0};
  std::atomic<int64_t> packed{0};
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

__attribute__((target("avx2"))) inline int32_t HorizontalSum(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// An empty asm that claims to change v, placed after a loop on each of its accumulators: without it GCC 12 copied
// every accumulator to another register and back on each step (VnniBlock<8, 2>: 26 copies and 3 spilled
// accumulators per 18 vpdpbusd; PanelBlock's loop over slices of K has the same effect there).
template <typename V>
inline void KeepInRegister(V& v) {
  __asm__("" : "+v"(v));
}

// Rows m0 .. m0 + MB of y, columns n0 .. n1.
template <int MB>
__attribute__((target("avx2"))) void Rows(const Job& j, int64_t m0, int64_t n0, int64_t n1) {
  const int64_t K = j.K;
  const int16_t* xb = j.x16 + m0 * j.K16;  // this block: [K16 / 16][MB][16]
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* wr = j.w + n * K;
    __m256i acc[MB];
    for (int i = 0; i < MB; ++i) acc[i] = _mm256_setzero_si256();
    const int16_t* xp = xb;
    for (int64_t k = 0; k < j.K16; k += 16, xp += MB * 16) {
      const __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wr + k)));
      for (int i = 0; i < MB; ++i) {
        const __m256i xv = _mm256_load_si256(reinterpret_cast<const __m256i*>(xp + i * 16));
        acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(wv, xv));
      }
    }
    for (int i = 0; i < MB; ++i) {
      uint32_t s = static_cast<uint32_t>(HorizontalSum(acc[i]));
      const int32_t z = j.zp ? j.zp[m0 + i] : 0;
      for (int64_t k = j.K16; k < K; ++k)  // the last K % 16 terms
        s += static_cast<uint32_t>((int32_t{j.x8[(m0 + i) * K + k]} - z) * int32_t{wr[k]});
      j.y[(m0 + i) * j.N + n] = static_cast<int32_t>(s);
    }
  }
}

// The sums of 16 vectors' lanes with a transposing add tree: 45 instructions where 16 separate
// reductions take ~150 (at K 1024, a quarter of an 8 x 2 block's work).
__attribute__((target("avx512f,avx512bw,avx512vnni"))) inline __m512i Pairs(__m512i a, __m512i b) {
  return _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
}
__attribute__((target("avx512f,avx512bw,avx512vnni"))) inline __m512i Quads(__m512i a, __m512i b) {
  return _mm512_add_epi32(_mm512_unpacklo_epi64(a, b), _mm512_unpackhi_epi64(a, b));
}
__attribute__((target("avx512f,avx512bw,avx512vnni"))) inline __m512i Lanes(__m512i a, __m512i b) {
  return _mm512_add_epi32(_mm512_shuffle_i32x4(a, b, 0x88), _mm512_shuffle_i32x4(a, b, 0xDD));
}
__attribute__((target("avx512f,avx512bw,avx512vnni"))) inline void Sum16(
    __m512i v0, __m512i v1, __m512i v2, __m512i v3, __m512i v4, __m512i v5, __m512i v6, __m512i v7,
    __m512i v8, __m512i v9, __m512i v10, __m512i v11, __m512i v12, __m512i v13, __m512i v14, __m512i v15,
    int32_t* out) {
  // Pairs: per 128-bit lane two partial sums of each of two vectors; Quads: one of each of four; Lanes:
  // adds the 128-bit lanes pairwise, twice, leaving out[i] = sum(v_i) in order.
  const __m512i a = Quads(Pairs(v0, v1), Pairs(v2, v3)), b = Quads(Pairs(v4, v5), Pairs(v6, v7));
  const __m512i c = Quads(Pairs(v8, v9), Pairs(v10, v11)), d = Quads(Pairs(v12, v13), Pairs(v14, v15));
  _mm512_storeu_si512(out, Lanes(Lanes(a, b), Lanes(c, d)));
}

// Rows m0 .. m0 + MB of y, weight rows n .. n + NB: sums of (x + 128) * w and of w, then the offset off.
template <int MB, int NB>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) inline void VnniBlock(const Job& j, int64_t m0, int64_t n) {
  const int64_t K = j.K;
  const uint8_t* xb = j.xu + m0 * j.K64;  // this block: [K64 / 64][MB][64]
  const __m512i ones = _mm512_set1_epi8(1);
  __m512i acc[NB][MB], wsum[NB];
#pragma GCC unroll 8
  for (int b = 0; b < NB; ++b) {
    wsum[b] = _mm512_setzero_si512();
#pragma GCC unroll 8
    for (int i = 0; i < MB; ++i) acc[b][i] = _mm512_setzero_si512();
  }
  const uint8_t* xp = xb;
  const int64_t steps = (K + 63) / 64;
  const int64_t ahead = std::max<int64_t>(NB, (kPrefetchBytes / K + NB - 1) / NB * NB);  // rows ahead
  const __mmask64 last = (~__mmask64{0}) >> (steps * 64 - K);  // the last step's weights: K % 64 or 64
  for (int64_t s = 0; s < steps; ++s, xp += MB * 64) {
    const __mmask64 mask = s + 1 < steps ? ~__mmask64{0} : last;  // x is zero-padded past K
    __m512i wv[NB];
#pragma GCC unroll 8
    for (int b = 0; b < NB; ++b) {
      // Weight rows ~kPrefetchBytes ahead, into L2: the hardware prefetcher loses track of NB
      // interleaved rows, and the dots' work hides the stream only when it is asked for early.
      _mm_prefetch(reinterpret_cast<const char*>(j.w + (n + ahead + b) * K + s * 64), _MM_HINT_T1);
      wv[b] = _mm512_maskz_loadu_epi8(mask, j.w + (n + b) * K + s * 64);
      wsum[b] = _mm512_dpbusd_epi32(wsum[b], ones, wv[b]);
    }
#pragma GCC unroll 8
    for (int i = 0; i < MB; ++i) {
      const __m512i xv = _mm512_load_si512(xp + i * 64);
#pragma GCC unroll 8
      for (int b = 0; b < NB; ++b) acc[b][i] = _mm512_dpbusd_epi32(acc[b][i], xv, wv[b]);
    }
  }
#pragma GCC unroll 8
  for (int b = 0; b < NB; ++b) {
#pragma GCC unroll 8
    for (int i = 0; i < MB; ++i) KeepInRegister(acc[b][i]);
    KeepInRegister(wsum[b]);
  }
  alignas(64) int32_t sums[NB * MB + NB];  // acc's, then wsum's
  constexpr bool one_row = MB == 1 && NB == 8;  // 8 products and their 8 weight sums: one add tree
  if constexpr (one_row) {
    Sum16(acc[0][0], acc[1][0], acc[2][0], acc[3][0], acc[4][0], acc[5][0], acc[6][0], acc[7][0],
          wsum[0], wsum[1], wsum[2], wsum[3], wsum[4], wsum[5], wsum[6], wsum[7], sums);
  } else if constexpr (NB * MB == 16) {
    Sum16(acc[0][0], acc[0][1], acc[0][2], acc[0][3], acc[0][4], acc[0][5], acc[0][6], acc[0][7],
          acc[1][0], acc[1][1], acc[1][2], acc[1][3], acc[1][4], acc[1][5], acc[1][6], acc[1][7], sums);
  } else {
#pragma GCC unroll 16
    for (int c = 0; c < NB * MB; ++c) sums[c] = _mm512_reduce_add_epi32(acc[c / MB][c % MB]);
  }
  if constexpr (!one_row) {
#pragma GCC unroll 8
    for (int b = 0; b < NB; ++b) sums[NB * MB + b] = _mm512_reduce_add_epi32(wsum[b]);
  }
#pragma GCC unroll 8
  for (int b = 0; b < NB; ++b) {
    const uint32_t ws = static_cast<uint32_t>(sums[NB * MB + b]);
#pragma GCC unroll 8
    for (int i = 0; i < MB; ++i) {
      const uint32_t z = j.zp ? static_cast<uint32_t>(j.zp[m0 + i]) : 0u;
      j.y[(m0 + i) * j.N + n + b] = static_cast<int32_t>(static_cast<uint32_t>(sums[b * MB + i]) - (128u + z) * ws);
    }
  }
}

// Rows m0 .. m0 + MB of y, columns n0 .. n1, NB weight rows at a time (zmm registers: NB * MB + 2 NB + 2).
// For one to four rows of x, two weight rows read 1.2-2x slower from memory than one (with a one-block T0
// prefetch): the stream, not the dots, bounds those.
template <int MB>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void VnniRows(const Job& j, int64_t m0, int64_t n0, int64_t n1) {
  constexpr int NB = MB == 1 ? 8 : MB > 4 ? 2 : 1;
  int64_t n = n0;
  for (; n + NB <= n1; n += NB) VnniBlock<MB, NB>(j, m0, n);
  for (; n < n1; ++n) VnniBlock<MB, 1>(j, m0, n);
}

// r as a 16 x 16 matrix of 32-bit elements (r[i] its row i), transposed in place: after, lane c of r[i] is
// what lane i of r[c] was. Three rounds of pairwise interleaves (32-bit, 64-bit, then 128-bit blocks twice).
__attribute__((target("avx512f"))) inline void Transpose16(__m512i (&r)[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xdd);
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
  }
}

// Columns n0 .. n0 + 16 np of w (zero past N and K) packed as P[K / 4][np][16 columns][4 values]:
// one 64-byte load then holds 4 values of 16 columns, which vpdpbusd multiplies by 4 values of one row
// of x broadcast to every lane, so each lane sums one output and no horizontal sums are needed.
// Per panel, 64 bytes of each of its 16 weight rows are loaded at a time and transposed as a 16 x 16
// matrix of 4-byte groups (Transpose16), giving 16 steps of the panel: copying each 4-byte group on its
// own took as long as the product itself at K 4096 and 128 rows of x.
__attribute__((target("avx512f,avx512bw"))) void PackPanels(const Job& j, int64_t n0, int np, uint8_t* P) {
  const int64_t K = j.K, K4 = j.Kp / 4;
  for (int p = 0; p < np; ++p) {
    const int64_t c0 = n0 + int64_t{p} * 16;
    const int64_t have = std::max<int64_t>(0, std::min<int64_t>(16, j.N - c0));  // rows past N stay zero
    const int8_t* w = j.w + c0 * K;
    for (int64_t kb = 0; kb < K; kb += 64) {
      const int64_t left = std::min<int64_t>(64, K - kb);
      const __mmask64 mask = left == 64 ? ~__mmask64{0} : (__mmask64{1} << left) - 1;
      __m512i r[16];
      for (int c = 0; c < 16; ++c)
        r[c] = c < have ? _mm512_maskz_loadu_epi8(mask, w + c * K + kb) : _mm512_setzero_si512();
      Transpose16(r);
      const int64_t steps = std::min<int64_t>(16, K4 - kb / 4);
      for (int64_t i = 0; i < steps; ++i) _mm512_store_si512(P + ((kb / 4 + i) * np + p) * 64, r[i]);
    }
  }
}

// Column sums of the packed panels: vpdpbusd against ones sums each lane's 4 values.
template <int NP>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void PanelSums(const Job& j, const uint8_t* P,
                                                                    __m512i (&cs)[NP]) {
  const __m512i ones = _mm512_set1_epi8(1);
  for (int p = 0; p < NP; ++p) cs[p] = _mm512_setzero_si512();
  for (int64_t k4 = 0; k4 < j.Kp / 4; ++k4)
#pragma GCC unroll 4
    for (int p = 0; p < NP; ++p)
      cs[p] = _mm512_dpbusd_epi32(cs[p], ones, _mm512_load_si512(P + (k4 * NP + p) * 64));
}

// The accumulators of PanelBlock are named one by one (GCC kept arrays of them in memory, storing each every step).
#define JX_ROW_ACC(r) __m512i a##r##0, a##r##1, a##r##2, a##r##3;
#define JX_ZERO(r) a##r##0 = a##r##1 = a##r##2 = a##r##3 = _mm512_setzero_si512();
#define JX_LOAD(r)                                                             \
  if constexpr (MR > r) {                                                      \
    const int32_t* yr = j.y + (m0 + r) * j.N;                                  \
    a##r##0 = LoadPartial(j, yr, n0);                                          \
    if constexpr (NP > 1) a##r##1 = LoadPartial(j, yr, n0 + 16);               \
    if constexpr (NP > 2) a##r##2 = LoadPartial(j, yr, n0 + 32);               \
    if constexpr (NP > 3) a##r##3 = LoadPartial(j, yr, n0 + 48);               \
  }
#define JX_PARTIAL(r)                                                          \
  if constexpr (MR > r) {                                                      \
    int32_t* yr = j.y + (m0 + r) * j.N;                                        \
    StorePartial(j, yr, n0, a##r##0);                                          \
    if constexpr (NP > 1) StorePartial(j, yr, n0 + 16, a##r##1);               \
    if constexpr (NP > 2) StorePartial(j, yr, n0 + 32, a##r##2);               \
    if constexpr (NP > 3) StorePartial(j, yr, n0 + 48, a##r##3);               \
  }
#define JX_STEP(r)                                                       \
  if constexpr (MR > r) {                                                \
    int32_t four;                                                        \
    std::memcpy(&four, xr + r * j.Kp + 4 * k4, 4);                       \
    const __m512i x = _mm512_set1_epi32(four);                           \
    a##r##0 = _mm512_dpbusd_epi32(a##r##0, x, b0);                       \
    if constexpr (NP > 1) a##r##1 = _mm512_dpbusd_epi32(a##r##1, x, b1); \
    if constexpr (NP > 2) a##r##2 = _mm512_dpbusd_epi32(a##r##2, x, b2); \
    if constexpr (NP > 3) a##r##3 = _mm512_dpbusd_epi32(a##r##3, x, b3); \
  }
#define JX_STORE(r)                                                                  \
  if constexpr (MR > r) {                                                            \
    const __m512i off = _mm512_set1_epi32(128 + (j.zp ? j.zp[m0 + r] : 0));          \
    int32_t* yr = j.y + (m0 + r) * j.N;                                              \
    StorePanel(j, yr, n0, a##r##0, off, cs[0]);                                      \
    if constexpr (NP > 1) StorePanel(j, yr, n0 + 16, a##r##1, off, cs[1]);           \
    if constexpr (NP > 2) StorePanel(j, yr, n0 + 32, a##r##2, off, cs[2]);           \
    if constexpr (NP > 3) StorePanel(j, yr, n0 + 48, a##r##3, off, cs[3]);           \
  }

// A block's unfinished sums for y[n .. n + 16] of one row (masked past N), kept in y between slices of K.
__attribute__((target("avx512f,avx512bw"))) inline __m512i LoadPartial(const Job& j, const int32_t* yr, int64_t n) {
  const int64_t left = j.N - n;
  if (left >= 16) return _mm512_loadu_si512(yr + n);
  return left > 0 ? _mm512_maskz_loadu_epi32(static_cast<__mmask16>((1u << left) - 1), yr + n)
                  : _mm512_setzero_si512();
}

__attribute__((target("avx512f,avx512bw"))) inline void StorePartial(const Job& j, int32_t* yr, int64_t n,
                                                                      __m512i acc) {
  const int64_t left = j.N - n;
  if (left >= 16) _mm512_storeu_si512(yr + n, acc);
  else if (left > 0) _mm512_mask_storeu_epi32(yr + n, static_cast<__mmask16>((1u << left) - 1), acc);
}

// y[n .. n + 16] of one row (masked past N): the sums of (x + 128) w less (128 + zp) colsum(w).
__attribute__((target("avx512f,avx512bw,avx512vnni"))) inline void StorePanel(const Job& j, int32_t* yr, int64_t n,
                                                                            __m512i acc, __m512i off, __m512i cs) {
  StorePartial(j, yr, n, _mm512_sub_epi32(acc, _mm512_mullo_epi32(off, cs)));
}

// Rows m0 .. m0 + MR of y (x's packed rows at xr), columns n0 .. n0 + 16 NP (masked past N), over the steps
// k4a .. k4b of the packed panels P: the first slice of K starts from zero, later ones from the partial
// sums left in y, and the last finishes them (StorePanel).
template <int MR, int NP>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void PanelBlock(const Job& j, const uint8_t* P,
                                                                     const __m512i (&cs)[NP], const uint8_t* xr,
                                                                     int64_t m0, int64_t n0, int64_t k4a,
                                                                     int64_t k4b, bool first, bool last) {
  static_assert(MR >= 1 && MR <= kPanelMaxRows && NP >= 1 && NP <= kPanels && MR * NP <= 16,
                "accumulators named below: at most 16 of 8 rows x 4 panels");
  JX_ROW_ACC(0) JX_ROW_ACC(1) JX_ROW_ACC(2) JX_ROW_ACC(3) JX_ROW_ACC(4) JX_ROW_ACC(5) JX_ROW_ACC(6) JX_ROW_ACC(7)
  JX_ZERO(0) JX_ZERO(1) JX_ZERO(2) JX_ZERO(3) JX_ZERO(4) JX_ZERO(5) JX_ZERO(6) JX_ZERO(7)
  if (!first) {
    JX_LOAD(0) JX_LOAD(1) JX_LOAD(2) JX_LOAD(3) JX_LOAD(4) JX_LOAD(5) JX_LOAD(6) JX_LOAD(7)
  }
  const uint8_t* pp = P + k4a * NP * 64;
  for (int64_t k4 = k4a; k4 < k4b; ++k4, pp += NP * 64) {
    const __m512i b0 = _mm512_load_si512(pp);
    const __m512i b1 = NP > 1 ? _mm512_load_si512(pp + 64) : b0;
    const __m512i b2 = NP > 2 ? _mm512_load_si512(pp + 128) : b0;
    const __m512i b3 = NP > 3 ? _mm512_load_si512(pp + 192) : b0;
    JX_STEP(0) JX_STEP(1) JX_STEP(2) JX_STEP(3) JX_STEP(4) JX_STEP(5) JX_STEP(6) JX_STEP(7)
  }
  if (last) {
    JX_STORE(0) JX_STORE(1) JX_STORE(2) JX_STORE(3) JX_STORE(4) JX_STORE(5) JX_STORE(6) JX_STORE(7)
  } else {
    JX_PARTIAL(0) JX_PARTIAL(1) JX_PARTIAL(2) JX_PARTIAL(3) JX_PARTIAL(4) JX_PARTIAL(5) JX_PARTIAL(6) JX_PARTIAL(7)
  }
}
#undef JX_ROW_ACC
#undef JX_ZERO
#undef JX_LOAD
#undef JX_PARTIAL
#undef JX_STEP
#undef JX_STORE

template <int NP>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void PanelRows(const Job& j, const uint8_t* P,
                                                                    const uint8_t* xr, int64_t m0, int64_t m1,
                                                                    int64_t n0) {
  __m512i cs[NP];
  PanelSums<NP>(j, P, cs);
  // 8 rows per block against 1-2 panels: with a row's one accumulator, a 16-column layer waited on vpdpbusd
  constexpr int MR = NP <= 2 ? kPanelMaxRows : kPanelRows;
  constexpr int64_t slice = kPanelSliceBytes / (NP * 64);  // steps of K per pass over the rows
  const int64_t K4 = j.Kp / 4;
  for (int64_t k4a = 0; k4a < K4; k4a += slice) {
    const int64_t k4b = std::min(K4, k4a + slice);
    const bool first = k4a == 0, last = k4b == K4;
    const uint8_t* xm = xr;
    int64_t m = m0;
    for (; m + MR <= m1; m += MR, xm += MR * j.Kp) PanelBlock<MR, NP>(j, P, cs, xm, m, n0, k4a, k4b, first, last);
    if (MR > kPanelRows && m + kPanelRows <= m1) {  // 4 of the last 5-7 rows
      PanelBlock<kPanelRows, NP>(j, P, cs, xm, m, n0, k4a, k4b, first, last);
      m += kPanelRows, xm += kPanelRows * j.Kp;
    }
    static_assert(kPanelRows == 4 && kPanelMaxRows <= 2 * kPanelRows, "the remainder cases below");
    switch (m1 - m) {
      case 3: PanelBlock<3, NP>(j, P, cs, xm, m, n0, k4a, k4b, first, last); break;
      case 2: PanelBlock<2, NP>(j, P, cs, xm, m, n0, k4a, k4b, first, last); break;
      case 1: PanelBlock<1, NP>(j, P, cs, xm, m, n0, k4a, k4b, first, last); break;
      default: break;
    }
  }
}

// Rows m0 .. m1 and columns n0 .. n1 by panels: each group of up to 4 panels is packed once (into `P`,
// this thread's buffer) and multiplied by every row of the range.
void Panels(const Job& j, uint8_t* P, const uint8_t* xr, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; n += 16 * kPanels) {
    const int np = static_cast<int>(std::min<int64_t>(kPanels, (n1 - n + 15) / 16));
    PackPanels(j, n, np, P);
    switch (np) {
      case 4: PanelRows<4>(j, P, xr, m0, m1, n); break;
      case 3: PanelRows<3>(j, P, xr, m0, m1, n); break;
      case 2: PanelRows<2>(j, P, xr, m0, m1, n); break;
      default: PanelRows<1>(j, P, xr, m0, m1, n); break;
    }
  }
}

// f(std::integral_constant<int, mb>) for a run-time row count mb in 1 .. kRowsPerPass.
template <typename F>
void WithRows(int64_t mb, F f) {
  switch (mb) {
    case 8: f(std::integral_constant<int, 8>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    default: f(std::integral_constant<int, 1>{}); break;
  }
}

void Columns(const Job& j, int64_t n0, int64_t n1) {
  for (int64_t m0 = 0; m0 < j.M; m0 += kRowsPerPass)
    WithRows(std::min(kRowsPerPass, j.M - m0), [&](auto mb) {
      if (j.xu)
        VnniRows<decltype(mb)::value>(j, m0, n0, n1);
      else
        Rows<decltype(mb)::value>(j, m0, n0, n1);
    });
}

// Scratch for packed x, reused by the calling thread across calls: a fresh multi-megabyte buffer per
// call cost page faults every time (8192 x 288 x 32 ran 2.5x slower). Safe because a call returns only
// once every chunk is done, and a pool worker that starts late finds no chunk left and reads nothing
// else. Buffers past kMaxScratch bytes live in the call's Job instead (not kept).
constexpr size_t kMaxScratch = size_t{8} << 20;  // per buffer kind and thread: what a server keeps

template <typename T>
T* Scratch(std::vector<T>& kept, std::vector<T>& own, size_t n) {
  std::vector<T>& v = n * sizeof(T) <= kMaxScratch ? kept : own;
  if (v.size() < n + 64 / sizeof(T)) v.resize(n + 64 / sizeof(T));
  return reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(v.data()) + 63) & ~uintptr_t{63});
}

thread_local std::vector<int16_t> t_x16;
thread_local std::vector<uint8_t> t_xu, t_xr;

// dst[0 .. n) = src ^ by: int8 src + 128 as uint8 (by = 0x80, the VNNI paths' form of x), or uint8 src as it is
// (by = 0).
__attribute__((target("avx512f,avx512bw"))) inline void CopyOffset(uint8_t* dst, const int8_t* src, int64_t n,
                                                                    uint8_t by) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(by));
  int64_t c = 0;
  for (; c + 64 <= n; c += 64) _mm512_storeu_si512(dst + c, _mm512_xor_si512(_mm512_loadu_si512(src + c), flip));
  if (c < n) {
    const __mmask64 mask = (~__mmask64{0}) >> (64 - (n - c));
    _mm512_mask_storeu_epi8(dst + c, mask, _mm512_xor_si512(_mm512_maskz_loadu_epi8(mask, src + c), flip));
  }
}

// One window row of at most 64 values, as CopyOffset (ShortRows).
__attribute__((target("avx512f,avx512bw"))) inline void WideOffset(uint8_t* dst, const int8_t* src, uint8_t by) {
  _mm512_storeu_si512(dst, _mm512_xor_si512(_mm512_loadu_si512(src), _mm512_set1_epi8(static_cast<char>(by))));
}

constexpr float kRowInvQmax = static_cast<float>(1.0 / 127.5);  // jaxinfer.arith._ROW_INV_QMAX
constexpr float kTinyScale = 0x1p-63f;  // sqrt of float32's smallest normal: a row under it has scale 1

// One row of x quantized as jaxinfer.arith.quantize_rows does it: scale = max |x| * (1 / 127.5) (1 where
// that is below kTinyScale), q = clip(round_half_even(x * (1 / scale)), -128, 127). A row holding NaN
// has a NaN scale, so its outputs are NaN; x * (1 / scale) that is NaN (inf * 0 in a row holding inf)
// gives q = 0, as XLA converts NaN to an integer. (XLA's own max over a row holding NaN keeps or drops
// the NaN depending on the fusion; finite rows come out the same either way.) q is stored ^ flip (0x80:
// the VNNI packing's q + 128; 0: the int8 values).
__attribute__((target("avx2"))) float QuantizeRow(const float* x, int64_t K, uint8_t* q, uint8_t flip) {
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 vmax = _mm256_setzero_ps(), nan = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    const __m256 v = _mm256_loadu_ps(x + k);
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    vmax = _mm256_max_ps(vmax, _mm256_and_ps(v, magnitude));
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, vmax);
  float absmax = 0.0f;
  for (float v : lanes) absmax = std::max(absmax, v);
  bool has_nan = _mm256_movemask_ps(nan) != 0;
  for (; k < K; ++k) {
    has_nan |= x[k] != x[k];
    absmax = std::max(absmax, std::fabs(x[k]));
  }
  if (has_nan) absmax = std::numeric_limits<float>::quiet_NaN();
  float scale = absmax * kRowInvQmax;
  if (scale < kTinyScale) scale = 1.0f;  // false for NaN, as in XLA
  const float inv = 1.0f / scale;
  const __m256 vinv = _mm256_set1_ps(inv), lo = _mm256_set1_ps(-128.0f), hi = _mm256_set1_ps(127.0f);
  const __m128i by = _mm_set1_epi8(static_cast<char>(flip));
  for (k = 0; k + 8 <= K; k += 8) {
    const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(x + k), vinv);
    const __m256 c = _mm256_and_ps(_mm256_min_ps(_mm256_max_ps(v, lo), hi), _mm256_cmp_ps(v, v, _CMP_ORD_Q));
    const __m256i i = _mm256_cvtps_epi32(c);  // rounds half to even (the default MXCSR mode)
    const __m128i w16 = _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(q + k), _mm_xor_si128(_mm_packs_epi16(w16, w16), by));
  }
  for (; k < K; ++k) {
    const float v = x[k] * inv;
    const int8_t r = v != v ? int8_t{0} : static_cast<int8_t>(std::nearbyint(std::min(std::max(v, -128.0f), 127.0f)));
    q[k] = static_cast<uint8_t>(r) ^ flip;
  }
  return scale;
}

// Rows m0 .. m1 of the panels' x: [m][Kp] x ^ j.flip (x + 128 of an int8 x), zero past K. Float x (j.floats) is
// quantized here, its row scales written beside it: every thread quantizes a share of the rows.
__attribute__((target("avx512f,avx512bw"))) void PackPanelRows(const Job& j, int64_t m0, int64_t m1, uint8_t* out) {
  const int64_t K = j.K, Kp = j.Kp;
  const uint8_t fill = j.patches ? static_cast<uint8_t>(j.patches->pad ^ 0x80) : 0;  // pad: the shifted zp
  const uint8_t by = j.flip;
  const auto copy = [by](uint8_t* dst, const int8_t* src, int64_t n) { CopyOffset(dst, src, n, by); };
  const auto wide = [by](uint8_t* dst, const int8_t* src) { WideOffset(dst, src, by); };
  if (j.patches && jaxinfer::ShortWindow(*j.patches))
    jaxinfer::ShortRows(*j.patches, m0, m1, out, Kp, fill, copy, wide);
  else if (j.patches)
    jaxinfer::PatchRows(*j.patches, m0, m1, out, Kp, fill, copy);
  for (int64_t m = m0; m < m1; ++m) {
    uint8_t* dst = out + (m - m0) * Kp;
    if (j.floats)
      j.floats->scales[m] = QuantizeRow(j.floats->x + m * K, K, dst, by);
    else if (!j.patches)
      CopyOffset(dst, j.x8 + m * K, K, by);
    std::memset(dst + K, 0, Kp - K);
  }
}

thread_local std::vector<int8_t> t_patches, t_flipped;

// y[m, n] for rows m0 .. m1 and columns n0 .. n1, rewritten in place from int32 sums to float sum * sx[m]
// (the conversion rounds to nearest even, then one rounded product), as XLA computes it in jaxinfer.arith.
// The weight's scales are left to XLA, which contracts that product with a following bias add.
__attribute__((target("avx2"))) void RowScale(const Job& j, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  for (int64_t m = m0; m < m1; ++m) {
    int32_t* yr = j.y + m * j.N;
    const float s = j.sx[m];
    const __m256 vs = _mm256_set1_ps(s);
    int64_t n = n0;
    for (; n + 8 <= n1; n += 8) {
      const __m256 v = _mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(yr + n)));
      _mm256_storeu_ps(reinterpret_cast<float*>(yr + n), _mm256_mul_ps(v, vs));
    }
    for (; n < n1; ++n) {
      const float f = static_cast<float>(yr[n]) * s;
      std::memcpy(yr + n, &f, sizeof f);
    }
  }
}

// y[m, n] for rows m0 .. m1 and columns n0 .. n1, rewritten in place from int32 sums to float: a TFLite hybrid
// layer's float(sum) * (sx[m] * ws[n]), then with finish + bias[n] in the same rounding (XLA contracts that
// multiply-add into an FMA) and clamped to [lo, hi], NaN kept: the converter's composition, bit for bit,
// where XLA ran it as a fusion after each product (~1 us of a 10 us layer at batch 1).
__attribute__((target("avx2,fma"))) void HybridFinish(const Job& j, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  const __m256 lo = _mm256_set1_ps(j.lo), hi = _mm256_set1_ps(j.hi);
  for (int64_t m = m0; m < m1; ++m) {
    int32_t* yr = j.y + m * j.N;
    const __m256 s = _mm256_set1_ps(j.sx[m]);
    int64_t n = n0;
    for (; n + 8 <= n1; n += 8) {
      const __m256 v = _mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(yr + n)));
      const __m256 t = _mm256_mul_ps(s, j.one_ws ? _mm256_set1_ps(j.ws[0]) : _mm256_loadu_ps(j.ws + n));
      const __m256 b = j.one_bias ? _mm256_set1_ps(j.bias[0]) : _mm256_loadu_ps(j.bias + n);
      __m256 r = j.finish ? _mm256_fmadd_ps(v, t, b) : _mm256_mul_ps(v, t);
      if (j.finish) r = _mm256_min_ps(hi, _mm256_max_ps(lo, r));  // max(lo, NaN), min(hi, NaN) are NaN
      _mm256_storeu_ps(reinterpret_cast<float*>(yr + n), r);
    }
    for (; n < n1; ++n) {
      const float v = static_cast<float>(yr[n]), t = j.sx[m] * j.ws[j.one_ws ? 0 : n];
      float r = j.finish ? std::fma(v, t, j.bias[j.one_bias ? 0 : n]) : v * t;
      if (j.finish && r == r) r = std::min(j.hi, std::max(j.lo, r));
      std::memcpy(yr + n, &r, sizeof r);
    }
  }
}

void Rescale(const Job& j, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  if (j.ws)
    HybridFinish(j, m0, m1, n0, n1);
  else
    RowScale(j, m0, m1, n0, n1);
}

// y8 [m, n] for rows m0 .. m1 and columns n0 .. n1: the output stage applied to the int32 sums in y.
void Requantize(const Job& j, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  for (int64_t m = m0; m < m1; ++m) jaxinfer::RequantRow(*j.stage, j.y + m * j.N, n0, n1, j.y8 + m * j.N);
}

void Work(Job& j) {
  for (int64_t c; (c = j.pack_next.fetch_add(1, std::memory_order_relaxed)) < j.pack_chunks;) {
    PackPanelRows(j, c * j.pack_rows, std::min(j.M, (c + 1) * j.pack_rows), j.xr + c * j.pack_rows * j.Kp);
    j.packed.fetch_add(1, std::memory_order_release);
  }
  while (j.packed.load(std::memory_order_acquire) < j.pack_chunks) _mm_pause();  // every row is read below
  thread_local std::vector<uint8_t> kept, kept_rows;  // panels: this thread's packed columns (and patch rows)
  std::vector<uint8_t> own, own_rows;
  const bool panels = j.panels;
  uint8_t* P = panels ? Scratch(kept, own, j.Kp * 16 * kPanels) : nullptr;
  for (int64_t c; (c = j.next.fetch_add(1, std::memory_order_relaxed)) < j.chunks;) {
    if (panels) {  // work items: row chunks within column chunks
      const int64_t cc = c / j.row_chunks, rc = c % j.row_chunks;
      const int64_t m0 = rc * j.row_chunk, m1 = std::min(j.M, m0 + j.row_chunk);
      const uint8_t* xr = j.xr + m0 * j.Kp;
      if (j.patches) {  // each item packs its own patch rows: they are never all held at once
        uint8_t* rows = Scratch(kept_rows, own_rows, (m1 - m0) * j.Kp + 64);  // ShortRows spills past the end
        PackPanelRows(j, m0, m1, rows);
        xr = rows;
      }
      const int64_t n0 = cc * j.chunk, n1 = std::min(j.N, (cc + 1) * j.chunk);
      Panels(j, P, xr, m0, m1, n0, n1);
      if (j.sx) Rescale(j, m0, m1, n0, n1);
      if (j.stage) Requantize(j, m0, m1, n0, n1);
    } else {
      const int64_t n0 = c * j.chunk, n1 = std::min(j.N, (c + 1) * j.chunk);
      Columns(j, n0, n1);
      if (j.sx) Rescale(j, 0, j.M, n0, n1);
      if (j.stage) Requantize(j, 0, j.M, n0, n1);
    }
    j.done.fetch_add(1, std::memory_order_release);
  }
}

// x packed for the kernel: per 8-row block, [Kp / S][rows in block][S] values of f(x, zp), zero past K
// (only the VNNI path pads: Kp >= K there, the AVX2 path stops at K / 16 * 16).
template <typename T, int S, typename F>
void Pack(const Job& j, T* out, int64_t Kp, F f) {
  for (int64_t m0 = 0; m0 < j.M; m0 += kRowsPerPass) {
    const int64_t mb = std::min(kRowsPerPass, j.M - m0);
    T* dst = out + m0 * Kp;
    for (int64_t k = 0; k < Kp; k += S)
      for (int64_t i = 0; i < mb; ++i, dst += S) {
        const int32_t z = j.zp ? j.zp[m0 + i] : 0;
        const int8_t* src = j.x8 + (m0 + i) * j.K;
        for (int64_t t = 0; t < S; ++t) dst[t] = k + t < j.K ? f(src[k + t], z) : T{0};
      }
  }
}

// A hybrid layer's float finish (HybridFinish): the weight's scale per column, and with finish a bias and clamp.
struct HybridOut {
  const float* ws = nullptr;
  const float* bias = nullptr;
  bool one_ws = false, one_bias = false;  // one value for every column
  float lo = 0, hi = 0;
  bool finish = false;
};

// Pack<uint8_t, 64> of x ^ j.flip (x + 128 of an int8 x) with AVX-512: one masked load, xor and store per row
// and step, where the scalar loop (a branch per byte) took ~8 us of an 8 x 512 x 10 hybrid layer's ~9 (session 22).
__attribute__((target("avx512f,avx512bw"))) void PackVnni(const Job& j, uint8_t* out, int64_t Kp) {
  const __m512i offset = _mm512_set1_epi8(static_cast<char>(j.flip));
  for (int64_t m0 = 0; m0 < j.M; m0 += kRowsPerPass) {
    const int64_t mb = std::min(kRowsPerPass, j.M - m0);
    uint8_t* dst = out + m0 * Kp;
    for (int64_t k = 0; k < Kp; k += 64) {
      const int64_t live = std::clamp<int64_t>(j.K - k, 0, 64);
      const __mmask64 mask = live == 64 ? ~__mmask64{0} : (__mmask64{1} << live) - 1;
      for (int64_t i = 0; i < mb; ++i, dst += 64) {
        const __m512i v = _mm512_maskz_loadu_epi8(mask, j.x8 + (m0 + i) * j.K + k);
        _mm512_storeu_si512(dst, _mm512_maskz_mov_epi8(mask, _mm512_xor_si512(v, offset)));  // zero past K
      }
    }
  }
}

thread_local std::vector<int8_t> t_q8;

// y [M, N] = x [M, K] w [N, K]^T, x less its per-row zero point zp (or none); x is a matrix, or the patch
// matrix of `patches` (then x is null). With row scales sx [M], y is then float (RowScale, or HybridFinish
// with `hybrid`); with an output stage, y is scratch and y8 [M, N] the requantized result (zero points in
// int16's range only). With `floats`, x is float and quantized here (x is null; the row scales are floats->scales).
ffi::Error Run(ffi::ThreadPool& pool, const int8_t* x, const Patches* patches, const int32_t* zp, const int8_t* w,
               int32_t* y, int64_t M, int64_t K, int64_t N, const float* sx = nullptr,
               const jaxinfer::OutputStage* stage = nullptr, int8_t* y8 = nullptr, const HybridOut* hybrid = nullptr,
               bool x_unsigned = false, const FloatRows* floats = nullptr) {
  if (floats) sx = floats->scales;  // the row scales the quantization writes
  if (M == 0 || N == 0) return ffi::Error::Success();
  if (K == 0 && !sx) {  // every sum is empty
    std::fill(y, y + M * N, 0);
    if (stage)
      for (int64_t m = 0; m < M; ++m) jaxinfer::RequantRow(*stage, y + m * N, 0, N, y8 + m * N);
    return ffi::Error::Success();
  }
  if (K == 0)
    return ffi::Error::InvalidArgument("jaxinfer_int8_dot_dyn: K is 0 (jaxinfer takes XLA's dot there)");
  if (x_unsigned && CurrentIsa() != kVnni && patches)
    return ffi::Error::InvalidArgument("jaxinfer_int8_conv: uint8 images need the AVX-512 VNNI path");
  std::vector<int8_t> own_flipped;
  if (x_unsigned && CurrentIsa() != kVnni) {  // the AVX2 path widens int8: uint8 x becomes x - 128 first
    int8_t* shifted = Scratch(t_flipped, own_flipped, M * K);
    for (int64_t i = 0; i < M * K; ++i) shifted[i] = static_cast<int8_t>(static_cast<uint8_t>(x[i]) ^ 0x80);
    x = shifted;
    x_unsigned = false;
  }
  // x - zp must fit int16. A row whose zero point does not (never one of an 8-bit tensor; a NaN row's
  // computed offset, say) is packed with none, and zp * colsum(w) is taken off afterwards.
  auto j = std::make_shared<Job>();
  const bool wide = zp && std::any_of(zp, zp + M, [](int32_t z) { return z < kMinZp || z > kMaxZp; });
  j->zp = zp;  // the caller's, valid until Run returns; copied only where some row must be packed with none
  if (wide && stage) return ffi::Error::InvalidArgument("jaxinfer_int8_conv_requant: zero points out of range");
  if (wide) {
    j->zp_store.assign(zp, zp + M);
    for (int32_t& z : j->zp_store)
      if (z < kMinZp || z > kMaxZp) z = 0;
    j->zp = j->zp_store.data();
  }
  j->x8 = x;
  j->w = w;
  j->y = y;
  j->sx = sx;
  if (hybrid) {
    j->ws = hybrid->ws, j->bias = hybrid->bias, j->one_ws = hybrid->one_ws, j->one_bias = hybrid->one_bias;
    j->lo = hybrid->lo, j->hi = hybrid->hi, j->finish = hybrid->finish;
  }
  j->stage = stage;
  j->y8 = y8;
  j->flip = x_unsigned ? 0 : 0x80;
  j->M = M;
  j->K = K;
  j->N = N;
  int64_t threads = std::max<int64_t>(1, pool.num_threads());
  if (M * K * N < kSerialMacs) threads = 1;
  const bool panels =
      CurrentIsa() == kVnni && M >= kPanelMinRows && (K < kPanelLongK || M >= kPanelLongRows || patches);
  std::vector<int8_t> own_q;
  if (floats && panels) {  // quantized as the panels' x is packed, by every thread
    j->floats = floats;
  } else if (floats) {  // the row paths read int8 x: a few rows, quantized on this thread
    int8_t* q = Scratch(t_q8, own_q, M * K);
    for (int64_t m = 0; m < M; ++m)
      floats->scales[m] = QuantizeRow(floats->x + m * K, K, reinterpret_cast<uint8_t*>(q + m * K), 0);
    j->x8 = q;
  }
  std::vector<int8_t> own_patches;
  j->patches = patches;
  if (patches && !panels) {  // the other paths read x as a matrix: the patches are written out
    int8_t* rows = Scratch(t_patches, own_patches, M * K);
    const auto copy = [](uint8_t* dst, const int8_t* src, int64_t n) { std::memcpy(dst, src, n); };
    for (int64_t m = 0; m < M; ++m)
      jaxinfer::PatchRow(*patches, m, reinterpret_cast<uint8_t*>(rows + m * K),
                         static_cast<uint8_t>(static_cast<uint8_t>(patches->pad) ^ 0x80 ^ j->flip), copy);  // raw bytes
    j->x8 = rows;
  }
  if (panels) {
    j->panels = true;
    j->Kp = (K + 3) / 4 * 4;
    if (!patches) {  // x packed by every thread first; patches are packed per work item instead
      j->xr = Scratch(t_xr, j->xr_store, M * j->Kp);
      j->pack_rows = std::max<int64_t>(kPanelRows, (M + threads * 4 - 1) / (threads * 4));
      j->pack_chunks = (M + j->pack_rows - 1) / j->pack_rows;
    }
    // Column chunks of whole panel groups; where there are fewer than 4 per thread, rows split too.
    const int64_t group = 16 * kPanels;
    j->chunk = std::max<int64_t>(group, (j->N + threads * 4 - 1) / (threads * 4) / group * group);
    const int64_t col_chunks = (j->N + j->chunk - 1) / j->chunk;
    j->row_chunks = std::min<int64_t>((threads * 4 + col_chunks - 1) / col_chunks,
                                      (j->M + kPanelRows - 1) / kPanelRows);
    j->row_chunk = ((j->M + j->row_chunks - 1) / j->row_chunks + kPanelRows - 1) / kPanelRows * kPanelRows;
    if (patches) {  // at most kPatchRowBytes of patch rows per item (all of a large image's would not fit)
      const int64_t fit = kPatchRowBytes / j->Kp / kPanelRows * kPanelRows;
      j->row_chunk = std::min(j->row_chunk, std::max<int64_t>(4 * kPanelRows, fit));
    }
    j->row_chunks = (j->M + j->row_chunk - 1) / j->row_chunk;
    j->chunks = col_chunks * j->row_chunks;
  } else if (CurrentIsa() == kVnni) {
    j->K64 = (j->K + 63) / 64 * 64;
    j->xu = Scratch(t_xu, j->xu_store, j->M * j->K64);
    PackVnni(*j, j->xu, j->K64);
  } else {
    j->K16 = j->K / 16 * 16;
    j->x16 = Scratch(t_x16, j->x16_store, j->M * j->K16);
    Pack<int16_t, 16>(*j, j->x16, j->K16,
                      [](int8_t v, int32_t z) { return static_cast<int16_t>(int32_t{v} - z); });
  }
  if (!panels) {
    j->chunk = std::max<int64_t>(16, (j->N + threads * 4 - 1) / (threads * 4));
    j->chunks = (j->N + j->chunk - 1) / j->chunk;
  }
  threads = std::min(threads, j->chunks);
  jaxinfer::ShareWith(pool, M * K * N >= kOfferMacs, j, Work, threads, j->chunks);
  if (wide) {
    std::vector<uint32_t> colsum(j->N, 0);
    for (int64_t n = 0; n < j->N; ++n)
      for (int64_t k = 0; k < j->K; ++k) colsum[n] += static_cast<uint32_t>(int32_t{j->w[n * j->K + k]});
    for (int64_t m = 0; m < j->M; ++m)
      if (j->zp_store[m] != zp[m])
        for (int64_t n = 0; n < j->N; ++n)
          j->y[m * j->N + n] = static_cast<int32_t>(static_cast<uint32_t>(j->y[m * j->N + n]) -
                                                    static_cast<uint32_t>(zp[m]) * colsum[n]);
  }
  return ffi::Error::Success();
}

// Whether x [M, K], w [N, K] and y [M, N] fit together (every product handler's operands).
template <typename Dims>
bool ProductDims(const Dims& xd, const Dims& wd, const Dims& yd) {
  return xd.size() == 2 && wd.size() == 2 && yd.size() == 2 && xd[1] == wd[1] && yd[0] == xd[0] && yd[1] == wd[0];
}

ffi::Error Int8Dot(ffi::ThreadPool pool, ffi::Buffer<ffi::S8> x, ffi::Buffer<ffi::S8> w,
                   ffi::ResultBuffer<ffi::S32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (!ProductDims(xd, wd, yd))
    return ffi::Error::InvalidArgument("jaxinfer_int8_dot: expected x [M, K], w [N, K] and y [M, N]");
  return Run(pool, x.typed_data(), nullptr, nullptr, w.typed_data(), y->typed_data(), xd[0], xd[1], wd[0]);
}

ffi::Error Int8DotZp(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::S32> zp, ffi::Buffer<ffi::S8> w,
                     ffi::ResultBuffer<ffi::S32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions(), zd = zp.dimensions();
  bool x8 = false;
  const bool x_unsigned = jaxinfer::Unsigned8(x.element_type(), x8);
  if (!x8 || !ProductDims(xd, wd, yd))
    return ffi::Error::InvalidArgument("jaxinfer_int8_dot_zp: expected int8 or uint8 x [M, K], w [N, K] and y [M, N]");
  if (zd.size() != 1 || zd[0] != xd[0])
    return ffi::Error::InvalidArgument("jaxinfer_int8_dot_zp: expected zp [M] for x [M, K]");
  // uint8 x: its bytes are the int8 x + 128 the packing makes anyway, and zp comes shifted down by 128 alike
  return Run(pool, static_cast<const int8_t*>(x.untyped_data()), nullptr, zp.typed_data(), w.typed_data(),
             y->typed_data(), xd[0], xd[1], wd[0], nullptr, nullptr, nullptr, nullptr, x_unsigned);
}

thread_local std::vector<float> t_sx;

// y [M, N] float = x [M, K] float, quantized per row to int8 (QuantizeRow), times w [N, K] int8:
// sum_k q[m, k] w[n, k] * sx[m], the numbers of jaxinfer.arith's quantize_rows, int32 dot and row scales in
// one call (XLA took ~5 small fusions per product around the int32 dot).
ffi::Error Int8DotDyn(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> w,
                      ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (!ProductDims(xd, wd, yd))
    return ffi::Error::InvalidArgument("jaxinfer_int8_dot_dyn: expected x [M, K], w [N, K] and y [M, N]");
  const int64_t M = xd[0], K = xd[1];
  std::vector<float> own_s;
  const FloatRows floats{x.typed_data(), Scratch(t_sx, own_s, M)};
  return Run(pool, nullptr, nullptr, nullptr, w.typed_data(), reinterpret_cast<int32_t*>(y->typed_data()), M, K, wd[0],
             nullptr, nullptr, nullptr, nullptr, false, &floats);
}

// TFLite's round half away from zero as jaxinfer's converter writes it: sign(v) * floor(|v| + 0.5), the
// sum rounded to float32 first.
__attribute__((target("avx2,fma"))) inline __m256 RoundHalfAway(__m256 v) {
  const __m256 sign = _mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int>(0x80000000u)));
  const __m256 mag = _mm256_floor_ps(_mm256_add_ps(_mm256_andnot_ps(sign, v), _mm256_set1_ps(0.5f)));
  return _mm256_or_ps(mag, _mm256_and_ps(v, sign));
}

inline float RoundHalfAway(float v) {
  const float mag = std::floor(std::fabs(v) + 0.5f);
  return std::signbit(v) ? -mag : mag;
}

// One row of a TFLite dynamic-range (hybrid) kernel's input quantized as
// jaxinfer.converters.tflite.quant.dynamic_quantize_rows does it; returns the scale, sets *offset.
// Asymmetric: the range [min(x, 0), max(x, 0)] over 255 steps (float64), a nudged zero point, q =
// round(offset + x * (1 / scale)) in [-128, 127] (XLA contracts that multiply-add: one rounding here too).
// Symmetric: scale max|x| / 127, q = round(x * (127 / max|x|)) in [-127, 127], offset 0.
__attribute__((target("avx2,fma"))) float HybridRow(const float* x, int64_t K, bool asymmetric, int8_t* q,
                                                     int32_t* offset) {
  __m256 vlo = _mm256_set1_ps(std::numeric_limits<float>::infinity()), vhi = _mm256_set1_ps(-vlo[0]);
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    const __m256 v = _mm256_loadu_ps(x + k);
    vlo = _mm256_min_ps(vlo, v);
    vhi = _mm256_max_ps(vhi, v);
  }
  float lo = std::numeric_limits<float>::infinity(), hi = -lo;
  for (int i = 0; i < 8; ++i) lo = std::min(lo, vlo[i]), hi = std::max(hi, vhi[i]);
  for (; k < K; ++k) lo = std::min(lo, x[k]), hi = std::max(hi, x[k]);
  float scale, inv, qmin, off = 0.0f;
  if (asymmetric) {
    const double rmin = std::min(lo, 0.0f), rmax = std::max(hi, 0.0f);
    const bool zero = rmin == rmax;
    const double sd = zero ? 1.0 : (rmax - rmin) / 255.0;
    const double zp_min = -128.0 - rmin / sd, zp_max = 127.0 - rmax / sd;
    const double zpd = 128.0 + std::fabs(rmin / sd) < 127.0 + std::fabs(rmax / sd) ? zp_min : zp_max;
    const double nudged = zpd <= -128.0 ? -128.0 : zpd >= 127.0 ? 127.0 : std::copysign(std::floor(std::fabs(zpd) + 0.5), zpd);
    *offset = zero || !std::isfinite(nudged) ? 0 : static_cast<int32_t>(nudged);  // NaN rows: garbage, not UB
    scale = zero ? 1.0f : static_cast<float>(sd);
    inv = static_cast<float>(1.0 / static_cast<double>(scale));
    qmin = -128.0f;
    off = static_cast<float>(*offset);
  } else {
    const float range = std::max(std::fabs(lo), std::fabs(hi));
    const float safe = range == 0.0f ? 1.0f : range;
    scale = range == 0.0f ? 1.0f : static_cast<float>(static_cast<double>(safe) / 127.0);
    inv = static_cast<float>(127.0 / static_cast<double>(safe));
    qmin = -127.0f;
    *offset = 0;
  }
  const __m256 vinv = _mm256_set1_ps(inv), voff = _mm256_set1_ps(off), vmin = _mm256_set1_ps(qmin),
               vmax = _mm256_set1_ps(127.0f);
  for (k = 0; k + 8 <= K; k += 8) {
    const __m256 xv = _mm256_loadu_ps(x + k);
    const __m256 v = asymmetric ? _mm256_fmadd_ps(xv, vinv, voff) : _mm256_mul_ps(xv, vinv);
    const __m256i i = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(RoundHalfAway(v), vmin), vmax));
    const __m128i w16 = _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(q + k), _mm_packs_epi16(w16, w16));
  }
  for (; k < K; ++k) {
    const float v = asymmetric ? std::fma(x[k], inv, off) : x[k] * inv;
    q[k] = v != v ? int8_t{0} : static_cast<int8_t>(std::min(std::max(RoundHalfAway(v), qmin), 127.0f));
  }
  return scale;
}

thread_local std::vector<int32_t> t_offsets;

thread_local std::vector<float> t_row_scales;

// A TFLite hybrid (dynamic-range) layer: x [M, K] float, each row quantized to int8 as HybridRow does, times w
// [N, K] int8 (zero point 0), y [M, N] float = sum_k (q[m, k] - offset[m]) w[n, k] * (row scale * ws [n]), and
// with finish + bias [N] clamped to [lo, hi] (HybridFinish). ws and bias may be [1], one value for all: XLA
// runs a broadcast of a repeated value as a thunk of its own every call. What XLA ran as ~10 small fusions before the dot
// (min and max in two stages, the float64 scale and zero point, the int8 values) and one after it.
ffi::Error Int8DotHybrid(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> w,
                         ffi::Buffer<ffi::F32> ws, ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> y,
                         int64_t asymmetric, int64_t finish, float lo, float hi) {
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  const auto vec = [&](auto d) { return d.size() == 1 && (d[0] == wd[0] || d[0] == 1); };
  if (!ProductDims(xd, wd, yd) || !vec(ws.dimensions()) || !vec(bias.dimensions()) || !(lo <= hi))
    return ffi::Error::InvalidArgument(
        "jaxinfer_int8_dot_hybrid: expected x [M, K], w [N, K], ws and bias [N] or [1], y [M, N] and lo <= hi");
  const int64_t M = xd[0], K = xd[1];
  std::vector<int8_t> own_q;
  std::vector<int32_t> own_o;
  std::vector<float> own_s;
  int8_t* q = Scratch(t_q8, own_q, M * K);
  int32_t* offsets = Scratch(t_offsets, own_o, M);
  float* scales = Scratch(t_row_scales, own_s, M);
  const float* xs = x.typed_data();
  for (int64_t m = 0; m < M; ++m) scales[m] = HybridRow(xs + m * K, K, asymmetric != 0, q + m * K, offsets + m);
  const HybridOut out{ws.typed_data(), bias.typed_data(), ws.dimensions()[0] == 1, bias.dimensions()[0] == 1,
                      lo, hi, finish != 0};
  return Run(pool, q, nullptr, asymmetric ? offsets : nullptr, w.typed_data(),
             reinterpret_cast<int32_t*>(y->typed_data()), M, K, wd[0], scales, nullptr, nullptr, &out);
}

// ONNX DynamicQuantizeLinear of a whole float32 tensor x [n], as jaxinfer's converter computes it: the
// range [min(x, 0), max(x, 0)], scale = (hi - lo) / 255 (float32 operands, the quotient taken in float64;
// 1 / 255 for an all-zero tensor), zp = round_half_even(clip(-lo / scale, 0, 255)), y = clip(round_half_even(
// x / scale) + zp, 0, 255) as uint8. One pass for the range, one for the values, where XLA ran ~6 thunks.
__attribute__((target("avx2"))) void DynamicQuantizeU8(const float* x, int64_t n, uint8_t* y, float* scale_out,
                                                        uint8_t* zp_out) {
  __m256 vlo = _mm256_setzero_ps(), vhi = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    const __m256 v = _mm256_loadu_ps(x + k);
    vlo = _mm256_min_ps(vlo, v);
    vhi = _mm256_max_ps(vhi, v);
  }
  float lo = 0.0f, hi = 0.0f;
  for (int i = 0; i < 8; ++i) lo = std::min(lo, vlo[i]), hi = std::max(hi, vhi[i]);
  for (; k < n; ++k) lo = std::min(lo, x[k]), hi = std::max(hi, x[k]);
  const float span = hi == lo ? 1.0f : hi - lo;
  const float scale = static_cast<float>(static_cast<double>(span) / 255.0);
  const float zq = static_cast<float>(static_cast<double>(-lo) / static_cast<double>(scale));
  const float zp = std::nearbyint(std::min(std::max(zq, 0.0f), 255.0f));
  *scale_out = scale;
  *zp_out = static_cast<uint8_t>(zp);
  const __m256 vs = _mm256_set1_ps(scale), vzp = _mm256_set1_ps(zp), top = _mm256_set1_ps(255.0f),
               zero = _mm256_setzero_ps();
  for (k = 0; k + 8 <= n; k += 8) {
    const __m256 r = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(x + k), vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256i i = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(_mm256_add_ps(r, vzp), zero), top));
    const __m128i w16 = _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(y + k), _mm_packus_epi16(w16, w16));
  }
  for (; k < n; ++k) y[k] = static_cast<uint8_t>(std::min(std::max(std::nearbyint(x[k] / scale) + zp, 0.0f), 255.0f));
}

ffi::Error DynamicQuantizeLinear(ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::U8> y, ffi::ResultBuffer<ffi::F32> scale,
                                 ffi::ResultBuffer<ffi::U8> zp) {
  if (x.element_count() != y->element_count() || scale->element_count() != 1 || zp->element_count() != 1)
    return ffi::Error::InvalidArgument("jaxinfer_dynamic_quantize: expected x and y of n values, scale [1], zp [1]");
  DynamicQuantizeU8(x.typed_data(), static_cast<int64_t>(x.element_count()), y->typed_data(), scale->typed_data(),
                    zp->typed_data());
  return ffi::Error::Success();
}

thread_local std::vector<int32_t> t_acc;

// The convolution handlers' image and filter: x [B, H, W, C] at `data` (int8, or uint8 read as x - 128: RunConv's
// x_unsigned, the packed bytes then the image's own), its zero point zp [1] in int8's range (shifted like x; the
// padding holds it), w [N, KH KW C] (an OHWI filter, flattened) against y [B, OH, OW, N]; the patches into p, or
// the error naming `target`.
template <typename XDims, typename YDims>
ffi::Error BindConv(const char* target, const void* data, XDims xd, ffi::Buffer<ffi::S32> zp, ffi::Buffer<ffi::S8> w,
                    YDims yd, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t dh, int64_t dw, int64_t pt,
                    int64_t pl, Patches& p) {
  const auto wd = w.dimensions(), zd = zp.dimensions();
  if (wd.size() != 2 || zd.size() != 1 || zd[0] != 1 ||
      !jaxinfer::Geometry(static_cast<const int8_t*>(data), xd, yd, wd[1], wd[0], kh, kw, sh, sw, dh, dw, pt, pl, p))
    return ffi::Error::InvalidArgument(std::string(target) +
                                       ": expected x [B, H, W, C], zp [1], w [N, KH * KW * C], y [B, OH, OW, N]");
  const int32_t z = zp.typed_data()[0];
  if (z < -128 || z > 127) return ffi::Error::InvalidArgument(std::string(target) + ": zp must be an int8 value");
  p.pad = static_cast<int8_t>(z);
  return ffi::Error::Success();
}

// The patch product of p and w [N, K]: int32 sums into y, or with an output stage into scratch and the stage's
// result into y8.
ffi::Error RunConv(ffi::ThreadPool& pool, const Patches& p, const int8_t* w, int64_t K, int64_t N, int32_t* y,
                   const jaxinfer::OutputStage* stage, int8_t* y8, bool x_unsigned) {
  const int64_t M = p.B * p.OH * p.OW;
  const std::vector<int32_t> zps(M, p.pad);
  std::vector<int32_t> own;
  if (stage) y = Scratch(t_acc, own, M * N);
  return Run(pool, nullptr, &p, zps.data(), w, y, M, K, N, nullptr, stage, y8, nullptr, x_unsigned);
}

// y [B, OH, OW, N] = the convolution of x less its zero point with w (BindConv): the product of x's patch matrix
// and w, strides (sh, sw), dilations (dh, dw), pt / pl rows / columns of padding before the image (after it:
// whatever OH, OW need). A uint8 x takes the VNNI path only.
ffi::Error Int8Conv(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::S32> zp, ffi::Buffer<ffi::S8> w,
                    ffi::ResultBuffer<ffi::S32> y, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t dh,
                    int64_t dw, int64_t pt, int64_t pl) {
  const char* target = "jaxinfer_int8_conv";
  bool ok = false;
  const bool x_unsigned = jaxinfer::Unsigned8(x.element_type(), ok);
  if (!ok) return ffi::Error::InvalidArgument(std::string(target) + ": x must be int8 or uint8");
  Patches p;
  if (ffi::Error e = BindConv(target, x.untyped_data(), x.dimensions(), zp, w, y->dimensions(), kh, kw, sh, sw, dh,
                              dw, pt, pl, p);
      e.failure())
    return e;
  return RunConv(pool, p, w.typed_data(), w.dimensions()[1], w.dimensions()[0], y->typed_data(), nullptr, nullptr,
                 x_unsigned);
}

// Int8Conv's sums through the output stage (requant.h): y [B, OH, OW, N] int8, where XLA took the int32
// sums through two or three fusions per layer (bias, the fixed-point rescale, the clamp).
ffi::Error Int8ConvRequant(ffi::ThreadPool pool, ffi::Buffer<ffi::S8> x, ffi::Buffer<ffi::S32> zp,
                           ffi::Buffer<ffi::S8> w, ffi::Buffer<ffi::S32> bias, ffi::Buffer<ffi::S32> stage,
                           ffi::ResultBuffer<ffi::S8> y, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t dh,
                           int64_t dw, int64_t pt, int64_t pl, int64_t ozp, int64_t lo, int64_t hi) {
  const char* target = "jaxinfer_int8_conv_requant";
  Patches p;
  if (ffi::Error e = BindConv(target, x.typed_data(), x.dimensions(), zp, w, y->dimensions(), kh, kw, sh, sw, dh, dw,
                              pt, pl, p);
      e.failure())
    return e;
  jaxinfer::OutputStage s;
  if (ffi::Error e = jaxinfer::BindStage(target, bias, stage, w.dimensions()[0], ozp, lo, hi, s); e.failure()) return e;
  return RunConv(pool, p, w.typed_data(), w.dimensions()[1], w.dimensions()[0], nullptr, &s, y->typed_data(), false);
}

// Int8Conv's sums through ONNX's float requantization (requant.h, RequantRowFloat): y [B, OH, OW, N], int8
// or uint8 (y's type says which), where XLA took the int32 sums through a fusion that XLA CPU split over
// its pool (cnn_qdq at batch 1: 72 us of 170 in that one loop).
ffi::Error Int8ConvRequantFloat(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::S32> zp,
                                ffi::Buffer<ffi::S8> w, ffi::Buffer<ffi::S32> bias, ffi::Buffer<ffi::F32> scale,
                                ffi::Buffer<ffi::S32> ozp, ffi::Result<ffi::AnyBuffer> y, int64_t kh, int64_t kw,
                                int64_t sh, int64_t sw, int64_t dh, int64_t dw, int64_t pt, int64_t pl, bool relu) {
  const char* target = "jaxinfer_int8_conv_requant_f32";
  bool x_ok = false, y_ok = false;
  const bool x_unsigned = jaxinfer::Unsigned8(x.element_type(), x_ok),
             unsigned_out = jaxinfer::Unsigned8(y->element_type(), y_ok);
  if (!x_ok || !y_ok) return ffi::Error::InvalidArgument(std::string(target) + ": x and y must be int8 or uint8");
  Patches p;
  if (ffi::Error e = BindConv(target, x.untyped_data(), x.dimensions(), zp, w, y->dimensions(), kh, kw, sh, sw, dh,
                              dw, pt, pl, p);
      e.failure())
    return e;
  jaxinfer::OutputStage s;
  if (ffi::Error e = jaxinfer::BindFloatStage(target, bias, scale, ozp, w.dimensions()[0], unsigned_out, relu, s);
      e.failure())
    return e;
  return RunConv(pool, p, w.typed_data(), w.dimensions()[1], w.dimensions()[0], nullptr, &s,
                 static_cast<int8_t*>(y->untyped_data()), x_unsigned);  // y: uint8 bytes where unsigned_out
}

}  // namespace

extern "C" int jaxinfer_int8_dot_supported() { return Supported() ? 1 : 0; }

// The path the kernel takes (2: AVX-512 VNNI, 1: AVX2, 0: none); a `want` of 1 or 2 narrows it to that
// path where this CPU has it (later calls take it: no recompile), a negative one only asks.
extern "C" int jaxinfer_int8_dot_isa(int want) {
  if (want > 0) g_isa.store(std::min(want, Supported()), std::memory_order_relaxed);
  return CurrentIsa();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinferInt8Dot, Int8Dot,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinferInt8DotZp, Int8DotZp,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinferInt8DotDyn, Int8DotDyn,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinferInt8DotHybrid, Int8DotHybrid,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("asymmetric")
                                  .Attr<int64_t>("finish")
                                  .Attr<float>("lo")
                                  .Attr<float>("hi"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinferDynamicQuantize, DynamicQuantizeLinear,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::U8>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinferInt8Conv, Int8Conv,
                              jaxinfer::WithWindowAttrs(
                                  jaxinfer::WindowHead<ffi::AnyBuffer>().Ret<ffi::Buffer<ffi::S32>>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinferInt8ConvRequant, Int8ConvRequant, jaxinfer::StagedWindowBinding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinferInt8ConvRequantFloat, Int8ConvRequantFloat,
                              jaxinfer::FloatStagedWindowBinding());
