// Force-included into every mlx-c translation unit (see build.rs).
#pragma once

#ifdef __cplusplus

// mlx-c's private io.h calls std::format, which libstdc++ before GCC 13 lacks. Only "{}" fields are
// used, so a minimal stand-in is enough.
#if !__has_include(<format>)
#include <sstream>
#include <string>
#include <string_view>
namespace std {
template <class... Args>
inline std::string format(std::string_view fmt, const Args&... args) {
  std::ostringstream out;
  auto emit_one = [&](const auto& value) {
    auto field = fmt.find("{}");
    if (field == std::string_view::npos) {
      return;
    }
    out << fmt.substr(0, field) << value;
    fmt.remove_prefix(field + 2);
  };
  (emit_one(args), ...);
  out << fmt;
  return out.str();
}
} // namespace std
#endif

// mlx-c declares float16_t / bfloat16_t (and the accessors that use them) only on aarch64.
#if !defined(__aarch64__)
#include <mlx/types/half_types.h>
typedef mlx::core::float16_t float16_t;
typedef mlx::core::bfloat16_t bfloat16_t;
#endif

#endif // __cplusplus
