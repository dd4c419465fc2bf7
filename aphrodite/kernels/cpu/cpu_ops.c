/*
 * CPU kernels for the memory-bound parts of a decode step, in plain C so that gcc's
 * auto-vectorizer (-O3 -march=native, OpenMP simd) targets whatever the host has.
 *
 * Why: at batch 1 a decode step streams every weight once. The BLAS GEMV behind
 * torch.nn.functional.linear reads cold weights at ~14 GB/s on the CI machine, about a
 * third of what its memory delivers; a row-per-thread dot product reaches ~35 GB/s. Decode
 * attention in PyTorch has to gather each sequence's K/V blocks into a padded tensor every
 * layer; reading the paged cache in place removes that copy. Norm and SwiGLU are one pass
 * each instead of several elementwise ops.
 *
 * Functions take raw pointers to contiguous tensors (the KV write accepts strided rows) and,
 * where tensors may be either, a dtype code (0 = float32, 1 = bfloat16); the sampler's draw is
 * float32 only. Arithmetic is float32; bfloat16 results are rounded to
 * nearest even, as PyTorch rounds. Threads come from the OpenMP runtime PyTorch already
 * loaded (same libgomp), so torch.set_num_threads governs both.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { F32 = 0, BF16 = 1 };

#if defined(__x86_64__) && defined(__GLIBC__)
/* glibc's libmvec has vector expf; declaring it lets `omp simd` loops call it 16 lanes at a time. */
float expf(float) __attribute__((simd("notinbranch")));
#endif

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);  /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float load(const void* p, long i, int dtype) {
    return dtype == BF16 ? bf16_to_f32(((const uint16_t*)p)[i]) : ((const float*)p)[i];
}

static inline void store(void* p, long i, float v, int dtype) {
    if (dtype == BF16) ((uint16_t*)p)[i] = f32_to_bf16(v);
    else ((float*)p)[i] = v;
}

/* Widen n values of either dtype to float32. */
static inline void widen(const void* src, float* restrict dst, long n, int dtype) {
    if (dtype == BF16) {
        const uint16_t* s = (const uint16_t*)src;
        #pragma omp simd
        for (long i = 0; i < n; i++) dst[i] = bf16_to_f32(s[i]);
    } else {
        memcpy(dst, src, (size_t)n * sizeof(float));
    }
}

static inline float dot_f32(const float* restrict a, const float* restrict b, int n) {
    float acc = 0.f;
    #pragma omp simd reduction(+:acc)
    for (int k = 0; k < n; k++) acc += a[k] * b[k];
    return acc;
}

static inline float dot_bf16(const uint16_t* restrict w, const float* restrict x, int n) {
    float acc = 0.f;
    #pragma omp simd reduction(+:acc)
    for (int k = 0; k < n; k++) acc += bf16_to_f32(w[k]) * x[k];
    return acc;
}

/*
 * y[M, N] = x[M, K] @ W[N, K]^T (+ bias[N]); W row-major. Each thread owns a stripe of
 * output rows and streams each weight row once for all M inputs.
 */
#if defined(__AVX512F__)
static int linear_avx512(int dtype, const void* W, const void* x, const void* bias, void* y, int M, int N, int K);
#endif

void aph_linear(int dtype, const void* W, const void* x, const void* bias, void* y,
                int M, int N, int K) {
#if defined(__AVX512F__)
    if (linear_avx512(dtype, W, x, bias, y, M, N, K)) return;
#endif
    float* xf = (float*)malloc((size_t)M * K * sizeof(float));
    widen(x, xf, (long)M * K, dtype);
    #pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const float b = bias ? load(bias, n, dtype) : 0.f;
        if (dtype == BF16) {
            const uint16_t* w = (const uint16_t*)W + (long)n * K;
            for (int m = 0; m < M; m++) store(y, (long)m * N + n, dot_bf16(w, xf + (long)m * K, K) + b, dtype);
        } else {
            const float* w = (const float*)W + (long)n * K;
            for (int m = 0; m < M; m++) store(y, (long)m * N + n, dot_f32(w, xf + (long)m * K, K) + b, dtype);
        }
    }
    free(xf);
}

/*
 * Decode attention over the paged cache: one query token per sequence.
 * q/out [B, Hq, D]; k_cache/v_cache [num_blocks, block_size, Hkv, D]; block_tables
 * [B, max_blocks] int32; seq_lens [B] int32. The Hq / Hkv query heads that share a KV head
 * are done together so each K/V row is read once. The body is written once per storage type
 * (WIDEN turns one stored element into float) so the inner loops vectorize without branches.
 */
/* Where token t of this sequence's head h sits in a [blocks, block_size, Hkv, D] cache. */
#define CACHE_OFFSET(t) (((long)table[(t) / block_size] * block_size + (t) % block_size) * row + (long)h * D)

#define DECODE_ATTENTION_BODY(T, WIDEN, D)                                                        \
    const int G = Hq / Hkv;                                                                      \
    const long row = (long)Hkv * D;                                                              \
    const T* kc = (const T*)k_cache;                                                             \
    const T* vc = (const T*)v_cache;                                                             \
    const T* qs = (const T*)q;                                                                   \
    _Pragma("omp parallel for collapse(2) schedule(dynamic, 1)")                                 \
    for (int b = 0; b < B; b++) {                                                                \
        for (int h = 0; h < Hkv; h++) {                                                          \
            const int first = window > 0 && seq_lens[b] > window ? seq_lens[b] - window : 0;     \
            const int L = seq_lens[b] - first;    /* keys [first, seq_len): the sliding window */ \
            const int32_t* table = block_tables + (long)b * max_blocks;                          \
            float* qf = (float*)malloc((size_t)G * D * sizeof(float));                           \
            float* acc = (float*)calloc((size_t)G * D, sizeof(float));                           \
            float* s = (float*)malloc((size_t)(L > 0 ? L : 1) * G * sizeof(float));  /* [G, L] */ \
            float kf[D];                                                                         \
            const long qbase = ((long)b * Hq + (long)h * G) * D;                                 \
            for (long i = 0; i < (long)G * D; i++) qf[i] = WIDEN(qs[qbase + i]) * scale;         \
            for (int t = 0; t < L; t++) {                                                        \
                const T* k = kc + CACHE_OFFSET(first + t);                                       \
                _Pragma("omp simd")                                                              \
                for (int d = 0; d < D; d++) kf[d] = WIDEN(k[d]);                                 \
                for (int g = 0; g < G; g++) {                                                    \
                    const float* qg = qf + (long)g * D;                                          \
                    float dot = 0.f;                                                             \
                    _Pragma("omp simd reduction(+:dot)")                                         \
                    for (int d = 0; d < D; d++) dot += qg[d] * kf[d];                            \
                    s[(long)g * L + t] = dot;                                                    \
                }                                                                                \
            }                                                                                    \
            for (int g = 0; g < G; g++) {                                                        \
                float* sg = s + (long)g * L;                                                     \
                float mx = -INFINITY, sum = 0.f;                                                 \
                if (softcap > 0.f)                                                               \
                    for (int t = 0; t < L; t++) sg[t] = softcap * tanhf(sg[t] / softcap);        \
                _Pragma("omp simd reduction(max:mx)")                                            \
                for (int t = 0; t < L; t++) mx = sg[t] > mx ? sg[t] : mx;                        \
                _Pragma("omp simd reduction(+:sum)")                                             \
                for (int t = 0; t < L; t++) { float e = expf(sg[t] - mx); sg[t] = e; sum += e; } \
                const float inv = sum > 0.f ? 1.f / sum : 0.f;                                   \
                _Pragma("omp simd")                                                              \
                for (int t = 0; t < L; t++) sg[t] *= inv;                                        \
            }                                                                                    \
            for (int t = 0; t < L; t++) {                                                        \
                const T* v = vc + CACHE_OFFSET(first + t);                                       \
                _Pragma("omp simd")                                                              \
                for (int d = 0; d < D; d++) kf[d] = WIDEN(v[d]);                                 \
                for (int g = 0; g < G; g++) {                                                    \
                    const float p = s[(long)g * L + t];                                          \
                    float* a = acc + (long)g * D;                                                \
                    _Pragma("omp simd")                                                          \
                    for (int d = 0; d < D; d++) a[d] += p * kf[d];                               \
                }                                                                                \
            }                                                                                    \
            for (long i = 0; i < (long)G * D; i++) store(out, qbase + i, acc[i], dtype);         \
            free(qf); free(acc); free(s);                                                        \
        }                                                                                        \
    }

#define WIDEN_F32(x) (x)
#define WIDEN_BF16(x) bf16_to_f32(x)

#if defined(__AVX512F__)
#include <immintrin.h>

/* Lane i of the result is the sum of the 16 lanes of v[i]: a transposing tree of shuffles and
   adds (3 ops per vector instead of the ~8 of a horizontal sum each). */
static inline __m512 sum16(const __m512* v) {
    __m512 w[8], x[4], y[2];
    for (int i = 0; i < 8; i++)   /* [v0.lo + v0.hi | v1.lo + v1.hi]: 8 partials each */
        w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                             _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
    for (int i = 0; i < 4; i++)   /* 128-bit quarter k: 4 partials of v[4i + k] */
        x[i] = _mm512_add_ps(_mm512_shuffle_f32x4(w[2 * i], w[2 * i + 1], 0x88),
                             _mm512_shuffle_f32x4(w[2 * i], w[2 * i + 1], 0xDD));
    for (int i = 0; i < 2; i++)   /* quarter k: 2 partials of v[8i + k], then 2 of v[8i + 4 + k] */
        y[i] = _mm512_add_ps(_mm512_shuffle_ps(x[2 * i], x[2 * i + 1], 0x44),
                             _mm512_shuffle_ps(x[2 * i], x[2 * i + 1], 0xEE));
    /* lane 4k + m holds the sum of v[4m + k]; permute into lane order */
    const __m512 z = _mm512_add_ps(_mm512_shuffle_ps(y[0], y[1], 0x88), _mm512_shuffle_ps(y[0], y[1], 0xDD));
    const __m512i order = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
    return _mm512_permutexvar_ps(order, z);
}

/* 16 bf16 or fp32 values at p, as 16 floats. */
static inline __m512 load16(const void* p, const int bf16) {
    if (bf16)
        return _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
    return _mm512_loadu_ps(p);
}

/* y = x W^T for up to 8 input rows: each weight row is read once and feeds one accumulator per
   input row, so the rows' FMA chains run side by side instead of one latency-bound dot product
   after another (bf16: 32 weights per vdpbf16ps, no widening). */
static inline __attribute__((always_inline)) void linear_rows_avx512(const int bf16, const void* W, const void* x,
                                                                     const void* bias, void* y, const int M,
                                                                     int N, int K) {
    const size_t es = bf16 ? 2 : 4;
    #pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        __m512 acc[8];
        for (int m = 0; m < M; m++) acc[m] = _mm512_setzero_ps();
        const char* w = (const char*)W + (long)n * K * es;
#if defined(__AVX512BF16__)
        if (bf16 && K % 32 == 0) {
            for (int c = 0; c < K; c += 32) {
                const __m512bh wv = (__m512bh)_mm512_loadu_si512((const uint16_t*)w + c);
                for (int m = 0; m < M; m++)
                    acc[m] = _mm512_dpbf16_ps(acc[m], wv,
                                              (__m512bh)_mm512_loadu_si512((const uint16_t*)x + (long)m * K + c));
            }
        } else
#endif
        {
            for (int c = 0; c < K; c += 16) {
                const __m512 wv = load16(w + c * es, bf16);
                for (int m = 0; m < M; m++)
                    acc[m] = _mm512_fmadd_ps(wv, load16((const char*)x + ((long)m * K + c) * es, bf16), acc[m]);
            }
        }
        const float b = bias ? load(bias, n, bf16 ? BF16 : F32) : 0.f;
        for (int m = 0; m < M; m++) store(y, (long)m * N + n, _mm512_reduce_add_ps(acc[m]) + b, bf16 ? BF16 : F32);
    }
}

static int linear_avx512(int dtype, const void* W, const void* x, const void* bias, void* y, int M, int N, int K) {
    if (M < 1 || M > 8 || K % 16 != 0) return 0;
    const int bf16 = dtype == BF16;
    switch (M) {   /* a constant row count keeps the accumulators in registers */
        case 1: linear_rows_avx512(bf16, W, x, bias, y, 1, N, K); break;
        case 2: linear_rows_avx512(bf16, W, x, bias, y, 2, N, K); break;
        case 3: linear_rows_avx512(bf16, W, x, bias, y, 3, N, K); break;
        case 4: linear_rows_avx512(bf16, W, x, bias, y, 4, N, K); break;
        case 5: linear_rows_avx512(bf16, W, x, bias, y, 5, N, K); break;
        case 6: linear_rows_avx512(bf16, W, x, bias, y, 6, N, K); break;
        case 7: linear_rows_avx512(bf16, W, x, bias, y, 7, N, K); break;
        default: linear_rows_avx512(bf16, W, x, bias, y, 8, N, K); break;
    }
    return 1;
}

/* The dot product of q and one cached row, as 16 partial sums. */
static inline __attribute__((always_inline)) __m512 dot_partials(const void* q, const void* k, const int D,
                                                                 const int bf16) {
#if defined(__AVX512BF16__)
    if (bf16) {   /* bf16 pairs multiplied and summed in float32 by one instruction */
        __m512 acc = _mm512_setzero_ps();
        for (int c = 0; c < D; c += 32)
            acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512((const uint16_t*)q + c),
                                   (__m512bh)_mm512_loadu_si512((const uint16_t*)k + c));
        return acc;
    }
#endif
    const size_t es = bf16 ? 2 : 4;
    __m512 acc = _mm512_mul_ps(load16(q, bf16), load16(k, bf16));
    for (int c = 16; c < D; c += 16)
        acc = _mm512_fmadd_ps(load16((const char*)q + c * es, bf16), load16((const char*)k + c * es, bf16), acc);
    return acc;
}

/* acc[g] += p[g][t] * V row t for GC query heads at once, accumulators held in registers. */
static inline __attribute__((always_inline)) void pv_rows(const char* const* rows, const float* p, int L, int ps,
                                                          float* out, const int GC, const int D, const int bf16) {
    __m512 acc[4][16];
    for (int g = 0; g < GC; g++)
        for (int c = 0; c < D / 16; c++) acc[g][c] = _mm512_setzero_ps();
    const size_t es = bf16 ? 2 : 4;
    for (int t = 0; t < L; t++) {
        for (int c = 0; c < D / 16; c++) {
            const __m512 v = load16(rows[t] + c * 16 * es, bf16);
            for (int g = 0; g < GC; g++)
                acc[g][c] = _mm512_fmadd_ps(_mm512_set1_ps(p[g * ps + t]), v, acc[g][c]);
        }
    }
    for (int g = 0; g < GC; g++)
        for (int c = 0; c < D / 16; c++) _mm512_storeu_ps(out + g * D + c * 16, acc[g][c]);
}

#if defined(__AVX512BF16__)
/* The same for bf16 caches, two tokens per dot-product instruction: p holds the probabilities
   rounded to bf16 (as HF's eager attention rounds them before its PV matmul), zero past L, and
   rows[L] must be readable when L is odd. */
static inline __attribute__((always_inline)) void pv_rows_bf16(const char* const* rows, const uint16_t* p, int L,
                                                               int ps, float* out, const int GC, const int D) {
    __m512 acc[4][16];
    for (int g = 0; g < GC; g++)
        for (int c = 0; c < D / 16; c++) acc[g][c] = _mm512_setzero_ps();
    for (int t = 0; t < L; t += 2) {
        for (int c = 0; c < D / 32; c++) {
            const __m512i a = _mm512_loadu_si512((const uint16_t*)rows[t] + c * 32);
            const __m512i b = _mm512_loadu_si512((const uint16_t*)rows[t + 1] + c * 32);
            const __m512bh lo = (__m512bh)_mm512_unpacklo_epi16(a, b), hi = (__m512bh)_mm512_unpackhi_epi16(a, b);
            for (int g = 0; g < GC; g++) {
                uint32_t pair;
                memcpy(&pair, p + (long)g * ps + t, 4);
                const __m512bh w = (__m512bh)_mm512_set1_epi32((int)pair);
                acc[g][2 * c] = _mm512_dpbf16_ps(acc[g][2 * c], w, lo);
                acc[g][2 * c + 1] = _mm512_dpbf16_ps(acc[g][2 * c + 1], w, hi);
            }
        }
    }
    /* lane 4k + m of column group c's lo (hi) accumulator is dimension 32c + 8k + m (+ 4) */
    for (int g = 0; g < GC; g++)
        for (int c = 0; c < D / 32; c++) {
            float lo[16], hi[16];
            _mm512_storeu_ps(lo, acc[g][2 * c]);
            _mm512_storeu_ps(hi, acc[g][2 * c + 1]);
            for (int k = 0; k < 4; k++)
                for (int m = 0; m < 4; m++) {
                    out[g * D + 32 * c + 8 * k + m] = lo[4 * k + m];
                    out[g * D + 32 * c + 8 * k + 4 + m] = hi[4 * k + m];
                }
        }
}
#endif

/* One (sequence, KV head) of decode attention; D a multiple of 32, at most 256. */
static inline __attribute__((always_inline)) void decode_head_avx512(
        const void* q, const char* k_base, const char* v_base, const int32_t* table, int first, int L, int G,
        int block_size, long row_bytes, float scale, float softcap, float* out, const int D, const int bf16) {
    const size_t es = bf16 ? 2 : 4;
    const char** krow = (const char**)malloc((size_t)(L + 1) * 2 * sizeof(char*));
    const char** vrow = krow + L + 1;
    /* row addresses of keys [first, first + L), no division per token */
    for (int t = 0, blk = first / block_size, off = first % block_size; t < L; t++) {
        const long slot = (long)table[blk] * block_size + off;
        krow[t] = k_base + slot * row_bytes;
        vrow[t] = v_base + slot * row_bytes;
        for (int c = 0; c < D * (int)es; c += 64) _mm_prefetch(krow[t] + c, _MM_HINT_T1);
        for (int c = 0; c < D * (int)es; c += 64) _mm_prefetch(vrow[t] + c, _MM_HINT_T2);
        if (++off == block_size) { off = 0; blk++; }
    }
    if (L > 0) vrow[L] = vrow[L - 1];   /* the odd token's partner in the bf16 pair loop (weight 0) */
    const int ps = (L + 15) / 16 * 16;         /* score rows padded to whole groups of 16 */
    float* s = (float*)malloc((size_t)G * ps * sizeof(float));
    float* inv = (float*)malloc((size_t)G * sizeof(float));
    for (int g = 0; g < G; g++) {
        const char* qg = (const char*)q + (size_t)g * D * es;
        float* sg = s + (long)g * ps;
        for (int t0 = 0; t0 < L; t0 += 16) {
            __m512 part[16];
            const int n = L - t0 < 16 ? L - t0 : 16;
            if (g == 0) {   /* the cache rows are scattered: fetch the next K rows and these V rows early */
                for (int i = t0 + 16; i < t0 + 32 && i < L; i++)
                    for (int c = 0; c < D * (int)es; c += 64) _mm_prefetch(krow[i] + c, _MM_HINT_T0);
                for (int i = t0; i < t0 + n; i++)
                    for (int c = 0; c < D * (int)es; c += 64) _mm_prefetch(vrow[i] + c, _MM_HINT_T1);
            }
            for (int i = 0; i < 16; i++)
                part[i] = i < n ? dot_partials(qg, krow[t0 + i], D, bf16) : _mm512_setzero_ps();
            _mm512_storeu_ps(sg + t0, _mm512_mul_ps(sum16(part), _mm512_set1_ps(scale)));
        }
        float mx = -INFINITY, sum = 0.f;
        if (softcap > 0.f)   /* Gemma 2: scores squashed to (-cap, cap) */
            for (int t = 0; t < L; t++) sg[t] = softcap * tanhf(sg[t] / softcap);
        _Pragma("omp simd reduction(max:mx)")
        for (int t = 0; t < L; t++) mx = sg[t] > mx ? sg[t] : mx;
        _Pragma("omp simd reduction(+:sum)")
        for (int t = 0; t < L; t++) { float e = expf(sg[t] - mx); sg[t] = e; sum += e; }
        inv[g] = sum > 0.f ? 1.f / sum : 0.f;   /* applied to the output: p stays unnormalised */
    }
    float acc[4 * 256];
#if defined(__AVX512BF16__)
    uint16_t* pb = NULL;
    if (bf16) {
        pb = (uint16_t*)malloc((size_t)G * ps * sizeof(uint16_t));
        for (long i = 0; i < (long)G * ps; i += 16)   /* s is 0 past L in each row (never exponentiated) */
            _mm256_storeu_si256((__m256i*)(pb + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(s + i)));
    }
#endif
    for (int g0 = 0; g0 < G; g0 += 4) {
        const float* p = s + (long)g0 * ps;
        const int gc = G - g0 < 4 ? G - g0 : 4;
#if defined(__AVX512BF16__)
        if (bf16) {
            const uint16_t* pg = pb + (long)g0 * ps;
            switch (gc) {
                case 1: pv_rows_bf16(vrow, pg, L, ps, acc, 1, D); break;
                case 2: pv_rows_bf16(vrow, pg, L, ps, acc, 2, D); break;
                case 3: pv_rows_bf16(vrow, pg, L, ps, acc, 3, D); break;
                default: pv_rows_bf16(vrow, pg, L, ps, acc, 4, D); break;
            }
        } else
#endif
        switch (gc) {   /* constant head counts keep the accumulators in registers */
            case 1: pv_rows(vrow, p, L, ps, acc, 1, D, bf16); break;
            case 2: pv_rows(vrow, p, L, ps, acc, 2, D, bf16); break;
            case 3: pv_rows(vrow, p, L, ps, acc, 3, D, bf16); break;
            default: pv_rows(vrow, p, L, ps, acc, 4, D, bf16); break;
        }
        for (int g = 0; g < gc; g++)
            for (int c = 0; c < D; c++) out[(g0 + g) * D + c] = acc[g * D + c] * inv[g0 + g];
    }
#if defined(__AVX512BF16__)
    free(pb);
#endif
    free(s); free(inv); free(krow);
}

static void decode_attention_avx512(int dtype, const void* q, const void* k_cache, const void* v_cache,
                                    const int32_t* block_tables, const int32_t* seq_lens, void* out,
                                    int B, int Hq, int Hkv, int D, int block_size, int max_blocks,
                                    float scale, int window, float softcap) {
    const int G = Hq / Hkv, bf16 = dtype == BF16;
    const size_t es = bf16 ? 2 : 4;
    const long row_bytes = (long)Hkv * D * es;
    #pragma omp parallel for collapse(2) schedule(dynamic, 1)
    for (int b = 0; b < B; b++) {
        for (int h = 0; h < Hkv; h++) {
            float o[8 * 256];
            float* res = G <= 8 ? o : (float*)malloc((size_t)G * D * sizeof(float));
            const char* qh = (const char*)q + ((long)b * Hq + (long)h * G) * D * es;
            const char* kb = (const char*)k_cache + (long)h * D * es;
            const char* vb = (const char*)v_cache + (long)h * D * es;
            const int32_t* table = block_tables + (long)b * max_blocks;
            const int first = window > 0 && seq_lens[b] > window ? seq_lens[b] - window : 0;
            const int L = seq_lens[b] - first;
            if (bf16 && D == 64) decode_head_avx512(qh, kb, vb, table, first, L, G, block_size, row_bytes, scale, softcap, res, 64, 1);
            else if (bf16 && D == 128) decode_head_avx512(qh, kb, vb, table, first, L, G, block_size, row_bytes, scale, softcap, res, 128, 1);
            else if (bf16) decode_head_avx512(qh, kb, vb, table, first, L, G, block_size, row_bytes, scale, softcap, res, D, 1);
            else if (D == 64) decode_head_avx512(qh, kb, vb, table, first, L, G, block_size, row_bytes, scale, softcap, res, 64, 0);
            else if (D == 128) decode_head_avx512(qh, kb, vb, table, first, L, G, block_size, row_bytes, scale, softcap, res, 128, 0);
            else decode_head_avx512(qh, kb, vb, table, first, L, G, block_size, row_bytes, scale, softcap, res, D, 0);
            const long base = ((long)b * Hq + (long)h * G) * D;
            for (long i = 0; i < (long)G * D; i++) store(out, base + i, res[i], dtype);
            if (res != o) free(res);
        }
    }
}
#endif

void aph_paged_decode_attention(int dtype, const void* q, const void* k_cache,
                                const void* v_cache, const int32_t* block_tables,
                                const int32_t* seq_lens, void* out, int B, int Hq, int Hkv,
                                int head_dim, int block_size, int max_blocks, float scale, int window,
                                float softcap) {
    const int D = head_dim;
#if defined(__AVX512F__)
    if (D % 32 == 0 && D <= 256) {
        decode_attention_avx512(dtype, q, k_cache, v_cache, block_tables, seq_lens, out, B, Hq, Hkv, D,
                                block_size, max_blocks, scale, window, softcap);
        return;
    }
#endif
    /* Head sizes 64 and 128 get a compile-time trip count, so each dot product unrolls into
       whole vector registers with one horizontal sum. */
    if (dtype == BF16 && D == 64) { DECODE_ATTENTION_BODY(uint16_t, WIDEN_BF16, 64) }
    else if (dtype == BF16 && D == 128) { DECODE_ATTENTION_BODY(uint16_t, WIDEN_BF16, 128) }
    else if (dtype == BF16) { DECODE_ATTENTION_BODY(uint16_t, WIDEN_BF16, D) }
    else if (D == 64) { DECODE_ATTENTION_BODY(float, WIDEN_F32, 64) }
    else if (D == 128) { DECODE_ATTENTION_BODY(float, WIDEN_F32, 128) }
    else { DECODE_ATTENTION_BODY(float, WIDEN_F32, D) }
}

/*
 * RMSNorm of T rows of width n. With `residual`, x + residual is formed first and written to
 * `residual_out` (the un-normalised stream the next layer adds to). Matches the PyTorch path:
 * statistics in float32, the normalised value rounded to the model dtype before the weight
 * multiply.
 */
void aph_rms_norm(int dtype, const void* x, const void* residual, void* residual_out,
                  const void* weight, void* out, int T, int n, float eps) {
    #pragma omp parallel for schedule(static) if (T > 1)
    for (int t = 0; t < T; t++) {
        float* h = (float*)malloc((size_t)n * sizeof(float));
        long base = (long)t * n;
        for (int i = 0; i < n; i++) {
            float v = load(x, base + i, dtype);
            if (residual) {
                store(residual_out, base + i, v + load(residual, base + i, dtype), dtype);
                v = load(residual_out, base + i, dtype);   /* the rounded sum, as PyTorch keeps it */
            }
            h[i] = v;
        }
        float ss = 0.f;
        #pragma omp simd reduction(+:ss)
        for (int i = 0; i < n; i++) ss += h[i] * h[i];
        float r = 1.f / sqrtf(ss / n + eps);
        for (int i = 0; i < n; i++) {
            float w = load(weight, i, dtype);
            if (dtype == BF16) store(out, base + i, w * bf16_to_f32(f32_to_bf16(h[i] * r)), dtype);
            else store(out, base + i, h[i] * r * w, dtype);
        }
        free(h);
    }
}

/* out[T, d] = silu(x[:, :d]) * x[:, d:] for x [T, 2d]; silu rounded to the dtype first, as PyTorch does. */
void aph_silu_and_mul(int dtype, const void* x, void* out, int T, int d) {
    const size_t esize = dtype == BF16 ? 2 : 4;
    #pragma omp parallel for schedule(static) if ((long)T * d > 65536)
    for (int t = 0; t < T; t++) {
        float* g = (float*)malloc((size_t)d * 2 * sizeof(float));
        float* u = g + d;
        widen((const char*)x + (size_t)t * 2 * d * esize, g, 2L * d, dtype);   /* gate then up */
        #pragma omp simd
        for (int i = 0; i < d; i++) g[i] = g[i] / (1.f + expf(-g[i]));
        if (dtype == BF16) {
            uint16_t* o = (uint16_t*)out + (size_t)t * d;
            #pragma omp simd
            for (int i = 0; i < d; i++) o[i] = f32_to_bf16(bf16_to_f32(f32_to_bf16(g[i])) * u[i]);
        } else {
            float* o = (float*)out + (size_t)t * d;
            #pragma omp simd
            for (int i = 0; i < d; i++) o[i] = g[i] * u[i];
        }
        free(g);
    }
}

/*
 * One inverse-CDF draw per row: token i is picked when the running sum of exp(logit / T)
 * first exceeds u * total (float64 sums). Replaces softmax + cumsum + searchsorted, which
 * each make a [N, V] tensor. logits [N, V] float32; temperature [N] float32 or NULL (already
 * scaled); u [N] float64 in [0, 1); out [N] int64. Tokens at -inf never win: the running sum
 * only grows at tokens with mass.
 */
void aph_sample_inverse_cdf(const float* logits, const float* temperature, const double* u,
                            int64_t* out, int N, int V) {
    #pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const float* row = logits + (long)n * V;
        const float inv_t = temperature && temperature[n] > 0.f ? 1.f / temperature[n] : 1.f;
        float mx = -INFINITY;
        #pragma omp simd reduction(max:mx)
        for (int v = 0; v < V; v++) mx = row[v] > mx ? row[v] : mx;
        float* e = (float*)malloc((size_t)V * sizeof(float));
        /* subtract before scaling: at a tiny temperature, row * inv_t - mx * inv_t would cancel */
        #pragma omp simd
        for (int v = 0; v < V; v++) e[v] = expf((row[v] - mx) * inv_t);
        double total = 0.0;
        for (int v = 0; v < V; v++) total += e[v];
        const double target = u[n] * total;
        double cum = 0.0;
        int64_t pick = -1, last = 0;
        for (int v = 0; v < V; v++) {
            if (e[v] > 0.f) {
                last = v;
                cum += e[v];
                if (cum > target) { pick = v; break; }
            }
        }
        out[n] = pick >= 0 ? pick : last;
        free(e);
    }
}

/*
 * Per row of [N, V] float logits: out[n] = {max, entropy of softmax (nats), finite count, std of the
 * finite logits (Bessel)}. Two reads of the row (max, then the sums, in double), no temporaries.
 */
void aph_row_stats(const float* logits, float* out, int N, int V) {
    #pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const float* row = logits + (long)n * V;
        float mx = -INFINITY;
        #pragma omp simd reduction(max:mx)
        for (int v = 0; v < V; v++) mx = row[v] > mx ? row[v] : mx;
        const float shift = isinf(mx) ? 0.f : mx;
        /* float sums over chunks (they vectorize, expf included), chunk sums added in double */
        double s = 0.0, a = 0.0, cnt = 0.0, sx = 0.0, sxx = 0.0;
        for (int v0 = 0; v0 < V; v0 += 1024) {
            const int v1 = v0 + 1024 < V ? v0 + 1024 : V;
            float cs = 0.f, ca = 0.f, cc = 0.f, cx = 0.f, cxx = 0.f;
            #pragma omp simd reduction(+:cs, ca, cc, cx, cxx)
            for (int v = v0; v < v1; v++) {
                const float x = row[v];
                const int fin = x > -INFINITY;
                const float d = fin ? x - shift : 0.f;
                const float e = fin ? expf(d) : 0.f;
                cs += e;
                ca += e * d;
                cc += fin ? 1.f : 0.f;
                cx += d;
                cxx += d * d;
            }
            s += cs; a += ca; cnt += cc; sx += cx; sxx += cxx;
        }
        const double mean = cnt > 0 ? sx / cnt : 0.0;
        const double m2 = sxx - mean * sx;
        float* o = out + (long)n * 4;
        o[0] = mx;
        o[1] = (float)(log(s) - a / s);
        o[2] = (float)cnt;
        o[3] = (float)sqrt((m2 > 0 ? m2 : 0.0) / (cnt > 1 ? cnt - 1 : 1));
    }
}

/* Order-preserving map of a float onto uint32 (larger float, larger key). */
static inline uint32_t aph_fkey(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

/* The key of the K-th largest of x[0], x[stride], ..., x[(m-1) * stride] (radix select, 12 + 12 + 8
 * bits), and in *above how many of them have a larger key. */
static uint32_t aph_kth_key(const float* x, long stride, long m, long K, long* above) {
    uint32_t hist[4096];
    const int shifts[3] = {20, 8, 0}, widths[3] = {12, 12, 8};
    uint32_t prefix = 0, mask = 0;
    long need = K;
    for (int level = 0; level < 3; level++) {
        const int sh = shifts[level], nb = 1 << widths[level];
        memset(hist, 0, (size_t)nb * sizeof(uint32_t));
        for (long j = 0; j < m; j++) {
            const uint32_t k = aph_fkey(x[j * stride]);
            if ((k & mask) == prefix) hist[(k >> sh) & (uint32_t)(nb - 1)]++;
        }
        int b = nb - 1;
        while (b > 0 && (long)hist[b] < need) need -= hist[b--];
        prefix |= (uint32_t)b << sh;
        mask |= (uint32_t)(nb - 1) << sh;
    }
    *above = K - need;
    return prefix;
}

/*
 * The K largest of each row of [N, V] floats, in no particular order (as torch.topk(sorted=False));
 * among values tied at the K-th, the lowest indices. A strided sample of the row gives a threshold
 * that about 2K values clear; one pass keeps those (in index order), and a radix select on them
 * finds the K-th largest exactly. If fewer than K clear it, the radix select runs on the whole row.
 */
void aph_topk(const float* x, float* vals, int64_t* idx, int N, int V, int K) {
    #pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const float* row = x + (long)n * V;
        float* ov = vals + (long)n * K;
        int64_t* oi = idx + (long)n * K;
        const long stride = 16, m = V / stride, r = 2L * K / stride;
        float* cv = NULL;
        int64_t* ci = NULL;
        long c = 0, above;
        if (r >= 1 && m > r) {
            const uint32_t t = aph_kth_key(row, stride, m, r, &above);
            const long cap = 16L * K + 1024;
            cv = (float*)malloc((size_t)cap * sizeof(float));
            ci = (int64_t*)malloc((size_t)cap * sizeof(int64_t));
            for (int v = 0; v < V; v++) {
                if (aph_fkey(row[v]) >= t) {
                    if (c == cap) { c = -1; break; }
                    cv[c] = row[v]; ci[c] = v; c++;
                }
            }
        }
        int o = 0;
        if (c >= K) {
            const uint32_t kth = aph_kth_key(cv, 1, c, K, &above);
            for (long j = 0; j < c; j++)
                if (aph_fkey(cv[j]) > kth) { ov[o] = cv[j]; oi[o] = ci[j]; o++; }
            for (long j = 0; j < c && o < K; j++)
                if (aph_fkey(cv[j]) == kth) { ov[o] = cv[j]; oi[o] = ci[j]; o++; }
        } else {
            const uint32_t kth = aph_kth_key(row, 1, V, K, &above);
            for (int v = 0; v < V; v++)
                if (aph_fkey(row[v]) > kth) { ov[o] = row[v]; oi[o] = v; o++; }
            for (int v = 0; v < V && o < K; v++)
                if (aph_fkey(row[v]) == kth) { ov[o] = row[v]; oi[o] = v; o++; }
        }
        free(cv);
        free(ci);
    }
}

/* Structured output: logits[n, v] = -inf where bit v % 32 of mask[n, v / 32] is 0 (xgrammar's layout). */
void aph_apply_bitmask(float* logits, const int32_t* mask, int N, int V, int W) {
    #pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        float* row = logits + (long)n * V;
        const uint32_t* m = (const uint32_t*)mask + (long)n * W;
        for (int w = 0; w < W; w++) {
            uint32_t word = m[w];
            if (word == 0xFFFFFFFFu) continue;
            const int base = w * 32, end = base + 32 < V ? base + 32 : V;
            for (int v = base; v < end; v++)
                if (!((word >> (v - base)) & 1u)) row[v] = -INFINITY;
        }
    }
}

/*
 * Write this step's K/V rows into the paged cache: row t goes to slot slots[t] (-1 = skip).
 * k/v rows may be strided views of the fused qkv output (stride in elements); within a row the
 * Hkv * D values are contiguous, as in the cache.
 */
void aph_write_kv(int dtype, const void* k, const void* v, void* k_cache, void* v_cache,
                  const int64_t* slots, int T, int row_elems, long k_stride, long v_stride) {
    const size_t es = dtype == BF16 ? 2 : 4, bytes = (size_t)row_elems * es;
    for (int t = 0; t < T; t++) {
        if (slots[t] < 0) continue;
        memcpy((char*)k_cache + (size_t)slots[t] * bytes, (const char*)k + (size_t)t * k_stride * es, bytes);
        memcpy((char*)v_cache + (size_t)slots[t] * bytes, (const char*)v + (size_t)t * v_stride * es, bytes);
    }
}

/*
 * Rotary embedding of this step's q and k rows and the K/V cache write, in one pass.
 * q/k/v [T, H, D] rows may be strided (row strides in elements; a row's heads contiguous), as
 * views of the fused qkv output. cos_sin [P, 2, D] in the model dtype: row 0 = [cos, cos],
 * row 1 = [-sin, sin], so out = x * cos + roll(x, D/2) * sin, with x * cos rounded to the
 * dtype before the second product is added, as the PyTorch path rounds. Writes q_out
 * [T, Hq, D] and k_out [T, Hkv, D] (contiguous) and, where slots[t] >= 0, the rotated k and
 * the unchanged v rows into the caches [slots, Hkv, D]. head_dim up to 512.
 */
void aph_rope_write_kv(int dtype, const void* q, long q_stride, const void* k, long k_stride, const void* v,
                       long v_stride, int T, int Hq, int Hkv, int D, const int64_t* positions,
                       const void* cos_sin, void* q_out, void* k_out, void* k_cache, void* v_cache,
                       const int64_t* slots) {
    const size_t es = dtype == BF16 ? 2 : 4;
    const int half = D / 2;
    #pragma omp parallel for schedule(static) if (T > 16)
    for (int t = 0; t < T; t++) {
        float cs[2 * 512], x[512], o[512];
        widen((const char*)cos_sin + positions[t] * 2L * D * es, cs, 2L * D, dtype);
        const float* cosr = cs;
        const float* sinr = cs + D;
        for (int hh = 0; hh < Hq + Hkv; hh++) {
            const int is_q = hh < Hq, h = is_q ? hh : hh - Hq;
            const char* src = (const char*)(is_q ? q : k) + ((long)t * (is_q ? q_stride : k_stride) + (long)h * D) * es;
            char* dst = (char*)(is_q ? q_out : k_out) + ((long)t * (is_q ? Hq : Hkv) + h) * D * es;
            widen(src, x, D, dtype);
            #pragma omp simd
            for (int i = 0; i < D; i++) o[i] = x[i] * cosr[i];
            if (dtype == BF16) {
                #pragma omp simd
                for (int i = 0; i < D; i++) o[i] = bf16_to_f32(f32_to_bf16(o[i]));
            }
            #pragma omp simd
            for (int i = 0; i < half; i++) {
                o[i] += x[i + half] * sinr[i];
                o[i + half] += x[i] * sinr[i + half];
            }
            if (dtype == BF16) {
                uint16_t* d16 = (uint16_t*)dst;
                #pragma omp simd
                for (int i = 0; i < D; i++) d16[i] = f32_to_bf16(o[i]);
            } else {
                memcpy(dst, o, (size_t)D * sizeof(float));
            }
        }
        if (slots[t] < 0) continue;
        const size_t bytes = (size_t)Hkv * D * es;
        memcpy((char*)k_cache + (size_t)slots[t] * bytes, (const char*)k_out + (size_t)t * bytes, bytes);
        memcpy((char*)v_cache + (size_t)slots[t] * bytes, (const char*)v + (size_t)t * v_stride * es, bytes);
    }
}

/*
 * fp8 (e4m3fn) KV cache: rows hold x / scale as 8-bit floats (1 sign, 4 exponent bits with bias 7,
 * 3 mantissa bits; no infinities, 0x7f/0xff are NaN, largest finite 448). Encoding rounds to
 * nearest even and saturates at +-448, as PyTorch's conversion of a clamped value and the GPU's
 * cvt.rn.satfinite do; decoding goes through a 256-entry table.
 */
static float e4m3_table[256];
static int e4m3_ready = 0;

static void e4m3_init(void) {
    if (e4m3_ready) return;
    for (int c = 0; c < 256; c++) {
        const int e = (c >> 3) & 15, m = c & 7;
        float v = e == 0 ? ldexpf((float)m, -9) : ldexpf(1.0f + m / 8.0f, e - 7);
        if (e == 15 && m == 7) v = NAN;
        e4m3_table[c] = (c & 0x80) ? -v : v;
    }
    e4m3_ready = 1;
}

static inline uint8_t f32_to_e4m3(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    const uint8_t sign = (uint8_t)((u >> 24) & 0x80u);
    float a = fabsf(f);
    if (a != a) return (uint8_t)(sign | 0x7f);
    if (a > 448.0f) a = 448.0f;
    if (a < 0.015625f) return (uint8_t)(sign | (uint8_t)nearbyintf(a * 512.0f));  /* subnormal: m * 2^-9 */
    memcpy(&u, &a, 4);
    u += 0x7ffffu + ((u >> 20) & 1u);            /* round the 23-bit mantissa to 3 bits, ties to even */
    const int e = (int)(u >> 23) - 127 + 7;
    return (uint8_t)(sign | (uint8_t)(e << 3) | (uint8_t)((u >> 20) & 7u));
}

/* Rows [T, row_elems] of k/v (strided, model dtype) into fp8 cache slots, scaled by 1/scale. */
void aph_write_kv_fp8(int dtype, const void* k, const void* v, uint8_t* k_cache, uint8_t* v_cache,
                      const int64_t* slots, int T, int row_elems, long k_stride, long v_stride,
                      float k_inv_scale, float v_inv_scale) {
    for (int t = 0; t < T; t++) {
        if (slots[t] < 0) continue;
        uint8_t* kd = k_cache + (size_t)slots[t] * row_elems;
        uint8_t* vd = v_cache + (size_t)slots[t] * row_elems;
        for (int i = 0; i < row_elems; i++) {
            kd[i] = f32_to_e4m3(load(k, (long)t * k_stride + i, dtype) * k_inv_scale);
            vd[i] = f32_to_e4m3(load(v, (long)t * v_stride + i, dtype) * v_inv_scale);
        }
    }
}

/* Float32 values of n fp8 codes, times scale. */
void aph_e4m3_to_f32(const uint8_t* src, float* dst, long n, float scale) {
    e4m3_init();
    for (long i = 0; i < n; i++) dst[i] = e4m3_table[src[i]] * scale;
}

/*
 * Decode attention (one query token per sequence) over an fp8 paged cache [blocks, block_size, Hkv, D]:
 * q/out [B, Hq, D] in the model dtype; keys and values are decoded (times k_scale / v_scale) as they are
 * read. Softmax in float32; one (sequence, query head) per task. head_dim up to 512.
 */
void aph_paged_decode_attention_fp8(int dtype, const void* q, const uint8_t* k_cache, const uint8_t* v_cache,
                                    const int32_t* block_tables, const int32_t* seq_lens, void* out, int B,
                                    int Hq, int Hkv, int D, int block_size, int max_blocks, float scale,
                                    float k_scale, float v_scale) {
    e4m3_init();
    const int G = Hq / Hkv;
    #pragma omp parallel for collapse(2) schedule(dynamic)
    for (int b = 0; b < B; b++) {
        for (int h = 0; h < Hq; h++) {
            const int L = seq_lens[b], kvh = h / G;
            float qv[512], acc[512];
            for (int i = 0; i < D; i++) {
                qv[i] = load(q, ((long)b * Hq + h) * D + i, dtype) * scale * k_scale;
                acc[i] = 0.0f;
            }
            float m = -INFINITY, l = 0.0f;
            for (int j = 0; j < L; j++) {
                const long row = ((long)block_tables[(long)b * max_blocks + j / block_size] * block_size
                                  + j % block_size) * Hkv + kvh;
                const uint8_t* kr = k_cache + row * D;
                const uint8_t* vr = v_cache + row * D;
                float s = 0.0f;
                #pragma omp simd reduction(+:s)
                for (int i = 0; i < D; i++) s += qv[i] * e4m3_table[kr[i]];
                const float m_new = s > m ? s : m;
                const float alpha = expf(m - m_new), p = expf(s - m_new);
                l = l * alpha + p;
                #pragma omp simd
                for (int i = 0; i < D; i++) acc[i] = acc[i] * alpha + p * e4m3_table[vr[i]];
                m = m_new;
            }
            const float inv = L > 0 ? v_scale / l : 0.0f;
            for (int i = 0; i < D; i++) store(out, ((long)b * Hq + h) * D + i, acc[i] * inv, dtype);
        }
    }
}
