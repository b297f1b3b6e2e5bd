// jaxinfer's float32 layer normalization for XLA CPU, registered as the FFI target "jaxinfer_f32_layer_norm".
//
// y [R, C] = ((x - mean) * inv) * gamma + beta per row of x [R, C], mean = sum(x) / C, inv = 1 / sqrt(sum((x -
// mean)^2) / C + eps), with gamma [C] and beta [C] (read where has_beta). XLA ran a layer norm as 5-7 small loops
// (the sums as a reduce-window then a reduce each, the normalization, each a thunk and some split over its pool:
// ~24 us of bert_legacy's batch-1 run in 35 such thunks); here a row's two passes and its output take one call,
// 16 channels per vector. The sums run in another order than XLA's: the last bits may differ.
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <memory>

#include "helpers.h"
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

__attribute__((target("avx512f"))) inline float Sum(__m512 v) { return _mm512_reduce_add_ps(v); }

__attribute__((target("avx512f"))) void Row(const Job& j, int64_t r) {
  const float* x = j.x + r * j.C;
  float* y = j.y + r * j.C;
  const int64_t C = j.C;
  __m512 s = _mm512_setzero_ps();
  for (int64_t c = 0; c < C; c += 16) {
    const __mmask16 live = C - c >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (C - c)) - 1);
    s = _mm512_add_ps(s, _mm512_maskz_loadu_ps(live, x + c));
  }
  const float mean = Sum(s) / static_cast<float>(C);
  const __m512 m = _mm512_set1_ps(mean);
  __m512 q = _mm512_setzero_ps();
  for (int64_t c = 0; c < C; c += 16) {
    const __mmask16 live = C - c >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (C - c)) - 1);
    const __m512 d = _mm512_maskz_sub_ps(live, _mm512_maskz_loadu_ps(live, x + c), m);
    q = _mm512_add_ps(q, _mm512_mul_ps(d, d));
  }
  const float inv = 1.0f / std::sqrt(Sum(q) / static_cast<float>(C) + j.eps);
  const __m512 vi = _mm512_set1_ps(inv);
  for (int64_t c = 0; c < C; c += 16) {
    const __mmask16 live = C - c >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (C - c)) - 1);
    __m512 v = _mm512_mul_ps(_mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, x + c), m), vi),
                             _mm512_maskz_loadu_ps(live, j.gamma + c));
    if (j.beta) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(live, j.beta + c));
    _mm512_mask_storeu_ps(y + c, live, v);
  }
}

void Work(Job& j) {
  for (int64_t i; (i = j.next.fetch_add(1, std::memory_order_relaxed)) < j.items;) {
    for (int64_t r = i * kRowsPerItem; r < std::min(j.R, (i + 1) * kRowsPerItem); ++r) Row(j, r);
    j.done.fetch_add(1, std::memory_order_release);
  }
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
  if (j->R == 0 || j->C == 0) return ffi::Error::Success();
  j->items = (j->R + kRowsPerItem - 1) / kRowsPerItem;
  int64_t threads = std::max<int64_t>(1, pool.num_threads());
  if (j->R * j->C < kSerialValues) threads = 1;
  threads = std::min(threads, j->items);
  jaxinfer::Share(j, Work, threads, j->items);
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
