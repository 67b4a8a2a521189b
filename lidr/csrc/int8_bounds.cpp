// The int8 screen's bounds on one block of the vocabulary, in one pass (lidr/head.py, Int8Head.upper).
//
// For rows r and the block's tokens j (columns offset + j of the whole vocabulary):
//   out[r, offset + j] = approx[r, j] * t[r] + sum_k left[r, k] * extra[k, offset + j]
// (the int8 product scaled back by the row's activation scale, plus the outlier channels' fp32
// logits and the bound's two terms), and each chunk's largest value into chunk_max[r, chunk].
// PyTorch did this as three passes over the [rows, block] result (mul_, addmm, amax): 6.2 ms of
// a 32-row step against 10.5 ms for the int8 product itself (bench/README.md, round 25).
// These are bounds, not exact logits: the order of the sum may differ from addmm's; the screen's
// slack covers fp32 rounding in any order of these terms (Int8Head.upper).

#include "kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace lidr {
namespace {

// For R rows r: o_r = a_r * scale_r + sum_q l_rq * e_q, on R x 32 columns at a time held in
// registers, so each load of e serves R rows (a fused multiply-add: these are bounds, not exact
// logits, and the more accurate for it).
template <int R>
void bound_rows(float* __restrict o, int64_t os, const float* __restrict a, int64_t as, const float* scale,
                const float* __restrict l, int64_t ls, const float* __restrict e, int64_t es, int64_t k, int64_t n) {
  constexpr int64_t T = 32;
  int64_t j = 0;
  for (; j + T <= n; j += T) {
    float acc[R][T];
    for (int r = 0; r < R; ++r)
      for (int64_t x = 0; x < T; ++x) acc[r][x] = a[r * as + j + x] * scale[r];
    for (int64_t q = 0; q < k; ++q) {
      const float* __restrict eq = e + q * es + j;
      for (int r = 0; r < R; ++r) {
        const float w = l[r * ls + q];
        for (int64_t x = 0; x < T; ++x) acc[r][x] = std::fma(w, eq[x], acc[r][x]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int64_t x = 0; x < T; ++x) o[r * os + j + x] = acc[r][x];
  }
  for (; j < n; ++j) {
    for (int r = 0; r < R; ++r) {
      float acc = a[r * as + j] * scale[r];
      for (int64_t q = 0; q < k; ++q) acc = std::fma(l[r * ls + q], e[q * es + j], acc);
      o[r * os + j] = acc;
    }
  }
}

// the largest of o[0..n), in 16 lanes (so the compiler can vectorize it; max is exact in any order)
float row_max(const float* __restrict o, int64_t n) {
  constexpr int64_t L = 16;
  float lanes[L];
  for (int64_t q = 0; q < L; ++q) lanes[q] = -std::numeric_limits<float>::infinity();
  int64_t j = 0;
  for (; j + L <= n; j += L)
    for (int64_t q = 0; q < L; ++q) lanes[q] = o[j + q] > lanes[q] ? o[j + q] : lanes[q];
  for (; j < n; ++j) lanes[0] = o[j] > lanes[0] ? o[j] : lanes[0];
  float best = lanes[0];
  for (int64_t q = 1; q < L; ++q) best = lanes[q] > best ? lanes[q] : best;
  return best;
}

}  // namespace

void int8_bounds(const torch::Tensor& approx, const c10::optional<torch::Tensor>& t, const torch::Tensor& left,
                 const torch::Tensor& extra, torch::Tensor& out, torch::Tensor& chunk_max, int64_t offset,
                 int64_t chunk) {
  auto f32 = [](const torch::Tensor& x, const char* name) {
    TORCH_CHECK(x.scalar_type() == at::kFloat && x.device().is_cpu() && x.dim() == 2 && x.stride(1) == 1, name,
                " must be a 2D float32 CPU tensor with contiguous rows");
  };
  f32(approx, "approx");
  f32(left, "left");
  f32(extra, "extra");
  f32(out, "out");
  f32(chunk_max, "chunk_max");
  const int64_t rows = approx.size(0), n = approx.size(1), k = left.size(1);
  TORCH_CHECK(left.size(0) == rows && out.size(0) == rows && chunk_max.size(0) == rows, "rows differ");
  TORCH_CHECK(extra.size(0) == k && offset >= 0 && offset + n <= extra.size(1) && offset + n <= out.size(1),
              "the block lies outside extra or out");
  TORCH_CHECK(chunk > 0 && offset % chunk == 0 && (offset + n + chunk - 1) / chunk <= chunk_max.size(1),
              "the block must start at a chunk and its chunks lie in chunk_max");
  const float* tp = nullptr;
  if (t) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == rows && t->device().is_cpu(),
                "t must be [rows] float32 on the CPU");
    tp = t->data_ptr<float>();
  }
  const float* ap = approx.data_ptr<float>();
  const float* lp = left.data_ptr<float>();
  const float* ep = extra.data_ptr<float>() + offset;
  float* op = out.data_ptr<float>() + offset;
  float* mp = chunk_max.data_ptr<float>() + offset / chunk;
  const int64_t as = approx.stride(0), ls = left.stride(0), es = extra.stride(0), os = out.stride(0),
                ms = chunk_max.stride(0);
  const int64_t chunks = (n + chunk - 1) / chunk;
  // a chunk at a time, every row: the chunk's columns of `extra` (k x chunk floats) stay in cache
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t j0 = c * chunk, j1 = std::min(n, j0 + chunk);
      for (int64_t r = 0; r < rows; r += 4) {  // 4 rows at a time, then the 1-3 left
        const int64_t m = std::min<int64_t>(4, rows - r);
        float scale[4];
        for (int64_t i = 0; i < m; ++i) scale[i] = tp ? tp[r + i] : 1.0f;
        float* o = op + r * os + j0;
        const float *a = ap + r * as + j0, *l = lp + r * ls;
        switch (m) {
          case 4: bound_rows<4>(o, os, a, as, scale, l, ls, ep + j0, es, k, j1 - j0); break;
          case 3: bound_rows<3>(o, os, a, as, scale, l, ls, ep + j0, es, k, j1 - j0); break;
          case 2: bound_rows<2>(o, os, a, as, scale, l, ls, ep + j0, es, k, j1 - j0); break;
          default: bound_rows<1>(o, os, a, as, scale, l, ls, ep + j0, es, k, j1 - j0);
        }
        for (int64_t i = 0; i < m; ++i) mp[(r + i) * ms + c] = row_max(o + i * os, j1 - j0);
      }
    }
  });
}

// Int8Head.upper's preparation of rows h [rows, d] (bf16 or float32) for oneDNN's int8 product, in
// one pass a row: h_rest = h with the outlier channels zeroed; the row's activation scale
// t = max|h_rest| / 127 (at least the smallest normal float); qx = round(h_rest / t) + 128 as
// uint8; left = [h's outlier channels, t / 2 * margin, (|h_rest|_1 + d_rest t / 2) / 2 * margin]
// for the fp32 product; slack = slack_norm |h| + slack_t t. PyTorch took about 20 operator calls
// for this. The quantized values are computed as PyTorch computed them; the sums may be added in
// another order, which the margin covers.
std::vector<torch::Tensor> int8_prepare(const torch::Tensor& h, const torch::Tensor& outliers, double margin,
                                        int64_t d_rest, double slack_norm, double slack_t) {
  TORCH_CHECK(h.dim() == 2 && h.is_contiguous() && h.device().is_cpu() &&
                  (h.scalar_type() == at::kFloat || h.scalar_type() == at::kBFloat16),
              "h must be a contiguous 2D float32 or bfloat16 CPU tensor");
  TORCH_CHECK(outliers.scalar_type() == at::kLong && outliers.dim() == 1 && outliers.is_contiguous() &&
                  outliers.device().is_cpu(),
              "outliers must be a contiguous int64 CPU vector");
  const int64_t rows = h.size(0), d = h.size(1), k = outliers.numel();
  const int64_t* op = outliers.data_ptr<int64_t>();
  std::vector<uint8_t> is_outlier(d, 0);
  for (int64_t i = 0; i < k; ++i) {
    TORCH_CHECK(op[i] >= 0 && op[i] < d, "outlier channel ", op[i], " out of range");
    is_outlier[op[i]] = 1;
  }
  auto f = h.options().dtype(at::kFloat);
  auto qx = torch::empty({rows, d}, h.options().dtype(at::kByte));
  auto t = torch::empty({rows, 1}, f), left = torch::empty({rows, k + 2}, f), slack = torch::empty({rows}, f);
  const bool bf = h.scalar_type() == at::kBFloat16;
  const void* hp = h.data_ptr();
  uint8_t* qp = qx.data_ptr<uint8_t>();
  float *tp = t.data_ptr<float>(), *lp = left.data_ptr<float>(), *sp = slack.data_ptr<float>();
  const float m = static_cast<float>(margin);
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> x(d);
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t j = 0; j < d; ++j) {
        x[j] = bf ? widen(static_cast<const bits*>(hp)[r * d + j]) : static_cast<const float*>(hp)[r * d + j];
      }
      double squares = 0, l1 = 0;
      float amax = 0.f;
      for (int64_t j = 0; j < d; ++j) {
        squares += static_cast<double>(x[j]) * x[j];
        if (is_outlier[j]) continue;
        const float a = std::fabs(x[j]);
        l1 += a;
        amax = a > amax ? a : amax;
      }
      const float scale = std::max(amax / 127.0f, std::numeric_limits<float>::min());
      uint8_t* q = qp + r * d;
      for (int64_t j = 0; j < d; ++j)
        q[j] = is_outlier[j] ? uint8_t(128) : static_cast<uint8_t>(std::nearbyint(x[j] / scale) + 128.0f);
      float* l = lp + r * (k + 2);
      for (int64_t i = 0; i < k; ++i) l[i] = x[op[i]];
      l[k] = scale / 2 * m;
      l[k + 1] = (static_cast<float>(l1) + static_cast<float>(d_rest) * scale / 2) / 2 * m;
      tp[r] = scale;
      sp[r] = static_cast<float>(slack_norm * std::sqrt(squares) + slack_t * scale);
    }
  });
  return {qx, t, left, slack};
}

}  // namespace lidr
