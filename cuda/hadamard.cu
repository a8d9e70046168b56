// hadamard.cu: the orthonormal Walsh-Hadamard transform of consecutive groups of 2^log2n
// values (activations, or any flat tensor whose length is a multiple of the group).
//
// Module options: -DBOFRS_ACT=<0 float32 | 1 bfloat16 | 2 float16> (input and output; the
// transform runs in float32). One thread block per group, 4 * 2^log2n bytes of dynamic shared
// memory (the loader raises the limit for groups above 12288 values).

typedef bofrs_elem<BOFRS_ACT>::type act_t;

extern "C" __global__ void __launch_bounds__(1024)
bofrs_hadamard(const act_t* __restrict__ x, act_t* __restrict__ out, int log2n, float scale) {
    extern __shared__ float v[];
    const int n = 1 << log2n;
    const i64 base = (i64)blockIdx.x << log2n;
    for (int i = threadIdx.x; i < n; i += blockDim.x) v[i] = bofrs_load<BOFRS_ACT>(x[base + i]);
    bofrs_fwht_shared(v, n, scale);
    for (int i = threadIdx.x; i < n; i += blockDim.x) out[base + i] = bofrs_store<BOFRS_ACT>(v[i]);
}
