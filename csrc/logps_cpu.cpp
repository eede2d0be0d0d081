// CPU kernels of the logits path: per-row logsumexp and label logit (forward) and
// coeff * (onehot - softmax) (backward), one pass over each row, float32 accumulation.
// Logits are float32, bfloat16 or float16 (the Python side routes float64 to the reference).
//
// Rows are addressed through a [B, T, V] view whose last dimension is contiguous and whose
// leading strides are free, so padded [S, T, V] logits, packed [N, V] logits (B = 1) and
// strided views such as logits[:, :-1] are all read in place. Row n is (n / T, n % T).
// Ignored rows (label == ignore_index) are never read.
//
// Both kernels take the LM head's logit transform, applied to each element as it is read, in
// float32 (robalign/ops/head.py): z' = cap * tanh(scale * z / cap), or scale * z when cap == 0.
// The forward's lse and target are those of z'; the backward's gradient is with respect to the raw
// z: coeff * (onehot - softmax(z')) * dz'/dz, dz'/dz = scale * (1 - tanh^2) (scale without a cap).
// With the identity (scale 1, cap 0) the kernels read the logits as they are.

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <optional>
#if defined(__linux__)
#include <sys/mman.h>
#endif
#include <vector>

// float32, bfloat16 and float16 logits.
#define ROBALIGN_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) AT_DISPATCH_CASE_REDUCED_FLOATING_TYPES(__VA_ARGS__))

namespace {

using at::Tensor;
using Vec = at::vec::Vectorized<float>;

struct Rows {
  int64_t T, V, stride0, stride1;
  template <typename scalar_t>
  const scalar_t* row(const scalar_t* base, int64_t n) const {
    return base + (n / T) * stride0 + (n % T) * stride1;
  }
  template <typename scalar_t>
  scalar_t* row(scalar_t* base, int64_t n) const {
    return base + (n / T) * stride0 + (n % T) * stride1;
  }
};

Rows rows_of(const Tensor& logits3d) {
  return Rows{logits3d.size(1), logits3d.size(2), logits3d.stride(0), logits3d.stride(1)};
}

// A float32 view of one row: the row itself for float32, a converted thread-local copy else.
template <typename scalar_t>
const float* as_float(const scalar_t* row, int64_t V, std::vector<float>& buffer) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return row;
  } else {
    buffer.resize(V);
    at::vec::convert(row, buffer.data(), V);
    return buffer.data();
  }
}

// tanh from exp_u20 alone, to 2 ulp: below |x| = 0.3 its odd Taylor polynomial to x^11 (the first
// omitted term is < 2e-9 relative there), above it (1 - e) / (1 + e) with e = exp(-2|x|), where
// 1 - e > 0.45 cancels nothing. The same formula as the Triton kernels' _tanh. NaN stays NaN, +-inf
// gives +-1. (Sleef's vectorised tanh took the soft-capped AVX2 forward from 45 to 86 ms per
// 1024 x 32000 chunk.)
Vec fast_tanh(Vec x) {
  const Vec a = x.abs();
  const Vec e = (a * Vec(-2.f)).exp_u20();
  const Vec big = (Vec(1.f) - e) / (Vec(1.f) + e);
  const Vec x2 = x * x;
  Vec p = Vec(-1382.f / 155925.f);
  p = at::vec::fmadd(p, x2, Vec(62.f / 2835.f));
  p = at::vec::fmadd(p, x2, Vec(-17.f / 315.f));
  p = at::vec::fmadd(p, x2, Vec(2.f / 15.f));
  p = at::vec::fmadd(p, x2, Vec(-1.f / 3.f));
  p = at::vec::fmadd(p, x2, Vec(1.f));
  const Vec t = Vec::blendv(big, a * p, a < Vec(0.3f));
  return Vec::blendv(t, Vec(0.f) - t, x < Vec(0.f));
}

// The head's logit transform z' = cap * tanh(scale * z / cap) (scale * z when cap == 0); its scalar
// form takes the vector tanh's lanes, so a row's label sees the same tanh as the row.
struct Transform {
  float scale, cap;
  bool identity() const { return scale == 1.f && cap == 0.f; }
  float tanh_of(float z) const {
    float lanes[Vec::size()];
    fast_tanh(Vec(z * (scale / cap))).store(lanes);
    return lanes[0];
  }
  float value(float z) const { return cap != 0.f ? cap * tanh_of(z) : scale * z; }
  // dz'/dz
  float slope(float z) const {
    if (cap == 0.f) return scale;
    const float t = tanh_of(z);
    return scale * (1.f - t * t);
  }
};

// The transformed float32 row: the row itself for float32 under the identity, else a thread-local copy.
template <typename scalar_t>
const float* transformed(const scalar_t* row, int64_t V, const Transform& f, std::vector<float>& buffer) {
  if (f.identity()) return as_float(row, V, buffer);
  const float* x = as_float(row, V, buffer);  // the row itself for float32, else converted into buffer
  buffer.resize(V);
  const float a = f.cap != 0.f ? f.scale / f.cap : 0.f;
  if (f.cap != 0.f) {
    at::vec::map([a, c = f.cap](Vec v) { return Vec(c) * fast_tanh(v * Vec(a)); }, buffer.data(), x, V);
  } else {
    at::vec::map([k = f.scale](Vec v) { return Vec(k) * v; }, buffer.data(), x, V);
  }
  return buffer.data();
}

float row_logsumexp(const float* x, int64_t V) {
  const float max = at::vec::reduce_all<float>(
      [](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, x, V);
  if (std::isinf(max)) return max;  // all -inf (or a +inf logit): the limit, not NaN
  // Blocks of kSumBlock elements are summed in float32 lanes, the block sums in double: one
  // float32 accumulator over a whole 256k row would add up ~V/8 rounding errors per lane.
  constexpr int64_t kSumBlock = 2048;
  double sum = 0.0;
  for (int64_t v0 = 0; v0 < V; v0 += kSumBlock) {
    sum += at::vec::map_reduce_all<float>(
        [max](Vec v) { return (v - Vec(max)).exp_u20(); },
        [](Vec& a, Vec& b) { return a + b; }, x + v0, std::min(kSumBlock, V - v0));
  }
  return max + static_cast<float>(std::log(sum));
}

int64_t grain_for(int64_t V) { return std::max<int64_t>(1, 65536 / std::max<int64_t>(V, 1)); }

// The forward kernels' outputs: per row lse and label logit (float32, 0 on ignored rows), and the
// labels as contiguous int64.
struct RowOutputs {
  Tensor labels, lse, target;
  RowOutputs(const Tensor& logits3d, const Tensor& labels_in, int64_t N)
      : labels(labels_in.reshape({N}).to(at::kLong).contiguous()),
        lse(at::zeros({N}, logits3d.options().dtype(at::kFloat))),
        target(at::zeros({N}, logits3d.options().dtype(at::kFloat))) {}
};

// body(n, x) for every scored row n of the [B, T, V] view (y[n] != ignore_index), x its transformed
// float32 values (the row itself for float32 under the identity, else a thread-local copy); rows in
// parallel on torch's threads.
template <typename Body>
void for_each_scored_row(const Tensor& logits3d, const Rows& r, const int64_t* y, int64_t ignore_index,
                         const Transform& f, Body body) {
  const int64_t N = logits3d.size(0) * r.T;
  ROBALIGN_DISPATCH(logits3d.scalar_type(), "robalign_scored_rows", [&] {
    const scalar_t* base = logits3d.const_data_ptr<scalar_t>();
    at::parallel_for(0, N, grain_for(r.V), [&](int64_t begin, int64_t end) {
      std::vector<float> buffer;
      for (int64_t n = begin; n < end; ++n) {
        if (y[n] == ignore_index) continue;
        body(n, transformed(r.row(base, n), r.V, f, buffer));
      }
    });
  });
}

}  // namespace

// Forward: lse[n] = logsumexp_v z'[n, v] and target[n] = z'[n, y_n] for every scored row n of
// the [B, T, V] view (z' the transformed logits; z' = z by default); both 0 for ignored rows. Also
// the per-chunk helper of the fused linear CPU path (call it on a [1, C, V] chunk of logits).
std::tuple<Tensor, Tensor> rows_lse_target(const Tensor& logits3d, const Tensor& labels, int64_t ignore_index,
                                           double scale, double softcap) {
  TORCH_CHECK(logits3d.dim() == 3 && logits3d.stride(2) == 1, "rows_lse_target: logits must be [B, T, V] with a contiguous last dimension");
  const Rows r = rows_of(logits3d);
  const Transform f{static_cast<float>(scale), static_cast<float>(softcap)};
  const int64_t N = logits3d.size(0) * r.T;
  RowOutputs o(logits3d, labels, N);
  const int64_t* y = o.labels.data_ptr<int64_t>();
  float* p_lse = o.lse.data_ptr<float>();
  float* p_tgt = o.target.data_ptr<float>();
  for_each_scored_row(logits3d, r, y, ignore_index, f, [&](int64_t n, const float* x) {
    p_lse[n] = row_logsumexp(x, r.V);
    // a label outside [0, V) (queued as an error by a lazy value check) is never read: NaN
    p_tgt[n] = (y[n] >= 0 && y[n] < r.V) ? x[y[n]] : std::nanf("");
  });
  return {o.lse, o.target};
}

// Backward: out[n, v] = coeff[n] * (onehot(y_n)[v] - exp(z'[n, v] - lse[n])) * dz'/dz, 0 on ignored
// rows: the gradient with respect to the raw logits z. `out` is a [B, T, V] view with a contiguous
// last dimension; it may be the logits themselves (in-place backward): each element is read before
// it is written, and the label's logit before the row.
void rows_softmax_grad(const Tensor& logits3d, const Tensor& labels, const Tensor& lse, const Tensor& coeff,
                       int64_t ignore_index, Tensor& out3d, double scale, double softcap) {
  TORCH_CHECK(logits3d.dim() == 3 && logits3d.stride(2) == 1 && out3d.stride(2) == 1, "rows_softmax_grad: rows must be contiguous");
  TORCH_CHECK(out3d.scalar_type() == logits3d.scalar_type() && out3d.sizes() == logits3d.sizes(), "rows_softmax_grad: out must match logits");
  const Rows r = rows_of(logits3d);
  const Rows ro = rows_of(out3d);
  const Transform f{static_cast<float>(scale), static_cast<float>(softcap)};
  const float a = f.cap != 0.f ? f.scale / f.cap : 0.f;
  const int64_t N = logits3d.size(0) * r.T;
  auto labels_c = labels.reshape({N}).to(at::kLong).contiguous();
  auto lse_c = lse.to(at::kFloat).contiguous();
  auto coeff_c = coeff.to(at::kFloat).contiguous();
  const int64_t* y = labels_c.data_ptr<int64_t>();
  const float* p_lse = lse_c.const_data_ptr<float>();
  const float* p_coeff = coeff_c.const_data_ptr<float>();
  ROBALIGN_DISPATCH(logits3d.scalar_type(), "rows_softmax_grad", [&] {
    const scalar_t* base = logits3d.const_data_ptr<scalar_t>();
    scalar_t* out_base = out3d.data_ptr<scalar_t>();
    at::parallel_for(0, N, grain_for(r.V), [&](int64_t begin, int64_t end) {
      std::vector<float> in_buffer, out_buffer;
      for (int64_t n = begin; n < end; ++n) {
        scalar_t* out = ro.row(out_base, n);
        const float g = (y[n] == ignore_index) ? 0.f : p_coeff[n];
        if (g == 0.f) {
          std::fill(out, out + r.V, scalar_t(0));
          continue;
        }
        const scalar_t* row = r.row(base, n);
        const float lse_n = p_lse[n];
        if (y[n] < 0 || y[n] >= r.V) {  // an invalid label: its log-prob is NaN, so is its gradient
          std::fill(out, out + r.V, scalar_t(std::nanf("")));
          continue;
        }
        const float z_y = static_cast<float>(row[y[n]]);  // read before an in-place write covers it
        if (!std::isfinite(lse_n)) {
          // A NaN or infinite logit: exp_u20 is exact only for finite arguments, so take the
          // reference's limits with std::exp (exp(x - inf) = 0, exp(inf - inf) = exp(NaN) = NaN).
          for (int64_t v = 0; v < r.V; ++v) {
            const float x = static_cast<float>(row[v]);
            out[v] = static_cast<scalar_t>(g * ((v == y[n] ? 1.f : 0.f) - std::exp(f.value(x) - lse_n)) * f.slope(x));
          }
          continue;
        }
        // -g * exp(z' - lse) * dz'/dz for every v; the label's g * dz'/dz is added after
        auto grad = [g, lse_n, a, &f](Vec x) {
          if (f.cap != 0.f) {
            const Vec t = fast_tanh(x * Vec(a));
            return Vec(-g * f.scale) * (t * Vec(f.cap) - Vec(lse_n)).exp_u20() * (Vec(1.f) - t * t);
          }
          return Vec(-g * f.scale) * (x * Vec(f.scale) - Vec(lse_n)).exp_u20();
        };
        const float onehot = g * f.slope(z_y);
        if constexpr (std::is_same_v<scalar_t, float>) {
          at::vec::map(grad, out, row, r.V);
          out[y[n]] += onehot;
        } else {
          const float* x = as_float(row, r.V, in_buffer);
          out_buffer.resize(r.V);
          at::vec::map(grad, out_buffer.data(), x, r.V);
          out_buffer[y[n]] += onehot;
          at::vec::convert(out_buffer.data(), out, r.V);
        }
      }
    });
  });
}

namespace {

// Where a row's float32 values are formed: the output row itself for float32, else `buffer`.
template <typename scalar_t>
float* float_row(scalar_t* out, int64_t V, std::vector<float>& buffer) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return out;
  } else {
    buffer.resize(V);
    return buffer.data();
  }
}

// max over x[0, V): four vector accumulators, so the compare chain does not serialise the loop; NaN
// propagates (at::vec::maximum), as in the reference.
float row_max(const float* x, int64_t V) {
  constexpr int64_t L = Vec::size();
  Vec m0(-INFINITY), m1(-INFINITY), m2(-INFINITY), m3(-INFINITY);
  int64_t v = 0;
  for (; v + 4 * L <= V; v += 4 * L) {
    m0 = at::vec::maximum(m0, Vec::loadu(x + v));
    m1 = at::vec::maximum(m1, Vec::loadu(x + v + L));
    m2 = at::vec::maximum(m2, Vec::loadu(x + v + 2 * L));
    m3 = at::vec::maximum(m3, Vec::loadu(x + v + 3 * L));
  }
  for (; v + L <= V; v += L) m0 = at::vec::maximum(m0, Vec::loadu(x + v));
  const Vec m = at::vec::maximum(at::vec::maximum(m0, m1), at::vec::maximum(m2, m3));
  float lanes[L];
  m.store(lanes);
  float max = lanes[0];
  for (int64_t i = 1; i < L; ++i) max = (std::isnan(max) || std::isnan(lanes[i])) ? NAN : std::max(max, lanes[i]);
  for (; v < V; ++v) max = (std::isnan(max) || std::isnan(x[v])) ? NAN : std::max(max, x[v]);
  return max;
}

// Whether label y is the first maximum of x[0, V) whose maximum (row_max's, NaN where any is NaN) is
// `max`: torch.argmax's rule, a NaN the largest. Reads the prefix before y only when x[y] holds the maximum.
bool label_is_first_max(const float* x, int64_t V, int64_t y, float max) {
  if (y < 0 || y >= V) return false;
  const bool nan = std::isnan(max);
  auto is_max = [max, nan](float value) { return nan ? std::isnan(value) : value == max; };
  bool first = is_max(x[y]);
  for (int64_t v = 0; first && v < y; ++v) first = !is_max(x[v]);
  return first;
}

// e[v] = exp(x[v] - max) into e (which may be x), returning sum_v e[v]: float32 lanes within blocks
// of kSumBlock elements, the block sums in double (as row_logsumexp). One exponential per element.
double exp_and_sum(const float* x, float* e, int64_t V, float max) {
  constexpr int64_t L = Vec::size();
  constexpr int64_t kSumBlock = 2048;
  const Vec vmax(max);
  double sum = 0.0;
  for (int64_t b0 = 0; b0 < V; b0 += kSumBlock) {
    const int64_t b1 = std::min(V, b0 + kSumBlock);
    Vec s0(0.f), s1(0.f);
    int64_t v = b0;
    for (; v + 2 * L <= b1; v += 2 * L) {
      const Vec e0 = (Vec::loadu(x + v) - vmax).exp_u20();
      const Vec e1 = (Vec::loadu(x + v + L) - vmax).exp_u20();
      e0.store(e + v);
      e1.store(e + v + L);
      s0 = s0 + e0;
      s1 = s1 + e1;
    }
    for (; v + L <= b1; v += L) {
      const Vec e0 = (Vec::loadu(x + v) - vmax).exp_u20();
      e0.store(e + v);
      s0 = s0 + e0;
    }
    if (v < b1) {  // the tail, under L: loadu fills the missing lanes with 0, masked out of the sum
      const int64_t n = b1 - v;
      const Vec e0 = (Vec::loadu(x + v, n) - vmax).exp_u20();
      e0.store(e + v, n);
      s0 = s0 + Vec::set(Vec(0.f), e0, n);
    }
    sum += at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, s0 + s1);
  }
  return sum;
}

// A half-precision row (bfloat16/float16) of the fused step in two sweeps instead of five (convert,
// max, exp, scale, convert back). The first takes blocks of kBlock logits: each is converted into an
// L1-resident block, its maximum raises the running maximum m (the sum so far rescaled by
// exp(m_old - m)), and e = exp(z - m) goes to the float32 buffer `e` with the m it used. The second
// scales each block by exp(m_block - m) * (-1/sum), adds the onehot and converts into `out` (which may
// be the logits themselves: the first sweep read them all). Returns false, having written nothing to
// `out`, for a row with a NaN or +inf or only -inf logits, whose exact limits the caller writes.
template <typename scalar_t>
bool half_row_grad(const scalar_t* x, scalar_t* out, int64_t V, int64_t y, std::vector<float>& e,
                   std::vector<float>& block_m, float& lse) {
  constexpr int64_t kBlock = 2048;
  float tmp[kBlock];
  const int64_t blocks = (V + kBlock - 1) / kBlock;
  e.resize(V);
  block_m.resize(blocks);
  float m = -INFINITY;
  double sum = 0.0;
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t b0 = b * kBlock, len = std::min(kBlock, V - b0);
    at::vec::convert(x + b0, tmp, len);
    const float block_max = row_max(tmp, len);
    if (std::isnan(block_max) || block_max == INFINITY) return false;
    if (block_max > m) {
      if (sum != 0.0) sum *= std::exp(static_cast<double>(m) - block_max);
      m = block_max;
    }
    block_m[b] = m;
    if (m == -INFINITY) continue;  // only -inf so far: this block's e is never read
    sum += exp_and_sum(tmp, e.data() + b0, len, m);
  }
  if (m == -INFINITY) return false;
  lse = m + static_cast<float>(std::log(sum));
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t b0 = b * kBlock, len = std::min(kBlock, V - b0);
    const float factor = block_m[b] == -INFINITY ? 0.f : static_cast<float>(-std::exp(static_cast<double>(block_m[b]) - m) / sum);
    if (factor == 0.f) {
      std::fill(tmp, tmp + len, 0.f);
    } else {
      const Vec f(factor);
      at::vec::map([f](Vec v) { return v * f; }, tmp, e.data() + b0, len);
    }
    if (y >= b0 && y < b0 + len) tmp[y - b0] += 1.f;
    at::vec::convert(tmp, out + b0, len);
  }
  return true;
}


}  // namespace

// Forward and the unit gradient in one visit of each row (the one-pass loss's chunk kernel):
// lse[n] = logsumexp_v z'[n, v], target[n] = z'[n, y_n], and out[n, v] = (onehot(y_n)[v] -
// softmax(z'[n])[v]) * dz'/dz -- rows_softmax_grad with coeff = 1, whose per-sequence coefficient the
// caller applies to the much smaller matmul operands. Under the identity transform a row is read
// from memory once and each element takes one exponential (exp(z - max), kept and divided by the
// sum), against three reads and two exponentials for rows_lse_target then rows_softmax_grad; other
// transforms run those two per row; half-precision rows take half_row_grad's two sweeps. `out` may
// alias the logits; ignored rows are 0, lse and target 0.
std::tuple<Tensor, Tensor> rows_lse_target_grad(const Tensor& logits3d, const Tensor& labels, int64_t ignore_index,
                                                Tensor& out3d, double scale, double softcap) {
  TORCH_CHECK(logits3d.dim() == 3 && logits3d.stride(2) == 1 && out3d.stride(2) == 1, "rows_lse_target_grad: rows must be contiguous");
  TORCH_CHECK(out3d.scalar_type() == logits3d.scalar_type() && out3d.sizes() == logits3d.sizes(), "rows_lse_target_grad: out must match logits");
  const Transform f{static_cast<float>(scale), static_cast<float>(softcap)};
  if (!f.identity()) {
    auto [lse, target] = rows_lse_target(logits3d, labels, ignore_index, scale, softcap);
    const int64_t N = logits3d.size(0) * logits3d.size(1);
    rows_softmax_grad(logits3d, labels, lse, at::ones({N}, lse.options()), ignore_index, out3d, scale, softcap);
    return {lse, target};
  }
  const Rows r = rows_of(logits3d);
  const Rows ro = rows_of(out3d);
  const int64_t N = logits3d.size(0) * r.T;
  RowOutputs o(logits3d, labels, N);
  const int64_t* y = o.labels.data_ptr<int64_t>();
  float* p_lse = o.lse.data_ptr<float>();
  float* p_tgt = o.target.data_ptr<float>();
  ROBALIGN_DISPATCH(logits3d.scalar_type(), "rows_lse_target_grad", [&] {
    const scalar_t* base = logits3d.const_data_ptr<scalar_t>();
    scalar_t* out_base = out3d.data_ptr<scalar_t>();
    at::parallel_for(0, N, grain_for(r.V), [&](int64_t begin, int64_t end) {
      std::vector<float> buffer, block_m;
      for (int64_t n = begin; n < end; ++n) {
        scalar_t* out = ro.row(out_base, n);
        if (y[n] == ignore_index) {
          std::fill(out, out + r.V, scalar_t(0));
          continue;
        }
        if constexpr (!std::is_same_v<scalar_t, float>) {
          if (y[n] >= 0 && y[n] < r.V) {
            const float z_y = static_cast<float>(r.row(base, n)[y[n]]);  // before an in-place write covers it
            if (half_row_grad(r.row(base, n), out, r.V, y[n], buffer, block_m, p_lse[n])) {
              p_tgt[n] = z_y;
              continue;
            }
          }
        }
        const float* x = as_float(r.row(base, n), r.V, buffer);  // bfloat16/float16: converted into buffer
        if (y[n] < 0 || y[n] >= r.V) {  // an invalid label: its log-prob and gradient are NaN
          p_lse[n] = row_logsumexp(x, r.V);
          p_tgt[n] = std::nanf("");
          std::fill(out, out + r.V, scalar_t(std::nanf("")));
          continue;
        }
        const float z_y = x[y[n]];  // read before an in-place write covers it
        const float max = row_max(x, r.V);
        p_tgt[n] = z_y;
        if (!std::isfinite(max)) {
          // all -inf, a +inf or a NaN logit: the reference's limits, by std::exp (exp_u20 is exact
          // only for finite arguments)
          const float lse_n = std::isinf(max) ? max : NAN;
          p_lse[n] = lse_n;
          for (int64_t v = 0; v < r.V; ++v) {
            const float xv = static_cast<float>(r.row(base, n)[v]);
            out[v] = static_cast<scalar_t>((v == y[n] ? 1.f : 0.f) - std::exp(xv - lse_n));
          }
          continue;
        }
        // e = exp(z - max): in place for float32 rows written in place, else in the float32 buffer
        float* e = float_row(out, r.V, buffer);
        const double sum = exp_and_sum(x, e, r.V, max);
        p_lse[n] = max + static_cast<float>(std::log(sum));
        const Vec minus_inv(static_cast<float>(-1.0 / sum));
        at::vec::map([minus_inv](Vec v) { return v * minus_inv; }, e, e, r.V);
        e[y[n]] += 1.f;
        if constexpr (!std::is_same_v<scalar_t, float>) at::vec::convert(e, out, r.V);
      }
    });
  });
  return {o.lse, o.target};
}

// Rows v0 <= v < v1 four at a time, four(v) for rows v..v+3, then one(v) for the rest: a kernel that
// updates per-column scratch (a running maximum or sum) once per four rows instead of once per row.
// The update a row at a time cost the column kernel below a third of its time at 1024 columns.
template <typename Four, typename One>
void rows_by_four(int64_t v0, int64_t v1, Four&& four, One&& one) {
  int64_t v = v0;
  for (; v + 4 <= v1; v += 4) four(v);
  for (; v < v1; ++v) one(v);
}

// The C columns of a [V, C] layout a float32 vector at a time: body(i, n) for the n columns from i, n the
// vector width but in the last, partial vector.
template <typename Body>
void column_vectors(int64_t C, Body&& body) {
  constexpr int64_t L = Vec::size();
  for (int64_t i = 0; i < C; i += L) body(i, std::min(L, C - i));
}

// The one-pass loss's chunk kernel for float32 logits in the transposed layout, zt [V, C] (column c is
// token c; rows unit-stride): MKL's float32 GEMM forms W·hᵀ faster than h·Wᵀ for a call's chunks, and the
// gradient's products read it as it is (robalign/ops/one_pass.py). Per column, what rows_lse_target_grad
// gives per row under the identity transform: lse[c] = logsumexp_v zt[v, c], target[c] = zt[y_c, c] and
// out[v, c] = onehot(y_c)[v] - softmax(zt[:, c])[v]; `out` may be zt itself. The vocabulary's rows are
// split between the threads, each sweeping its contiguous share in blocks of about kColBlockBytes, in
// cache while read twice: the block's maximum per column, the share's running maximum and sum rescaled
// where it grows (half_row_grad's scheme, per column), exp(z - m) written out and summed (float32 within a
// block, four rows added before each update of the block's sums; the block sums in double). The shares'
// maxima and sums are combined per column, and a second sweep scales each block by exp(m_block - m) *
// (-1/sum) and adds the onehot. One exponential per element; two reads and two writes of the chunk,
// against the row kernel's one of each (a row fits in cache, a column does not). Only for columns with a
// label in [0, V) and finite logits: returns ok = false where a label is ignored or out of range (before
// writing anything) or a column's maximum is not finite (NaN, +inf, all -inf; `out` then holds garbage),
// and the caller forms that chunk in the row layout, whose kernels give those columns' limits.
constexpr int64_t kColBlockBytes = 512 << 10;

std::tuple<Tensor, Tensor, bool> cols_lse_target_grad(const Tensor& zt, const Tensor& labels, int64_t ignore_index,
                                                      Tensor& out) {
  TORCH_CHECK(zt.dim() == 2 && zt.scalar_type() == at::kFloat && zt.stride(1) == 1 && zt.is_cpu(),
              "cols_lse_target_grad: logits must be a float32 CPU [V, C] tensor with unit-stride rows");
  TORCH_CHECK(out.sizes() == zt.sizes() && out.scalar_type() == at::kFloat && out.stride(1) == 1 && out.is_cpu(),
              "cols_lse_target_grad: out must be a float32 CPU tensor of the logits' shape with unit-stride rows");
  const int64_t V = zt.size(0), C = zt.size(1);
  TORCH_CHECK(labels.numel() == C, "cols_lse_target_grad: ", labels.numel(), " labels for ", C, " columns");
  const int64_t ldz = zt.stride(0), ldo = out.stride(0);
  const Tensor y_all = labels.reshape({C}).to(at::kLong).contiguous();
  Tensor lse = at::zeros({C}, zt.options()), target = at::zeros({C}, zt.options());
  const int64_t* ys = y_all.const_data_ptr<int64_t>();
  for (int64_t c = 0; c < C; ++c)
    if (ys[c] == ignore_index || ys[c] < 0 || ys[c] >= V) return {lse, target, false};
  if (C == 0) return {lse, target, true};
  if (V == 0) return {lse, target, false};
  float* p_lse = lse.data_ptr<float>();
  float* p_tgt = target.data_ptr<float>();
  const float* z = zt.const_data_ptr<float>();
  float* o = out.data_ptr<float>();
  for (int64_t c = 0; c < C; ++c) p_tgt[c] = z[ys[c] * ldz + c];  // before out covers them
  const int64_t rows = std::clamp<int64_t>(kColBlockBytes / (4 * C), 4, 1024);  // a block's rows
  const int64_t blocks = (V + rows - 1) / rows;
  const int64_t shares = std::min<int64_t>(at::get_num_threads(), blocks);
  auto each = [&](auto&& body) { column_vectors(C, body); };
  // per block, the share's running maximum when the block was written; per share, its maximum and sum
  std::vector<float> block_m(blocks * C), share_m(shares * C, -INFINITY);
  std::vector<double> share_sum(shares * C, 0.0);
  std::atomic<bool> finite{true};
  at::parallel_for(0, shares, 1, [&](int64_t s0, int64_t s1) {
    std::vector<float> shift(C), bmax(C), bsum(C);
    for (int64_t s = s0; s < s1; ++s) {
      float* m = share_m.data() + s * C;
      double* sum = share_sum.data() + s * C;
      for (int64_t b = blocks * s / shares; b < blocks * (s + 1) / shares; ++b) {
        const int64_t v0 = b * rows, v1 = std::min(V, v0 + rows);
        std::fill(bmax.begin(), bmax.end(), -INFINITY);
        rows_by_four(v0, v1, [&](int64_t v) {
          const float* r = z + v * ldz;
          each([&](int64_t i, int64_t n) {
            const Vec a = at::vec::maximum(Vec::loadu(r + i, n), Vec::loadu(r + ldz + i, n));
            const Vec c = at::vec::maximum(Vec::loadu(r + 2 * ldz + i, n), Vec::loadu(r + 3 * ldz + i, n));
            at::vec::maximum(Vec::loadu(bmax.data() + i, n), at::vec::maximum(a, c)).store(bmax.data() + i, n);
          });
        }, [&](int64_t v) {
          const float* r = z + v * ldz;
          each([&](int64_t i, int64_t n) {
            at::vec::maximum(Vec::loadu(bmax.data() + i, n), Vec::loadu(r + i, n)).store(bmax.data() + i, n);
          });
        });
        for (int64_t i = 0; i < C; ++i) {
          if (std::isnan(bmax[i])) finite.store(false, std::memory_order_relaxed);  // ±inf: m says so at the end
          if (bmax[i] > m[i]) {
            if (sum[i] != 0.0) sum[i] *= std::exp(static_cast<double>(m[i]) - bmax[i]);
            m[i] = bmax[i];
          }
          block_m[b * C + i] = m[i];
          shift[i] = m[i] == -INFINITY ? 0.f : m[i];  // only -inf so far: exp(-inf - 0) = 0
        }
        std::fill(bsum.begin(), bsum.end(), 0.f);
        rows_by_four(v0, v1, [&](int64_t v) {
          const float* r = z + v * ldz;
          float* d = o + v * ldo;
          each([&](int64_t i, int64_t n) {
            const Vec sh = Vec::loadu(shift.data() + i, n);
            const Vec e0 = (Vec::loadu(r + i, n) - sh).exp_u20(), e1 = (Vec::loadu(r + ldz + i, n) - sh).exp_u20();
            const Vec e2 = (Vec::loadu(r + 2 * ldz + i, n) - sh).exp_u20(), e3 = (Vec::loadu(r + 3 * ldz + i, n) - sh).exp_u20();
            e0.store(d + i, n);
            e1.store(d + ldo + i, n);
            e2.store(d + 2 * ldo + i, n);
            e3.store(d + 3 * ldo + i, n);
            (Vec::loadu(bsum.data() + i, n) + ((e0 + e1) + (e2 + e3))).store(bsum.data() + i, n);
          });
        }, [&](int64_t v) {
          const float* r = z + v * ldz;
          float* d = o + v * ldo;
          each([&](int64_t i, int64_t n) {
            const Vec e = (Vec::loadu(r + i, n) - Vec::loadu(shift.data() + i, n)).exp_u20();
            e.store(d + i, n);
            (Vec::loadu(bsum.data() + i, n) + e).store(bsum.data() + i, n);
          });
        });
        for (int64_t i = 0; i < C; ++i) sum[i] += bsum[i];
      }
    }
  });
  std::vector<float> m(C, -INFINITY);
  std::vector<double> sum(C, 0.0);
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t s = 0; s < shares; ++s) m[c] = std::max(m[c], share_m[s * C + c]);
    for (int64_t s = 0; s < shares; ++s)
      if (share_sum[s * C + c] != 0.0) sum[c] += share_sum[s * C + c] * std::exp(static_cast<double>(share_m[s * C + c]) - m[c]);
    if (!std::isfinite(m[c])) finite.store(false, std::memory_order_relaxed);
    p_lse[c] = m[c] + static_cast<float>(std::log(sum[c]));
  }
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> factor(C);
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t i = 0; i < C; ++i) {  // this block's factor, per column
        const float mb = block_m[b * C + i];
        factor[i] = mb == -INFINITY ? 0.f : static_cast<float>(-std::exp(static_cast<double>(mb) - m[i]) / sum[i]);
      }
      for (int64_t v = b * rows; v < std::min(V, (b + 1) * rows); ++v) {
        float* d = o + v * ldo;
        each([&](int64_t i, int64_t n) { (Vec::loadu(d + i, n) * Vec::loadu(factor.data() + i, n)).store(d + i, n); });
      }
    }
  });
  for (int64_t c = 0; c < C; ++c) o[ys[c] * ldo + c] += 1.f;
  return {lse, target, finite.load()};
}

// The logged per-token statistics of each scored row of the [B, T, V] view, in one visit of the row
// (robalign/ops/token_stats.py; z' the transformed logits): lse = logsumexp z', entropy = lse -
// sum softmax(z') z', mean = sum z' / V, top1 = whether the label is the first maximum (argmax's
// tie rule); 0 on ignored rows. float32 sums in blocks (as row_logsumexp), the block sums in double.
// A NaN or an infinite logit gives what float arithmetic gives (NaN entropy, an infinite mean), as the
// ATen path does: 0 * -inf is NaN there too.
std::tuple<Tensor, Tensor, Tensor, Tensor> rows_token_stats(const Tensor& logits3d, const Tensor& labels,
                                                            int64_t ignore_index, double scale, double softcap) {
  TORCH_CHECK(logits3d.dim() == 3 && logits3d.stride(2) == 1, "rows_token_stats: logits must be [B, T, V] with a contiguous last dimension");
  const Rows r = rows_of(logits3d);
  const Transform f{static_cast<float>(scale), static_cast<float>(softcap)};
  const int64_t N = logits3d.size(0) * r.T;
  RowOutputs o(logits3d, labels, N);  // lse, and target's buffer for the entropy
  Tensor mean = at::zeros({N}, o.lse.options());
  Tensor top1 = at::zeros({N}, o.lse.options().dtype(at::kBool));
  const int64_t* y = o.labels.data_ptr<int64_t>();
  float* p_lse = o.lse.data_ptr<float>();
  float* p_ent = o.target.data_ptr<float>();
  float* p_mean = mean.data_ptr<float>();
  bool* p_top1 = top1.data_ptr<bool>();
  for_each_scored_row(logits3d, r, y, ignore_index, f, [&](int64_t n, const float* x) {
    const float max = row_max(x, r.V);
    constexpr int64_t kSumBlock = 2048;
    double sum = 0.0, sum_ex = 0.0, sum_x = 0.0;
    for (int64_t v0 = 0; v0 < r.V; v0 += kSumBlock) {
      const int64_t len = std::min(kSumBlock, r.V - v0);
      sum += at::vec::map_reduce_all<float>([max](Vec v) { return (v - Vec(max)).exp_u20(); },
                                            [](Vec& a, Vec& b) { return a + b; }, x + v0, len);
      sum_ex += at::vec::map_reduce_all<float>([max](Vec v) { return (v - Vec(max)).exp_u20() * v; },
                                               [](Vec& a, Vec& b) { return a + b; }, x + v0, len);
      sum_x += at::vec::reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, x + v0, len);
    }
    if (!std::isfinite(max)) {  // exp_u20 is exact only for finite arguments: float arithmetic's limits
      sum = sum_ex = 0.0;
      for (int64_t v = 0; v < r.V; ++v) {
        const double e = std::exp(static_cast<double>(x[v]) - max);
        sum += e;
        sum_ex += e * x[v];
      }
    }
    const float lse = max + static_cast<float>(std::log(sum));
    p_lse[n] = lse;
    p_ent[n] = lse - static_cast<float>(sum_ex / sum);
    p_mean[n] = static_cast<float>(sum_x / static_cast<double>(r.V));
    p_top1[n] = label_is_first_max(x, r.V, y[n], max);
  });
  return {o.lse, o.target, mean, top1};
}

// Whether each token's label is the first maximum of its logits, torch.argmax's rule (a NaN counts as
// the largest value, the first NaN wins; a column of -inf has its maximum at 0): the logged top-1
// accuracy of the one-pass loss's chunk, read before the chunk kernel overwrites the logits with the
// unit gradient (robalign/ops/one_pass.py). `logits` is [C, V] with unit-stride rows (a token per row)
// or, with `columns`, [V, C] with unit-stride rows (a token per column, the float32 column layout);
// `labels` [C]: a label outside [0, V) (an ignored one) is never the maximum. float32, bfloat16 or
// float16; one read of the chunk (a row's prefix again when its label holds the maximum).
Tensor labels_are_argmax(const Tensor& logits, const Tensor& labels, bool columns) {
  TORCH_CHECK(logits.dim() == 2 && (logits.stride(1) == 1 || logits.size(1) <= 1) && logits.is_cpu(),
              "labels_are_argmax: logits must be a 2-D CPU tensor with unit-stride rows");
  const int64_t C = columns ? logits.size(1) : logits.size(0), V = columns ? logits.size(0) : logits.size(1);
  TORCH_CHECK(labels.numel() == C, "labels_are_argmax: ", labels.numel(), " labels for ", C, " tokens");
  TORCH_CHECK(V < (int64_t{1} << 24), "labels_are_argmax: V must be under 2^24 (a float holds the index)");
  const Tensor y_all = labels.reshape({C}).to(at::kLong).contiguous();
  const int64_t* ys = y_all.const_data_ptr<int64_t>();
  Tensor hit = at::zeros({C}, logits.options().dtype(at::kBool));
  bool* out = hit.data_ptr<bool>();
  const int64_t ld = logits.stride(0);
  if (C == 0 || V == 0) return hit;
  ROBALIGN_DISPATCH(logits.scalar_type(), "labels_are_argmax", [&] {
    const scalar_t* base = logits.const_data_ptr<scalar_t>();
    if (!columns) {
      at::parallel_for(0, C, grain_for(V), [&](int64_t begin, int64_t end) {
        std::vector<float> buffer;
        for (int64_t c = begin; c < end; ++c) {
          if (ys[c] < 0 || ys[c] >= V) continue;
          const float* x = as_float(base + c * ld, V, buffer);
          out[c] = label_is_first_max(x, V, ys[c], row_max(x, V));
        }
      });
      return;
    }
    // the vocabulary's rows split between the threads (each streams a contiguous share, as the column
    // kernel does), the running maximum, its first index and the first NaN's per column in arrays,
    // updated once per four rows; then per column the first share with a NaN, else the first share
    // holding the maximum, gives the index
    constexpr int64_t L = Vec::size();
    const int64_t shares = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), V / 64));
    std::vector<float> m(shares * C, -INFINITY), arg(shares * C), nan_at(shares * C, -1.f);
    at::parallel_for(0, shares, 1, [&](int64_t s0, int64_t s1) {
      std::vector<float> tmp(L);
      auto load = [&](const scalar_t* p, int64_t n) {
        if constexpr (std::is_same_v<scalar_t, float>) {
          return Vec::loadu(p, n);
        } else {
          at::vec::convert(p, tmp.data(), n);
          return Vec::loadu(tmp.data(), n);
        }
      };
      for (int64_t s = s0; s < s1; ++s) {
        const int64_t v0 = V * s / shares, v1 = V * (s + 1) / shares;
        float* ms = m.data() + s * C;
        float* as = arg.data() + s * C;
        float* ns = nan_at.data() + s * C;
        std::fill(as, as + C, static_cast<float>(v0));  // a share of only -inf: its first row
        auto rows_from = [&](int64_t v, int64_t k) {   // rows v .. v + k - 1, in order
          column_vectors(C, [&](int64_t i, int64_t n) {
            Vec mi = Vec::loadu(ms + i, n), ai = Vec::loadu(as + i, n);
            for (int64_t r = 0; r < k; ++r) {
              const Vec x = load(base + (v + r) * ld + i, n);
              const Vec larger = x > mi;  // strictly: the first maximum stays; a NaN is never larger
              ai = Vec::blendv(ai, Vec(static_cast<float>(v + r)), larger);
              mi = Vec::blendv(mi, x, larger);
              if (const int nans = (x == x).zero_mask()) {  // rare: the lanes' first NaN, a lane at a time
                for (int64_t lane = 0; lane < n; ++lane)
                  if ((nans >> lane & 1) && ns[i + lane] < 0.f) ns[i + lane] = static_cast<float>(v + r);
              }
            }
            mi.store(ms + i, n);
            ai.store(as + i, n);
          });
        };
        rows_by_four(v0, v1, [&](int64_t v) { rows_from(v, 4); }, [&](int64_t v) { rows_from(v, 1); });
      }
    });
    for (int64_t c = 0; c < C; ++c) {
      const int64_t y = ys[c];
      if (y < 0 || y >= V) continue;
      float index = -1.f, best = -INFINITY;
      for (int64_t s = 0; s < shares && index < 0.f; ++s)
        if (nan_at[s * C + c] >= 0.f) index = nan_at[s * C + c];
      if (index < 0.f) {
        for (int64_t s = 0; s < shares; ++s) best = std::max(best, m[s * C + c]);
        for (int64_t s = 0; s < shares && index < 0.f; ++s)
          if (m[s * C + c] == best) index = arg[s * C + c];
      }
      out[c] = static_cast<int64_t>(index) == y;
    }
  });
  return hit;
}

// out <- src^T for a bfloat16 or float16 src [M, N] with unit-stride rows (a column slice of a larger
// matrix, say) and out [N, M] with unit-stride rows, in 32 x 32 tiles (at::vec::transpose_mxn, AVX-512
// permutes where built for it). The one-pass loss hands oneDNN the head gradient's product U^T (c . h)
// with U^T contiguous, a block of V rows at a time, where its GEMM runs a transposed A at half speed
// (robalign/ops/one_pass.py). Each thread takes a range of src's columns and sweeps all rows 32 at a time,
// the next tiles' lines prefetched: reading src's rows in long runs is what makes it near a copy's speed.
void transpose_into_(Tensor& out, const Tensor& src) {
  TORCH_CHECK(src.dim() == 2 && out.dim() == 2 && src.is_cpu() && out.is_cpu(), "transpose_into_: 2-D CPU tensors expected");
  TORCH_CHECK(src.scalar_type() == out.scalar_type() &&
                  (src.scalar_type() == at::kBFloat16 || src.scalar_type() == at::kHalf),
              "transpose_into_: src and out must both be bfloat16 or both float16, got ", src.scalar_type(), " and ",
              out.scalar_type());
  const int64_t M = src.size(0), N = src.size(1);
  TORCH_CHECK(out.size(0) == N && out.size(1) == M, "transpose_into_: out must be [", N, ", ", M, "], got ", out.sizes());
  TORCH_CHECK((src.stride(1) == 1 || N <= 1) && (out.stride(1) == 1 || M <= 1),
              "transpose_into_: src and out must have unit-stride rows");
  if (M == 0 || N == 0) return;
  TORCH_CHECK(!out.storage().is_alias_of(src.storage()), "transpose_into_: out must not share memory with src");
  const int64_t lds = src.stride(0), ldo = out.stride(0);
  AT_DISPATCH_REDUCED_FLOATING_TYPES(src.scalar_type(), "transpose_into_", [&] {
    const scalar_t* s = src.const_data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    constexpr int64_t kTile = 32, kAhead = 4;  // tiles of src's columns prefetched ahead
    at::parallel_for(0, (N + kTile - 1) / kTile, 16, [&](int64_t b0, int64_t b1) {
      const int64_t n_end = std::min(N, b1 * kTile);
      for (int64_t m0 = 0; m0 < M; m0 += kTile) {
        const int m = static_cast<int>(std::min(kTile, M - m0));
        for (int64_t n0 = b0 * kTile; n0 < n_end; n0 += kTile) {
          const int n = static_cast<int>(std::min(kTile, n_end - n0));
          if (n0 + kAhead * kTile < n_end) {
            for (int i = 0; i < m; ++i) __builtin_prefetch(s + (m0 + i) * lds + n0 + kAhead * kTile);
          }
          at::vec::transpose_mxn<scalar_t>(s + m0 * lds + n0, lds, o + n0 * ldo + m0, ldo, m, n);
        }
      }
    });
  });
}

// buffer <- beta * buffer + product for a float32 buffer and a bfloat16/float16 (or float32) product of
// the same shape, in one pass (beta == 0 ignores what the buffer held, which may be uninitialised):
// the one-pass loss's float32 accumulation of a half-precision head's gradient, one chunk's matmul
// product at a time. ATen's mixed-dtype add_ converts the product into a float32 temporary first.
void accumulate_(Tensor& buffer, const Tensor& product, double beta) {
  TORCH_CHECK(buffer.scalar_type() == at::kFloat && buffer.is_contiguous(), "accumulate_: buffer must be contiguous float32");
  TORCH_CHECK(product.sizes() == buffer.sizes(), "accumulate_: product must match buffer");
  const Tensor p = product.contiguous();
  const int64_t n = buffer.numel();
  float* out = buffer.data_ptr<float>();
  const float b = static_cast<float>(beta);
  ROBALIGN_DISPATCH(p.scalar_type(), "accumulate_", [&] {
    const scalar_t* in = p.const_data_ptr<scalar_t>();
    at::parallel_for(0, n, 1 << 16, [&](int64_t begin, int64_t end) {
      constexpr int64_t kBlock = 4096;
      float tmp[kBlock];
      for (int64_t i0 = begin; i0 < end; i0 += kBlock) {
        const int64_t len = std::min(kBlock, end - i0);
        const float* x;
        if constexpr (std::is_same_v<scalar_t, float>) {
          x = reinterpret_cast<const float*>(in + i0);
        } else {
          at::vec::convert(in + i0, tmp, len);
          x = tmp;
        }
        if (b == 0.f) {
          std::copy(x, x + len, out + i0);
        } else if (b == 1.f) {
          at::vec::map2([](Vec o, Vec v) { return o + v; }, out + i0, out + i0, x, len);
        } else {
          at::vec::map2([b](Vec o, Vec v) { return at::vec::fmadd(o, Vec(b), v); }, out + i0, out + i0, x, len);
        }
      }
    });
  });
}

// MKL's mixed-precision GEMMs, C = alpha * op(A) * op(B) + beta * C with half-precision A, B and a float32
// C, products accumulated in float32 and added to C in float32 (LP64 interface, row- or column-major
// enums as in cblas.h). PyTorch's x86-64 builds link MKL into libtorch_cpu and export these; declared
// weak, they are null where the torch build has no MKL (then gemm_into_ reports false).
extern "C" {
void cblas_gemm_bf16bf16f32(int layout, int transa, int transb, int m, int n, int k, float alpha, const uint16_t* a,
                            int lda, const uint16_t* b, int ldb, float beta, float* c, int ldc) __attribute__((weak));
void cblas_gemm_f16f16f32(int layout, int transa, int transb, int m, int n, int k, float alpha, const uint16_t* a,
                          int lda, const uint16_t* b, int ldb, float beta, float* c, int ldc) __attribute__((weak));
}

namespace {

constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;

// A 2-D operand as BLAS takes it: (transposed?, leading dimension), or nullopt when neither of its
// dimensions is unit-stride or a size does not fit MKL's 32-bit integers.
std::optional<std::pair<int, int>> blas_layout(const Tensor& t) {
  const int64_t rows = t.size(0), cols = t.size(1);
  if (rows > INT_MAX || cols > INT_MAX) return std::nullopt;
  if (t.stride(1) == 1 && t.stride(0) >= std::max<int64_t>(1, cols) && t.stride(0) <= INT_MAX)
    return std::make_pair(kNoTrans, static_cast<int>(t.stride(0)));
  if (t.stride(0) == 1 && t.stride(1) >= std::max<int64_t>(1, rows) && t.stride(1) <= INT_MAX)
    return std::make_pair(kTrans, static_cast<int>(t.stride(1)));
  return std::nullopt;
}

}  // namespace

// buffer <- beta * buffer + a @ b for a contiguous float32 buffer [m, n] and bfloat16 (or float16) a [m, k],
// b [k, n], each row- or column-major, by MKL's bf16bf16f32 (f16f16f32) GEMM: the products are accumulated
// and added in float32, never rounded to the inputs' dtype, in one call (on AMX-BF16 CPUs as fast as
// the bfloat16 GEMM alone). beta == 0 ignores what the buffer held. False, with the buffer untouched,
// for tensors off the CPU, where this torch has no such GEMM or where the layouts do not fit it: the
// caller then forms the product and adds it (accumulate_).
bool gemm_into_(Tensor& buffer, const Tensor& a, const Tensor& b, double beta) {
  if (!buffer.is_cpu() || !a.is_cpu() || !b.is_cpu()) return false;
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && buffer.dim() == 2, "gemm_into_: 2-D tensors expected");
  TORCH_CHECK(a.size(1) == b.size(0) && buffer.size(0) == a.size(0) && buffer.size(1) == b.size(1),
              "gemm_into_: shapes ", a.sizes(), " @ ", b.sizes(), " do not give ", buffer.sizes());
  TORCH_CHECK(buffer.scalar_type() == at::kFloat && buffer.is_contiguous(), "gemm_into_: buffer must be contiguous float32");
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "gemm_into_: a and b must share a dtype");
  auto* gemm = a.scalar_type() == at::kBFloat16 ? cblas_gemm_bf16bf16f32
               : a.scalar_type() == at::kHalf   ? cblas_gemm_f16f16f32
                                                : nullptr;
  const auto la = blas_layout(a), lb = blas_layout(b);
  if (gemm == nullptr || !la || !lb) return false;  // blas_layout also bounds m, n and k (a's and b's sizes)
  const int m = static_cast<int>(buffer.size(0)), n = static_cast<int>(buffer.size(1)), k = static_cast<int>(a.size(1));
  if (m == 0 || n == 0) return true;
  // beta == 0 as a buffer zeroed on torch's threads and beta == 1, which MKL runs faster than its own
  // beta == 0: a chunk's head gradient [V, C]·[C, H] into a fresh float32 buffer took 564-575 against
  // 493-501 ms at V 151936, H 896, 1766 tokens, and 323-352 against 280 at V 256000, H 512, 768 tokens
  // (docs/benchmarks.md)
  if (beta == 0.0) {
    buffer.zero_();
    beta = 1.0;
  }
  if (k == 0) {
    if (beta != 1.0) buffer.mul_(beta);
    return true;
  }
  gemm(kRowMajor, la->first, lb->first, m, n, k, 1.0f, reinterpret_cast<const uint16_t*>(a.const_data_ptr()), la->second,
       reinterpret_cast<const uint16_t*>(b.const_data_ptr()), lb->second, static_cast<float>(beta), buffer.data_ptr<float>(),
       std::max(1, n));
  return true;
}

// out <- u . w for half-precision u [C, K] and w [K, H] on CPU, the reduction over K split into `parts`
// ranges run side by side, one per thread, each a single-threaded ATen GEMM (oneDNN's AMX kernel) into
// a partial [C, H] of u's dtype; the partials are added in float32 into `out` (float32, or u's dtype:
// rounded once more). oneDNN runs a whole bfloat16 [C, 32000] . [32000, 512] product of 384 to 1407
// rows on one of two threads; split so it takes 7.6 against 9.2 ms at 384 rows and 18.1 against 22.4
// at 1024, where pieces of rows give the second thread its share (robalign/ops/one_pass.py). Each
// partial is rounded once at its own scale, where the whole product is rounded once; a float32 `out`
// leaves the caller to scale the sum before rounding it.
void times_weight_split_(Tensor& out, const Tensor& u, const Tensor& w, int64_t parts) {
  TORCH_CHECK(u.dim() == 2 && w.dim() == 2 && out.dim() == 2 && u.is_cpu() && w.is_cpu() && out.is_cpu(),
              "times_weight_split_: 2-D CPU tensors expected");
  TORCH_CHECK(u.scalar_type() == w.scalar_type() && (u.scalar_type() == at::kBFloat16 || u.scalar_type() == at::kHalf),
              "times_weight_split_: u and w must both be bfloat16 or both float16, got ", u.scalar_type(), " and ",
              w.scalar_type());
  TORCH_CHECK(out.scalar_type() == at::kFloat || out.scalar_type() == u.scalar_type(),
              "times_weight_split_: out must be float32 or ", u.scalar_type(), ", got ", out.scalar_type());
  TORCH_CHECK(u.size(1) == w.size(0) && out.size(0) == u.size(0) && out.size(1) == w.size(1),
              "times_weight_split_: shapes ", u.sizes(), " @ ", w.sizes(), " do not give ", out.sizes());
  TORCH_CHECK(!out.storage().is_alias_of(u.storage()) && !out.storage().is_alias_of(w.storage()),
              "times_weight_split_: out must not share memory with u or w");
  const int64_t K = u.size(1);
  parts = std::max<int64_t>(1, std::min(parts, K));
  std::vector<Tensor> partial;
  for (int64_t p = 0; p < parts; ++p) partial.push_back(at::empty(out.sizes(), u.options()));
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    // torch's thread-local modes are not the calling thread's here: no autograd on the weight's view
    c10::InferenceMode guard;
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t k0 = K * p / parts, k1 = K * (p + 1) / parts;
      at::mm_out(partial[p], u.narrow(1, k0, k1 - k0), w.narrow(0, k0, k1 - k0));
    }
  });
  const bool in_place = out.scalar_type() == at::kFloat && out.is_contiguous();
  Tensor sum = in_place ? out : at::empty(out.sizes(), out.options().dtype(at::kFloat));
  for (int64_t p = 0; p < parts; ++p) accumulate_(sum, partial[p], p == 0 ? 0.0 : 1.0);
  if (!in_place) out.copy_(sum);
}

// An uninitialised contiguous tensor of `sizes` and `options`, backed by transparent huge pages when
// it is large (Linux, madvise mode): for workspaces kept across calls (robalign.ops.workspace), whose
// warm memory then needs far fewer TLB entries. Not for a buffer freed after one call: on a VM whose
// balloon reports free memory to the host (page_reporting, 2 MiB blocks), a fresh huge page is one the
// host took back, and its first touch costs host faults: 290-780 ms per 545 MB against ~105 ms on
// plain pages, when seconds pass between calls (docs/benchmarks.md).
Tensor empty_huge(at::IntArrayRef sizes, const at::TensorOptions& options) {
  constexpr int64_t kHuge = int64_t(1) << 21;
  int64_t numel = 1;
  for (const int64_t d : sizes) numel *= d;
  const int64_t nbytes = numel * static_cast<int64_t>(c10::elementSize(c10::typeMetaToScalarType(options.dtype())));
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (nbytes >= 4 * kHuge) {
    const int64_t size = (nbytes + kHuge - 1) / kHuge * kHuge;
    void* data = nullptr;
    if (posix_memalign(&data, kHuge, size) == 0) {
      madvise(data, size, MADV_HUGEPAGE);  // a hint: ignored where THP is off
      return at::from_blob(data, sizes, [](void* p) { std::free(p); }, options);
    }
  }
#endif
  return at::empty(sizes, options);
}

// buffer * scale in `dtype` (bfloat16 or float16), for a contiguous buffer in float32 or in `dtype`: the
// one-pass loss's last step for a half-precision head's gradient, scaled by the reduction's scalar. One
// pass (float32 product, rounded once to nearest even, as buffer.float().mul_(scale).to(dtype)): from
// float32 into `out` (a contiguous tensor of `dtype` and buffer's shape, in other memory) or, without
// one, into a fresh tensor (on plain pages, as every buffer that lives past the call: see empty_huge);
// in place (and returned) from `dtype`, where `out` must be absent.
Tensor scaled_to(const Tensor& buffer, double scale, at::ScalarType dtype, const std::optional<Tensor>& given) {
  TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kHalf, "scaled_to: dtype must be bfloat16 or float16");
  TORCH_CHECK((buffer.scalar_type() == at::kFloat || buffer.scalar_type() == dtype) && buffer.is_contiguous(),
              "scaled_to: buffer must be contiguous float32 or ", dtype);
  const bool has_out = given.has_value() && given->defined();
  if (has_out) {
    TORCH_CHECK(buffer.scalar_type() == at::kFloat, "scaled_to: out is for a float32 buffer (a ", dtype,
                " buffer is scaled in place)");
    TORCH_CHECK(given->is_cpu() && given->scalar_type() == dtype && given->is_contiguous() &&
                given->sizes() == buffer.sizes(), "scaled_to: out must be a contiguous CPU ", dtype,
                " tensor of shape ", buffer.sizes(), ", got ", given->scalar_type(), " ", given->sizes());
    TORCH_CHECK(!given->storage().is_alias_of(buffer.storage()), "scaled_to: out must not share memory with buffer");
  }
  Tensor out = buffer.scalar_type() == dtype ? buffer
               : has_out                      ? *given
                                              : at::empty(buffer.sizes(), buffer.options().dtype(dtype));
  const float s = static_cast<float>(scale);
  const int64_t n = buffer.numel();
  AT_DISPATCH_REDUCED_FLOATING_TYPES(dtype, "scaled_to", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    const bool narrow = buffer.scalar_type() == at::kFloat;
    const float* in32 = narrow ? buffer.const_data_ptr<float>() : nullptr;
    at::parallel_for(0, n, 1 << 16, [&](int64_t begin, int64_t end) {
      constexpr int64_t kBlock = 4096;
      float tmp[kBlock];
      for (int64_t i0 = begin; i0 < end; i0 += kBlock) {
        const int64_t len = std::min(kBlock, end - i0);
        if (narrow) {
          at::vec::map([s](Vec v) { return v * Vec(s); }, tmp, in32 + i0, len);
        } else {
          at::vec::convert(o + i0, tmp, len);
          at::vec::map([s](Vec v) { return v * Vec(s); }, tmp, tmp, len);
        }
        at::vec::convert(tmp, o + i0, len);
      }
    });
  });
  return out;
}

// How many threads at::parallel_for ran `n` unit tasks on: the test that the extension was built with
// torch's parallel backend (built without -fopenmp, its parallel_for runs serially).
int64_t parallel_threads(int64_t n) {
  std::vector<std::atomic<int>> seen(at::get_num_threads());
  at::parallel_for(0, n, 1, [&](int64_t, int64_t) {
    const int t = at::get_thread_num();
    if (t >= 0 && t < static_cast<int>(seen.size())) seen[t].store(1);
    const auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(2);
    while (std::chrono::steady_clock::now() < until) {
    }  // each task long enough that one thread cannot take them all before the others start
  });
  int64_t used = 0;
  for (const auto& s : seen) used += s.load();
  return used;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "robalign C++ CPU kernels (see csrc/logps_cpu.cpp)";
  m.def("rows_lse_target", &rows_lse_target, "per-row logsumexp and label logit of [B, T, V] (transformed) logits",
        py::arg("logits3d"), py::arg("labels"), py::arg("ignore_index"), py::arg("scale") = 1.0, py::arg("softcap") = 0.0);
  m.def("rows_softmax_grad", &rows_softmax_grad, "coeff * (onehot - softmax) * dz'/dz per row, into out (may alias logits)",
        py::arg("logits3d"), py::arg("labels"), py::arg("lse"), py::arg("coeff"), py::arg("ignore_index"), py::arg("out3d"),
        py::arg("scale") = 1.0, py::arg("softcap") = 0.0);
  m.def("rows_lse_target_grad", &rows_lse_target_grad, "lse, label logit and (onehot - softmax) * dz'/dz per row, in one visit",
        py::arg("logits3d"), py::arg("labels"), py::arg("ignore_index"), py::arg("out3d"), py::arg("scale") = 1.0,
        py::arg("softcap") = 0.0);
  m.def("cols_lse_target_grad", &cols_lse_target_grad,
        "lse, label logit and onehot - softmax of each column of float32 [V, C] logits (a column per token); "
        "ok False where it does not apply", py::arg("logits_t"), py::arg("labels"), py::arg("ignore_index"), py::arg("out"));
  m.def("scaled_to", &scaled_to,
        "buffer * scale in a half-precision dtype, one pass (buffer: contiguous float32, into out or a fresh tensor; or in dtype: in place)",
        py::arg("buffer"), py::arg("scale"), py::arg("dtype"), py::arg("out") = py::none());
  m.def("parallel_threads", &parallel_threads, "how many threads at::parallel_for runs n unit tasks on", py::arg("n"));
  m.def("rows_token_stats", &rows_token_stats, "lse, entropy, mean logit and top-1 of each scored row, in one visit",
        py::arg("logits3d"), py::arg("labels"), py::arg("ignore_index"), py::arg("scale") = 1.0, py::arg("softcap") = 0.0);
  m.def("labels_are_argmax", &labels_are_argmax,
        "whether each token's label is the first maximum of its logits ([C, V] rows, or [V, C] with columns)",
        py::arg("logits"), py::arg("labels"), py::arg("columns") = false);
  m.def("gemm_into_", &gemm_into_, "buffer <- beta * buffer + a @ b, half-precision a, b into a float32 buffer by MKL; False where unavailable",
        py::arg("buffer"), py::arg("a"), py::arg("b"), py::arg("beta"));
  m.def("transpose_into_", &transpose_into_, "out <- src^T for bfloat16/float16 src [M, N] and out [N, M], unit-stride rows",
        py::arg("out"), py::arg("src"));
  m.def("times_weight_split_", &times_weight_split_,
        "out <- u @ w for half-precision u, w: the reduction split into `parts` ranges run side by side, added in float32",
        py::arg("out"), py::arg("u"), py::arg("w"), py::arg("parts"));
  m.def("accumulate_", &accumulate_, "buffer <- beta * buffer + product, a float32 buffer, in one pass",
        py::arg("buffer"), py::arg("product"), py::arg("beta"));
  m.def("empty_huge", [](std::vector<int64_t> sizes, at::ScalarType dtype) { return empty_huge(sizes, at::TensorOptions().dtype(dtype)); },
        "uninitialised contiguous CPU tensor of `sizes` and `dtype`, on huge pages when large", py::arg("sizes"), py::arg("dtype"));
  // read here, not through torch.UntypedStorage: a Python storage object, once made, stays tied to its
  // storage and counts as a holder, and autograd then adds a gradient into that tensor out of place
  m.def("storage_use_count", [](const Tensor& t) { return t.has_storage() ? t.storage().use_count() : 0; },
        "how many holders t's storage has (tensors sharing it, views, ...)", py::arg("t"));
}
