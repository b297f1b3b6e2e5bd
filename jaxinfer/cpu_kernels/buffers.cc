// jaxinfer's buffer kernels for XLA CPU: calls that make XLA write a value to memory once, for every later reader.
//
// XLA CPU fuses an elementwise value into each of its readers; where no reader is a call of its own (a convolution,
// a dot), the value is never written and every reader's fusion recomputes it from its producers, and theirs in turn.
// Both kernels here take x and hand it back with the output aliasing the input (the ffi_call's input_output_aliases),
// so nothing moves, and the readers of the output read the buffer.
//
// Row absolute maxima ("jaxinfer_f32_row_absmax"): y [R] = max |x[r, ...]| of x [R, ...] (NaN where the row holds
// one, -inf for C == 0 as XLA's max over nothing), the scale of a per-sample int8 activation (arith.quantize_rows),
// with x handed back for the quantization to read. XLA ran such a reduction as a reduce-window then a reduce, each
// fused with whatever produced x, and the quantization recomputed x once more (int8-dynamic ResNet-50 at batch 8: 51
// reduce-windows, 98 of 617 ms, besides the recomputed residual chains; session 32). x keeps its own shape: reshaped
// to [R, C] for the call, the fusion writing it looped over flattened indices, 5x slower where it also pooled
// (squeezenet's first conv and max pool, 12.6 against 2.3 ms at batch 8). Each row splits into chunks of
// kAbsMaxChunk values so that one image's row keeps both cores busy; |x| is compared as int32 bits (the sign
// cleared), under which a NaN's bits order above infinity's.
//
// "jaxinfer_keep": y = x and nothing else (jaxinfer.cpu_kernels.keep), for a value several readers share: ONNX
// ResNet-50's residual sums, read by the next block's convolution (channels-last) and by the next residual add
// (NCHW), which XLA had recomputed in each, back along the stage's chain of sums (7 fusions of 4-7 conv outputs each,
// 212 of 617 ms at batch 8 in the int8-dynamic model).
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#include "helpers.h"
#include "vmath.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kSerialValues = 1 << 17;  // under this many values, one thread is quicker
constexpr int64_t kAbsMaxChunk = 1 << 16;

struct AbsMaxJob {
  const float* x = nullptr;
  int64_t R = 0, C = 0, chunks = 0, items = 0;  // chunks per row; items = R * chunks
  std::vector<int32_t> partial;                 // per item: the largest |x| bits of its chunk
  std::atomic<int64_t> next{0}, done{0};
};

__attribute__((target("avx512f"))) int32_t AbsMaxBits(const float* x, int64_t n) {
  const __m512i sign_off = _mm512_set1_epi32(0x7fffffff);
  __m512i m = _mm512_setzero_si512();
  int64_t k = 0;
  for (; k + 64 <= n; k += 64) {  // four independent chains
    const __m512i a = _mm512_and_si512(_mm512_loadu_si512(x + k), sign_off);
    const __m512i b = _mm512_and_si512(_mm512_loadu_si512(x + k + 16), sign_off);
    const __m512i c = _mm512_and_si512(_mm512_loadu_si512(x + k + 32), sign_off);
    const __m512i d = _mm512_and_si512(_mm512_loadu_si512(x + k + 48), sign_off);
    m = _mm512_max_epi32(m, _mm512_max_epi32(_mm512_max_epi32(a, b), _mm512_max_epi32(c, d)));
  }
  for (; k < n; k += 16) {
    const __mmask16 live = jaxinfer::Tail(n - k);
    m = _mm512_max_epi32(m, _mm512_and_si512(_mm512_maskz_loadu_epi32(live, x + k), sign_off));
  }
  return _mm512_reduce_max_epi32(m);
}

void AbsMaxWork(AbsMaxJob& j) {
  for (int64_t i; (i = j.next.fetch_add(1, std::memory_order_relaxed)) < j.items;) {
    const int64_t r = i / j.chunks, c0 = i % j.chunks * kAbsMaxChunk;
    j.partial[i] = AbsMaxBits(j.x + r * j.C + c0, std::min(kAbsMaxChunk, j.C - c0));
    j.done.fetch_add(1, std::memory_order_release);
  }
}

// y is x: a copy only where XLA gave y a buffer of its own instead of aliasing x.
void HandBack(const void* x, void* y, size_t bytes) {
  if (y != x) std::memcpy(y, x, bytes);
}

ffi::Error RowAbsMax(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> x_out,
                     ffi::ResultBuffer<ffi::F32> y) {
  if (!__builtin_cpu_supports("avx512f"))
    return ffi::Error::InvalidArgument("jaxinfer_f32_row_absmax: this CPU lacks AVX-512");
  const auto xd = x.dimensions(), yd = y->dimensions();
  if (xd.size() < 1 || yd.size() != 1 || yd[0] != xd[0] || x_out->element_count() != x.element_count())
    return ffi::Error::InvalidArgument("jaxinfer_f32_row_absmax: expected x [R, ...], x_out of x's shape and y [R]");
  HandBack(x.typed_data(), x_out->typed_data(), x.size_bytes());
  auto j = std::make_shared<AbsMaxJob>();
  j->x = x.typed_data(), j->R = xd[0], j->C = xd[0] ? static_cast<int64_t>(x.element_count()) / xd[0] : 0;
  float* out = y->typed_data();
  if (j->C == 0) {
    std::fill(out, out + j->R, -std::numeric_limits<float>::infinity());
    return ffi::Error::Success();
  }
  j->chunks = (j->C + kAbsMaxChunk - 1) / kAbsMaxChunk;
  j->items = j->R * j->chunks;
  j->partial.assign(j->items, 0);
  int64_t threads = std::max<int64_t>(1, pool.num_threads());
  if (j->R * j->C < kSerialValues) threads = 1;
  threads = std::min(threads, j->items);
  jaxinfer::Share(j, AbsMaxWork, threads, j->items);
  for (int64_t r = 0; r < j->R; ++r) {
    const auto row = j->partial.begin() + r * j->chunks;
    const int32_t bits = *std::max_element(row, row + j->chunks);
    std::memcpy(out + r, &bits, sizeof bits);
  }
  return ffi::Error::Success();
}

ffi::Error Keep(ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> y) {
  if (x.size_bytes() != y->size_bytes() || x.element_type() != y->element_type())
    return ffi::Error::InvalidArgument("jaxinfer_keep: expected y of x's type and size");
  HandBack(x.untyped_data(), y->untyped_data(), x.size_bytes());
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinferF32RowAbsMax, RowAbsMax,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinferKeep, Keep, ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>());
