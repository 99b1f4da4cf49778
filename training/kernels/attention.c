/* Exact softmax attention, forward and backward, for small heads on the CPU.
 *
 * Built by training/cpu_attention.py with the system C compiler on first use. PyTorch's CPU
 * flash-attention kernel works in tiles of GEMMs, which at a head size of 4 or 8 do almost no
 * arithmetic per byte moved. Here one pass over the keys per query row computes the scores, the
 * exponentials and every product with the head's values in registers, vectorized across keys.
 *
 * Layouts (fp32, contiguous):
 *   q, o, dout, dq   [B][N][H][D]   (a Linear's output viewed as heads, no transpose)
 *   kt, vt, dkt, dvt [B][H][D][M]   (keys and values transposed: one row per channel)
 *   lse              [B][H][N]      (log-sum-exp of each query row's scaled scores)
 * The backward recomputes the probabilities from lse. Work is split over OpenMP threads; built
 * with -fopenmp and loaded into a process that runs torch, the kernel uses torch's libgomp (same
 * soname, already loaded) and so its thread pool and its torch.set_num_threads setting.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h> /* resolved to the OpenMP runtime torch already loaded: one thread pool */
#else
static int omp_get_thread_num(void) { return 0; }
static int omp_get_num_threads(void) { return 1; }
static int omp_get_max_threads(void) { return 1; }
#endif

#define INLINE static inline __attribute__((always_inline))
#define MAX_D 8 /* wider heads spill the per-channel registers: slower than PyTorch's kernel */

/* exp(x) for x <= 0: 2^n * e^r with |r| <= ln2/2, e^r by a degree-7 polynomial (relative
 * error ~2e-7). */
INLINE float exp_nonpos(float x) {
    x = x < -87.0f ? -87.0f : x;
    float n = __builtin_rintf(x * 1.44269504088896341f);
    float r = x - n * 0.693145751953125f - n * 1.428606765330187045e-6f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

INLINE void forward_rows(const float *q, const float *kt, const float *vt, float *o, float *lse,
                         int64_t H, int64_t N, int64_t M, const int64_t D, float scale,
                         int64_t row0, int64_t row1, float *s) {
    for (int64_t row = row0; row < row1; row++) {
        int64_t bh = row / N, i = row % N, b = bh / H, h = bh % H;
        const float *K = kt + bh * D * M, *V = vt + bh * D * M;
        const float *qi = q + ((b * N + i) * H + h) * D;
        float qs[MAX_D], acc[MAX_D];
        for (int64_t c = 0; c < D; c++) { qs[c] = qi[c] * scale; acc[c] = 0.0f; }
        float m = -FLT_MAX;
        for (int64_t j = 0; j < M; j++) {
            float x = 0.0f;
#pragma GCC unroll 8
            for (int64_t c = 0; c < D; c++) x += qs[c] * K[c * M + j];
            s[j] = x;
            m = x > m ? x : m;
        }
        float l = 0.0f;
        for (int64_t j = 0; j < M; j++) {
            float p = exp_nonpos(s[j] - m);
            l += p;
#pragma GCC unroll 8
            for (int64_t c = 0; c < D; c++) acc[c] += p * V[c * M + j];
        }
        float *oi = o + ((b * N + i) * H + h) * D;
        for (int64_t c = 0; c < D; c++) oi[c] = acc[c] / l;
        lse[bh * N + i] = m + logf(l);
    }
}

INLINE void backward_rows(const float *q, const float *kt, const float *vt, const float *o,
                          const float *lse, const float *dout, float *dq, float *dkt, float *dvt,
                          int64_t H, int64_t N, int64_t M, const int64_t D, float scale,
                          int64_t bh0, int64_t bh1, int64_t i0, int64_t i1) {
    for (int64_t bh = bh0; bh < bh1; bh++) {
        int64_t b = bh / H, h = bh % H;
        const float *K = kt + bh * D * M, *V = vt + bh * D * M;
        float *dK = dkt + bh * D * M, *dV = dvt + bh * D * M;
        for (int64_t i = i0; i < i1; i++) {
            int64_t at = ((b * N + i) * H + h) * D;
            float qs[MAX_D], g[MAX_D], gq[MAX_D];
            float delta = 0.0f;
            for (int64_t c = 0; c < D; c++) {
                qs[c] = q[at + c] * scale;
                g[c] = dout[at + c];
                gq[c] = 0.0f;
                delta += g[c] * o[at + c];
            }
            float L = lse[bh * N + i];
#pragma GCC ivdep
            for (int64_t j = 0; j < M; j++) {
                float x = -L, dp = -delta;
#pragma GCC unroll 8
                for (int64_t c = 0; c < D; c++) {
                    x += qs[c] * K[c * M + j];
                    dp += g[c] * V[c * M + j];
                }
                float p = exp_nonpos(x);
                float ds = p * dp;
#pragma GCC unroll 8
                for (int64_t c = 0; c < D; c++) {
                    gq[c] += ds * K[c * M + j];
                    dK[c * M + j] += ds * qs[c];
                    dV[c * M + j] += p * g[c];
                }
            }
            for (int64_t c = 0; c < D; c++) dq[at + c] = gq[c] * scale;
        }
    }
}

/* The head size is a compile-time constant (one instance per size), so the channel loops unroll
 * into registers and the key loop is the only one left to vectorize: with a size known only at
 * run time GCC vectorizes nothing and the kernel is several times slower than PyTorch's. */
#define CASE(n, CALL) case n: { const int64_t d_ = n; CALL; break; }
#define DISPATCH(D, CALL)                                                              \
    switch (D) {                                                                       \
    CASE(1, CALL) CASE(2, CALL) CASE(3, CALL) CASE(4, CALL)                            \
    CASE(5, CALL) CASE(6, CALL) CASE(7, CALL) CASE(8, CALL)                            \
    }

static void split(int64_t total, int64_t *begin, int64_t *end) {
    int64_t part = omp_get_thread_num(), parts = omp_get_num_threads();
    *begin = total * part / parts;
    *end = total * (part + 1) / parts;
}

/* Rows of (batch, head, query) are split over the threads. Returns 0, or 1 for an unsupported
 * head size, 2 when out of memory. */
int df_attention_forward(const float *q, const float *kt, const float *vt, float *o, float *lse,
                         int64_t B, int64_t H, int64_t N, int64_t M, int64_t D, float scale) {
    if (D < 1 || D > MAX_D) return 1;
    int failed = 0;
#pragma omp parallel
    {
        float *s = malloc(sizeof(float) * (size_t)M);
        int64_t row0, row1;
        split(B * H * N, &row0, &row1);
        if (s) {
            DISPATCH(D, forward_rows(q, kt, vt, o, lse, H, N, M, d_, scale, row0, row1, s));
        } else {
#pragma omp atomic write
            failed = 1;
        }
        free(s);
    }
    return failed ? 2 : 0;
}

/* With at least as many (batch, head) pairs as threads, each thread owns whole heads and writes
 * their dK, dV alone. With fewer, the queries are split and each thread sums into its own dK, dV,
 * added up at the end. */
int df_attention_backward(const float *q, const float *kt, const float *vt, const float *o,
                          const float *lse, const float *dout, float *dq, float *dkt, float *dvt,
                          int64_t B, int64_t H, int64_t N, int64_t M, int64_t D, float scale) {
    if (D < 1 || D > MAX_D) return 1;
    int64_t pairs = B * H, size = pairs * D * M;
    int threads = omp_get_max_threads();
    if (pairs >= threads) {
#pragma omp parallel
        {
            int64_t bh0, bh1;
            split(pairs, &bh0, &bh1);
            memset(dkt + bh0 * D * M, 0, sizeof(float) * (size_t)((bh1 - bh0) * D * M));
            memset(dvt + bh0 * D * M, 0, sizeof(float) * (size_t)((bh1 - bh0) * D * M));
            DISPATCH(D, backward_rows(q, kt, vt, o, lse, dout, dq, dkt, dvt, H, N, M, d_, scale, bh0, bh1, 0, N));
        }
        return 0;
    }
    float *partial = calloc((size_t)threads * 2 * (size_t)size, sizeof(float));
    if (!partial) return 2;
    int team = 1;
#pragma omp parallel
    {
        int64_t i0, i1, t = omp_get_thread_num();
#pragma omp single
        team = omp_get_num_threads();
        split(N, &i0, &i1);
        float *dk = partial + 2 * t * size, *dv = dk + size;
        DISPATCH(D, backward_rows(q, kt, vt, o, lse, dout, dq, dk, dv, H, N, M, d_, scale, 0, pairs, i0, i1));
    }
#pragma omp parallel for schedule(static)
    for (int64_t e = 0; e < size; e++) {
        float dk = 0.0f, dv = 0.0f;
        for (int t = 0; t < team; t++) {
            dk += partial[2 * t * size + e];
            dv += partial[(2 * t + 1) * size + e];
        }
        dkt[e] = dk;
        dvt[e] = dv;
    }
    free(partial);
    return 0;
}
