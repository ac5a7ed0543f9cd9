// The padded plan's attention probabilities on a CPU, one op per query chunk: the scores GEMM on
// oneDNN's brgemm micro-kernel (bf16 x bf16 -> fp32, or fp32), then scale, mask and softmax on each
// tile of 32 query rows while it is in cache, written once in the values' dtype.
//
// torch has no bf16 GEMM with an fp32 output on a CPU (torch.bmm rounds bf16 scores to bf16), so
// before this op the bf16 engine upcast q and k and ran the scores GEMM in fp32 (MKL, ~155 GFLOPS on
// the 2-core Zen 5 of docs/benchmarks.md) where oneDNN's bf16 brgemm runs at ~370. Built and loaded by
// pipeline/rerank/backends/hf/native.py; only at::native::cpublas::brgemm (exported by libtorch_cpu)
// and ATen's vectorized float math are used.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <limits>
#include <type_traits>
#include <vector>

namespace {
constexpr int64_t kRows = 32;  // query rows per task (the queries buffer is padded to a multiple)
constexpr int64_t kKeys = 64;  // keys per tile of the packed keys
using Vec = at::vec::Vectorized<float>;

inline void store_probs(at::BFloat16* o, const float* x, float inv, int64_t h) {
  const Vec vi(inv);
  int64_t j = 0;
  for (; j + 2 * Vec::size() <= h; j += 2 * Vec::size()) {
    auto lo = Vec::loadu(x + j) * vi, hi = Vec::loadu(x + j + Vec::size()) * vi;
    at::vec::convert_float_bfloat16(lo, hi).store(o + j);
  }
  for (; j < h; ++j) o[j] = c10::BFloat16(x[j] * inv);
}

inline void store_probs(float* o, const float* x, float inv, int64_t h) {
  const Vec vi(inv);
  int64_t j = 0;
  for (; j + Vec::size() <= h; j += Vec::size()) (Vec::loadu(x + j) * vi).store(o + j);
  for (; j < h; ++j) o[j] = x[j] * inv;
}

// softmax(x * scale + bias) over x[0, h), in place, then stored as probabilities into o.
template <typename S>
inline void softmax_row(float* x, const float* bias, float scale, int64_t h, S* o) {
  const Vec vsc(scale);
  Vec vmax(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + Vec::size() <= h; j += Vec::size()) {
    Vec v = at::vec::fmadd(Vec::loadu(x + j), vsc, Vec::loadu(bias + j));
    v.store(x + j);
    vmax = at::vec::maximum(vmax, v);
  }
  float mx = at::vec::vec_reduce_all<float>(
      [](Vec& p, Vec& q) { return at::vec::maximum(p, q); }, vmax);
  for (; j < h; ++j) {
    x[j] = x[j] * scale + bias[j];
    mx = std::max(mx, x[j]);
  }
  const Vec vm(mx);
  Vec vsum(0.f);
  j = 0;
  for (; j + Vec::size() <= h; j += Vec::size()) {
    Vec v = (Vec::loadu(x + j) - vm).exp_u20();
    v.store(x + j);
    vsum = vsum + v;
  }
  float sum = at::vec::vec_reduce_all<float>([](Vec& p, Vec& q) { return p + q; }, vsum);
  for (; j < h; ++j) {
    x[j] = std::exp(x[j] - mx);
    sum += x[j];
  }
  store_probs(o, x, 1.f / sum, h);
}

// q: [B, MP, D] (B = rows x kv_heads; m real rows: the `group` query heads of a KV head stacked, n
// queries each, query i of a head at position a + i); keys: [B, T, D/2, 64, 2] bf16 (VNNI) or
// [B, T, D, 64] fp32, zero past the last key; bias: [rows, Q, K] fp32 additive mask (0 or -inf).
// Returns the probabilities [B, m, horizon] over the first `horizon` keys.
template <typename S>
at::Tensor probs_impl(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& bias,
                      int64_t m, int64_t n, int64_t a, int64_t horizon, double scale) {
  constexpr bool vnni = std::is_same_v<S, at::BFloat16>;
  TORCH_CHECK(keys.scalar_type() == q.scalar_type() && bias.scalar_type() == at::kFloat,
              "grouped_probs: keys in the queries' dtype, an fp32 bias");
  TORCH_CHECK(q.dim() == 3 && keys.dim() == (vnni ? 5 : 4) && bias.dim() == 3,
              "grouped_probs: q [B, MP, D], packed keys, bias [rows, Q, K]");
  TORCH_CHECK(q.is_contiguous() && keys.is_contiguous() && bias.is_contiguous(),
              "grouped_probs: contiguous inputs");
  const int64_t B = q.size(0), MP = q.size(1), D = q.size(2), T = keys.size(1);
  const int64_t R = bias.size(0), Q = bias.size(1), K = bias.size(2);
  const int64_t tiles = (horizon + kKeys - 1) / kKeys, ldc = tiles * kKeys;
  TORCH_CHECK(MP % kRows == 0 && m > 0 && m <= MP && n > 0 && m % n == 0 && a >= 0 &&
                  a + n <= Q && horizon > 0 && horizon <= K && tiles <= T && R > 0 && B % R == 0,
              "grouped_probs: inconsistent sizes");
  TORCH_CHECK(keys.size(2) * (vnni ? 2 : 1) == D && keys.size(3) == kKeys,
              "grouped_probs: keys not packed in tiles of 64");
  const int64_t kv_heads = B / R, mtiles = (m + kRows - 1) / kRows;
  auto out = at::empty({B, m, horizon}, q.options());
  const S* qd = q.data_ptr<S>();
  const S* kd = keys.data_ptr<S>();
  const float* bd = bias.data_ptr<float>();
  S* od = out.data_ptr<S>();
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, B * mtiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(kRows * ldc);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / mtiles, mt = task % mtiles, r = b / kv_heads;
      for (int64_t t = 0; t < tiles; ++t) {
        at::native::cpublas::brgemm(kRows, kKeys, D, D, kKeys, ldc, false,
                                    qd + (b * MP + mt * kRows) * D, kd + (b * T + t) * D * kKeys,
                                    buf.data() + t * kKeys, vnni);
      }
      for (int64_t i = 0; i < kRows && mt * kRows + i < m; ++i) {
        const int64_t row = mt * kRows + i;
        softmax_row(buf.data() + i * ldc, bd + (r * Q + a + row % n) * K, sc, horizon,
                    od + (b * m + row) * horizon);
      }
    }
    at::native::cpublas::brgemm_release(vnni);
  });
  return out;
}

at::Tensor grouped_probs(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& bias,
                         int64_t m, int64_t n, int64_t a, int64_t horizon, double scale) {
  if (q.scalar_type() == at::kBFloat16) {
    return probs_impl<at::BFloat16>(q, keys, bias, m, n, a, horizon, scale);
  }
  TORCH_CHECK(q.scalar_type() == at::kFloat, "grouped_probs: bf16 or fp32 queries");
  return probs_impl<float>(q, keys, bias, m, n, a, horizon, scale);
}
}  // namespace

TORCH_LIBRARY(winnow, lib) {
  lib.def(
      "grouped_probs(Tensor q, Tensor keys, Tensor bias, int m, int n, int a, int horizon, "
      "float scale) -> Tensor",
      grouped_probs);
}
