// jaxinfer's int8 depthwise convolution for XLA CPU, registered as the FFI target "jaxinfer_int8_depthwise".
//
// y [B, OH, OW, C] int8 = the output stage (requant.h) of sum over the window of (x - zp) * taps, per channel:
// x [B, H, W, C] int8 with its zero point zp [1] (the padding holds it, so padding adds nothing), taps
// [KH KW, C] int8 (a TFLite depthwise filter [1, KH, KW, C] as it is stored), strides, dilations and pt / pl
// rows / columns of padding before the image (patches.h's window attributes). XLA ran this as a fusion of
// the KH KW shifted slices (conv_lowering.depthwise_taps) after a fusion that requantized the previous
// layer's sums and padded them, and one more requantizing these: the int8 conv + depthwise fixture spent
// ~0.2 of its ~0.4 ms in those fusions at batch 1 (session 22).
//
// How (AVX-512): 16 channels at a time, each window pixel's values widened to int32, less the zero point,
// times the taps (vpmulld), summed in int32 (exact: |x - zp| <= 255, |tap| <= 128, and at most 2^16 taps),
// then the output stage. Rows of output pixels are split into work items that XLA's intra-op pool and the
// calling thread take from a shared counter, once there are enough multiply-adds to pay for a second thread.
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "patches.h"
#include "requant.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kSerialMacs = 1 << 20;  // under this many multiply-adds one thread is quicker
constexpr int64_t kMaxTaps = 1 << 16;     // int32 sums of at most this many products cannot wrap

struct Job {
  jaxinfer::Patches<int8_t> p;  // the geometry (p.x the image, p.pad the zero point)
  const int8_t* taps = nullptr;
  jaxinfer::OutputStage s;
  int8_t* y = nullptr;
  int64_t rows = 0, rows_per_item = 0, items = 0;  // rows: B OH output rows
  std::atomic<int64_t> next{0}, done{0};
};

// 16 int8 values widened to int32 (the lanes past `live` read as zero, and nothing past them is touched).
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m512i Widen(const int8_t* p, __mmask16 live, bool full) {
  return _mm512_cvtepi8_epi32(full ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)) : _mm_maskz_loadu_epi8(live, p));
}

constexpr int64_t kHeldTaps = 49;  // windows up to 7 x 7 keep their widened taps at hand (larger: read again)
constexpr int kBlock = 8;           // output columns summed at once in registers

// The output columns [first, last) whose whole window row lies inside the image (w = ow SW + k DW - PL in
// [0, W) for every k); the others are border columns.
inline void Inside(const jaxinfer::Patches<int8_t>& p, int64_t& first, int64_t& last) {
  first = std::min(p.OW, (p.PL + p.SW - 1) / p.SW);
  const int64_t top = p.W - 1 - (p.KW - 1) * p.DW + p.PL;  // the largest ow SW allowed
  last = top < 0 ? 0 : std::min(p.OW, top / p.SW + 1);
  if (last < first) last = first;
}

// Sums of `kCols` columns from ow (each window row inside the image, rows i0 .. i1 inside too), 16 channels:
// bias_in (the bias less zp times the taps of those rows) plus x * tap, the accumulators held in registers.
template <int kCols, bool kFull>
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline void InsideColumns(
    const Job& j, const int8_t* image, const __m512i* held, int64_t c, int64_t h0, int64_t i0, int64_t i1,
    int64_t ow, __mmask16 live, __m512i bias_in, const jaxinfer::Stage16& t, __m512i ozp, __m512i lo, __m512i hi,
    int8_t* yr) {
  const auto& p = j.p;
  const int64_t C = p.C, step = p.SW * C;
  __m512i acc[kCols];
#pragma GCC unroll 8
  for (int q = 0; q < kCols; ++q) acc[q] = bias_in;
  for (int64_t i = i0; i < i1; ++i) {
    const int8_t* line = image + ((h0 + i * p.DH) * p.W + ow * p.SW - p.PL) * C + c;
    for (int64_t k = 0; k < p.KW; ++k) {
      const int64_t tap = i * p.KW + k;
      const __m512i tv = held ? held[tap] : Widen(j.taps + tap * C + c, live, kFull);
      const int8_t* px = line + k * p.DW * C;
#pragma GCC unroll 8
      for (int q = 0; q < kCols; ++q)
        acc[q] = _mm512_add_epi32(acc[q], _mm512_mullo_epi32(Widen(px + q * step, live, kFull), tv));
    }
  }
#pragma GCC unroll 8
  for (int q = 0; q < kCols; ++q)
    _mm_mask_storeu_epi8(yr + (ow + q) * C + c, live,
                         jaxinfer::Requant16(acc[q], t.mult, t.left, t.right, t.away, ozp, lo, hi));
}

// One border column ow: only the window's taps inside the image, each x less the zero point.
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline void BorderColumn(
    const Job& j, const int8_t* image, int64_t c, int64_t h0, int64_t i0, int64_t i1, int64_t ow, __mmask16 live,
    bool full, __m512i zp, const jaxinfer::Stage16& t, __m512i ozp, __m512i lo, __m512i hi, int8_t* yr) {
  const auto& p = j.p;
  const int64_t C = p.C, w0 = ow * p.SW - p.PL;
  __m512i acc = t.bias;
  for (int64_t i = i0; i < i1; ++i) {
    const int8_t* line = image + (h0 + i * p.DH) * p.W * C + c;
    for (int64_t k = 0; k < p.KW; ++k) {
      const int64_t w = w0 + k * p.DW;
      if (w < 0 || w >= p.W) continue;
      const __m512i xv = _mm512_sub_epi32(Widen(line + w * C, live, full), zp);
      acc = _mm512_add_epi32(acc, _mm512_mullo_epi32(xv, Widen(j.taps + (i * p.KW + k) * C + c, live, full)));
    }
  }
  _mm_mask_storeu_epi8(yr + ow * C + c, live, jaxinfer::Requant16(acc, t.mult, t.left, t.right, t.away, ozp, lo, hi));
}

// Output row r (image r / OH, row r % OH), every column and channel, 16 channels at a time. Columns whose
// window lies inside the image go kBlock at a time with their sums in registers (x * tap from a bias less
// zp times the taps: three instructions per 16 products); border columns take only their taps inside the
// image, each x less the zero point.
template <bool kFull>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void Channels(const Job& j, int64_t r, int64_t c) {
  const auto& p = j.p;
  const int64_t b = r / p.OH, oh = r % p.OH, C = p.C, h0 = oh * p.SH - p.PT;
  const __mmask16 live = kFull ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (C - c)) - 1);
  const __m512i zp = _mm512_set1_epi32(p.pad), ozp = _mm512_set1_epi32(j.s.zero_point),
                lo = _mm512_set1_epi32(j.s.lo), hi = _mm512_set1_epi32(j.s.hi);
  int64_t i0 = 0, i1 = p.KH;  // the window rows inside the image
  while (i0 < i1 && h0 + i0 * p.DH < 0) ++i0;
  while (i1 > i0 && h0 + (i1 - 1) * p.DH >= p.H) --i1;
  const int8_t* image = p.x + b * p.H * p.W * C;
  int8_t* yr = j.y + r * p.OW * C;
  const jaxinfer::Stage16 t = jaxinfer::LoadStage16(j.s, c, live);
  __m512i held_taps[kHeldTaps];
  const bool hold = p.KH * p.KW <= kHeldTaps;
  __m512i tap_sum = _mm512_setzero_si512();
  for (int64_t i = i0; i < i1; ++i)
    for (int64_t k = 0; k < p.KW; ++k) {
      const __m512i tv = Widen(j.taps + (i * p.KW + k) * C + c, live, kFull);
      if (hold) held_taps[i * p.KW + k] = tv;
      tap_sum = _mm512_add_epi32(tap_sum, tv);
    }
  const __m512i* held = hold ? held_taps : nullptr;
  const __m512i bias_in = _mm512_sub_epi32(t.bias, _mm512_mullo_epi32(zp, tap_sum));
  int64_t first, last;
  Inside(p, first, last);
  for (int64_t ow = 0; ow < first; ++ow) BorderColumn(j, image, c, h0, i0, i1, ow, live, kFull, zp, t, ozp, lo, hi, yr);
  int64_t ow = first;
  for (; ow + kBlock <= last; ow += kBlock)
    InsideColumns<kBlock, kFull>(j, image, held, c, h0, i0, i1, ow, live, bias_in, t, ozp, lo, hi, yr);
  for (; ow < last; ++ow) InsideColumns<1, kFull>(j, image, held, c, h0, i0, i1, ow, live, bias_in, t, ozp, lo, hi, yr);
  for (ow = last; ow < p.OW; ++ow) BorderColumn(j, image, c, h0, i0, i1, ow, live, kFull, zp, t, ozp, lo, hi, yr);
}

void Row(const Job& j, int64_t r) {
  int64_t c = 0;
  for (; c + 16 <= j.p.C; c += 16) Channels<true>(j, r, c);
  if (c < j.p.C) Channels<false>(j, r, c);
}

void Work(Job& j) {
  for (int64_t item; (item = j.next.fetch_add(1, std::memory_order_relaxed)) < j.items;) {
    const int64_t r1 = std::min(j.rows, (item + 1) * j.rows_per_item);
    for (int64_t r = item * j.rows_per_item; r < r1; ++r) Row(j, r);
    j.done.fetch_add(1, std::memory_order_release);
  }
}

ffi::Error Int8Depthwise(ffi::ThreadPool pool, ffi::Buffer<ffi::S8> x, ffi::Buffer<ffi::S32> zp,
                         ffi::Buffer<ffi::S8> taps, ffi::Buffer<ffi::S32> bias, ffi::Buffer<ffi::S32> stage,
                         ffi::ResultBuffer<ffi::S8> y, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t dh,
                         int64_t dw, int64_t pt, int64_t pl, int64_t ozp, int64_t lo, int64_t hi) {
  const char* target = "jaxinfer_int8_depthwise";
  const auto xd = x.dimensions(), td = taps.dimensions(), yd = y->dimensions(), zd = zp.dimensions();
  auto j = std::make_shared<Job>();
  if (td.size() != 2 || zd.size() != 1 || zd[0] != 1 || xd.size() != 4 || td[0] != kh * kw ||
      !jaxinfer::Geometry(x.typed_data(), xd, yd, kh * kw * xd[3], xd[3], kh, kw, sh, sw, dh, dw, pt, pl, j->p) ||
      td[1] != xd[3])
    return ffi::Error::InvalidArgument(std::string(target) +
                                       ": expected x [B, H, W, C], zp [1], taps [KH * KW, C], y [B, OH, OW, C]");
  const int64_t C = xd[3];
  if (ffi::Error e = jaxinfer::BindStage(target, bias, stage, C, ozp, lo, hi, j->s); e.failure()) return e;
  const int32_t z = zp.typed_data()[0];
  if (z < -128 || z > 127) return ffi::Error::InvalidArgument(std::string(target) + ": zp must be an int8 value");
  if (kh * kw > kMaxTaps) return ffi::Error::InvalidArgument(std::string(target) + ": at most 65536 taps (int32 sums)");
  j->p.pad = static_cast<int8_t>(z);
  j->taps = taps.typed_data();
  j->y = y->typed_data();
  j->rows = yd[0] * yd[1];
  if (j->rows == 0 || yd[2] == 0 || C == 0) return ffi::Error::Success();
  int64_t threads = std::max<int64_t>(1, pool.num_threads());
  if (j->rows * yd[2] * C * kh * kw < kSerialMacs) threads = 1;
  j->rows_per_item = std::max<int64_t>(1, (j->rows + threads * 4 - 1) / (threads * 4));
  j->items = (j->rows + j->rows_per_item - 1) / j->rows_per_item;
  threads = std::min(threads, j->items);
  for (int64_t i = 1; i < threads; ++i) pool.Schedule([j] { Work(*j); });
  Work(*j);
  while (j->done.load(std::memory_order_acquire) < j->items) _mm_pause();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinferInt8Depthwise, Int8Depthwise,
                              jaxinfer::WithWindowAttrs(ffi::Ffi::Bind()
                                                            .Ctx<ffi::ThreadPool>()
                                                            .Arg<ffi::Buffer<ffi::S8>>()
                                                            .Arg<ffi::Buffer<ffi::S32>>()
                                                            .Arg<ffi::Buffer<ffi::S8>>()
                                                            .Arg<ffi::Buffer<ffi::S32>>()
                                                            .Arg<ffi::Buffer<ffi::S32>>()
                                                            .Ret<ffi::Buffer<ffi::S8>>())
                                  .Attr<int64_t>("ozp")
                                  .Attr<int64_t>("lo")
                                  .Attr<int64_t>("hi"));
