// The padded plan's attention on a CPU in one op per layer: for each tile of 16 queries of one head,
// the scores GEMM on oneDNN's brgemm micro-kernel (bf16 x bf16 -> fp32, or fp32), scale and softmax
// while the tile is in cache, the probabilities x values GEMM on brgemm again, and the output written
// once, packed, in the layout the o_proj reads.
//
// torch has no bf16 GEMM with an fp32 output on a CPU (torch.bmm rounds bf16 scores to bf16), so
// before this op the bf16 engine upcast q and k and ran the scores GEMM in fp32 (MKL, ~155 GFLOPS on
// the 2-core Zen 5 of docs/benchmarks.md) where oneDNN's bf16 brgemm runs at ~370; in fp32 MKL ran
// both GEMMs at that rate. Built and loaded by pipeline/rerank/backends/hf/native.py; only
// at::native::cpublas::brgemm (exported by libtorch_cpu) and ATen's vectorized float math are used.
// brgemm keeps one generated kernel per shape and leading dimensions: M = 16, N = 16-64 or the head
// dim, K = the head dim or 16-64, and a row width of a multiple of 64 keys, so at most a few hundred.
// Tiles of 16 queries ran the reranker's layer shapes 2-8% faster than 32 (less work past the causal
// horizon, a score tile that stays in L1; 8 and 24 were no better; docs/benchmarks.md).
//
// The padded plan's masks have one form (a row's head, left-padded, then causal over its tail), so
// the op takes each row's first visible key and its count of real queries instead of a mask: no
// mask is read per score, a tile of padding queries is skipped, the keys past a tile's causal horizon
// are cut to a multiple of 16 (not 64), a head's whole tiles of padding are skipped, and the output
// is written packed (no gather after it): 10-15% less time than with an fp32 mask on the reranker's
// shapes (docs/benchmarks.md).
//
// pack writes a layer's keys or values into the tiles the op reads, from the cached head's part and
// this forward's part in one pass: before it, a concatenation, a zero fill, a copy and a transpose
// took ~13% of the attention's time.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace {
constexpr int64_t kRows = 16;  // queries per task, one head (a shorter last tile is zero-padded)
constexpr int64_t kKeys = 64;  // keys per tile of the packed keys and values
using Vec = at::vec::Vectorized<float>;

inline void store_scaled(at::BFloat16* o, const float* x, float inv, int64_t h) {
  const Vec vi(inv);
  int64_t j = 0;
  for (; j + 2 * Vec::size() <= h; j += 2 * Vec::size()) {
    auto lo = Vec::loadu(x + j) * vi, hi = Vec::loadu(x + j + Vec::size()) * vi;
    at::vec::convert_float_bfloat16(lo, hi).store(o + j);
  }
  for (; j < h; ++j) o[j] = c10::BFloat16(x[j] * inv);
}

inline void store_scaled(float* o, const float* x, float inv, int64_t h) {
  const Vec vi(inv);
  int64_t j = 0;
  for (; j + Vec::size() <= h; j += Vec::size()) (Vec::loadu(x + j) * vi).store(o + j);
  for (; j < h; ++j) o[j] = x[j] * inv;
}

// Row i of a tile: keys [lo, hi) visible (lo: the row's first key, hi: its causal horizon), the tile
// computed over [begin, end) ⊇ [lo, hi). Probabilities softmax(x * scale) over [lo, hi) into
// o[lo, hi), zeros in o[begin, lo) and o[hi, end): no mask is read, none is stored.
template <typename S>
inline void softmax_row(float* x, float scale, int64_t begin, int64_t lo, int64_t hi, int64_t end,
                        S* o) {
  std::fill(o + begin, o + lo, S(0));
  std::fill(o + hi, o + end, S(0));
  if (hi <= lo) {  // no key visible: no attention
    std::fill(o + lo, o + hi, S(0));
    return;
  }
  Vec vmax(-std::numeric_limits<float>::infinity());
  int64_t j = lo;
  for (; j + Vec::size() <= hi; j += Vec::size()) vmax = at::vec::maximum(vmax, Vec::loadu(x + j));
  float mx = at::vec::vec_reduce_all<float>(
      [](Vec& p, Vec& q) { return at::vec::maximum(p, q); }, vmax);
  for (; j < hi; ++j) mx = std::max(mx, x[j]);
  // exp((x - max) * scale): the max of the scaled scores is the scaled max (scale > 0)
  const Vec vsc(scale), vms(-mx * scale);
  Vec vsum(0.f);
  j = lo;
  for (; j + Vec::size() <= hi; j += Vec::size()) {
    Vec v = at::vec::fmadd(Vec::loadu(x + j), vsc, vms).exp_u20();
    v.store(x + j);
    vsum = vsum + v;
  }
  float sum = at::vec::vec_reduce_all<float>([](Vec& p, Vec& q) { return p + q; }, vsum);
  for (; j < hi; ++j) {
    x[j] = std::exp(x[j] * scale - mx * scale);
    sum += x[j];
  }
  store_scaled(o + lo, x + lo, 1.f / sum, hi - lo);
}

// Keys [b, t*64 + j] = past[b, j'] for j' < P, else fresh[b, j' - P], zero from P + N on; b = r*KV + h.
// bf16 keys [B, T, D/2, 64, 2] (VNNI: a pair along D as one 32-bit word, 64 keys per row), values
// [B, T, 32, D, 2] (a pair of consecutive keys per D); fp32 keys [B, T, D, 64], values [B, T, 64, D].
template <typename S>
void pack_impl(const at::Tensor& past, const at::Tensor& fresh, const at::Tensor& out, bool values) {
  const int64_t R = fresh.size(0), KV = fresh.size(1), N = fresh.size(2), D = fresh.size(3);
  const int64_t P = past.size(2), T = out.size(1), L = P + N;
  const S* pd = past.data_ptr<S>();
  const S* fd = fresh.data_ptr<S>();
  S* od = out.data_ptr<S>();
  const auto ps = past.strides(), fs = fresh.strides();
  const int64_t tile = kKeys * D;  // elements per packed tile
  at::parallel_for(0, R * KV * T, 1, [&](int64_t begin, int64_t end) {
    std::vector<S> zero(D, S(0));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / T, t = task % T, r = b / KV, h = b % KV;
      S* o = od + task * tile;
      const S* rows[kKeys];
      for (int64_t jj = 0; jj < kKeys; ++jj) {
        const int64_t j = t * kKeys + jj;
        rows[jj] = j < P   ? pd + r * ps[0] + h * ps[1] + j * ps[2]
                   : j < L ? fd + r * fs[0] + h * fs[1] + (j - P) * fs[2]
                           : zero.data();
      }
      if constexpr (std::is_same_v<S, at::BFloat16>) {
        if (values) {  // [32, D, 2]
          for (int64_t jp = 0; jp < kKeys / 2; ++jp) {
            const S* a = rows[2 * jp];
            const S* c = rows[2 * jp + 1];
            S* w = o + jp * D * 2;
            for (int64_t d = 0; d < D; ++d) {
              w[2 * d] = a[d];
              w[2 * d + 1] = c[d];
            }
          }
        } else {  // [D/2, 64] words
          auto* w = reinterpret_cast<uint32_t*>(o);
          for (int64_t jj = 0; jj < kKeys; ++jj) {
            const auto* a = reinterpret_cast<const uint32_t*>(rows[jj]);
            for (int64_t d2 = 0; d2 < D / 2; ++d2) w[d2 * kKeys + jj] = a[d2];
          }
        }
      } else {
        if (values) {  // [64, D]
          for (int64_t jj = 0; jj < kKeys; ++jj) std::memcpy(o + jj * D, rows[jj], D * sizeof(S));
        } else {  // [D, 64]
          for (int64_t jj = 0; jj < kKeys; ++jj) {
            const S* a = rows[jj];
            for (int64_t d = 0; d < D; ++d) o[d * kKeys + jj] = a[d];
          }
        }
      }
    }
  });
}

void pack(const at::Tensor& past, const at::Tensor& fresh, const at::Tensor& out, bool values) {
  const bool bf16 = fresh.scalar_type() == at::kBFloat16;
  TORCH_CHECK(bf16 || fresh.scalar_type() == at::kFloat, "pack: bf16 or fp32");
  TORCH_CHECK(past.scalar_type() == fresh.scalar_type() && out.scalar_type() == fresh.scalar_type(),
              "pack: past, fresh and out of one dtype");
  TORCH_CHECK(past.dim() == 4 && fresh.dim() == 4 && out.is_contiguous(), "pack: ranks, out");
  TORCH_CHECK(past.stride(3) == 1 && fresh.stride(3) == 1, "pack: the head dim contiguous");
  const int64_t R = fresh.size(0), KV = fresh.size(1), D = fresh.size(3);
  TORCH_CHECK(past.size(0) == R && past.size(1) == KV && past.size(3) == D && D % 2 == 0,
              "pack: past [rows, kv_heads, keys, dim] as fresh");
  const int64_t L = past.size(2) + fresh.size(2), T = (L + kKeys - 1) / kKeys;
  TORCH_CHECK(out.size(0) == R * KV && out.size(1) == T && out.numel() == R * KV * T * kKeys * D,
              "pack: out [rows * kv_heads, tiles of 64 keys, ...]");
  if (bf16) return pack_impl<at::BFloat16>(past, fresh, out, values);
  return pack_impl<float>(past, fresh, out, values);
}

// q [R, H, Q, D]; keys [R*KV, T, D/2, 64, 2] (bf16, VNNI pairs) or [R*KV, T, D, 64] (fp32), values
// [R*KV, T, 32, D, 2] or [R*KV, T, 64, D], both zero past the last key; L keys per row, the last Q
// of them this forward's. Query i of row r (i < lens[r]; the rest are padding, not computed) sees
// keys [first[r], L - Q + i]: a left-padded head, then causal. out [sum(lens), H, D]: row r's
// queries packed from sum(lens[:r]) on, the layout the o_proj reads.
template <typename S>
void attend_impl(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                 const at::Tensor& first, const at::Tensor& lens, int64_t L,
                 const at::Tensor& out, double scale) {
  constexpr bool vnni = std::is_same_v<S, at::BFloat16>;
  const int64_t R = q.size(0), H = q.size(1), Q = q.size(2), D = q.size(3);
  const int64_t B = keys.size(0), T = keys.size(1), KV = B / R, G = H / KV;
  const int64_t offset = L - Q;
  const int64_t qtiles = (Q + kRows - 1) / kRows, width = T * kKeys;
  const S* qd = q.data_ptr<S>();
  const S* kd = keys.data_ptr<S>();
  const S* vd = values.data_ptr<S>();
  const int64_t* fd = first.data_ptr<int64_t>();
  const int64_t* ld = lens.data_ptr<int64_t>();
  std::vector<int64_t> start(R + 1, 0);
  for (int64_t r = 0; r < R; ++r) start[r + 1] = start[r] + ld[r];
  S* od = out.data_ptr<S>();
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, R * H * qtiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> sbuf(kRows * width), cbuf(kRows * D);
    std::vector<S> pbuf(vnni ? kRows * width : 0), abuf(kRows * D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task / (H * qtiles), h = (task / qtiles) % H, qt = task % qtiles;
      const int64_t i0 = qt * kRows, rows = std::min(kRows, ld[r] - i0);
      if (rows <= 0) continue;  // a tile of padding
      // keys [lo, hi) cover the tile's visible keys: whole 64-key tiles from lo, the last one cut
      // to a multiple of 16 keys past the causal horizon
      const int64_t lo = fd[r], horizon = offset + i0 + rows;
      const int64_t t0 = lo / kKeys, tiles = (horizon + kKeys - 1) / kKeys;
      const int64_t hi = std::min((horizon + 15) / 16 * 16, width);
      const int64_t b = r * KV + h / G;
      const S* a = qd + ((r * H + h) * Q + i0) * D;
      if (rows < kRows) {
        std::memcpy(abuf.data(), a, rows * D * sizeof(S));
        std::fill(abuf.begin() + rows * D, abuf.end(), S(0));
        a = abuf.data();
      }
      for (int64_t t = t0; t < tiles; ++t) {
        const int64_t n = std::min(kKeys, hi - t * kKeys);
        at::native::cpublas::brgemm(kRows, n, D, D, kKeys, width, false, a,
                                    kd + (b * T + t) * D * kKeys, sbuf.data() + t * kKeys, vnni);
      }
      S* probs;  // bf16: rounded for the second GEMM; fp32: in place over the scores
      if constexpr (vnni) {
        probs = pbuf.data();
      } else {
        probs = sbuf.data();
      }
      const int64_t from = t0 * kKeys;
      for (int64_t i = 0; i < kRows; ++i) {
        S* p = probs + i * width;
        if (i >= rows) {
          std::fill(p + from, p + hi, S(0));
          continue;
        }
        softmax_row(sbuf.data() + i * width, sc, from, std::max(lo, from), offset + i0 + i + 1,
                    hi, p);
      }
      for (int64_t t = t0; t < tiles; ++t) {
        const int64_t n = std::min(kKeys, hi - t * kKeys);
        at::native::cpublas::brgemm(kRows, D, n, width, D, D, t > t0, probs + t * kKeys,
                                    vd + (b * T + t) * kKeys * D, cbuf.data(), vnni);
      }
      for (int64_t i = 0; i < rows; ++i) {
        store_scaled(od + ((start[r] + i0 + i) * H + h) * D, cbuf.data() + i * D, 1.f, D);
      }
    }
    at::native::cpublas::brgemm_release(vnni);
  });
}

void attend(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
            const at::Tensor& first, const at::Tensor& lens, int64_t length, const at::Tensor& out,
            double scale) {
  const bool bf16 = q.scalar_type() == at::kBFloat16;
  TORCH_CHECK(bf16 || q.scalar_type() == at::kFloat, "attend: bf16 or fp32");
  for (const auto* t : {&keys, &values, &out}) {
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), "attend: q, keys, values, out of one dtype");
  }
  for (const auto* t : {&first, &lens}) {
    TORCH_CHECK(t->scalar_type() == at::kLong && t->dim() == 1 && t->is_contiguous(),
                "attend: first and lens int64 [rows]");
  }
  for (const auto* t : {&q, &keys, &values, &out}) {
    TORCH_CHECK(t->is_contiguous(), "attend: contiguous tensors");
  }
  TORCH_CHECK(q.dim() == 4 && out.dim() == 3 && keys.dim() == (bf16 ? 5 : 4) &&
                  values.dim() == keys.dim(), "attend: ranks");
  const int64_t R = q.size(0), H = q.size(1), Q = q.size(2), D = q.size(3);
  const int64_t B = keys.size(0), T = keys.size(1);
  TORCH_CHECK(R > 0 && B % R == 0 && H % (B / R) == 0 && Q > 0 && Q <= length && D % 2 == 0,
              "attend: heads, queries and keys");
  TORCH_CHECK(length <= T * kKeys, "attend: keys packed past the last key");
  TORCH_CHECK(keys.size(2) * (bf16 ? 2 : 1) == D && keys.size(3) == kKeys &&
                  values.size(0) == B && values.size(1) == T,
              "attend: keys and values packed in tiles of 64");
  TORCH_CHECK(first.size(0) == R && lens.size(0) == R, "attend: first and lens per row");
  const int64_t* fd = first.data_ptr<int64_t>();
  const int64_t* ld = lens.data_ptr<int64_t>();
  int64_t tokens = 0;
  for (int64_t r = 0; r < R; ++r) {
    TORCH_CHECK(0 <= ld[r] && ld[r] <= Q && 0 <= fd[r] && fd[r] <= length - Q,
                "attend: 0 <= lens <= queries, 0 <= first <= the head's keys");
    tokens += ld[r];
  }
  TORCH_CHECK(out.size(0) == tokens && out.size(1) == H && out.size(2) == D,
              "attend: out [sum(lens), heads, dim]");
  if (bf16) return attend_impl<at::BFloat16>(q, keys, values, first, lens, length, out, scale);
  return attend_impl<float>(q, keys, values, first, lens, length, out, scale);
}
}  // namespace

TORCH_LIBRARY(winnow, lib) {
  lib.def(
      "attend(Tensor q, Tensor keys, Tensor values, Tensor first, Tensor lens, int length, "
      "Tensor(a!) out, float scale) -> ()",
      attend);
  lib.def("pack(Tensor past, Tensor fresh, Tensor(a!) out, bool values) -> ()", pack);
}
