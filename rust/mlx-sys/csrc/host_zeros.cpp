// Zero-filled arrays on MLX's CPU allocator without writing the zeros (Linux): the buffer's whole
// pages are dropped with MADV_DONTNEED, after which the kernel maps zero pages on first touch;
// only the partial pages at its ends are written. A multi-GiB KV cache then costs nothing until
// used, and reads as real zeros whatever malloc returned (fresh or recycled memory).
//
// The buffer stays MLX's own (allocator::malloc): owned, so scatters can donate it and write in
// place. Only the CPU allocator (a size_t header before the data, checked at run time) holds plain
// private memory; elsewhere (Metal, CUDA, not Linux) this answers 1 and the caller uses `zeros`.

#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>

#include "mlx/allocator.h"
#include "mlx/array.h"
#include "mlx/c/array.h"
#include "mlx/c/private/array.h"
#include "mlx/c/private/enums.h"

namespace {

namespace al = mlx::core::allocator;

bool cpu_allocator() {
#ifdef __linux__
  al::Buffer b = al::allocator().malloc(64);
  bool ok = b.ptr() != nullptr &&
      b.raw_ptr() == static_cast<void*>(static_cast<size_t*>(b.ptr()) + 1) &&
      al::allocator().size(b) == 64;
  al::allocator().free(b);
  return ok;
#else
  return false;
#endif
}

void zero(char* p, size_t n) {
  uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  uintptr_t begin = reinterpret_cast<uintptr_t>(p);
  uintptr_t end = begin + n;
  uintptr_t lo = (begin + page - 1) / page * page;
  uintptr_t hi = end / page * page;
  if (hi <= lo) {
    std::memset(p, 0, n);
    return;
  }
  std::memset(p, 0, lo - begin);
  if (madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_DONTNEED) != 0) {
    std::memset(reinterpret_cast<void*>(lo), 0, hi - lo);
  }
  std::memset(reinterpret_cast<void*>(hi), 0, end - hi);
}

} // namespace

// 0: `res` holds the zeros; 1: this allocator is not the CPU one; 2: allocation failed.
extern "C" int mlx_sys_host_zeros(
    mlx_array* res,
    const int* shape,
    int dim,
    mlx_dtype dtype) {
  static const bool supported = cpu_allocator();
  if (!supported) {
    return 1;
  }
  try {
    mlx::core::Shape cpp_shape(shape, shape + dim);
    mlx::core::Dtype cpp_dtype = mlx_dtype_to_cpp(dtype);
    size_t nbytes = cpp_dtype.size();
    for (int d : cpp_shape) {
      nbytes *= static_cast<size_t>(d);
    }
    al::Data data = al::malloc(nbytes);
    char* p = static_cast<char*>(data.buffer().raw_ptr());
    if (p == nullptr) {
      return 2;
    }
    zero(p, nbytes);
    mlx_array_set_(*res, mlx::core::array(std::move(data), cpp_shape, cpp_dtype));
    return 0;
  } catch (std::exception&) {
    return 2;
  }
}
