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
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t u) {
    uint32_t t = (uint32_t)u << 16;
    float f;
    memcpy(&f, &t, sizeof f);
    return f;
}

/* How many weight rows ahead a product of R input rows asks the memory for
 * (0: leave it to the hardware prefetcher), for R up to PREFETCH_TABLE - 1.
 * A one-row decode step is bound by streaming the weights, and asking ahead
 * kept more of them in flight on the AVX2 EPYC; with several rows the
 * products are arithmetic, and there it helped fp32 and slowed w8a8
 * (bench/results/prefetch-*.json). So the plan (model/kernels.py) times each
 * decode bucket both ways on the serving machine and sets this table. It
 * changes no result, only when bytes arrive. */
#define PREFETCH_TABLE 65
static long prefetch_for_rows[PREFETCH_TABLE];
void skinny_set_prefetch(long rows, long ahead) {
    if (rows >= 0 && rows < PREFETCH_TABLE) prefetch_for_rows[rows] = ahead < 0 ? 0 : ahead;
}
long skinny_get_prefetch(long rows) { return rows >= 0 && rows < PREFETCH_TABLE ? prefetch_for_rows[rows] : 0; }
/* Ask for the cache lines that start in bytes [FROM, FROM + N) of the row
 * AHEAD rows after W0 (rows of K elements). */
#define PREFETCH_AHEAD(AHEAD, W0, K, FROM, N)                                        \
    do {                                                                             \
        if (AHEAD) {                                                                 \
            const char *ahead_ = (const char *)((W0) + (AHEAD) * (K));                \
            for (long at_ = ((FROM) + 63) & ~63L; at_ < (FROM) + (N); at_ += 64)      \
                _mm_prefetch(ahead_ + at_, _MM_HINT_T0);                             \
        }                                                                            \
    } while (0)

/* Without a vector ISA we know (or when K is not a multiple of the vector
 * width), the compiler vectorises this loop for the machine: one output at a
 * time, each the same loop whatever R is, so a row's result does not depend
 * on which rows came with it. */
#define ROW_LOOP(W)                                                              \
    _Pragma("omp parallel for num_threads(threads) schedule(static)")           \
    for (long n = 0; n < N; n++) {                                               \
        const float s = scale ? scale[n] : 1.0f, b = bias ? bias[n] : 0.0f;     \
        for (long r = 0; r < R; r++) {                                           \
            const float *x0 = x + r * K;                                         \
            float a0 = 0.0f;                                                     \
            _Pragma("omp simd reduction(+:a0)")                                 \
            for (long k = 0; k < K; k++) a0 += x0[k] * (W);                      \
            y[r * N + n] = a0 * s + b;                                           \
        }                                                                        \
    }

/* With AVX-512 (Zen 4 EPYCs, Xeons) or AVX2 + FMA (older EPYCs): one weight
 * row at a time against up to RB input rows, two sums per row in registers
 * (the even and the odd vector steps of k, for two chains of multiply-adds in
 * flight), so each weight vector loaded (and widened from bf16 or int8) feeds
 * up to RB products. Every sum is the same sequence of vector multiply-adds
 * and the same final reduction whatever R is, so a row's result does not
 * depend on which rows came with it: a verify step's rows equal one-row
 * forwards bit for bit. RB fills the registers (32 with AVX-512, 16 with
 * AVX2); tiles of several weight rows measured slower on the AVX2 EPYC
 * (bench/results/kernels-default-amd-avx2.json has the kernel's figures). */
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#define TILED 1
#ifdef __AVX512F__
typedef __m512 vec;
#define VLEN 16
#define RB 8
#define vzero _mm512_setzero_ps
#define vfma _mm512_fmadd_ps
#define vadd _mm512_add_ps
#define vload _mm512_loadu_ps
static inline float vsum(vec a) { return _mm512_reduce_add_ps(a); }
static inline vec ld_f32(const float *p) { return _mm512_loadu_ps(p); }
static inline vec ld_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
static inline vec ld_i8(const int8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}
#else
typedef __m256 vec;
#define VLEN 8
#define RB 4
#define vzero _mm256_setzero_ps
#define vfma _mm256_fmadd_ps
#define vadd _mm256_add_ps
#define vload _mm256_loadu_ps
static inline float vsum(vec a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
static inline vec ld_f32(const float *p) { return _mm256_loadu_ps(p); }
static inline vec ld_bf16(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
static inline vec ld_i8(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}
#endif

/* out[j] = sum_k w0[k] x[j][k] for j < RR; RR is a constant after inlining,
 * so the sums live in registers. */
#define DEFINE_TILE(NAME, WT, LD)                                                     \
static inline __attribute__((always_inline)) void NAME(                              \
        const float *x, const WT *w0, long K, float *out, const int RR, const long ahead) { \
    vec a[RB], b[RB];                                                                \
    for (int j = 0; j < RR; j++) a[j] = b[j] = vzero();                              \
    long k = 0;                                                                      \
    for (; k + 2 * VLEN <= K; k += 2 * VLEN) {                                       \
        PREFETCH_AHEAD(ahead, w0, K, (long)(k * sizeof(WT)), (long)(2 * VLEN * sizeof(WT))); \
        const vec v0 = LD(w0 + k), v1 = LD(w0 + k + VLEN);                          \
        for (int j = 0; j < RR; j++) {                                               \
            a[j] = vfma(v0, vload(x + j * K + k), a[j]);                             \
            b[j] = vfma(v1, vload(x + j * K + k + VLEN), b[j]);                      \
        }                                                                            \
    }                                                                                \
    for (; k < K; k += VLEN) {                                                       \
        const vec v0 = LD(w0 + k);                                                   \
        for (int j = 0; j < RR; j++) a[j] = vfma(v0, vload(x + j * K + k), a[j]);    \
    }                                                                                \
    for (int j = 0; j < RR; j++) out[j] = vsum(vadd(a[j], b[j]));                    \
}

#define DEFINE_PRODUCT(NAME, TILE, WT)                                               \
static void NAME(const float *x, const WT *w, const float *scale, const float *bias, float *y, \
                 long R, long N, long K, int threads) {                             \
    const long ahead = skinny_get_prefetch(R);                                      \
    _Pragma("omp parallel for num_threads(threads) schedule(static)")              \
    for (long n = 0; n < N; n++) {                                                  \
        const WT *w0 = w + n * K;                                                   \
        const float s0 = scale ? scale[n] : 1.0f, b0 = bias ? bias[n] : 0.0f;       \
        for (long r0 = 0; r0 < R; r0 += RB) {                                       \
            float o[RB];                                                            \
            const float *xr = x + r0 * K;                                           \
            const long rr = R - r0 < RB ? R - r0 : RB;                              \
            switch (rr) { /* a constant tile height for the compiler */             \
                case 1: TILE(xr, w0, K, o, 1, ahead); break;                               \
                case 2: TILE(xr, w0, K, o, 2, ahead); break;                               \
                case 3: TILE(xr, w0, K, o, 3, ahead); break;                               \
                case 4: TILE(xr, w0, K, o, 4 <= RB ? 4 : 1, ahead); break;                 \
                case 5: TILE(xr, w0, K, o, 5 <= RB ? 5 : 1, ahead); break;                 \
                case 6: TILE(xr, w0, K, o, 6 <= RB ? 6 : 1, ahead); break;                 \
                case 7: TILE(xr, w0, K, o, 7 <= RB ? 7 : 1, ahead); break;                 \
                default: TILE(xr, w0, K, o, RB, ahead); break;                             \
            }                                                                       \
            for (long j = 0; j < rr; j++) y[(r0 + j) * N + n] = o[j] * s0 + b0;     \
        }                                                                           \
    }                                                                               \
}

DEFINE_TILE(tile_f32, float, ld_f32)
DEFINE_TILE(tile_bf16, uint16_t, ld_bf16)
DEFINE_TILE(tile_i8, int8_t, ld_i8)
DEFINE_PRODUCT(tiled_f32, tile_f32, float)
DEFINE_PRODUCT(tiled_bf16, tile_bf16, uint16_t)
DEFINE_PRODUCT(tiled_i8, tile_i8, int8_t)
#define USE_TILES(K) ((K) % VLEN == 0)
#else
#define TILED 0
#define USE_TILES(K) 0
#define tiled_f32(...) (void)0
#define tiled_bf16(...) (void)0
#define tiled_i8(...) (void)0
#endif

/* Which path this build runs, for the plan's report: 512, 256 or 0 (portable). */
int skinny_vector_bits(void) {
#if TILED
    return VLEN * 32;
#else
    return 0;
#endif
}

void skinny_f32(const float *x, const float *w, const float *bias, float *y,
                long R, long N, long K, int threads) {
    const float *scale = 0;
    if (USE_TILES(K)) { tiled_f32(x, w, scale, bias, y, R, N, K, threads); return; }
    ROW_LOOP(w[n * K + k])
}

void skinny_bf16(const float *x, const uint16_t *w, const float *bias, float *y,
                 long R, long N, long K, int threads) {
    const float *scale = 0;
    if (USE_TILES(K)) { tiled_bf16(x, w, scale, bias, y, R, N, K, threads); return; }
    ROW_LOOP(bf16_to_f32(w[n * K + k]))
}

void skinny_int8(const float *x, const int8_t *w, const float *scale, const float *bias, float *y,
                 long R, long N, long K, int threads) {
    if (USE_TILES(K)) { tiled_i8(x, w, scale, bias, y, R, N, K, threads); return; }
    ROW_LOOP((float)w[n * K + k])
}

/* ---- int8 weights times int8 activations (w8a8) ----------------------------
 *
 * The int8 path above widens every weight to fp32 before its multiply-add:
 * three instructions per 8 weights, which on the AVX2 EPYC, not memory, set
 * its pace. Here each input row is rounded to int8 too, with one scale per
 * row (its largest magnitude / 127), and the products run on bytes:
 * |w| times x carrying w's sign (the sign trick, as |w| must be unsigned),
 * 32 at a time into 16-bit pairs, then 32-bit sums that are exact (127 *
 * 127 * K fits in 32 bits for any K below 133,000). Integer sums are exact
 * whatever the order, and each row is rounded on its own, so a row's result
 * does not depend on which rows came with it. K must be a multiple of 32. */
#if defined(__AVX2__)
#define W8A8 1
static inline int32_t hsum_epi32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

#define Q8_TILE(RR)                                                                  \
    do {                                                                             \
        __m256i acc[RR];                                                             \
        for (int j = 0; j < RR; j++) acc[j] = _mm256_setzero_si256();                \
        for (long k = 0; k < K; k += 32) {                                           \
            PREFETCH_AHEAD(ahead, w0, K, k, 32L);                                    \
            const __m256i wv = _mm256_loadu_si256((const __m256i *)(w0 + k));        \
            const __m256i aw = _mm256_sign_epi8(wv, wv);                             \
            for (int j = 0; j < RR; j++) {                                           \
                const __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + (r0 + j) * K + k)); \
                const __m256i p16 = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(xv, wv)); \
                acc[j] = _mm256_add_epi32(acc[j], _mm256_madd_epi16(p16, ones));     \
            }                                                                        \
        }                                                                            \
        for (int j = 0; j < RR; j++)                                                 \
            y[(r0 + j) * N + n] = (float)hsum_epi32(acc[j]) * xs[r0 + j] * s0 + b0;  \
    } while (0)

/* One activation row to int8 with its own scale (largest magnitude / 127),
 * rounding half to even as lrintf does (and torch.round): 32 at a time, four
 * conversions packed to bytes, on the thread that then waits for none. The
 * same bytes as the one-at-a-time loop: max is exact in any order, and the
 * vector conversion rounds in the same mode. K is a multiple of 32. */
static void quantize_row(const float *xr, long K, int8_t *q, float *scale) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 vm = _mm256_setzero_ps();
    for (long k = 0; k < K; k += 8) vm = _mm256_max_ps(vm, _mm256_and_ps(_mm256_loadu_ps(xr + k), absmask));
    float m8[8], m = 0.0f;
    _mm256_storeu_ps(m8, vm);
    for (int j = 0; j < 8; j++) m = fmaxf(m, m8[j]);
    const float inv = m > 0.0f ? 127.0f / m : 0.0f;
    *scale = m / 127.0f;
    const __m256 vi = _mm256_set1_ps(inv);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (long k = 0; k < K; k += 32) {
        const __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xr + k), vi));
        const __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xr + k + 8), vi));
        const __m256i c = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xr + k + 16), vi));
        const __m256i d = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xr + k + 24), vi));
        /* packs work within 128-bit lanes; the permute puts the 4-byte groups back in order */
        const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(a, b), _mm256_packs_epi32(c, d));
        _mm256_storeu_si256((__m256i *)(q + k), _mm256_permutevar8x32_epi32(bytes, order));
    }
}

void skinny_w8a8(const float *x, const int8_t *w, const float *scale, const float *bias, float *y,
                 long R, long N, long K, int threads) {
    if (K % 32 != 0) {  /* no byte tiles: the int8 weights with fp32 activations */
        skinny_int8(x, w, scale, bias, y, R, N, K, threads);
        return;
    }
    const long ahead = skinny_get_prefetch(R);
    int8_t *xq = (int8_t *)malloc((size_t)(R * K));
    float *xs = (float *)malloc((size_t)R * sizeof(float));
    for (long r = 0; r < R; r++)
        quantize_row(x + r * K, K, xq + r * K, xs + r);
    const __m256i ones = _mm256_set1_epi16(1);
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (long n = 0; n < N; n++) {
        const int8_t *w0 = w + n * K;
        const float s0 = scale[n], b0 = bias ? bias[n] : 0.0f;
        long r0 = 0;
        for (; r0 + 4 <= R; r0 += 4) Q8_TILE(4);
        switch (R - r0) {
            case 3: Q8_TILE(3); break;
            case 2: Q8_TILE(2); break;
            case 1: Q8_TILE(1); break;
            default: break;
        }
    }
    free(xq);
    free(xs);
}
#else
#define W8A8 0
void skinny_w8a8(const float *x, const int8_t *w, const float *scale, const float *bias, float *y,
                 long R, long N, long K, int threads) {
    skinny_int8(x, w, scale, bias, y, R, N, K, threads);
}
#endif

/* Whether this build multiplies w8a8 on bytes (AVX2); without, skinny_w8a8 is the int8 path. */
int skinny_has_w8a8(void) { return W8A8; }

/* ---- one transformer block of a decode step, in one call -----------------
 *
 * At a decode step's few rows the matrix products are a third of the time
 * and the rest is per-op overhead: some 25 torch ops per block (LayerNorm,
 * views, cache writes, attention, GELU, residual adds) at several
 * microseconds each. This runs GPT-2's pre-LayerNorm block on R rows with
 * the weights above, writing the rows' keys and values into their caches:
 *
 *   x += c_proj(attention(c_attn(ln_1(x))));  x += mlp_proj(gelu(c_fc(ln_2(x))))
 *
 * Row r sits at position pos[r] and attends to its cache's positions
 * 0..pos[r] (its own key included): the causal mask of a prompt chunk or a
 * verify step. A cache is (n_head, max_len, head_dim) for one sequence;
 * rows of different sequences (a batched forward) pass different caches.
 */
typedef struct {
    const void *w;      /* (N, K) in the block's weight type */
    const float *scale; /* int8: (N,) */
    const float *bias;  /* (N,) or NULL */
} Weight;

static void matmul(const float *x, const Weight *W, float *y, long R, long N, long K, int wtype, int threads) {
    if (wtype == 0)
        skinny_f32(x, (const float *)W->w, W->bias, y, R, N, K, threads);
    else if (wtype == 1)
        skinny_bf16(x, (const uint16_t *)W->w, W->bias, y, R, N, K, threads);
    else if (wtype == 2)
        skinny_int8(x, (const int8_t *)W->w, W->scale, W->bias, y, R, N, K, threads);
    else
        skinny_w8a8(x, (const int8_t *)W->w, W->scale, W->bias, y, R, N, K, threads);
}

/* erf(x) as x P(x^2) / Q(x^2) on x clamped to [-4, 4] (erf is 1 to float
 * precision beyond): a branch-free rational fit, within a few ulp of erff
 * (tests/test_kernels.py checks it against torch), that the compiler
 * vectorises. libm's erff is scalar: 16 ns a call, 0.15 ms of a 6-block
 * forward's 9,216 GELUs on the AVX2 EPYC. */
static inline float erf_rational(float x) {
    x = x > 4.0f ? 4.0f : x;  /* two selects, which the compiler turns into min and max */
    x = x < -4.0f ? -4.0f : x;
    const float z = x * x;
    float p = -2.72614225801306e-10f;
    p = p * z + 2.77068142495902e-08f;
    p = p * z - 2.10102402082508e-06f;
    p = p * z - 5.69250639462346e-05f;
    p = p * z - 7.34990630326855e-04f;
    p = p * z - 2.95459980854025e-03f;
    p = p * z - 1.60960333262415e-02f;
    float q = -1.45660718464996e-05f;
    q = q * z - 2.13374055278905e-04f;
    q = q * z - 1.68282697438203e-03f;
    q = q * z - 7.37332916720468e-03f;
    q = q * z - 1.42647390514189e-02f;
    return x * p / q;
}

/* Exported for the test that holds erf_rational to torch's erf. */
void gelu_erf_rows(float *u, long n) {
    #pragma omp simd
    for (long i = 0; i < n; i++) u[i] = 0.5f * u[i] * (1.0f + erf_rational(u[i] * 0.7071067811865476f));
}

static void gelu(float *u, long n, int tanh_form) {
    if (!tanh_form) { gelu_erf_rows(u, n); return; }
    for (long i = 0; i < n; i++) {  /* GPT-2's tanh form, for imported models */
        const float v = u[i];
        u[i] = 0.5f * v * (1.0f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));
    }
}

static void layer_norm(const float *x, const float *g, const float *b, float *y, long R, long C, float eps) {
    for (long r = 0; r < R; r++) {
        const float *xr = x + r * C;
        float mean = 0.0f, var = 0.0f;
        for (long c = 0; c < C; c++) mean += xr[c];
        mean /= (float)C;
        for (long c = 0; c < C; c++) { float d = xr[c] - mean; var += d * d; }
        float inv = 1.0f / sqrtf(var / (float)C + eps);
        for (long c = 0; c < C; c++) y[r * C + c] = (xr[c] - mean) * inv * g[c] + (b ? b[c] : 0.0f);
    }
}

static inline uint16_t f32_to_bf16(float f) {  /* round to nearest even, as torch's .to(bfloat16) */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  /* NaN stays NaN */
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* exp(x) for x <= 0 (a difference from a maximum): Cephes' expf polynomial,
 * within 2 ulp, eight at a time. */
#ifdef __AVX2__
static inline __m256 exp256(__m256 x) {  /* x <= 0 here: x - max */
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
#endif

/* s[j] = exp(s[j] - mx) for j < n; returns their sum. */
static inline float exp_shifted_sum(float *s, long n, float mx) {
    long j = 0;
    float z = 0.0f;
#ifdef __AVX2__
    const __m256 vm = _mm256_set1_ps(mx);
    __m256 acc = _mm256_setzero_ps();
    for (; j + 8 <= n; j += 8) {
        const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(s + j), vm));
        _mm256_storeu_ps(s + j, e);
        acc = _mm256_add_ps(acc, e);
    }
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    z = _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
#endif
    for (; j < n; j++) { s[j] = expf(s[j] - mx); z += s[j]; }
    return z;
}

/* Attention of rows over their caches. Row r's new key and value go into its
 * caches at pos[r]; then every row attends over its cache's positions
 * 0..pos[r]. Rows of one sequence (a verify step, a prompt chunk) share the
 * cache they read, so the work is split by (sequence, head): each task reads
 * its head's keys and values once for all its rows. A bf16 cache is widened
 * once per task when several rows read it (widening is exact, so a row's
 * sums are the same whichever way it was read). Each row's scores and sums
 * are the same sequence of operations whatever rows came with it, so a
 * verify row equals a one-token forward bit for bit. */
#if defined(__AVX2__) && defined(__FMA__)
#define ATT_VEC 1
static inline __m256 ld8_f32(const float *p) { return _mm256_loadu_ps(p); }
static inline __m256 ld8_bf16(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
/* The eight sums of a0..a7's lanes, as one vector (sum of a_i in lane i). */
static inline __m256 sum8x8(__m256 a0, __m256 a1, __m256 a2, __m256 a3, __m256 a4, __m256 a5, __m256 a6, __m256 a7) {
    const __m256 t0 = _mm256_hadd_ps(a0, a1), t1 = _mm256_hadd_ps(a2, a3);
    const __m256 t2 = _mm256_hadd_ps(a4, a5), t3 = _mm256_hadd_ps(a6, a7);
    const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}
static inline float sum8(__m256 a) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}
/* s[j] = (q . K_j) sm for j < n, eight positions at a time (one horizontal
 * sum per eight); returns the largest. D is a multiple of 8. */
#define DEFINE_SCORES(NAME, KT, LD8)                                                    \
static float NAME(const float *q, const KT *K, long n, long D, float sm, float *s) {   \
    const __m256 vsm = _mm256_set1_ps(sm);                                              \
    __m256 vmx = _mm256_set1_ps(-INFINITY);                                             \
    long j = 0;                                                                         \
    for (; j + 8 <= n; j += 8) {                                                        \
        __m256 a[8];                                                                    \
        for (int t = 0; t < 8; t++) a[t] = _mm256_setzero_ps();                         \
        for (long c = 0; c < D; c += 8) {                                               \
            const __m256 qv = _mm256_loadu_ps(q + c);                                   \
            for (int t = 0; t < 8; t++) a[t] = _mm256_fmadd_ps(qv, LD8(K + (j + t) * D + c), a[t]); \
        }                                                                               \
        const __m256 v = _mm256_mul_ps(sum8x8(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]), vsm); \
        _mm256_storeu_ps(s + j, v);                                                     \
        vmx = _mm256_max_ps(vmx, v);                                                    \
    }                                                                                   \
    float mx = -INFINITY;                                                               \
    for (int t = 0; t < 8; t++) mx = fmaxf(mx, ((float *)&vmx)[t]);                     \
    for (; j < n; j++) {                                                                \
        __m256 a = _mm256_setzero_ps();                                                 \
        for (long c = 0; c < D; c += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + c), LD8(K + j * D + c), a); \
        s[j] = sum8(a) * sm;                                                            \
        mx = fmaxf(mx, s[j]);                                                           \
    }                                                                                   \
    return mx;                                                                          \
}                                                                                       \
/* o = sum_j p[j] V_j / z: the head's output. */                                        \
static void NAME##_mix(const float *p, const KT *V, long n, long D, float z, float *o) { \
    const __m256 vz = _mm256_set1_ps(z);                                                \
    long c = 0;                                                                         \
    for (; c + 64 <= D; c += 64) {                                                      \
        __m256 a[8];                                                                    \
        for (int t = 0; t < 8; t++) a[t] = _mm256_setzero_ps();                         \
        for (long j = 0; j < n; j++) {                                                  \
            const __m256 pj = _mm256_set1_ps(p[j]);                                     \
            for (int t = 0; t < 8; t++) a[t] = _mm256_fmadd_ps(pj, LD8(V + j * D + c + 8 * t), a[t]); \
        }                                                                               \
        for (int t = 0; t < 8; t++) _mm256_storeu_ps(o + c + 8 * t, _mm256_div_ps(a[t], vz)); \
    }                                                                                   \
    for (; c < D; c += 8) {                                                             \
        __m256 a = _mm256_setzero_ps();                                                 \
        for (long j = 0; j < n; j++) a = _mm256_fmadd_ps(_mm256_set1_ps(p[j]), LD8(V + j * D + c), a); \
        _mm256_storeu_ps(o + c, _mm256_div_ps(a, vz));                                  \
    }                                                                                   \
}
DEFINE_SCORES(scores_f32, float, ld8_f32)
DEFINE_SCORES(scores_bf16, uint16_t, ld8_bf16)

/* Per-thread room for a head's keys and values widened from bf16. */
static __thread float *widened;
static __thread long widened_cap;
static float *widen_room(long n) {
    if (n > widened_cap) {
        free(widened);
        widened = (float *)malloc((size_t)n * sizeof(float));
        widened_cap = widened ? n : 0;
    }
    return widened;
}
#else
#define ATT_VEC 0
#endif

#define ATTEND(NAME, KT, LD, ST, ROWS)                                                  \
static void NAME(const float *qkv, float *out, void *const *kc_, void *const *vc_,        \
                 const long *pos, long R, long C, long H, long max_len, int threads) {   \
    KT *const *kc = (KT *const *)kc_, *const *vc = (KT *const *)vc_;                     \
    const long D = C / H;                                                                 \
    const float sm = 1.0f / sqrtf((float)D);                                              \
    for (long r = 0; r < R; r++)                                                          \
        for (long hd = 0; hd < H; hd++) {                                                 \
            KT *k = kc[r] + (hd * max_len + pos[r]) * D, *v = vc[r] + (hd * max_len + pos[r]) * D; \
            const float *nk = qkv + r * 3 * C + C + hd * D, *nv = nk + C;                 \
            for (long d = 0; d < D; d++) { k[d] = ST(nk[d]); v[d] = ST(nv[d]); }          \
        }                                                                                 \
    /* runs of rows that read the same cache: one sequence each */                        \
    long start[R + 1], G = 0;                                                             \
    for (long r = 0; r < R; r++)                                                          \
        if (r == 0 || kc[r] != kc[r - 1]) start[G++] = r;                                 \
    start[G] = R;                                                                         \
    _Pragma("omp parallel for num_threads(threads) schedule(static)")                     \
    for (long task = 0; task < G * H; task++) {                                           \
        const long g = task / H, hd = task % H, r0 = start[g], r1 = start[g + 1];         \
        const KT *K = kc[r0] + hd * max_len * D, *V = vc[r0] + hd * max_len * D;          \
        long n_max = 0;                                                                   \
        for (long r = r0; r < r1; r++) n_max = pos[r] + 1 > n_max ? pos[r] + 1 : n_max;   \
        float s[n_max];                                                                   \
        ROWS                                                                              \
    }                                                                                     \
}

/* Without AVX2: each row's scores and sum one position at a time. */
#define PLAIN_ROWS(KT, LD)                                                                \
    for (long r = r0; r < r1; r++) {                                                      \
        const float *q = qkv + r * 3 * C + hd * D;                                        \
        const long n = pos[r] + 1;                                                        \
        float mx = -INFINITY;                                                             \
        for (long j = 0; j < n; j++) {                                                    \
            float a = 0.0f;                                                               \
            _Pragma("omp simd reduction(+:a)")                                            \
            for (long d = 0; d < D; d++) a += q[d] * LD(K[j * D + d]);                    \
            s[j] = a * sm;                                                                \
            if (s[j] > mx) mx = s[j];                                                     \
        }                                                                                 \
        const float z = exp_shifted_sum(s, n, mx);                                        \
        float *o = out + r * C + hd * D;                                                  \
        for (long d = 0; d < D; d++) o[d] = 0.0f;                                         \
        for (long j = 0; j < n; j++) {                                                    \
            const float p = s[j] / z;                                                     \
            _Pragma("omp simd")                                                           \
            for (long d = 0; d < D; d++) o[d] += p * LD(V[j * D + d]);                    \
        }                                                                                 \
    }

/* Each row of a run: its scores, their softmax, and its output for this head. */
#define VEC_ROWS(SCORES, KS, VS)                                                          \
    for (long r = r0; r < r1; r++) {                                                      \
        const long n = pos[r] + 1;                                                        \
        const float mx = SCORES(qkv + r * 3 * C + hd * D, KS, n, D, sm, s);               \
        SCORES##_mix(s, VS, n, D, exp_shifted_sum(s, n, mx), out + r * C + hd * D);       \
    }
#if ATT_VEC
#define ROWS_F32                                                                          \
    if (D % 8 == 0) { VEC_ROWS(scores_f32, K, V) } else { PLAIN_ROWS(float, SAME) }
#define ROWS_BF16                                                                         \
    float *Kw;                                                                            \
    if (D % 8 != 0) {                                                                     \
        PLAIN_ROWS(uint16_t, bf16_to_f32)                                                 \
    } else if (r1 - r0 > 1 && (Kw = widen_room(2 * n_max * D))) { /* several rows read this head: widen it once */ \
        float *Vw = Kw + n_max * D;                                                       \
        for (long i = 0; i < n_max * D; i++) { Kw[i] = bf16_to_f32(K[i]); Vw[i] = bf16_to_f32(V[i]); } \
        VEC_ROWS(scores_f32, Kw, Vw)                                                      \
    } else {                                                                              \
        VEC_ROWS(scores_bf16, K, V)                                                       \
    }
#else
#define ROWS_F32 PLAIN_ROWS(float, SAME)
#define ROWS_BF16 PLAIN_ROWS(uint16_t, bf16_to_f32)
#endif
#define SAME(v) (v)
ATTEND(attend_f32, float, SAME, SAME, ROWS_F32)
ATTEND(attend_bf16, uint16_t, bf16_to_f32, f32_to_bf16, ROWS_BF16)

/* Exported for the test that holds f32_to_bf16 to torch's rounding. */
void round_bf16(const float *x, uint16_t *y, long n) {
    for (long i = 0; i < n; i++) y[i] = f32_to_bf16(x[i]);
}

/* Where a block's time goes, for bench/forward_profile.py, which builds this file with
 * -DTREESPEC_PROFILE; otherwise these compile to nothing. Seconds per phase, summed:
 * 0 LayerNorm + QKV, 1 cache writes + attention, 2 attention projection, 3 LayerNorm + MLP
 * up-projection, 4 GELU, 5 MLP down-projection. */
#ifdef TREESPEC_PROFILE
#include <time.h>
double treespec_phase_s[6];
static inline double phase_now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}
#define PHASE_START() double phase_t = phase_now()
#define PHASE(i) do { const double n_ = phase_now(); treespec_phase_s[i] += n_ - phase_t; phase_t = n_; } while (0)
#else
#define PHASE_START() (void)0
#define PHASE(i) (void)0
#endif

void gpt_block(float *x, long R, long C, long H, int wtype, float eps, int gelu_tanh,
               const float *ln1_g, const float *ln1_b, const float *ln2_g, const float *ln2_b,
               const Weight *attn, const Weight *attn_proj, const Weight *fc, const Weight *mlp_proj,
               void *const *kc, void *const *vc, int kv_bf16, const long *pos, long max_len,
               float *work, int threads) {
    float *h = work;             /* R x C    LayerNorm output, then attention output */
    float *qkv = h + R * C;      /* R x 3C */
    float *u = qkv + R * 3 * C;  /* R x 4C   MLP hidden; also R x C projections */

    PHASE_START();
    layer_norm(x, ln1_g, ln1_b, h, R, C, eps);
    matmul(h, attn, qkv, R, 3 * C, C, wtype, threads);
    PHASE(0);
    if (kv_bf16)
        attend_bf16(qkv, h, kc, vc, pos, R, C, H, max_len, threads);
    else
        attend_f32(qkv, h, kc, vc, pos, R, C, H, max_len, threads);
    PHASE(1);
    matmul(h, attn_proj, u, R, C, C, wtype, threads);
    for (long i = 0; i < R * C; i++) x[i] += u[i];
    PHASE(2);

    layer_norm(x, ln2_g, ln2_b, h, R, C, eps);
    matmul(h, fc, u, R, 4 * C, C, wtype, threads);
    PHASE(3);
    gelu(u, R * 4 * C, gelu_tanh);
    PHASE(4);
    matmul(u, mlp_proj, h, R, C, 4 * C, wtype, threads);
    for (long i = 0; i < R * C; i++) x[i] += h[i];
    PHASE(5);
}

/* ---- the whole trunk of a decode step, in one call -------------------------
 *
 * The embedding, every block above and the final exit's LayerNorm, so a
 * decode step crosses from Python into C once for the trunk instead of once
 * per block (each crossing builds pointer arrays and tensors: ~17 us, a
 * tenth of a 6-block forward on the AVX2 EPYC). Blocks are given as arrays:
 * ln[4 l .. 4 l + 3] and w[4 l .. 4 l + 3] for block l, kc[l R + r] and
 * vc[l R + r] for row r's caches at block l (bf16 when kv_bf16). After block l, when
 * exit_slot[l] >= 0, the residual stream is copied to exits + slot R C (an
 * intermediate exit's input); hidden gets the final LayerNorm's output, and with a
 * head, logits get its rows head_from..R-1 through the head's weights (V outputs).
 */
/* What a model has between its blocks besides the residual stream (model/gpt.py's
 * GPT._trunk, in the same order): before block l, x = a x + b x0 (embed_skip) and
 * x += unet_w h[src] (unet_skip, h[src] the output of 0-based block src); after it,
 * DenseFormer's x = sum of dwa_w * hist (DWA), hist[0] the embedding output and
 * hist[k] block k-1's output. NULL arrays mean the model has no such thing. */
typedef struct {
    const int *embed;      /* L: 1 where block l's input mixes in x0 */
    const float *a, *b;    /* L */
    const long *unet_src;  /* L: -1, or the block whose output joins block l's input */
    const float *unet_w;   /* L */
    const long *dwa_n, *dwa_off, *dwa_idx;  /* L, L, and the flat list of history indices */
    const float *dwa_w;    /* flat, beside dwa_idx */
    float *hist;           /* (L + 1) x R x C */
} Mixing;

void gpt_trunk(const long *idx, const float *wte, const float *wpe, float *x, long R, long C, long H, long L,
               int wtype, float eps, int gelu_tanh, const float *const *ln, const Weight *w,
               void *const *kc, void *const *vc, int kv_bf16, const long *pos, long max_len,
               const long *exit_slot, float *exits, const float *lnf_g, const float *lnf_b, float *hidden,
               const Weight *head, int head_wtype, long V, long head_from, float *logits,
               const Mixing *mix, float *work, int threads) {
    const long n = R * C;
    float *hist = mix ? mix->hist : 0;
    for (long r = 0; r < R; r++) {
        const float *te = wte + idx[r] * C, *pe = wpe + pos[r] * C;
        for (long c = 0; c < C; c++) x[r * C + c] = te[c] + pe[c];
    }
    if (hist) memcpy(hist, x, (size_t)n * sizeof(float));
    for (long l = 0; l < L; l++) {
        if (mix && mix->embed && mix->embed[l])
            for (long i = 0; i < n; i++) x[i] = mix->a[l] * x[i] + mix->b[l] * hist[i];
        if (mix && mix->unet_src && mix->unet_src[l] >= 0) {
            const float *h = hist + (mix->unet_src[l] + 1) * n;
            for (long i = 0; i < n; i++) x[i] = x[i] + mix->unet_w[l] * h[i];
        }
        const float *const *g = ln + 4 * l;
        gpt_block(x, R, C, H, wtype, eps, gelu_tanh, g[0], g[1], g[2], g[3], w + 4 * l, w + 4 * l + 1,
                  w + 4 * l + 2, w + 4 * l + 3, kc + l * R, vc + l * R, kv_bf16, pos, max_len, work, threads);
        if (hist) memcpy(hist + (l + 1) * n, x, (size_t)n * sizeof(float));
        if (mix && mix->dwa_n && mix->dwa_n[l] > 0) {
            const long *src = mix->dwa_idx + mix->dwa_off[l];
            const float *dw = mix->dwa_w + mix->dwa_off[l];
            for (long i = 0; i < n; i++) {
                float acc = dw[0] * hist[src[0] * n + i];
                for (long j = 1; j < mix->dwa_n[l]; j++) acc += dw[j] * hist[src[j] * n + i];
                x[i] = acc;
            }
        }
        if (exit_slot[l] >= 0) memcpy(exits + exit_slot[l] * n, x, (size_t)n * sizeof(float));
    }
    layer_norm(x, lnf_g, lnf_b, hidden, R, C, eps);
    if (head)  /* the final exit's logits for rows head_from..R-1 (a prefill wants its last row only) */
        matmul(hidden + head_from * C, head, logits, R - head_from, V, C, head_wtype, threads);
}

/* ---- the sampling race of a decode step ------------------------------------
 *
 * draft/sampling.py's PositionDraws picks a sampled token with an exponential
 * race: the token with the largest p_i / E_i, E_i = -log(u_i) ~ Exp(1), is
 * distributed as p. Drawing 50k uniforms with torch and taking their logs
 * cost about 0.4 ms a token on a 2-core EPYC, a tenth of a decode step. Here
 * u_i is a hash of (seed, i) (murmur3's 32-bit finaliser, twice), so it
 * needs no stored stream, and most logs are skipped exactly: since
 * -log(u) >= 1 - u, token i can only beat the best score b so far if
 * u_i > 1 - p_i / b, and only then is its log taken. The torch fallback in
 * sampling.py computes the same u_i. */
static inline uint32_t fmix32(uint32_t h) {
    h ^= h >> 16; h *= 0x85ebca6bu; h ^= h >> 13; h *= 0xc2b2ae35u; h ^= h >> 16;
    return h;
}

static inline float race_uniform(uint32_t lo, uint32_t hi, uint32_t i) {
    const uint32_t h = fmix32(fmix32(i * 0x9e3779b9u ^ lo) ^ hi);
    const float u = (float)(h >> 8) * (1.0f / 16777216.0f);  /* 24 bits, as torch.rand's float32 */
    return u > 1.17549435e-38f ? u : 1.17549435e-38f;         /* u = 0 would make E infinite */
}

long race_argmax(const float *p, long n, uint64_t seed) {
    const uint32_t lo = (uint32_t)seed, hi = (uint32_t)(seed >> 32);
    long best_i = -1;
    float best = 0.0f;
    float u[1024];
    for (long c0 = 0; c0 < n; c0 += 1024) {
        const long m = n - c0 < 1024 ? n - c0 : 1024;
        for (long j = 0; j < m; j++)  /* the hashes, vectorised by the compiler */
            u[j] = race_uniform(lo, hi, (uint32_t)(c0 + j));
        for (long j = 0; j < m; j++) {
            const float pi = p[c0 + j];
            if (!(pi > 0.0f)) continue;
            /* the cheap test, with a margin for its own rounding; the exact one decides */
            if (best_i >= 0 && (1.0f - u[j] - 1e-6f) * best >= pi) continue;
            const float score = pi / -logf(u[j]);
            if (best_i < 0 || score > best) { best = score; best_i = c0 + j; }
        }
    }
    return best_i;
}

/* ---- greedy's choice and log-probability ------------------------------------
 *
 * A greedy verify step takes each row's argmax over the 50k logits and its
 * log-sum-exp (for the chosen token's log-probability). torch takes about
 * 65 us for each over one row here, 0.5 ms for a six-row verify step, as
 * long as the model's one-token forward on the fastest precision takes a
 * fifth of. One pass for the max and its first index, one for the sum of
 * exp(x - max) with exp256 above, per row.
 * Rows are strided (the head's padded width). */

void rows_argmax_lse(const float *x, long rows, long n, long stride, long *argmax, float *lse) {
    for (long r = 0; r < rows; r++) {
        const float *xr = x + r * stride;
        long k = 0, bi = 0;
        float best = xr[0];
#ifdef __AVX2__
        if (n >= 8) {
            __m256 vmax = _mm256_loadu_ps(xr);
            __m256i vidx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), cur = vidx;
            const __m256i step = _mm256_set1_epi32(8);
            for (k = 8; k + 8 <= n; k += 8) {
                cur = _mm256_add_epi32(cur, step);
                const __m256 v = _mm256_loadu_ps(xr + k);
                const __m256 gt = _mm256_cmp_ps(v, vmax, _CMP_GT_OQ);  /* strictly: the first index stays */
                vmax = _mm256_blendv_ps(vmax, v, gt);
                vidx = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(vidx), _mm256_castsi256_ps(cur), gt));
            }
            float mv[8];
            int32_t iv[8];
            _mm256_storeu_ps(mv, vmax);
            _mm256_storeu_si256((__m256i *)iv, vidx);
            best = mv[0], bi = iv[0];
            for (int j = 1; j < 8; j++)
                if (mv[j] > best || (mv[j] == best && iv[j] < bi)) { best = mv[j]; bi = iv[j]; }
        }
#endif
        for (; k < n; k++)
            if (xr[k] > best) { best = xr[k]; bi = k; }
        float sum = 0.0f;
        k = 0;
#ifdef __AVX2__
        __m256 acc = _mm256_setzero_ps();
        const __m256 vb = _mm256_set1_ps(best);
        for (; k + 8 <= n; k += 8)
            acc = _mm256_add_ps(acc, exp256(_mm256_sub_ps(_mm256_loadu_ps(xr + k), vb)));
        float a8[8];
        _mm256_storeu_ps(a8, acc);
        for (int j = 0; j < 8; j++) sum += a8[j];
#endif
        for (; k < n; k++) sum += expf(xr[k] - best);
        argmax[r] = bi;
        lse[r] = best + logf(sum);
    }
}

/* ---- what the tree drafter reads off a row of logits ------------------------
 *
 * For each row: its a largest columns (largest first, ties to the lower
 * column) and their values, log sum exp(l - max), and the entropy of
 * softmax(l), H = log s - sum(e^z z) / s with z = l - max. The drafter asks
 * for them once a proposal, right after a verify forward; in NumPy (three
 * passes and a candidate sort over 50k logits) they took 0.17 ms of its
 * 0.5 ms. Here: one pass keeps the top a against a running threshold (eight
 * columns per comparison; almost none pass it), one pass sums e^z and e^z z. */
void logit_stats(const float *x, long rows, long n, long stride, long a, long *top, double *top_val,
                 double *log_s, double *entropy) {
    for (long r = 0; r < rows; r++) {
        const float *xr = x + r * stride;
        long *ti = top + r * a;
        double *tv = top_val + r * a;
        float bv[a];
        long filled = 0;
        float thr = -INFINITY;  /* the a-th largest so far; a column must beat it strictly */
        long k = 0;
#define TOP_TAKE(col)                                                                      \
        do {                                                                               \
            const float v_ = xr[col];                                                      \
            if (filled < a || v_ > thr) {                                                  \
                long p_ = filled < a ? filled : a - 1;                                     \
                while (p_ > 0 && v_ > bv[p_ - 1]) { bv[p_] = bv[p_ - 1]; ti[p_] = ti[p_ - 1]; p_--; } \
                bv[p_] = v_; ti[p_] = (col);                                               \
                if (filled < a) filled++;                                                  \
                thr = filled == a ? bv[a - 1] : -INFINITY;                                 \
            }                                                                              \
        } while (0)
#ifdef __AVX2__
        for (; k + 8 <= n; k += 8) {
            const __m256 v = _mm256_loadu_ps(xr + k);
            if (filled < a || _mm256_movemask_ps(_mm256_cmp_ps(v, _mm256_set1_ps(thr), _CMP_GT_OQ)))
                for (long j = k; j < k + 8; j++) TOP_TAKE(j);
        }
#endif
        for (; k < n; k++) TOP_TAKE(k);
#undef TOP_TAKE
        const float mx = bv[0];
        for (long j = 0; j < a; j++) tv[j] = (double)bv[j];
        double s = 0.0, t = 0.0;
        k = 0;
#ifdef __AVX2__
        __m256 vs = _mm256_setzero_ps(), vt = _mm256_setzero_ps();
        const __m256 vm = _mm256_set1_ps(mx);
        for (; k + 8 <= n; k += 8) {
            const __m256 z = _mm256_sub_ps(_mm256_loadu_ps(xr + k), vm);
            const __m256 e = exp256(z);
            vs = _mm256_add_ps(vs, e);
            vt = _mm256_fmadd_ps(e, z, vt);
        }
        float s8[8], t8[8];
        _mm256_storeu_ps(s8, vs);
        _mm256_storeu_ps(t8, vt);
        for (int j = 0; j < 8; j++) { s += s8[j]; t += t8[j]; }
#endif
        for (; k < n; k++) { const float z = xr[k] - mx, e = expf(z); s += e; t += (double)e * z; }
        log_s[r] = log(s);
        entropy[r] = log_s[r] - t / s;
    }
}

/* An intermediate exit's logits for a few tokens per row, in float64: row r's
 * LayerNorm(h_r) dotted with head rows top[r * a .. r * a + a - 1]. The tree
 * drafter's agreement features read them once a proposal (a few hundred
 * multiply-adds, where a dozen NumPy calls took 0.1-0.2 ms). */
void exit_scores(const float *h, long rows, long C, const float *g, const float *b, double eps,
                 const float *head, const long *top, long a, double *out) {
    double z[C];
    for (long r = 0; r < rows; r++) {
        const float *x = h + r * C;
        double mean = 0.0, var = 0.0;
        for (long c = 0; c < C; c++) mean += x[c];
        mean /= (double)C;
        for (long c = 0; c < C; c++) { const double d = x[c] - mean; var += d * d; }
        const double inv = 1.0 / sqrt(var / (double)C + eps);
        for (long c = 0; c < C; c++) z[c] = (x[c] - mean) * inv * g[c] + (b ? b[c] : 0.0);
        for (long j = 0; j < a; j++) {
            const float *w = head + top[r * a + j] * C;
            double s = 0.0;
            for (long c = 0; c < C; c++) s += (double)w[c] * z[c];
            out[r * a + j] = s;
        }
    }
}
