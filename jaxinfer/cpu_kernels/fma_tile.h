// The register tile of jaxinfer's float32 product kernels (f32_conv.cc, weight_only.cc): MR rows x NV vectors
// of 16 columns of FMA accumulators, at most 16 of them, each lane summing one output in k order. The
// accumulators are named one by one (arrays of them were stored to the stack every step: int8_dot.cc).
//
// Where these are used, in scope: MR and NV (template parameters), xr (row r's value at step k is
// xr[r * K + k]), K, k, and the step's column vectors b0 .. b3 (b0 standing in for those past NV).
#pragma once

#include <immintrin.h>

#define JX_FMA_ACC(r) __m512 a##r##0, a##r##1, a##r##2, a##r##3;
#define JX_FMA_ZERO(r) a##r##0 = a##r##1 = a##r##2 = a##r##3 = _mm512_setzero_ps();
#define JX_FMA_STEP(r)                                                \
  if constexpr (MR > r) {                                             \
    const __m512 xv = _mm512_set1_ps(xr[r * K + k]);                  \
    a##r##0 = _mm512_fmadd_ps(xv, b0, a##r##0);                       \
    if constexpr (NV > 1) a##r##1 = _mm512_fmadd_ps(xv, b1, a##r##1); \
    if constexpr (NV > 2) a##r##2 = _mm512_fmadd_ps(xv, b2, a##r##2); \
    if constexpr (NV > 3) a##r##3 = _mm512_fmadd_ps(xv, b3, a##r##3); \
  }
// EACH(JX_FMA_...) for the 8 rows a tile may have.
#define JX_FMA_ROWS(EACH) EACH(0) EACH(1) EACH(2) EACH(3) EACH(4) EACH(5) EACH(6) EACH(7)
