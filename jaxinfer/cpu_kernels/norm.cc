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
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>

#include "helpers.h"
#include "vmath.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kSerialValues = 1 << 17;  // under this many values, one thread is quicker
constexpr int64_t kRowsPerItem = 16;

struct Job {
  const float *x = nullptr, *gamma = nullptr, *beta = nullptr;  // beta null: none
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

template <void (*RowFn)(const Job&, int64_t)>
void Work(Job& j) {
  for (int64_t i; (i = j.next.fetch_add(1, std::memory_order_relaxed)) < j.items;) {
    for (int64_t r = i * kRowsPerItem; r < std::min(j.R, (i + 1) * kRowsPerItem); ++r) RowFn(j, r);
    j.done.fetch_add(1, std::memory_order_release);
  }
}

// Runs j's rows (R, C and the pointers set) on the calling thread and, for large tensors, the helpers.
template <void (*RowFn)(const Job&, int64_t)>
void Run(ffi::ThreadPool& pool, const std::shared_ptr<Job>& j) {
  if (j->R == 0 || j->C == 0) return;
  j->items = (j->R + kRowsPerItem - 1) / kRowsPerItem;
  int64_t threads = std::max<int64_t>(1, pool.num_threads());
  if (j->R * j->C < kSerialValues) threads = 1;
  threads = std::min(threads, j->items);
  jaxinfer::Share(j, Work<RowFn>, threads, j->items);
}

ffi::Error LayerNorm(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> gamma,
                     ffi::Buffer<ffi::F32> beta, ffi::ResultBuffer<ffi::F32> y, float eps, bool has_beta) {
  if (!__builtin_cpu_supports("avx512f"))
    return ffi::Error::InvalidArgument("jaxinfer_f32_layer_norm: this CPU lacks AVX-512");
  const auto xd = x.dimensions();
  if (xd.size() != 2 || gamma.element_count() != static_cast<size_t>(xd[1]) ||
      (has_beta && beta.element_count() != static_cast<size_t>(xd[1])) || y->element_count() != x.element_count() ||
      !(eps >= 0))
    return ffi::Error::InvalidArgument(
        "jaxinfer_f32_layer_norm: expected x [R, C], gamma [C], beta [C] with has_beta, y [R, C], eps >= 0");
  auto j = std::make_shared<Job>();
  j->x = x.typed_data(), j->gamma = gamma.typed_data(), j->y = y->typed_data(), j->eps = eps;
  j->beta = has_beta ? beta.typed_data() : nullptr;
  j->R = xd[0], j->C = xd[1];
  Run<LayerNormRow>(pool, j);
  return ffi::Error::Success();
}

ffi::Error Softmax(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> y) {
  if (!__builtin_cpu_supports("avx512f"))
    return ffi::Error::InvalidArgument("jaxinfer_f32_softmax: this CPU lacks AVX-512");
  const auto xd = x.dimensions();
  if (xd.size() != 2 || y->element_count() != x.element_count())
    return ffi::Error::InvalidArgument("jaxinfer_f32_softmax: expected x [R, C] and y [R, C]");
  auto j = std::make_shared<Job>();
  j->x = x.typed_data(), j->y = y->typed_data(), j->R = xd[0], j->C = xd[1];
  Run<SoftmaxRow>(pool, j);
  return ffi::Error::Success();
}

}  // namespace

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
