// jaxinfer's 8-bit table read for XLA CPU, registered as the FFI target "jaxinfer_lookup8".
//
// y[i] = table[code(x[i])] for x uint8 (code = x) or int8 (code = x + 128), table [256] of 1-, 2- or 4-byte
// entries (y has the table's element type and x's shape). jaxinfer::Lookup8 computes an elementwise chain over an
// 8-bit tensor (a quantized GELU: five divisions, an erf and five roundings per element) on the 256 codes and then
// reads it here. XLA's own gather fused the chain into its operand and recomputed the table entry for every element,
// and its gather loop ran ~1 ns per element besides.
//
// How: 1-byte tables on AVX-512 VBMI read 64 elements per step, vpermi2b picking from the table's lower and upper
// 128 entries (the code's low 7 bits) and the code's top bit choosing between the two. Other tables, CPUs and a
// kernel narrowed below AVX-512 (jaxinfer_int8_dot_isa, as the tests do) read entry by entry.
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

extern "C" int jaxinfer_int8_dot_isa(int want);  // int8_dot.cc: 2 while the AVX-512 paths are in use

namespace {

__attribute__((target("avx512f,avx512bw,avx512vbmi"))) void LookupBytesVbmi(const uint8_t* table, const uint8_t* x,
                                                                            int64_t n, uint8_t flip, uint8_t* y) {
  const __m512i t0 = _mm512_loadu_si512(table), t1 = _mm512_loadu_si512(table + 64);
  const __m512i t2 = _mm512_loadu_si512(table + 128), t3 = _mm512_loadu_si512(table + 192);
  const __m512i vflip = _mm512_set1_epi8(static_cast<char>(flip));
  int64_t i = 0;
  for (; i < n; i += 64) {
    const __mmask64 live = n - i >= 64 ? ~__mmask64{0} : (__mmask64{1} << (n - i)) - 1;
    const __m512i code = _mm512_xor_si512(_mm512_maskz_loadu_epi8(live, x + i), vflip);
    const __m512i low = _mm512_permutex2var_epi8(t0, code, t1);
    const __m512i high = _mm512_permutex2var_epi8(t2, code, t3);
    _mm512_mask_storeu_epi8(y + i, live, _mm512_mask_blend_epi8(_mm512_movepi8_mask(code), low, high));
  }
}

template <typename T>
void LookupEntries(const T* table, const uint8_t* x, int64_t n, uint8_t flip, T* y) {
  for (int64_t i = 0; i < n; ++i) y[i] = table[x[i] ^ flip];
}

bool UseVbmi() {
  static const bool has = __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("avx512bw");
  return has && jaxinfer_int8_dot_isa(-1) >= 2;
}

ffi::Error Lookup8(ffi::AnyBuffer table, ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> y) {
  const ffi::DataType xt = x.element_type();
  if (xt != ffi::DataType::U8 && xt != ffi::DataType::S8)
    return ffi::Error::InvalidArgument("jaxinfer_lookup8: expected uint8 or int8 codes");
  const size_t entry = ffi::ByteWidth(table.element_type());
  if (table.element_count() != 256 || y->element_type() != table.element_type() ||
      y->element_count() != x.element_count())
    return ffi::Error::InvalidArgument("jaxinfer_lookup8: expected a [256] table and y of x's size in its type");
  const uint8_t flip = xt == ffi::DataType::S8 ? 0x80 : 0;
  const auto* codes = static_cast<const uint8_t*>(x.untyped_data());
  const int64_t n = static_cast<int64_t>(x.element_count());
  void* out = y->untyped_data();
  const void* t = table.untyped_data();
  switch (entry) {
    case 1:
      if (UseVbmi())
        LookupBytesVbmi(static_cast<const uint8_t*>(t), codes, n, flip, static_cast<uint8_t*>(out));
      else
        LookupEntries(static_cast<const uint8_t*>(t), codes, n, flip, static_cast<uint8_t*>(out));
      break;
    case 2:
      LookupEntries(static_cast<const uint16_t*>(t), codes, n, flip, static_cast<uint16_t*>(out));
      break;
    case 4:
      LookupEntries(static_cast<const uint32_t*>(t), codes, n, flip, static_cast<uint32_t*>(out));
      break;
    case 8:
      LookupEntries(static_cast<const uint64_t*>(t), codes, n, flip, static_cast<uint64_t*>(out));
      break;
    default:
      return ffi::Error::InvalidArgument("jaxinfer_lookup8: expected table entries of 1, 2, 4 or 8 bytes");
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinferLookup8, Lookup8,
                              ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>());
