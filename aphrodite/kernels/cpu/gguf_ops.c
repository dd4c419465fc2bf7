/*
 * GGUF (llama.cpp) quantized weights on the CPU: matrix products that read the weight blocks
 * directly, and dequantization of whole rows (prefill tiles, embedding lookups).
 *
 * Why: decode at small batch streams every weight once per step, so reading 4.5-bit blocks
 * instead of 16- or 32-bit floats cuts the bytes per token 3.5-7x. As llama.cpp does, each
 * activation row is first quantized to 8 bits per block of 32 (one float scale per block), so
 * the inner loops are integer dot products of weight codes with activation codes (u8 x s8,
 * VNNI where the CPU has it); scales, the per-block minimums and the K-quants' sub-block
 * scales are applied once per 16 or 32 products.
 *
 * Every block type is written once in portable C as an "unpack": a block becomes int8 codes
 * q and, per group of 16 values, a float scale and offset (value = scale * q + offset). The
 * portable dot products and the dequantization are built on it. The types that real files
 * spend their bytes on (Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K) also have AVX2 paths.
 *
 * Weights: W[N, row_bytes], row n holds the blocks of output feature n (ggml order: values
 * along K). Activations and results: float32 (dtype 0) or bfloat16 (dtype 1).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "gguf_q8.h"
#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

enum { GF32 = 0, GBF16 = 1 };
enum { Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q2_K = 10, Q3_K = 11, Q4_K = 12, Q5_K = 13, Q6_K = 14 };

static inline float h2f(const uint8_t* p) {   /* little-endian IEEE half at p */
    const uint16_t h = (uint16_t)(p[0] | (p[1] << 8));
#if defined(__F16C__)
    return _cvtsh_ss(h);   /* one instruction; the scales of every block go through here */
#endif
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    const uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0) {
        const float f = (float)man * 5.9604644775390625e-08f;   /* 2^-24: zero and subnormals */
        return sign ? -f : f;
    }
    bits = exp == 31 ? sign | 0x7f800000u | (man << 13) : sign | ((exp + 112) << 23) | (man << 13);
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline float gload(const void* p, long i, int dtype) {
    if (dtype == GBF16) {
        const uint32_t u = (uint32_t)((const uint16_t*)p)[i] << 16;
        float f;
        memcpy(&f, &u, 4);
        return f;
    }
    return ((const float*)p)[i];
}

static inline void gstore(void* p, long i, float v, int dtype) {
    if (dtype == GBF16) {
        uint32_t u;
        memcpy(&u, &v, 4);
        if ((u & 0x7fffffffu) > 0x7f800000u) {
            ((uint16_t*)p)[i] = (uint16_t)((u >> 16) | 0x40u);
            return;
        }
        u += 0x7fffu + ((u >> 16) & 1u);
        ((uint16_t*)p)[i] = (uint16_t)(u >> 16);
    } else {
        ((float*)p)[i] = v;
    }
}

/* (values per block, bytes per block) of a type; 0 for types this file does not know. */
static int block_values(int t) {
    switch (t) {
        case Q4_0: case Q4_1: case Q5_0: case Q5_1: case Q8_0: return 32;
        case Q2_K: case Q3_K: case Q4_K: case Q5_K: case Q6_K: return 256;
        default: return 0;
    }
}

static int block_bytes(int t) {
    switch (t) {
        case Q4_0: return 18;
        case Q4_1: return 20;
        case Q5_0: return 22;
        case Q5_1: return 24;
        case Q8_0: return 34;
        case Q2_K: return 84;
        case Q3_K: return 110;
        case Q4_K: return 144;
        case Q5_K: return 176;
        case Q6_K: return 210;
        default: return 0;
    }
}

int aph_gguf_block_values(int t) { return block_values(t); }
int aph_gguf_block_bytes(int t) { return block_bytes(t); }

/* ---------------------------------------------------------------------------------------------
 * Unpack: q[QK] int8 codes, sc/mn[QK/16] so that value[i] = sc[i/16] * q[i] + mn[i/16]. */

static void unpack_legacy(int t, const uint8_t* b, int8_t* q, float* sc, float* mn) {
    const float d = h2f(b);
    float m = 0.f;
    const uint8_t* qs;
    uint32_t qh = 0;
    switch (t) {
        case Q4_0: qs = b + 2; m = -8.f * d; break;
        case Q4_1: qs = b + 4; m = h2f(b + 2); break;
        case Q5_0: memcpy(&qh, b + 2, 4); qs = b + 6; m = -16.f * d; break;
        case Q5_1: memcpy(&qh, b + 4, 4); qs = b + 8; m = h2f(b + 2); break;
        default: /* Q8_0 */
            for (int i = 0; i < 32; i++) q[i] = (int8_t)b[2 + i];
            sc[0] = sc[1] = d;
            mn[0] = mn[1] = 0.f;
            return;
    }
    for (int j = 0; j < 16; j++) {
        q[j] = (int8_t)((qs[j] & 0xF) | (((qh >> j) & 1u) << 4));
        q[j + 16] = (int8_t)((qs[j] >> 4) | (((qh >> (j + 16)) & 1u) << 4));
    }
    sc[0] = sc[1] = d;
    mn[0] = mn[1] = m;
}

static void unpack_q2_k(const uint8_t* b, int8_t* q, float* sc, float* mn) {
    const uint8_t* scales = b;
    const uint8_t* qs = b + 16;
    const float d = h2f(b + 80), dmin = h2f(b + 82);
    for (int n = 0; n < 2; n++)
        for (int j = 0; j < 4; j++)
            for (int s = 0; s < 2; s++) {
                const int g = n * 8 + j * 2 + s;
                sc[g] = d * (float)(scales[g] & 0xF);
                mn[g] = -dmin * (float)(scales[g] >> 4);
                for (int l = 0; l < 16; l++) q[g * 16 + l] = (int8_t)((qs[n * 32 + s * 16 + l] >> (2 * j)) & 3);
            }
}

static void unpack_q3_k(const uint8_t* b, int8_t* q, float* sc, float* mn) {
    const uint8_t* hm = b;
    const uint8_t* qs = b + 32;
    const uint8_t* s = b + 96;
    const float d = h2f(b + 108);
    for (int n = 0; n < 2; n++)
        for (int j = 0; j < 4; j++)
            for (int h = 0; h < 2; h++) {
                const int g = n * 8 + j * 2 + h;
                const int lo = (s[g % 8] >> (4 * (g / 8))) & 0xF, hi = (s[8 + g % 4] >> (2 * (g / 4))) & 3;
                sc[g] = d * (float)((lo | (hi << 4)) - 32);
                mn[g] = 0.f;
                for (int l = 0; l < 16; l++) {
                    const int i = h * 16 + l;
                    const int v = (qs[n * 32 + i] >> (2 * j)) & 3;
                    q[g * 16 + l] = (int8_t)(v - ((hm[i] >> (n * 4 + j)) & 1 ? 0 : 4));
                }
            }
}

static inline void scale_min_k4(int j, const uint8_t* s, int* sc, int* m) {
    if (j < 4) {
        *sc = s[j] & 63;
        *m = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
        *m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

static void unpack_q45_k(int five, const uint8_t* b, int8_t* q, float* sc, float* mn) {
    const float d = h2f(b), dmin = h2f(b + 2);
    const uint8_t* s = b + 4;
    const uint8_t* qh = b + 16;
    const uint8_t* qs = five ? b + 48 : b + 16;
    for (int c = 0; c < 4; c++)
        for (int h = 0; h < 2; h++) {
            const int sub = c * 2 + h;
            int scv, mv;
            scale_min_k4(sub, s, &scv, &mv);
            sc[2 * sub] = sc[2 * sub + 1] = d * (float)scv;
            mn[2 * sub] = mn[2 * sub + 1] = -dmin * (float)mv;
            for (int l = 0; l < 32; l++) {
                int v = (qs[c * 32 + l] >> (4 * h)) & 0xF;
                if (five) v |= ((qh[l] >> sub) & 1) << 4;
                q[sub * 32 + l] = (int8_t)v;
            }
        }
}

static void unpack_q6_k(const uint8_t* b, int8_t* q, float* sc, float* mn) {
    const uint8_t* ql = b;
    const uint8_t* qh = b + 128;
    const int8_t* s = (const int8_t*)(b + 192);
    const float d = h2f(b + 208);
    for (int n = 0; n < 2; n++)
        for (int t = 0; t < 4; t++) {
            for (int h = 0; h < 2; h++) {
                sc[n * 8 + t * 2 + h] = d * (float)s[n * 8 + 2 * t + h];
                mn[n * 8 + t * 2 + h] = 0.f;
            }
            for (int l = 0; l < 32; l++) {
                const int lo = (ql[n * 64 + (t % 2) * 32 + l] >> (4 * (t / 2))) & 0xF;
                const int hi = (qh[n * 32 + l] >> (2 * t)) & 3;
                q[n * 128 + t * 32 + l] = (int8_t)((lo | (hi << 4)) - 32);
            }
        }
}

static void unpack(int t, const uint8_t* b, int8_t* q, float* sc, float* mn) {
    switch (t) {
        case Q2_K: unpack_q2_k(b, q, sc, mn); break;
        case Q3_K: unpack_q3_k(b, q, sc, mn); break;
        case Q4_K: unpack_q45_k(0, b, q, sc, mn); break;
        case Q5_K: unpack_q45_k(1, b, q, sc, mn); break;
        case Q6_K: unpack_q6_k(b, q, sc, mn); break;
        default: unpack_legacy(t, b, q, sc, mn); break;
    }
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
/* 16 floats to out[i..i+16) as float32 or bfloat16 (round to nearest even, as gstore). */
static inline void gstore16(void* out, long i, __m512 v, int dtype) {
    if (dtype != GBF16) {
        _mm512_storeu_ps((float*)out + i, v);
        return;
    }
#if defined(__AVX512BF16__)
    _mm256_storeu_si256((__m256i*)((uint16_t*)out + i), (__m256i)_mm512_cvtneps_pbh(v));
#else
    float tmp[16];
    _mm512_storeu_ps(tmp, v);
    for (int l = 0; l < 16; l++) gstore(out, i + l, tmp[l], dtype);
#endif
}

/* A whole row of Q4_0 / Q4_1 / Q8_0 blocks in 16-value vectors (the batch path dequantizes every
   weight once per step, ~134 M values for the default model: the scalar loop took ~1 ns each). */
static int dequant_row_avx512(int t, const uint8_t* w, int K, void* out, long base, int dtype) {
    const int BB = block_bytes(t);
    if (t != Q4_0 && t != Q4_1 && t != Q8_0) return 0;
    for (int b = 0; b < K / 32; b++) {
        const uint8_t* blk = w + (long)b * BB;
        const __m512 d = _mm512_set1_ps(h2f(blk));
        __m512 lo, hi;
        if (t == Q8_0) {
            lo = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(blk + 2)))));
            hi = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(blk + 18)))));
        } else {
            const __m512 m = _mm512_set1_ps(t == Q4_1 ? h2f(blk + 2) : -8.f * h2f(blk));
            const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(blk + (t == Q4_1 ? 4 : 2))));
            lo = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(0xF))), m);
            hi = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4)), m);
        }
        gstore16(out, base + (long)b * 32, lo, dtype);
        gstore16(out, base + (long)b * 32 + 16, hi, dtype);
    }
    return 1;
}
#endif

/* out[r, :K] = the dequantized row rows[r] (or r when rows is NULL) of W. */
void aph_gguf_dequantize(int t, const uint8_t* W, long row_bytes, const int64_t* rows, int R, int K,
                         void* out, int dtype) {
    const int QK = block_values(t), BB = block_bytes(t);
    #pragma omp parallel for schedule(static)
    for (int r = 0; r < R; r++) {
        const uint8_t* w = W + (rows ? rows[r] : r) * row_bytes;
#if defined(__AVX512F__) && defined(__AVX512BW__)
        if (dequant_row_avx512(t, w, K, out, (long)r * K, dtype)) continue;
#endif
        int8_t q[256];
        float sc[16], mn[16];
        for (int b = 0; b < K / QK; b++) {
            unpack(t, w + (long)b * BB, q, sc, mn);
            const long base = (long)r * K + (long)b * QK;
            for (int i = 0; i < QK; i++) gstore(out, base + i, sc[i / 16] * (float)q[i] + mn[i / 16], dtype);
        }
    }
}

/* ---------------------------------------------------------------------------------------------
 * Activations: 32 values as int8 codes with one scale d; ds[g] = d * (sum of the codes of
 * half g), for the offset terms (mins, the -8 of Q4_0, the -32 of Q6_K). */
typedef struct {
    int8_t q[32];
    float d;
    float ds[2];
    float pad;
} act_block;

static void quantize_acts(const void* x, int dtype, int M, int K, act_block* out) {
    const int nb = K / 32;
    for (int m = 0; m < M; m++)
        for (int b = 0; b < nb; b++) {
            float v[32], amax = 0.f;
            for (int i = 0; i < 32; i++) {
                v[i] = gload(x, (long)m * K + b * 32 + i, dtype);
                const float a = fabsf(v[i]);
                amax = a > amax ? a : amax;
            }
            act_block* a = out + (long)m * nb + b;
            const float d = amax / 127.f, id = d > 0.f ? 1.f / d : 0.f;
            int s0 = 0, s1 = 0;
            for (int i = 0; i < 32; i++) {
                const int c = (int)nearbyintf(v[i] * id);
                a->q[i] = (int8_t)c;
                if (i < 16) s0 += c; else s1 += c;
            }
            a->d = d;
            a->ds[0] = d * (float)s0;
            a->ds[1] = d * (float)s1;
            a->pad = 0.f;
        }
}

/* acc[m] += row . activation row m, any type: unpack a block once, then integer dots per 16. */
static void row_dot_portable(int t, const uint8_t* w, const act_block* acts, int M, int K, float* acc) {
    const int QK = block_values(t), BB = block_bytes(t), nb = K / 32;
    int8_t q[256];
    float sc[16], mn[16];
    for (int b = 0; b < K / QK; b++) {
        unpack(t, w + (long)b * BB, q, sc, mn);
        for (int m = 0; m < M; m++) {
            const act_block* a = acts + (long)m * nb + b * (QK / 32);
            float s = 0.f;
            for (int g = 0; g < QK / 16; g++) {
                const act_block* ab = a + g / 2;
                const int8_t* qa = ab->q + (g % 2) * 16;
                const int8_t* qw = q + g * 16;
                int isum = 0;
                for (int l = 0; l < 16; l++) isum += (int)qw[l] * (int)qa[l];
                s += sc[g] * ab->d * (float)isum + mn[g] * ab->ds[g % 2];
            }
            acc[m] += s;
        }
    }
}

#if defined(__AVX2__)
/* 8 int32 lanes, lane i = sum of the 4 products u[4i..4i+3] * s[4i..4i+3] (u unsigned, s signed). */
static inline __m256i dot_u8s8(__m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#elif defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline __m256i nibbles32(const uint8_t* p) {   /* 16 bytes -> [low nibbles | high nibbles] */
    const __m128i v = _mm_loadu_si128((const __m128i*)p);
    const __m128i mask = _mm_set1_epi8(0x0F);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), mask), _mm_and_si128(v, mask));
}

#define MAXM 8

/* Q4_0 / Q4_1 / Q8_0: one 32-value block per step, for every activation row. */
static void row_dot_legacy_avx2(int t, const uint8_t* w, const act_block* acts, int M, int K, float* out) {
    const int nb = K / 32, BB = block_bytes(t);
    __m256 acc[MAXM];
    float off[MAXM];
    for (int m = 0; m < M; m++) { acc[m] = _mm256_setzero_ps(); off[m] = 0.f; }
    for (int b = 0; b < nb; b++) {
        const uint8_t* blk = w + (long)b * BB;
        const float d = h2f(blk);
        if (t == Q8_0) {
            const __m256i qw = _mm256_loadu_si256((const __m256i*)(blk + 2));
            const __m256i u = _mm256_sign_epi8(qw, qw);
            for (int m = 0; m < M; m++) {
                const act_block* a = acts + (long)m * nb + b;
                const __m256i s = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i*)a->q), qw);
                acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u8s8(u, s)), _mm256_set1_ps(d * a->d), acc[m]);
            }
        } else {
            const float mb = t == Q4_1 ? h2f(blk + 2) : -8.f * d;
            const __m256i u = nibbles32(blk + (t == Q4_1 ? 4 : 2));
            for (int m = 0; m < M; m++) {
                const act_block* a = acts + (long)m * nb + b;
                const __m256i s = _mm256_loadu_si256((const __m256i*)a->q);
                acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u8s8(u, s)), _mm256_set1_ps(d * a->d), acc[m]);
                off[m] += mb * (a->ds[0] + a->ds[1]);
            }
        }
    }
    for (int m = 0; m < M; m++) out[m] += hsum8(acc[m]) + off[m];
}

/* Q4_K / Q5_K: 8 sub-blocks of 32 values with 6-bit scales and mins. */
static void row_dot_q45k_avx2(int five, const uint8_t* w, const act_block* acts, int M, int K, float* out) {
    const int nb = K / 32, BB = five ? 176 : 144;
    const __m256i mask = _mm256_set1_epi8(0x0F);
    __m256 acc[MAXM];
    float off[MAXM];
    for (int m = 0; m < M; m++) { acc[m] = _mm256_setzero_ps(); off[m] = 0.f; }
    for (int b = 0; b < K / 256; b++) {
        const uint8_t* blk = w + (long)b * BB;
        const float d = h2f(blk), dmin = h2f(blk + 2);
        const uint8_t* qs = blk + (five ? 48 : 16);
        float scs[8], mns[8];
        for (int j = 0; j < 8; j++) {
            int sc, mv;
            scale_min_k4(j, blk + 4, &sc, &mv);
            scs[j] = d * (float)sc;
            mns[j] = dmin * (float)mv;
        }
        const __m256i qh = five ? _mm256_loadu_si256((const __m256i*)(blk + 16)) : _mm256_setzero_si256();
        for (int c = 0; c < 4; c++) {
            const __m256i bytes = _mm256_loadu_si256((const __m256i*)(qs + c * 32));
            __m256i lo = _mm256_and_si256(bytes, mask);
            __m256i hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), mask);
            if (five) {   /* bit (2c) of qh[l] tops value l of sub-block 2c, bit (2c+1) of sub-block 2c+1 */
                const __m256i one = _mm256_set1_epi8(1);
                const __m256i b0 = _mm256_and_si256(_mm256_srli_epi16(qh, 2 * c), one);
                const __m256i b1 = _mm256_and_si256(_mm256_srli_epi16(qh, 2 * c + 1), one);
                lo = _mm256_or_si256(lo, _mm256_slli_epi16(b0, 4));
                hi = _mm256_or_si256(hi, _mm256_slli_epi16(b1, 4));
            }
            for (int m = 0; m < M; m++) {
                const act_block* a0 = acts + (long)m * nb + b * 8 + 2 * c;
                const act_block* a1 = a0 + 1;
                const __m256 p0 = _mm256_cvtepi32_ps(dot_u8s8(lo, _mm256_loadu_si256((const __m256i*)a0->q)));
                const __m256 p1 = _mm256_cvtepi32_ps(dot_u8s8(hi, _mm256_loadu_si256((const __m256i*)a1->q)));
                acc[m] = _mm256_fmadd_ps(p0, _mm256_set1_ps(scs[2 * c] * a0->d), acc[m]);
                acc[m] = _mm256_fmadd_ps(p1, _mm256_set1_ps(scs[2 * c + 1] * a1->d), acc[m]);
                off[m] -= mns[2 * c] * (a0->ds[0] + a0->ds[1]) + mns[2 * c + 1] * (a1->ds[0] + a1->ds[1]);
            }
        }
    }
    for (int m = 0; m < M; m++) out[m] += hsum8(acc[m]) + off[m];
}

/* Q6_K: 16 sub-blocks of 16 values with int8 scales; codes stored as 0..63, offset -32. */
static void row_dot_q6k_avx2(const uint8_t* w, const act_block* acts, int M, int K, float* out) {
    const int nb = K / 32;
    const __m256i mask = _mm256_set1_epi8(0x0F), three = _mm256_set1_epi8(3);
    __m256 acc[MAXM];
    float off[MAXM];
    for (int m = 0; m < M; m++) { acc[m] = _mm256_setzero_ps(); off[m] = 0.f; }
    for (int b = 0; b < K / 256; b++) {
        const uint8_t* blk = w + (long)b * 210;
        const int8_t* s = (const int8_t*)(blk + 192);
        const float d = h2f(blk + 208);
        for (int n = 0; n < 2; n++) {
            const __m256i l0 = _mm256_loadu_si256((const __m256i*)(blk + n * 64));
            const __m256i l1 = _mm256_loadu_si256((const __m256i*)(blk + n * 64 + 32));
            const __m256i h = _mm256_loadu_si256((const __m256i*)(blk + 128 + n * 32));
            __m256i q[4];
            q[0] = _mm256_or_si256(_mm256_and_si256(l0, mask), _mm256_slli_epi16(_mm256_and_si256(h, three), 4));
            q[1] = _mm256_or_si256(_mm256_and_si256(l1, mask),
                                   _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 2), three), 4));
            q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), mask),
                                   _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 4), three), 4));
            q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), mask),
                                   _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 6), three), 4));
            for (int t = 0; t < 4; t++) {
                const float s0 = d * (float)s[n * 8 + 2 * t], s1 = d * (float)s[n * 8 + 2 * t + 1];
                for (int m = 0; m < M; m++) {
                    const act_block* a = acts + (long)m * nb + b * 8 + n * 4 + t;
                    const __m256 p = _mm256_cvtepi32_ps(dot_u8s8(q[t], _mm256_loadu_si256((const __m256i*)a->q)));
                    const __m256 scale = _mm256_set_m128(_mm_set1_ps(s1 * a->d), _mm_set1_ps(s0 * a->d));
                    acc[m] = _mm256_fmadd_ps(p, scale, acc[m]);
                    off[m] -= 32.f * (s0 * a->ds[0] + s1 * a->ds[1]);
                }
            }
        }
    }
    for (int m = 0; m < M; m++) out[m] += hsum8(acc[m]) + off[m];
}
#endif

/* Exact variant: acc[m] += row . x[m] with float32 activations (no 8-bit rounding of x): each
   block is dequantized once into a float buffer in L1 and multiplied with every input row. */
static void dequant_block(int t, const uint8_t* b, float* v) {
    int8_t q[256];
    float sc[16], mn[16];
    if (t == Q8_0) {
        const float d = h2f(b);
        #pragma omp simd
        for (int i = 0; i < 32; i++) v[i] = d * (float)(int8_t)b[2 + i];
        return;
    }
    if (t == Q4_1 || t == Q4_0) {
        const float d = h2f(b), m = t == Q4_1 ? h2f(b + 2) : -8.f * d;
        const uint8_t* qs = b + (t == Q4_1 ? 4 : 2);
        #pragma omp simd
        for (int j = 0; j < 16; j++) {
            v[j] = d * (float)(qs[j] & 0xF) + m;
            v[j + 16] = d * (float)(qs[j] >> 4) + m;
        }
        return;
    }
    unpack(t, b, q, sc, mn);
    const int QK = block_values(t);
    for (int g = 0; g < QK / 16; g++) {
        const float s = sc[g], o = mn[g];
        #pragma omp simd
        for (int l = 0; l < 16; l++) v[g * 16 + l] = s * (float)q[g * 16 + l] + o;
    }
}

static void row_dot_exact(int t, const uint8_t* w, const float* xf, int M, int K, float* out) {
    const int QK = block_values(t), BB = block_bytes(t);
    float v[256] __attribute__((aligned(64)));
    float acc[8][16] __attribute__((aligned(64)));
    memset(acc, 0, sizeof(acc));
    for (int b = 0; b < K / QK; b++) {
        dequant_block(t, w + (long)b * BB, v);
        for (int m = 0; m < M; m++) {
            const float* xm = xf + (long)m * K + (long)b * QK;
            for (int i = 0; i < QK; i += 16) {
                #pragma omp simd
                for (int j = 0; j < 16; j++) acc[m][j] += v[i + j] * xm[i + j];
            }
        }
    }
    for (int m = 0; m < M; m++) {
        float s = 0.f;
        for (int j = 0; j < 16; j++) s += acc[m][j];
        out[m] += s;
    }
}

#if defined(__AVX512F__)
/* Exact paths with AVX-512: codes widened to 16 float lanes, multiplied with the float
   activations; per-block offsets (mins, -8) use the activation sums of 32-value blocks. */
static inline __m512 u8x16_ps(const uint8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p)));
}

static inline __attribute__((always_inline)) void exact_legacy_avx512(int t, const uint8_t* w, const float* xf,
                                                                      const float* xsum, const int M, int K,
                                                                      float* out) {
    const int nb = K / 32, BB = block_bytes(t);
    __m512 acc[8];
    float off[8];
    for (int m = 0; m < M; m++) { acc[m] = _mm512_setzero_ps(); off[m] = 0.f; }
    for (int b = 0; b < nb; b++) {
        const uint8_t* blk = w + (long)b * BB;
        const __m512 dv = _mm512_set1_ps(h2f(blk));
        __m512 q0, q1;
        float mb = 0.f;
        if (t == Q8_0) {
            q0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(blk + 2))));
            q1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(blk + 18))));
        } else {
            const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(blk + (t == Q4_1 ? 4 : 2))));
            q0 = _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(0xF)));
            q1 = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
            mb = t == Q4_1 ? h2f(blk + 2) : -8.f * h2f(blk);
        }
        for (int m = 0; m < M; m++) {
            const float* x = xf + (long)m * K + (long)b * 32;
            const __m512 s = _mm512_fmadd_ps(q1, _mm512_loadu_ps(x + 16), _mm512_mul_ps(q0, _mm512_loadu_ps(x)));
            acc[m] = _mm512_fmadd_ps(s, dv, acc[m]);
            off[m] += mb * xsum[(long)m * nb + b];
        }
    }
    for (int m = 0; m < M; m++) out[m] += _mm512_reduce_add_ps(acc[m]) + off[m];
}

static inline __attribute__((always_inline)) void exact_q4k_avx512(const uint8_t* w, const float* xf,
                                                                   const float* xsum, const int M, int K,
                                                                   float* out) {
    const int nb = K / 32;
    __m512 acc[8];
    float off[8];
    for (int m = 0; m < M; m++) { acc[m] = _mm512_setzero_ps(); off[m] = 0.f; }
    for (int b = 0; b < K / 256; b++) {
        const uint8_t* blk = w + (long)b * 144;
        const float d = h2f(blk), dmin = h2f(blk + 2);
        for (int c = 0; c < 4; c++) {
            int sc0, m0, sc1, m1;
            scale_min_k4(2 * c, blk + 4, &sc0, &m0);
            scale_min_k4(2 * c + 1, blk + 4, &sc1, &m1);
            const __m512 d0 = _mm512_set1_ps(d * (float)sc0), d1 = _mm512_set1_ps(d * (float)sc1);
            const uint8_t* qs = blk + 16 + c * 32;
            const __m512i v0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)qs));
            const __m512i v1 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(qs + 16)));
            const __m512i f = _mm512_set1_epi32(0xF);
            const __m512 a0 = _mm512_cvtepi32_ps(_mm512_and_si512(v0, f));
            const __m512 a1 = _mm512_cvtepi32_ps(_mm512_and_si512(v1, f));
            const __m512 b0 = _mm512_cvtepi32_ps(_mm512_srli_epi32(v0, 4));
            const __m512 b1 = _mm512_cvtepi32_ps(_mm512_srli_epi32(v1, 4));
            for (int m = 0; m < M; m++) {
                const float* x = xf + (long)m * K + (long)b * 256 + c * 64;
                const __m512 s0 = _mm512_fmadd_ps(a1, _mm512_loadu_ps(x + 16), _mm512_mul_ps(a0, _mm512_loadu_ps(x)));
                const __m512 s1 = _mm512_fmadd_ps(b1, _mm512_loadu_ps(x + 48),
                                                  _mm512_mul_ps(b0, _mm512_loadu_ps(x + 32)));
                acc[m] = _mm512_fmadd_ps(s1, d1, _mm512_fmadd_ps(s0, d0, acc[m]));
                const float* xs = xsum + (long)m * nb + b * 8 + 2 * c;
                off[m] -= dmin * ((float)m0 * xs[0] + (float)m1 * xs[1]);
            }
        }
    }
    for (int m = 0; m < M; m++) out[m] += _mm512_reduce_add_ps(acc[m]) + off[m];
}

static inline __attribute__((always_inline)) void exact_q6k_avx512(const uint8_t* w, const float* xf, const int M,
                                                                   int K, float* out) {
    __m512 acc[8];
    for (int m = 0; m < M; m++) acc[m] = _mm512_setzero_ps();
    const __m512i f = _mm512_set1_epi32(0xF), three = _mm512_set1_epi32(3), c32 = _mm512_set1_epi32(32);
    for (int b = 0; b < K / 256; b++) {
        const uint8_t* blk = w + (long)b * 210;
        const int8_t* sc = (const int8_t*)(blk + 192);
        const float d = h2f(blk + 208);
        for (int n = 0; n < 2; n++)
            for (int hh = 0; hh < 2; hh++) {   /* values l in [16 hh, 16 hh + 16) of each quarter */
                const __m512i l0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(blk + n * 64 + hh * 16)));
                const __m512i l1 = _mm512_cvtepu8_epi32(
                    _mm_loadu_si128((const __m128i*)(blk + n * 64 + 32 + hh * 16)));
                const __m512i h = _mm512_cvtepu8_epi32(
                    _mm_loadu_si128((const __m128i*)(blk + 128 + n * 32 + hh * 16)));
                __m512 q[4];
                q[0] = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_or_si512(
                    _mm512_and_si512(l0, f), _mm512_slli_epi32(_mm512_and_si512(h, three), 4)), c32));
                q[1] = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_or_si512(
                    _mm512_and_si512(l1, f), _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(h, 2), three), 4)),
                    c32));
                q[2] = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_or_si512(
                    _mm512_srli_epi32(l0, 4), _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(h, 4), three), 4)),
                    c32));
                q[3] = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_or_si512(
                    _mm512_srli_epi32(l1, 4), _mm512_slli_epi32(_mm512_srli_epi32(h, 6), 4)), c32));
                for (int t = 0; t < 4; t++) {
                    const __m512 sv = _mm512_set1_ps(d * (float)sc[n * 8 + 2 * t + hh]);
                    const __m512 qs = _mm512_mul_ps(q[t], sv);
                    for (int m = 0; m < M; m++) {
                        const float* x = xf + (long)m * K + (long)b * 256 + n * 128 + t * 32 + hh * 16;
                        acc[m] = _mm512_fmadd_ps(qs, _mm512_loadu_ps(x), acc[m]);
                    }
                }
            }
    }
    for (int m = 0; m < M; m++) out[m] += _mm512_reduce_add_ps(acc[m]);
}

/* A pair of Q4_0 / Q4_1 / Q8_0 blocks' scales as [d0, m0, d1, m1]: m is Q4_1's minimum, Q4_0's -8 d
   (its codes are offset by 8) and 0 for Q8_0. */
static inline __attribute__((always_inline)) __m128 legacy_pair_scales(const int t, const uint8_t* b0,
                                                                       const uint8_t* b1) {
    uint32_t h0, h1;
    memcpy(&h0, b0, 4);
    memcpy(&h1, b1, 4);
    if (t == Q4_0) { h0 = (h0 & 0xFFFFu) * 0x10001u; h1 = (h1 & 0xFFFFu) * 0x10001u; }
    if (t == Q8_0) { h0 &= 0xFFFFu; h1 &= 0xFFFFu; }
    const __m128 dm = _mm_cvtph_ps(_mm_set_epi32(0, 0, (int)h1, (int)h0));
    return t == Q4_0 ? _mm_mul_ps(dm, _mm_set_ps(-8.f, 1.f, -8.f, 1.f)) : dm;
}

/* One activation row against Q4_0 / Q4_1 / Q8_0, two blocks per step: the pair's [d0, m0, d1, m1]
   come from one half-to-float conversion, and the offsets (minimums, Q4_0's -8 d) accumulate in a
   4-wide vector against [0, sum0, 0, sum1] of the activations (batch-1 decode: ~1/3 fewer
   instructions per block than exact_legacy_avx512, same products). K a multiple of 64. */
static inline __attribute__((always_inline)) void exact_legacy_pairs_avx512(const int t, const uint8_t* w,
                                                                            const float* xf, const float* xsum,
                                                                            int K, float* out) {
    const int BB = t == Q8_0 ? 34 : t == Q4_1 ? 20 : 18;
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    __m128 off = _mm_setzero_ps();
    const __m512i f = _mm512_set1_epi32(0xF);
    for (int p = 0; p < K / 64; p++) {
        const uint8_t* b0 = w + (long)(2 * p) * BB;
        const uint8_t* b1 = b0 + BB;
        const __m128 dm = legacy_pair_scales(t, b0, b1);
        const float* x = xf + (long)p * 64;
        __m512 s0, s1;
        if (t == Q8_0) {
            s0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(b0 + 18)))),
                                 _mm512_loadu_ps(x + 16),
                                 _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                                     _mm_loadu_si128((const __m128i*)(b0 + 2)))), _mm512_loadu_ps(x)));
            s1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(b1 + 18)))),
                                 _mm512_loadu_ps(x + 48),
                                 _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                                     _mm_loadu_si128((const __m128i*)(b1 + 2)))), _mm512_loadu_ps(x + 32)));
        } else {
            const int o = t == Q4_1 ? 4 : 2;
            const __m512i v0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(b0 + o)));
            const __m512i v1 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(b1 + o)));
            s0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(v0, 4)), _mm512_loadu_ps(x + 16),
                                 _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_and_si512(v0, f)), _mm512_loadu_ps(x)));
            s1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(v1, 4)), _mm512_loadu_ps(x + 48),
                                 _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_and_si512(v1, f)), _mm512_loadu_ps(x + 32)));
            const __m128 xs = _mm_set_ps(xsum[2 * p + 1], 0.f, xsum[2 * p], 0.f);
            off = _mm_fmadd_ps(dm, xs, off);
        }
        acc0 = _mm512_fmadd_ps(s0, _mm512_broadcastss_ps(dm), acc0);
        acc1 = _mm512_fmadd_ps(s1, _mm512_broadcastss_ps(_mm_movehl_ps(dm, dm)), acc1);
    }
    __m128 o = _mm_add_ps(off, _mm_movehl_ps(off, off));
    o = _mm_add_ss(o, _mm_movehdup_ps(o));
    out[0] += _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1)) + _mm_cvtss_f32(o);
}

#define EXACT_DISPATCH(CALL)                 \
    switch (M) {                             \
        case 1: { const int M_ = 1; CALL; } break; \
        case 2: { const int M_ = 2; CALL; } break; \
        case 3: { const int M_ = 3; CALL; } break; \
        case 4: { const int M_ = 4; CALL; } break; \
        case 5: { const int M_ = 5; CALL; } break; \
        case 6: { const int M_ = 6; CALL; } break; \
        case 7: { const int M_ = 7; CALL; } break; \
        case 8: { const int M_ = 8; CALL; } break; \
        default: { const int M_ = M; CALL; } break; \
    }

/* 1 when an AVX-512 exact path handled the row. */
static int row_dot_exact_avx512(int t, const uint8_t* w, const float* xf, const float* xsum, int M, int K,
                                float* out) {
    switch (t) {
        case Q4_0: case Q4_1: case Q8_0:
            if (M == 1 && K % 64 == 0) {
                if (t == Q4_1) exact_legacy_pairs_avx512(Q4_1, w, xf, xsum, K, out);
                else if (t == Q4_0) exact_legacy_pairs_avx512(Q4_0, w, xf, xsum, K, out);
                else exact_legacy_pairs_avx512(Q8_0, w, xf, xsum, K, out);
                return 1;
            }
            EXACT_DISPATCH(exact_legacy_avx512(t, w, xf, xsum, M_, K, out));
            return 1;
        case Q4_K: EXACT_DISPATCH(exact_q4k_avx512(w, xf, xsum, M_, K, out)); return 1;
        case Q6_K: EXACT_DISPATCH(exact_q6k_avx512(w, xf, M_, K, out)); return 1;
        default: return 0;
    }
}
#endif

/* A buffer that lives as long as the calling thread and only grows: the activations of every
   call go here instead of a malloc/free per matmul (decode makes ~120 calls a token). Slots 0 and 1
   of the thread that calls aph_gguf_linear hold its activations; gguf_gemm.c also keeps each OpenMP
   thread's weight panel in slot 1 (inside its parallel region, after the caller's last use). */
void* aph_gguf_thread_scratch(int slot, size_t bytes) {
    static __thread void* buf[2];
    static __thread size_t cap[2];
    if (cap[slot] < bytes) {
        free(buf[slot]);
        cap[slot] = (bytes + 4095) / 4096 * 4096;
        buf[slot] = aligned_alloc(64, cap[slot]);
        if (!buf[slot]) cap[slot] = 0;
    }
    return buf[slot];
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define GGUF_VNNI512 1
/*
 * Q4_0 / Q4_1 / Q8_0 with 8-bit activations on AVX-512 VNNI: two 32-value blocks per 512-bit
 * vpdpbusd (64 products). The 16 nibble bytes of blocks b0, b1 unpack to the byte order
 * [b0 0-15 | b1 0-15 | b0 16-31 | b1 16-31]; the activation codes are stored in that order, so
 * int32 lanes 0-3 and 8-11 belong to b0 and 4-7, 12-15 to b1. vpdpbusd multiplies unsigned by
 * signed bytes: Q4 codes (0..15) are the unsigned side; for Q8_0 the activation codes are stored
 * with their top bit flipped (c + 128, unsigned) and the extra 128 * sum(w) is taken off through
 * the accumulator's start value.
 * Scales: per pair of blocks the weights give [d0, m0, d1, m1] (m: Q4_1's minimum, Q4_0's -8 d,
 * 0 for Q8_0) and each activation row [a0, s0, a1, s1] (a: the 8-bit scale, s = a * sum of the
 * block's codes); one 4-wide product holds both products' scales (lanes 0, 2, spread to the
 * int32 lanes by one permute) and the offset terms m * s (lanes 1, 3, added to the accumulator).
 * A tile of NR weight rows x MR activation rows shares each load of both sides.
 */
static void quantize_acts_vnni(const void* x, int dtype, int M, int K, int flip, int8_t* codes, float* asc) {
    const int np = K / 64;
    for (int m = 0; m < M; m++)
        for (int p = 0; p < np; p++) {
            float* s = asc + ((long)m * np + p) * 4;
            for (int b = 0; b < 2; b++) {
                const long i0 = (long)m * K + (long)p * 64 + b * 32;
                __m512i q0, q1;
                const float d = q8_block32(x, dtype == GBF16, i0, &q0, &q1);
                const int sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
                __m128i c0 = _mm512_cvtsepi32_epi8(q0), c1 = _mm512_cvtsepi32_epi8(q1);
                if (flip) {
                    c0 = _mm_xor_si128(c0, _mm_set1_epi8((char)0x80));
                    c1 = _mm_xor_si128(c1, _mm_set1_epi8((char)0x80));
                }
                int8_t* c = codes + (long)m * K + (long)p * 64 + b * 16;
                _mm_storeu_si128((__m128i*)c, c0);
                _mm_storeu_si128((__m128i*)(c + 32), c1);
                s[2 * b] = d;
                s[2 * b + 1] = d * (float)sum;
            }
        }
}

/* out[j * MR + m] = weight row j of the tile . activation row m, for NR rows at w (stride row_bytes). */
static inline __attribute__((always_inline)) void vnni_tile(const int t, const int NR, const int MR, const uint8_t* w,
                                                            long row_bytes, const int8_t* codes, const float* asc,
                                                            int K, float* out) {
    const int np = K / 64, BB = t == Q8_0 ? 34 : t == Q4_1 ? 20 : 18;
    const __m512i lane_idx = _mm512_set_epi32(2, 2, 2, 2, 0, 0, 0, 0, 2, 2, 2, 2, 0, 0, 0, 0);
    const __m512i f = _mm512_set1_epi8(0x0F);
    __m512 acc[4][4];
    for (int j = 0; j < NR; j++)
        for (int m = 0; m < MR; m++) acc[j][m] = _mm512_setzero_ps();
    for (int p = 0; p < np; p++) {
        __m512i u[4], start[4];
        __m128 dm[4];
        _Pragma("GCC unroll 4")
        for (int j = 0; j < NR; j++) {
            const uint8_t* b0 = w + (long)j * row_bytes + (long)(2 * p) * BB;
            const uint8_t* b1 = b0 + BB;
            dm[j] = legacy_pair_scales(t, b0, b1);
            start[j] = _mm512_setzero_si512();
            if (t == Q8_0) {
                const __m512i z = _mm512_inserti64x4(
                    _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)(b0 + 2))),
                    _mm256_loadu_si256((const __m256i*)(b1 + 2)), 1);
                u[j] = _mm512_shuffle_i64x2(z, z, _MM_SHUFFLE(3, 1, 2, 0));
                start[j] = _mm512_sub_epi32(start[j], _mm512_dpbusd_epi32(start[j], _mm512_set1_epi8((char)0x80), u[j]));
            } else {
                const int o = t == Q4_1 ? 4 : 2;
                const __m256i v = _mm256_inserti128_si256(
                    _mm256_castsi128_si256(_mm_loadu_si128((const __m128i*)(b0 + o))),
                    _mm_loadu_si128((const __m128i*)(b1 + o)), 1);
                u[j] = _mm512_and_si512(_mm512_inserti64x4(_mm512_castsi256_si512(v), _mm256_srli_epi16(v, 4), 1), f);
            }
        }
        _Pragma("GCC unroll 4")
        for (int m = 0; m < MR; m++) {
            const __m512i a = _mm512_loadu_si512((const void*)(codes + (long)m * K + (long)p * 64));
            const __m128 as = _mm_loadu_ps(asc + ((long)m * np + p) * 4);
            _Pragma("GCC unroll 4")
            for (int j = 0; j < NR; j++) {
                const __m128 prod = _mm_mul_ps(dm[j], as);    /* [d0 a0, m0 s0, d1 a1, m1 s1] */
                const __m512 sc = _mm512_permutexvar_ps(lane_idx, _mm512_castps128_ps512(prod));
                const __m512i dot = t == Q8_0 ? _mm512_dpbusd_epi32(start[j], a, u[j])
                                              : _mm512_dpbusd_epi32(start[j], u[j], a);
                acc[j][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), sc, acc[j][m]);
                if (t != Q8_0) acc[j][m] = _mm512_mask_add_ps(acc[j][m], 0x000A, acc[j][m], _mm512_castps128_ps512(prod));
            }
        }
    }
    for (int j = 0; j < NR; j++)
        for (int m = 0; m < MR; m++) out[j * MR + m] = _mm512_reduce_add_ps(acc[j][m]);
}

#define VNNI_MR(T, NR_)                                                                              \
    switch (mr) {                                                                                    \
        case 1: vnni_tile(T, NR_, 1, w, row_bytes, codes, asc, K, out); break;                       \
        case 2: vnni_tile(T, NR_, 2, w, row_bytes, codes, asc, K, out); break;                       \
        case 3: vnni_tile(T, NR_, 3, w, row_bytes, codes, asc, K, out); break;                       \
        default: vnni_tile(T, NR_, 4, w, row_bytes, codes, asc, K, out); break;                      \
    }
#define VNNI_NR(T)                                  \
    switch (nr) {                                   \
        case 1: VNNI_MR(T, 1) break;                \
        case 2: VNNI_MR(T, 2) break;                \
        case 3: VNNI_MR(T, 3) break;                \
        default: VNNI_MR(T, 4) break;               \
    }

static void vnni_tile_any(int t, int nr, int mr, const uint8_t* w, long row_bytes, const int8_t* codes,
                          const float* asc, int K, float* out) {
    switch (t) {
        case Q4_0: VNNI_NR(Q4_0) break;
        case Q4_1: VNNI_NR(Q4_1) break;
        default: VNNI_NR(Q8_0) break;
    }
}

/* The whole 8-bit-activation product for Q4_0 / Q4_1 / Q8_0 with K a multiple of 64: the
   activations are quantized once; each thread takes tiles of 4 weight rows and runs them against
   4 activation rows at a time while the tile's blocks are in L1 (a weight is read once per call). */
static int linear_vnni(int t, const uint8_t* W, long row_bytes, const void* x, const void* bias, void* y, long ldy,
                       int M, int N, int K, int dtype) {
    const int np = K / 64;
    int8_t* codes = (int8_t*)aph_gguf_thread_scratch(0, (size_t)M * K);
    float* asc = (float*)aph_gguf_thread_scratch(1, (size_t)M * np * 4 * sizeof(float));
    if (!codes || !asc) return 0;
    quantize_acts_vnni(x, dtype, M, K, t == Q8_0, codes, asc);
    const int NT = M <= 2 ? 1 : 4;   /* one row at a time streams fastest at batch 1 (measured) */
    const int tiles = (N + NT - 1) / NT;
    #pragma omp parallel for schedule(static)
    for (int tile = 0; tile < tiles; tile++) {
        const int n0 = tile * NT, nr = N - n0 < NT ? N - n0 : NT;
        for (int m0 = 0; m0 < M; m0 += 4) {
            const int mr = M - m0 < 4 ? M - m0 : 4;
            float out[16];
            vnni_tile_any(t, nr, mr, W + (long)n0 * row_bytes, row_bytes, codes + (long)m0 * K,
                          asc + (long)m0 * np * 4, K, out);
            for (int j = 0; j < nr; j++) {
                const float bn = bias ? gload(bias, n0 + j, dtype) : 0.f;
                for (int m = 0; m < mr; m++) gstore(y, (long)(m0 + m) * ldy + n0 + j, out[j * mr + m] + bn, dtype);
            }
        }
    }
    return 1;
}
#endif

/* From gguf_gemm.c: the blocked GEMMs for many rows (8-bit or float activations), and from how many rows
   they win over linear_vnni / the exact GEMV (all matmuls of a step of the default model, one thread). */
int aph_gguf_gemm_q8(int t, const uint8_t* W, long row_bytes, const void* x, const void* bias, void* y, long ldy,
                     int M, int N, int K, int dtype);
int aph_gguf_gemm_f32(int t, const uint8_t* W, long row_bytes, const void* x, const void* bias, void* y, long ldy,
                      int M, int N, int K, int dtype);
#define GEMM_F32_MIN_ROWS 8   /* float32: 4 rows GEMV 19.8 vs 24.0 ms; 8 rows 38.4 vs 33.0; 16 rows 77.3 vs 50.9 */
#define GEMM_MIN_ROWS 3   /* 2 rows: linear_vnni 8.8 vs 9.6 ms a step of the default model; 4 rows: 16.2 vs 11.6 */

static void row_dot(int t, const uint8_t* w, const act_block* acts, int M, int K, float* acc, int portable) {
#if defined(__AVX2__)
    if (!portable) {
        switch (t) {
            case Q4_0: case Q4_1: case Q8_0: row_dot_legacy_avx2(t, w, acts, M, K, acc); return;
            case Q4_K: row_dot_q45k_avx2(0, w, acts, M, K, acc); return;
            case Q5_K: row_dot_q45k_avx2(1, w, acts, M, K, acc); return;
            case Q6_K: row_dot_q6k_avx2(w, acts, M, K, acc); return;
            default: break;
        }
    }
#endif
    (void)portable;
    row_dot_portable(t, w, acts, M, K, acc);
}

/*
 * y[m, n] (row stride ldy) = x[m, :] . dequant(W[n, :]) (+ bias[n]) for M rows of x [M, K].
 * Returns 0 when the type or K is not supported (nothing written). portable=1 forces the
 * portable code (the tests check both paths against the same reference); exact=1 keeps the
 * activations in float32 (results as dequantize-then-matmul, to float32 rounding).
 */
int aph_gguf_linear(int t, const uint8_t* W, long row_bytes, const void* x, const void* bias, void* y,
                    long ldy, int M, int N, int K, int dtype, int portable, int exact) {
    const int QK = block_values(t);
    if (QK == 0 || K % QK != 0 || M < 1) return 0;
    if (exact) {
        if (!portable && dtype == GF32 && M >= GEMM_F32_MIN_ROWS
            && aph_gguf_gemm_f32(t, W, row_bytes, x, bias, y, ldy, M, N, K, dtype))
            return 1;
        const int nb = K / 32;
        float* xf = (float*)aph_gguf_thread_scratch(0, ((size_t)M * K + (size_t)M * nb) * sizeof(float));
        if (!xf) return 0;
        float* xsum = xf + (long)M * K;   /* sums of 32-value blocks */
        for (long i = 0; i < (long)M * K; i++) xf[i] = gload(x, i, dtype);
        for (long i = 0; i < (long)M * nb; i++) {
            float s = 0.f;
            for (int j = 0; j < 32; j++) s += xf[i * 32 + j];
            xsum[i] = s;
        }
        for (int m0 = 0; m0 < M; m0 += 8) {
            const int mc = M - m0 < 8 ? M - m0 : 8;
            #pragma omp parallel for schedule(static)
            for (int n = 0; n < N; n++) {
                float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
                const uint8_t* wr = W + (long)n * row_bytes;
#if defined(__AVX512F__)
                if (portable || !row_dot_exact_avx512(t, wr, xf + (long)m0 * K, xsum + (long)m0 * nb, mc, K, acc))
#endif
                    row_dot_exact(t, wr, xf + (long)m0 * K, mc, K, acc);
                const float bn = bias ? gload(bias, n, dtype) : 0.f;
                for (int m = 0; m < mc; m++) gstore(y, (long)(m0 + m) * ldy + n, acc[m] + bn, dtype);
            }
        }
        return 1;
    }
#if defined(GGUF_VNNI512)
    /* many rows: the blocked GEMM (gguf_gemm.c), which refuses what it does not cover */
    if (!portable && M >= GEMM_MIN_ROWS && aph_gguf_gemm_q8(t, W, row_bytes, x, bias, y, ldy, M, N, K, dtype))
        return 1;
    if (!portable && (t == Q4_0 || t == Q4_1 || t == Q8_0) && K % 64 == 0)
        return linear_vnni(t, W, row_bytes, x, bias, y, ldy, M, N, K, dtype);
#endif
    const int nb = K / 32;
    act_block* acts = (act_block*)aph_gguf_thread_scratch(0, (size_t)M * nb * sizeof(act_block));
    if (!acts) return 0;
    quantize_acts(x, dtype, M, K, acts);
    for (int m0 = 0; m0 < M; m0 += 8) {
        const int mc = M - m0 < 8 ? M - m0 : 8;
        const act_block* a = acts + (long)m0 * nb;
        #pragma omp parallel for schedule(static)
        for (int n = 0; n < N; n++) {
            float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
            row_dot(t, W + (long)n * row_bytes, a, mc, K, acc, portable);
            const float bn = bias ? gload(bias, n, dtype) : 0.f;
            for (int m = 0; m < mc; m++) gstore(y, (long)(m0 + m) * ldy + n, acc[m] + bn, dtype);
        }
    }
    return 1;
}
