// Gemma 3's small per-layer operators, fused: the same arithmetic as the eager PyTorch ops they
// replace (lidr/backends/gemma3_body.py), bit for bit, in one pass each.
//
// Eager bf16 PyTorch rounds every operator's result: each op converts its bf16 inputs to fp32,
// computes, and rounds to bf16 (round to nearest even). The loops below do the same, op by op,
// in the same order, so their results are the same bits; only the Python calls, the allocations
// and the passes over memory between the ops are gone. The one reduction, the norm's mean of
// squares, follows ATen's own summation order (`aten_row_sum`). Built with -ffp-contract=off so
// the compiler does not fuse a product and a sum into one rounding.
//
// The decoder checks the body's output against transformers' on a probe before it uses this
// (lidr/backends/decode.py, `_fast_body_matches`); tests/test_kernels.py compares each kernel
// against the eager ops on random and adversarial inputs.

#include "kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <vector>

namespace lidr {
namespace {

inline const bits* in(const torch::Tensor& t) { return reinterpret_cast<const bits*>(t.data_ptr<at::BFloat16>()); }
inline bits* out_of(torch::Tensor& t) { return reinterpret_cast<bits*>(t.data_ptr<at::BFloat16>()); }

// ATen's CPU sum of n contiguous floats (SumKernel.cpp: cascade_sum -> vectorized_inner_sum ->
// row_sum -> multi_row_sum) with vectors of `lanes` floats (16 with AVX-512, 8 with AVX2 and the
// default build): 4 vector accumulators over the row, cascaded in levels, added together, then
// the scalar tail and the lanes one by one. Written with plain arrays: without -ffast-math the
// compiler keeps this order.
template <int W>
float aten_row_sum_w(const float* x, int64_t n) {
  const int64_t vec_size = n / W;
  // row_sum over vectors: the row seen as [vec_size / 4, 4] vectors
  constexpr int64_t ilp = 4, levels = 4;
  const int64_t size = vec_size / ilp;
  int64_t ceil_log2 = 1;
  if (size > 2) {
    ceil_log2 = 64 - __builtin_clzll(static_cast<uint64_t>(size) - 1);
  }
  const int64_t level_power = std::max<int64_t>(4, ceil_log2 / levels);
  const int64_t level_step = int64_t(1) << level_power;
  const int64_t level_mask = level_step - 1;
  float acc[levels][ilp][W];
  std::memset(acc, 0, sizeof(acc));
  auto add_vec = [](float* a, const float* b) {
    for (int l = 0; l < W; ++l) a[l] += b[l];
  };
  int64_t i = 0;
  for (; i + level_step <= size;) {
    for (int64_t j = 0; j < level_step; ++j, ++i) {
      for (int64_t k = 0; k < ilp; ++k) add_vec(acc[0][k], x + (i * ilp + k) * W);
    }
    for (int64_t j = 1; j < levels; ++j) {
      for (int64_t k = 0; k < ilp; ++k) {
        add_vec(acc[j][k], acc[j - 1][k]);
        std::memset(acc[j - 1][k], 0, sizeof(acc[j - 1][k]));
      }
      if ((i & (level_mask << (j * level_power))) != 0) break;
    }
  }
  for (; i < size; ++i) {
    for (int64_t k = 0; k < ilp; ++k) add_vec(acc[0][k], x + (i * ilp + k) * W);
  }
  for (int64_t j = 1; j < levels; ++j) {
    for (int64_t k = 0; k < ilp; ++k) add_vec(acc[0][k], acc[j][k]);
  }
  // row_sum: the vectors past the last group of 4, then the 4 accumulators into the first
  for (int64_t v = size * ilp; v < vec_size; ++v) add_vec(acc[0][0], x + v * W);
  for (int64_t k = 1; k < ilp; ++k) add_vec(acc[0][0], acc[0][k]);
  // vectorized_inner_sum: the scalar tail, then the lanes
  float total = 0.f;
  for (int64_t k = vec_size * W; k < n; ++k) total += x[k];
  for (int l = 0; l < W; ++l) total += acc[0][0][l];
  return total;
}

float aten_row_sum(const float* x, int64_t n, int64_t lanes) {
  // a row shorter than a vector: ATen sums it with scalar loads (scalar_inner_sum), which is the
  // same cascade over 1-lane "vectors" (its result lands in a zeroed output: 0 + sum, as here)
  if (n < lanes || lanes == 1) return aten_row_sum_w<1>(x, n);
  return lanes == 16 ? aten_row_sum_w<16>(x, n) : aten_row_sum_w<8>(x, n);
}

// Gemma3RMSNorm as lidr's _Norm computes it, for one row of n bf16 values:
// y = float(x); y * rsqrt(mean(y^2) + eps) * scale, rounded to bf16. `sq` is scratch for n floats.
inline void norm_row(const bits* x, const float* scale, float eps, int64_t n, int64_t lanes, float* sq,
                     bits* out) {
  for (int64_t d = 0; d < n; ++d) {
    const float y = widen(x[d]);
    sq[d] = y * y;  // pow(2)
  }
  const float mean = aten_row_sum(sq, n, lanes) / static_cast<float>(n);  // mean = sum(...).div_(n)
  const float r = 1.0f / std::sqrt(mean + eps);                              // rsqrt(mean + eps)
  for (int64_t d = 0; d < n; ++d) {
    const float t = widen(x[d]) * r;
    out[d] = narrow(t * scale[d]);
  }
}

void check(const torch::Tensor& t, int64_t dim, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kBFloat16, name, " must be bfloat16");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.dim() == dim, name, " must have ", dim, " dimensions");
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU");
}

void check_scale(const torch::Tensor& scale, int64_t n) {
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.numel() == n &&
                  scale.device().is_cpu(),
              "scale must be a contiguous float32 CPU vector of ", n);
}

void check_lanes(int64_t lanes) { TORCH_CHECK(lanes == 8 || lanes == 16, "lanes must be 8 or 16"); }

int64_t grain(int64_t width) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(width, 1)); }

}  // namespace

// norm(x): x [rows, n]
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& scale, double eps, int64_t lanes) {
  check(x, 2, "x");
  check_lanes(lanes);
  const int64_t rows = x.size(0), n = x.size(1);
  check_scale(scale, n);
  auto out = torch::empty_like(x);
  const bits* xp = in(x);
  const float* sp = scale.data_ptr<float>();
  bits* op = out_of(out);
  at::parallel_for(0, rows, grain(n), [&](int64_t begin, int64_t end) {
    std::vector<float> sq(n);
    for (int64_t r = begin; r < end; ++r) norm_row(xp + r * n, sp, float(eps), n, lanes, sq.data(), op + r * n);
  });
  return out;
}

// h + norm(x), and with `scale2` also norm2 of that sum: (h2, norm2(h2)). h, x [rows, n].
std::vector<torch::Tensor> add_norm(const torch::Tensor& h, const torch::Tensor& x, const torch::Tensor& scale,
                                    double eps, const c10::optional<torch::Tensor>& scale2, double eps2,
                                    int64_t lanes) {
  check(h, 2, "h");
  check(x, 2, "x");
  check_lanes(lanes);
  TORCH_CHECK(h.sizes() == x.sizes(), "h and x must have the same shape");
  const int64_t rows = x.size(0), n = x.size(1);
  check_scale(scale, n);
  if (scale2) check_scale(*scale2, n);
  auto sum = torch::empty_like(h);
  auto normed = scale2 ? torch::empty_like(h) : torch::Tensor();
  const bits* hp = in(h);
  const bits* xp = in(x);
  const float* sp = scale.data_ptr<float>();
  const float* s2p = scale2 ? scale2->data_ptr<float>() : nullptr;
  bits* op = out_of(sum);
  bits* np = scale2 ? out_of(normed) : nullptr;
  at::parallel_for(0, rows, grain(n), [&](int64_t begin, int64_t end) {
    std::vector<float> sq(n);
    std::vector<bits> nx(n);
    for (int64_t r = begin; r < end; ++r) {
      norm_row(xp + r * n, sp, float(eps), n, lanes, sq.data(), nx.data());
      for (int64_t d = 0; d < n; ++d) op[r * n + d] = narrow(widen(hp[r * n + d]) + widen(nx[d]));  // h + norm(x)
      if (s2p) norm_row(op + r * n, s2p, float(eps2), n, lanes, sq.data(), np + r * n);
    }
  });
  if (scale2) return {sum, normed};
  return {sum};
}

// The per-head norm and rotary embedding of a query or key projection: x [tokens, heads * dim]
// (the linear layer's output, tokens = rows * positions), cos and sin [tokens, dim]:
// for each head, z = norm(x_head); z * cos + rotate_half(z) * sin, where
// rotate_half(z) = cat(-z[half:], z[:half]). Each product and the sum rounded to bf16.
// The result is laid out as x, as the eager ops leave it: its view [rows, positions, heads, dim]
// transposed to [rows, heads, positions, dim] is theirs, strides and all.
torch::Tensor norm_rope(const torch::Tensor& x, int64_t heads, const torch::Tensor& scale, double eps,
                        const torch::Tensor& cos, const torch::Tensor& sin, int64_t lanes) {
  check(x, 2, "x");
  check(cos, 2, "cos");
  check(sin, 2, "sin");
  check_lanes(lanes);
  const int64_t tokens = x.size(0);
  TORCH_CHECK(heads > 0 && x.size(1) % heads == 0, "x's width must be a multiple of heads");
  const int64_t dim = x.size(1) / heads, half = dim / 2;
  TORCH_CHECK(dim % 2 == 0, "head size must be even");
  TORCH_CHECK(cos.size(0) == tokens && cos.size(1) == dim && sin.sizes() == cos.sizes(),
              "cos and sin must be [tokens, head size]");
  check_scale(scale, dim);
  auto out = torch::empty_like(x);
  const bits* xp = in(x);
  const bits* cp = in(cos);
  const bits* snp = in(sin);
  const float* sp = scale.data_ptr<float>();
  bits* op = out_of(out);
  at::parallel_for(0, tokens * heads, grain(dim), [&](int64_t begin, int64_t end) {
    std::vector<float> sq(dim);
    std::vector<bits> z(dim);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t t = i / heads;  // x's row i of heads: a head of token t
      norm_row(xp + i * dim, sp, float(eps), dim, lanes, sq.data(), z.data());
      const bits* c = cp + t * dim;
      const bits* s = snp + t * dim;
      bits* o = op + i * dim;
      for (int64_t d = 0; d < half; ++d)  // rotate_half(z)[d] = -z[d + half]
        o[d] = narrow(widen(narrow(widen(z[d]) * widen(c[d]))) + widen(narrow(-widen(z[d + half]) * widen(s[d]))));
      for (int64_t d = half; d < dim; ++d)  // rotate_half(z)[d] = z[d - half]
        o[d] = narrow(widen(narrow(widen(z[d]) * widen(c[d]))) + widen(narrow(widen(z[d - half]) * widen(s[d]))));
    }
  });
  return out;
}

// act(gate) * up, the activation read from `table` (float32): its value for each of the 65,536
// bf16 bit patterns, computed by the model's own activation (so the same bits by construction).
// Where ATen's activation gives one input two values, one in its vectorized loop and another in
// its scalar loop (gelu's tanh at 4 of the 65,536 values: bench/README.md, round 25), which one
// an element gets depends on where the threads' chunks end; `ambiguous` marks those inputs, and
// the second result says whether any gate held one: the caller then runs the eager operators.
std::tuple<torch::Tensor, bool> act_mul(const torch::Tensor& gate, const torch::Tensor& up,
                                        const torch::Tensor& table, const torch::Tensor& ambiguous) {
  check(gate, 2, "gate");
  check(up, 2, "up");
  TORCH_CHECK(gate.sizes() == up.sizes(), "gate and up must have the same shape");
  TORCH_CHECK(table.scalar_type() == at::kFloat && table.is_contiguous() && table.numel() == 65536 &&
                  table.device().is_cpu(),
              "table must be 65536 contiguous float32 CPU values");
  TORCH_CHECK(ambiguous.scalar_type() == at::kByte && ambiguous.is_contiguous() && ambiguous.numel() == 65536 &&
                  ambiguous.device().is_cpu(),
              "ambiguous must be 65536 contiguous uint8 CPU values");
  auto out = torch::empty_like(gate);
  const bits* gp = in(gate);
  const bits* up_p = in(up);
  const float* tp = table.data_ptr<float>();
  const uint8_t* amb = ambiguous.data_ptr<uint8_t>();
  bits* op = out_of(out);
  const int64_t n = gate.numel();
  std::atomic<bool> hit{false};
  at::parallel_for(0, n, 32768, [&](int64_t begin, int64_t end) {
    uint8_t any = 0;
    for (int64_t i = begin; i < end; ++i) {
      op[i] = narrow(tp[gp[i]] * widen(up_p[i]));
      any |= amb[gp[i]];
    }
    if (any) hit = true;
  });
  return {out, hit.load()};
}

// ATen's sum of each row of x [rows, n] (float32) in the order `aten_row_sum` assumes with
// `lanes`: for finding, once per process, which vector width this build of ATen sums with.
torch::Tensor row_sum(const torch::Tensor& x, int64_t lanes) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() == 2 && x.device().is_cpu(),
              "x must be a contiguous 2D float32 CPU tensor");
  TORCH_CHECK(lanes == 1 || lanes == 8 || lanes == 16, "lanes must be 1, 8 or 16");
  auto out = torch::empty({x.size(0)}, x.options());
  for (int64_t r = 0; r < x.size(0); ++r)
    out.data_ptr<float>()[r] = aten_row_sum(x.data_ptr<float>() + r * x.size(1), x.size(1), lanes);
  return out;
}

}  // namespace lidr
