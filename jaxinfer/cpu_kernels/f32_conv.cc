// jaxinfer's float32 convolution for XLA CPU, registered as the FFI target "jaxinfer_f32_conv".
//
// y [B, OH, OW, N] = the convolution of an NHWC image x [B, H, W, C] with w [N, KH KW C] (an OHWI filter,
// flattened; or [KH KW C, N], an HWIO one, with the attribute kn = 1), zero padding: the product of x's
// patch matrix (patches.h) and w. XLA CPU's own convolution ran these layers 1.3-3x slower here (small
// CNNs' 3x3 layers of 3-256 channels, 7x7 stems, 1x1 layers; session 20), most at few input channels and
// small images, where ORT's and LiteRT's direct kernels are far ahead.
//
// How (AVX-512): the filter is packed once per call into panels of 16 columns, [K][16] floats per panel,
// by every thread at once (a [K, N] filter of whole panels, N a multiple of 16, is read in place instead);
// then each work item takes a chunk of output pixels, writes their patch rows
// (K floats each) into this thread's buffer and multiplies them by every panel: 4 rows x 4 panels of
// accumulators (16 zmm), one row's value broadcast against 16 columns per FMA, so each lane sums one
// output and no horizontal sums are needed. The sums are float32 FMAs in k order (not XLA's order: the
// results differ from XLA's in the last bits, as any two float32 convolutions may).
// Undilated along W (DW = 1), the kernel reads the image directly instead (session 27): a patch row is then KH runs
// of KW C consecutive values of the zero-padded image xp [B, Hp, Wp, C], and the 8 (or 4) pixels of a register
// block, side by side in one output row, sit SW C values apart, so the FMA tile steps through each run with no
// patch rows written at all. Packing the patch rows had been a third of a 3-channel stem's time. Where the window
// leaves the image, each work item (output rows of one image) first copies the padded rows its windows read into
// this thread's strip (session 29; before, every thread copied the whole padded image at once, then all waited for
// it: a third of each layer's time in the cnn fixture at batch 8, the copy stalling on rows the other core had
// just written; cnn b8 192 -> 162 us with helpers only). With nchw the image comes [B, C, H, W] (an ONNX model's
// input) and the strip transposes it, where XLA's transpose to NHWC cost more than the stem's sums (cnn batch 8:
// 32 us).
// With ph x pw > 1 the finished outputs are max-pooled over ph x pw blocks in the same call (a MaxPool whose strides
// are its window, after the layer's bias and Relu/Clip: passes.fuse.fuse_conv_epilogue): a work item is then pooled
// rows, each the max over ph conv rows computed into this thread's scratch, so the convolution's output is never
// written out (an exported CNN's 3-channel stem with its Relu and 2x2 pool at batch 8: 174 -> 69 us, session 28).
// Pooled calls always read the image directly (dw = 1 is required).
// "jaxinfer_int8_conv_direct_f32" is an 8-bit convolution through the same direct path: the padded rows hold
// float32(x - zp) of an int8 or uint8 image, the panels the int8 filter as float32, and the sums, exact integers
// while every partial sum stays below 2^24 (the caller checks K 255 128 < 2^24), leave through requant.h's float
// stage as int8_conv_requant_f32's do: the same bytes. A 3-channel stem's patch rows (27 bytes) cost the VNNI
// kernel more to pack than to multiply (cnn_qdq batch 8: 148 us of 346). Products of
// integer-valued operands stay exact while every partial sum is below 2^24 (intmath's float route
// relies on that, as it does with XLA's convolution).
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include "fma_tile.h"
#include "helpers.h"
#include "patches.h"
#include "requant.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kRows = 4;                     // rows per register block: 4 x 4 panels = 16 accumulators,
constexpr int kMaxRows = 8;                  // and 8 x 2 or 8 x 1 for layers of at most 32 columns
constexpr int kPanels = 4;                   // panels of 16 columns per block
constexpr int64_t kGroup = 16 * kPanels;     // columns per panel group
constexpr int64_t kRowBytes = 256 << 10;     // a work item's patch rows, at most (they stay in L2)
// Under this many multiply-adds one thread is quicker. 1 << 20 until session 30; since our helpers spin rather
// than XLA's workers waking (helpers.h), 1 << 17 timed in one process: the cnn fixture b1 50.6-50.8 -> 46.7-48.0 us,
// TFLite conv_f32 b1 182 -> 176, conv_f32 b8 770 -> 737, shufflenet b1 8.8 -> 8.3 ms; vit_legacy(_ortopt) b8 +1-2 %.
constexpr int64_t kSerialMacs = 1 << 17;
constexpr int64_t kOfferMacs = 1 << 21;      // from this many, the job is offered to XLA's pool too (ShareWith)

struct Job {
  jaxinfer::Patches<float> p;
  const float* w = nullptr;  // [N][K], or [K][N] when kn
  bool kn = false;
  float* y = nullptr;        // [M][N]
  const float* bias = nullptr;  // with finish: y = min(hi, max(lo, sums + bias)) (a fused activation's clamp)
  float lo = 0, hi = 0;
  bool finish = false;
  float* P = nullptr;        // per group of 64 columns: [K][16 np] (np panels, zero past N)
  int64_t packs = 0;         // groups to pack into P: none where the panels are w itself (OwnPanels)
  int64_t M = 0, K = 0, N = 0, groups = 0, rows = 0, chunks = 0;
  // direct: the image as xp [B, Hp, Wp, C], or (xp null) each work item's zero-padded rows of it in the thread's
  // strip; a work item is `rows` output rows of one image
  bool direct = false, nchw = false;  // nchw: x is [B, C, H, W], transposed into the strips
  // pooled (PH x PW > 1): y is the max over each PH x PW block of the finished outputs [B, OH, OW, N] (OH, OW
  // whole multiples of PH, PW), [B, OH / PH, OW / PW, N]; a work item is then `rows` pooled rows
  int64_t PH = 1, PW = 1;
  const float* xp = nullptr;
  int64_t Hp = 0, Wp = 0;
  // 8-bit (jaxinfer_int8_conv_direct_f32): the image's bytes x8 (uint8 where x_unsigned) less zp, the int8 filter
  // w8 [N][K], and the sums requantized by `stage` into y8
  const uint8_t* x8 = nullptr;
  bool x_unsigned = false;
  int32_t zp = 0;
  const int8_t* w8 = nullptr;
  int8_t* y8 = nullptr;
  jaxinfer::OutputStage stage;
  std::atomic<int64_t> pack_next{0}, packed{0}, next{0}, done{0};
};

std::atomic<int> g_direct{1};  // jaxinfer_f32_conv_direct: 0 keeps every layer on patch rows (tests, timings)

// The packing loops' copies, as plain-target function objects that inline into patches.h's templates (those
// have no AVX-512 target: AVX-512 functions passed in stayed calls through a pointer per window row, and a third
// of a 3-channel stem's time went to packing). A fixed 64-byte memcpy (one window row of at most 16 values,
// ShortRows) compiles to vector moves.
struct Copy {
  void operator()(float* dst, const float* src, int64_t n) const { std::memcpy(dst, src, n * sizeof(float)); }
};
struct Wide {
  void operator()(float* dst, const float* src) const { std::memcpy(dst, src, 64); }
};

// The panels of group g (4, or fewer for the last group).
int Panels(const Job& j, int64_t g) {
  return static_cast<int>(std::min<int64_t>(kPanels, (j.N - g * kGroup + 15) / 16));
}

// Group g's panels: k's 16 np values, 16 np apart as PackGroup packs them, or N apart in w itself (OwnPanels).
const float* GroupPanels(const Job& j, int64_t g) {
  return j.packs ? j.P + g * j.K * kGroup : j.P + g * kGroup;
}

// Group g's panels: columns 64 g .. 64 g + 16 np of w as [K][16 np], zero past N.
void PackGroup(const Job& j, int64_t g) {
  const int64_t n0 = g * kGroup, cols = int64_t{Panels(j, g)} * 16, have = std::min(cols, j.N - n0);
  float* P = j.P + g * j.K * kGroup;
  for (int64_t k = 0; k < j.K; ++k) {
    if (j.w8)
      for (int64_t c = 0; c < have; ++c) P[k * cols + c] = static_cast<float>(j.w8[(n0 + c) * j.K + k]);
    else if (j.kn)
      std::memcpy(P + k * cols, j.w + k * j.N + n0, have * sizeof(float));
    else
      for (int64_t c = 0; c < have; ++c) P[k * cols + c] = j.w[(n0 + c) * j.K + k];
    std::fill(P + k * cols + have, P + (k + 1) * cols, 0.f);
  }
}

__attribute__((target("avx512f,avx512bw,avx512vl"), always_inline)) inline void Store(const Job& j, float* yr,
                                                                                     int64_t n, __m512 v) {
  const int64_t left = j.N - n;
  if (j.finish) {  // max(lo, v), min(hi, v): NaN sums stay NaN, as in XLA's clamp
    const __mmask16 live = left >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << std::max<int64_t>(left, 0)) - 1);
    v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(live, j.bias + n));
    v = _mm512_min_ps(_mm512_set1_ps(j.hi), _mm512_max_ps(_mm512_set1_ps(j.lo), v));
  }
  if (left >= 16)
    _mm512_storeu_ps(yr + n, v);
  else if (left > 0)
    _mm512_mask_storeu_ps(yr + n, static_cast<__mmask16>((1u << left) - 1), v);
}

// Row m's sums for columns n0 .. n0 + 16 nv (exact integers: the 8-bit mode) through the float stage into y8.
__attribute__((target("avx512f,avx512bw,avx512vl"), always_inline)) inline void Requant(const Job& j, int64_t m,
                                                                                       int64_t n0, int nv, __m512 v0,
                                                                                       __m512 v1, __m512 v2,
                                                                                       __m512 v3) {
  alignas(64) int32_t acc[64];
  _mm512_store_si512(acc, _mm512_cvtps_epi32(v0));
  if (nv > 1) _mm512_store_si512(acc + 16, _mm512_cvtps_epi32(v1));
  if (nv > 2) _mm512_store_si512(acc + 32, _mm512_cvtps_epi32(v2));
  if (nv > 3) _mm512_store_si512(acc + 48, _mm512_cvtps_epi32(v3));
  jaxinfer::RequantRowFloat(j.stage, acc - n0, n0, std::min(j.N, n0 + 16 * nv), j.y8 + m * j.N);
}

// Tile's row r (output row m0 + r) stored: plain, finished (bias, clamp), or requantized in the 8-bit mode.
#define JX_STORE(r)                                                             \
  if constexpr (MR > r) {                                                       \
    if (j.y8) {                                                                 \
      Requant(j, m0 + r, n0, NV, a##r##0, a##r##1, a##r##2, a##r##3);           \
    } else {                                                                    \
      float* yr = y0 + r * j.N;                                                 \
      Store(j, yr, n0, a##r##0);                                                \
      if constexpr (NV > 1) Store(j, yr, n0 + 16, a##r##1);                     \
      if constexpr (NV > 2) Store(j, yr, n0 + 32, a##r##2);                     \
      if constexpr (NV > 3) Store(j, yr, n0 + 48, a##r##3);                     \
    }                                                                           \
  }

// Rows m0 .. m0 + MR of y against columns n0 .. n0 + 16 NV from panels P (fma_tile.h's accumulators): row r's
// values are `runs` runs of L values, run i at xr + r K + i step (patch rows: one run of K values, K apart; the
// direct path: KH window rows of KW C values in the padded image, the pixels' windows SW C apart). Float rows are
// stored from y0 (row m0's N values; rows N apart), 8-bit ones as row m0 of y8.
template <int MR, int NV>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void Tile(const Job& j, const float* x0, int64_t K, int64_t runs,
                                                             int64_t L, int64_t step, const float* P, int64_t m0,
                                                             float* y0, int64_t n0) {
  static_assert(MR >= 1 && MR <= kMaxRows && NV >= 1 && NV <= 4 && MR * NV <= 16, "accumulators named below");
  JX_FMA_ROWS(JX_FMA_ACC)
  JX_FMA_ROWS(JX_FMA_ZERO)
  const float* pp = P;
  const int64_t pstride = j.packs ? NV * 16 : j.N;
  for (int64_t i = 0; i < runs; ++i) {
    const float* xr = x0 + i * step;
    for (int64_t k = 0; k < L; ++k, pp += pstride) {
      const __m512 b0 = _mm512_loadu_ps(pp);  // unaligned: the panels may be w itself (OwnPanels)
      const __m512 b1 = NV > 1 ? _mm512_loadu_ps(pp + 16) : b0;
      const __m512 b2 = NV > 2 ? _mm512_loadu_ps(pp + 32) : b0;
      const __m512 b3 = NV > 3 ? _mm512_loadu_ps(pp + 48) : b0;
      JX_FMA_ROWS(JX_FMA_STEP)
    }
  }
  JX_FMA_ROWS(JX_STORE)
}
#undef JX_STORE

// Patch rows m0 .. m0 + MR at xr, K apart.
template <int MR, int NV>
void Block(const Job& j, const float* xr, const float* P, int64_t m0, int64_t n0) {
  Tile<MR, NV>(j, xr, j.K, 1, j.K, 0, P, m0, j.y ? j.y + m0 * j.N : nullptr, n0);
}

// Output pixels m0 .. m0 + MR, side by side in one output row, the first one's window starting at x0 in xp and
// its float outputs going to y0.
template <int MR, int NV>
void BlockDirect(const Job& j, const float* x0, const float* P, int64_t m0, float* y0, int64_t n0) {
  const auto& p = j.p;
  Tile<MR, NV>(j, x0, p.SW * p.C, p.KH, p.KW * p.C, p.DH * j.Wp * p.C, P, m0, y0, n0);
}

// Rows m0 .. m1 (patch rows at xr) against group g's panels, MR rows at a time: 4 with 3-4 panels, 8 with 1-2
// (with four accumulators, one per row, a 16-column layer waited on each FMA's latency).
template <int NP>
void GroupRows(const Job& j, const float* xr, int64_t m0, int64_t m1, int64_t g) {
  constexpr int MR = NP <= 2 ? kMaxRows : kRows;
  const float* P = GroupPanels(j, g);
  const int64_t n0 = g * kGroup;
  int64_t m = m0;
  for (; m + MR <= m1; m += MR, xr += MR * j.K) Block<MR, NP>(j, xr, P, m, n0);
  if (MR > kRows && m + kRows <= m1) {  // 4 of the last 5-7 rows
    Block<kRows, NP>(j, xr, P, m, n0);
    m += kRows, xr += kRows * j.K;
  }
  static_assert(kRows == 4 && kMaxRows <= 2 * kRows, "the remainder cases below");
  switch (m1 - m) {
    case 3: Block<3, NP>(j, xr, P, m, n0); break;
    case 2: Block<2, NP>(j, xr, P, m, n0); break;
    case 1: Block<1, NP>(j, xr, P, m, n0); break;
    default: break;
  }
}

// out [n, 3] = the n values of a, b and c side by side (an RGB image row, NCHW to NHWC), 16 pixels a step: the
// scalar loop had been half of the time a 3-channel stem spent copying its padded image (cnn b8, session 29).
__attribute__((target("avx512f"))) void Interleave3(const float* a, const float* b, const float* c, float* out,
                                                   int64_t n) {
  alignas(64) int32_t first[3][16], second[3][16];  // out lane l of vector k: pixel (16 k + l) / 3, channel % 3
  for (int k = 0; k < 3; ++k)
    for (int l = 0; l < 16; ++l) {
      const int pixel = (16 * k + l) / 3, channel = (16 * k + l) % 3;
      first[k][l] = channel == 1 ? 16 + pixel : pixel;  // a or b
      second[k][l] = channel == 2 ? 16 + pixel : l;     // the a / b mix, or c
    }
  int64_t w = 0;
  for (; w + 16 <= n; w += 16) {
    const __m512 va = _mm512_loadu_ps(a + w), vb = _mm512_loadu_ps(b + w), vc = _mm512_loadu_ps(c + w);
    for (int k = 0; k < 3; ++k) {
      const __m512 ab = _mm512_permutex2var_ps(va, _mm512_load_si512(first[k]), vb);
      _mm512_storeu_ps(out + 3 * w + 16 * k, _mm512_permutex2var_ps(ab, _mm512_load_si512(second[k]), vc));
    }
  }
  for (; w < n; ++w) out[3 * w] = a[w], out[3 * w + 1] = b[w], out[3 * w + 2] = c[w];
}

// Padded row hp of image b (Wp C values at dst): zeros where the window reaches past the image.
void PadRow(const Job& j, int64_t b, int64_t hp, float* dst) {
  const auto& p = j.p;
  const int64_t line = j.Wp * p.C, h = hp - p.PT;
  if (h < 0 || h >= p.H) {
    std::fill_n(dst, line, 0.f);
    return;
  }
  std::fill_n(dst, p.PL * p.C, 0.f);
  if (j.x8) {
    const uint8_t* src = j.x8 + (b * p.H + h) * p.W * p.C;
    float* out = dst + p.PL * p.C;
    for (int64_t i = 0; i < p.W * p.C; ++i)
      out[i] = static_cast<float>((j.x_unsigned ? int32_t{src[i]} : int32_t{static_cast<int8_t>(src[i])}) - j.zp);
  } else if (j.nchw) {
    const float* src = p.x + b * p.C * p.H * p.W + h * p.W;
    if (p.C == 3) {
      Interleave3(src, src + p.H * p.W, src + 2 * p.H * p.W, dst + p.PL * 3, p.W);
    } else {
      for (int64_t c = 0; c < p.C; ++c, src += p.H * p.W)
        for (int64_t w = 0; w < p.W; ++w) dst[(p.PL + w) * p.C + c] = src[w];
    }
  } else {
    std::memcpy(dst + p.PL * p.C, p.x + (b * p.H + h) * p.W * p.C, p.W * p.C * sizeof(float));
  }
  std::fill(dst + (p.PL + p.W) * p.C, dst + line, 0.f);
}

// Output row (b, oh), its windows' first padded row at xr, against group g's panels, MR pixels at a time as in
// GroupRows; its float outputs (OW N values) go to yrow.
template <int NP>
void GroupRowsDirect(const Job& j, int64_t b, int64_t oh, int64_t g, const float* xr, float* yrow) {
  constexpr int MR = NP <= 2 ? kMaxRows : kRows;
  const auto& p = j.p;
  const float* P = GroupPanels(j, g);
  const int64_t n0 = g * kGroup, step = p.SW * p.C, m1 = (b * p.OH + oh + 1) * p.OW, first = m1 - p.OW;
  const auto at = [&](int64_t m) { return yrow ? yrow + (m - first) * j.N : nullptr; };
  int64_t m = first;
  for (; m + MR <= m1; m += MR, xr += MR * step) BlockDirect<MR, NP>(j, xr, P, m, at(m), n0);
  if (MR > kRows && m + kRows <= m1) {
    BlockDirect<kRows, NP>(j, xr, P, m, at(m), n0);
    m += kRows, xr += kRows * step;
  }
  switch (m1 - m) {
    case 3: BlockDirect<3, NP>(j, xr, P, m, at(m), n0); break;
    case 2: BlockDirect<2, NP>(j, xr, P, m, at(m), n0); break;
    case 1: BlockDirect<1, NP>(j, xr, P, m, at(m), n0); break;
    default: break;
  }
}

// f(group, panels) for every panel group of j, panels (1-4) as a compile-time constant.
template <typename F>
void EachGroup(const Job& j, F f) {
  for (int64_t g = 0; g < j.groups; ++g) {
    switch (Panels(j, g)) {
      case 4: f(g, std::integral_constant<int, 4>{}); break;
      case 3: f(g, std::integral_constant<int, 3>{}); break;
      case 2: f(g, std::integral_constant<int, 2>{}); break;
      default: f(g, std::integral_constant<int, 1>{}); break;
    }
  }
}

// Output row (b, oh) against every panel group into yrow.
void RowDirect(const Job& j, int64_t b, int64_t oh, const float* xrow, float* yrow) {
  EachGroup(j, [&](int64_t g, auto np) { GroupRowsDirect<decltype(np)::value>(j, b, oh, g, xrow, yrow); });
}

// Pooled row (b, r): the max over each PH x PW block of the finished rows `rows` (PH rows of OW N values). A NaN
// anywhere in a block gives NaN, as XLA's max does (vmaxps alone would drop a NaN in its first operand).
__attribute__((target("avx512f,avx512bw,avx512vl"))) void PoolRow(const Job& j, const float* rows, int64_t b,
                                                                int64_t r) {
  const auto& p = j.p;
  const int64_t POW = p.OW / j.PW, line = p.OW * j.N;
  float* out = j.y + (b * (p.OH / j.PH) + r) * POW * j.N;
  for (int64_t q = 0; q < POW; ++q)
    for (int64_t n = 0; n < j.N; n += 16) {
      const __mmask16 live = j.N - n >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (j.N - n)) - 1);
      __m512 best = _mm512_maskz_loadu_ps(live, rows + q * j.PW * j.N + n);
      for (int64_t i = 0; i < j.PH; ++i)
        for (int64_t t = i == 0 ? 1 : 0; t < j.PW; ++t) {
          const __m512 v = _mm512_maskz_loadu_ps(live, rows + i * line + (q * j.PW + t) * j.N + n);
          best = _mm512_mask_mov_ps(_mm512_max_ps(v, best), _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), v);
        }
      _mm512_mask_storeu_ps(out + q * j.N + n, live, best);
    }
}

// Scratch reused by this thread across calls (fresh buffers cost page faults every call), 64-byte aligned.
float* Scratch(std::vector<float>& v, size_t n) {
  if (v.size() < n + 16) v.resize(n + 16);
  return reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(v.data()) + 63) & ~uintptr_t{63});
}

thread_local std::vector<float> t_rows, t_panels, t_strip, t_pooled;

// Padded rows h0 .. h0 + count of image b, in this thread's strip.
const float* Strip(const Job& j, int64_t b, int64_t h0, int64_t count) {
  const int64_t line = j.Wp * j.p.C;
  float* dst = Scratch(t_strip, count * line);
  for (int64_t i = 0; i < count; ++i) PadRow(j, b, h0 + i, dst + i * line);
  return dst;
}

__attribute__((target("avx512f"))) void Work(Job& j) {
  for (int64_t i; (i = j.pack_next.fetch_add(1, std::memory_order_relaxed)) < j.packs;) {
    PackGroup(j, i);
    j.packed.fetch_add(1, std::memory_order_release);
  }
  while (j.packed.load(std::memory_order_acquire) < j.packs) _mm_pause();  // every item reads every panel
  if (j.direct) {
    const auto& p = j.p;
    const bool pooled = j.PH * j.PW > 1;
    const int64_t per_image = p.OH / j.PH, blocks = (per_image + j.rows - 1) / j.rows, line = j.Wp * p.C;
    float* rows = pooled ? Scratch(t_pooled, j.PH * p.OW * j.N) : nullptr;
    for (int64_t c; (c = j.next.fetch_add(1, std::memory_order_relaxed)) < j.chunks;) {
      // rows r0 .. r1 (pooled rows when pooled) of image b; their windows read padded rows h0 ..
      const int64_t b = c / blocks, r0 = c % blocks * j.rows, r1 = std::min(per_image, r0 + j.rows);
      const int64_t h0 = r0 * j.PH * p.SH, h1 = (r1 * j.PH - 1) * p.SH + (p.KH - 1) * p.DH + 1;
      const float* x0 = j.xp ? j.xp + (b * j.Hp + h0) * line : Strip(j, b, h0, h1 - h0);
      const auto xrow = [&](int64_t oh) { return x0 + (oh * p.SH - h0) * line; };
      for (int64_t r = r0; r < r1; ++r) {
        if (!pooled) {
          RowDirect(j, b, r, xrow(r), j.y ? j.y + (b * p.OH + r) * p.OW * j.N : nullptr);
          continue;
        }
        for (int64_t i = 0; i < j.PH; ++i) RowDirect(j, b, r * j.PH + i, xrow(r * j.PH + i), rows + i * p.OW * j.N);
        PoolRow(j, rows, b, r);
      }
      j.done.fetch_add(1, std::memory_order_release);
    }
    return;
  }
  float* xr = nullptr;
  for (int64_t c; (c = j.next.fetch_add(1, std::memory_order_relaxed)) < j.chunks;) {
    if (!xr) xr = Scratch(t_rows, j.rows * j.K + 16);  // ShortRows spills up to 64 bytes past the last row
    const int64_t m0 = c * j.rows, m1 = std::min(j.M, m0 + j.rows);
    if (jaxinfer::ShortWindow(j.p))
      jaxinfer::ShortRows(j.p, m0, m1, xr, j.K, 0.f, Copy{}, Wide{});
    else
      jaxinfer::PatchRows(j.p, m0, m1, xr, j.K, 0.f, Copy{});
    EachGroup(j, [&](int64_t g, auto np) { GroupRows<decltype(np)::value>(j, xr, m0, m1, g); });
    j.done.fetch_add(1, std::memory_order_release);
  }
}

// Whether w is read in place as its panels: a [K, N] float filter (kn) of whole panels (N a multiple of 16), each
// group's values of one k 16 np apart in a row of N. Packing a 3x3 32-channel layer's 288 rows had cost ~7 us a call
// (the cnn fixture, session 29), a [64, 256] MatMul weight's more than the kernel gained over XLA's dot.
bool OwnPanels(const Job& j) { return j.kn && !j.w8 && j.N % 16 == 0; }

// Splits j (bound by a handler, M, K, N > 0) into work items and runs them on the calling thread and helpers.
ffi::Error Launch(ffi::ThreadPool& pool, const std::shared_ptr<Job>& j) {
  int64_t threads = std::max<int64_t>(1, pool.num_threads());
  if (j->M * j->K * j->N < kSerialMacs) threads = 1;
  j->groups = (j->N + kGroup - 1) / kGroup;
  if (OwnPanels(*j)) {
    j->P = const_cast<float*>(j->w);  // read only
  } else {
    j->P = Scratch(t_panels, j->groups * kGroup * j->K);
    j->packs = j->groups;
  }
  const auto& p = j->p;
  j->direct = j->nchw || j->x8 || j->PH * j->PW > 1 || (p.DW == 1 && g_direct.load(std::memory_order_relaxed) != 0);
  if (j->direct) {
    // the padded image holds every window: rows up to (OH - 1) SH + (KH - 1) DH, columns up to (OW - 1) SW + KW - 1
    j->Hp = std::max(p.PT + p.H, (p.OH - 1) * p.SH + (p.KH - 1) * p.DH + 1);
    j->Wp = std::max(p.PL + p.W, (p.OW - 1) * p.SW + p.KW);
    if (!j->nchw && !j->x8 && p.PT == 0 && p.PL == 0 && j->Hp == p.H && j->Wp == p.W) j->xp = p.x;  // else strips
    // output rows (pooled rows when pooled) of one image per item: about four items per thread when there are
    // rows enough
    const int64_t per_image = p.OH / j->PH, out_rows = p.B * per_image;
    j->rows = std::max<int64_t>(1, std::min(per_image, (out_rows + threads * 4 - 1) / (threads * 4)));
    j->chunks = p.B * ((per_image + j->rows - 1) / j->rows);
    threads = std::min(threads, std::max(j->chunks, j->packs));
    jaxinfer::ShareWith(pool, j->M * j->K * j->N >= kOfferMacs, j, Work, threads, j->chunks);
    return ffi::Error::Success();
  }
  // Rows per item: at most kRowBytes of patch rows, at least 16 (whole 4-row blocks), and about four
  // items per thread when there are rows enough.
  const int64_t fit = std::max<int64_t>(16, kRowBytes / (4 * j->K));
  const int64_t share = (j->M + threads * 4 - 1) / (threads * 4);
  j->rows = (std::max<int64_t>(kMaxRows, std::min(fit, share)) + kMaxRows - 1) / kMaxRows * kMaxRows;
  j->chunks = (j->M + j->rows - 1) / j->rows;
  threads = std::min(threads, std::max(j->chunks, j->packs));
  jaxinfer::ShareWith(pool, j->M * j->K * j->N >= kOfferMacs, j, Work, threads, j->chunks);
  return ffi::Error::Success();
}

// With finish = 1, y = min(hi, max(lo, sums + bias [N])): a TFLite layer's bias and fused activation in the
// same pass (XLA ran them as one more fusion per layer); with 0 the bias operand is not read.
ffi::Error F32Conv(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> bias,
                   ffi::ResultBuffer<ffi::F32> y, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t dh,
                   int64_t dw, int64_t pt, int64_t pl, int64_t kn, int64_t finish, float lo, float hi, int64_t nchw,
                   int64_t ph, int64_t pw) {
  if (!__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("avx512bw") || !__builtin_cpu_supports("avx512vl"))
    return ffi::Error::InvalidArgument("jaxinfer_f32_conv: this CPU lacks AVX-512 (F, BW, VL)");
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  auto j = std::make_shared<Job>();
  j->kn = kn != 0;
  j->nchw = nchw != 0;
  const int64_t nhwc[4] = {xd.size() == 4 ? xd[0] : 0, xd.size() == 4 ? xd[2] : 0, xd.size() == 4 ? xd[3] : 0,
                           xd.size() == 4 ? xd[1] : 0};
  const auto dims = j->nchw ? ffi::Span<const int64_t>(nhwc, xd.size() == 4 ? 4 : 0) : xd;
  // pooled, the convolution's rows and columns that the pool reads: PH, PW times y's
  const int64_t conv[4] = {yd.size() == 4 ? yd[0] : 0, yd.size() == 4 ? yd[1] * ph : 0,
                           yd.size() == 4 ? yd[2] * pw : 0, yd.size() == 4 ? yd[3] : 0};
  if (wd.size() != 2 || ph < 1 || pw < 1 || ((j->nchw || ph * pw > 1) && dw != 1) ||
      !jaxinfer::Geometry(x.typed_data(), dims, ffi::Span<const int64_t>(conv, yd.size() == 4 ? 4 : 0),
                          wd[j->kn ? 0 : 1], wd[j->kn ? 1 : 0], kh, kw, sh, sw, dh, dw, pt, pl, j->p))
    return ffi::Error::InvalidArgument(
        "jaxinfer_f32_conv: expected x [B, H, W, C] (or [B, C, H, W] with nchw, then dw = 1), w [N, KH * KW * C] "
        "(or [KH * KW * C, N] with kn), y [B, OH / ph, OW / pw, N] with ph, pw >= 1 (dw = 1 where ph pw > 1)");
  j->PH = ph, j->PW = pw;
  j->finish = finish != 0;
  if (j->finish && (bias.dimensions().size() != 1 || bias.dimensions()[0] != yd[3] || !(lo <= hi)))
    return ffi::Error::InvalidArgument("jaxinfer_f32_conv: expected bias [N] and lo <= hi with finish");
  j->bias = bias.typed_data(), j->lo = lo, j->hi = hi;
  j->w = w.typed_data();
  j->y = y->typed_data();
  j->M = conv[0] * conv[1] * conv[2];
  j->K = wd[j->kn ? 0 : 1];
  j->N = wd[j->kn ? 1 : 0];
  if (j->M == 0 || j->N == 0) return ffi::Error::Success();
  if (j->K == 0) {  // no input channels: every sum is empty (and so is every pooled block's max)
    j->M = yd[0] * yd[1] * yd[2];
    std::fill(j->y, j->y + j->M * j->N, 0.f);
    if (j->finish)
      for (int64_t m = 0; m < j->M; ++m)
        for (int64_t n = 0; n < j->N; ++n) {
          const float v = 0.f + j->bias[n];
          j->y[m * j->N + n] = v != v ? v : std::min(hi, std::max(lo, v));
        }
    return ffi::Error::Success();
  }
  return Launch(pool, j);
}

// An 8-bit convolution requantized as jaxinfer_int8_conv_requant_f32 does (same operands and attributes; zp is the
// image's own zero point), summed in float32 on the direct path (see the top of this file); K 255 128 < 2^24 (checked)
// keeps every sum an exact integer.
ffi::Error Int8ConvDirectF32(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::S32> zp, ffi::Buffer<ffi::S8> w,
                             ffi::Buffer<ffi::S32> bias, ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::S32> ozp,
                             ffi::Result<ffi::AnyBuffer> y, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t dh,
                             int64_t dw, int64_t pt, int64_t pl, bool relu) {
  const char* target = "jaxinfer_int8_conv_direct_f32";
  bool x8 = false, y8 = false;
  const bool x_unsigned = jaxinfer::Unsigned8(x.element_type(), x8);
  const bool y_unsigned = jaxinfer::Unsigned8(y->element_type(), y8);
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  auto j = std::make_shared<Job>();
  if (!x8 || !y8 || wd.size() != 2 || zp.element_count() != 1 || dw != 1 ||
      !jaxinfer::Geometry(static_cast<const float*>(nullptr), xd, yd, wd[1], wd[0], kh, kw, sh, sw, dh, dw, pt, pl,
                          j->p) ||
      wd[1] == 0 || wd[1] * 255 * 128 >= (int64_t{1} << 24))
    return ffi::Error::InvalidArgument(std::string(target) +
                                       ": expected 8-bit x [B, H, W, C] and y [B, OH, OW, N], zp [1], w [N, KH KW C] "
                                       "with 0 < KH KW C and KH KW C 255 128 < 2^24, dw = 1");
  if (ffi::Error e = jaxinfer::BindFloatStage(target, bias, scale, ozp, wd[0], y_unsigned, relu,
                                              j->stage);
      e.failure())
    return e;
  j->x8 = static_cast<const uint8_t*>(x.untyped_data());
  j->x_unsigned = x_unsigned;
  j->zp = zp.typed_data()[0];
  j->w8 = w.typed_data();
  j->y8 = static_cast<int8_t*>(y->untyped_data());
  j->M = yd[0] * yd[1] * yd[2];
  j->K = wd[1];
  j->N = wd[0];
  if (j->M == 0 || j->N == 0) return ffi::Error::Success();
  return Launch(pool, j);
}

}  // namespace

// Whether large jobs of every kernel are offered to XLA's pool too (1, the default; helpers.h ShareWith) or go to
// our helpers only (0); a negative `want` only asks. For timings.
extern "C" int jaxinfer_share_xla(int want) {
  if (want >= 0) jaxinfer::g_share_xla.store(want != 0, std::memory_order_relaxed);
  return jaxinfer::g_share_xla.load(std::memory_order_relaxed);
}

// Whether undilated layers read the image directly (1, the default) or take patch rows (0); a negative `want`
// only asks. Later calls take it (no recompile): how the tests cover both and how to time them.
extern "C" int jaxinfer_f32_conv_direct(int want) {
  if (want >= 0) g_direct.store(want != 0, std::memory_order_relaxed);
  return g_direct.load(std::memory_order_relaxed);
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinferF32Conv, F32Conv,
                              jaxinfer::WithWindowAttrs(ffi::Ffi::Bind()
                                                            .Ctx<ffi::ThreadPool>()
                                                            .Arg<ffi::Buffer<ffi::F32>>()
                                                            .Arg<ffi::Buffer<ffi::F32>>()
                                                            .Arg<ffi::Buffer<ffi::F32>>()
                                                            .Ret<ffi::Buffer<ffi::F32>>())
                                  .Attr<int64_t>("kn")
                                  .Attr<int64_t>("finish")
                                  .Attr<float>("lo")
                                  .Attr<float>("hi")
                                  .Attr<int64_t>("nchw")
                                  .Attr<int64_t>("ph")
                                  .Attr<int64_t>("pw"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinferInt8ConvDirectF32, Int8ConvDirectF32, jaxinfer::FloatStagedWindowBinding());
