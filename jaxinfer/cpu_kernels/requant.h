// The fixed-point output stage of jaxinfer's 8-bit CPU kernels (int8_dot.cc's convolution, depthwise.cc):
// int32 sums to int8 as TFLite's quantized kernels rescale them (gemmlowp's output stage), per output channel n:
//
//   v = (acc + bias[n]) << left[n]                      (int32, wrapping as C's int32 arithmetic does)
//   h = (v * mult[n] + 2^30) >> 31                     (SaturatingRoundingDoublingHighMul; mult[n] != INT32_MIN)
//   q = h >> right[n], plus one where the dropped bits exceed half, or equal it with h < 0 and ties
//       going up rather than away from zero for this channel (RoundingDivideByPOT, ties away; ruy's and the
//       SIMD output stages' rounding, ties up)
//   y = clamp(q + zero_point, lo, hi) as int8
//
// with left = max(shift, 0), right = max(-shift, 0), shift in [-31, 30]: the numbers of
// jaxinfer.converters.tflite.quant.multiply_by_quantized_multiplier, which XLA runs elsewhere.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <limits>
#include <string>

#include "patches.h"
#include "vmath.h"
#include "xla/ffi/api/ffi.h"

namespace jaxinfer {

struct OutputStage {
  const int32_t* bias = nullptr;   // [N], or none
  const int32_t* mult = nullptr;   // [N] Q31 multipliers
  const int32_t* shift = nullptr;  // [N]
  const int32_t* away = nullptr;   // [N] nonzero: ties away from zero; zero: ties up
  int32_t zero_point = 0, lo = -128, hi = 127;
  const float* scale = nullptr;    // [N]: the float stage instead (ONNX's requantization, see RequantRowFloat)
};

// One output channel's stage, in scalar code (tails and checks).
inline int8_t Requant1(const OutputStage& s, int32_t acc, int64_t n) {
  const int32_t shift = s.shift[n], left = shift > 0 ? shift : 0, right = shift > 0 ? 0 : -shift;
  const uint32_t sum = static_cast<uint32_t>(acc) + static_cast<uint32_t>(s.bias ? s.bias[n] : 0);
  const int32_t v = static_cast<int32_t>(sum << left);
  const int32_t h = static_cast<int32_t>((int64_t{v} * s.mult[n] + (int64_t{1} << 30)) >> 31);
  const int32_t mask = static_cast<int32_t>((uint32_t{1} << right) - 1u);
  const int32_t threshold = (mask >> 1) + (h < 0 && s.away[n] ? 1 : 0);
  const int32_t q = (h >> right) + ((h & mask) > threshold ? 1 : 0);
  const int32_t y = static_cast<int32_t>(static_cast<uint32_t>(q) + static_cast<uint32_t>(s.zero_point));
  return static_cast<int8_t>(y < s.lo ? s.lo : y > s.hi ? s.hi : y);
}

// Sixteen channels' stage: acc already holds the bias; left / right / mult per lane, `away` the lanes
// whose ties go away from zero.
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m128i Requant16(__m512i acc, __m512i mult, __m512i left,
                                                                     __m512i right, __mmask16 away, __m512i zp,
                                                                     __m512i lo, __m512i hi) {
  const __m512i v = _mm512_sllv_epi32(acc, left);
  const __m512i nudge = _mm512_set1_epi64(int64_t{1} << 30);
  // Even lanes' products in place; odd lanes' moved down, multiplied, moved back up.
  const __m512i even = _mm512_srai_epi64(_mm512_add_epi64(_mm512_mul_epi32(v, mult), nudge), 31);
  const __m512i odd = _mm512_srai_epi64(
      _mm512_add_epi64(_mm512_mul_epi32(_mm512_srli_epi64(v, 32), _mm512_srli_epi64(mult, 32)), nudge), 31);
  const __m512i h = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
  const __m512i one = _mm512_set1_epi32(1);
  const __m512i mask = _mm512_sub_epi32(_mm512_sllv_epi32(one, right), one);
  const __m512i half = _mm512_srli_epi32(mask, 1);
  const __mmask16 negative = _mm512_mask_cmplt_epi32_mask(away, h, _mm512_setzero_si512());
  const __m512i threshold = _mm512_mask_add_epi32(half, negative, half, one);
  __m512i q = _mm512_srav_epi32(h, right);
  q = _mm512_mask_add_epi32(q, _mm512_cmpgt_epi32_mask(_mm512_and_si512(h, mask), threshold), q, one);
  q = _mm512_min_epi32(_mm512_max_epi32(_mm512_add_epi32(q, zp), lo), hi);
  return _mm512_cvtepi32_epi8(q);
}

// The stage's per-channel vectors for channels n .. n + 16 (lanes past N: whatever `live` leaves, unused).
struct Stage16 {
  __m512i bias, mult, left, right;
  __mmask16 away;
};

__attribute__((target("avx512f,avx512bw,avx512vl"))) inline Stage16 LoadStage16(const OutputStage& s, int64_t n,
                                                                       __mmask16 live) {
  Stage16 t;
  t.bias = s.bias ? _mm512_maskz_loadu_epi32(live, s.bias + n) : _mm512_setzero_si512();
  t.mult = _mm512_maskz_loadu_epi32(live, s.mult + n);
  const __m512i shift = _mm512_maskz_loadu_epi32(live, s.shift + n), zero = _mm512_setzero_si512();
  t.left = _mm512_max_epi32(shift, zero);
  t.right = _mm512_max_epi32(_mm512_sub_epi32(zero, shift), zero);
  t.away = _mm512_mask_cmpneq_epi32_mask(live, _mm512_maskz_loadu_epi32(live, s.away + n), zero);
  return t;
}

// ONNX's requantization (QLinearConv, the QDQ rewrite's integer conv), as jaxinfer's XLA route computes it:
//
//   y = clamp(round_half_even(float(acc + bias[n]) * scale[n]) + zero_point, lo, hi)
//
// the sum converted to float32 and multiplied by the channel's float32 multiplier (one rounding each, as
// XLA's convert and multiply), clamped to [lo - zp, hi - zp] before rounding (integer bounds: the same as
// clamping after), rounded to nearest even. lo / hi may span uint8's range: the low byte is stored, and the
// caller reads y as uint8 then.
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline void RequantRowFloat(const OutputStage& s, const int32_t* acc,
                                                                        int64_t n0, int64_t n1, int8_t* y) {
  const __m512i zp = _mm512_set1_epi32(s.zero_point);
  const __m512 lo = _mm512_set1_ps(static_cast<float>(s.lo - s.zero_point));
  const __m512 hi = _mm512_set1_ps(static_cast<float>(s.hi - s.zero_point));
  for (int64_t n = n0; n < n1; n += 16) {
    const __mmask16 live = Tail(n1 - n);
    __m512i a = _mm512_maskz_loadu_epi32(live, acc + n);
    if (s.bias) a = _mm512_add_epi32(a, _mm512_maskz_loadu_epi32(live, s.bias + n));
    __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(a), _mm512_maskz_loadu_ps(live, s.scale + n));
    v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
    const __m512i q = _mm512_add_epi32(_mm512_cvt_roundps_epi32(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), zp);
    _mm_mask_storeu_epi8(y + n, live, _mm512_cvtepi32_epi8(q));
  }
}

// y[n0 .. n1) = the stage applied to acc[n0 .. n1) (channel n at index n of both).
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline void RequantRow(const OutputStage& s, const int32_t* acc,
                                                                   int64_t n0, int64_t n1, int8_t* y) {
  if (s.scale) return RequantRowFloat(s, acc, n0, n1, y);
  const __m512i zp = _mm512_set1_epi32(s.zero_point), lo = _mm512_set1_epi32(s.lo), hi = _mm512_set1_epi32(s.hi);
  for (int64_t n = n0; n < n1; n += 16) {
    const __mmask16 live = Tail(n1 - n);
    const Stage16 t = LoadStage16(s, n, live);
    const __m512i a = _mm512_add_epi32(_mm512_maskz_loadu_epi32(live, acc + n), t.bias);
    _mm_mask_storeu_epi8(y + n, live, Requant16(a, t.mult, t.left, t.right, t.away, zp, lo, hi));
  }
}

// A handler's stage operands: bias [N] int32 and stage [3, N] int32 (Q31 multipliers, shifts, and per channel
// whether ties round away from zero), zero point ozp and clamp [lo, hi]; checked and bound into s.
inline xla::ffi::Error BindStage(const char* target, xla::ffi::Buffer<xla::ffi::S32> bias,
                                 xla::ffi::Buffer<xla::ffi::S32> stage, int64_t N, int64_t ozp, int64_t lo, int64_t hi,
                                 OutputStage& s) {
  using xla::ffi::Error;
  const auto bd = bias.dimensions(), sd = stage.dimensions();
  if (bd.size() != 1 || bd[0] != N || sd.size() != 2 || sd[0] != 3 || sd[1] != N)
    return Error::InvalidArgument(std::string(target) + ": expected bias [N] and stage [3, N] for N channels");
  if (lo < -128 || hi > 127 || lo > hi || ozp < -128 || ozp > 127)
    return Error::InvalidArgument(std::string(target) + ": zero point and clamp must be int8 values, lo <= hi");
  const int32_t* t = stage.typed_data();
  for (int64_t n = 0; n < N; ++n)
    if (t[n] == std::numeric_limits<int32_t>::min() || t[N + n] < -31 || t[N + n] > 30)
      return Error::InvalidArgument(std::string(target) + ": multipliers must not be INT32_MIN, shifts in [-31, 30]");
  if (!__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("avx512bw") || !__builtin_cpu_supports("avx512vl"))
    return Error::InvalidArgument(std::string(target) + ": needs AVX-512");
  s.bias = bias.typed_data(), s.mult = t, s.shift = t + N, s.away = t + 2 * N;
  s.zero_point = static_cast<int32_t>(ozp), s.lo = static_cast<int32_t>(lo), s.hi = static_cast<int32_t>(hi);
  return Error::Success();
}

// Whether an 8-bit buffer is uint8 (else int8); false with `ok` cleared for any other type.
inline bool Unsigned8(xla::ffi::DataType t, bool& ok) {
  ok = t == xla::ffi::DataType::U8 || t == xla::ffi::DataType::S8;
  return t == xla::ffi::DataType::U8;
}

// The head every 8-bit window kernel's binding starts with: the pool, the image x (an X: int8, or AnyBuffer where
// the kernel also reads uint8), its zero point [1], the filter.
template <typename X = xla::ffi::Buffer<xla::ffi::S8>>
inline auto WindowHead() {
  namespace ffi = xla::ffi;
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<X>()
      .template Arg<ffi::Buffer<ffi::S32>>()  // X makes the chain dependent from here
      .template Arg<ffi::Buffer<ffi::S8>>();
}

// The binding of an int8 window kernel finished by an output stage (the requantizing convolution, the int8
// depthwise): x, its zero point, the filter, bias and the stage's table -> int8 y; the window attributes, then
// the output zero point and clamp (what BindStage takes).
inline auto StagedWindowBinding() {
  namespace ffi = xla::ffi;
  return WithWindowAttrs(
             WindowHead().Arg<ffi::Buffer<ffi::S32>>().Arg<ffi::Buffer<ffi::S32>>().Ret<ffi::Buffer<ffi::S8>>())
      .Attr<int64_t>("ozp")
      .Attr<int64_t>("lo")
      .Attr<int64_t>("hi");
}

// The binding of an 8-bit window kernel finished by the float stage (RequantRowFloat: ONNX's requantized
// convolutions): x (int8 or uint8), its zero point, the filter, bias [N] int32, scale [N] float32 and the output
// zero point [1] -> y (int8 or uint8); the window attributes, then whether a ReLU clamps at the zero point.
inline auto FloatStagedWindowBinding() {
  namespace ffi = xla::ffi;
  return WithWindowAttrs(WindowHead<ffi::AnyBuffer>()
                             .Arg<ffi::Buffer<ffi::S32>>()
                             .Arg<ffi::Buffer<ffi::F32>>()
                             .Arg<ffi::Buffer<ffi::S32>>()
                             .Ret<ffi::AnyBuffer>())
      .template Attr<bool>("relu");
}

// A float stage's operands (RequantRowFloat): bias [N] int32, scale [N] float32, the output zero point ozp [1]
// int32 (a tensor: ONNX's is a model value), and the output's type (uint8 when `unsigned_out`) with the
// clamp at the zero point where `relu`; checked and bound into s.
inline xla::ffi::Error BindFloatStage(const char* target, xla::ffi::Buffer<xla::ffi::S32> bias,
                                      xla::ffi::Buffer<xla::ffi::F32> scale, xla::ffi::Buffer<xla::ffi::S32> ozp,
                                      int64_t N, bool unsigned_out, bool relu, OutputStage& s) {
  using xla::ffi::Error;
  const auto bd = bias.dimensions(), sd = scale.dimensions(), zd = ozp.dimensions();
  if (bd.size() != 1 || bd[0] != N || sd.size() != 1 || sd[0] != N || zd.size() != 1 || zd[0] != 1)
    return Error::InvalidArgument(std::string(target) + ": expected bias [N], scale [N] and a zero point [1]");
  const int32_t lo = unsigned_out ? 0 : -128, hi = unsigned_out ? 255 : 127, z = ozp.typed_data()[0];
  if (z < lo || z > hi)
    return Error::InvalidArgument(std::string(target) + ": the output zero point is out of its type's range");
  if (!__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("avx512bw") || !__builtin_cpu_supports("avx512vl"))
    return Error::InvalidArgument(std::string(target) + ": needs AVX-512");
  s.bias = bias.typed_data(), s.scale = scale.typed_data();
  s.zero_point = z, s.lo = relu ? z : lo, s.hi = hi;
  return Error::Success();
}

}  // namespace jaxinfer
