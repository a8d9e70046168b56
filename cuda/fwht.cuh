// fwht.cuh: the orthonormal fast Walsh-Hadamard transform of n floats in shared memory, by the
// whole thread block. Stages h = 1, 2, 4, ... n/2 of butterflies (a + b, a - b), then one
// multiply by `scale` (1 / sqrt(n) in float32, computed by the caller): every element gets the
// same float32 operations as rust/bofrs-core/src/hadamard.rs, so results are bit-identical.

__device__ __forceinline__ void bofrs_fwht_shared(float* v, int n, float scale) {
    for (int h = 1; h < n; h <<= 1) {
        __syncthreads();
        for (int p = threadIdx.x; p < (n >> 1); p += blockDim.x) {
            int i = ((p & ~(h - 1)) << 1) | (p & (h - 1));
            float a = v[i], b = v[i + h];
            v[i] = bofrs_add(a, b);
            v[i + h] = bofrs_sub(a, b);
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < n; i += blockDim.x) v[i] = bofrs_mul(v[i], scale);
    __syncthreads();
}
