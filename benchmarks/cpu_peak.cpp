// The arithmetic ceiling of one core: independent AVX-512 float32 FMAs and int8 VNNI dot products per second.
//
//     g++ -O2 -mavx512f -mavx512bw -mavx512vnni benchmarks/cpu_peak.cpp -o /tmp/cpu_peak
//     /tmp/cpu_peak & /tmp/cpu_peak; wait        # one copy per core, to see whether the cores share FMA units
//
// Twelve accumulators, more than latency x throughput, so the loop measures throughput. GFLOP/s = FMAs x 32
// (16 lanes, multiply and add); int8 multiply-adds = dot products x 64.
#include <immintrin.h>

#include <chrono>
#include <cstdio>

#define TWELVE(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)

int main() {
#define DECLARE(i)                                \
    __m512i dot##i = _mm512_set1_epi32(i);       \
    __m512 fma##i = _mm512_set1_ps((float)i);
    TWELVE(DECLARE)
    __m512i a = _mm512_set1_epi32(0x01010101), b = _mm512_set1_epi32(0x02020202);
    __m512 x = _mm512_set1_ps(1.0001f), y = _mm512_set1_ps(0.9999f);
    const long rounds = 100000000;
    const auto t0 = std::chrono::steady_clock::now();
#define DOT(i) dot##i = _mm512_dpbusd_epi32(dot##i, a, b);
    for (long n = 0; n < rounds; ++n) {
        TWELVE(DOT)
        __asm__ volatile("" : "+v"(a));  // keeps the loop from being folded
    }
    const auto t1 = std::chrono::steady_clock::now();
#define FMA(i) fma##i = _mm512_fmadd_ps(fma##i, x, y);
    for (long n = 0; n < rounds; ++n) {
        TWELVE(FMA)
        __asm__ volatile("" : "+v"(x));
    }
    const auto t2 = std::chrono::steady_clock::now();
    int check = 0;
    float fcheck = 0;
#define SUM(i)                                 \
    check += _mm512_reduce_add_epi32(dot##i); \
    fcheck += _mm512_reduce_add_ps(fma##i);
    TWELVE(SUM)
    const double dots = 12.0 * rounds / std::chrono::duration<double>(t1 - t0).count();
    const double fmas = 12.0 * rounds / std::chrono::duration<double>(t2 - t1).count();
    std::printf("AVX-512 FMA %.2f G/s = %.0f GFLOP/s; VNNI dot %.2f G/s = %.0f G int8 MAC/s (%d %g)\n", fmas / 1e9,
                fmas * 32 / 1e9, dots / 1e9, dots * 64 / 1e9, check, fcheck);
}
