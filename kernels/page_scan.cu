// Page scans run before eviction, one CUDA block per page.
//
// classify_pages: for each page, 1 if every byte is zero (the page need not be
// copied: restore becomes a memset), else 0.
// checksum_pages: a 64-bit Fletcher-style checksum per page, for verifying that
// a restored page is bit-exact without copying it back to the host.
//
// Pages are read as 16-byte words; page_bytes must be a multiple of 16 and the
// buffer 16-byte aligned (device allocations are 256-byte aligned).
// No #include: NVRTC has no C++ standard headers on its path, and uint4 and
// __syncthreads_or are built in.

extern "C" __global__ void classify_pages(const uint4* __restrict__ data,
                                          unsigned long long words_per_page,
                                          unsigned long long npages,
                                          unsigned char* __restrict__ is_zero) {
    const unsigned long long page = blockIdx.x;
    if (page >= npages) return;
    const uint4* p = data + page * words_per_page;
    unsigned int any = 0;
    for (unsigned long long i = threadIdx.x; i < words_per_page; i += blockDim.x) {
        uint4 w = p[i];
        any |= w.x | w.y | w.z | w.w;
    }
    any = __syncthreads_or(any != 0);
    if (threadIdx.x == 0) is_zero[page] = any ? 0 : 1;
}

extern "C" __global__ void checksum_pages(const unsigned int* __restrict__ data,
                                          unsigned long long words_per_page,
                                          unsigned long long npages,
                                          unsigned long long* __restrict__ out) {
    // Per thread: sum of words and sum of (index+1)*word over its strided share,
    // combined with a shared-memory reduction. Order-sensitive through the index weight.
    __shared__ unsigned long long s1[256];
    __shared__ unsigned long long s2[256];
    const unsigned long long page = blockIdx.x;
    if (page >= npages) return;
    const unsigned int* p = data + page * words_per_page;
    unsigned long long a = 0, b = 0;
    for (unsigned long long i = threadIdx.x; i < words_per_page; i += blockDim.x) {
        unsigned long long w = p[i];
        a += w;
        b += (i + 1) * w;
    }
    s1[threadIdx.x] = a;
    s2[threadIdx.x] = b;
    __syncthreads();
    for (unsigned int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) {
            s1[threadIdx.x] += s1[threadIdx.x + s];
            s2[threadIdx.x] += s2[threadIdx.x + s];
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) out[page] = s1[0] ^ (s2[0] * 0x9E3779B97F4A7C15ull);
}
