// AVX-512 float helpers the kernels share: the tail mask of a row's last vector, and exp.
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace jaxinfer {

// The lanes of a 16-lane vector that hold values when `left` of them remain (all 16 from 16 on).
__attribute__((target("avx512f"))) inline __mmask16 Tail(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
}

// e^x per lane: x clamped to [-104, 88.7] keeping NaN (max/min return their second operand when one is NaN), n =
// round(x log2 e), r = x - n ln 2 in two parts (n times the high part is exact), a degree-6 Taylor polynomial of e^r
// on |r| <= ln 2 / 2 (error ~1e-7 relative), scaled by 2^n (vscalefps). e^-104 rounds to 0, so -inf gives 0.
__attribute__((target("avx512f"))) inline __m512 Exp(__m512 x) {
  x = _mm512_min_ps(_mm512_set1_ps(88.7f), _mm512_max_ps(_mm512_set1_ps(-104.0f), x));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);  // ln 2, high bits (exact n * hi)
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);   // ln 2, the rest
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

}  // namespace jaxinfer
