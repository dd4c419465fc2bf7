/* llama.cpp's Q8 activation scheme for one block of 32 values, shared by the batched GGUF GEMM
 * (gguf_gemm.c) and the VNNI GEMV (gguf_ops.c): the codes round x / d to even with d = max|x| / 127. */
#ifndef APHRODITE_GGUF_Q8_H
#define APHRODITE_GGUF_Q8_H

#include <stdint.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#include <immintrin.h>

/* x[i0 .. i0 + 32) (float32, or bfloat16 when bf16) -> the 32 codes as int32 in q0 (first 16), q1 (last 16);
 * returns the block's scale d. */
static inline float q8_block32(const void* x, int bf16, long i0, __m512i* q0, __m512i* q1) {
    __m512 x0, x1;
    if (bf16) {
        const uint16_t* xb = (const uint16_t*)x + i0;
        x0 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)xb)), 16));
        x1 = _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(xb + 16))), 16));
    } else {
        x0 = _mm512_loadu_ps((const float*)x + i0);
        x1 = _mm512_loadu_ps((const float*)x + i0 + 16);
    }
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
    const float d = amax / 127.f, id = d > 0.f ? 1.f / d : 0.f;
    *q0 = _mm512_cvtps_epi32(_mm512_mul_ps(x0, _mm512_set1_ps(id)));   /* round to even */
    *q1 = _mm512_cvtps_epi32(_mm512_mul_ps(x1, _mm512_set1_ps(id)));
    return d;
}
#endif

#endif
