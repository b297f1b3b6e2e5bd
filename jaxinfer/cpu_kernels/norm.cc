// jaxinfer's float32 row normalizations for XLA CPU: layer norm ("jaxinfer_f32_layer_norm") and softmax
// ("jaxinfer_f32_softmax"), each over the last axis of x viewed as [R, C].
//
// y [R, C] = ((x - mean) * inv) * gamma + beta per row of x [R, C], mean = sum(x) / C, inv = 1 / sqrt(sum((x -
// mean)^2) / C + eps), with gamma [C] and beta [C] (read where has_beta). XLA ran a layer norm as 5-7 small loops
// (the sums as a reduce-window then a reduce each, the normalization, each a thunk and some split over its pool:
// ~24 us of bert_legacy's batch-1 run in 35 such thunks); here a row's two passes and its output take one call,
// 16 channels per vector. The sums run in another order than XLA's: the last bits may differ.
//
// Softmax: y = exp(x - max) / sum(exp(x - max)) per row, as jax.nn.softmax computes it (XLA ran it as 4 loops,
// two of them over the whole tensor: ~10-15 % of a small transformer's batch-8 run), with vmath.h's exp (the LSTM
// kernel's). A row with a NaN (or an infinite maximum) gives NaN everywhere, as XLA's does; -inf entries (masks)
// give 0.
//
// GELU ("jaxinfer_f32_gelu"): y = v Phi(v) of v = x + bias [C] (has_bias), Phi the standard normal's distribution
// function (approximate 0: the erf form), or v sigmoid(2 sqrt(2 / pi) (v + 0.044715 v^3)) (approximate 1: the
// tanh form, 0.5 v (1 + tanh(z)) = v sigmoid(2 z)). XLA ran the bias and the erf form as one loop split over its
// pool (a jitted GELU of 8 x 32 x 256 values: 62 us on two cores, 36 on one; a plain add over them 41 and 14), the
// cost of an elementwise loop on this 2-vCPU host being mostly the hand-off. Phi(v) = (1 + erf(v / sqrt 2)) / 2 with
// erf(v / sqrt 2) = v P(v^2) / Q(v^2), P and Q of degree 5 fitted here (session 29: float64, Lawson-weighted least
// squares of the GELU's error over max(1, |v|) on |v| < 5.5437, where erf rounds to +-1 past it) and +-1 from there:
// within 2e-7 max(1, |v|) of float64's GELU (XLA's erf form: 2.1e-7) and 6e-7 relatively from v = -1; below, 1 +
// erf cancels, as in XLA's and onnxruntime's erf forms, and the far tail gives 0. 20-odd vector operations a value
// (session 28's erfc with e^(-t^2), kept accurate relatively in the tail, took 36; 8 x 32 x 256 values 71 -> 33 us).
// Under kSerialGelu values run on the calling thread: handing half of 8 x 32 x 256 to a helper cost bert_legacy,
// bert_legacy_ortopt, gpt2_dynamo and gpt2_dynamo_ortopt 70-80 us at batch 8 (vit neutral); a lone call of 128K values
// was 21 % quicker on two threads. NaN stays NaN.
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <string>

#include "helpers.h"
#include "vmath.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kSerialValues = 1 << 17;  // under this many values, one thread is quicker
constexpr int64_t kSerialGelu = 1 << 17;     // ... of a GELU (see the top of this file)
constexpr int64_t kRowsPerItem = 16;

struct Job {
  const float *x = nullptr, *gamma = nullptr, *beta = nullptr;  // beta null: none
  const float* bias = nullptr;  // GELU: added to each row first (null: none)
  bool tanh_form = false;       // GELU: the tanh approximation
  float* y = nullptr;
  float eps = 0;
  int64_t R = 0, C = 0, items = 0;
  std::atomic<int64_t> next{0}, done{0};
};

__attribute__((target("avx512f"))) void LayerNormRow(const Job& j, int64_t r) {
  const float* x = j.x + r * j.C;
  float* y = j.y + r * j.C;
  const int64_t C = j.C;
  __m512 s = _mm512_setzero_ps();
  for (int64_t c = 0; c < C; c += 16) {
    const __mmask16 live = jaxinfer::Tail(C - c);
    s = _mm512_add_ps(s, _mm512_maskz_loadu_ps(live, x + c));
  }
  const float mean = _mm512_reduce_add_ps(s) / static_cast<float>(C);
  const __m512 m = _mm512_set1_ps(mean);
  __m512 q = _mm512_setzero_ps();
  for (int64_t c = 0; c < C; c += 16) {
    const __mmask16 live = jaxinfer::Tail(C - c);
    const __m512 d = _mm512_maskz_sub_ps(live, _mm512_maskz_loadu_ps(live, x + c), m);
    q = _mm512_add_ps(q, _mm512_mul_ps(d, d));
  }
  const float inv = 1.0f / std::sqrt(_mm512_reduce_add_ps(q) / static_cast<float>(C) + j.eps);
  const __m512 vi = _mm512_set1_ps(inv);
  for (int64_t c = 0; c < C; c += 16) {
    const __mmask16 live = jaxinfer::Tail(C - c);
    __m512 v = _mm512_mul_ps(_mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, x + c), m), vi),
                             _mm512_maskz_loadu_ps(live, j.gamma + c));
    if (j.beta) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(live, j.beta + c));
    _mm512_mask_storeu_ps(y + c, live, v);
  }
}

__attribute__((target("avx512f"))) void SoftmaxRow(const Job& j, int64_t r) {
  const float* x = j.x + r * j.C;
  float* y = j.y + r * j.C;
  const int64_t C = j.C;
  __m512 m = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __mmask16 nan = 0;
  for (int64_t c = 0; c < C; c += 16) {
    const __mmask16 live = jaxinfer::Tail(C - c);
    const __m512 v = _mm512_mask_loadu_ps(m, live, x + c);
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    m = _mm512_max_ps(m, v);
  }
  const float top = nan ? std::numeric_limits<float>::quiet_NaN() : _mm512_reduce_max_ps(m);
  const __m512 vt = _mm512_set1_ps(top);
  __m512 s = _mm512_setzero_ps();
  for (int64_t c = 0; c < C; c += 16) {  // y holds the exponentials until the sum is known
    const __mmask16 live = jaxinfer::Tail(C - c);
    const __m512 e = jaxinfer::Exp(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, x + c), vt));
    s = _mm512_add_ps(s, _mm512_maskz_mov_ps(live, e));
    _mm512_mask_storeu_ps(y + c, live, e);
  }
  const __m512 sum = _mm512_set1_ps(_mm512_reduce_add_ps(s));
  for (int64_t c = 0; c < C; c += 16) {
    const __mmask16 live = jaxinfer::Tail(C - c);
    _mm512_mask_storeu_ps(y + c, live, _mm512_div_ps(_mm512_maskz_loadu_ps(live, y + c), sum));
  }
}

// erf(v / sqrt 2) / v ~ P(s) / Q(s), s = v^2, for |v| < 5.5437 (past it erf rounds to +-1), coefficients of s^0 ..
// s^5 (see the top of this file).
constexpr float kGeluP[6] = {7.9788425604e-01f, 7.0347530583e-02f, 9.5243292824e-03f,
                             3.6568836702e-04f, 1.2993928325e-05f, 4.3999103994e-08f};
constexpr float kGeluQ[6] = {1.0f, 2.5483206999e-01f, 2.9412492068e-02f,
                             1.9631209200e-03f, 7.8410860523e-05f, 1.1864468545e-06f};
constexpr float kGeluSaturate = 5.5437171f;  // 3.92 sqrt 2

// 1 / d for d >= 1: vrcp14ps and one Newton step, ~1e-8 relative; d past 1e30 (+inf) as 1e30, NaN kept.
__attribute__((target("avx512f"))) inline __m512 Reciprocal(__m512 d) {
  d = _mm512_min_ps(_mm512_set1_ps(1e30f), d);
  const __m512 r = _mm512_rcp14_ps(d);
  return _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.0f)));
}

// v Phi(v) = h + h e per lane, h = v / 2, e = erf(v / sqrt 2): v P(v^2) / Q(v^2), or exactly +-1 (v's sign) from
// |v| >= 5.5437, so that the far negative tail gives 0. NaN stays NaN; +inf gives +inf and -inf NaN (-inf + inf), as
// the formula does.
__attribute__((target("avx512f"))) inline __m512 GeluErf(__m512 v) {
  const __m512 s = _mm512_mul_ps(v, v);
  __m512 p = _mm512_set1_ps(kGeluP[5]), q = _mm512_set1_ps(kGeluQ[5]);
  for (int k = 4; k >= 0; --k) {
    p = _mm512_fmadd_ps(p, s, _mm512_set1_ps(kGeluP[k]));
    q = _mm512_fmadd_ps(q, s, _mm512_set1_ps(kGeluQ[k]));
  }
  const __mmask16 saturated = _mm512_cmp_ps_mask(_mm512_abs_ps(v), _mm512_set1_ps(kGeluSaturate), _CMP_GE_OQ);
  const __m512i sign = _mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(INT32_MIN));
  const __m512 unit = _mm512_castsi512_ps(_mm512_or_si512(sign, _mm512_castps_si512(_mm512_set1_ps(1.0f))));
  const __m512 e = _mm512_mask_blend_ps(saturated, _mm512_mul_ps(v, _mm512_mul_ps(p, Reciprocal(q))), unit);
  const __m512 h = _mm512_mul_ps(v, _mm512_set1_ps(0.5f));
  return _mm512_fmadd_ps(h, e, h);
}

// v sigmoid(2 z), z = sqrt(2 / pi) (v + 0.044715 v^3): 0.5 v (1 + tanh(z)); -inf gives NaN, as 0.5 v (1 + tanh(z))
// does (-inf times 0).
__attribute__((target("avx512f"))) inline __m512 GeluTanh(__m512 v) {
  const __m512 v3 = _mm512_mul_ps(_mm512_mul_ps(v, v), v);
  const __m512 z2 = _mm512_mul_ps(_mm512_fmadd_ps(v3, _mm512_set1_ps(0.044715f), v), _mm512_set1_ps(-1.595769122f));
  const __m512 y = _mm512_mul_ps(v, Reciprocal(_mm512_add_ps(_mm512_set1_ps(1.0f), jaxinfer::Exp(z2))));
  const __m512 lowest = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  const __mmask16 minus_inf = _mm512_cmp_ps_mask(v, lowest, _CMP_EQ_OQ);
  return _mm512_mask_mov_ps(y, minus_inf, _mm512_set1_ps(std::numeric_limits<float>::quiet_NaN()));
}

__attribute__((target("avx512f"))) void GeluRow(const Job& j, int64_t r) {
  const float* x = j.x + r * j.C;
  float* y = j.y + r * j.C;
  for (int64_t c = 0; c < j.C; c += 16) {
    const __mmask16 live = jaxinfer::Tail(j.C - c);
    __m512 v = _mm512_maskz_loadu_ps(live, x + c);
    if (j.bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(live, j.bias + c));
    _mm512_mask_storeu_ps(y + c, live, j.tanh_form ? GeluTanh(v) : GeluErf(v));
  }
}

template <void (*RowFn)(const Job&, int64_t)>
void Work(Job& j) {
  for (int64_t i; (i = j.next.fetch_add(1, std::memory_order_relaxed)) < j.items;) {
    for (int64_t r = i * kRowsPerItem; r < std::min(j.R, (i + 1) * kRowsPerItem); ++r) RowFn(j, r);
    j.done.fetch_add(1, std::memory_order_release);
  }
}

// Runs j's rows (R, C and the pointers set) on the calling thread and, from `parallel` values, the helpers.
template <void (*RowFn)(const Job&, int64_t)>
void Run(ffi::ThreadPool& pool, const std::shared_ptr<Job>& j, int64_t parallel = kSerialValues) {
  if (j->R == 0 || j->C == 0) return;
  j->items = (j->R + kRowsPerItem - 1) / kRowsPerItem;
  int64_t threads = std::max<int64_t>(1, pool.num_threads());
  if (j->R * j->C < parallel) threads = 1;
  threads = std::min(threads, j->items);
  jaxinfer::Share(j, Work<RowFn>, threads, j->items);
}

// A job over the rows of x [R, C] into y (as many values); null, with `error` naming `target` and `expected`, where
// the CPU lacks AVX-512, the shapes differ or params_ok(C) (the handler's own operands and attributes) fails.
template <typename ParamsOk>
std::shared_ptr<Job> RowJob(const char* target, const char* expected, ffi::Buffer<ffi::F32>& x,
                            ffi::ResultBuffer<ffi::F32>& y, ParamsOk params_ok, ffi::Error& error) {
  if (!__builtin_cpu_supports("avx512f")) {
    error = ffi::Error::InvalidArgument(std::string(target) + ": this CPU lacks AVX-512");
    return nullptr;
  }
  const auto xd = x.dimensions();
  if (xd.size() != 2 || y->element_count() != x.element_count() || !params_ok(static_cast<size_t>(xd[1]))) {
    error = ffi::Error::InvalidArgument(std::string(target) + ": expected " + expected);
    return nullptr;
  }
  auto j = std::make_shared<Job>();
  j->x = x.typed_data(), j->y = y->typed_data(), j->R = xd[0], j->C = xd[1];
  return j;
}

ffi::Error LayerNorm(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> gamma,
                     ffi::Buffer<ffi::F32> beta, ffi::ResultBuffer<ffi::F32> y, float eps, bool has_beta) {
  ffi::Error error = ffi::Error::Success();
  auto j = RowJob("jaxinfer_f32_layer_norm", "x [R, C], gamma [C], beta [C] with has_beta, y [R, C], eps >= 0", x, y,
                  [&](size_t c) {
                    return gamma.element_count() == c && (!has_beta || beta.element_count() == c) && eps >= 0;
                  },
                  error);
  if (!j) return error;
  j->gamma = gamma.typed_data(), j->eps = eps;
  j->beta = has_beta ? beta.typed_data() : nullptr;
  Run<LayerNormRow>(pool, j);
  return ffi::Error::Success();
}

ffi::Error Softmax(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> y) {
  ffi::Error error = ffi::Error::Success();
  auto j = RowJob("jaxinfer_f32_softmax", "x [R, C] and y [R, C]", x, y, [](size_t) { return true; }, error);
  if (!j) return error;
  Run<SoftmaxRow>(pool, j);
  return ffi::Error::Success();
}

ffi::Error Gelu(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> bias,
                ffi::ResultBuffer<ffi::F32> y, bool has_bias, int64_t approximate) {
  ffi::Error error = ffi::Error::Success();
  auto j = RowJob("jaxinfer_f32_gelu", "x [R, C], bias [C] with has_bias, y [R, C], approximate 0 (erf) or 1 (tanh)",
                  x, y,
                  [&](size_t c) {
                    return (!has_bias || bias.element_count() == c) && (approximate == 0 || approximate == 1);
                  },
                  error);
  if (!j) return error;
  j->bias = has_bias ? bias.typed_data() : nullptr;
  j->tanh_form = approximate == 1;
  Run<GeluRow>(pool, j, kSerialGelu);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinferF32Gelu, Gelu,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("has_bias")
                                  .Attr<int64_t>("approximate"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinferF32LayerNorm, LayerNorm,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("eps")
                                  .Attr<bool>("has_beta"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinferF32Softmax, Softmax,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
