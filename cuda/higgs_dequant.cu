// higgs_dequant.cu: HIGGS codes -> weights, in the rotated basis or rotated back.
//
// Module options: -DBOFRS_OUT=<0 float32 | 1 bfloat16 | 2 float16>. One thread block per
// group of 2^log2g values: the group's LSB-first stream of `bits`-wide codes (each a point of
// the p-dimensional grid) is decoded into shared memory as point * scale (float32), optionally
// transformed back by the Hadamard transform (fwht.cuh), and the row's first `width` values
// are written (width: padded_cols for the rotated weight, cols otherwise). Dynamic shared
// memory: 4 * 2^log2g bytes.

typedef bofrs_elem<BOFRS_OUT>::type out_t;

extern "C" __global__ void __launch_bounds__(1024)
bofrs_higgs_dequant(const u8* __restrict__ codes, const void* __restrict__ scales,
                    int scale_fmt, const float* __restrict__ points, int p, int bits,
                    int log2g, int per_row, int width, int rotate_back, float hscale,
                    out_t* __restrict__ out) {
    extern __shared__ float v[];
    __shared__ float pts[512];
    const int g = 1 << log2g;
    const int npts = (1 << bits) * p;
    for (int i = threadIdx.x; i < npts; i += blockDim.x) pts[i] = points[i];
    const i64 group = blockIdx.x;
    const int group_bytes = (g / p) * bits / 8;
    const u8* stream = codes + group * group_bytes;
    const float s = bofrs_scale(scales, nullptr, scale_fmt, group);
    __syncthreads();
    const u32 mask = (1u << bits) - 1u;
    for (int i = threadIdx.x; i < g / p; i += blockDim.x) {
        int pos = i * bits;
        int byte = pos >> 3, shift = pos & 7;
        u32 wide = stream[byte];
        if (shift + bits > 8) wide |= (u32)stream[byte + 1] << 8;
        u32 code = (wide >> shift) & mask;
        for (int d = 0; d < p; ++d) v[i * p + d] = bofrs_mul(pts[code * p + d], s);
    }
    if (rotate_back) bofrs_fwht_shared(v, g, hscale);
    else __syncthreads();
    const i64 row = group / per_row;
    const int start = (int)(group % per_row) * g;
    const int take = min(g, width - start);
    for (int j = threadIdx.x; j < take; j += blockDim.x)
        out[row * width + start + j] = bofrs_store<BOFRS_OUT>(v[j]);
}
