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
void aph_linear(int dtype, const void* W, const void* x, const void* bias, void* y,
                int M, int N, int K) {
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
            const int L = seq_lens[b];                                                           \
            const int32_t* table = block_tables + (long)b * max_blocks;                          \
            float* qf = (float*)malloc((size_t)G * D * sizeof(float));                           \
            float* acc = (float*)calloc((size_t)G * D, sizeof(float));                           \
            float* s = (float*)malloc((size_t)(L > 0 ? L : 1) * G * sizeof(float));  /* [G, L] */ \
            float kf[D];                                                                         \
            const long qbase = ((long)b * Hq + (long)h * G) * D;                                 \
            for (long i = 0; i < (long)G * D; i++) qf[i] = WIDEN(qs[qbase + i]) * scale;         \
            for (int t = 0; t < L; t++) {                                                        \
                const T* k = kc + CACHE_OFFSET(t);                                               \
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
                _Pragma("omp simd reduction(max:mx)")                                            \
                for (int t = 0; t < L; t++) mx = sg[t] > mx ? sg[t] : mx;                        \
                _Pragma("omp simd reduction(+:sum)")                                             \
                for (int t = 0; t < L; t++) { float e = expf(sg[t] - mx); sg[t] = e; sum += e; } \
                const float inv = sum > 0.f ? 1.f / sum : 0.f;                                   \
                _Pragma("omp simd")                                                              \
                for (int t = 0; t < L; t++) sg[t] *= inv;                                        \
            }                                                                                    \
            for (int t = 0; t < L; t++) {                                                        \
                const T* v = vc + CACHE_OFFSET(t);                                               \
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

void aph_paged_decode_attention(int dtype, const void* q, const void* k_cache,
                                const void* v_cache, const int32_t* block_tables,
                                const int32_t* seq_lens, void* out, int B, int Hq, int Hkv,
                                int head_dim, int block_size, int max_blocks, float scale) {
    const int D = head_dim;
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
