// Compile-time dispatch helpers: turn a runtime value into a constexpr inside a lambda body, so host code
// picks one template instantiation without writing the switch by hand. Host-only, no CUDA or torch headers.
//
//   BOOL_SWITCH(is_causal, kCausal, [&] { launch<kCausal>(params); });
#pragma once

#define BOOL_SWITCH(COND, CONST_NAME, ...)      \
  [&] {                                         \
    if (COND) {                                 \
      constexpr static bool CONST_NAME = true;  \
      return __VA_ARGS__();                     \
    } else {                                    \
      constexpr static bool CONST_NAME = false; \
      return __VA_ARGS__();                     \
    }                                           \
  }()
