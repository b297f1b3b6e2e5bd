// jaxinfer's float32 LSTM recurrence for XLA CPU, registered as the FFI target "jaxinfer_f32_lstm".
//
// The sequence loop of a TFLite (UNIDIRECTIONAL_SEQUENCE_LSTM) or ONNX-style LSTM without peepholes,
// projection, layer norm or coupled gates, with tanh as its activation: given the input side of every step
// z [T, B, 4 n] (x W^T plus the bias, gates in the order i, f, c, o), the stacked recurrent weights
// r [4 n, n], and the state h0, c0 [B, n], each step t computes
//   g = z[t] + h r^T;  i, f, o = sigmoid(g_i, g_f, g_o);  c = clip(c f + i tanh(g_c));  h = o tanh(c)
// and writes ys[t] = h; the last h and c are returned too. XLA ran each step as ~6 thunks (a dot, the
// gates' fusions, tanh on its own, two copies of h), ~3 us a step at batch 1 on this 2-core host; here a
// step is one pass over r.
//
// How (AVX-512, one thread: a step of a 64-cell layer is ~26K multiply-adds a batch row): 16 weight rows at a
// time, each row's dot with [x, h] summed in 16 lanes by FMAs over k, then the 16 sums reduced with one
// transposing add tree; batch rows go in pairs, 8 weight rows against both (each weight loaded once for two
// rows: the weights, not the FMAs, bound a step). exp is a degree-6 polynomial after range reduction (error ~1e-7 relative), sigmoid is
// 1 / (1 + exp(-x)), tanh is an odd polynomial under |x| 0.25 and 1 - 2 / (exp(2|x|) + 1) above it: the
// results differ from XLA's in the last bits (its own approximations), as two float LSTMs may. NaN
// propagates.
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <vector>

#include "vmath.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

template <typename A, typename B>
bool Same(const A& a, const B& b) {
  return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin());
}

#define JX_AVX512 __attribute__((target("avx512f,avx512dq,avx512vl")))

JX_AVX512 inline __m512 Sigmoid(__m512 x) {
  const __m512 one = _mm512_set1_ps(1.0f);
  return _mm512_div_ps(one, _mm512_add_ps(one, jaxinfer::Exp(_mm512_sub_ps(_mm512_setzero_ps(), x))));
}

JX_AVX512 inline __m512 Tanh(__m512 x) {
  const __m512 sign = _mm512_set1_ps(-0.0f);
  const __m512 a = _mm512_andnot_ps(sign, x);
  // Large |x|: 1 - 2 / (e^(2|x|) + 1), the sign put back.
  const __m512 one = _mm512_set1_ps(1.0f), two = _mm512_set1_ps(2.0f);
  const __m512 e = jaxinfer::Exp(_mm512_mul_ps(two, a));
  const __m512 big = _mm512_sub_ps(one, _mm512_div_ps(two, _mm512_add_ps(e, one)));
  // Small |x| (under 0.25, where that subtraction would cancel): x - x^3/3 + 2x^5/15 - 17x^7/315 + 62x^9/2835.
  const __m512 x2 = _mm512_mul_ps(x, x);
  __m512 p = _mm512_set1_ps(62.0f / 2835);
  p = _mm512_fmadd_ps(p, x2, _mm512_set1_ps(-17.0f / 315));
  p = _mm512_fmadd_ps(p, x2, _mm512_set1_ps(2.0f / 15));
  p = _mm512_fmadd_ps(p, x2, _mm512_set1_ps(-1.0f / 3));
  const __m512 small = _mm512_fmadd_ps(_mm512_mul_ps(p, x2), x, x);
  const __mmask16 use_small = _mm512_cmp_ps_mask(a, _mm512_set1_ps(0.25f), _CMP_LT_OQ);  // false for NaN
  return _mm512_mask_blend_ps(use_small, _mm512_or_ps(big, _mm512_and_ps(sign, x)), small);
}

// out[i] = the sum of v_i's 16 lanes, by a transposing add tree (pairs, quads, then 128-bit lanes).
JX_AVX512 inline __m512 Pairs(__m512 a, __m512 b) {
  return _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
}
JX_AVX512 inline __m512 Quads(__m512 a, __m512 b) {
  return _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a), _mm512_castps_pd(b))),
                       _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a), _mm512_castps_pd(b))));
}
JX_AVX512 inline __m512 Lanes(__m512 a, __m512 b) {
  return _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x88), _mm512_shuffle_f32x4(a, b, 0xDD));
}
JX_AVX512 inline __m512 Sum16(const __m512 (&v)[16]) {
  const __m512 a = Quads(Pairs(v[0], v[1]), Pairs(v[2], v[3])), b = Quads(Pairs(v[4], v[5]), Pairs(v[6], v[7]));
  const __m512 c = Quads(Pairs(v[8], v[9]), Pairs(v[10], v[11])), d = Quads(Pairs(v[12], v[13]), Pairs(v[14], v[15]));
  return Lanes(Lanes(a, b), Lanes(c, d));
}

// Operands of one step's products: per gate (i, f, c, o) W [n, I], R [n, n] and the bias [n].
struct Weights {
  const float* w[4];
  const float* r[4];
  const float* b[4];
  int64_t n = 0, I = 0;
};

// Rows j .. j + 16 of a gate (or the 1-15 left, masked): 16 dot products of a [rows, K] with v [K], added to acc.
JX_AVX512 inline void Dots(const float* a, int64_t rows, const float* v, int64_t K, __m512 (&acc)[16]) {
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 m = jaxinfer::Tail(K - k);
    const __m512 vv = _mm512_maskz_loadu_ps(m, v + k);
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i)
      if (i < rows) acc[i] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i * K + k), vv, acc[i]);
  }
}

// g [4 n] = W x + R h + b, gate by gate.
JX_AVX512 void Gates(const Weights& p, const float* x, const float* h, float* g) {
  const int64_t n = p.n;
  for (int q = 0; q < 4; ++q)
    for (int64_t j = 0; j < n; j += 16) {
      const int64_t rows = std::min<int64_t>(16, n - j);
      __m512 acc[16];
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
      Dots(p.w[q] + j * p.I, rows, x, p.I, acc);
      Dots(p.r[q] + j * n, rows, h, n, acc);
      const __mmask16 m = jaxinfer::Tail(rows);
      _mm512_mask_storeu_ps(g + q * n + j, m, _mm512_add_ps(Sum16(acc), _mm512_maskz_loadu_ps(m, p.b[q] + j)));
    }
}

// Rows j .. j + 8 of a gate (or the 1-7 left) against two vectors: acc[i] += a_i . v0, acc[8 + i] += a_i . v1,
// each weight row loaded once for both batch rows.
JX_AVX512 inline void Dots2(const float* a, int64_t rows, const float* v0, const float* v1, int64_t K,
                            __m512 (&acc)[16]) {
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 m = jaxinfer::Tail(K - k);
    const __m512 u0 = _mm512_maskz_loadu_ps(m, v0 + k), u1 = _mm512_maskz_loadu_ps(m, v1 + k);
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i)
      if (i < rows) {
        const __m512 w = _mm512_maskz_loadu_ps(m, a + i * K + k);
        acc[i] = _mm512_fmadd_ps(w, u0, acc[i]);
        acc[8 + i] = _mm512_fmadd_ps(w, u1, acc[8 + i]);
      }
  }
}

// Gates for two batch rows at once: g0, g1 [4 n] = W x_r + R h_r + b (half the weight reads of two Gates calls).
JX_AVX512 void Gates2(const Weights& p, const float* x0, const float* x1, const float* h0, const float* h1, float* g0,
                      float* g1) {
  const int64_t n = p.n;
  for (int q = 0; q < 4; ++q)
    for (int64_t j = 0; j < n; j += 8) {
      const int64_t rows = std::min<int64_t>(8, n - j);
      __m512 acc[16];
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
      Dots2(p.w[q] + j * p.I, rows, x0, x1, p.I, acc);
      Dots2(p.r[q] + j * n, rows, h0, h1, n, acc);
      const __m512 sums = Sum16(acc);  // lanes 0-7: row 0's outputs j .. j + 8, lanes 8-15: row 1's
      const __mmask8 m = static_cast<__mmask8>((1u << rows) - 1);
      const __m256 b = _mm256_maskz_loadu_ps(m, p.b[q] + j);
      _mm256_mask_storeu_ps(g0 + q * n + j, m, _mm256_add_ps(_mm512_castps512_ps256(sums), b));
      _mm256_mask_storeu_ps(g1 + q * n + j, m, _mm256_add_ps(_mm512_extractf32x8_ps(sums, 1), b));
    }
}

// One step of one batch row: the gates g [4 n] -> c (in place) and h.
JX_AVX512 void Cell(const float* g, int64_t n, float clip, float* c, float* h) {
  const __m512 hi = _mm512_set1_ps(clip), lo = _mm512_set1_ps(-clip);
  for (int64_t k = 0; k < n; k += 16) {
    const __mmask16 m = jaxinfer::Tail(n - k);
    const __m512 i = Sigmoid(_mm512_maskz_loadu_ps(m, g + k));
    const __m512 f = Sigmoid(_mm512_maskz_loadu_ps(m, g + n + k));
    const __m512 cand = Tanh(_mm512_maskz_loadu_ps(m, g + 2 * n + k));
    const __m512 o = Sigmoid(_mm512_maskz_loadu_ps(m, g + 3 * n + k));
    __m512 cv = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, c + k), f, _mm512_mul_ps(i, cand));
    if (clip > 0) cv = _mm512_min_ps(hi, _mm512_max_ps(lo, cv));
    _mm512_mask_storeu_ps(c + k, m, cv);
    _mm512_mask_storeu_ps(h + k, m, _mm512_mul_ps(o, Tanh(cv)));
  }
}

// x [T, B, I] (or [B, T, I] with time_major 0), per gate w [n, I], r [n, n], b [n], h0 and c0 [B, n]
// -> ys like x with n features, h and c [B, n]; with reverse the steps run from the last.
ffi::Error F32Lstm(ffi::RemainingArgs args, ffi::RemainingRets rets, int64_t time_major, int64_t reverse,
                   float clip) {
  if (!__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("avx512dq") ||
      !__builtin_cpu_supports("avx512vl"))
    return ffi::Error::InvalidArgument("jaxinfer_f32_lstm: this CPU lacks AVX-512");
  const ffi::Error bad = ffi::Error::InvalidArgument(
      "jaxinfer_f32_lstm: expected float32 x [T, B, I] (or [B, T, I]), per gate i, f, c, o w [n, I], then r "
      "[n, n], then b [n], h0 and c0 [B, n]; ys like x with n features, h and c [B, n]");
  if (args.size() != 15 || rets.size() != 3) return bad;
  std::vector<ffi::AnyBuffer> in;
  for (size_t i = 0; i < args.size(); ++i) {
    auto a = args.get<ffi::AnyBuffer>(i);
    if (a.has_error() || a->element_type() != ffi::DataType::F32) return bad;
    in.push_back(*a);
  }
  std::vector<ffi::AnyBuffer> out;
  for (size_t i = 0; i < rets.size(); ++i) {
    auto r = rets.get<ffi::AnyBuffer>(i);
    if (r.has_error() || (*r)->element_type() != ffi::DataType::F32) return bad;
    out.push_back(**r);
  }
  const auto xd = in[0].dimensions();
  if (xd.size() != 3 || in[5].dimensions().size() != 2) return bad;
  const int64_t T = time_major ? xd[0] : xd[1], B = time_major ? xd[1] : xd[0], I = xd[2];
  const int64_t n = in[5].dimensions()[0];
  const std::array<int64_t, 2> w_shape{n, I}, r_shape{n, n}, state{B, n};
  const std::array<int64_t, 1> b_shape{n};
  const std::array<int64_t, 3> y_shape{time_major ? T : B, time_major ? B : T, n};
  for (int q = 0; q < 4; ++q)
    if (!Same(in[1 + q].dimensions(), w_shape) || !Same(in[5 + q].dimensions(), r_shape) ||
        !Same(in[9 + q].dimensions(), b_shape))
      return bad;
  if (!Same(in[13].dimensions(), state) || !Same(in[14].dimensions(), state) ||
      !Same(out[0].dimensions(), y_shape) || !Same(out[1].dimensions(), state) || !Same(out[2].dimensions(), state))
    return bad;
  Weights p;
  for (int q = 0; q < 4; ++q) {
    p.w[q] = static_cast<const float*>(in[1 + q].untyped_data());
    p.r[q] = static_cast<const float*>(in[5 + q].untyped_data());
    p.b[q] = static_cast<const float*>(in[9 + q].untyped_data());
  }
  p.n = n, p.I = I;
  const float* x = static_cast<const float*>(in[0].untyped_data());
  float* ys = static_cast<float*>(out[0].untyped_data());
  float* h = static_cast<float*>(out[1].untyped_data());
  float* c = static_cast<float*>(out[2].untyped_data());
  std::memcpy(h, in[13].untyped_data(), sizeof(float) * B * n);
  std::memcpy(c, in[14].untyped_data(), sizeof(float) * B * n);
  std::vector<float> g(4 * n), g2(4 * n);
  // Element (t, b) of x or ys: row t * B + b time-major, b * T + t batch-major.
  const auto row = [&](int64_t t, int64_t b) { return time_major ? t * B + b : b * T + t; };
  for (int64_t s = 0; s < T; ++s) {
    const int64_t t = reverse ? T - 1 - s : s;
    int64_t b = 0;
    for (; b + 2 <= B; b += 2) {  // pairs of rows share each weight load
      Gates2(p, x + row(t, b) * I, x + row(t, b + 1) * I, h + b * n, h + (b + 1) * n, g.data(), g2.data());
      Cell(g.data(), n, clip, c + b * n, h + b * n);
      Cell(g2.data(), n, clip, c + (b + 1) * n, h + (b + 1) * n);
      std::memcpy(ys + row(t, b) * n, h + b * n, sizeof(float) * n);
      std::memcpy(ys + row(t, b + 1) * n, h + (b + 1) * n, sizeof(float) * n);
    }
    if (b < B) {
      Gates(p, x + row(t, b) * I, h + b * n, g.data());
      Cell(g.data(), n, clip, c + b * n, h + b * n);
      std::memcpy(ys + row(t, b) * n, h + b * n, sizeof(float) * n);
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinferF32Lstm, F32Lstm,
                              ffi::Ffi::Bind()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<int64_t>("time_major")
                                  .Attr<int64_t>("reverse")
                                  .Attr<float>("clip"));
