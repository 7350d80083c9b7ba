// canvaslm's CPU kernel for int4 weights (`canvaslm.models.cpu_kernels`): y = x @ W.T with W in int4, groups of 32
// inputs sharing a scale and a zero point (w = (q - 8) s + z, as `quant.quantize_int4` and GGUF's Q4_1), computed
// in integers with AVX-512 VNNI: vpdpbusd multiplies 64 unsigned nibbles by 64 signed bytes an instruction. x is
// split per row and group of 32 into two int8 planes, x ~= step (q + r / 254) with step = max |x| / 127 (the first
// plane is GGUF's Q8_0, as llama.cpp runs its Q4 weights; the second holds its rounding), so the sums come out to
// float32's precision, not 8 bits'. One core reads the weights at ~45 GB/s from cache, where torch's int4 kernel,
// which converts each weight to float, reads ~11: a decoding pass becomes bound by memory, and its rows up to a few
// cost little more than one.
//
// Layout of `packed`, uint8 [N / 16, K / 32, 320]: for each 16 outputs and 32 inputs, 256 bytes of nibbles (4
// chunks of [16 outputs][4 bytes]; byte b of chunk c holds input c*8+b in its low nibble and c*8+4+b in its high),
// then the 16 scales and the 16 zero points in bfloat16. A group's sum is
//   sum_k ((q_k - 8) s + z) x_k = s step (sum_k q_k xq_k - 8 sum_k xq_k + (the same for xr) / 254) + z sum_k x_k
// where the zero point's term takes the exact sum of the bfloat16 inputs.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

constexpr int kGroup = 32, kTile = 16, kInt4Block = 320, kQ8Block = 544, kRows = 8;

inline __m512 bf16x16(const void* p) {  // 16 bfloat16 -> float32 (a shift: bfloat16 is float32's top half)
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

inline __m256i to_bf16x16(__m512 v) {  // float32 -> bfloat16, rounded to nearest even (NaN stays NaN)
  __m512i bits = _mm512_castps_si512(v);
  __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
  __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(rounded);
}

struct Rows {  // x quantized: two int8 planes [M, K] (x ~= scale (q + r / 254)), and per row and group the first
              // plane's step, 8 times each plane's sum, the exact sum
  const int8_t* q;
  const int8_t* r;
  const int32_t* rsum8;
  const float* scale;
  const int32_t* sum8;
  const float* sum;
  int K, G;
};

// M rows (one to kRows) of x times one tile of 16 outputs, accumulated in float32 over the K / 32 groups. A
// group's weights come as 8 vectors, vector i holding inputs 4i..4i+3 of each output as unsigned bytes: int4's
// nibbles (offset 8) or q8_0's bytes (offset 128), whose offset times the plane's sum comes off each dot product.
template <bool kInt4, int M>
inline void tile(const uint8_t* w, const Rows& x, int r0, float* out) {
  constexpr int kBytes = kInt4 ? kInt4Block : kQ8Block, kOffset = kInt4 ? 1 : 16;  // times 8 (sum8)
  __m512 acc[M];
  for (int r = 0; r < M; ++r) acc[r] = _mm512_setzero_ps();
  const __m512i low = _mm512_set1_epi8(0x0F);
  for (int g = 0; g < x.G; ++g) {
    const uint8_t* block = w + (size_t)g * kBytes;
    // the stream is sequential, but across the tiles of another thread: ask for the block 16 groups ahead
    for (int line = 0; line < kBytes; line += 64) _mm_prefetch((const char*)(block + 16 * kBytes + line), _MM_HINT_T0);
    __m512i v[8];
    __m512 s, z;
    if constexpr (kInt4) {
      for (int c = 0; c < 4; ++c) {
        const __m512i packed = _mm512_loadu_si512(block + 64 * c);
        v[2 * c] = _mm512_and_si512(packed, low);
        v[2 * c + 1] = _mm512_and_si512(_mm512_srli_epi16(packed, 4), low);
      }
      s = bf16x16(block + 256), z = bf16x16(block + 288);
    } else {
      for (int c = 0; c < 8; ++c) v[c] = _mm512_loadu_si512(block + 64 * c);
      s = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(block + 512)));
    }
    for (int r = 0; r < M; ++r) {
      const int row = r0 + r, at = row * x.G + g;
      const int32_t* a = (const int32_t*)(x.q + (size_t)row * x.K + g * kGroup);
      const int32_t* b = (const int32_t*)(x.r + (size_t)row * x.K + g * kGroup);
      // two chains of four a plane: vpdpbusd's latency would otherwise bound one row
      __m512i d0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), v[0], _mm512_set1_epi32(a[0]));
      __m512i d1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), v[1], _mm512_set1_epi32(a[1]));
      __m512i e0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), v[0], _mm512_set1_epi32(b[0]));
      __m512i e1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), v[1], _mm512_set1_epi32(b[1]));
      for (int i = 2; i < 8; i += 2) {
        d0 = _mm512_dpbusd_epi32(d0, v[i], _mm512_set1_epi32(a[i]));
        d1 = _mm512_dpbusd_epi32(d1, v[i + 1], _mm512_set1_epi32(a[i + 1]));
        e0 = _mm512_dpbusd_epi32(e0, v[i], _mm512_set1_epi32(b[i]));
        e1 = _mm512_dpbusd_epi32(e1, v[i + 1], _mm512_set1_epi32(b[i + 1]));
      }
      const __m512i dot = _mm512_sub_epi32(_mm512_add_epi32(d0, d1), _mm512_set1_epi32(kOffset * x.sum8[at]));
      const __m512i rdot = _mm512_sub_epi32(_mm512_add_epi32(e0, e1), _mm512_set1_epi32(kOffset * x.rsum8[at]));
      const __m512 both = _mm512_fmadd_ps(_mm512_cvtepi32_ps(rdot), _mm512_set1_ps(1.0f / 254.0f),
                                          _mm512_cvtepi32_ps(dot));
      acc[r] = _mm512_fmadd_ps(both, _mm512_mul_ps(s, _mm512_set1_ps(x.scale[at])), acc[r]);
      if constexpr (kInt4) acc[r] = _mm512_fmadd_ps(z, _mm512_set1_ps(x.sum[at]), acc[r]);
    }
  }
  for (int r = 0; r < M; ++r) _mm512_storeu_ps(out + r * kTile, acc[r]);
}

void quantize_rows(const at::BFloat16* x, int M, int K, int8_t* q, int8_t* res, float* scale, int32_t* sum8,
                   int32_t* rsum8, float* sum) {
  const int G = K / kGroup;
  for (int r = 0; r < M; ++r) {
    for (int g = 0; g < G; ++g) {
      const at::BFloat16* p = x + (size_t)r * K + g * kGroup;
      const __m512 a = bf16x16(p), b = bf16x16(p + 16);
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
      const __m512 inv = _mm512_set1_ps(amax > 0 ? 127.0f / amax : 0.0f);
      const __m512 ta = _mm512_mul_ps(a, inv), tb = _mm512_mul_ps(b, inv);  // in units of the first plane's step
      const __m512i qa = _mm512_cvtps_epi32(ta), qb = _mm512_cvtps_epi32(tb);
      // what the first plane leaves (at most half a step), in steps of 1/254 of it
      const __m512 k254 = _mm512_set1_ps(254.0f);
      const __m512i ra = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_sub_ps(ta, _mm512_cvtepi32_ps(qa)), k254));
      const __m512i rb = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_sub_ps(tb, _mm512_cvtepi32_ps(qb)), k254));
      _mm_storeu_si128((__m128i*)(q + (size_t)r * K + g * kGroup), _mm512_cvtsepi32_epi8(qa));
      _mm_storeu_si128((__m128i*)(q + (size_t)r * K + g * kGroup + 16), _mm512_cvtsepi32_epi8(qb));
      _mm_storeu_si128((__m128i*)(res + (size_t)r * K + g * kGroup), _mm512_cvtsepi32_epi8(ra));
      _mm_storeu_si128((__m128i*)(res + (size_t)r * K + g * kGroup + 16), _mm512_cvtsepi32_epi8(rb));
      scale[r * G + g] = amax / 127.0f;
      sum8[r * G + g] = 8 * _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
      rsum8[r * G + g] = 8 * _mm512_reduce_add_epi32(_mm512_add_epi32(ra, rb));
      sum[r * G + g] = _mm512_reduce_add_ps(_mm512_add_ps(a, b));
    }
  }
}

template <bool kInt4>
at::Tensor vnni_mm(const at::Tensor& input, const at::Tensor& packed, bool float_out) {
  constexpr int kBytes = kInt4 ? kInt4Block : kQ8Block;
  const char* name = kInt4 ? "canvaslm::int4_vnni_mm" : "canvaslm::q8_0_vnni_mm";
  TORCH_CHECK(input.dim() == 2 && input.scalar_type() == at::kBFloat16 && input.device().is_cpu(), name,
              ": x must be bfloat16 [M, K] on the CPU, got ", input.scalar_type(), " ", input.sizes(), " on ",
              input.device());
  const at::Tensor x = input.contiguous();  // a pass's last positions come strided; a no-op otherwise
  TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == at::kByte && packed.size(2) == kBytes &&
                  packed.size(1) * kGroup == x.size(1) && packed.is_contiguous(),
              name, ": packed must be uint8 [N / 16, K / 32, ", kBytes, "] for K = ", x.size(1), ", got ",
              packed.sizes());
  const int M = x.size(0), K = x.size(1), T = packed.size(0), G = K / kGroup, N = T * kTile;
  // the quantized rows, in a buffer this thread keeps (allocations cost ~1 us each, ~120 calls a pass)
  thread_local std::vector<uint8_t> buffer;
  const size_t bytes_q = ((size_t)M * K + 63) / 64 * 64, per_group = (size_t)M * G * 4;
  buffer.resize(2 * bytes_q + 4 * per_group);
  uint8_t* base = buffer.data();
  Rows rows{(const int8_t*)base, (const int8_t*)(base + bytes_q), (const int32_t*)(base + 2 * bytes_q),
            (const float*)(base + 2 * bytes_q + per_group), (const int32_t*)(base + 2 * bytes_q + 2 * per_group),
            (const float*)(base + 2 * bytes_q + 3 * per_group), K, G};
  quantize_rows(x.data_ptr<at::BFloat16>(), M, K, (int8_t*)rows.q, (int8_t*)rows.r, (float*)rows.scale,
                (int32_t*)rows.sum8, (int32_t*)rows.rsum8, (float*)rows.sum);
  at::Tensor out = at::empty({M, N}, x.options().dtype(float_out ? at::kFloat : at::kBFloat16));
  const uint8_t* weights = packed.data_ptr<uint8_t>();
  void* out_ptr = out.data_ptr();
  at::parallel_for(0, T, 1, [&](int64_t begin, int64_t end) {
    float acc[kRows * kTile];
    for (int64_t t = begin; t < end; ++t) {
      const uint8_t* w = weights + (size_t)t * G * kBytes;
      for (int r0 = 0; r0 < M; r0 += kRows) {
        const int m = std::min(kRows, M - r0);
        switch (m) {
          case 1: tile<kInt4, 1>(w, rows, r0, acc); break;
          case 2: tile<kInt4, 2>(w, rows, r0, acc); break;
          case 3: tile<kInt4, 3>(w, rows, r0, acc); break;
          case 4: tile<kInt4, 4>(w, rows, r0, acc); break;
          case 5: tile<kInt4, 5>(w, rows, r0, acc); break;
          case 6: tile<kInt4, 6>(w, rows, r0, acc); break;
          case 7: tile<kInt4, 7>(w, rows, r0, acc); break;
          default: tile<kInt4, 8>(w, rows, r0, acc); break;
        }
        for (int r = 0; r < m; ++r) {
          const size_t at = (size_t)(r0 + r) * N + t * kTile;
          const __m512 v = _mm512_loadu_ps(acc + r * kTile);
          if (float_out) {
            _mm512_storeu_ps((float*)out_ptr + at, v);
          } else {
            _mm256_storeu_si256((__m256i*)((uint16_t*)out_ptr + at), to_bf16x16(v));
          }
        }
      }
    }
  });
  return out;
}

at::Tensor int4_vnni_mm(const at::Tensor& x, const at::Tensor& packed, bool float_out) {
  return vnni_mm<true>(x, packed, float_out);
}

at::Tensor q8_0_vnni_mm(const at::Tensor& x, const at::Tensor& packed, bool float_out) {
  return vnni_mm<false>(x, packed, float_out);
}

}  // namespace

TORCH_LIBRARY(canvaslm, m) {
  m.def("int4_vnni_mm(Tensor x, Tensor packed, bool float_out) -> Tensor");
  m.def("q8_0_vnni_mm(Tensor x, Tensor packed, bool float_out) -> Tensor");
}
TORCH_LIBRARY_IMPL(canvaslm, CPU, m) {
  m.impl("int4_vnni_mm", &int4_vnni_mm);
  m.impl("q8_0_vnni_mm", &q8_0_vnni_mm);
}
