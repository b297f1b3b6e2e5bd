// jaxinfer's int8 x int8 -> int32 dot for XLA CPU, registered as the FFI target "jaxinfer_int8_dot".
//
// y[m, n] = sum_k x[m, k] * w[n, k], exactly (int32 sums wrap like XLA's). x is [M, K], w is [N, K]
// (K contiguous: how jaxinfer stores int8 MatMul/Gemm weights), y is [M, N]. "jaxinfer_int8_dot_zp"
// takes a zero point per row of x as well, zp [M] int32, and gives sum_k (x[m, k] - zp[m]) * w[n, k]:
// x is widened to int16 anyway, so x - zp costs nothing, where a row of ones appended to x (for the
// column sums of w) cost a second pass over w. Built for few rows:
// there XLA CPU's int8 library dot is compute-bound well below the memory's speed (docs/status.md,
// issue 6), and at one row XLA's own loops take ~30x longer than reading the weight.
//
// How: x is widened to int16 once per call, packed so that one step's rows lie together (aligned
// loads, no cache-line splits; up to ~10 % faster than row-major here); each weight row is read once,
// 16 values at a time, widened to int16 and multiplied into up to 8 rows' accumulators with vpmaddwd
// (pairs of int16 products summed into int32: exact for any int8 values, unlike vpmaddubsw, which
// saturates). The weight rows are split into chunks that XLA's intra-op thread pool and the calling
// thread take from a shared counter; the caller waits only for chunks already taken, so a busy pool
// never stalls it.
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kRowsPerPass = 8;       // accumulators held in registers: one per row
constexpr int64_t kSerialMacs = 1 << 20;  // under this many multiply-adds one thread is quicker
constexpr int32_t kMinZp = -32768 + 128, kMaxZp = 32767 - 128;  // x - zp fits int16 for any int8 x

struct Job {
  const int8_t* x8 = nullptr;
  const int32_t* zp = nullptr;  // per row of x (into zp_store), or none
  std::vector<int32_t> zp_store;
  const int8_t* w = nullptr;
  int32_t* y = nullptr;
  int64_t M = 0, K = 0, N = 0, K16 = 0, chunk = 0, chunks = 0;
  std::vector<int16_t> x16_store;
  int16_t* x16 = nullptr;  // packed: per 8-row block b, [K16 / 16][rows in b][16], 64-byte aligned
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

__attribute__((target("avx2"))) inline int32_t HorizontalSum(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// Rows m0 .. m0 + MB of y, columns n0 .. n1.
template <int MB>
__attribute__((target("avx2"))) void Rows(const Job& j, int64_t m0, int64_t n0, int64_t n1) {
  const int64_t K = j.K;
  const int16_t* xb = j.x16 + m0 * j.K16;  // this block: [K16 / 16][MB][16]
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* wr = j.w + n * K;
    __m256i acc[MB];
    for (int i = 0; i < MB; ++i) acc[i] = _mm256_setzero_si256();
    const int16_t* xp = xb;
    for (int64_t k = 0; k < j.K16; k += 16, xp += MB * 16) {
      const __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wr + k)));
      for (int i = 0; i < MB; ++i) {
        const __m256i xv = _mm256_load_si256(reinterpret_cast<const __m256i*>(xp + i * 16));
        acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(wv, xv));
      }
    }
    for (int i = 0; i < MB; ++i) {
      uint32_t s = static_cast<uint32_t>(HorizontalSum(acc[i]));
      const int32_t z = j.zp ? j.zp[m0 + i] : 0;
      for (int64_t k = j.K16; k < K; ++k)  // the last K % 16 terms
        s += static_cast<uint32_t>((int32_t{j.x8[(m0 + i) * K + k]} - z) * int32_t{wr[k]});
      j.y[(m0 + i) * j.N + n] = static_cast<int32_t>(s);
    }
  }
}

void Columns(const Job& j, int64_t n0, int64_t n1) {
  for (int64_t m0 = 0; m0 < j.M; m0 += kRowsPerPass) {
    switch (std::min(kRowsPerPass, j.M - m0)) {
      case 8: Rows<8>(j, m0, n0, n1); break;
      case 7: Rows<7>(j, m0, n0, n1); break;
      case 6: Rows<6>(j, m0, n0, n1); break;
      case 5: Rows<5>(j, m0, n0, n1); break;
      case 4: Rows<4>(j, m0, n0, n1); break;
      case 3: Rows<3>(j, m0, n0, n1); break;
      case 2: Rows<2>(j, m0, n0, n1); break;
      default: Rows<1>(j, m0, n0, n1); break;
    }
  }
}

void Work(Job& j) {
  for (int64_t c; (c = j.next.fetch_add(1, std::memory_order_relaxed)) < j.chunks;) {
    Columns(j, c * j.chunk, std::min(j.N, (c + 1) * j.chunk));
    j.done.fetch_add(1, std::memory_order_release);
  }
}

ffi::Error Run(ffi::ThreadPool& pool, ffi::Buffer<ffi::S8>& x, const int32_t* zp, ffi::Buffer<ffi::S8>& w,
               ffi::ResultBuffer<ffi::S32>& y) {
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  const auto yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 2 || yd.size() != 2 || xd[1] != wd[1] || yd[0] != xd[0] ||
      yd[1] != wd[0])
    return ffi::Error::InvalidArgument("jaxinfer_int8_dot: expected x [M, K], w [N, K] and y [M, N]");
  // x - zp must fit int16. A row whose zero point does not (never one of an 8-bit tensor; a NaN row's
  // computed offset, say) is packed with none, and zp * colsum(w) is taken off afterwards.
  auto j = std::make_shared<Job>();
  bool wide = false;
  if (zp) {
    j->zp_store.assign(zp, zp + xd[0]);
    for (int32_t& z : j->zp_store)
      if (z < kMinZp || z > kMaxZp) z = 0, wide = true;
    j->zp = j->zp_store.data();
  }
  j->x8 = x.typed_data();
  j->w = w.typed_data();
  j->y = y->typed_data();
  j->M = xd[0];
  j->K = xd[1];
  j->N = wd[0];
  j->K16 = j->K / 16 * 16;
  if (j->M == 0 || j->N == 0) return ffi::Error::Success();
  j->x16_store.resize(j->M * j->K16 + 32);
  const uintptr_t base = reinterpret_cast<uintptr_t>(j->x16_store.data());
  j->x16 = reinterpret_cast<int16_t*>((base + 63) & ~uintptr_t{63});
  for (int64_t m0 = 0; m0 < j->M; m0 += kRowsPerPass) {
    const int64_t mb = std::min(kRowsPerPass, j->M - m0);
    int16_t* dst = j->x16 + m0 * j->K16;
    for (int64_t k = 0; k < j->K16; k += 16)
      for (int64_t i = 0; i < mb; ++i) {
        const int32_t z = j->zp ? j->zp[m0 + i] : 0;
        for (int64_t t = 0; t < 16; ++t) *dst++ = static_cast<int16_t>(j->x8[(m0 + i) * j->K + k + t] - z);
      }
  }
  int64_t threads = std::max<int64_t>(1, pool.num_threads());
  if (j->M * j->K * j->N < kSerialMacs) threads = 1;
  j->chunk = std::max<int64_t>(16, (j->N + threads * 4 - 1) / (threads * 4));
  j->chunks = (j->N + j->chunk - 1) / j->chunk;
  threads = std::min(threads, j->chunks);
  for (int64_t t = 1; t < threads; ++t) pool.Schedule([j] { Work(*j); });
  Work(*j);
  while (j->done.load(std::memory_order_acquire) < j->chunks) _mm_pause();
  if (wide) {
    std::vector<uint32_t> colsum(j->N, 0);
    for (int64_t n = 0; n < j->N; ++n)
      for (int64_t k = 0; k < j->K; ++k) colsum[n] += static_cast<uint32_t>(int32_t{j->w[n * j->K + k]});
    for (int64_t m = 0; m < j->M; ++m)
      if (j->zp_store[m] != zp[m])
        for (int64_t n = 0; n < j->N; ++n)
          j->y[m * j->N + n] = static_cast<int32_t>(static_cast<uint32_t>(j->y[m * j->N + n]) -
                                                    static_cast<uint32_t>(zp[m]) * colsum[n]);
  }
  return ffi::Error::Success();
}

ffi::Error Int8Dot(ffi::ThreadPool pool, ffi::Buffer<ffi::S8> x, ffi::Buffer<ffi::S8> w,
                   ffi::ResultBuffer<ffi::S32> y) {
  return Run(pool, x, nullptr, w, y);
}

ffi::Error Int8DotZp(ffi::ThreadPool pool, ffi::Buffer<ffi::S8> x, ffi::Buffer<ffi::S32> zp,
                     ffi::Buffer<ffi::S8> w, ffi::ResultBuffer<ffi::S32> y) {
  const auto zd = zp.dimensions();
  if (zd.size() != 1 || x.dimensions().size() != 2 || zd[0] != x.dimensions()[0])
    return ffi::Error::InvalidArgument("jaxinfer_int8_dot_zp: expected zp [M] for x [M, K]");
  return Run(pool, x, zp.typed_data(), w, y);
}

}  // namespace

extern "C" int jaxinfer_int8_dot_supported() { return __builtin_cpu_supports("avx2") ? 1 : 0; }

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinferInt8Dot, Int8Dot,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinferInt8DotZp, Int8DotZp,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());
