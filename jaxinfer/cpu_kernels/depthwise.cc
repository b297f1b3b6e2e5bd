// jaxinfer's depthwise convolutions for XLA CPU, registered as the FFI targets "jaxinfer_int8_depthwise" and
// "jaxinfer_f32_depthwise": y [B, OH, OW, C] = per channel, the sum over the window of x times that channel's
// taps, then the layer's finish. x [B, H, W, C] (NHWC), taps [KH KW, C] (a TFLite depthwise filter [1, KH, KW,
// C] as it is stored), strides, dilations and pt / pl rows / columns of padding before the image (patches.h's
// window attributes).
//   int8: x less its zero point zp [1] (the padding holds it, so padding adds nothing), sums in int32 (exact:
//     |x - zp| <= 255, |tap| <= 128, at most 2^16 taps), plus an int32 bias, through the output stage
//     (requant.h) to int8.
//   float32: zero padding, float32 sums of the taps in window order, plus the bias, clamped to [lo, hi] (a
//     fused activation: RELU, RELU6, RELU_N1_TO_1, or none with infinite bounds).
// XLA ran a depthwise layer as a fusion of the KH KW shifted slices (conv_lowering.depthwise_taps), after a
// fusion that finished the previous layer and padded its output; the int8 conv + depthwise fixture spent
// ~0.2 of its ~0.4 ms in those fusions at batch 1 (session 22).
//
// How (AVX-512): 16 channels at a time. Columns whose window lies inside the image go kBlock at a time, their
// sums held in registers (int8: x * tap from a bias less zp times the taps, three instructions per 16
// products); border columns take only their taps inside the image (int8: each x less the zero point). Rows
// of output pixels are split into work items that XLA's intra-op pool and the calling thread take from a
// shared counter, once there are enough multiply-adds to pay for a second thread.
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "helpers.h"
#include "patches.h"
#include "requant.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Under this many multiply-adds one thread is quicker (1M until the helpers of helpers.h: TFLite conv_int8 b8
// ~625 -> ~555 us with the 16 x 16 layers on two threads, session 23).
constexpr int64_t kSerialMacs = 1 << 16;
constexpr int64_t kOfferMacs = 1 << 21;  // from this many, the job is offered to XLA's pool too (ShareWith)
constexpr int64_t kMaxTaps = 1 << 16;     // int32 sums of at most this many products cannot wrap
constexpr int64_t kHeldTaps = 49;         // windows up to 7 x 7 keep their loaded taps at hand (larger: read again)
constexpr int kBlock = 8;                 // output columns summed at once in registers

#define JX_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))

// int8 values: widened to int32, less the zero point, multiplied (vpmulld) and added; the output stage.
struct Int8 {
  using T = int8_t;
  using V = __m512i;
  static constexpr bool kZeroPoint = true;
  struct Finish {
    jaxinfer::OutputStage s;
  };
  struct Block {  // one block of 16 channels' finish
    jaxinfer::Stage16 t;
    __m512i ozp, lo, hi;
  };
  static JX_AVX512 V Load(const T* p, __mmask16 live, bool full) {
    return _mm512_cvtepi8_epi32(full ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(p))
                                     : _mm_maskz_loadu_epi8(live, p));
  }
  static JX_AVX512 V Zero() { return _mm512_setzero_si512(); }
  static JX_AVX512 V Set(T v) { return _mm512_set1_epi32(v); }
  static JX_AVX512 V Add(V a, V b) { return _mm512_add_epi32(a, b); }
  static JX_AVX512 V Sub(V a, V b) { return _mm512_sub_epi32(a, b); }
  static JX_AVX512 V MulAdd(V acc, V x, V t) { return _mm512_add_epi32(acc, _mm512_mullo_epi32(x, t)); }
  static JX_AVX512 Block Start(const Finish& f, int64_t c, __mmask16 live) {
    return {jaxinfer::LoadStage16(f.s, c, live), _mm512_set1_epi32(f.s.zero_point), _mm512_set1_epi32(f.s.lo),
            _mm512_set1_epi32(f.s.hi)};
  }
  // The sums' start: the bias; for a window inside the image, less zp times its taps (x is then not offset).
  static JX_AVX512 V Border(const Block& b) { return b.t.bias; }
  static JX_AVX512 V Inside(const Block& b, V zp, V tap_sum) { return _mm512_sub_epi32(b.t.bias, _mm512_mullo_epi32(zp, tap_sum)); }
  static JX_AVX512 void Store(const Block& b, V acc, T* y, __mmask16 live) {
    _mm_mask_storeu_epi8(y, live, jaxinfer::Requant16(acc, b.t.mult, b.t.left, b.t.right, b.t.away, b.ozp, b.lo, b.hi));
  }
};

// float32 values: fused multiply-adds from zero, then the bias and the clamp.
struct F32 {
  using T = float;
  using V = __m512;
  static constexpr bool kZeroPoint = false;
  struct Finish {
    const float* bias = nullptr;
    float lo = 0, hi = 0;
  };
  struct Block {
    __m512 bias, lo, hi;
  };
  static JX_AVX512 V Load(const T* p, __mmask16 live, bool full) {
    return full ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(live, p);
  }
  static JX_AVX512 V Zero() { return _mm512_setzero_ps(); }
  static JX_AVX512 V Set(T v) { return _mm512_set1_ps(v); }
  static JX_AVX512 V Add(V a, V b) { return _mm512_add_ps(a, b); }
  static JX_AVX512 V Sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static JX_AVX512 V MulAdd(V acc, V x, V t) { return _mm512_fmadd_ps(x, t, acc); }
  static JX_AVX512 Block Start(const Finish& f, int64_t c, __mmask16 live) {
    return {f.bias ? _mm512_maskz_loadu_ps(live, f.bias + c) : _mm512_setzero_ps(), _mm512_set1_ps(f.lo),
            _mm512_set1_ps(f.hi)};
  }
  static JX_AVX512 V Border(const Block&) { return _mm512_setzero_ps(); }
  static JX_AVX512 V Inside(const Block&, V, V) { return _mm512_setzero_ps(); }
  static JX_AVX512 void Store(const Block& b, V acc, T* y, __mmask16 live) {
    // max(lo, v) and min(hi, v) return v where it is NaN (the second operand), as XLA's clamp keeps NaN.
    _mm512_mask_storeu_ps(y, live, _mm512_min_ps(b.hi, _mm512_max_ps(b.lo, _mm512_add_ps(acc, b.bias))));
  }
};

template <typename Tr>
struct Job {
  using T = typename Tr::T;
  jaxinfer::Patches<T> p;  // the geometry (p.x the image, p.pad the zero point)
  const T* taps = nullptr;
  typename Tr::Finish finish;
  T* y = nullptr;
  int64_t rows = 0, rows_per_item = 0, items = 0;  // rows: B OH output rows
  std::atomic<int64_t> next{0}, done{0};
};

// The output columns [first, last) whose whole window row lies inside the image (w = ow SW + k DW - PL in
// [0, W) for every k); the others are border columns.
template <typename T>
inline void Inside(const jaxinfer::Patches<T>& p, int64_t& first, int64_t& last) {
  first = std::min(p.OW, (p.PL + p.SW - 1) / p.SW);
  const int64_t top = p.W - 1 - (p.KW - 1) * p.DW + p.PL;  // the largest ow SW allowed
  last = top < 0 ? 0 : std::min(p.OW, top / p.SW + 1);
  if (last < first) last = first;
}

// Where one output row's 16 channels come from: window rows i0 .. i1 lie inside the image.
template <typename Tr>
struct Lane {
  const Job<Tr>& j;
  const typename Tr::T* image;
  typename Tr::T* yr;
  int64_t c, h0, i0, i1;
  __mmask16 live;
  typename Tr::Block block;
};

// `kCols` columns from ow whose windows lie inside the image, their sums in registers.
template <typename Tr, int kCols, bool kFull>
JX_AVX512 inline void InsideColumns(const Lane<Tr>& l, const typename Tr::V* held, typename Tr::V start, int64_t ow) {
  const auto& p = l.j.p;
  const int64_t C = p.C, step = p.SW * C;
  typename Tr::V acc[kCols];
#pragma GCC unroll 8
  for (int q = 0; q < kCols; ++q) acc[q] = start;
  for (int64_t i = l.i0; i < l.i1; ++i) {
    const auto* line = l.image + ((l.h0 + i * p.DH) * p.W + ow * p.SW - p.PL) * C + l.c;
    for (int64_t k = 0; k < p.KW; ++k) {
      const int64_t tap = i * p.KW + k;
      const auto tv = held ? held[tap] : Tr::Load(l.j.taps + tap * C + l.c, l.live, kFull);
      const auto* px = line + k * p.DW * C;
#pragma GCC unroll 8
      for (int q = 0; q < kCols; ++q) acc[q] = Tr::MulAdd(acc[q], Tr::Load(px + q * step, l.live, kFull), tv);
    }
  }
#pragma GCC unroll 8
  for (int q = 0; q < kCols; ++q) Tr::Store(l.block, acc[q], l.yr + (ow + q) * C + l.c, l.live);
}

// One border column ow: only the window's taps inside the image (int8: each x less the zero point).
template <typename Tr, bool kFull>
JX_AVX512 inline void BorderColumn(const Lane<Tr>& l, typename Tr::V zp, int64_t ow) {
  const auto& p = l.j.p;
  const int64_t C = p.C, w0 = ow * p.SW - p.PL;
  auto acc = Tr::Border(l.block);
  for (int64_t i = l.i0; i < l.i1; ++i) {
    const auto* line = l.image + (l.h0 + i * p.DH) * p.W * C + l.c;
    for (int64_t k = 0; k < p.KW; ++k) {
      const int64_t w = w0 + k * p.DW;
      if (w < 0 || w >= p.W) continue;
      auto xv = Tr::Load(line + w * C, l.live, kFull);
      if constexpr (Tr::kZeroPoint) xv = Tr::Sub(xv, zp);
      acc = Tr::MulAdd(acc, xv, Tr::Load(l.j.taps + (i * p.KW + k) * C + l.c, l.live, kFull));
    }
  }
  Tr::Store(l.block, acc, l.yr + ow * C + l.c, l.live);
}

// Output row r (image r / OH, row r % OH), channels c .. c + 16, every column.
template <typename Tr, bool kFull>
JX_AVX512 void Channels(const Job<Tr>& j, int64_t r, int64_t c) {
  const auto& p = j.p;
  const int64_t b = r / p.OH, oh = r % p.OH, C = p.C, h0 = oh * p.SH - p.PT;
  const __mmask16 live = kFull ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (C - c)) - 1);
  int64_t i0 = 0, i1 = p.KH;
  while (i0 < i1 && h0 + i0 * p.DH < 0) ++i0;
  while (i1 > i0 && h0 + (i1 - 1) * p.DH >= p.H) --i1;
  const Lane<Tr> l{j, p.x + b * p.H * p.W * C, j.y + r * p.OW * C, c, h0, i0, i1, live, Tr::Start(j.finish, c, live)};
  const auto zp = Tr::Set(p.pad);
  typename Tr::V held_taps[kHeldTaps];
  const bool hold = p.KH * p.KW <= kHeldTaps;
  auto tap_sum = Tr::Zero();
  for (int64_t i = i0; i < i1; ++i)
    for (int64_t k = 0; k < p.KW; ++k) {
      const auto tv = Tr::Load(j.taps + (i * p.KW + k) * C + c, live, kFull);
      if (hold) held_taps[i * p.KW + k] = tv;
      tap_sum = Tr::Add(tap_sum, tv);
    }
  const auto* held = hold ? held_taps : nullptr;
  const auto start = Tr::Inside(l.block, zp, tap_sum);
  int64_t first, last;
  Inside(p, first, last);
  for (int64_t ow = 0; ow < first; ++ow) BorderColumn<Tr, kFull>(l, zp, ow);
  int64_t ow = first;
  for (; ow + kBlock <= last; ow += kBlock) InsideColumns<Tr, kBlock, kFull>(l, held, start, ow);
  for (; ow < last; ++ow) InsideColumns<Tr, 1, kFull>(l, held, start, ow);
  for (ow = last; ow < p.OW; ++ow) BorderColumn<Tr, kFull>(l, zp, ow);
}

template <typename Tr>
void Work(Job<Tr>& j) {
  for (int64_t item; (item = j.next.fetch_add(1, std::memory_order_relaxed)) < j.items;) {
    const int64_t r1 = std::min(j.rows, (item + 1) * j.rows_per_item);
    for (int64_t r = item * j.rows_per_item; r < r1; ++r) {
      int64_t c = 0;
      for (; c + 16 <= j.p.C; c += 16) Channels<Tr, true>(j, r, c);
      if (c < j.p.C) Channels<Tr, false>(j, r, c);
    }
    j.done.fetch_add(1, std::memory_order_release);
  }
}

// Binds the geometry of x [B, H, W, C], taps [KH KW, C] and y [B, OH, OW, C] into j; false where they do not fit.
template <typename Tr, typename Dims>
bool Bind(Job<Tr>& j, const typename Tr::T* x, const Dims& xd, const Dims& td, const Dims& yd, int64_t kh,
          int64_t kw, int64_t sh, int64_t sw, int64_t dh, int64_t dw, int64_t pt, int64_t pl) {
  return td.size() == 2 && xd.size() == 4 && td[0] == kh * kw && td[1] == xd[3] &&
         jaxinfer::Geometry(x, xd, yd, kh * kw * xd[3], xd[3], kh, kw, sh, sw, dh, dw, pt, pl, j.p);
}

// Runs j's rows (B OH, set by the caller) on the calling thread and, past kSerialMacs multiply-adds, XLA's pool.
template <typename Tr>
void Run(ffi::ThreadPool& pool, std::shared_ptr<Job<Tr>> j) {
  const auto& p = j->p;
  if (j->rows == 0 || p.OW == 0 || p.C == 0) return;
  int64_t threads = std::max<int64_t>(1, pool.num_threads());
  if (j->rows * p.OW * p.C * p.KH * p.KW < kSerialMacs) threads = 1;
  j->rows_per_item = std::max<int64_t>(1, (j->rows + threads * 4 - 1) / (threads * 4));
  j->items = (j->rows + j->rows_per_item - 1) / j->rows_per_item;
  threads = std::min(threads, j->items);
  jaxinfer::ShareWith(pool, j->rows * p.OW * p.C * p.KH * p.KW >= kOfferMacs, j, Work<Tr>, threads, j->items);
}

ffi::Error Int8Depthwise(ffi::ThreadPool pool, ffi::Buffer<ffi::S8> x, ffi::Buffer<ffi::S32> zp,
                         ffi::Buffer<ffi::S8> taps, ffi::Buffer<ffi::S32> bias, ffi::Buffer<ffi::S32> stage,
                         ffi::ResultBuffer<ffi::S8> y, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t dh,
                         int64_t dw, int64_t pt, int64_t pl, int64_t ozp, int64_t lo, int64_t hi) {
  const char* target = "jaxinfer_int8_depthwise";
  const auto xd = x.dimensions(), yd = y->dimensions(), zd = zp.dimensions();
  auto j = std::make_shared<Job<Int8>>();
  if (zd.size() != 1 || zd[0] != 1 ||
      !Bind(*j, x.typed_data(), xd, taps.dimensions(), yd, kh, kw, sh, sw, dh, dw, pt, pl))
    return ffi::Error::InvalidArgument(std::string(target) +
                                       ": expected x [B, H, W, C], zp [1], taps [KH * KW, C], y [B, OH, OW, C]");
  if (ffi::Error e = jaxinfer::BindStage(target, bias, stage, xd[3], ozp, lo, hi, j->finish.s); e.failure()) return e;
  const int32_t z = zp.typed_data()[0];
  if (z < -128 || z > 127) return ffi::Error::InvalidArgument(std::string(target) + ": zp must be an int8 value");
  if (kh * kw > kMaxTaps) return ffi::Error::InvalidArgument(std::string(target) + ": at most 65536 taps (int32 sums)");
  j->p.pad = static_cast<int8_t>(z);
  j->taps = taps.typed_data();
  j->y = y->typed_data();
  j->rows = yd[0] * yd[1];
  Run(pool, j);
  return ffi::Error::Success();
}

ffi::Error F32Depthwise(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> taps,
                        ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> y, int64_t kh, int64_t kw, int64_t sh,
                        int64_t sw, int64_t dh, int64_t dw, int64_t pt, int64_t pl, float lo, float hi) {
  const std::string target = "jaxinfer_f32_depthwise";
  const auto xd = x.dimensions(), yd = y->dimensions(), bd = bias.dimensions();
  auto j = std::make_shared<Job<F32>>();
  if (!Bind(*j, x.typed_data(), xd, taps.dimensions(), yd, kh, kw, sh, sw, dh, dw, pt, pl) || bd.size() != 1 ||
      bd[0] != xd[3])
    return ffi::Error::InvalidArgument(target + ": expected x [B, H, W, C], taps [KH * KW, C], bias [C], "
                                       "y [B, OH, OW, C]");
  if (!(lo <= hi)) return ffi::Error::InvalidArgument(target + ": expected lo <= hi");
  if (!__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("avx512bw") || !__builtin_cpu_supports("avx512vl"))
    return ffi::Error::InvalidArgument(target + ": needs AVX-512");
  j->p.pad = 0.f;
  j->taps = taps.typed_data();
  j->finish = {bias.typed_data(), lo, hi};
  j->y = y->typed_data();
  j->rows = yd[0] * yd[1];
  Run(pool, j);
  return ffi::Error::Success();
}

#undef JX_AVX512

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinferInt8Depthwise, Int8Depthwise, jaxinfer::StagedWindowBinding());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinferF32Depthwise, F32Depthwise,
                              jaxinfer::WithWindowAttrs(ffi::Ffi::Bind()
                                                            .Ctx<ffi::ThreadPool>()
                                                            .Arg<ffi::Buffer<ffi::F32>>()
                                                            .Arg<ffi::Buffer<ffi::F32>>()
                                                            .Arg<ffi::Buffer<ffi::F32>>()
                                                            .Ret<ffi::Buffer<ffi::F32>>())
                                  .Attr<float>("lo")
                                  .Attr<float>("hi"));
