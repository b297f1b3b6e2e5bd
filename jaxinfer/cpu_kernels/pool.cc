// jaxinfer's 8-bit max pool for XLA CPU, registered as the FFI target "jaxinfer_max_pool8".
//
// y [B, OH, OW, C] = the maximum over each window of x [B, H, W, C] (int8 or uint8; KH x KW, strides (SH, SW),
// dilations (DH, DW), PT / PL padding before the image that never wins, as XLA's reduce-window from the type's
// lowest value). A quantized model's max pool (after our int8 convolution kernels, whose output is a buffer
// anyway) ran as XLA's reduce-window loop: 82 us for a 2x2 pool over 8 x 32 x 32 x 16 bytes (cnn_qdq batch 8,
// session 27). Here 64 channels take one vector per tap, the window clipped to the image once per output pixel.
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>

#include "helpers.h"
#include "patches.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kSerialReads = 1 << 20;  // under this many bytes read, one thread is quicker

struct Job {
  jaxinfer::Patches<uint8_t> p;
  uint8_t* y = nullptr;
  bool is_unsigned = false;
  int64_t rows = 0, rows_per_item = 0, items = 0;  // output rows (b, oh)
  std::atomic<int64_t> next{0}, done{0};
};

// The window's taps inside [0, n): t in [t0, t1) for a window starting at s0 with dilation d over k taps.
inline void Inside(int64_t s0, int64_t d, int64_t k, int64_t n, int64_t& t0, int64_t& t1) {
  t0 = s0 >= 0 ? 0 : (-s0 + d - 1) / d;
  t1 = s0 >= n ? 0 : std::min(k, (n - 1 - s0) / d + 1);
}

template <bool Unsigned>
__attribute__((target("avx512f,avx512bw"))) void PoolRow(const Job& j, int64_t b, int64_t oh) {
  const auto& p = j.p;
  const __m512i lowest = _mm512_set1_epi8(Unsigned ? 0 : -128);
  int64_t i0, i1;
  const int64_t h0 = oh * p.SH - p.PT;
  Inside(h0, p.DH, p.KH, p.H, i0, i1);
  uint8_t* out = j.y + (b * p.OH + oh) * p.OW * p.C;
  for (int64_t ow = 0; ow < p.OW; ++ow, out += p.C) {
    int64_t t0, t1;
    const int64_t w0 = ow * p.SW - p.PL;
    Inside(w0, p.DW, p.KW, p.W, t0, t1);
    for (int64_t c = 0; c < p.C; c += 64) {
      const __mmask64 live = p.C - c >= 64 ? ~__mmask64{0} : (__mmask64{1} << (p.C - c)) - 1;
      __m512i acc = lowest;
      for (int64_t i = i0; i < i1; ++i) {
        const uint8_t* row = p.x + ((b * p.H + h0 + i * p.DH) * p.W + w0) * p.C + c;
        for (int64_t t = t0; t < t1; ++t) {
          const __m512i v = _mm512_maskz_loadu_epi8(live, row + t * p.DW * p.C);
          acc = Unsigned ? _mm512_max_epu8(acc, v) : _mm512_max_epi8(acc, v);
        }
      }
      _mm512_mask_storeu_epi8(out + c, live, acc);
    }
  }
}

void Work(Job& j) {
  for (int64_t i; (i = j.next.fetch_add(1, std::memory_order_relaxed)) < j.items;) {
    for (int64_t r = i * j.rows_per_item; r < std::min(j.rows, (i + 1) * j.rows_per_item); ++r) {
      if (j.is_unsigned)
        PoolRow<true>(j, r / j.p.OH, r % j.p.OH);
      else
        PoolRow<false>(j, r / j.p.OH, r % j.p.OH);
    }
    j.done.fetch_add(1, std::memory_order_release);
  }
}

ffi::Error MaxPool8(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> y, int64_t kh, int64_t kw,
                    int64_t sh, int64_t sw, int64_t dh, int64_t dw, int64_t pt, int64_t pl) {
  const char* what = "jaxinfer_max_pool8: expected int8 or uint8 x [B, H, W, C] and y [B, OH, OW, C] of its type";
  if (!__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("avx512bw"))
    return ffi::Error::InvalidArgument("jaxinfer_max_pool8: this CPU lacks AVX-512 (F, BW)");
  const auto xt = x.element_type();
  const auto xd = x.dimensions(), yd = y->dimensions();
  auto j = std::make_shared<Job>();
  if ((xt != ffi::DataType::U8 && xt != ffi::DataType::S8) || y->element_type() != xt || xd.size() != 4 ||
      yd.size() != 4 || yd[3] != xd[3] ||
      !jaxinfer::Geometry(static_cast<const uint8_t*>(x.untyped_data()), xd, yd, kh * kw * xd[3], xd[3], kh, kw, sh,
                          sw, dh, dw, pt, pl, j->p))
    return ffi::Error::InvalidArgument(what);
  j->y = static_cast<uint8_t*>(y->untyped_data());
  j->is_unsigned = xt == ffi::DataType::U8;
  j->rows = yd[0] * yd[1];
  if (j->rows == 0 || yd[2] == 0 || xd[3] == 0) return ffi::Error::Success();
  int64_t threads = std::max<int64_t>(1, pool.num_threads());
  if (j->rows * yd[2] * xd[3] * kh * kw < kSerialReads) threads = 1;
  j->rows_per_item = std::max<int64_t>(1, (j->rows + threads * 4 - 1) / (threads * 4));
  j->items = (j->rows + j->rows_per_item - 1) / j->rows_per_item;
  threads = std::min(threads, j->items);
  jaxinfer::Share(j, Work, threads, j->items);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinferMaxPool8, MaxPool8,
                              jaxinfer::WithWindowAttrs(ffi::Ffi::Bind()
                                                            .Ctx<ffi::ThreadPool>()
                                                            .Arg<ffi::AnyBuffer>()
                                                            .Ret<ffi::AnyBuffer>()));
