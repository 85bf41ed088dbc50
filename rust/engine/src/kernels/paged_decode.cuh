// Helpers for paged_decode.cu (emitted before the kernel).

// N consecutive elements of T as one aligned load when they fit a 2/4/8/16-byte word.
template <typename T, int N>
struct alignas(sizeof(T) * N) PagedDecodeVec {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ void paged_decode_load(const T* p, float* out) {
  if constexpr ((N & (N - 1)) == 0 && sizeof(T) * N <= 16) {
    const PagedDecodeVec<T, N> x = *reinterpret_cast<const PagedDecodeVec<T, N>*>(p);
#pragma unroll
    for (int i = 0; i < N; ++i) {
      out[i] = static_cast<float>(x.v[i]);
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      out[i] = static_cast<float>(p[i]);
    }
  }
}
