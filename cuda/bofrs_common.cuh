// bofrs_common.cuh: types, exact float conversions and scale decoding shared by every bofrs
// kernel. The loader (python/bofrs/_cuda/_sources.py) prepends this file to each module; no
// CUDA header is included, so NVRTC needs no include path.
//
// Rounding conversions are the bit algorithms of rust/bofrs-core/src/element.rs (round to
// nearest even, NaN stays NaN), and exact arithmetic goes through bofrs_mul / bofrs_add /
// bofrs_sub: inline PTX without .ftz, so neither contraction into a multiply-add nor CuPy's
// -ftz=true (which it always appends) changes a result. Dequantized values are therefore
// bit-identical to the CPU decoder, subnormals included.

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long i64;

// Element kinds (activations, outputs): the values of BOFRS_ACT / BOFRS_OUT.
#define BOFRS_F32 0
#define BOFRS_BF16 1
#define BOFRS_F16 2

// Scale formats (runtime argument `scale_fmt`, uniform over a launch).
#define BOFRS_SCALE_F32 0
#define BOFRS_SCALE_BF16 1
#define BOFRS_SCALE_F16 2
#define BOFRS_SCALE_DQ8 3
#define BOFRS_SCALE_DQ8S 4

// IEEE float32 operations, round to nearest even, subnormals kept.
__device__ __forceinline__ float bofrs_mul(float a, float b) {
    float r;
    asm("mul.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}
__device__ __forceinline__ float bofrs_add(float a, float b) {
    float r;
    asm("add.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}
__device__ __forceinline__ float bofrs_sub(float a, float b) {
    float r;
    asm("sub.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}

__device__ __forceinline__ float bofrs_bf16_to_f32(u16 h) { return __uint_as_float(((u32)h) << 16); }

// Exact (every float16 is a float32): the hardware conversion, the same value as the CPU's
// bit algorithm (element.rs f16_to_f32).
__device__ __forceinline__ float bofrs_f16_to_f32(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ u16 bofrs_f32_to_bf16(float f) {
    u32 b = __float_as_uint(f);
    u32 rounded = b + (0x7fffu + ((b >> 16) & 1u));
    bool is_nan = (b & 0x7fffffffu) > 0x7f800000u;
    return is_nan ? (u16)((b >> 16) | 0x0040u) : (u16)(rounded >> 16);
}

__device__ __forceinline__ u16 bofrs_f32_to_f16(float f) {
    u32 x = __float_as_uint(f);
    u16 sign = (u16)((x >> 16) & 0x8000u);
    u32 a = x & 0x7fffffffu;
    u16 magnitude;
    if (a >= 0x47800000u) {
        magnitude = a > 0x7f800000u ? (u16)0x7e00 : (u16)0x7c00;
    } else if (a < 0x38800000u) {
        float aligned = bofrs_add(__uint_as_float(a), 0.5f);
        magnitude = (u16)(__float_as_uint(aligned) - 0x3f000000u);
    } else {
        u32 odd = (a >> 13) & 1u;
        magnitude = (u16)((a - (112u << 23) + 0xfffu + odd) >> 13);
    }
    return (u16)(magnitude | sign);
}

// Element type of a kind, and conversions from / to float.
template <int K> struct bofrs_elem { typedef u16 type; };
template <> struct bofrs_elem<BOFRS_F32> { typedef float type; };

template <int K> __device__ __forceinline__ float bofrs_load(const typename bofrs_elem<K>::type v);
template <> __device__ __forceinline__ float bofrs_load<BOFRS_F32>(const float v) { return v; }
template <> __device__ __forceinline__ float bofrs_load<BOFRS_BF16>(const u16 v) { return bofrs_bf16_to_f32(v); }
template <> __device__ __forceinline__ float bofrs_load<BOFRS_F16>(const u16 v) { return bofrs_f16_to_f32(v); }

template <int K> __device__ __forceinline__ typename bofrs_elem<K>::type bofrs_store(float v);
template <> __device__ __forceinline__ float bofrs_store<BOFRS_F32>(float v) { return v; }
template <> __device__ __forceinline__ u16 bofrs_store<BOFRS_BF16>(float v) { return bofrs_f32_to_bf16(v); }
template <> __device__ __forceinline__ u16 bofrs_store<BOFRS_F16>(float v) { return bofrs_f32_to_f16(v); }

// The float32 scale of block `b`: stored float scales, or dq8 bytes with `[lo, step]` per
// group of 256 blocks in `params` (magnitude code 0 = zero, else lo + (c - 1) * step, multiply
// then add; signed dq8: bit 7 is the sign, bits 0..6 the code).
__device__ __forceinline__ float bofrs_scale(const void* __restrict__ scales,
                                             const float* __restrict__ params, int fmt, i64 b) {
    if (fmt == BOFRS_SCALE_BF16) return bofrs_bf16_to_f32(__ldg((const u16*)scales + b));
    if (fmt == BOFRS_SCALE_F16) return bofrs_f16_to_f32(__ldg((const u16*)scales + b));
    if (fmt == BOFRS_SCALE_F32) return __ldg((const float*)scales + b);
    u32 byte = __ldg((const u8*)scales + b);
    bool is_signed = fmt == BOFRS_SCALE_DQ8S;
    u32 c = is_signed ? (byte & 0x7fu) : byte;
    i64 g = b >> 8;
    float lo = __ldg(params + 2 * g), step = __ldg(params + 2 * g + 1);
    float m = c == 0 ? 0.0f : bofrs_add(lo, bofrs_mul((float)(c - 1), step));
    // The sign bit flipped as an integer: `-m` compiles to neg.ftz.f32 under CuPy's -ftz=true,
    // which would flush a subnormal scale to zero (the CPU's negation keeps it).
    const u32 sign = is_signed ? (byte & 0x80u) << 24 : 0u;
    return __uint_as_float(__float_as_uint(m) ^ sign);
}

// Streaming 128-bit load of weight bytes (read once: keep L1 for the activations).
__device__ __forceinline__ uint4 bofrs_ld_stream(const void* p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}

// The float at byte offset `offset` of a shared-memory table (offset = 4 * index).
__device__ __forceinline__ float bofrs_lut(const float* table, u32 offset) {
    return *(const float*)((const char*)table + offset);
}

// Sum over the warp (every lane gets the total).
__device__ __forceinline__ float bofrs_warp_sum(float v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}

// Stores N floats (N a multiple of 8) converted to kind K with 128-bit stores; `dst` must be
// 16-byte aligned.
template <int K, int N>
__device__ __forceinline__ void bofrs_store_vec(uint4* __restrict__ dst, const float* v) {
    if constexpr (K == BOFRS_F32) {
#pragma unroll
        for (int k = 0; k < N / 4; ++k)
            dst[k] = make_uint4(__float_as_uint(v[4 * k]), __float_as_uint(v[4 * k + 1]),
                                __float_as_uint(v[4 * k + 2]), __float_as_uint(v[4 * k + 3]));
    } else {
        u32 w[N / 2];
#pragma unroll
        for (int k = 0; k < N / 2; ++k)
            w[k] = (u32)bofrs_store<K>(v[2 * k]) | ((u32)bofrs_store<K>(v[2 * k + 1]) << 16);
#pragma unroll
        for (int k = 0; k < N / 8; ++k)
            dst[k] = make_uint4(w[4 * k], w[4 * k + 1], w[4 * k + 2], w[4 * k + 3]);
    }
}

// VB bytes (16, 8 or 4) of weight codes as 32-bit words.
template <int VB> __device__ __forceinline__ void bofrs_ld_words(const u8* p, u32* w) {
    if constexpr (VB == 16) {
        uint4 q = bofrs_ld_stream(p);
        w[0] = q.x; w[1] = q.y; w[2] = q.z; w[3] = q.w;
    } else if constexpr (VB == 8) {
        uint2 q = __ldg((const uint2*)p);
        w[0] = q.x; w[1] = q.y;
    } else {
        w[0] = __ldg((const u32*)p);
    }
}

// N consecutive activations of kind K as floats (`p` 16-byte aligned, N a multiple of 8).
template <int K, int N> __device__ __forceinline__ void bofrs_ld_act(const void* p, float* v) {
    const uint4* q = (const uint4*)p;
    if constexpr (K == BOFRS_F32) {
#pragma unroll
        for (int k = 0; k < N / 4; ++k) {
            uint4 a = __ldg(q + k);
            v[4 * k] = __uint_as_float(a.x); v[4 * k + 1] = __uint_as_float(a.y);
            v[4 * k + 2] = __uint_as_float(a.z); v[4 * k + 3] = __uint_as_float(a.w);
        }
    } else {
#pragma unroll
        for (int k = 0; k < N / 8; ++k) {
            uint4 a = __ldg(q + k);
            u32 w[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                v[8 * k + 2 * j] = bofrs_load<K>((u16)(w[j] & 0xffffu));
                v[8 * k + 2 * j + 1] = bofrs_load<K>((u16)(w[j] >> 16));
            }
        }
    }
}
