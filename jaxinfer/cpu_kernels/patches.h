// The patch matrix of an NHWC image, as jaxinfer's CPU convolution kernels read it (int8_dot.cc,
// f32_conv.cc): one row per output pixel (b, oh, ow), holding its window's KH x KW pixels' C values in
// that order (the order of an OHWI filter's KH KW C), the padding value where the window leaves the
// image. The kernels pack these rows straight from the image, so no patch matrix is written out.
#pragma once

#include <algorithm>
#include <cstdint>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace jaxinfer {

template <typename T>
struct Patches {
  const T* x = nullptr;
  int64_t B = 0, H = 0, W = 0, C = 0, KH = 0, KW = 0, SH = 1, SW = 1, DH = 1, DW = 1, PT = 0, PL = 0, OH = 0, OW = 0;
  T pad = 0;
};

// The geometry of x [B, H, W, C] -> y [B, OH, OW, N] under a KH x KW window with strides (sh, sw),
// dilations (dh, dw) and pt / pl rows / columns of padding before the image; false when the sizes
// and attributes do not describe such a convolution (filter columns `k` must be KH KW C).
template <typename T>
bool Geometry(const T* x, xla::ffi::Span<const int64_t> xd, xla::ffi::Span<const int64_t> yd, int64_t k, int64_t n,
              int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t dh, int64_t dw, int64_t pt, int64_t pl,
              Patches<T>& p) {
  if (xd.size() != 4 || yd.size() != 4 || kh < 1 || kw < 1 || sh < 1 || sw < 1 || dh < 1 || dw < 1 || pt < 0 ||
      pl < 0 || k != kh * kw * xd[3] || yd[0] != xd[0] || yd[3] != n)
    return false;
  p.x = x;
  p.B = xd[0], p.H = xd[1], p.W = xd[2], p.C = xd[3], p.KH = kh, p.KW = kw, p.SH = sh, p.SW = sw, p.DH = dh, p.DW = dw;
  p.PT = pt, p.PL = pl, p.OH = yd[1], p.OW = yd[2];
  return true;
}

// The window attributes every convolution handler binds, in its signature's order (kh, kw, sh, sw, dh, dw,
// pt, pl: what Geometry takes).
template <typename Binding>
auto WithWindowAttrs(Binding b) {
  return std::move(b)
      .template Attr<int64_t>("kh")
      .template Attr<int64_t>("kw")
      .template Attr<int64_t>("sh")
      .template Attr<int64_t>("sw")
      .template Attr<int64_t>("dh")
      .template Attr<int64_t>("dw")
      .template Attr<int64_t>("pt")
      .template Attr<int64_t>("pl");
}

// The window of output pixel (b, oh, ow) into dst (KH KW C values): copy(dst, src, n) moves n values of x,
// `fill` stands for the padding. A window row inside the image is one copy of KW C values when the
// dilation is 1.
template <typename T, typename D, typename Copy>
inline void Window(const Patches<T>& p, int64_t b, int64_t oh, int64_t ow, D* dst, D fill, Copy copy) {
  const int64_t row = p.KW * p.C, w0 = ow * p.SW - p.PL;
  for (int64_t i = 0; i < p.KH; ++i, dst += row) {
    const int64_t h = oh * p.SH + i * p.DH - p.PT;
    if (h < 0 || h >= p.H) {
      std::fill_n(dst, row, fill);
      continue;
    }
    const T* line = p.x + (b * p.H + h) * p.W * p.C;
    if (p.DW == 1 && w0 >= 0 && w0 + p.KW <= p.W) {
      copy(dst, line + w0 * p.C, row);
      continue;
    }
    for (int64_t t = 0; t < p.KW; ++t) {
      const int64_t w = w0 + t * p.DW;
      if (w < 0 || w >= p.W)
        std::fill_n(dst + t * p.C, p.C, fill);
      else
        copy(dst + t * p.C, line + w * p.C, p.C);
    }
  }
}

// Row m of the patch matrix into dst (see Window).
template <typename T, typename D, typename Copy>
inline void PatchRow(const Patches<T>& p, int64_t m, D* dst, D fill, Copy copy) {
  Window(p, m / (p.OW * p.OH), m / p.OW % p.OH, m % p.OW, dst, fill, copy);
}

// Rows m0 .. m1 of the patch matrix, row m at dst + (m - m0) * stride: the pixel's position is stepped, not
// divided out per row (three 64-bit divisions were a third of a 3-channel layer's packing).
template <typename T, typename D, typename Copy>
inline void PatchRows(const Patches<T>& p, int64_t m0, int64_t m1, D* dst, int64_t stride, D fill, Copy copy) {
  int64_t ow = m0 % p.OW, oh = m0 / p.OW % p.OH, b = m0 / (p.OW * p.OH);
  for (int64_t m = m0; m < m1; ++m, dst += stride) {
    Window(p, b, oh, ow, dst, fill, copy);
    if (++ow == p.OW) {
      ow = 0;
      if (++oh == p.OH) oh = 0, ++b;
    }
  }
}

// Whether ShortRows takes this window: undilated rows of at most 64 bytes.
template <typename T>
inline bool ShortWindow(const Patches<T>& p) {
  return p.DW == 1 && p.KW * p.C * static_cast<int64_t>(sizeof(T)) <= 64;
}

// PatchRows for a ShortWindow: a window row inside the image is one wide(dst, src), a 64-byte load and store
// whose spill past the row the next store overwrites (callers leave 64 bytes after the last row), where a copy
// call per window row cost ~70 cycles a patch row on a 3-channel stem (session 22). Windows that leave the
// image, or whose loads would read past it, take Window.
template <typename T, typename D, typename Copy, typename Wide>
inline void ShortRows(const Patches<T>& p, int64_t m0, int64_t m1, D* dst, int64_t stride, D fill, Copy copy,
                      Wide wide) {
  const int64_t L = p.KW * p.C, line = p.DH * p.W * p.C, reach = 64 / static_cast<int64_t>(sizeof(T));
  const T* end = p.x + p.B * p.H * p.W * p.C;
  int64_t ow = m0 % p.OW, oh = m0 / p.OW % p.OH, b = m0 / (p.OW * p.OH);
  for (int64_t m = m0; m < m1; ++m, dst += stride) {
    const int64_t h0 = oh * p.SH - p.PT, w0 = ow * p.SW - p.PL;
    const T* first = p.x + ((b * p.H + h0) * p.W + w0) * p.C;
    if (h0 >= 0 && h0 + (p.KH - 1) * p.DH < p.H && w0 >= 0 && w0 + p.KW <= p.W &&
        (end - first) >= (p.KH - 1) * line + reach) {
      for (int64_t i = 0; i < p.KH; ++i) wide(dst + i * L, first + i * line);
    } else {
      Window(p, b, oh, ow, dst, fill, copy);
    }
    if (++ow == p.OW) {
      ow = 0;
      if (++oh == p.OH) oh = 0, ++b;
    }
  }
}

}  // namespace jaxinfer
