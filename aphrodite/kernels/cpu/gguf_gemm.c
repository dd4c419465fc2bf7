/*
 * GGUF Q4_0 / Q4_1 / Q8_0 weights times many activation rows (prefill chunks, decode batches above the GEMV's)
 * on AVX-512 VNNI: a blocked GEMM that reads the blocks and multiplies 8-bit codes.
 *
 * Why: at 64+ rows a matmul is compute-bound, and the dense bfloat16 GEMM (oneDNN, vdpbf16ps)
 * already runs at ~90% of the core's bf16 peak, so dequantizing the blocks into it can at best tie
 * it (and the dequantization costs ~10% of a step on top). vpdpbusd multiplies twice as many
 * values per instruction as vdpbf16ps: with the activations rounded to 8 bits per 32 values
 * (llama.cpp's Q8 scheme, one float scale per block) the weight codes multiply them directly.
 * Per 32-value block and tile the integer sum is scaled once (cvt + mul + fma) and the block's
 * offset (Q4_1's minimum, Q4_0's -8 d, Q8_0's -128 d) added from the activation block's sum.
 *
 * Layout: output columns in the vector lanes. A panel of 16 NR weight rows is repacked once per
 * call into vectors of 16 rows x 4 consecutive codes (vpdpbusd's operand), with per block and
 * vector the 16 scales and offsets; each activation row's 4 codes are a broadcast operand. The
 * panel's vectors come out of a 4 x 4 transpose of 128-bit loads, so lane l holds weight row
 * 4 (l % 4) + l / 4 of its 16 (PERM, an involution), undone by one permute when storing.
 * Q8_0's signed codes become unsigned by flipping their top bit (value = d (u - 128)).
 * A tile of MR activation rows x NR vectors keeps MR NR integer and float accumulators.
 *
 * aph_gguf_gemm_f32 is the exact counterpart for float32 activations (no rounding of x): the same
 * panels dequantized once per call to float32 (scale * code + offset in one fma), then FMAs with
 * broadcast activations; at 64 rows it ties oneDNN's packed float32 GEMM, where dequantizing the
 * whole weight and calling BLAS on it was ~20% slower (one thread).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "gguf_q8.h"
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)

enum { T_Q4_0 = 2, T_Q4_1 = 3, T_Q8_0 = 8 };
enum { GEMM_NR = 3, GEMM_MR = 4, VEC_PER_BLOCK = 10 };   /* 8 code vectors, scales, offsets */

void* aph_gguf_thread_scratch(int slot, size_t bytes);   /* gguf_ops.c: per-thread buffers that only grow */

/* Row m of x [M, K] (float32, or bfloat16 when bf16) to int8 codes [M, K] and per 32-value block the
   scale as = max|x| / 127 and the offset term's factor: xs = as * (sum of the block's codes), or,
   when ioff is not 0 (a weight offset of ioff times the block's scale), the int32 ioff * sum. */
static void quantize_row(const void* x, int bf16, int m, int K, int ioff, int8_t* codes, float* as, float* xs) {
    const int nb = K / 32;
    for (int b = 0; b < nb; b++) {
        const long i0 = (long)m * K + (long)b * 32;
        __m512i q0, q1;
        const float d = q8_block32(x, bf16, i0, &q0, &q1);
        _mm_storeu_si128((__m128i*)(codes + i0), _mm512_cvtsepi32_epi8(q0));
        _mm_storeu_si128((__m128i*)(codes + i0 + 16), _mm512_cvtsepi32_epi8(q1));
        as[(long)m * nb + b] = d;
        const int sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
        if (ioff) ((int32_t*)xs)[(long)m * nb + b] = ioff * sum;
        else xs[(long)m * nb + b] = d * (float)sum;
    }
}

/* Lane l of a packed vector holds weight row PERM[l] of its 16 (the 4 x 4 transpose below). */
static inline __m512i perm_lanes(void) {
    return _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
}

/* Four 16-byte pieces, piece r of rows 4r..4r+3 in z[r]'s 128-bit lanes, to v[g] = dword g of
   every row (lane l: row PERM[l]). */
static inline void transpose16x4(const __m512i z[4], __m512i v[4]) {
    const __m512i t0 = _mm512_unpacklo_epi32(z[0], z[1]), t1 = _mm512_unpackhi_epi32(z[0], z[1]);
    const __m512i t2 = _mm512_unpacklo_epi32(z[2], z[3]), t3 = _mm512_unpackhi_epi32(z[2], z[3]);
    v[0] = _mm512_unpacklo_epi64(t0, t2);
    v[1] = _mm512_unpackhi_epi64(t0, t2);
    v[2] = _mm512_unpacklo_epi64(t1, t3);
    v[3] = _mm512_unpackhi_epi64(t1, t3);
}

/* The 16 bytes at offset off of each of 16 rows (row r at rowp[r]), rows 4r..4r+3 in z[r]. */
static inline void load16x16(const uint8_t* const* rowp, long off, __m512i z[4]) {
    for (int r = 0; r < 4; r++) {
        __m512i v = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i*)(rowp[4 * r] + off)));
        v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i*)(rowp[4 * r + 1] + off)), 1);
        v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i*)(rowp[4 * r + 2] + off)), 2);
        z[r] = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i*)(rowp[4 * r + 3] + off)), 3);
    }
}

/* Lane pointers of the 16 weight rows of vector j of the panel at n0 (rows past N repeat row N - 1),
   and the gather offsets of their rows (lane l: row PERM[l]) relative to the first. */
static inline __m512i panel_rows(const uint8_t* W, long row_bytes, int n0, int j, int N, const uint8_t* rowp[16]) {
    int32_t offs[16];
    for (int r = 0; r < 16; r++) {
        const int n = n0 + 16 * j + r < N ? n0 + 16 * j + r : N - 1;
        rowp[r] = W + (long)n * row_bytes;
        offs[r] = (int32_t)(rowp[r] - rowp[0]);
    }
    return _mm512_permutexvar_epi32(perm_lanes(), _mm512_loadu_si512((const void*)offs));
}

/* Block b of 16 rows as 8 code vectors (unsigned, 4 consecutive values a lane), scales and offsets. */
static inline void pack_block(int t, const uint8_t* const* rowp, __m512i gidx, int b, __m512i* o) {
    const int BB = t == T_Q8_0 ? 34 : t == T_Q4_1 ? 20 : 18;
    const __m512i nib = _mm512_set1_epi8(0x0F), flip = _mm512_set1_epi8((char)0x80);
    const long base = (long)b * BB;
    __m512i z[4], v[4];
    if (t == T_Q8_0) {
        load16x16(rowp, base + 2, z);
        transpose16x4(z, v);
        for (int g = 0; g < 4; g++) o[g] = _mm512_xor_si512(v[g], flip);
        load16x16(rowp, base + 18, z);
        transpose16x4(z, v);
        for (int g = 0; g < 4; g++) o[4 + g] = _mm512_xor_si512(v[g], flip);
    } else {
        load16x16(rowp, base + (t == T_Q4_1 ? 4 : 2), z);
        transpose16x4(z, v);
        for (int g = 0; g < 4; g++) {
            o[g] = _mm512_and_si512(v[g], nib);                             /* values 4g .. 4g+3 */
            o[4 + g] = _mm512_and_si512(_mm512_srli_epi16(v[g], 4), nib);   /* 16+4g .. */
        }
    }
    const __m512i h = _mm512_i32gather_epi32(gidx, (const void*)(rowp[0] + base), 1);
    const __m512 d = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(h));
    __m512 m;
    if (t == T_Q4_1) m = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(h, 16)));
    else m = _mm512_mul_ps(d, _mm512_set1_ps(t == T_Q8_0 ? -128.f : -8.f));
    o[8] = _mm512_castps_si512(d);
    o[9] = _mm512_castps_si512(m);
}

/* The panel of weight rows n0 .. n0 + 16 nr as [block][vector j][8 code vectors, scales, offsets]. */
static void pack_panel(int t, const uint8_t* W, long row_bytes, int n0, int N, int nr, int nb, __m512i* out) {
    for (int j = 0; j < nr; j++) {
        const uint8_t* rowp[16];
        const __m512i gidx = panel_rows(W, row_bytes, n0, j, N, rowp);
        for (int b = 0; b < nb; b++) pack_block(t, rowp, gidx, b, out + ((long)b * nr + j) * VEC_PER_BLOCK);
    }
}

/* The same panel dequantized, for float products: [block][vector j][32 values][16 lanes] floats
   (value = scale * code + offset in one rounding, code unsigned as packed). */
static void pack_panel_f32(int t, const uint8_t* W, long row_bytes, int n0, int N, int nr, int nb, __m512* out) {
    const __m512i byte = _mm512_set1_epi32(0xFF);
    for (int j = 0; j < nr; j++) {
        const uint8_t* rowp[16];
        const __m512i gidx = panel_rows(W, row_bytes, n0, j, N, rowp);
        for (int b = 0; b < nb; b++) {
            __m512i o[VEC_PER_BLOCK];
            pack_block(t, rowp, gidx, b, o);
            const __m512 d = _mm512_castsi512_ps(o[8]), m = _mm512_castsi512_ps(o[9]);
            __m512* f = out + ((long)b * nr + j) * 32;
            for (int g = 0; g < 8; g++)
                for (int c = 0; c < 4; c++) {
                    const __m512i q = _mm512_and_si512(_mm512_srli_epi32(o[g], 8 * c), byte);
                    f[4 * g + c] = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(q), m);
                }
        }
    }
}

/* 16 floats to bfloat16, rounded to nearest even (NaN stays NaN), with or without AVX512-BF16. */
static inline __m256i to_bf16(__m512 v) {
#if defined(__AVX512BF16__)
    return (__m256i)_mm512_cvtneps_pbh(v);
#else
    const __m512i u = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
    return _mm512_cvtepi32_epi16(r);
#endif
}

/* 16 floats (lanes in panel order) + bias to row y[0 .. cols) as float32 or bfloat16. */
static inline void store_out(__m512 v, const void* bias, int n, int cols, void* y, int bf16) {
    const __mmask16 k = cols >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << cols) - 1u);
    v = _mm512_permutexvar_ps(perm_lanes(), v);
    if (bias) {
        const __m512 bv = bf16 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(
                                     _mm256_maskz_loadu_epi16(k, (const uint16_t*)bias + n)), 16))
                               : _mm512_maskz_loadu_ps(k, (const float*)bias + n);
        v = _mm512_add_ps(v, bv);
    }
    if (bf16) _mm256_mask_storeu_epi16(y, k, to_bf16(v));
    else _mm512_mask_storeu_ps(y, k, v);
}

/* Rows m0 .. m0 + MR of the output for the panel's NR vectors (columns n0 ..), all K. */
static inline __attribute__((always_inline)) void tile(const int MR, const int NR, const int IOFF,
                                                       const __m512i* panel,
                                                       const int8_t* codes, const float* as, const float* xs,
                                                       int K, int nb, const void* bias, int n0, int N, void* y,
                                                       long ldy, int bf16) {
    __m512 acc[GEMM_MR][GEMM_NR];
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++) acc[i][j] = _mm512_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const __m512i* p = panel + (long)b * NR * VEC_PER_BLOCK;
        __m512i s[GEMM_MR][GEMM_NR];
        for (int i = 0; i < MR; i++) {   /* Q4_0 / Q8_0: the offset, an integer, starts the sum */
            const __m512i s0 = IOFF ? _mm512_set1_epi32(((const int32_t*)xs)[(long)i * nb + b])
                                    : _mm512_setzero_si512();
            for (int j = 0; j < NR; j++) s[i][j] = s0;
        }
        _Pragma("GCC unroll 8")
        for (int g = 0; g < 8; g++) {
            __m512i a[GEMM_MR];
            for (int i = 0; i < MR; i++) {
                int32_t a4;
                memcpy(&a4, codes + (long)i * K + b * 32 + 4 * g, 4);
                a[i] = _mm512_set1_epi32(a4);
            }
            for (int j = 0; j < NR; j++) {
                const __m512i w = _mm512_load_si512((const void*)(p + j * VEC_PER_BLOCK + g));
                for (int i = 0; i < MR; i++) s[i][j] = _mm512_dpbusd_epi32(s[i][j], w, a[i]);
            }
        }
        for (int j = 0; j < NR; j++) {
            const __m512 d = _mm512_load_ps((const float*)(p + j * VEC_PER_BLOCK + 8));
            for (int i = 0; i < MR; i++) {
                const __m512 sc = _mm512_mul_ps(d, _mm512_set1_ps(as[(long)i * nb + b]));
                acc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[i][j]), sc, acc[i][j]);
                if (!IOFF)
                    acc[i][j] = _mm512_fmadd_ps(_mm512_load_ps((const float*)(p + j * VEC_PER_BLOCK + 9)),
                                                _mm512_set1_ps(xs[(long)i * nb + b]), acc[i][j]);
            }
        }
    }
    const size_t es = bf16 ? 2 : 4;
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++) {
            const int n = n0 + 16 * j;
            if (n < N) store_out(acc[i][j], bias, n, N - n, (char*)y + ((long)i * ldy + n) * es, bf16);
        }
}

/* Float products: rows m0 .. m0 + MR of x (float32, row stride K) times the dequantized panel. */
static inline __attribute__((always_inline)) void tile_f32(const int MR, const int NR, const __m512* panel,
                                                           const float* xf, int K, int nb, const void* bias, int n0,
                                                           int N, void* y, long ldy, int bf16) {
    __m512 acc[GEMM_MR][GEMM_NR];
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++) acc[i][j] = _mm512_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const __m512* p = panel + (long)b * NR * 32;
        _Pragma("GCC unroll 4")
        for (int kk = 0; kk < 32; kk++) {
            __m512 w[GEMM_NR];
            for (int j = 0; j < NR; j++) w[j] = _mm512_load_ps((const float*)(p + j * 32 + kk));
            for (int i = 0; i < MR; i++) {
                const __m512 a = _mm512_set1_ps(xf[(long)i * K + b * 32 + kk]);
                for (int j = 0; j < NR; j++) acc[i][j] = _mm512_fmadd_ps(w[j], a, acc[i][j]);
            }
        }
    }
    const size_t es = bf16 ? 2 : 4;
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++) {
            const int n = n0 + 16 * j;
            if (n < N) store_out(acc[i][j], bias, n, N - n, (char*)y + ((long)i * ldy + n) * es, bf16);
        }
}

#define MIN_(a, b) ((a) < (b) ? (a) : (b))
#define TILE_CALL(MR_, NR_, IOFF_) \
    tile(MIN_(MR_, GEMM_MR), MIN_(NR_, GEMM_NR), IOFF_, qpanel, c, a, s, K, nb, bias, n0, N, yy, ldy, bf16)
#define TILE_MR(NR_, IOFF_)                            \
    switch (mr) {                                      \
        case 1: TILE_CALL(1, NR_, IOFF_); break;       \
        case 2: TILE_CALL(2, NR_, IOFF_); break;       \
        case 3: TILE_CALL(3, NR_, IOFF_); break;       \
        default: TILE_CALL(4, NR_, IOFF_); break;      \
    }
#define TILE_NR(IOFF_)                                 \
    switch (nr) {                                      \
        case 1: TILE_MR(1, IOFF_) break;               \
        case 2: TILE_MR(2, IOFF_) break;               \
        default: TILE_MR(3, IOFF_) break;              \
    }
#define TILE_F32(MR_, NR_) \
    tile_f32(MIN_(MR_, GEMM_MR), MIN_(NR_, GEMM_NR), fpanel, xf + (long)m0 * K, K, nb, bias, n0, N, yy, ldy, bf16)
#define TILE_F32_MR(NR_)                               \
    switch (mr) {                                      \
        case 1: TILE_F32(1, NR_); break;               \
        case 2: TILE_F32(2, NR_); break;               \
        case 3: TILE_F32(3, NR_); break;               \
        default: TILE_F32(4, NR_); break;              \
    }

/* The panel loop of both GEMMs: exact = 0, the 8-bit one (activations rounded into codes/as/xs);
   exact = 1, float products (activations as float32 in xf). */
static int run_panels(int exact, int t, const uint8_t* W, long row_bytes, const void* x, const void* bias, void* y,
                      long ldy, int M, int N, int K, int bf16, int8_t* codes, float* as, float* xs, float* xf) {
    const int nb = K / 32, ioff = t == T_Q4_1 ? 0 : t == T_Q8_0 ? -128 : -8;
    const int cols = 16 * GEMM_NR, panels = (N + cols - 1) / cols;
    const size_t es = bf16 ? 2 : 4;
    int ok = 1;
    #pragma omp parallel
    {
        #pragma omp for schedule(static)
        for (int m = 0; m < M; m++) {
            if (!exact) {
                quantize_row(x, bf16, m, K, ioff, codes, as, xs);
            } else if (bf16) {
                for (int k = 0; k < K; k += 16)
                    _mm512_storeu_ps(xf + (long)m * K + k, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(
                        _mm256_loadu_si256((const __m256i*)((const uint16_t*)x + (long)m * K + k))), 16)));
            }
        }
        const size_t panel_bytes = exact ? (size_t)K * GEMM_NR * 64 : (size_t)nb * GEMM_NR * VEC_PER_BLOCK * 64;
        void* panel = aph_gguf_thread_scratch(1, panel_bytes);
        if (!panel) {
            #pragma omp atomic write
            ok = 0;
        }
        #pragma omp for schedule(static)
        for (int pi = 0; pi < panels; pi++) {
            if (!panel) continue;
            const int n0 = pi * cols;
            const int nr = (N - n0 + 15) / 16 < GEMM_NR ? (N - n0 + 15) / 16 : GEMM_NR;
            if (exact) pack_panel_f32(t, W, row_bytes, n0, N, nr, nb, (__m512*)panel);
            else pack_panel(t, W, row_bytes, n0, N, nr, nb, (__m512i*)panel);
            /* the next panel's blocks (this thread's, schedule static) into L2 while this one computes:
               streaming them at pack time costs a third of the LM head's time at 64 rows */
            const char* next = (const char*)W + (long)(n0 + cols) * row_bytes;
            const int next_rows = pi + 1 < panels ? (N - n0 - cols < cols ? N - n0 - cols : cols) : 0;
            const long next_bytes = (long)next_rows * row_bytes;
            const int groups = (M + GEMM_MR - 1) / GEMM_MR;
            const long per_group = (next_bytes / groups + 63) / 64 * 64;
            long fetched = 0;
            for (int m0 = 0; m0 < M; m0 += GEMM_MR) {
                const int mr = M - m0 < GEMM_MR ? M - m0 : GEMM_MR;
                for (long e = fetched + per_group; fetched < e && fetched < next_bytes; fetched += 64)
                    _mm_prefetch(next + fetched, _MM_HINT_T1);
                char* yy = (char*)y + (long)m0 * ldy * es;
                if (exact) {
                    const __m512* fpanel = (const __m512*)panel;
                    switch (nr) {
                        case 1: TILE_F32_MR(1) break;
                        case 2: TILE_F32_MR(2) break;
                        default: TILE_F32_MR(3) break;
                    }
                } else {
                    const __m512i* qpanel = (const __m512i*)panel;
                    const int8_t* c = codes + (long)m0 * K;
                    const float* a = as + (long)m0 * nb;
                    const float* s = xs + (long)m0 * nb;
                    if (ioff) TILE_NR(1) else TILE_NR(0)
                }
            }
        }
    }
    return ok;
}

static int gemm_args_ok(int t, int M, int N, int K, int dtype) {
    return (t == T_Q4_0 || t == T_Q4_1 || t == T_Q8_0) && K % 32 == 0 && M >= 1 && N >= 1 && (dtype == 0 || dtype == 1);
}

/*
 * y[m, n] (row stride ldy) = q8(x[m, :]) . dequant(W[n, :]) (+ bias[n]) for M rows of x [M, K]
 * (float32, dtype 0, or bfloat16, dtype 1), W rows of Q4_0 / Q4_1 / Q8_0 blocks. Returns 0 (nothing
 * written) for other types, K not a multiple of 32, or a CPU without AVX-512 VNNI.
 */
int aph_gguf_gemm_q8(int t, const uint8_t* W, long row_bytes, const void* x, const void* bias, void* y, long ldy,
                     int M, int N, int K, int dtype) {
    if (!gemm_args_ok(t, M, N, K, dtype)) return 0;
    const int nb = K / 32;
    int8_t* codes = (int8_t*)aph_gguf_thread_scratch(0, (size_t)M * K + 2 * (size_t)M * nb * sizeof(float) + 64);
    if (!codes) return 0;
    float* as = (float*)(codes + ((size_t)M * K + 63) / 64 * 64);
    return run_panels(0, t, W, row_bytes, x, bias, y, ldy, M, N, K, dtype == 1, codes, as, as + (size_t)M * nb, NULL);
}

/* The same product with float activations (no rounding of x; float32 sums): the exact batch path. */
int aph_gguf_gemm_f32(int t, const uint8_t* W, long row_bytes, const void* x, const void* bias, void* y, long ldy,
                      int M, int N, int K, int dtype) {
    if (!gemm_args_ok(t, M, N, K, dtype)) return 0;
    const float* xf = (const float*)x;
    if (dtype == 1) {
        xf = (const float*)aph_gguf_thread_scratch(0, (size_t)M * K * sizeof(float));
        if (!xf) return 0;
    }
    return run_panels(1, t, W, row_bytes, x, bias, y, ldy, M, N, K, dtype == 1, NULL, NULL, NULL, (float*)xf);
}

#else

int aph_gguf_gemm_q8(int t, const uint8_t* W, long row_bytes, const void* x, const void* bias, void* y, long ldy,
                     int M, int N, int K, int dtype) {
    (void)t; (void)W; (void)row_bytes; (void)x; (void)bias; (void)y; (void)ldy; (void)M; (void)N; (void)K;
    (void)dtype;
    return 0;
}

int aph_gguf_gemm_f32(int t, const uint8_t* W, long row_bytes, const void* x, const void* bias, void* y, long ldy,
                      int M, int N, int K, int dtype) {
    return aph_gguf_gemm_q8(t, W, row_bytes, x, bias, y, ldy, M, N, K, dtype);
}

#endif

/* 1 when this build has the blocked GEMMs (AVX-512 with VNNI). */
int aph_gguf_gemm_supported(void) {
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
    return 1;
#else
    return 0;
#endif
}
