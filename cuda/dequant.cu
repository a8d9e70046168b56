// dequant.cu: block-wise 4-bit codes -> float values, and the OPQ outlier scatter.
//
// Module options: -DBOFRS_OUT=<0 float32 | 1 bfloat16 | 2 float16> (the output element).
// Value i decodes to levels[code_i] * scale[i >> block_shift] in float32 (one rounded
// multiply), rounded to the output type; codes are two per byte, value 2j in the high nibble.

typedef bofrs_elem<BOFRS_OUT>::type out_t;

// Each thread decodes chunks of 32 values (16 code bytes: one 128-bit load), grid-stride.
// `codes` must be 16-byte aligned (the loader checks); the last partial chunk goes byte-wise.
extern "C" __global__ void __launch_bounds__(256)
bofrs_dequant(const u8* __restrict__ codes, const void* __restrict__ scales,
              const float* __restrict__ params, int scale_fmt,
              const float* __restrict__ levels, i64 numel, int block_shift,
              out_t* __restrict__ out) {
    __shared__ float lv[16];
    if (threadIdx.x < 16) lv[threadIdx.x] = levels[threadIdx.x];
    __syncthreads();
    i64 chunks = (numel + 31) >> 5;
    for (i64 chunk = (i64)blockIdx.x * blockDim.x + threadIdx.x; chunk < chunks;
         chunk += (i64)gridDim.x * blockDim.x) {
        i64 v0 = chunk << 5;
        if (v0 + 32 <= numel) {
            uint4 q = bofrs_ld_stream(codes + (chunk << 4));
            u32 words[4] = {q.x, q.y, q.z, q.w};
            // Blocks are at least 16 values: one scale per half chunk.
            float s0 = bofrs_scale(scales, params, scale_fmt, v0 >> block_shift);
            float s1 = bofrs_scale(scales, params, scale_fmt, (v0 + 16) >> block_shift);
            float vals[32];
#pragma unroll
            for (int w = 0; w < 4; ++w) {
                float s = w < 2 ? s0 : s1;
#pragma unroll
                for (int k = 0; k < 4; ++k) {
                    u32 byte = (words[w] >> (8 * k)) & 0xffu;
                    vals[8 * w + 2 * k] = bofrs_mul(lv[byte >> 4], s);
                    vals[8 * w + 2 * k + 1] = bofrs_mul(lv[byte & 15u], s);
                }
            }
            bofrs_store_vec<BOFRS_OUT, 32>((uint4*)(out + v0), vals);
        } else {
            for (i64 i = v0; i < numel; ++i) {
                u32 byte = codes[i >> 1];
                u32 code = (i & 1) ? (byte & 15u) : (byte >> 4);
                float s = bofrs_scale(scales, params, scale_fmt, i >> block_shift);
                out[i] = bofrs_store<BOFRS_OUT>(bofrs_mul(lv[code], s));
            }
        }
    }
}

// OPQ: out[indices[k]] = values[k] (16-bit storage: bfloat16 when values_bf16, else float16),
// rounded to the output type. index_bytes is 2, 4 or 8 (uint16 / uint32 / uint64 indices).
extern "C" __global__ void __launch_bounds__(256)
bofrs_scatter_outliers(const void* __restrict__ indices, int index_bytes,
                       const u16* __restrict__ values, int values_bf16, i64 count,
                       out_t* __restrict__ out) {
    for (i64 k = (i64)blockIdx.x * blockDim.x + threadIdx.x; k < count;
         k += (i64)gridDim.x * blockDim.x) {
        u64 i;
        if (index_bytes == 2) i = ((const u16*)indices)[k];
        else if (index_bytes == 4) i = ((const u32*)indices)[k];
        else i = ((const u64*)indices)[k];
        u16 v = values[k];
        float f = values_bf16 ? bofrs_bf16_to_f32(v) : bofrs_f16_to_f32(v);
        out[i] = bofrs_store<BOFRS_OUT>(f);
    }
}
