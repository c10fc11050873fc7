// phi_core's CPU products: y = x @ W^T (+ bias), float32 activations x (M, K) and output y (M, N).
//
// Weights (see phi_core/kernels.py for the layouts, which Python packs):
//   f32, bf16, f16: row-major (N, K), as torch holds them; converted to float32 in registers, float32 FMA.
//   q8: int8 per output row (scale = max|w| / 127), stored as w + 128 in tiles of 16 rows (4 k-values a row per
//       32-bit lane), so one AVX-512 VNNI instruction does 16 rows x 4 k-values.
//   q4: 4-bit per group of G inputs along k (w = d * (q - 8), q in 0..15, one float16 d per row and group),
//       tiles of 16 rows, 64-byte chunks of 16 rows x 8 k-values (low nibbles k0..3, high nibbles k4..7).
// The integer formats quantize the activations of each call to int8 in blocks of 32 values (scale per block,
// as llama.cpp's q8_0) and multiply with integer dot products; per block the int32 sums become float.
//
// Products of ROUNDED_ROWS activation rows or more (prompts) round the activations once per call:
//   f16 with AVX-512: to float16, both operands float16 in memory (see f16_many), unless one is beyond float16's
//       range.
//   bf16 on a CPU with AVX-512 BF16: to bfloat16, multiplied with the BF16 dot-product instruction (pairs of
//       bfloat16 products summed into float32): twice the multiplies of a float32 FMA per instruction and no
//       widening of the weights.
// Fewer rows (decoding, checking proposed tokens, batches) keep float32 activations: rounding would turn the
// float32-noise differences between a one-row step and a several-row check into differences of a rounding step,
// and a greedy near-tie could then go another way with speculative decoding than without.
//
// Compiled per level by phi_core/kernels.py: AVX2 + FMA + F16C; AVX-512 with VNNI; the same with AVX-512 BF16.
// Threads: OpenMP, which resolves to the libgomp torch has loaded (one thread pool for torch and these kernels).
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define PHI_AVX512 1
#if defined(__AVX512BF16__)
#define PHI_BF16_DOT 1
#define PHI_LEVEL 3
#else
#define PHI_LEVEL 2
#endif
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define PHI_AVX2 1
#define PHI_LEVEL 1
#else
#error "phi_core kernels need AVX2 + FMA + F16C, or AVX-512 with VNNI"
#endif

namespace {

constexpr int64_t QBLOCK = 32;         // activation quantization block
constexpr int64_t TILE = 16;           // output rows per tile of the integer formats
constexpr int64_t ROUNDED_ROWS = 128;  // products of this many rows or more round 16-bit weights' activations

inline int32_t load_i32(const void* p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

// f(std::integral_constant<int, rows>) for a run-time 0 < rows < LIMIT (nothing for other counts): the rows left
// over after a block's whole tiles, handed to a kernel whose row count is a template argument.
template <int LIMIT, int ROWS = 1, class F>
inline void with_rows(int64_t rows, F&& f) {
    if constexpr (ROWS < LIMIT) {
        if (rows == ROWS) return f(std::integral_constant<int, ROWS>{});
        with_rows<LIMIT, ROWS + 1>(rows, std::forward<F>(f));
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Activation quantization: x (M, K) -> q (M, Kp) int8, per 32-value block a scale d and the sum of q.
// ---------------------------------------------------------------------------------------------------------------
void quantize_row(const float* x, int64_t K, int64_t Kp, int8_t* q, float* d, int32_t* s) {
    for (int64_t b = 0; b < Kp / QBLOCK; ++b) {
        float block[QBLOCK];
        const int64_t start = b * QBLOCK, valid = std::max<int64_t>(0, std::min(QBLOCK, K - start));
        for (int64_t i = 0; i < QBLOCK; ++i) block[i] = i < valid ? x[start + i] : 0.0f;
        int32_t sum = 0;
#if PHI_AVX512
        const __m512 a = _mm512_loadu_ps(block), c = _mm512_loadu_ps(block + 16);
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(c)));
        // NaN or infinity: the block's products become NaN, as a float product's would
        const bool finite = !(_mm512_fpclass_ps_mask(a, 0x99) | _mm512_fpclass_ps_mask(c, 0x99));
        const float scale = finite ? amax / 127.0f : NAN, inverse = finite && amax > 0 ? 127.0f / amax : 0.0f;
        const __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, _mm512_set1_ps(inverse)));
        const __m512i qc = _mm512_cvtps_epi32(_mm512_mul_ps(c, _mm512_set1_ps(inverse)));
        _mm_storeu_si128((__m128i*)(q + start), _mm512_cvtsepi32_epi8(qa));
        _mm_storeu_si128((__m128i*)(q + start + 16), _mm512_cvtsepi32_epi8(qc));
        sum = _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qc));
#else
        float amax = 0.0f;
        bool finite = true;
        for (int64_t i = 0; i < QBLOCK; ++i) {
            amax = std::max(amax, std::fabs(block[i]));
            finite = finite && std::isfinite(block[i]);
        }
        const float scale = finite ? amax / 127.0f : NAN, inverse = finite && amax > 0 ? 127.0f / amax : 0.0f;
        for (int64_t i = 0; i < QBLOCK; ++i) {
            const int32_t v = finite ? (int32_t)std::nearbyint(block[i] * inverse) : 0;
            q[start + i] = (int8_t)v;
            sum += v;
        }
#endif
        d[b] = scale;
        s[b] = sum;
    }
}

struct Quantized {
    std::vector<int8_t> q;
    std::vector<float> d;
    std::vector<int32_t> s;
    // per row, 128 * sum over blocks of d * s: what the +128 of the stored int8 weights adds to every product of
    // the row, taken off once at the end instead of once per block (a fifth fewer instructions with 8 rows)
    std::vector<float> offset;
    int64_t Kp = 0, blocks = 0;
};

// One scratch per calling thread: the server may call from several Python threads.
Quantized& quantize(const float* x, int64_t M, int64_t K, int64_t Kp, int nthreads) {
    thread_local Quantized scratch;
    Quantized& buffer = scratch;  // the caller's: inside the parallel loop `scratch` would name each thread's own
    buffer.Kp = Kp;
    buffer.blocks = Kp / QBLOCK;
    if ((int64_t)buffer.q.size() < M * Kp) buffer.q.resize(M * Kp);
    if ((int64_t)buffer.d.size() < M * buffer.blocks) {
        buffer.d.resize(M * buffer.blocks);
        buffer.s.resize(M * buffer.blocks);
    }
    if ((int64_t)buffer.offset.size() < M) buffer.offset.resize(M);
    int8_t* q = buffer.q.data();
    float* d = buffer.d.data();
    int32_t* s = buffer.s.data();
    float* offset = buffer.offset.data();
    const int64_t blocks = buffer.blocks;
    const int threads = M * K >= (1 << 16) ? nthreads : 1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t m = 0; m < M; ++m) {
        quantize_row(x + m * K, K, Kp, q + m * Kp, d + m * blocks, s + m * blocks);
        double total = 0.0;
        for (int64_t b = 0; b < blocks; ++b) total += (double)d[m * blocks + b] * s[m * blocks + b];
        offset[m] = (float)(128.0 * total);
    }
    return buffer;
}

// ---------------------------------------------------------------------------------------------------------------
// Row-major float weights: float32, bfloat16, float16.
// ---------------------------------------------------------------------------------------------------------------
#if PHI_AVX512
constexpr int VW = 16;
using vfloat = __m512;
inline vfloat vzero() { return _mm512_setzero_ps(); }
inline vfloat vload_x(const float* p) { return _mm512_loadu_ps(p); }
inline vfloat vload_x_tail(const float* p, int n) { return _mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1), p); }
inline vfloat vfma(vfloat a, vfloat b, vfloat c) { return _mm512_fmadd_ps(a, b, c); }
inline vfloat vadd(vfloat a, vfloat b) { return _mm512_add_ps(a, b); }
inline float vsum(vfloat v) { return _mm512_reduce_add_ps(v); }
struct F32 {
    using T = float;
    static vfloat load(const T* p) { return _mm512_loadu_ps(p); }
    static vfloat tail(const T* p, int n) { return _mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1), p); }
};
struct BF16 {
    using T = uint16_t;
    static vfloat widen(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }
    static vfloat load(const T* p) { return widen(_mm256_loadu_si256((const __m256i*)p)); }
    static vfloat tail(const T* p, int n) { return widen(_mm256_maskz_loadu_epi16((__mmask16)((1u << n) - 1), p)); }
};
struct F16 {
    using T = uint16_t;
    static vfloat load(const T* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
    static vfloat tail(const T* p, int n) {
        return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16((__mmask16)((1u << n) - 1), p));
    }
};
#else
constexpr int VW = 8;
using vfloat = __m256;
inline vfloat vzero() { return _mm256_setzero_ps(); }
inline vfloat vload_x(const float* p) { return _mm256_loadu_ps(p); }
inline vfloat vload_x_tail(const float* p, int n) {
    float buf[8] = {0};
    memcpy(buf, p, n * sizeof(float));
    return _mm256_loadu_ps(buf);
}
inline vfloat vfma(vfloat a, vfloat b, vfloat c) { return _mm256_fmadd_ps(a, b, c); }
inline vfloat vadd(vfloat a, vfloat b) { return _mm256_add_ps(a, b); }
inline float vsum(vfloat v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
template <typename T>
inline __m128i load_tail_u16(const T* p, int n) {
    uint16_t buf[8] = {0};
    memcpy(buf, p, n * 2);
    return _mm_loadu_si128((const __m128i*)buf);
}
struct F32 {
    using T = float;
    static vfloat load(const T* p) { return _mm256_loadu_ps(p); }
    static vfloat tail(const T* p, int n) { return vload_x_tail(p, n); }
};
struct BF16 {
    using T = uint16_t;
    static vfloat widen(__m128i h) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)); }
    static vfloat load(const T* p) { return widen(_mm_loadu_si128((const __m128i*)p)); }
    static vfloat tail(const T* p, int n) { return widen(load_tail_u16(p, n)); }
};
struct F16 {
    using T = uint16_t;
    static vfloat load(const T* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
    static vfloat tail(const T* p, int n) { return _mm256_cvtph_ps(load_tail_u16(p, n)); }
};
#endif

// One weight row times MC activation rows, U vectors along k at a time (U * MC accumulators): one weight row is
// one sequential stream, which the prefetchers follow best (several rows at once are several short streams, each
// a page or two long, and measured slower), and software prefetch runs PREFETCH bytes ahead of the loads.
constexpr int PREFETCH = 1024;
template <class L, int MC, int U>
inline void float_row(const float* x, int64_t K, const typename L::T* row, float* y, int64_t N, float bias) {
    vfloat acc[U][MC];
    for (int u = 0; u < U; ++u)
        for (int m = 0; m < MC; ++m) acc[u][m] = vzero();
    constexpr int STEP = U * VW, LINE = 64 / sizeof(typename L::T);
    int64_t k = 0;
    for (; k + STEP <= K; k += STEP) {
        for (int line = 0; line < STEP; line += LINE) _mm_prefetch((const char*)(row + k + line) + PREFETCH, _MM_HINT_T0);
        for (int u = 0; u < U; ++u) {
            const vfloat wv = L::load(row + k + u * VW);
            for (int m = 0; m < MC; ++m) acc[u][m] = vfma(wv, vload_x(x + m * K + k + u * VW), acc[u][m]);
        }
    }
    for (; k + VW <= K; k += VW) {
        const vfloat wv = L::load(row + k);
        for (int m = 0; m < MC; ++m) acc[0][m] = vfma(wv, vload_x(x + m * K + k), acc[0][m]);
    }
    if (k < K) {
        const int rest = (int)(K - k);
        const vfloat wv = L::tail(row + k, rest);
        for (int m = 0; m < MC; ++m) acc[0][m] = vfma(wv, vload_x_tail(x + m * K + k, rest), acc[0][m]);
    }
    for (int m = 0; m < MC; ++m) {
        vfloat total = acc[0][m];
        for (int u = 1; u < U; ++u) total = vadd(total, acc[u][m]);
        y[m * N] = vsum(total) + bias;
    }
}

// Where activation row m's inputs k..k+VW-1 lie: in place (rows K apart), or interleaved vector by vector
// (interleave_rows8). k is a multiple of VW wherever it is asked.
struct Activations {
    const float* x;
    int64_t row, vector;  // floats from one row to the next, and from one VW-vector of a row to its next
    const float* at(int64_t m, int64_t k) const { return x + m * row + k / VW * vector; }
};
inline Activations in_place(const float* x, int64_t K) { return {x, K, VW}; }

// R weight rows times MC activation rows over inputs [k0, k1), added to y (R * MC accumulators, each weight vector
// used MC times, each activation vector R times): the many-row product, whose weights come from L2.
template <class L, int R, int MC>
inline void float_block(Activations x, int64_t K, int64_t k0, int64_t k1, const typename L::T* w, float* y, int64_t N) {
    vfloat acc[R][MC];
    for (int r = 0; r < R; ++r)
        for (int m = 0; m < MC; ++m) acc[r][m] = vzero();
    constexpr int LINE = 64 / sizeof(typename L::T);
    int64_t k = k0;
    for (; k + VW <= k1; k += VW) {
        // the same inputs of the next R rows: what the next block reads (first touch comes from memory)
        if (k % LINE == 0)
            for (int r = 0; r < R; ++r) _mm_prefetch((const char*)(w + (R + r) * K + k), _MM_HINT_T0);
        vfloat xv[MC];
        for (int m = 0; m < MC; ++m) xv[m] = vload_x(x.at(m, k));
        for (int r = 0; r < R; ++r) {
            const vfloat wv = L::load(w + r * K + k);
            for (int m = 0; m < MC; ++m) acc[r][m] = vfma(wv, xv[m], acc[r][m]);
        }
    }
    if (k < k1) {
        const int rest = (int)(k1 - k);
        for (int r = 0; r < R; ++r) {
            const vfloat wv = L::tail(w + r * K + k, rest);
            for (int m = 0; m < MC; ++m) acc[r][m] = vfma(wv, vload_x_tail(x.at(m, k), rest), acc[r][m]);
        }
    }
    for (int r = 0; r < R; ++r)
        for (int m = 0; m < MC; ++m) y[m * N + r] += vsum(acc[r][m]);
}

// Rows [n0, n1) for all M activation rows. One row (decoding): one weight row at a time, a single sequential pass.
// More (batched decoding, prefill): rows in L2-sized batches, inputs in blocks of KBLOCK; R weight rows of one input
// block are multiplied with every chunk of MC activation rows while they sit in L1, so the weights stream from
// memory once whatever M is.
constexpr int64_t KBLOCK = 1024;
template <class L>
void float_rows(const float* x, int64_t M, int64_t K, const typename L::T* w, int64_t n0, int64_t n1, int64_t N,
                const float* bias, float* y) {
    if (M == 1) {
        for (int64_t n = n0; n < n1; ++n) float_row<L, 1, 4>(x, K, w + n * K, y + n, N, bias ? bias[n] : 0.0f);
        return;
    }
    constexpr int MC = 4, R = VW == 16 ? 4 : 2;  // R * MC accumulators, R + MC operands: within the registers
    for (int64_t m = 0; m < M; ++m)
        for (int64_t n = n0; n < n1; ++n) y[m * N + n] = bias ? bias[n] : 0.0f;
    const int64_t width = std::min(K, KBLOCK) * (int64_t)sizeof(typename L::T);
    const int64_t batch = std::max<int64_t>(R, (256 << 10) / width / R * R);
    const int64_t full = M - M % MC, rest = M % MC;
    for (int64_t nb = n0; nb < n1; nb += batch) {
        const int64_t ne = std::min(n1, nb + batch), whole = nb + (ne - nb) / R * R;
        for (int64_t k0 = 0; k0 < K; k0 += KBLOCK) {
            const int64_t k1 = std::min(K, k0 + KBLOCK);
            if (M <= 2 * MC) {
                // batched decoding: R weight rows stay in L1 across the few activation chunks
                for (int64_t n = nb; n < whole; n += R) {
                    for (int64_t m = 0; m < full; m += MC)
                        float_block<L, R, MC>(in_place(x + m * K, K), K, k0, k1, w + n * K, y + m * N + n, N);
                    with_rows<MC>(rest, [&](auto rows) {
                        float_block<L, R, decltype(rows)::value>(in_place(x + full * K, K), K, k0, k1, w + n * K, y + full * N + n, N);
                    });
                }
            } else {
                // prefill: MC activation rows stay in L1 across the batch of weight rows (which stays in L2)
                for (int64_t m = 0; m < full; m += MC)
                    for (int64_t n = nb; n < whole; n += R)
                        float_block<L, R, MC>(in_place(x + m * K, K), K, k0, k1, w + n * K, y + m * N + n, N);
                for (int64_t n = nb; n < whole; n += R)
                    with_rows<MC>(rest, [&](auto rows) {
                        float_block<L, R, decltype(rows)::value>(in_place(x + full * K, K), K, k0, k1, w + n * K, y + full * N + n, N);
                    });
            }
            for (int64_t n = whole; n < ne; ++n)
                for (int64_t m = 0; m < M; ++m)
                    float_block<L, 1, 1>(in_place(x + m * K, K), K, k0, k1, w + n * K, y + m * N + n, N);
        }
    }
}

// Work is shared out in units of about UNIT_BYTES of weights (more when many activation rows make a unit long),
// each taken by whichever thread is free: on a busy machine a thread that loses its core holds up one unit, not
// half of the product (with a static split, the other thread waited a whole time slice at the end).
constexpr int64_t UNIT_BYTES = 128 << 10;
// Units are whole 64-byte lines of y (OUTPUT_LINE floats) where the product allows: two threads writing one line
// take it from each other at every write, which cost 2x on a 2048 x 8192 product of eight rows (its sums are added
// to y once per input block) while this machine had its two cores on different L3 caches.
constexpr int64_t OUTPUT_LINE = 16;
inline int64_t unit_count(int64_t items, int64_t item_bytes, int64_t M, int64_t multiple, int64_t& unit) {
    const int64_t bytes = M > 8 ? 2 * UNIT_BYTES : UNIT_BYTES;
    unit = std::max<int64_t>(multiple, bytes / std::max<int64_t>(1, item_bytes) / multiple * multiple);
    return (items + unit - 1) / unit;
}

#if PHI_AVX512
// Eight activation rows (a full batch of decoding): 2 weight rows x 8 activation rows, so each weight vector is widened
// once for all eight. The rows are first interleaved, vector by vector (xp[(k / VW) * 8 + m][VW], zero-padded to a
// whole vector): read in place they lie K floats apart, a multiple of 4 KB for every phi matrix, so all eight fall
// in the same L1 sets and evict each other (a 2048 x 8192 product measured 1.1 ms in one state of this machine and
// 2.3 ms in another). The sums are the same, in the same order, as the 4 x 4 blocks'.
constexpr int64_t ROWS8 = 8;
const float* interleave_rows8(const float* x, int64_t K) {
    thread_local std::vector<float> buffer;
    const int64_t vectors = (K + VW - 1) / VW;
    if ((int64_t)buffer.size() < vectors * ROWS8 * VW) buffer.resize(vectors * ROWS8 * VW);
    float* out = buffer.data();
    for (int64_t v = 0; v < vectors; ++v) {
        const int64_t k = v * VW, n = std::min<int64_t>(VW, K - k);
        for (int64_t m = 0; m < ROWS8; ++m)
            _mm512_storeu_ps(out + (v * ROWS8 + m) * VW, n == VW ? vload_x(x + m * K + k) : vload_x_tail(x + m * K + k, (int)n));
    }
    return out;
}

template <class L>
void float_rows8(const float* x, const float* xp, int64_t K, const typename L::T* w, int64_t n0, int64_t n1,
                 int64_t N, const float* bias, float* y) {
    for (int64_t m = 0; m < ROWS8; ++m)
        for (int64_t n = n0; n < n1; ++n) y[m * N + n] = bias ? bias[n] : 0.0f;
    const int64_t rows = std::max<int64_t>(2, (256 << 10) / (std::min(K, KBLOCK) * (int64_t)sizeof(typename L::T)) / 2 * 2);
    for (int64_t nb = n0; nb < n1; nb += rows) {
        const int64_t ne = std::min(n1, nb + rows), pairs = nb + (ne - nb) / 2 * 2;
        for (int64_t k0 = 0; k0 < K; k0 += KBLOCK) {
            const int64_t k1 = std::min(K, k0 + KBLOCK);
            for (int64_t n = nb; n < pairs; n += 2) float_block<L, 2, ROWS8>({xp, VW, ROWS8 * VW}, K, k0, k1, w + n * K, y + n, N);
            for (int64_t n = pairs; n < ne; ++n)
                for (int64_t m = 0; m < ROWS8; ++m) float_block<L, 1, 1>(in_place(x + m * K, K), K, k0, k1, w + n * K, y + m * N + n, N);
        }
    }
}
#endif

template <class L>
void float_product(const float* x, int64_t M, int64_t K, const typename L::T* w, int64_t N, const float* bias,
                   float* y, int nthreads) {
    int64_t unit;
    const int64_t units = unit_count(N, K * (int64_t)sizeof(typename L::T), M, OUTPUT_LINE, unit);
#if PHI_AVX512
    if (M == ROWS8) {
        const float* xp = interleave_rows8(x, K);
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1) if (nthreads > 1 && units > 1)
        for (int64_t u = 0; u < units; ++u)
            float_rows8<L>(x, xp, K, w, u * unit, std::min(N, (u + 1) * unit), N, bias, y);
        return;
    }
#endif
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1) if (nthreads > 1 && units > 1)
    for (int64_t u = 0; u < units; ++u) float_rows<L>(x, M, K, w, u * unit, std::min(N, (u + 1) * unit), N, bias, y);
}

#if PHI_AVX512
// ---------------------------------------------------------------------------------------------------------------
// float16 weights times activations rounded to float16 (as llama.cpp's f16 products do), for many rows (prompts):
// both operands held as float16, widened in registers, tiles of 4 weight rows x 6 activation rows over the whole of
// k; half the bytes of float32 activations keep a tile's operands in cache (measured 1.0-1.17x the float32-activation
// kernel on a Zen 5).
// ---------------------------------------------------------------------------------------------------------------
constexpr float FLOAT16_MAX = 65504.0f;

// x (M, K) rounded to float16 into a per-thread scratch; null if a finite value is beyond float16's range (the
// caller then multiplies the float32 activations as they are).
const uint16_t* round_to_f16(const float* x, int64_t M, int64_t K, int nthreads) {
    thread_local std::vector<uint16_t> halves;
    std::vector<uint16_t>& h = halves;  // the caller's: inside the parallel loop `halves` would name each thread's own
    if ((int64_t)h.size() < M * K) h.resize(M * K);
    uint16_t* out = h.data();
    float largest = 0.0f;
#pragma omp parallel for num_threads(nthreads) schedule(static) reduction(max : largest)
    for (int64_t m = 0; m < M; ++m) {
        __m512 row_largest = _mm512_setzero_ps();
        for (int64_t k = 0; k < K; k += 16) {
            const __mmask16 mask = K - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1);
            const __m512 v = _mm512_maskz_loadu_ps(mask, x + m * K + k);
            // the largest finite magnitude (infinities and NaN pass through rounding as themselves)
            const __mmask16 finite = ~_mm512_fpclass_ps_mask(v, 0x99) & mask;
            row_largest = _mm512_mask_max_ps(row_largest, finite, row_largest, _mm512_abs_ps(v));
            _mm256_mask_storeu_epi16(out + m * K + k, mask,
                                     _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        }
        largest = std::max(largest, _mm512_reduce_max_ps(row_largest));
    }
    return largest > FLOAT16_MAX ? nullptr : out;
}

inline __m512 f16_load(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
inline __m512 f16_tail(const uint16_t* p, int64_t n) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16((__mmask16)((1u << n) - 1), p));
}

// y[m0 + j][n0 + i] = weight row n0 + i . activation row m0 + j (+ bias), i < RM, j < RN, over all K.
template <int RM, int RN>
inline void f16_tile(const uint16_t* w, const uint16_t* x, int64_t K, int64_t n0, int64_t m0, const float* bias,
                     float* y, int64_t N) {
    __m512 acc[RN][RM];
    for (int j = 0; j < RN; ++j)
        for (int i = 0; i < RM; ++i) acc[j][i] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        __m512 a[RM];
        for (int i = 0; i < RM; ++i) a[i] = f16_load(w + (n0 + i) * K + k);
        for (int j = 0; j < RN; ++j) {
            const __m512 b = f16_load(x + (m0 + j) * K + k);
            for (int i = 0; i < RM; ++i) acc[j][i] = _mm512_fmadd_ps(a[i], b, acc[j][i]);
        }
    }
    if (k < K) {
        __m512 a[RM];
        for (int i = 0; i < RM; ++i) a[i] = f16_tail(w + (n0 + i) * K + k, K - k);
        for (int j = 0; j < RN; ++j) {
            const __m512 b = f16_tail(x + (m0 + j) * K + k, K - k);
            for (int i = 0; i < RM; ++i) acc[j][i] = _mm512_fmadd_ps(a[i], b, acc[j][i]);
        }
    }
    for (int j = 0; j < RN; ++j)
        for (int i = 0; i < RM; ++i)
            y[(m0 + j) * N + n0 + i] = _mm512_reduce_add_ps(acc[j][i]) + (bias ? bias[n0 + i] : 0.0f);
}

// Weight rows [n0, n1) times activation rows [m0, m1): 4 x 6 tiles, then the rows left over.
void f16_block(const uint16_t* w, const uint16_t* x, int64_t K, int64_t n0, int64_t n1, int64_t m0, int64_t m1,
               const float* bias, float* y, int64_t N) {
    constexpr int RM = 4, RN = 6;
    const int64_t n_whole = n0 + (n1 - n0) / RM * RM, m_whole = m0 + (m1 - m0) / RN * RN;
    for (int64_t n = n0; n < n_whole; n += RM) {
        for (int64_t m = m0; m < m_whole; m += RN) f16_tile<RM, RN>(w, x, K, n, m, bias, y, N);
        with_rows<RN>(m1 - m_whole, [&](auto rows) { f16_tile<RM, decltype(rows)::value>(w, x, K, n, m_whole, bias, y, N); });
    }
    for (int64_t n = n_whole; n < n1; ++n) {
        for (int64_t m = m0; m < m_whole; m += RN) f16_tile<1, RN>(w, x, K, n, m, bias, y, N);
        with_rows<RN>(m1 - m_whole, [&](auto rows) { f16_tile<1, decltype(rows)::value>(w, x, K, n, m_whole, bias, y, N); });
    }
}

// Jobs of 16 weight rows x 72 activation rows (as llama.cpp's tinyBLAS blocks them), taken by whichever thread is
// free: a job's weights (16 rows) and activations stay in L2 while its tiles sweep them.
void f16_many(const uint16_t* w, const uint16_t* x, int64_t M, int64_t K, int64_t N, const float* bias, float* y,
              int nthreads) {
    constexpr int64_t JOB_N = 16, JOB_M = 72;
    const int64_t n_jobs = (N + JOB_N - 1) / JOB_N, m_jobs = (M + JOB_M - 1) / JOB_M;
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1) if (nthreads > 1)
    for (int64_t job = 0; job < n_jobs * m_jobs; ++job) {
        const int64_t n0 = (job % n_jobs) * JOB_N, m0 = (job / n_jobs) * JOB_M;
        f16_block(w, x, K, n0, std::min(N, n0 + JOB_N), m0, std::min(M, m0 + JOB_M), bias, y, N);
    }
}

void f16_product(const float* x, int64_t M, int64_t K, const uint16_t* w, int64_t N, const float* bias, float* y,
                 int nthreads) {
    const uint16_t* half = M >= ROUNDED_ROWS ? round_to_f16(x, M, K, nthreads) : nullptr;
    if (half)
        f16_many(w, half, M, K, N, bias, y, nthreads);
    else
        float_product<F16>(x, M, K, w, N, bias, y, nthreads);
}
#endif

#if PHI_BF16_DOT
// ---------------------------------------------------------------------------------------------------------------
// bfloat16 weights times activations rounded to bfloat16: vdpbf16ps, 32 products a register into 16 float32 sums.
// ---------------------------------------------------------------------------------------------------------------
constexpr int64_t BF16_STEP = 32;

// x (M, K) rounded to bfloat16 (to nearest even) into rows of Kp (a multiple of 32) zero-padded values: one scratch
// per calling thread, as the quantized activations.
const uint16_t* round_to_bf16(const float* x, int64_t M, int64_t K, int64_t Kp, int nthreads) {
    thread_local std::vector<uint16_t> scratch;
    std::vector<uint16_t>& buffer = scratch;
    if ((int64_t)buffer.size() < M * Kp) buffer.resize(M * Kp);
    uint16_t* out = buffer.data();
    const int threads = M * K >= (1 << 16) ? nthreads : 1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t m = 0; m < M; ++m) {
        for (int64_t k = 0; k < Kp; k += BF16_STEP) {
            const int64_t low = std::max<int64_t>(0, std::min<int64_t>(16, K - k));
            const int64_t high = std::max<int64_t>(0, std::min<int64_t>(16, K - k - 16));
            const __m512 a = _mm512_maskz_loadu_ps((__mmask16)((1u << low) - 1), x + m * K + k);
            const __m512 b = _mm512_maskz_loadu_ps((__mmask16)((1u << high) - 1), x + m * K + k + 16);
            _mm512_storeu_si512(out + m * Kp + k, (__m512i)_mm512_cvtne2ps_pbh(b, a));
        }
    }
    return out;
}

inline __m512bh dot_weights(const uint16_t* p) { return (__m512bh)_mm512_loadu_si512(p); }
inline __m512bh dot_weights_tail(const uint16_t* p, int64_t n) {
    return (__m512bh)_mm512_maskz_loadu_epi16((__mmask32)((1ull << n) - 1), p);
}
inline __m512bh dot_activations(const uint16_t* p) { return (__m512bh)_mm512_loadu_si512(p); }

// R weight rows times MC activation rows over inputs [k0, k1), added to y: as float_block.
template <int R, int MC>
inline void dot_block(const uint16_t* x, int64_t Kp, int64_t K, int64_t k0, int64_t k1, const uint16_t* w, float* y,
                      int64_t N) {
    __m512 acc[R][MC];
    for (int r = 0; r < R; ++r)
        for (int m = 0; m < MC; ++m) acc[r][m] = _mm512_setzero_ps();
    int64_t k = k0;
    for (; k + BF16_STEP <= k1; k += BF16_STEP) {
        for (int r = 0; r < R; ++r) _mm_prefetch((const char*)(w + (R + r) * K + k), _MM_HINT_T0);
        __m512bh xv[MC];
        for (int m = 0; m < MC; ++m) xv[m] = dot_activations(x + m * Kp + k);
        for (int r = 0; r < R; ++r) {
            const __m512bh wv = dot_weights(w + r * K + k);
            for (int m = 0; m < MC; ++m) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], wv, xv[m]);
        }
    }
    if (k < k1) {
        for (int r = 0; r < R; ++r) {
            const __m512bh wv = dot_weights_tail(w + r * K + k, k1 - k);
            for (int m = 0; m < MC; ++m) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], wv, dot_activations(x + m * Kp + k));
        }
    }
    for (int r = 0; r < R; ++r)
        for (int m = 0; m < MC; ++m) y[m * N + r] += _mm512_reduce_add_ps(acc[r][m]);
}

// Rows [n0, n1) for all M activation rows, blocked as float_rows' many-row order: MC = 6 activation rows stay in L1
// across a batch of weight rows in L2 (24 sums, measured 1.1x four rows' on a Zen 5); inputs in blocks of 2048
// (fewer horizontal sums).
constexpr int64_t DOT_KBLOCK = 2048;
void dot_rows(const uint16_t* x, int64_t M, int64_t Kp, int64_t K, const uint16_t* w, int64_t n0, int64_t n1,
              int64_t N, const float* bias, float* y) {
    constexpr int R = 4, MC = 6;
    for (int64_t m = 0; m < M; ++m)
        for (int64_t n = n0; n < n1; ++n) y[m * N + n] = bias ? bias[n] : 0.0f;
    const int64_t batch = std::max<int64_t>(R, (256 << 10) / (std::min(K, DOT_KBLOCK) * 2) / R * R);
    const int64_t full = M - M % MC, rest = M % MC;
    for (int64_t nb = n0; nb < n1; nb += batch) {
        const int64_t ne = std::min(n1, nb + batch), whole = nb + (ne - nb) / R * R;
        for (int64_t k0 = 0; k0 < K; k0 += DOT_KBLOCK) {
            const int64_t k1 = std::min(K, k0 + DOT_KBLOCK);
            for (int64_t m = 0; m < full; m += MC)
                for (int64_t n = nb; n < whole; n += R)
                    dot_block<R, MC>(x + m * Kp, Kp, K, k0, k1, w + n * K, y + m * N + n, N);
            for (int64_t n = nb; n < whole; n += R)
                with_rows<MC>(rest, [&](auto rows) {
                    dot_block<R, decltype(rows)::value>(x + full * Kp, Kp, K, k0, k1, w + n * K, y + full * N + n, N);
                });
            for (int64_t n = whole; n < ne; ++n)
                for (int64_t m = 0; m < M; ++m)
                    dot_block<1, 1>(x + m * Kp, Kp, K, k0, k1, w + n * K, y + m * N + n, N);
        }
    }
}

void bf16_dot_product(const float* x, int64_t M, int64_t K, const uint16_t* w, int64_t N, const float* bias, float* y,
                      int nthreads) {
    const int64_t Kp = (K + BF16_STEP - 1) / BF16_STEP * BF16_STEP;
    const uint16_t* xb = round_to_bf16(x, M, K, Kp, nthreads);
    int64_t unit;
    const int64_t units = unit_count(N, K * 2, M, OUTPUT_LINE, unit);
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1) if (nthreads > 1 && units > 1)
    for (int64_t u = 0; u < units; ++u) dot_rows(xb, M, Kp, K, w, u * unit, std::min(N, (u + 1) * unit), N, bias, y);
}
#endif

// ---------------------------------------------------------------------------------------------------------------
// Tiled integer weights.
// ---------------------------------------------------------------------------------------------------------------
struct IntArgs {
    const uint8_t* w;       // tiles
    const void* scales;     // q8: float per row (N padded to tiles); q4: float16 [tiles][groups][16]
    int64_t N, Kp, group;   // group: q4's group size (a multiple of 32)
    const float* bias;
    float* y;
    const Quantized* a;     // quantized activations
};

#if PHI_AVX512
inline void store_rows(float* y, int64_t valid, __m512 v) {
    _mm512_mask_storeu_ps(y, (__mmask16)(valid >= 16 ? 0xFFFF : (1u << valid) - 1), v);
}

template <int MC>
void q8_tile(const IntArgs& p, int64_t tile, int64_t m0) {
    const int64_t blocks = p.Kp / QBLOCK;
    const uint8_t* wt = p.w + tile * TILE * p.Kp;
    const int8_t* xq = p.a->q.data() + m0 * p.Kp;
    const float* xd = p.a->d.data() + m0 * blocks;
    __m512 acc[MC];
    for (int m = 0; m < MC; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t b = 0; b < blocks; ++b) {
        __m512i sum[MC];
        for (int m = 0; m < MC; ++m) sum[m] = _mm512_setzero_si512();
        const uint8_t* wb = wt + b * QBLOCK * TILE;
        for (int c = 0; c < QBLOCK / 4; ++c) {
            _mm_prefetch((const char*)(wb + c * 64) + PREFETCH, _MM_HINT_T0);
            const __m512i wv = _mm512_loadu_si512(wb + c * 64);
            for (int m = 0; m < MC; ++m)
                sum[m] = _mm512_dpbusd_epi32(sum[m], wv, _mm512_set1_epi32(load_i32(xq + m * p.Kp + b * QBLOCK + c * 4)));
        }
        // the sums include the weights' +128 (times the block's sum of q): Quantized::offset takes it off below
        for (int m = 0; m < MC; ++m)
            acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum[m]), _mm512_set1_ps(xd[m * blocks + b]), acc[m]);
    }
    const int64_t n = tile * TILE, valid = p.N - n;
    const __m512 scale = _mm512_loadu_ps((const float*)p.scales + n);
    const __m512 bias = p.bias ? _mm512_maskz_loadu_ps((__mmask16)(valid >= 16 ? 0xFFFF : (1u << valid) - 1), p.bias + n)
                               : _mm512_setzero_ps();
    const float* offset = p.a->offset.data() + m0;
    for (int m = 0; m < MC; ++m) {
        const __m512 exact = _mm512_sub_ps(acc[m], _mm512_set1_ps(offset[m]));
        store_rows(p.y + (m0 + m) * p.N + n, valid, _mm512_fmadd_ps(exact, scale, bias));
    }
}

template <int MC>
void q4_tile(const IntArgs& p, int64_t tile, int64_t m0) {
    const int64_t blocks = p.Kp / QBLOCK, groups = p.Kp / p.group, per_group = p.group / QBLOCK;
    const uint8_t* wt = p.w + tile * TILE * p.Kp / 2;
    const uint16_t* ws = (const uint16_t*)p.scales + tile * groups * TILE;
    const int8_t* xq = p.a->q.data() + m0 * p.Kp;
    const float* xd = p.a->d.data() + m0 * blocks;
    const int32_t* xs = p.a->s.data() + m0 * blocks;
    const __m512i low = _mm512_set1_epi8(0x0F);
    __m512 acc[MC];
    for (int m = 0; m < MC; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
        __m512 gacc[MC];
        for (int m = 0; m < MC; ++m) gacc[m] = _mm512_setzero_ps();
        for (int64_t b = g * per_group; b < (g + 1) * per_group; ++b) {
            __m512i sum[MC];
            for (int m = 0; m < MC; ++m) sum[m] = _mm512_setzero_si512();
            const uint8_t* wb = wt + b * QBLOCK * TILE / 2;
            for (int c = 0; c < QBLOCK / 8; ++c) {
                _mm_prefetch((const char*)(wb + c * 64) + PREFETCH, _MM_HINT_T0);
                const __m512i packed = _mm512_loadu_si512(wb + c * 64);
                const __m512i lo = _mm512_and_si512(packed, low);
                const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(packed, 4), low);
                for (int m = 0; m < MC; ++m) {
                    const int8_t* xc = xq + m * p.Kp + b * QBLOCK + c * 8;
                    sum[m] = _mm512_dpbusd_epi32(sum[m], lo, _mm512_set1_epi32(load_i32(xc)));
                    sum[m] = _mm512_dpbusd_epi32(sum[m], hi, _mm512_set1_epi32(load_i32(xc + 4)));
                }
            }
            for (int m = 0; m < MC; ++m) {
                // stored q = w / d + 8: subtract 8 * sum(x) of this block
                const __m512i exact = _mm512_sub_epi32(sum[m], _mm512_set1_epi32(8 * xs[m * blocks + b]));
                gacc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(exact), _mm512_set1_ps(xd[m * blocks + b]), gacc[m]);
            }
        }
        const __m512 scale = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(ws + g * TILE)));
        for (int m = 0; m < MC; ++m) acc[m] = _mm512_fmadd_ps(gacc[m], scale, acc[m]);
    }
    const int64_t n = tile * TILE, valid = p.N - n;
    const __m512 bias = p.bias ? _mm512_maskz_loadu_ps((__mmask16)(valid >= 16 ? 0xFFFF : (1u << valid) - 1), p.bias + n)
                               : _mm512_setzero_ps();
    for (int m = 0; m < MC; ++m) store_rows(p.y + (m0 + m) * p.N + n, valid, _mm512_add_ps(acc[m], bias));
}
constexpr int INT_MC = 8;
#else
// AVX2: each 16-row tile as two halves of 8 rows (the second 32 bytes of every 64-byte chunk).
inline void store_rows8(float* y, int64_t valid, __m256 v) {
    if (valid >= 8) {
        _mm256_storeu_ps(y, v);
    } else if (valid > 0) {
        float buf[8];
        _mm256_storeu_ps(buf, v);
        memcpy(y, buf, valid * sizeof(float));
    }
}
inline __m256 load_rows8(const float* p, int64_t valid) {
    if (valid >= 8) return _mm256_loadu_ps(p);
    float buf[8] = {0};
    if (valid > 0) memcpy(buf, p, valid * sizeof(float));
    return _mm256_loadu_ps(buf);
}

template <int MC>
void q8_half(const IntArgs& p, int64_t tile, int half, int64_t m0) {
    const int64_t blocks = p.Kp / QBLOCK;
    const uint8_t* wt = p.w + tile * TILE * p.Kp + half * 32;
    const int8_t* xq = p.a->q.data() + m0 * p.Kp;
    const float* xd = p.a->d.data() + m0 * blocks;
    const __m256i flip = _mm256_set1_epi8((char)0x80), ones = _mm256_set1_epi16(1);
    __m256 acc[MC];
    for (int m = 0; m < MC; ++m) acc[m] = _mm256_setzero_ps();
    for (int64_t b = 0; b < blocks; ++b) {
        __m256i sum[MC];
        for (int m = 0; m < MC; ++m) sum[m] = _mm256_setzero_si256();
        const uint8_t* wb = wt + b * QBLOCK * TILE;
        for (int c = 0; c < QBLOCK / 4; ++c) {
            _mm_prefetch((const char*)(wb + c * 64) + PREFETCH, _MM_HINT_T0);
            const __m256i wv = _mm256_xor_si256(_mm256_loadu_si256((const __m256i*)(wb + c * 64)), flip);
            const __m256i magnitude = _mm256_sign_epi8(wv, wv);
            for (int m = 0; m < MC; ++m) {
                const __m256i xv = _mm256_set1_epi32(load_i32(xq + m * p.Kp + b * QBLOCK + c * 4));
                const __m256i pairs = _mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(xv, wv));
                sum[m] = _mm256_add_epi32(sum[m], _mm256_madd_epi16(pairs, ones));
            }
        }
        for (int m = 0; m < MC; ++m)
            acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum[m]), _mm256_set1_ps(xd[m * blocks + b]), acc[m]);
    }
    const int64_t n = tile * TILE + half * 8, valid = p.N - n;
    const __m256 scale = _mm256_loadu_ps((const float*)p.scales + n);
    const __m256 bias = p.bias ? load_rows8(p.bias + n, valid) : _mm256_setzero_ps();
    for (int m = 0; m < MC; ++m) store_rows8(p.y + (m0 + m) * p.N + n, valid, _mm256_fmadd_ps(acc[m], scale, bias));
}

template <int MC>
void q4_half(const IntArgs& p, int64_t tile, int half, int64_t m0) {
    const int64_t blocks = p.Kp / QBLOCK, groups = p.Kp / p.group, per_group = p.group / QBLOCK;
    const uint8_t* wt = p.w + tile * TILE * p.Kp / 2 + half * 32;
    const uint16_t* ws = (const uint16_t*)p.scales + tile * groups * TILE + half * 8;
    const int8_t* xq = p.a->q.data() + m0 * p.Kp;
    const float* xd = p.a->d.data() + m0 * blocks;
    const int32_t* xs = p.a->s.data() + m0 * blocks;
    const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    __m256 acc[MC];
    for (int m = 0; m < MC; ++m) acc[m] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
        __m256 gacc[MC];
        for (int m = 0; m < MC; ++m) gacc[m] = _mm256_setzero_ps();
        for (int64_t b = g * per_group; b < (g + 1) * per_group; ++b) {
            __m256i sum[MC];
            for (int m = 0; m < MC; ++m) sum[m] = _mm256_setzero_si256();
            const uint8_t* wb = wt + b * QBLOCK * TILE / 2;
            for (int c = 0; c < QBLOCK / 8; ++c) {
                _mm_prefetch((const char*)(wb + c * 64) + PREFETCH, _MM_HINT_T0);
                const __m256i packed = _mm256_loadu_si256((const __m256i*)(wb + c * 64));
                const __m256i lo = _mm256_and_si256(packed, low);
                const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low);
                for (int m = 0; m < MC; ++m) {
                    const int8_t* xc = xq + m * p.Kp + b * QBLOCK + c * 8;
                    // 4 products of at most 15 * 127 per 16-bit lane: no saturation
                    const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_set1_epi32(load_i32(xc))),
                                                           _mm256_maddubs_epi16(hi, _mm256_set1_epi32(load_i32(xc + 4))));
                    sum[m] = _mm256_add_epi32(sum[m], _mm256_madd_epi16(pairs, ones));
                }
            }
            for (int m = 0; m < MC; ++m) {
                const __m256i exact = _mm256_sub_epi32(sum[m], _mm256_set1_epi32(8 * xs[m * blocks + b]));
                gacc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(exact), _mm256_set1_ps(xd[m * blocks + b]), gacc[m]);
            }
        }
        const __m256 scale = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(ws + g * TILE)));
        for (int m = 0; m < MC; ++m) acc[m] = _mm256_fmadd_ps(gacc[m], scale, acc[m]);
    }
    const int64_t n = tile * TILE + half * 8, valid = p.N - n;
    const __m256 bias = p.bias ? load_rows8(p.bias + n, valid) : _mm256_setzero_ps();
    for (int m = 0; m < MC; ++m) store_rows8(p.y + (m0 + m) * p.N + n, valid, _mm256_add_ps(acc[m], bias));
}

template <int MC>
void q8_tile(const IntArgs& p, int64_t tile, int64_t m0) {
    q8_half<MC>(p, tile, 0, m0);
    if (p.N - tile * TILE > 8) q8_half<MC>(p, tile, 1, m0);
}
template <int MC>
void q4_tile(const IntArgs& p, int64_t tile, int64_t m0) {
    q4_half<MC>(p, tile, 0, m0);
    if (p.N - tile * TILE > 8) q4_half<MC>(p, tile, 1, m0);
}
constexpr int INT_MC = 4;
#endif

template <bool Q4, int MC>
inline void int_tile(const IntArgs& p, int64_t tile, int64_t m0) {
    if constexpr (Q4)
        q4_tile<MC>(p, tile, m0);
    else
        q8_tile<MC>(p, tile, m0);
}

// All rows m of tiles [t0, t1): tiles in L2-sized batches, each batch swept once per chunk of INT_MC rows, so a
// chunk's activations stay in L1 while the batch's weights stay in L2 (decoding, M <= INT_MC: one pass).
template <bool Q4>
void int_tiles(const IntArgs& p, int64_t M, int64_t t0, int64_t t1, int64_t tile_bytes) {
    const int64_t batch = std::max<int64_t>(1, (256 << 10) / tile_bytes);
    for (int64_t tb = t0; tb < t1; tb += batch) {
        const int64_t te = std::min(t1, tb + batch);
        int64_t m = 0;
        for (; m + INT_MC <= M; m += INT_MC)
            for (int64_t t = tb; t < te; ++t) int_tile<Q4, INT_MC>(p, t, m);
        if (m < M)
            for (int64_t t = tb; t < te; ++t) with_rows<INT_MC>(M - m, [&](auto rows) { int_tile<Q4, decltype(rows)::value>(p, t, m); });
    }
}

template <bool Q4>
void int_product(const float* x, int64_t M, int64_t K, const uint8_t* w, const void* scales, int64_t group, int64_t N,
                 const float* bias, float* y, int nthreads) {
    const int64_t Kp = (K + group - 1) / group * group;
    const Quantized& a = quantize(x, M, K, Kp, nthreads);
    const IntArgs p{w, scales, N, Kp, group, bias, y, &a};
    const int64_t tiles = (N + TILE - 1) / TILE, tile_bytes = Q4 ? TILE * Kp / 2 : TILE * Kp;
    int64_t unit;
    const int64_t units = unit_count(tiles, tile_bytes, M, 1, unit);
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1) if (nthreads > 1 && units > 1)
    for (int64_t u = 0; u < units; ++u) int_tiles<Q4>(p, M, u * unit, std::min(tiles, (u + 1) * unit), tile_bytes);
}

// ---------------------------------------------------------------------------------------------------------------
// Attention (float32): softmax(q k^T * scale, causal, padded keys masked) v over a KV cache, and GELU (tanh form).
// torch's CPU scaled_dot_product_attention reaches about 80-120 GFLOP/s on prompt pieces and costs ~40 us a call
// when decoding; these stream the cache once per block of queries and keep the softmax in registers' lanes.
// ---------------------------------------------------------------------------------------------------------------
#if PHI_AVX512
inline vfloat vset1(float a) { return _mm512_set1_ps(a); }
inline vfloat vmul(vfloat a, vfloat b) { return _mm512_mul_ps(a, b); }
inline vfloat vsub(vfloat a, vfloat b) { return _mm512_sub_ps(a, b); }
inline vfloat vmax(vfloat a, vfloat b) { return _mm512_max_ps(a, b); }
inline vfloat vdiv(vfloat a, vfloat b) { return _mm512_div_ps(a, b); }
inline void vstore(float* p, vfloat v) { _mm512_storeu_ps(p, v); }
inline void vstore_tail(float* p, vfloat v, int n) { _mm512_mask_storeu_ps(p, (__mmask16)((1u << n) - 1), v); }
inline float vmax_lanes(vfloat v) { return _mm512_reduce_max_ps(v); }
// lanes below `first` set to -infinity (the queries that may not see a key yet)
inline vfloat vmask_below(vfloat x, int64_t first) {
    if (first <= 0) return x;
    const __mmask16 keep = first >= VW ? 0 : (__mmask16)(0xFFFFu << first);
    return _mm512_mask_blend_ps(keep, vset1(-INFINITY), x);
}
// every lane but `lane` set to -infinity (a padding key, which only its own query sees)
inline vfloat vkeep_lane(vfloat x, int64_t lane) {
    const __mmask16 keep = lane >= 0 && lane < VW ? (__mmask16)(1u << lane) : 0;
    return _mm512_mask_blend_ps(keep, vset1(-INFINITY), x);
}
inline vfloat vround(vfloat x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline vfloat vfnma(vfloat a, vfloat b, vfloat c) { return _mm512_fnmadd_ps(a, b, c); }
// p * 2^n for whole n, and 0 where x < limit
inline vfloat vscale_or_zero(vfloat p, vfloat n, vfloat x, float limit) {
    const __mmask16 kept = _mm512_cmp_ps_mask(x, vset1(limit), _CMP_NLT_UQ);  // NaN stays NaN
    return _mm512_maskz_mov_ps(kept, _mm512_scalef_ps(p, n));
}
#else
inline vfloat vset1(float a) { return _mm256_set1_ps(a); }
inline vfloat vmul(vfloat a, vfloat b) { return _mm256_mul_ps(a, b); }
inline vfloat vsub(vfloat a, vfloat b) { return _mm256_sub_ps(a, b); }
inline vfloat vmax(vfloat a, vfloat b) { return _mm256_max_ps(a, b); }
inline vfloat vdiv(vfloat a, vfloat b) { return _mm256_div_ps(a, b); }
inline void vstore(float* p, vfloat v) { _mm256_storeu_ps(p, v); }
inline void vstore_tail(float* p, vfloat v, int n) {
    float buf[8];
    _mm256_storeu_ps(buf, v);
    memcpy(p, buf, n * sizeof(float));
}
inline float vmax_lanes(vfloat v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}
inline vfloat lane_numbers() { return _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7); }
inline vfloat vmask_below(vfloat x, int64_t first) {
    if (first <= 0) return x;
    const vfloat keep = _mm256_cmp_ps(lane_numbers(), vset1((float)std::min<int64_t>(first, VW)), _CMP_GE_OQ);
    return _mm256_blendv_ps(vset1(-INFINITY), x, keep);
}
inline vfloat vkeep_lane(vfloat x, int64_t lane) {
    const vfloat keep = _mm256_cmp_ps(lane_numbers(), vset1((float)std::max<int64_t>(-1, std::min<int64_t>(lane, VW))), _CMP_EQ_OQ);
    return _mm256_blendv_ps(vset1(-INFINITY), x, keep);
}
inline vfloat vround(vfloat x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline vfloat vfnma(vfloat a, vfloat b, vfloat c) { return _mm256_fnmadd_ps(a, b, c); }
inline vfloat vscale_or_zero(vfloat p, vfloat n, vfloat x, float limit) {
    // n added to the exponent (n >= -125 where kept, so the result stays a normal number)
    const __m256i scaled = _mm256_add_epi32(_mm256_castps_si256(p), _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23));
    return _mm256_and_ps(_mm256_castsi256_ps(scaled), _mm256_cmp_ps(x, vset1(limit), _CMP_GE_OQ));
}
#endif

// exp(x) for x <= 0 (scores less their maximum); 0 below -86. Cephes' single-precision polynomial on x - n ln 2.
inline vfloat vexp_nonpositive(vfloat x) {
    const vfloat clamped = vmax(x, vset1(-86.0f));
    const vfloat n = vround(vmul(clamped, vset1(1.44269504f)));
    vfloat r = vfnma(n, vset1(0.693359375f), clamped);
    r = vfnma(n, vset1(-2.12194440e-4f), r);
    vfloat p = vset1(1.9875691500e-4f);
    p = vfma(p, r, vset1(1.3981999507e-3f));
    p = vfma(p, r, vset1(8.3334519073e-3f));
    p = vfma(p, r, vset1(4.1665795894e-2f));
    p = vfma(p, r, vset1(1.6666665459e-1f));
    p = vfma(p, r, vset1(5.0000001201e-1f));
    p = vfma(p, vmul(r, r), vadd(r, vset1(1.0f)));
    return vscale_or_zero(p, n, x, -86.0f);
}

struct AttentionArgs {
    const float *q, *k, *v;
    int64_t q_b, q_h, q_n;  // element strides of q (B, H, n, D)
    int64_t k_b, k_h, k_t;  // of k (B, KVH, T, D)
    int64_t v_b, v_h, v_t;  // of v (B, KVH, T, D)
    const uint8_t* key_valid;  // (B, T): 0 marks a padding key; null: none
    int64_t H, group, n, T, D;  // group: query heads per key/value head
    float scale;
    float* out;  // (B, n, H, D)

    const float* q_at(int64_t b, int64_t h) const { return q + b * q_b + h * q_h; }
    const float* k_at(int64_t b, int64_t h) const { return k + b * k_b + h / group * k_h; }
    const float* v_at(int64_t b, int64_t h) const { return v + b * v_b + h / group * v_h; }
    float* out_at(int64_t b, int64_t i, int64_t h) const { return out + ((b * n + i) * H + h) * D; }
    bool key_ok(int64_t b, int64_t j) const { return !key_valid || key_valid[b * T + j]; }
};

// out rows r < R (row stride out_stride) = inverse[r] * sum over keys j < keys of p[j * ld + r] * v[j]: NV vectors
// of the head dimension at a time, the R queries' weights broadcast from the probabilities. PARTIAL: one vector of
// `lanes` values (the end of a head dimension that is not a multiple of the vector width).
template <int R, int NV, bool PARTIAL = false>
inline void weighted_values(const float* p, int64_t ld, int64_t keys, const float* v, int64_t v_t, const float* inverse,
                            float* out, int64_t out_stride, int lanes = VW) {
    vfloat acc[R][NV];
    for (int r = 0; r < R; ++r)
        for (int x = 0; x < NV; ++x) acc[r][x] = vzero();
    for (int64_t j = 0; j < keys; ++j) {
        vfloat values[NV];
        for (int x = 0; x < NV; ++x)
            values[x] = PARTIAL ? vload_x_tail(v + j * v_t + x * VW, lanes) : vload_x(v + j * v_t + x * VW);
        for (int r = 0; r < R; ++r) {
            const vfloat weight = vset1(p[j * ld + r]);
            for (int x = 0; x < NV; ++x) acc[r][x] = vfma(weight, values[x], acc[r][x]);
        }
    }
    for (int r = 0; r < R; ++r)
        for (int x = 0; x < NV; ++x) {
            const vfloat scaled = vmul(acc[r][x], vset1(inverse[r]));
            if (PARTIAL)
                vstore_tail(out + r * out_stride + x * VW, scaled, lanes);
            else
                vstore(out + r * out_stride + x * VW, scaled);
        }
}

constexpr int VALUE_VECTORS = 4;  // head-dimension vectors per weighted_values call
template <int R>
inline void weighted_values_all(const AttentionArgs& a, const float* p, int64_t ld, int64_t keys, const float* v,
                                const float* inverse, float* out) {
    const int64_t vectors = a.D / VW;
    const int lanes = (int)(a.D % VW);
    int64_t x = 0;
    for (; x + VALUE_VECTORS <= vectors; x += VALUE_VECTORS)
        weighted_values<R, VALUE_VECTORS>(p, ld, keys, v + x * VW, a.v_t, inverse, out + x * VW, a.H * a.D);
    with_rows<VALUE_VECTORS>(vectors - x, [&](auto nv) {
        weighted_values<R, decltype(nv)::value>(p, ld, keys, v + x * VW, a.v_t, inverse, out + x * VW, a.H * a.D);
    });
    if (lanes)
        weighted_values<R, 1, true>(p, ld, keys, v + vectors * VW, a.v_t, inverse, out + vectors * VW, a.H * a.D, lanes);
}

// Few queries (decoding, checks of proposed tokens): one query at a time, its scores as dot products along the
// head dimension. Each query's arithmetic is the same whatever the number of queries in the call.
void attention_rows(const AttentionArgs& a, int64_t b, int64_t h, std::vector<float>& scores) {
    const int64_t past = a.T - a.n, vectors = a.D / VW;
    const int lanes = (int)(a.D % VW);
    const float *k = a.k_at(b, h), *v = a.v_at(b, h);
    for (int64_t i = 0; i < a.n; ++i) {
        const float* q = a.q_at(b, h) + i * a.q_n;
        const int64_t keys = past + i + 1, padded = (keys + VW - 1) / VW * VW;
        if ((int64_t)scores.size() < padded) scores.resize(padded);
        float* s = scores.data();
        for (int64_t j = 0; j < keys; ++j) {
            const float* key = k + j * a.k_t;
            vfloat acc = vzero();
            for (int64_t x = 0; x < vectors; ++x) acc = vfma(vload_x(q + x * VW), vload_x(key + x * VW), acc);
            if (lanes) acc = vfma(vload_x_tail(q + vectors * VW, lanes), vload_x_tail(key + vectors * VW, lanes), acc);
            s[j] = a.key_ok(b, j) || j == keys - 1 ? vsum(acc) * a.scale : -INFINITY;
        }
        for (int64_t j = keys; j < padded; ++j) s[j] = -INFINITY;
        vfloat top = vset1(-INFINITY);
        for (int64_t j = 0; j < padded; j += VW) top = vmax(top, vload_x(s + j));
        const vfloat most = vset1(vmax_lanes(top));
        vfloat total = vzero();
        for (int64_t j = 0; j < padded; j += VW) {
            const vfloat e = vexp_nonpositive(vsub(vload_x(s + j), most));
            vstore(s + j, e);
            total = vadd(total, e);
        }
        const float inverse = 1.0f / vsum(total);
        weighted_values_all<1>(a, s, 1, keys, v, &inverse, a.out_at(b, i, h));
    }
}

// Many queries (prompts): QUERY_VECTORS vectors of queries side by side in the lanes, so the scores of one key for
// VW queries are one FMA chain over the head dimension, and the softmax runs down the keys lane by lane.
#if PHI_AVX512
constexpr int QUERY_VECTORS = 4, KEYS_AT_ONCE = 6, QUERIES_AT_ONCE = 6;
#else
constexpr int QUERY_VECTORS = 2, KEYS_AT_ONCE = 4, QUERIES_AT_ONCE = 3;
#endif
constexpr int64_t QUERY_BLOCK = QUERY_VECTORS * VW;

// scores[c * QUERY_BLOCK + query] for C keys (rows of k), from the transposed queries qt[d * QUERY_BLOCK + query]
template <int C>
inline void key_scores(const float* qt, const float* k, int64_t k_t, int64_t D, float* scores) {
    vfloat acc[QUERY_VECTORS][C];
    for (int x = 0; x < QUERY_VECTORS; ++x)
        for (int c = 0; c < C; ++c) acc[x][c] = vzero();
    for (int64_t d = 0; d < D; ++d) {
        for (int x = 0; x < QUERY_VECTORS; ++x) {
            const vfloat queries = vload_x(qt + d * QUERY_BLOCK + x * VW);
            for (int c = 0; c < C; ++c) acc[x][c] = vfma(queries, vset1(k[c * k_t + d]), acc[x][c]);
        }
    }
    for (int c = 0; c < C; ++c)
        for (int x = 0; x < QUERY_VECTORS; ++x) vstore(scores + c * QUERY_BLOCK + x * VW, acc[x][c]);
}

struct BlockScratch {
    std::vector<float> qt, scores, inverse;
};

void attention_block(const AttentionArgs& a, int64_t b, int64_t h, int64_t i0, BlockScratch& scratch) {
    const int64_t rows = std::min(QUERY_BLOCK, a.n - i0), past = a.T - a.n, keys = past + i0 + rows;
    scratch.qt.assign(a.D * QUERY_BLOCK, 0.0f);
    if ((int64_t)scratch.scores.size() < keys * QUERY_BLOCK) scratch.scores.resize(keys * QUERY_BLOCK);
    scratch.inverse.resize(QUERY_BLOCK);
    float *qt = scratch.qt.data(), *s = scratch.scores.data(), *inverse = scratch.inverse.data();
    const float *q = a.q_at(b, h) + i0 * a.q_n, *k = a.k_at(b, h), *v = a.v_at(b, h);
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t d = 0; d < a.D; ++d) qt[d * QUERY_BLOCK + r] = q[r * a.q_n + d] * a.scale;
    int64_t j = 0;
    for (; j + KEYS_AT_ONCE <= keys; j += KEYS_AT_ONCE)
        key_scores<KEYS_AT_ONCE>(qt, k + j * a.k_t, a.k_t, a.D, s + j * QUERY_BLOCK);
    with_rows<KEYS_AT_ONCE>(keys - j, [&](auto c) {
        key_scores<decltype(c)::value>(qt, k + j * a.k_t, a.k_t, a.D, s + j * QUERY_BLOCK);
    });
    // Lane l of vector x is query i0 + x * VW + l, which sees key j from j - past on (a padding key: only itself).
    const int64_t from = a.key_valid ? 0 : past + i0;
    for (int64_t key = from; key < keys; ++key) {
        const bool ok = a.key_ok(b, key);
        for (int x = 0; x < QUERY_VECTORS; ++x) {
            float* lanes = s + key * QUERY_BLOCK + x * VW;
            const int64_t first = key - past - i0 - x * VW;
            vstore(lanes, ok ? vmask_below(vload_x(lanes), first) : vkeep_lane(vload_x(lanes), first));
        }
    }
    for (int x = 0; x < QUERY_VECTORS; ++x) {
        vfloat top = vset1(-INFINITY), total = vzero();
        for (int64_t key = 0; key < keys; ++key) top = vmax(top, vload_x(s + key * QUERY_BLOCK + x * VW));
        for (int64_t key = 0; key < keys; ++key) {
            float* lanes = s + key * QUERY_BLOCK + x * VW;
            const vfloat e = vexp_nonpositive(vsub(vload_x(lanes), top));
            vstore(lanes, e);
            total = vadd(total, e);
        }
        vstore(inverse + x * VW, vdiv(vset1(1.0f), total));
    }
    // Queries r0.. of the block see keys up to past + i0 + r0 + R - 1 at most (later ones have weight 0).
    int64_t r0 = 0;
    for (; r0 + QUERIES_AT_ONCE <= rows; r0 += QUERIES_AT_ONCE)
        weighted_values_all<QUERIES_AT_ONCE>(a, s + r0, QUERY_BLOCK, past + i0 + r0 + QUERIES_AT_ONCE, v, inverse + r0,
                                             a.out_at(b, i0 + r0, h));
    with_rows<QUERIES_AT_ONCE>(rows - r0, [&](auto r) {
        constexpr int R = decltype(r)::value;
        weighted_values_all<R>(a, s + r0, QUERY_BLOCK, past + i0 + r0 + R, v, inverse + r0, a.out_at(b, i0 + r0, h));
    });
}

// Calls with fewer queries than this take attention_rows at every level, so that a check of up to 15 proposed
// tokens computes each query exactly as a one-token step does.
constexpr int64_t ROW_QUERIES = 16;

void attention(const AttentionArgs& a, int64_t B, int nthreads) {
    const bool many = a.n >= ROW_QUERIES;
    const int64_t blocks = many ? (a.n + QUERY_BLOCK - 1) / QUERY_BLOCK : 1, units = B * a.H * blocks;
#pragma omp parallel num_threads(nthreads) if (nthreads > 1 && units > 1)
    {
        // kept per thread between calls: a prompt piece's scores are hundreds of KB, fresh pages every call otherwise
        thread_local std::vector<float> scores;
        thread_local BlockScratch scratch;
#pragma omp for schedule(dynamic, 1)
        for (int64_t u = 0; u < units; ++u) {
            const int64_t b = u / (a.H * blocks), h = u / blocks % a.H, block = u % blocks;
            if (many)
                attention_block(a, b, h, block * QUERY_BLOCK, scratch);
            else
                attention_rows(a, b, h, scores);
        }
    }
}

// Queries and keys rotated out of the fused q/k/v projection (B, n, (H + 2 KVH) * D), rotate-half over the first
// `rotary` channels of each head (cos and sin (B, n, D) per position, sin carrying the sign, 1 and 0 beyond):
// queries into q (B, H, n, D), keys and values into the cache's positions start.. (element strides b, h, t). One
// call instead of the slices, products, transposes and copies of a decoding step's rotation and cache write.
void rotate_into_cache(const float* projected, int64_t B, int64_t n, int64_t H, int64_t KVH, int64_t D, int64_t rotary,
                       const float* cos, const float* sin, float* q, float* keys, float* values, const int64_t* strides,
                       int64_t start, int nthreads) {
    const int64_t half = rotary / 2, width = (H + 2 * KVH) * D;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1 && B * n > 8)
    for (int64_t row = 0; row < B * n; ++row) {
        const int64_t b = row / n, i = row % n;
        const float *x0 = projected + row * width, *c = cos + row * D, *s = sin + row * D;
        for (int64_t h = 0; h < H + KVH; ++h) {
            const float* x = x0 + h * D;
            float* out = h < H ? q + ((b * H + h) * n + i) * D
                               : keys + b * strides[0] + (h - H) * strides[1] + (start + i) * strides[2];
            for (int64_t d = 0; d < half; ++d) out[d] = x[d] * c[d] + x[d + half] * s[d];
            for (int64_t d = half; d < rotary; ++d) out[d] = x[d] * c[d] + x[d - half] * s[d];
            for (int64_t d = rotary; d < D; ++d) out[d] = x[d];
        }
        for (int64_t h = 0; h < KVH; ++h)
            memcpy(values + b * strides[0] + h * strides[1] + (start + i) * strides[2], x0 + (H + KVH + h) * D,
                   D * sizeof(float));
    }
}

// gelu_new, x * (1 + tanh(u)) / 2 with u = sqrt(2 / pi) * (x + 0.044715 x^3), in place. With t = exp(-2 |u|),
// (1 + tanh(u)) / 2 is 1 / (1 + t) for u >= 0 and t / (1 + t) below: no overflow, and no cancellation in the
// negative tail (where 1 + tanh(u) computed directly loses the digits of a tiny result).
inline vfloat gelu_tanh(vfloat x) {
    const vfloat u = vmul(vset1(0.7978845608f), vfma(vmul(vset1(0.044715f), vmul(x, x)), x, x));
#if PHI_AVX512
    const vfloat t = vexp_nonpositive(vmul(vset1(-2.0f), _mm512_abs_ps(u)));
    const vfloat numerator = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(u, vzero(), _CMP_LT_OQ), vset1(1.0f), t);
#else
    const vfloat t = vexp_nonpositive(vmul(vset1(-2.0f), _mm256_andnot_ps(vset1(-0.0f), u)));
    const vfloat numerator = _mm256_blendv_ps(vset1(1.0f), t, _mm256_cmp_ps(u, vzero(), _CMP_LT_OQ));
#endif
    return vdiv(vmul(x, numerator), vadd(vset1(1.0f), t));
}

void gelu_tanh_inplace(float* x, int64_t count, int nthreads) {
    constexpr int64_t CHUNK = 1 << 14;
    const int64_t chunks = (count + CHUNK - 1) / CHUNK;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1 && chunks > 1)
    for (int64_t c = 0; c < chunks; ++c) {
        const int64_t end = std::min(count, (c + 1) * CHUNK);
        int64_t i = c * CHUNK;
        for (; i + VW <= end; i += VW) vstore(x + i, gelu_tanh(vload_x(x + i)));
        if (i < end) {
            float tail[VW] = {0};
            memcpy(tail, x + i, (end - i) * sizeof(float));
            vstore(tail, gelu_tanh(vload_x(tail)));
            memcpy(x + i, tail, (end - i) * sizeof(float));
        }
    }
}

}  // namespace

extern "C" {

int phi_kernels_level() { return PHI_LEVEL; }

// Every product has one signature: y (M, N) = x (M, K) @ W^T + bias. `scales` and `group` are the integer
// formats' (unused by the float ones); bias may be null.
#define PHI_PRODUCT(name)                                                                                         \
    void name(const float* x, int64_t M, int64_t K, const void* w, const void* scales, int64_t group, int64_t N, \
              const float* bias, float* y, int nthreads)

PHI_PRODUCT(phi_linear_f32) { float_product<F32>(x, M, K, (const float*)w, N, bias, y, nthreads); }
#if PHI_BF16_DOT
PHI_PRODUCT(phi_linear_bf16) {
    if (M >= ROUNDED_ROWS)
        bf16_dot_product(x, M, K, (const uint16_t*)w, N, bias, y, nthreads);
    else
        float_product<BF16>(x, M, K, (const uint16_t*)w, N, bias, y, nthreads);
}
#else
PHI_PRODUCT(phi_linear_bf16) { float_product<BF16>(x, M, K, (const uint16_t*)w, N, bias, y, nthreads); }
#endif
#if PHI_AVX512
PHI_PRODUCT(phi_linear_f16) { f16_product(x, M, K, (const uint16_t*)w, N, bias, y, nthreads); }
#else
PHI_PRODUCT(phi_linear_f16) { float_product<F16>(x, M, K, (const uint16_t*)w, N, bias, y, nthreads); }
#endif
PHI_PRODUCT(phi_linear_q8) { int_product<false>(x, M, K, (const uint8_t*)w, scales, QBLOCK, N, bias, y, nthreads); }
PHI_PRODUCT(phi_linear_q4) { int_product<true>(x, M, K, (const uint8_t*)w, scales, group, N, bias, y, nthreads); }

// out (B, n, H, D) = attention of q (B, H, n, D) over k, v (B, KVH, T, D), the last n of T positions being the
// queries'; strides in elements (the head dimension contiguous); key_valid (B, T) bytes or null.
void phi_attention(const float* q, const float* k, const float* v, const int64_t* strides, const uint8_t* key_valid,
                   int64_t B, int64_t H, int64_t KVH, int64_t n, int64_t T, int64_t D, float scale, float* out,
                   int nthreads) {
    const AttentionArgs a{q, k, v, strides[0], strides[1], strides[2], strides[3], strides[4], strides[5],
                          strides[6], strides[7], strides[8], key_valid, H, H / KVH, n, T, D, scale, out};
    attention(a, B, nthreads);
}

void phi_rotate_into_cache(const float* projected, int64_t B, int64_t n, int64_t H, int64_t KVH, int64_t D,
                           int64_t rotary, const float* cos, const float* sin, float* q, float* keys, float* values,
                           const int64_t* strides, int64_t start, int nthreads) {
    rotate_into_cache(projected, B, n, H, KVH, D, rotary, cos, sin, q, keys, values, strides, start, nthreads);
}

void phi_gelu_tanh(float* x, int64_t count, int nthreads) { gelu_tanh_inplace(x, count, nthreads); }

}  // extern "C"
