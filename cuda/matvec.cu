// matvec.cu: fused block-wise 4-bit matvec y[t, r] = sum_c W[r, c] x[t, c] for 1..16 tokens.
//
// Module options: -DBOFRS_ACT=<0 float32 | 1 bfloat16 | 2 float16> (activations and output).
// Memory-bound design: one warp per output row; each lane streams VB bytes of codes per
// 128-bit load (VB = 16), up to 4 loads in flight; the 16 levels sit
// in shared memory (16 distinct words in 16 banks: every lookup is conflict-free); float32
// accumulation, per 16 values a partial dot times the block scale; warp-shuffle reduction.
// Rows must hold whole blocks and whole chunks (cols % block_size == 0, cols % 32 == 0);
// codes and x 16-byte aligned (the loader checks; other weights decode and multiply).
// Kernel bofrs_matvec_t<T>_v<VB> handles up to T tokens (ntok <= T at run time).

typedef bofrs_elem<BOFRS_ACT>::type act_t;

#define BOFRS_WARPS 8
// Code loads in flight per lane: more for few tokens (little work per load), fewer for many
// (the activation loads and FMAs already cover the latency; keeps code size and compile time
// down).
template <int T> struct bofrs_unroll { static constexpr int value = T <= 2 ? 4 : (T <= 4 ? 2 : 1); };

template <int T, int VB>
__device__ __forceinline__ void bofrs_matvec_impl(
    const u8* __restrict__ codes, const void* __restrict__ scales,
    const float* __restrict__ params, int scale_fmt, const float* __restrict__ levels,
    const act_t* __restrict__ x, act_t* __restrict__ y, int rows, int cols, int block_shift,
    int ntok) {
    __shared__ float lv[16];
    if (threadIdx.x < 16) lv[threadIdx.x] = levels[threadIdx.x];
    __syncthreads();
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * BOFRS_WARPS + (threadIdx.x >> 5);
    if (row >= rows) return;
    constexpr int V = 2 * VB;  // values per chunk
    const i64 row_bytes = cols >> 1;
    const u8* rowp = codes + (i64)row * row_bytes;
    const int chunks = (int)(row_bytes / VB);
    const i64 block0 = ((i64)row * cols) >> block_shift;
    constexpr int U = bofrs_unroll<T>::value;
    float acc[T];
#pragma unroll
    for (int t = 0; t < T; ++t) acc[t] = 0.0f;
    for (int c0 = lane; c0 < chunks; c0 += 32 * U) {
        u32 w[U][VB / 4];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            int c = c0 + 32 * u;
            if (c < chunks) bofrs_ld_words<VB>(rowp + (i64)c * VB, w[u]);
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            int c = c0 + 32 * u;
            if (c >= chunks) break;
#pragma unroll
            for (int h = 0; h < VB / 8; ++h) {
                const int col = c * V + 16 * h;
                const float s = bofrs_scale(scales, params, scale_fmt, block0 + (col >> block_shift));
                float wv[16];
#pragma unroll
                for (int j = 0; j < 2; ++j) {
                    // Byte offsets into lv of the 4 high and the 4 low nibbles (4 * nibble, one
                    // per byte), then one byte extract per value: byte k of the word holds
                    // value 2k (high nibble) and 2k + 1 (low nibble).
                    const u32 word = w[u][2 * h + j];
                    const u32 hi4 = (word >> 2) & 0x3c3c3c3cu;
                    const u32 lo4 = (word << 2) & 0x3c3c3c3cu;
#pragma unroll
                    for (int k = 0; k < 4; ++k) {
                        wv[8 * j + 2 * k] = bofrs_lut(lv, __byte_perm(hi4, 0u, 0x4440u + k));
                        wv[8 * j + 2 * k + 1] = bofrs_lut(lv, __byte_perm(lo4, 0u, 0x4440u + k));
                    }
                }
#pragma unroll
                for (int t = 0; t < T; ++t) {
                    if (t < ntok) {
                        float xv[16];
                        bofrs_ld_act<BOFRS_ACT, 16>(x + (i64)t * cols + col, xv);
                        float p = 0.0f;
#pragma unroll
                        for (int j = 0; j < 16; ++j) p = fmaf(wv[j], xv[j], p);
                        acc[t] = fmaf(p, s, acc[t]);
                    }
                }
            }
        }
    }
#pragma unroll
    for (int t = 0; t < T; ++t) {
        if (t < ntok) {
            float v = bofrs_warp_sum(acc[t]);
            if (lane == (t & 31)) y[(i64)t * rows + row] = bofrs_store<BOFRS_ACT>(v);
        }
    }
}

#define BOFRS_MATVEC(T, VB)                                                                   \
    extern "C" __global__ void __launch_bounds__(32 * BOFRS_WARPS, 1) bofrs_matvec_t##T##_v##VB( \
        const u8* __restrict__ codes, const void* __restrict__ scales,                        \
        const float* __restrict__ params, int scale_fmt, const float* __restrict__ levels,    \
        const act_t* __restrict__ x, act_t* __restrict__ y, int rows, int cols,               \
        int block_shift, int ntok) {                                                          \
        bofrs_matvec_impl<T, VB>(codes, scales, params, scale_fmt, levels, x, y, rows, cols,  \
                                 block_shift, ntok);                                          \
    }

BOFRS_MATVEC(1, 16)
BOFRS_MATVEC(2, 16)
BOFRS_MATVEC(4, 16)
BOFRS_MATVEC(8, 16)
BOFRS_MATVEC(16, 16)
