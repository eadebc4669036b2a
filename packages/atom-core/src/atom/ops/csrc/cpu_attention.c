/* Paged decode attention on CPU: every row has one query (its newest token) over a paged KV cache.

Built at run time by atom/ops/cpu_native.py (cc -O3 -march=native) and called through ctypes. Layouts (all
contiguous): q and out [B, H, D]; k_cache, v_cache [num_blocks, block_size, Hkv, D]; block_tables [B, W]
int32; seq_lens [B] int32. Head h reads KV head h / (H / Hkv). Row b's query sits at position
seq_lens[b] - 1 and sees keys max(0, seq_lens[b] - window) .. seq_lens[b] - 1 (window 0: all of them).
Optional: logit soft-capping (softcap > 0: s = softcap * tanh(s / softcap)) and per-head sink logits that
join the softmax denominator only (sinks != NULL, float32 [H]). Scores, softmax and the weighted sum run in
float32; each key and value row is read once per KV head, for all the query heads that share it.
Element types: 0 float32, 1 bfloat16, 2 float16 (only where the compiler has _Float16).
Returns 0, or: 1 unsupported shape, 2 a row's length or block-table entries out of range (checked before
anything is read: a bad table is an error, never a read outside the cache), 3 float16 without _Float16,
4 out of memory.
With AVX512-BF16 (-march=native on a CPU that has it) bfloat16 caches take vdpbf16ps dot products and, for
head_dim 64 and 128, a register-blocked row; everywhere else the portable C rows (q . k and the softmax's exp
with AVX512 / AVX2+FMA intrinsics where the build has them, plain C otherwise).
*/
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif
#if defined(__AVX512BF16__) && defined(__AVX512F__)
#define HAVE_BF16_DOT 1
#else
#define HAVE_BF16_DOT 0
#endif

#define MAX_HEAD_DIM 1024

enum { F32 = 0, BF16 = 1, F16 = 2 };

int atom_cpu_attention_abi(void) { return 2; }

int atom_has_bf16_dot(void) { return HAVE_BF16_DOT; }

int atom_has_f16(void) {
#ifdef __FLT16_MAX__
    return 1;
#else
    return 0;
#endif
}

/* src row of n elements of type `dtype` -> float32 */
static inline void load_row(const void *src, float *dst, int64_t n, int dtype) {
    if (dtype == F32) {
        memcpy(dst, src, (size_t)n * sizeof(float));
    } else if (dtype == BF16) {
        const uint16_t *s = (const uint16_t *)src;
        uint32_t *d = (uint32_t *)dst; /* -fno-strict-aliasing */
#pragma omp simd
        for (int64_t i = 0; i < n; i++) d[i] = (uint32_t)s[i] << 16;
    }
#ifdef __FLT16_MAX__
    else {
        const _Float16 *s = (const _Float16 *)src;
#pragma omp simd
        for (int64_t i = 0; i < n; i++) dst[i] = (float)s[i];
    }
#endif
}

static inline uint16_t to_bf16(float f) { /* round to nearest even, as torch */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline void store_row(void *dst, const float *src, float mul, int64_t n, int dtype) {
    if (dtype == F32) {
        float *d = (float *)dst;
#pragma omp simd
        for (int64_t i = 0; i < n; i++) d[i] = src[i] * mul;
    } else if (dtype == BF16) {
        uint16_t *d = (uint16_t *)dst;
        for (int64_t i = 0; i < n; i++) d[i] = to_bf16(src[i] * mul);
    }
#ifdef __FLT16_MAX__
    else {
        _Float16 *d = (_Float16 *)dst;
#pragma omp simd
        for (int64_t i = 0; i < n; i++) d[i] = (_Float16)(src[i] * mul);
    }
#endif
}

/* exp(x) for x <= 0 (scores minus their maximum), written so the compiler vectorizes it: Cephes' expf (range
   reduction by ln 2 in two parts, degree-6 polynomial), relative error < 1e-7; 0 below -87. */
static inline float exp_nonpos(float x) {
    const float xc = x < -87.0f ? -87.0f : x;
    const float t = xc * 1.44269504088896341f + 0.5f;
    int32_t n = (int32_t)t;
    n -= (t < (float)n); /* floor */
    const float fn = (float)n;
    const float r = (xc - fn * 0.693359375f) - fn * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const uint32_t bits = (uint32_t)(n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return x < -87.0f ? 0.0f : p * scale;
}

/* a . b over n floats. The portable rows' q . k: with AVX2 + FMA eight lanes at a time (GCC 12 ran the
   omp-simd reduction inside the row macros scalar: ~60% of a batch-32 call on an x86-64-v3 build). */
static inline float dot_f32(const float *a, const float *b, int64_t n) {
    int64_t d = 0;
    float s = 0.0f;
#if defined(__AVX2__) && defined(__FMA__)
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    for (; d + 16 <= n; d += 16) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d + 8), _mm256_loadu_ps(b + d + 8), acc1);
    }
    const __m256 acc = _mm256_add_ps(acc0, acc1);
    const __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    const __m128 h2 = _mm_add_ps(h, _mm_movehl_ps(h, h));
    s = _mm_cvtss_f32(_mm_add_ss(h2, _mm_shuffle_ps(h2, h2, 1)));
#endif
    for (; d < n; d++) s += a[d] * b[d];
    return s;
}

/* Scores of one head -> probabilities, in place: soft-capping (softcap > 0), the maximum (the sink's logit
   too), exp, the sum (the sink joins the denominator only). One function outside the row macros so the
   compiler vectorizes its loops (inlined into the macros' loop nests, GCC 12 ran exp scalar: ~40% of a
   batch-32 call). */
__attribute__((noinline)) static void softmax_scores(float *restrict sh, int64_t n, float softcap, const float *sink) {
    if (softcap > 0.0f)
        for (int64_t j = 0; j < n; j++) sh[j] = softcap * tanhf(sh[j] / softcap);
    float mx = sink ? *sink : -INFINITY;
#pragma omp simd reduction(max : mx)
    for (int64_t j = 0; j < n; j++) mx = sh[j] > mx ? sh[j] : mx;
    float total = 0.0f;
#if defined(__AVX512F__)
    /* exp_nonpos 16 lanes at a time (GCC 12 left the loop below scalar at run time here) */
    const __m512 vmx = _mm512_set1_ps(mx), lo = _mm512_set1_ps(-87.0f);
    __m512 acc = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j += 16) {
        const __mmask16 live = n - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - j)) - 1u);
        const __m512 x = _mm512_sub_ps(_mm512_maskz_loadu_ps(live, sh + j), vmx);
        const __m512 xc = _mm512_max_ps(x, lo);
        const __m512 fn = _mm512_roundscale_ps(_mm512_fmadd_ps(xc, _mm512_set1_ps(1.44269504088896341f),
                                                               _mm512_set1_ps(0.5f)),
                                               _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
        const __m512 r = _mm512_fnmadd_ps(fn, _mm512_set1_ps(-2.12194440e-4f),
                                          _mm512_fnmadd_ps(fn, _mm512_set1_ps(0.693359375f), xc));
        __m512 p = _mm512_set1_ps(1.9875691500e-4f);
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
        p = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0f));
        const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(fn), _mm512_set1_epi32(127)), 23);
        const __mmask16 keep = _mm512_mask_cmp_ps_mask(live, x, lo, _CMP_GE_OQ);
        const __m512 e = _mm512_maskz_mul_ps(keep, p, _mm512_castsi512_ps(bits));
        _mm512_mask_storeu_ps(sh + j, live, e);
        acc = _mm512_add_ps(acc, e);
    }
    total = _mm512_reduce_add_ps(acc);
#elif defined(__AVX2__) && defined(__FMA__)
    /* the same, 8 lanes (the tail scalar) */
    const __m256 vmx = _mm256_set1_ps(mx), lo = _mm256_set1_ps(-87.0f);
    __m256 acc = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
        const __m256 x = _mm256_sub_ps(_mm256_loadu_ps(sh + j), vmx);
        const __m256 xc = _mm256_max_ps(x, lo);
        const __m256 fn = _mm256_floor_ps(_mm256_fmadd_ps(xc, _mm256_set1_ps(1.44269504088896341f),
                                                          _mm256_set1_ps(0.5f)));
        const __m256 r = _mm256_fnmadd_ps(fn, _mm256_set1_ps(-2.12194440e-4f),
                                          _mm256_fnmadd_ps(fn, _mm256_set1_ps(0.693359375f), xc));
        __m256 p = _mm256_set1_ps(1.9875691500e-4f);
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
        p = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.0f));
        const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fn), _mm256_set1_epi32(127)), 23);
        const __m256 e = _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(bits)), _mm256_cmp_ps(x, lo, _CMP_GE_OQ));
        _mm256_storeu_ps(sh + j, e);
        acc = _mm256_add_ps(acc, e);
    }
    const __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    const __m128 h2 = _mm_add_ps(h, _mm_movehl_ps(h, h));
    total = _mm_cvtss_f32(_mm_add_ss(h2, _mm_shuffle_ps(h2, h2, 1)));
    for (; j < n; j++) {
        sh[j] = exp_nonpos(sh[j] - mx);
        total += sh[j];
    }
#else
#pragma omp simd reduction(+ : total)
    for (int64_t j = 0; j < n; j++) {
        sh[j] = exp_nonpos(sh[j] - mx);
        total += sh[j];
    }
#endif
    if (sink) total += exp_nonpos(*sink - mx);
    const float inv = total > 0.0f ? 1.0f / total : 0.0f;
#pragma omp simd
    for (int64_t j = 0; j < n; j++) sh[j] *= inv;
}

static inline int64_t elem_size(int dtype) { return dtype == F32 ? 4 : 2; }

/* Software prefetch, PREFETCH_TOKENS key (or value) rows ahead of the one being read: a sequence's blocks are
   scattered over the cache, so the hardware prefetcher cannot follow them (from DRAM, the kernel would wait on
   every block). A cursor walks the block table once per pass, one row per row read. */
#define PREFETCH_TOKENS 32

typedef struct {
    const char *cache;
    const int32_t *table;
    int64_t pos, len, blk, off, block_size, row_bytes;
} prefetch_cursor;

static inline void prefetch_row(const prefetch_cursor *c) {
    const char *p = c->cache + ((int64_t)c->table[c->blk] * c->block_size + c->off) * c->row_bytes;
    for (int64_t i = 0; i < c->row_bytes; i += 64) __builtin_prefetch(p + i, 0, 1);
}

static inline void prefetch_next(prefetch_cursor *c) {
    if (c->pos >= c->len) return;
    prefetch_row(c);
    c->pos++;
    if (++c->off == c->block_size) {
        c->off = 0;
        c->blk++;
    }
}

/* A cursor over rows start .. len - 1 whose first PREFETCH_TOKENS rows are requested now. */
static inline prefetch_cursor prefetch_start(const char *cache, const int32_t *table, int64_t start, int64_t len,
                                             int64_t block_size, int64_t row_bytes) {
    prefetch_cursor c = {cache, table, start, len, start / block_size, start % block_size, block_size, row_bytes};
    for (int i = 0; i < PREFETCH_TOKENS; i++) prefetch_next(&c);
    return c;
}

#if HAVE_BF16_DOT
/* Pass 1 for bfloat16 caches on CPUs with AVX512-BF16: q . k straight from the bf16 rows (vdpbf16ps: exact
   products, float32 sums), scaled after. head_dim a multiple of 32. */
static void scores_bf16(const uint16_t *q, const uint16_t *k_cache, const int32_t *table, int64_t start, int64_t len,
                        int64_t num_kv_heads, int64_t group, int64_t head_dim, int64_t block_size, float scale,
                        float *scores) {
    const int64_t n = len - start, token_elems = num_kv_heads * head_dim, chunks = head_dim / 32;
    prefetch_cursor ahead = prefetch_start((const char *)k_cache, table, start, len, block_size, token_elems * 2);
    for (int64_t pos = start, j = 0; pos < len;) {
        const int64_t blk = table[pos / block_size];
        const int64_t end = (pos / block_size + 1) * block_size < len ? (pos / block_size + 1) * block_size : len;
        for (int64_t slot = blk * block_size + pos % block_size; pos < end; pos++, slot++, j++) {
            prefetch_next(&ahead);
            const uint16_t *row = k_cache + slot * token_elems;
            for (int64_t hk = 0, h = 0; hk < num_kv_heads; hk++) {
                const uint16_t *kh = row + hk * head_dim;
                for (int64_t g = 0; g < group; g++, h++) {
                    const uint16_t *qh = q + h * head_dim;
                    __m512 acc = _mm512_setzero_ps();
                    for (int64_t c = 0; c < chunks; c++)
                        acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(qh + 32 * c),
                                               (__m512bh)_mm512_loadu_si512(kh + 32 * c));
                    scores[h * n + j] = _mm512_reduce_add_ps(acc) * scale;
                }
            }
        }
    }
}
#endif

#if HAVE_BF16_DOT
/* The four sums of a, b, c, d's lanes (one shuffle tree instead of four horizontal reductions). */
static inline __m128 hsum4(__m512 a, __m512 b, __m512 c, __m512 d) {
    const __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
    const __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, 0x44), _mm512_shuffle_f32x4(c, d, 0xEE));
    /* 128-bit lanes now hold a's, b's, c's, d's partial sums (4 floats each) */
    const __m512 abcd = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xDD));
    const __m128 la = _mm512_castps512_ps128(abcd), lb = _mm512_extractf32x4_ps(abcd, 1);
    const __m128 lc = _mm512_extractf32x4_ps(abcd, 2), ld = _mm512_extractf32x4_ps(abcd, 3);
    return _mm_hadd_ps(_mm_hadd_ps(la, lb), _mm_hadd_ps(lc, ld));
}

static inline __m512 bf16x16_to_f32(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

/* One row over a bf16 cache with head_dim HD (64 or 128): for each KV head, its query heads G_CHUNK at a time
   with their q (bf16) and output accumulators (float32) in registers; one pass over the keys for the scores
   (vdpbf16ps, four heads reduced together), the softmax, one pass over the values. The first KV head's passes
   prefetch whole key/value rows (every KV head's part), the others find them in L2. */
#define DEFINE_BF16_ROW(NAME, HD, G_CHUNK)                                                                  \
static void NAME(const uint16_t *q, const uint16_t *k_cache, const uint16_t *v_cache, const int32_t *table,  \
                 int64_t start, int64_t len, int64_t num_kv_heads, int64_t group, int64_t block_size,        \
                 float scale, float softcap, const float *sinks, float *scores, uint16_t *out) {             \
    const int64_t n = len - start, token_elems = num_kv_heads * HD;                                           \
    for (int64_t hk = 0; hk < num_kv_heads; hk++) {                                                          \
        for (int64_t g0 = 0; g0 < group; g0 += G_CHUNK) {                                                    \
            const int64_t h0 = hk * group + g0, m = group - g0 < G_CHUNK ? group - g0 : G_CHUNK;             \
            const int first = hk == 0 && g0 == 0;                                                            \
            __m512bh qv[G_CHUNK][HD / 32];                                                                   \
            for (int g = 0; g < G_CHUNK; g++)                                                                \
                for (int c = 0; c < HD / 32; c++)                                                            \
                    qv[g][c] = (__m512bh)(g < m ? _mm512_loadu_si512(q + (h0 + g) * HD + 32 * c)              \
                                                : _mm512_setzero_si512());                                   \
            prefetch_cursor ahead = first ? prefetch_start((const char *)k_cache, table, start, len,          \
                                                           block_size, token_elems * 2)                      \
                                          : (prefetch_cursor){0};                                            \
            for (int64_t pos = start, j = 0; pos < len;) {                                                   \
                const int64_t blk = table[pos / block_size];                                                 \
                const int64_t end = (pos / block_size + 1) * block_size < len ? (pos / block_size + 1) * block_size : len; \
                for (int64_t slot = blk * block_size + pos % block_size; pos < end; pos++, slot++, j++) {   \
                    if (first) prefetch_next(&ahead);                                                        \
                    const uint16_t *kh = k_cache + slot * token_elems + hk * HD;                             \
                    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),           \
                                     _mm512_setzero_ps()};                                                   \
                    for (int c = 0; c < HD / 32; c++) {                                                      \
                        const __m512bh kv = (__m512bh)_mm512_loadu_si512(kh + 32 * c);                       \
                        for (int g = 0; g < G_CHUNK; g++)                                                    \
                            if (g < m) acc[g] = _mm512_dpbf16_ps(acc[g], qv[g][c], kv);                      \
                    }                                                                                        \
                    float sums[4];                                                                           \
                    _mm_storeu_ps(sums, _mm_mul_ps(hsum4(acc[0], acc[1], acc[2], acc[3]), _mm_set1_ps(scale))); \
                    for (int g = 0; g < m; g++) scores[g * n + j] = sums[g];                                 \
                }                                                                                            \
            }                                                                                                \
            for (int g = 0; g < m; g++) /* softmax of head h0 + g */                                         \
                softmax_scores(scores + g * n, n, softcap, sinks ? sinks + h0 + g : NULL);                   \
            __m512 o[G_CHUNK][HD / 16];                                                                      \
            for (int g = 0; g < G_CHUNK; g++)                                                                \
                for (int c = 0; c < HD / 16; c++) o[g][c] = _mm512_setzero_ps();                              \
            prefetch_cursor v_ahead = first ? prefetch_start((const char *)v_cache, table, start, len,        \
                                                             block_size, token_elems * 2)                    \
                                            : (prefetch_cursor){0};                                          \
            for (int64_t pos = start, j = 0; pos < len;) {                                                   \
                const int64_t blk = table[pos / block_size];                                                 \
                const int64_t end = (pos / block_size + 1) * block_size < len ? (pos / block_size + 1) * block_size : len; \
                for (int64_t slot = blk * block_size + pos % block_size; pos < end; pos++, slot++, j++) {   \
                    if (first) prefetch_next(&v_ahead);                                                      \
                    const uint16_t *vh = v_cache + slot * token_elems + hk * HD;                             \
                    __m512 v[HD / 16];                                                                       \
                    for (int c = 0; c < HD / 16; c++) v[c] = bf16x16_to_f32(vh + 16 * c);                    \
                    for (int g = 0; g < G_CHUNK; g++) {                                                      \
                        if (g >= m) break;                                                                   \
                        const __m512 p = _mm512_set1_ps(scores[g * n + j]);                                  \
                        for (int c = 0; c < HD / 16; c++) o[g][c] = _mm512_fmadd_ps(p, v[c], o[g][c]);         \
                    }                                                                                        \
                }                                                                                            \
            }                                                                                                \
            for (int g = 0; g < m; g++) {                                                                    \
                float tmp[HD];                                                                               \
                for (int c = 0; c < HD / 16; c++) _mm512_storeu_ps(tmp + 16 * c, o[g][c]);                   \
                for (int d = 0; d < HD; d++) out[(h0 + g) * HD + d] = to_bf16(tmp[d]);                       \
            }                                                                                                \
        }                                                                                                    \
    }                                                                                                        \
}

DEFINE_BF16_ROW(bf16_row_64, 64, 4)
DEFINE_BF16_ROW(bf16_row_128, 128, 2)
#endif

/* One row: queries q [H, D] (float32, pre-scaled), its keys and values read through `table`; out [H, D].
   HEAD_DIM is a compile-time constant in the common specializations (fully unrolled inner loops). */
#define DEFINE_ROW(NAME, HEAD_DIM)                                                                           \
static void NAME(const float *qbuf, const void *q_raw, float scale, const char *k_cache, const char *v_cache,  \
                 const int32_t *table,                                                                       \
                 int64_t start, int64_t len, int64_t num_kv_heads, int64_t group, int64_t head_dim_arg,      \
                 int64_t block_size, int64_t token_elems, int dtype, float softcap, const float *sinks,      \
                 float *scores, float *abuf, float *row, void *out) {                                          \
    const int64_t head_dim = HEAD_DIM > 0 ? HEAD_DIM : head_dim_arg;                                         \
    const int64_t esz = elem_size(dtype);                                                                  \
    const int64_t n = len - start;                                                                           \
    const int64_t num_heads = num_kv_heads * group;                                                          \
    /* pass 1: every key row (all KV heads of a token at once), scored against the heads that share it */    \
    if (HAVE_BF16_DOT && dtype == BF16 && head_dim % 32 == 0)                                                \
        BF16_SCORES(q_raw, k_cache, table, start, len, num_kv_heads, group, head_dim, block_size, scale, scores); \
    else {                                                                                                   \
    prefetch_cursor ahead = prefetch_start(k_cache, table, start, len, block_size, token_elems * esz);       \
    for (int64_t pos = start, j = 0; pos < len;) {                                                           \
        const int64_t blk = table[pos / block_size];                                                         \
        const int64_t end = (pos / block_size + 1) * block_size < len ? (pos / block_size + 1) * block_size : len; \
        for (int64_t slot = blk * block_size + pos % block_size; pos < end; pos++, slot++, j++) {           \
            prefetch_next(&ahead);                                                                           \
            load_row(k_cache + slot * token_elems * esz, row, token_elems, dtype);                          \
            for (int64_t hk = 0, h = 0; hk < num_kv_heads; hk++) {                                           \
                const float *kh = row + hk * head_dim;                                                       \
                for (int64_t g = 0; g < group; g++, h++) {                                                   \
                    const float *qh = qbuf + h * head_dim;                                                   \
                    scores[h * n + j] = dot_f32(qh, kh, head_dim);                                           \
                }                                                                                            \
            }                                                                                                \
        }                                                                                                    \
    }                                                                                                        \
    }                                                                                                        \
    prefetch_cursor v_ahead = prefetch_start(v_cache, table, start, len, block_size, token_elems * esz);     \
    for (int64_t h = 0; h < num_heads; h++)                                                                  \
        softmax_scores(scores + h * n, n, softcap, sinks ? sinks + h : NULL);                                \
    memset(abuf, 0, (size_t)(num_heads * head_dim) * sizeof(float));                                         \
    /* pass 2: the probability-weighted sum of the value rows */                                             \
    for (int64_t pos = start, j = 0; pos < len;) {                                                           \
        const int64_t blk = table[pos / block_size];                                                         \
        const int64_t end = (pos / block_size + 1) * block_size < len ? (pos / block_size + 1) * block_size : len; \
        for (int64_t slot = blk * block_size + pos % block_size; pos < end; pos++, slot++, j++) {           \
            prefetch_next(&v_ahead);                                                                         \
            load_row(v_cache + slot * token_elems * esz, row, token_elems, dtype);                          \
            for (int64_t hk = 0, h = 0; hk < num_kv_heads; hk++) {                                           \
                const float *vh = row + hk * head_dim;                                                       \
                for (int64_t g = 0; g < group; g++, h++) {                                                   \
                    const float p = scores[h * n + j];                                                       \
                    float *a = abuf + h * head_dim;                                                          \
                    _Pragma("omp simd")                                                                      \
                    for (int64_t d = 0; d < head_dim; d++) a[d] += p * vh[d];                                \
                }                                                                                            \
            }                                                                                                \
        }                                                                                                    \
    }                                                                                                        \
    store_row(out, abuf, 1.0f, num_heads * head_dim, dtype);                                                 \
}

#if HAVE_BF16_DOT
#define BF16_SCORES(q, k, ...) scores_bf16((const uint16_t *)(q), (const uint16_t *)(k), __VA_ARGS__)
#else
#define BF16_SCORES(...) ((void)0)
#endif

DEFINE_ROW(row_attention_64, 64)
DEFINE_ROW(row_attention_128, 128)
DEFINE_ROW(row_attention_any, 0)

int atom_paged_decode_attention(const void *q, const void *k_cache, const void *v_cache, void *out, int dtype,
                                const int32_t *block_tables, int64_t table_width, const int32_t *seq_lens,
                                int64_t batch, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                                int64_t block_size, int64_t num_blocks, float scale, int64_t window, float softcap,
                                const float *sinks) {
    if (head_dim <= 0 || head_dim > MAX_HEAD_DIM || num_kv_heads <= 0 || num_heads % num_kv_heads ||
        block_size <= 0 || batch < 0 || (dtype != F32 && dtype != BF16 && dtype != F16))
        return 1;
    if (dtype == F16 && !atom_has_f16()) return 3;
    for (int64_t b = 0; b < batch; b++) { /* every block a row will read exists */
        const int64_t len = seq_lens[b];
        if (len < 0 || (len + block_size - 1) / block_size > table_width) return 2;
        const int64_t first = (window > 0 && len > window) ? (len - window) / block_size : 0;
        for (int64_t i = first; i < (len + block_size - 1) / block_size; i++) {
            const int32_t blk = block_tables[b * table_width + i];
            if (blk < 0 || blk >= num_blocks) return 2;
        }
    }
    const int64_t group = num_heads / num_kv_heads;
    const int64_t esz = elem_size(dtype);
    const int64_t token_elems = num_kv_heads * head_dim; /* one token's keys (all KV heads) */
    int64_t max_len = 1;
    for (int64_t b = 0; b < batch; b++) max_len = seq_lens[b] > max_len ? seq_lens[b] : max_len;
    /* scores [H, max_len], queries and accumulators [H, D], one token's keys or values [Hkv * D] */
    float *scratch = (float *)malloc((size_t)(num_heads * (max_len + 2 * head_dim) + token_elems) * sizeof(float));
    if (!scratch) return 4;
    float *scores = scratch, *qbuf = scores + num_heads * max_len, *abuf = qbuf + num_heads * head_dim;
    float *row = abuf + num_heads * head_dim;
    for (int64_t b = 0; b < batch; b++) {
        const int64_t len = seq_lens[b];
        const int64_t start = (window > 0 && len > window) ? len - window : 0;
        const void *q_raw = (const char *)q + b * num_heads * head_dim * esz;
        load_row(q_raw, qbuf, num_heads * head_dim, dtype);
#pragma omp simd
        for (int64_t i = 0; i < num_heads * head_dim; i++) qbuf[i] *= scale;
        const int32_t *table = block_tables + b * table_width;
        void *dst = (char *)out + b * num_heads * head_dim * esz;
#if HAVE_BF16_DOT
        if (dtype == BF16 && (head_dim == 64 || head_dim == 128)) {
            (head_dim == 64 ? bf16_row_64 : bf16_row_128)((const uint16_t *)q_raw, (const uint16_t *)k_cache,
                                                          (const uint16_t *)v_cache, table, start, len, num_kv_heads,
                                                          group, block_size, scale, softcap, sinks, scores,
                                                          (uint16_t *)dst);
            continue;
        }
#endif
        if (head_dim == 64)
            row_attention_64(qbuf, q_raw, scale, k_cache, v_cache, table, start, len, num_kv_heads, group, head_dim, block_size,
                             token_elems, dtype, softcap, sinks, scores, abuf, row, dst);
        else if (head_dim == 128)
            row_attention_128(qbuf, q_raw, scale, k_cache, v_cache, table, start, len, num_kv_heads, group, head_dim, block_size,
                              token_elems, dtype, softcap, sinks, scores, abuf, row, dst);
        else
            row_attention_any(qbuf, q_raw, scale, k_cache, v_cache, table, start, len, num_kv_heads, group, head_dim, block_size,
                              token_elems, dtype, softcap, sinks, scores, abuf, row, dst);
    }
    free(scratch);
    return 0;
}
