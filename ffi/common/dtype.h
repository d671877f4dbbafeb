// Element types the kernels read and write, and scalar conversions between
// them and float32. Vectorized conversions live with the ISA-specific kernels;
// these are the portable definitions (round to nearest even, NaN kept NaN).
#pragma once

#include <cstdint>
#include <cstring>

namespace jax_mla {

enum class DType : int32_t { kF32 = 0, kF16 = 1, kBF16 = 2 };

inline const char* DTypeName(DType t) {
  switch (t) {
    case DType::kF32: return "float32";
    case DType::kF16: return "float16";
    case DType::kBF16: return "bfloat16";
  }
  return "unknown";
}

inline int DTypeBytes(DType t) { return t == DType::kF32 ? 4 : 2; }

inline float BitsToFloat(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint32_t FloatToBits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float BF16ToFloat(uint16_t h) { return BitsToFloat(uint32_t(h) << 16); }

inline uint16_t FloatToBF16(float f) {
  uint32_t u = FloatToBits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

inline float F16ToFloat(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  if (exp == 0x1f) return BitsToFloat(sign | 0x7f800000u | (mant << 13));  // inf, NaN
  if (exp != 0) return BitsToFloat(sign | ((exp + 112u) << 23) | (mant << 13));
  // Zero or subnormal: mant * 2^-24, exact in float32.
  const float v = float(mant) * 5.9604644775390625e-8f;
  return sign ? -v : v;
}

inline uint16_t FloatToF16(float f) {
  const uint32_t u = FloatToBits(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return sign | 0x7e00u;   // NaN
  if (a >= 0x477ff000u) return sign | 0x7c00u;  // rounds to inf
  if (a < 0x38800000u) {                        // subnormal or zero
    // Scale into the subnormal grid; the float add rounds to nearest even.
    const float v = BitsToFloat(a) + 0.5f;  // 0.5 = 2^-1: ulp 2^-24
    return sign | uint16_t(FloatToBits(v) - FloatToBits(0.5f));
  }
  uint32_t r = a + 0xfffu + ((a >> 13) & 1u) - (112u << 23);
  return sign | uint16_t(r >> 13);
}

inline float LoadAsFloat(const void* base, int64_t i, DType t) {
  switch (t) {
    case DType::kF32: return static_cast<const float*>(base)[i];
    case DType::kF16: return F16ToFloat(static_cast<const uint16_t*>(base)[i]);
    case DType::kBF16: return BF16ToFloat(static_cast<const uint16_t*>(base)[i]);
  }
  return 0.f;
}

inline void StoreFromFloat(void* base, int64_t i, DType t, float v) {
  switch (t) {
    case DType::kF32: static_cast<float*>(base)[i] = v; break;
    case DType::kF16: static_cast<uint16_t*>(base)[i] = FloatToF16(v); break;
    case DType::kBF16: static_cast<uint16_t*>(base)[i] = FloatToBF16(v); break;
  }
}

}  // namespace jax_mla
