// higgs_matvec.cu: fused HIGGS matvec y[t, r] = sum_c W_rot[r, c] x_rot[t, c] for 1..16 tokens
// of rotated float32 activations (tokens x width, width = padded_cols).
//
// Module options: -DBOFRS_P=<1 | 2> (grid dimension), -DBOFRS_BITS=<2 | 4 | 8> (code width;
// codes are LSB-first, so these widths never straddle a byte). One warp per row; each lane
// streams 16 bytes of codes per 128-bit load, up to 4 loads in flight; a chunk lies inside one
// group (the loader requires 16 | group bytes), so one scale per chunk. Grid points in shared
// memory; float32 accumulation; warp-shuffle reduction. Output float32. Kernel
// bofrs_higgs_matvec_t<T>_v16 handles up to T tokens (ntok <= T at run time).

#define BOFRS_WARPS 8
// Code loads in flight per lane: up to 4, fewer when a chunk's tokens x values already make
// enough work to cover the latency (keeps registers from spilling).
template <int T, int V> struct bofrs_unroll {
    static constexpr int raw = 256 / (T * V);
    static constexpr int value = raw < 1 ? 1 : (raw > 4 ? 4 : raw);
};

constexpr int kCodesPerByte = 8 / BOFRS_BITS;
constexpr int kWeightsPerByte = BOFRS_P * kCodesPerByte;
constexpr int kPoints = 1 << BOFRS_BITS;

template <int T, int VB>
__device__ __forceinline__ void bofrs_higgs_matvec_impl(
    const u8* __restrict__ codes, const void* __restrict__ scales, int scale_fmt,
    const float* __restrict__ points, const float* __restrict__ x, float* __restrict__ y,
    int rows, int width, int log2g, int ntok) {
    __shared__ float pts[kPoints * BOFRS_P];
    for (int i = threadIdx.x; i < kPoints * BOFRS_P; i += blockDim.x) pts[i] = points[i];
    __syncthreads();
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * BOFRS_WARPS + (threadIdx.x >> 5);
    if (row >= rows) return;
    constexpr int V = VB * kWeightsPerByte;  // values per chunk
    constexpr int PIECE = 16;                // values per partial dot
    constexpr int PIECE_BYTES = PIECE / kWeightsPerByte;
    static_assert(V % PIECE == 0, "chunk must hold whole pieces");
    const int per_row = width >> log2g;
    const i64 row_bytes = (i64)width / kWeightsPerByte;
    const u8* rowp = codes + (i64)row * row_bytes;
    const int chunks = (int)(row_bytes / VB);
    const i64 group0 = (i64)row * per_row;
    constexpr int U = bofrs_unroll<T, VB * kWeightsPerByte>::value;
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
            const int col0 = c * V;
            const float s = bofrs_scale(scales, nullptr, scale_fmt, group0 + (col0 >> log2g));
#pragma unroll
            for (int q = 0; q < V / PIECE; ++q) {
                float wv[PIECE];
#pragma unroll
                for (int b = 0; b < PIECE_BYTES; ++b) {
                    const int jb = q * PIECE_BYTES + b;
                    const u32 byte = (w[u][jb >> 2] >> (8 * (jb & 3))) & 0xffu;
#pragma unroll
                    for (int k = 0; k < kCodesPerByte; ++k) {
                        const u32 code = (byte >> (BOFRS_BITS * k)) & (u32)(kPoints - 1);
#pragma unroll
                        for (int d = 0; d < BOFRS_P; ++d)
                            wv[(b * kCodesPerByte + k) * BOFRS_P + d] = pts[code * BOFRS_P + d];
                    }
                }
#pragma unroll
                for (int t = 0; t < T; ++t) {
                    if (t < ntok) {
                        float xv[PIECE];
                        bofrs_ld_act<BOFRS_F32, PIECE>(x + (i64)t * width + col0 + q * PIECE, xv);
                        float part = 0.0f;
#pragma unroll
                        for (int j = 0; j < PIECE; ++j) part = fmaf(wv[j], xv[j], part);
                        acc[t] = fmaf(part, s, acc[t]);
                    }
                }
            }
        }
    }
#pragma unroll
    for (int t = 0; t < T; ++t) {
        if (t < ntok) {
            float v = bofrs_warp_sum(acc[t]);
            if (lane == (t & 31)) y[(i64)t * rows + row] = v;
        }
    }
}

#define BOFRS_HIGGS_MATVEC(T, VB)                                                             \
    extern "C" __global__ void __launch_bounds__(32 * BOFRS_WARPS, 1)                            \
        bofrs_higgs_matvec_t##T##_v##VB(                                                      \
            const u8* __restrict__ codes, const void* __restrict__ scales, int scale_fmt,     \
            const float* __restrict__ points, const float* __restrict__ x,                    \
            float* __restrict__ y, int rows, int width, int log2g, int ntok) {                \
        bofrs_higgs_matvec_impl<T, VB>(codes, scales, scale_fmt, points, x, y, rows, width,   \
                                       log2g, ntok);                                          \
    }

BOFRS_HIGGS_MATVEC(1, 16)
BOFRS_HIGGS_MATVEC(2, 16)
BOFRS_HIGGS_MATVEC(4, 16)
BOFRS_HIGGS_MATVEC(8, 16)
BOFRS_HIGGS_MATVEC(16, 16)
