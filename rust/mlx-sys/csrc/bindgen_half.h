// For bindgen only, off aarch64: both half types are 2-byte values (see build.rs).
#pragma once
typedef unsigned short float16_t;
typedef unsigned short bfloat16_t;
