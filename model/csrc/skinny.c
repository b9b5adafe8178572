/* Skinny matrix products for decoding: y (R x N) = x (R x K) . W^T (+ bias),
 * with W stored N x K (nn.Linear's layout) in fp32, bf16 or int8 (one scale
 * per output row).
 *
 * A decode step multiplies each weight by 1 row (vanilla) or a few (a verify
 * step, or a few requests batched), so it is bound by reading W once from
 * memory: the fewer bytes per weight, the faster. BLAS libraries are tuned
 * for large R; for R = 1 some CPUs' matrix-vector paths read W far below
 * the memory's bandwidth (bench/results/kernels-*.json). Here each weight row
 * is read once and dotted with all R rows while it sits in L1, and the output
 * rows are split over the threads.
 *
 * Built at load by model/kernels.py with the machine's own compiler flags
 * (-O3 -march=native); whether it is used is decided by timing it against
 * torch's own products on the machine that serves.
 */
#include <stdint.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t u) {
    uint32_t t = (uint32_t)u << 16;
    float f;
    memcpy(&f, &t, sizeof f);
    return f;
}

/* Rows go four at a time, so each weight element loaded feeds four
 * products (a verify step has 2-10 rows); the remainder one at a time. */
#define ROW_LOOP(W)                                                              \
    _Pragma("omp parallel for num_threads(threads) schedule(static)")           \
    for (long n = 0; n < N; n++) {                                               \
        const float s = scale ? scale[n] : 1.0f, b = bias ? bias[n] : 0.0f;     \
        long r = 0;                                                              \
        for (; r + 4 <= R; r += 4) {                                             \
            const float *x0 = x + r * K, *x1 = x0 + K, *x2 = x1 + K, *x3 = x2 + K; \
            float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;                    \
            _Pragma("omp simd reduction(+:a0,a1,a2,a3)")                        \
            for (long k = 0; k < K; k++) {                                       \
                const float wk = W;                                              \
                a0 += x0[k] * wk; a1 += x1[k] * wk; a2 += x2[k] * wk; a3 += x3[k] * wk; \
            }                                                                    \
            y[r * N + n] = a0 * s + b; y[(r + 1) * N + n] = a1 * s + b;          \
            y[(r + 2) * N + n] = a2 * s + b; y[(r + 3) * N + n] = a3 * s + b;    \
        }                                                                        \
        for (; r < R; r++) {                                                     \
            const float *x0 = x + r * K;                                         \
            float a0 = 0.0f;                                                     \
            _Pragma("omp simd reduction(+:a0)")                                 \
            for (long k = 0; k < K; k++) a0 += x0[k] * (W);                      \
            y[r * N + n] = a0 * s + b;                                           \
        }                                                                        \
    }

void skinny_f32(const float *x, const float *w, const float *bias, float *y,
                long R, long N, long K, int threads) {
    const float *scale = 0;
    ROW_LOOP(w[n * K + k])
}

void skinny_bf16(const float *x, const uint16_t *w, const float *bias, float *y,
                 long R, long N, long K, int threads) {
    const float *scale = 0;
    ROW_LOOP(bf16_to_f32(w[n * K + k]))
}

void skinny_int8(const float *x, const int8_t *w, const float *scale, const float *bias, float *y,
                 long R, long N, long K, int threads) {
    ROW_LOOP((float)w[n * K + k])
}
