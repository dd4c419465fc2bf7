/*
 * A decode step of a Llama-shaped stack of decoder layers whose projections are GGUF blocks, in
 * one C call: per layer RMSNorm (+ residual) -> q/k/v -> RoPE + KV cache write -> paged decode
 * attention -> o -> RMSNorm (+ residual) -> gate/up -> SiLU * up -> down, then the final norm.
 *
 * Why: the default model's layers are small (576 wide), so at batch 1 the kernels take ~250 us a
 * layer and the Python between them (module calls, views, wrapper checks, allocations) another
 * ~100 us. This calls the very kernels the PyTorch modules call (aph_rms_norm, aph_gguf_linear,
 * aph_rope_write_kv, aph_paged_decode_attention, aph_silu_and_mul), in the same order with the
 * same roundings, so its results are the module path's bit for bit; intermediate rows live in a
 * workspace the caller allocates once.
 */
#include <stdint.h>
#include <string.h>

int aph_gguf_linear(int t, const uint8_t* W, long row_bytes, const void* x, const void* bias, void* y,
                    long ldy, int M, int N, int K, int dtype, int portable, int exact);
void aph_rms_norm(int dtype, const void* x, const void* residual, void* residual_out,
                  const void* weight, void* out, int T, int n, float eps);
void aph_silu_and_mul(int dtype, const void* x, void* out, int T, int d);
void aph_rope_write_kv(int dtype, const void* q, long q_stride, const void* k, long k_stride, const void* v,
                       long v_stride, int T, int Hq, int Hkv, int D, const int64_t* positions,
                       const void* cos_sin, void* q_out, void* k_out, void* k_cache, void* v_cache,
                       const int64_t* slots);
void aph_paged_decode_attention(int dtype, const void* q, const void* k_cache,
                                const void* v_cache, const int32_t* block_tables,
                                const int32_t* seq_lens, void* out, int B, int Hq, int Hkv,
                                int head_dim, int block_size, int max_blocks, float scale, int window,
                                float softcap);

/* One decoder layer: its norms, its four projections (one block type each) and its caches. */
typedef struct {
    const void* input_norm;          /* [H] in the activation dtype */
    const void* post_norm;           /* [H] */
    const uint8_t* w[4];             /* qkv [(Hq + 2 Hkv) D], o [H], gate_up [2 I], down [H] rows of blocks */
    long row_bytes[4];
    int type[4];                     /* ggml block type of each */
    void* k_cache;                   /* [blocks, block_size, Hkv, D] in the activation dtype */
    void* v_cache;
    const void* cos_sin;             /* [P, 2, D] RoPE table in the activation dtype */
    float eps;
    float scale;                     /* softmax scale */
    int window;                      /* sliding window, 0 for none */
} aph_gguf_layer;

/*
 * hidden [B, H]: the embeddings in, the final normed states out. work: at least
 * aph_gguf_stack_work_elems(...) elements of the dtype. Returns 0 (nothing meaningful written)
 * when a projection's kernel refuses its type or shape.
 */
long aph_gguf_stack_work_elems(int B, int H, int Hq, int Hkv, int D, int I) {
    const long qkv = (long)(Hq + 2 * Hkv) * D;
    return (long)B * (3L * H + qkv + (long)Hq * D * 2 + (long)Hkv * D + 3L * I);
}

int aph_gguf_decode_stack(int dtype, int L, const aph_gguf_layer* layers, int B, int H, int Hq, int Hkv, int D,
                          int I, const int64_t* positions, const int64_t* slots, const int32_t* block_tables,
                          const int32_t* seq_lens, int block_size, int max_blocks, const void* final_norm,
                          float final_eps, void* hidden, void* work, int exact) {
    const size_t es = dtype == 1 ? 2 : 4;
    const int QKV = (Hq + 2 * Hkv) * D;
    char* p = (char*)work;
    void* residual = p; p += (size_t)B * H * es;
    void* normed = p; p += (size_t)B * H * es;
    void* x = p; p += (size_t)B * H * es;        /* a layer's output (o, then down) */
    void* qkv = p; p += (size_t)B * QKV * es;
    void* q_rot = p; p += (size_t)B * Hq * D * es;
    void* k_rot = p; p += (size_t)B * Hkv * D * es;
    void* attn = p; p += (size_t)B * Hq * D * es;
    void* gu = p; p += (size_t)B * 2 * I * es;
    void* act = p;
    for (int l = 0; l < L; l++) {
        const aph_gguf_layer* ly = layers + l;
        if (l == 0) {   /* residual = embeddings; normed = norm(embeddings) */
            memcpy(residual, hidden, (size_t)B * H * es);
            aph_rms_norm(dtype, hidden, NULL, NULL, ly->input_norm, normed, B, H, ly->eps);
        } else {
            aph_rms_norm(dtype, x, residual, residual, ly->input_norm, normed, B, H, ly->eps);
        }
        if (!aph_gguf_linear(ly->type[0], ly->w[0], ly->row_bytes[0], normed, NULL, qkv, QKV, B, QKV, H, dtype, 0,
                             exact))
            return 0;
        const char* q = (const char*)qkv;
        aph_rope_write_kv(dtype, q, QKV, q + (size_t)Hq * D * es, QKV, q + (size_t)(Hq + Hkv) * D * es, QKV, B, Hq,
                          Hkv, D, positions, ly->cos_sin, q_rot, k_rot, ly->k_cache, ly->v_cache, slots);
        aph_paged_decode_attention(dtype, q_rot, ly->k_cache, ly->v_cache, block_tables, seq_lens, attn, B, Hq, Hkv,
                                   D, block_size, max_blocks, ly->scale, ly->window, 0.f);
        if (!aph_gguf_linear(ly->type[1], ly->w[1], ly->row_bytes[1], attn, NULL, x, H, B, H, Hq * D, dtype, 0,
                             exact))
            return 0;
        aph_rms_norm(dtype, x, residual, residual, ly->post_norm, normed, B, H, ly->eps);
        if (!aph_gguf_linear(ly->type[2], ly->w[2], ly->row_bytes[2], normed, NULL, gu, 2L * I, B, 2 * I, H, dtype,
                             0, exact))
            return 0;
        aph_silu_and_mul(dtype, gu, act, B, I);
        if (!aph_gguf_linear(ly->type[3], ly->w[3], ly->row_bytes[3], act, NULL, x, H, B, H, I, dtype, 0, exact))
            return 0;
    }
    aph_rms_norm(dtype, x, residual, residual, final_norm, hidden, B, H, final_eps);
    return 1;
}
