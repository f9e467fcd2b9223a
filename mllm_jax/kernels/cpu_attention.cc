// Fused softmax attention for CPU (float32), as XLA FFI custom calls.
//
// Why: on CPU, XLA runs attention as separate batched GEMMs and elementwise
// passes over [B, H, T, S] scores. Each head's 256x64x256 product is too
// small for the GEMM library to reach its peak, and every pass streams the
// scores through memory. Here one task owns a (batch, KV head) pair: it packs
// K and V once, then for each query block of 64 rows computes scores, softmax
// and the output while the block stays in cache, and skips the key columns
// that the additive bias masks for every row of the block (the causal upper
// triangle). The backward pass recomputes the probabilities from the saved
// log-sum-exp, as flash attention does; rowsum(dO * O) comes in precomputed.
//
// Layouts: q [B, T, H, D]; k, v [B, S, KV, D] (H a multiple of KV); bias
// [B, 1 or H, T, S], additive (0 or an ALiBi slope where allowed, a value
// <= kMasked where not); out [B, T, H, D]; lse [B, H, T].

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <thread>
#include <vector>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// One vector register of floats: 16 lanes with AVX-512, else 8 (AVX2).
// Wider GCC vectors than the hardware's are lowered through the stack,
// which made the kernel about 4x slower than XLA's attention on AVX2 hosts.
#ifdef __AVX512F__
constexpr int kLanes = 16;
#else
constexpr int kLanes = 8;
#endif
typedef float vfloat __attribute__((vector_size(4 * kLanes)));
typedef float vfloat_u __attribute__((vector_size(4 * kLanes), aligned(4)));
typedef int32_t vint __attribute__((vector_size(4 * kLanes)));
constexpr int kBlockRows = 64;  // query rows per block
// Bias values at or below this are masked (MASK_VALUE in attention.py is
// -0.7 * float max; ALiBi biases are far above it).
constexpr float kMasked = -0.35f * std::numeric_limits<float>::max();

inline vfloat load(const float* p) {
  return *reinterpret_cast<const vfloat_u*>(p);
}
inline void store(float* p, vfloat x) { *reinterpret_cast<vfloat_u*>(p) = x; }
inline vfloat splat(float x) { return vfloat{} + x; }
inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
inline void copy_floats(float* dst, const float* src, int64_t n) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) store(dst + i, load(src + i));
  for (; i < n; ++i) dst[i] = src[i];
}

// exp on kLanes lanes: 2^n * p(r) with r = x - n ln2, |r| <= ln2 / 2, degree-6
// Taylor polynomial (relative error ~1e-7); exactly 0 below -87.
inline vfloat vexp(vfloat x) {
  const vfloat lo = splat(-87.0f);
  vfloat xc = x < lo ? lo : x;
  xc = xc > splat(88.0f) ? splat(88.0f) : xc;
  const vfloat magic = splat(12582912.0f);  // 1.5 * 2^23: round to nearest
  vfloat n = (xc * splat(1.44269504f) + magic) - magic;
  vfloat r = xc - n * splat(0.693359375f);
  r = r - n * splat(-2.12194440e-4f);
  vfloat p = splat(1.0f / 720);
  p = p * r + splat(1.0f / 120);
  p = p * r + splat(1.0f / 24);
  p = p * r + splat(1.0f / 6);
  p = p * r + splat(0.5f);
  p = p * r + splat(1.0f);
  p = p * r + splat(1.0f);
  vint bits = (__builtin_convertvector(n, vint) + 127) << 23;
  vfloat result = p * (vfloat)bits;
  return x < lo ? vfloat{} : result;
}

inline float hmax(vfloat x) {
  float m = x[0];
  for (int i = 1; i < kLanes; ++i) m = std::max(m, x[i]);
  return m;
}
inline float hsum(vfloat x) {
  float s = 0;
  for (int i = 0; i < kLanes; ++i) s += x[i];
  return s;
}

// C[i][0:kLanes*NV] (+)= sum_k A_i[k * step] * B[k][0:kLanes*NV] for MR
// rows. A's rows are given by pointers, so strided inputs need no copy, and
// `step` lets A be read transposed (A_i = column i of a row-major block).
template <int MR, int NV>
void tile(const float* const* a, int64_t step, int64_t K, const float* b,
          int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  vfloat acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NV; ++j)
      acc[i][j] = accumulate ? load(c + i * ldc + j * kLanes) : vfloat{};
  for (int64_t k = 0; k < K; ++k) {
    vfloat bv[NV];
    for (int j = 0; j < NV; ++j) bv[j] = load(b + k * ldb + j * kLanes);
    for (int i = 0; i < MR; ++i) {
      const vfloat av = splat(a[i][k * step]);
      for (int j = 0; j < NV; ++j) acc[i][j] += av * bv[j];
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NV; ++j) store(c + i * ldc + j * kLanes, acc[i][j]);
}

using TileFn = void (*)(const float* const*, int64_t, int64_t, const float*,
                        int64_t, float*, int64_t, bool);
// 6 x 4 (AVX-512) or 6 x 2 (AVX2) accumulators: 24 of 32 or 12 of 16
// registers, the rest for B's vectors and A's broadcast.
#ifdef __AVX512F__
constexpr int kTileRows = 6, kTileVecs = 4;
#else
constexpr int kTileRows = 6, kTileVecs = 2;
#endif

template <int MR>
constexpr TileFn row_of_tiles(int nv) {
  return nv == 1 ? tile<MR, 1> : nv == 2 ? tile<MR, 2>
       : nv == 3 ? tile<MR, 3> : tile<MR, 4>;
}
TileFn tile_fn(int mr, int nv) {
  switch (mr) {
    case 1: return row_of_tiles<1>(nv);
    case 2: return row_of_tiles<2>(nv);
    case 3: return row_of_tiles<3>(nv);
    case 4: return row_of_tiles<4>(nv);
    case 5: return row_of_tiles<5>(nv);
    default: return row_of_tiles<6>(nv);
  }
}

// C[M][N] (+)= A[M][K] B[K][N], N a multiple of kLanes; A[i][k] is
// a[i][k*step].
void gemm(const float* const* a, int64_t step, int64_t M, int64_t K,
          const float* b, int64_t ldb, int64_t N, float* c, int64_t ldc,
          bool accumulate) {
  for (int64_t n0 = 0; n0 < N; n0 += kTileVecs * kLanes) {
    const int nv = std::min<int64_t>(kTileVecs, (N - n0) / kLanes);
    for (int64_t m0 = 0; m0 < M; m0 += kTileRows) {
      const int mr = std::min<int64_t>(kTileRows, M - m0);
      tile_fn(mr, nv)(a + m0, step, K, b + n0, ldb, c + m0 * ldc + n0, ldc,
                      accumulate);
    }
  }
}

// Runs body(task, scratch) for every task on the FFI thread pool. Workers
// claim tasks from a shared counter and the caller works too, so it only
// ever waits for tasks that a running worker has claimed.
template <class Scratch, class Body>
void parallel_for(ffi::ThreadPool& pool, int64_t tasks, const Body& body) {
  struct Shared {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto shared = std::make_shared<Shared>();
  auto work = [shared, tasks, &body] {
    std::unique_ptr<Scratch> scratch;
    for (int64_t t; (t = shared->next.fetch_add(1)) < tasks;) {
      if (!scratch) scratch = std::make_unique<Scratch>();
      body(t, *scratch);
      shared->done.fetch_add(1);
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), tasks) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule(decltype(work)(work));
  work();
  while (shared->done.load() < tasks) std::this_thread::yield();
}

struct Dims {
  int64_t B, T, S, H, KV, D, bias_heads, G, Sp, Dp;
  float scale;
  Dims(ffi::Span<const int64_t> q, ffi::Span<const int64_t> k,
       ffi::Span<const int64_t> bias)
      : B(q[0]), T(q[1]), S(k[1]), H(q[2]), KV(k[2]), D(q[3]),
        bias_heads(bias[1]), G(q[2] / k[2]), Sp(round_up(k[1], kLanes)),
        Dp(round_up(q[3], kLanes)), scale(1.0f / std::sqrt(float(q[3]))) {}
  const float* q_row(const float* q, int64_t b, int64_t t, int64_t h) const {
    return q + ((b * T + t) * H + h) * D;
  }
  const float* kv_row(const float* k, int64_t b, int64_t s, int64_t kv) const {
    return k + ((b * S + s) * KV + kv) * D;
  }
  const float* bias_row(const float* bias, int64_t b, int64_t h,
                        int64_t t) const {
    return bias + ((b * bias_heads + (bias_heads == 1 ? 0 : h)) * T + t) * S;
  }
};

// At least n floats (contents kept when already large enough).
std::vector<float>& sized(std::vector<float>& v, int64_t n) {
  if (int64_t(v.size()) < n) v.resize(n);
  return v;
}

// Exactly the first n floats zeroed (at least n allocated).
void zeroed(std::vector<float>& v, int64_t n) {
  sized(v, n);
  std::fill(v.begin(), v.begin() + n, 0.0f);
}

// Per-worker buffers, reused across that worker's tasks.
struct Scratch {
  std::vector<float> kt, vt, kp, vp, s, p, cbuf, qblk, doblk, dk, dv;
  std::vector<const float*> rows;
  std::vector<int64_t> ends;
};

#ifdef __AVX512F__
// dst[c * ld + l] = rows[l][col + c] for 16 rows and 16 columns (a null row
// reads as zeros): three rounds of interleaving, pairs, quads, 128-bit lanes.
void transpose16(const float* const* rows, int64_t col, float* dst,
                 int64_t ld) {
  __m512 r[16], t[16], u[16], v[16];
  for (int l = 0; l < 16; ++l)
    r[l] = rows[l] ? _mm512_loadu_ps(rows[l] + col) : _mm512_setzero_ps();
  for (int l = 0; l < 16; l += 2) {
    t[l] = _mm512_unpacklo_ps(r[l], r[l + 1]);
    t[l + 1] = _mm512_unpackhi_ps(r[l], r[l + 1]);
  }
  for (int l = 0; l < 16; l += 4) {
    const auto pd = [](__m512 x) { return _mm512_castps_pd(x); };
    u[l] = _mm512_castpd_ps(_mm512_unpacklo_pd(pd(t[l]), pd(t[l + 2])));
    u[l + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(pd(t[l]), pd(t[l + 2])));
    u[l + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(pd(t[l + 1]), pd(t[l + 3])));
    u[l + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(pd(t[l + 1]), pd(t[l + 3])));
  }
  // u[4g + c] holds column 4j + c of rows 4g..4g+3 in 128-bit lane j.
  for (int g = 0; g < 16; g += 8)
    for (int c = 0; c < 4; ++c) {
      v[g + c] = _mm512_shuffle_f32x4(u[g + c], u[g + 4 + c], 0x88);
      v[g + 4 + c] = _mm512_shuffle_f32x4(u[g + c], u[g + 4 + c], 0xdd);
    }
  for (int c = 0; c < 8; ++c) {
    _mm512_storeu_ps(dst + c * ld,
                     _mm512_shuffle_f32x4(v[c], v[8 + c], 0x88));
    _mm512_storeu_ps(dst + (c + 8) * ld,
                     _mm512_shuffle_f32x4(v[c], v[8 + c], 0xdd));
  }
}
#endif

// K or V of one (batch, KV head): transposed [D][Sp] and padded [Sp][Dp],
// zero outside the data. The transpose goes kLanes keys at a time, so its
// writes are whole vectors and its reads stay within kLanes rows.
void pack(const Dims& d, const float* x, int64_t b, int64_t kv,
          std::vector<float>* transposed, std::vector<float>* padded) {
  if (padded) {
    zeroed(*padded, d.Sp * d.Dp);
    for (int64_t s = 0; s < d.S; ++s)
      copy_floats(padded->data() + s * d.Dp, d.kv_row(x, b, s, kv), d.D);
  }
  if (!transposed) return;
  sized(*transposed, d.D * d.Sp);
  for (int64_t s0 = 0; s0 < d.Sp; s0 += kLanes) {
    const float* rows[kLanes];
    for (int l = 0; l < kLanes; ++l)
      rows[l] = s0 + l < d.S ? d.kv_row(x, b, s0 + l, kv) : nullptr;
    int64_t i = 0;
#ifdef __AVX512F__
    for (; i + kLanes <= d.D; i += kLanes)
      transpose16(rows, i, transposed->data() + i * d.Sp + s0, d.Sp);
#endif
    for (; i < d.D; ++i) {
      vfloat col;
      for (int l = 0; l < kLanes; ++l) col[l] = rows[l] ? rows[l][i] : 0.0f;
      store(transposed->data() + i * d.Sp + s0, col);
    }
  }
}

// For each query row of (b, h): one past its last unmasked key, 0 if none.
void row_ends(const Dims& d, const float* bias, int64_t b, int64_t h,
              std::vector<int64_t>& ends) {
  ends.resize(d.T);
  const vfloat masked = splat(kMasked);
  for (int64_t t = 0; t < d.T; ++t) {
    const float* row = d.bias_row(bias, b, h, t);
    int64_t last = d.S - 1;
    // Whole masked chunks of kLanes first, then single keys.
    for (; last + 1 >= kLanes; last -= kLanes) {
      const vfloat chunk = load(row + last + 1 - kLanes);
#ifdef __AVX512F__
      const unsigned open = _mm512_cmp_ps_mask(chunk, masked, _CMP_GT_OQ);
      if (open) {
        last += 1 - kLanes + (31 - __builtin_clz(open));
        break;
      }
#else
      const auto open = chunk > masked;
      bool any = false;
      for (int l = 0; l < kLanes; ++l) any |= open[l] != 0;
      if (any) break;
#endif
    }
    while (last >= 0 && row[last] <= kMasked) --last;
    ends[t] = last + 1;
  }
}

// Keys [0, end) hold every unmasked key of rows [t0, t0 + rows); a row with
// no unmasked key needs all S (the reference softmax is uniform there).
int64_t key_end(const Dims& d, const std::vector<int64_t>& ends, int64_t t0,
                int64_t rows) {
  int64_t end = 0;
  for (int64_t r = t0; r < t0 + rows; ++r) {
    if (ends[r] == 0) return d.S;
    end = std::max(end, ends[r]);
  }
  return end;
}

// Scores of one row, scaled and biased, over columns [0, cols) (a multiple
// of kLanes); columns >= end are -inf.
inline vfloat biased(const Dims& d, const float* s, const float* bias_row,
                     int64_t c, int64_t end) {
  vfloat bias;
  if (c + kLanes <= d.S) {
    bias = load(bias_row + c);
  } else {
    for (int i = 0; i < kLanes; ++i)
      bias[i] = c + i < d.S ? bias_row[c + i] : kMasked;
  }
  vfloat x = load(s + c) * splat(d.scale) + bias;
  if (c + kLanes > end) {
    for (int i = 0; i < kLanes; ++i)
      if (c + i >= end) x[i] = -std::numeric_limits<float>::infinity();
  }
  return x;
}

// Query rows [t0, t0 + rows) of head h: scores S = Q K^T over keys
// [0, cols) into scratch.s (row stride Sp).
void scores(const Dims& d, const float* q, int64_t b, int64_t h, int64_t t0,
            int64_t rows, int64_t cols, Scratch& w) {
  w.rows.resize(rows);
  for (int64_t r = 0; r < rows; ++r) w.rows[r] = d.q_row(q, b, t0 + r, h);
  gemm(w.rows.data(), 1, rows, d.D, w.kt.data(), d.Sp, cols, w.s.data(), d.Sp,
       false);
}

void copy_rows_out(const Dims& d, const float* src, float* dst_base,
                   int64_t b, int64_t h, int64_t t0, int64_t rows) {
  for (int64_t r = 0; r < rows; ++r)
    copy_floats(dst_base + ((b * d.T + t0 + r) * d.H + h) * d.D,
                src + r * d.Dp, d.D);
}

void forward_task(const Dims& d, int64_t task, const float* q, const float* k,
                  const float* v, const float* bias, float* out, float* lse,
                  Scratch& w) {
  const int64_t b = task / d.KV, kv = task % d.KV;
  pack(d, k, b, kv, &w.kt, nullptr);
  pack(d, v, b, kv, nullptr, &w.vp);
  sized(w.s, kBlockRows * d.Sp);
  sized(w.cbuf, kBlockRows * d.Dp);
  std::vector<const float*> prow(kBlockRows);
  float totals[kBlockRows];
  for (int64_t h = kv * d.G; h < (kv + 1) * d.G; ++h) {
    if (h == kv * d.G || d.bias_heads > 1) row_ends(d, bias, b, h, w.ends);
    for (int64_t t0 = 0; t0 < d.T; t0 += kBlockRows) {
      const int64_t rows = std::min<int64_t>(kBlockRows, d.T - t0);
      const int64_t end = key_end(d, w.ends, t0, rows);
      const int64_t cols = round_up(end, kLanes);
      scores(d, q, b, h, t0, rows, cols, w);
      for (int64_t r = 0; r < rows; ++r) {
        float* s = w.s.data() + r * d.Sp;
        const float* brow = d.bias_row(bias, b, h, t0 + r);
        vfloat m = splat(-std::numeric_limits<float>::infinity());
        for (int64_t c = 0; c < cols; c += kLanes) {
          const vfloat x = biased(d, s, brow, c, end);
          store(s + c, x);
          m = x > m ? x : m;
        }
        const float row_max = hmax(m);
        vfloat sum{};
        for (int64_t c = 0; c < cols; c += kLanes) {
          const vfloat e = vexp(load(s + c) - splat(row_max));
          store(s + c, e);
          sum += e;
        }
        const float total = hsum(sum);
        totals[r] = total;
        lse[(b * d.H + h) * d.T + t0 + r] = row_max + std::log(total);
        prow[r] = s;
      }
      // Normalised after the product: D divisions per row instead of S.
      gemm(prow.data(), 1, rows, cols, w.vp.data(), d.Dp, d.Dp,
           w.cbuf.data(), d.Dp, false);
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < d.Dp; c += kLanes)
          store(w.cbuf.data() + r * d.Dp + c,
                load(w.cbuf.data() + r * d.Dp + c) / splat(totals[r]));
      copy_rows_out(d, w.cbuf.data(), out, b, h, t0, rows);
    }
  }
}

// deltas [B, T, H]: rowsum(dO * O), formed by XLA in one streaming pass
// (read here row by row, O's strided rows would miss the cache).
void backward_task(const Dims& d, int64_t task, const float* q,
                   const float* k, const float* v, const float* bias,
                   const float* deltas, const float* lse, const float* dout,
                   float* dq, float* dk, float* dv, Scratch& w) {
  const int64_t b = task / d.KV, kv = task % d.KV;
  pack(d, k, b, kv, &w.kt, &w.kp);
  pack(d, v, b, kv, &w.vt, nullptr);
  zeroed(w.dk, d.Sp * d.Dp);
  zeroed(w.dv, d.Sp * d.Dp);
  sized(w.s, kBlockRows * d.Sp);
  sized(w.p, kBlockRows * d.Sp);
  sized(w.cbuf, kBlockRows * d.Dp);
  zeroed(w.qblk, kBlockRows * d.Dp);
  zeroed(w.doblk, kBlockRows * d.Dp);
  std::vector<const float*> rows_a(std::max<int64_t>(kBlockRows, d.Sp));
  const float uniform = 1.0f / float(d.S);
  for (int64_t h = kv * d.G; h < (kv + 1) * d.G; ++h) {
    if (h == kv * d.G || d.bias_heads > 1) row_ends(d, bias, b, h, w.ends);
    for (int64_t t0 = 0; t0 < d.T; t0 += kBlockRows) {
      const int64_t rows = std::min<int64_t>(kBlockRows, d.T - t0);
      const int64_t end = key_end(d, w.ends, t0, rows);
      const int64_t cols = round_up(end, kLanes);
      scores(d, q, b, h, t0, rows, cols, w);  // w.s = Q K^T
      // w.p = dO V^T
      for (int64_t r = 0; r < rows; ++r)
        rows_a[r] = d.q_row(dout, b, t0 + r, h);
      gemm(rows_a.data(), 1, rows, d.D, w.vt.data(), d.Sp, cols, w.p.data(),
           d.Sp, false);
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t t = t0 + r;
        const float row_lse = lse[(b * d.H + h) * d.T + t];
        const bool masked_row = row_lse <= kMasked;
        const float* g = d.q_row(dout, b, t, h);
        const float delta = deltas[(b * d.T + t) * d.H + h];
        float* s = w.s.data() + r * d.Sp;
        float* dp = w.p.data() + r * d.Sp;
        const float* brow = d.bias_row(bias, b, h, t);
        for (int64_t c = 0; c < cols; c += kLanes) {
          vfloat p = masked_row
                      ? splat(uniform)
                      : vexp(biased(d, s, brow, c, end) - splat(row_lse));
          if (masked_row && c + kLanes > d.S)
            for (int i = 0; i < kLanes; ++i)
              if (c + i >= d.S) p[i] = 0;
          const vfloat ds = masked_row ? vfloat{}
                         : p * (load(dp + c) - splat(delta)) * splat(d.scale);
          store(s + c, p);
          store(dp + c, ds);
        }
        copy_floats(w.qblk.data() + r * d.Dp, d.q_row(q, b, t, h), d.D);
        copy_floats(w.doblk.data() + r * d.Dp, g, d.D);
      }
      // dQ = dS K
      for (int64_t r = 0; r < rows; ++r) rows_a[r] = w.p.data() + r * d.Sp;
      gemm(rows_a.data(), 1, rows, cols, w.kp.data(), d.Dp, d.Dp,
           w.cbuf.data(), d.Dp, false);
      copy_rows_out(d, w.cbuf.data(), dq, b, h, t0, rows);
      // dV += P^T dO and dK += dS^T Q: P and dS read down their columns.
      for (int64_t c = 0; c < cols; ++c) rows_a[c] = w.s.data() + c;
      gemm(rows_a.data(), d.Sp, cols, rows, w.doblk.data(), d.Dp, d.Dp,
           w.dv.data(), d.Dp, true);
      for (int64_t c = 0; c < cols; ++c) rows_a[c] = w.p.data() + c;
      gemm(rows_a.data(), d.Sp, cols, rows, w.qblk.data(), d.Dp, d.Dp,
           w.dk.data(), d.Dp, true);
    }
  }
  for (int64_t s = 0; s < d.S; ++s) {
    copy_floats(dk + ((b * d.S + s) * d.KV + kv) * d.D, w.dk.data() + s * d.Dp,
                d.D);
    copy_floats(dv + ((b * d.S + s) * d.KV + kv) * d.D, w.dv.data() + s * d.Dp,
                d.D);
  }
}

// The layouts the header names; anything else would read out of bounds.
ffi::Error check(ffi::Span<const int64_t> q, ffi::Span<const int64_t> k,
                 ffi::Span<const int64_t> v, ffi::Span<const int64_t> bias) {
  if (q.size() != 4 || k.size() != 4 || v.size() != 4 || bias.size() != 4)
    return ffi::Error::InvalidArgument("q, k, v and bias must be 4-D");
  for (int i = 0; i < 4; ++i)
    if (k[i] != v[i])
      return ffi::Error::InvalidArgument("k and v shapes differ");
  if (k[0] != q[0] || k[3] != q[3])
    return ffi::Error::InvalidArgument(
        "k's batch or head size differs from q's");
  if (k[2] <= 0 || q[2] % k[2] != 0)
    return ffi::Error::InvalidArgument(
        "query heads must be a multiple of KV heads");
  if (bias[0] != q[0] || bias[2] != q[1] || bias[3] != k[1] ||
      (bias[1] != 1 && bias[1] != q[2]))
    return ffi::Error::InvalidArgument("bias must be [B, 1 or H, T, S]");
  return ffi::Error::Success();
}

ffi::Error forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                   ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                   ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> out,
                   ffi::ResultBuffer<ffi::F32> lse) {
  if (ffi::Error e = check(q.dimensions(), k.dimensions(), v.dimensions(),
                           bias.dimensions());
      e.failure())
    return e;
  const Dims d(q.dimensions(), k.dimensions(), bias.dimensions());
  parallel_for<Scratch>(pool, d.B * d.KV, [&](int64_t task, Scratch& w) {
    forward_task(d, task, q.typed_data(), k.typed_data(), v.typed_data(),
                 bias.typed_data(), out->typed_data(), lse->typed_data(), w);
  });
  return ffi::Error::Success();
}

ffi::Error backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                    ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                    ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> deltas,
                    ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> dout,
                    ffi::ResultBuffer<ffi::F32> dq,
                    ffi::ResultBuffer<ffi::F32> dk,
                    ffi::ResultBuffer<ffi::F32> dv) {
  if (ffi::Error e = check(q.dimensions(), k.dimensions(), v.dimensions(),
                           bias.dimensions());
      e.failure())
    return e;
  const Dims d(q.dimensions(), k.dimensions(), bias.dimensions());
  parallel_for<Scratch>(pool, d.B * d.KV, [&](int64_t task, Scratch& w) {
    backward_task(d, task, q.typed_data(), k.typed_data(), v.typed_data(),
                  bias.typed_data(), deltas.typed_data(), lse.typed_data(),
                  dout.typed_data(), dq->typed_data(), dk->typed_data(),
                  dv->typed_data(), w);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MllmAttentionForward, forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MllmAttentionBackward, backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
