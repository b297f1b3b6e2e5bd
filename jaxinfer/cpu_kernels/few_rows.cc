// jaxinfer's few-row float32 products with a [K, N] weight for XLA CPU: "jaxinfer_f32_int8w_dot" (an int8 weight,
// each value widened to float32 in registers), "jaxinfer_f32_rows_dot" (a float32 weight), and
// "jaxinfer_f32_bf16w_dot" / "jaxinfer_f32_f16w_dot" (bfloat16 / float16 weights, widened exactly to float32 in
// registers: half the bytes of float32 to read, float32 sums); and the same three float kinds of weight stored
// [N, K] (an ONNX Gemm's with transB, a TFLite FULLY_CONNECTED's): "jaxinfer_f32_rows_dot_nk",
// "jaxinfer_f32_bf16w_dot_nk", "jaxinfer_f32_f16w_dot_nk" (their own block, further down).
//
// y [M, N] = x [M, K] (float32) times w [K, N] (int8, as jaxinfer.quantize's int8-weight method stores a MatMul
// weight; or float32, an ONNX MatMul's own weight): the float32 sums of x[m, k] * float(w[k, n]); with an int8
// weight the caller multiplies by the per-channel scales. XLA CPU ran the int8 weight as a dot with an int8
// operand in its own loops, ~4x slower than the float32 model it was to speed up (the 50M-parameter encoder at
// 8 tokens: 82 vs 19 ms, session 24), and dequantizing first writes the float32 weight out on every call. A
// float32 weight of a few rows is bound by reading it from memory: XLA's loops read [8, 1024] x [1024, 4096]'s
// at ~17 GB/s, its library's blocked dot at 32 rows at ~6 (session 31).
//
// How (AVX-512): a work item is a block of 64 columns (one cache line of int8 per k, four of float32); for every
// 8 rows of x it walks k, loading 32 of the block's columns as 2 float32 vectors (int8: vpmovsxbd, vcvtdq2ps)
// and multiplying them by each row's x[m, k] broadcast: 8 rows x 2 vectors = 16 accumulators, each lane summing
// one output in k order with FMAs, so no horizontal sums; then the other 32 columns. Fewer rows take the 4
// vectors at once. A column block's K x 64 weights stay in L2 across its row blocks. The sums differ from XLA's
// in the last bits (another summation order), as any two float32 dots may.
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <string>

#include "fma_tile.h"
#include "helpers.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kRows = 4;               // rows of x per register block
constexpr int64_t kCols = 64;          // columns per work item
constexpr int64_t kSerialMacs = 1 << 18;  // under this many multiply-adds one thread is quicker
constexpr int64_t kOfferMacs = 1 << 21;   // from this many, the job is offered to XLA's pool too (ShareWith)
// How far ahead (steps of k) a block asks for its weight lines: kAhead steps into L2, and again kNear steps into
// L1. A column block reads its lines N weights apart (a new 4 KB page per step at N 4096), which the hardware
// prefetchers did not follow: the encoder's 50 MB of int8 weights came in at ~4.4 GB/s. Lines 2^n KB apart also
// share one set of L1, so only the next few steps' lines can wait there: the float32 encoder at 1x8 tokens ran
// 20-30 % slower with its lines asked 32 steps ahead into L1, and 10.0-10.5 ms (into L2 only) against 8.9-9.1
// (into L2, then 8 steps ahead into L1); the int8-weight one 5.1-5.2 ms (64 steps ahead into L1) against 4.5-4.6
// (session 31, alternating processes).
template <typename W>
struct Stream;
template <>
struct Stream<int8_t> {
  static constexpr int64_t kAhead = 64;
  static constexpr int64_t kNear = 8;
};
template <>
struct Stream<float> {
  static constexpr int64_t kAhead = 32;
  static constexpr int64_t kNear = 8;
};

// Half-precision weights, as their 16 bits: bfloat16 (the upper half of a float32) and IEEE float16.
struct Bf16 {
  uint16_t bits;
};
struct F16 {
  uint16_t bits;
};
template <>
struct Stream<Bf16> : Stream<float> {};
template <>
struct Stream<F16> : Stream<float> {};

template <typename W>
struct Job {
  const float* x = nullptr;  // [M][K]
  const W* w = nullptr;      // [K][N], or [N][K] for the products of [N, K] weights below
  float* y = nullptr;        // [M][N]
  int64_t M = 0, K = 0, N = 0, chunk = 0, chunks = 0;  // work items: `chunks` runs of `chunk` columns of y
  std::atomic<int64_t> next{0}, done{0};
};

// 16 weights at p (fewer where `mask` says, the rest zero) as 16 float32.
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m512 Load(const int8_t* p, __mmask16 mask) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, p)));
}

__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m512 Load(const float* p, __mmask16 mask) {
  return _mm512_maskz_loadu_ps(mask, p);
}

__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m512 Load(const Bf16* p, __mmask16 mask) {
  const __m256i h = _mm256_maskz_loadu_epi16(mask, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));  // exact: bf16 is float32's top
}

__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m512 Load(const F16* p, __mmask16 mask) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, p));  // exact, subnormals, infinities and NaN included
}

// Rows m0 .. m0 + MR of y, columns n0 .. n0 + 16 NV (`masks`: each vector's live columns, zero past N), with
// fma_tile.h's accumulators.
#define JX_STORE(r)                                                              \
  if constexpr (MR > r) {                                                        \
    float* yr = j.y + (m0 + r) * j.N + n0;                                       \
    _mm512_mask_storeu_ps(yr, masks[0], a##r##0);                                \
    if constexpr (NV > 1) _mm512_mask_storeu_ps(yr + 16, masks[1], a##r##1);     \
    if constexpr (NV > 2) _mm512_mask_storeu_ps(yr + 32, masks[2], a##r##2);     \
    if constexpr (NV > 3) _mm512_mask_storeu_ps(yr + 48, masks[3], a##r##3);     \
  }

template <int MR, int NV, typename W>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void Block(const Job<W>& j, int64_t m0, int64_t n0,
                                                                const __mmask16* masks) {
  static_assert(MR >= 1 && MR <= 8 && NV >= 1 && NV <= 4 && MR * NV <= 16, "accumulators named below");
  // the cache lines one step reads: one of int8 (64 columns), NV of float32, half that of 16-bit weights
  constexpr int kLines = (NV * 16 * static_cast<int>(sizeof(W)) + 63) / 64;
  JX_FMA_ROWS(JX_FMA_ACC)
  JX_FMA_ROWS(JX_FMA_ZERO)
  const int64_t K = j.K;
  const float* xr = j.x + m0 * K;
  const W* w = j.w + n0;
  const int64_t ahead = Stream<W>::kAhead * j.N * static_cast<int64_t>(sizeof(W));
  const int64_t near = Stream<W>::kNear * j.N * static_cast<int64_t>(sizeof(W));
  for (int64_t k = 0; k < K; ++k, w += j.N) {
    // hints only: an address past the end of w is never read (taken as an integer, not a pointer into w)
    const uintptr_t at = reinterpret_cast<uintptr_t>(w);
    for (int l = 0; l < kLines; ++l) {
      _mm_prefetch(reinterpret_cast<const char*>(at + 64 * l + ahead), _MM_HINT_T1);
      _mm_prefetch(reinterpret_cast<const char*>(at + 64 * l + near), _MM_HINT_T0);
    }
    const __m512 b0 = Load(w, masks[0]);
    const __m512 b1 = NV > 1 ? Load(w + 16, masks[1]) : b0;
    const __m512 b2 = NV > 2 ? Load(w + 32, masks[2]) : b0;
    const __m512 b3 = NV > 3 ? Load(w + 48, masks[3]) : b0;
    JX_FMA_ROWS(JX_FMA_STEP)
  }
  JX_FMA_ROWS(JX_STORE)
}
#undef JX_STORE

// One work item: columns n0 .. n0 + 64 for every row. 8 rows at a time take the two halves of the 64 columns
// one after the other (8 x 2 vectors: each weight vector serves 8 rows; the second half's weights are in L2 by
// then where they share the first half's lines); the last 1-7 rows take 4 vectors at a time.
template <typename W>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void Columns(const Job<W>& j, int64_t n0) {
  __mmask16 masks[4];
  for (int v = 0; v < 4; ++v) {
    const int64_t live = std::clamp<int64_t>(j.N - n0 - 16 * v, 0, 16);
    masks[v] = static_cast<__mmask16>((uint32_t{1} << live) - 1);
  }
  int64_t m = 0;
  for (; m + 8 <= j.M; m += 8) {
    Block<8, 2>(j, m, n0, masks);
    if (masks[2]) Block<8, 2>(j, m, n0 + 32, masks + 2);
  }
  if (m + kRows <= j.M) {
    Block<kRows, 4>(j, m, n0, masks);
    m += kRows;
  }
  switch (j.M - m) {
    case 3: Block<3, 4>(j, m, n0, masks); break;
    case 2: Block<2, 4>(j, m, n0, masks); break;
    case 1: Block<1, 4>(j, m, n0, masks); break;
    default: break;
  }
}

template <typename W>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void Work(Job<W>& j) {
  for (int64_t b; (b = j.next.fetch_add(1, std::memory_order_relaxed)) < j.chunks;) {
    Columns(j, b * j.chunk);
    j.done.fetch_add(1, std::memory_order_release);
  }
}

// ---- [N, K] weights (an ONNX Gemm's with transB, a TFLite FULLY_CONNECTED's): each output is the dot product of
// a row of x with a row of w, both read 16 values at a time along K into 16-lane accumulators, one per (row of x,
// row of w) pair, reduced once at the end. Up to 4 rows of x by 4 rows of w per block: 16 accumulators, 8 loads
// per 16 FMAs; every weight row is read once from memory (contiguous rows: the hardware prefetchers follow them),
// the rows of x from L1 or L2. A work item is a run of weight rows.
#define JX_NK_ACC(r) __m512 a##r##0, a##r##1, a##r##2, a##r##3;
#define JX_NK_ZERO(r) a##r##0 = a##r##1 = a##r##2 = a##r##3 = _mm512_setzero_ps();
#define JX_NK_STEP(r)                                                              \
  if constexpr (MR > r) {                                                          \
    const __m512 xv = _mm512_maskz_loadu_ps(mask, xr + r * K + k);                 \
    a##r##0 = _mm512_fmadd_ps(xv, b0, a##r##0);                                    \
    if constexpr (NB > 1) a##r##1 = _mm512_fmadd_ps(xv, b1, a##r##1);              \
    if constexpr (NB > 2) a##r##2 = _mm512_fmadd_ps(xv, b2, a##r##2);              \
    if constexpr (NB > 3) a##r##3 = _mm512_fmadd_ps(xv, b3, a##r##3);              \
  }
#define JX_NK_BODY                                                                 \
  {                                                                                \
    const __m512 b0 = Load(w + k, mask);                                           \
    const __m512 b1 = NB > 1 ? Load(w + K + k, mask) : b0;                         \
    const __m512 b2 = NB > 2 ? Load(w + 2 * K + k, mask) : b0;                     \
    const __m512 b3 = NB > 3 ? Load(w + 3 * K + k, mask) : b0;                     \
    JX_NK_STEP(0) JX_NK_STEP(1) JX_NK_STEP(2) JX_NK_STEP(3)                        \
  }
#define JX_NK_STORE(r)                                                             \
  if constexpr (MR > r) {                                                          \
    float* yr = j.y + (m0 + r) * j.N + n0;                                         \
    yr[0] = _mm512_reduce_add_ps(a##r##0);                                         \
    if constexpr (NB > 1) yr[1] = _mm512_reduce_add_ps(a##r##1);                   \
    if constexpr (NB > 2) yr[2] = _mm512_reduce_add_ps(a##r##2);                   \
    if constexpr (NB > 3) yr[3] = _mm512_reduce_add_ps(a##r##3);                   \
  }

// y[m0 .. m0 + MR, n0 .. n0 + NB].
template <int MR, int NB, typename W>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void BlockNK(const Job<W>& j, int64_t m0, int64_t n0) {
  static_assert(MR >= 1 && MR <= 4 && NB >= 1 && NB <= 4, "accumulators named below");
  JX_NK_ACC(0) JX_NK_ACC(1) JX_NK_ACC(2) JX_NK_ACC(3)
  JX_NK_ZERO(0) JX_NK_ZERO(1) JX_NK_ZERO(2) JX_NK_ZERO(3)
  const int64_t K = j.K;
  const float* xr = j.x + m0 * K;
  const W* w = j.w + n0 * K;
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    const __mmask16 mask = 0xFFFF;
    JX_NK_BODY
  }
  if (k < K) {  // the last 1-15 values of each row, the rest of the vectors zero
    const __mmask16 mask = static_cast<__mmask16>((1u << (K - k)) - 1);
    JX_NK_BODY
  }
  JX_NK_STORE(0) JX_NK_STORE(1) JX_NK_STORE(2) JX_NK_STORE(3)
}
#undef JX_NK_ACC
#undef JX_NK_ZERO
#undef JX_NK_STEP
#undef JX_NK_BODY
#undef JX_NK_STORE

template <int MR, typename W>
void RowsNK(const Job<W>& j, int64_t m0, int64_t n0, int64_t nb) {
  switch (nb) {
    case 4: BlockNK<MR, 4>(j, m0, n0); break;
    case 3: BlockNK<MR, 3>(j, m0, n0); break;
    case 2: BlockNK<MR, 2>(j, m0, n0); break;
    default: BlockNK<MR, 1>(j, m0, n0); break;
  }
}

// One work item: weight rows n0 .. n1, 4 at a time, each group against every row of x (from L1 or L2 after the
// first block).
template <typename W>
void WorkNK(Job<W>& j) {
  for (int64_t c; (c = j.next.fetch_add(1, std::memory_order_relaxed)) < j.chunks;) {
    const int64_t n1 = std::min(j.N, (c + 1) * j.chunk);
    for (int64_t n = c * j.chunk; n < n1; n += 4) {
      const int64_t nb = std::min<int64_t>(4, n1 - n);
      int64_t m = 0;
      for (; m + 4 <= j.M; m += 4) RowsNK<4>(j, m, n, nb);
      switch (j.M - m) {
        case 3: RowsNK<3>(j, m, n, nb); break;
        case 2: RowsNK<2>(j, m, n, nb); break;
        case 1: RowsNK<1>(j, m, n, nb); break;
        default: break;
      }
    }
    j.done.fetch_add(1, std::memory_order_release);
  }
}

// y = x w for float32 x [M, K] and a [K, N] weight of type W, or x w^T for an [N, K] one (NK); `name` is the
// calling target's, for its errors.
template <typename W, bool NK, typename WBuffer>
ffi::Error Product(ffi::ThreadPool& pool, const char* name, ffi::Buffer<ffi::F32>& x, WBuffer& w,
                   ffi::ResultBuffer<ffi::F32>& y) {
  static_assert(sizeof(W) == sizeof(*w.typed_data()), "the weight's elements as the buffer holds them");
  if (!__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("avx512bw") || !__builtin_cpu_supports("avx512vl"))
    return ffi::Error::InvalidArgument(std::string(name) + ": this CPU lacks AVX-512");
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  constexpr int kAxis = NK ? 1 : 0;  // w's axis of K
  if (xd.size() != 2 || wd.size() != 2 || yd.size() != 2 || xd[1] != wd[kAxis] || yd[0] != xd[0] ||
      yd[1] != wd[1 - kAxis])
    return ffi::Error::InvalidArgument(std::string(name) + ": expected x [M, K], w " + (NK ? "[N, K]" : "[K, N]") +
                                       " and y [M, N]");
  auto j = std::make_shared<Job<W>>();
  j->x = x.typed_data(), j->w = reinterpret_cast<const W*>(w.typed_data()), j->y = y->typed_data();
  j->M = xd[0], j->K = xd[1], j->N = wd[1 - kAxis];
  if (j->M == 0 || j->N == 0) return ffi::Error::Success();
  if (j->K == 0) {  // every sum is empty
    std::fill(j->y, j->y + j->M * j->N, 0.f);
    return ffi::Error::Success();
  }
  int64_t threads = std::max<int64_t>(1, pool.num_threads());
  if (j->M * j->K * j->N < kSerialMacs) threads = 1;
  if constexpr (NK) {  // runs of weight rows, whole groups of 4, ~8 per thread
    const int64_t share = std::max<int64_t>(1, (j->N + threads * 8 - 1) / (threads * 8));
    j->chunk = (share + 3) / 4 * 4;
  } else {
    j->chunk = kCols;
  }
  j->chunks = (j->N + j->chunk - 1) / j->chunk;
  threads = std::min(threads, j->chunks);
  jaxinfer::ShareWith(pool, j->M * j->K * j->N >= kOfferMacs, j, NK ? WorkNK<W> : Work<W>, threads, j->chunks);
  return ffi::Error::Success();
}

}  // namespace

// One target: its handler (`symbol`), taking a float32 x and a weight of FFI type T held as W, [N, K] with NK.
#define JX_FEW_ROWS_TARGET(symbol, W, NK, T, target)                                                         \
  namespace {                                                                                                \
  ffi::Error symbol##Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<T> w,                    \
                          ffi::ResultBuffer<ffi::F32> y) {                                                   \
    return Product<W, NK>(pool, target, x, w, y);                                                            \
  }                                                                                                          \
  }                                                                                                          \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(symbol, symbol##Impl,                                                        \
                                ffi::Ffi::Bind()                                                             \
                                    .Ctx<ffi::ThreadPool>()                                                  \
                                    .Arg<ffi::Buffer<ffi::F32>>()                                            \
                                    .Arg<ffi::Buffer<T>>()                                                   \
                                    .Ret<ffi::Buffer<ffi::F32>>());

JX_FEW_ROWS_TARGET(JaxinferF32Int8wDot, int8_t, false, ffi::S8, "jaxinfer_f32_int8w_dot")
JX_FEW_ROWS_TARGET(JaxinferF32RowsDot, float, false, ffi::F32, "jaxinfer_f32_rows_dot")
JX_FEW_ROWS_TARGET(JaxinferF32Bf16wDot, Bf16, false, ffi::BF16, "jaxinfer_f32_bf16w_dot")
JX_FEW_ROWS_TARGET(JaxinferF32F16wDot, F16, false, ffi::F16, "jaxinfer_f32_f16w_dot")
JX_FEW_ROWS_TARGET(JaxinferF32RowsDotNK, float, true, ffi::F32, "jaxinfer_f32_rows_dot_nk")
JX_FEW_ROWS_TARGET(JaxinferF32Bf16wDotNK, Bf16, true, ffi::BF16, "jaxinfer_f32_bf16w_dot_nk")
JX_FEW_ROWS_TARGET(JaxinferF32F16wDotNK, F16, true, ffi::F16, "jaxinfer_f32_f16w_dot_nk")
#undef JX_FEW_ROWS_TARGET
