// lidr's CPU kernels (built by lidr/kernels.py): what each computes is said where it is defined.
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <cstring>

#include <tuple>
#include <vector>

namespace lidr {

// bf16 values as their bit patterns: widening is exact; narrowing rounds to nearest even, as
// c10::BFloat16 and ATen's conversions do (a NaN becomes 0x7FC0, where ATen's vectorized
// conversion writes 0xFFFF: a NaN either way). Plain bit operations, so loops vectorize.
using bits = uint16_t;

inline float widen(bits b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
}

inline bits narrow(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  const bits r = static_cast<bits>((u + UINT32_C(0x7FFF) + ((u >> 16) & 1)) >> 16);
  return x != x ? bits(0x7FC0) : r;
}

// gemma3_ops.cpp: Gemma 3's small per-layer operators, with the eager operators' bits
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& scale, double eps, int64_t lanes);
std::vector<torch::Tensor> add_norm(const torch::Tensor& h, const torch::Tensor& x, const torch::Tensor& scale,
                                    double eps, const c10::optional<torch::Tensor>& scale2, double eps2,
                                    int64_t lanes);
torch::Tensor norm_rope(const torch::Tensor& x, int64_t heads, const torch::Tensor& scale, double eps,
                        const torch::Tensor& cos, const torch::Tensor& sin, int64_t lanes);
std::tuple<torch::Tensor, bool> act_mul(const torch::Tensor& gate, const torch::Tensor& up,
                                        const torch::Tensor& table, const torch::Tensor& ambiguous);
torch::Tensor row_sum(const torch::Tensor& x, int64_t lanes);

// int8_bounds.cpp: the int8 screen's bounds on a block of the vocabulary (lidr/head.py)
void int8_bounds(const torch::Tensor& approx, const c10::optional<torch::Tensor>& t, const torch::Tensor& left,
                 const torch::Tensor& extra, torch::Tensor& out, torch::Tensor& chunk_max, int64_t offset,
                 int64_t chunk);
std::vector<torch::Tensor> int8_prepare(const torch::Tensor& h, const torch::Tensor& outliers, double margin,
                                        int64_t d_rest, double slack_norm, double slack_t);

}  // namespace lidr
