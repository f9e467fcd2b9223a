// One AdamW step for CPU (float32), fused into a single pass, as an XLA FFI
// custom call.
//
// Why: XLA on CPU splits optax's clip + AdamW + apply chain into several
// elementwise fusions, and YNNPACK's fusions materialise every per-step
// scalar (learning rate, bias corrections, clip factor) as a full-size
// broadcast, so the update streams each parameter-sized array through memory
// several times. Here every element of the parameter, gradient and both
// moments is read once and written once. The arithmetic is optax's, in
// optax's order, each operation rounded on its own (compiled without FMA
// contraction), so the result matches `optax.chain(clip_by_global_norm,
// adamw)` to float32 rounding (XLA may contract some multiply-adds).
//
// Inputs: param, grad, mu, nu (same shape) and a float32 [6] vector of
// per-step scalars: clip (1 = scale the gradient), global norm, max norm,
// 1 - b1^t, 1 - b2^t, -learning rate. Attributes: b1, 1 - b1, b2, 1 - b2,
// eps, weight decay (0 where masked). Outputs (aliased to param, mu, nu by
// the caller): the new param, mu and nu.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kChunk = 1 << 15;  // elements per task (128 KiB per array)

struct Step {
  bool clip;
  float norm, max_norm, correction1, correction2, step_size;
  float b1, one_minus_b1, b2, one_minus_b2, eps, weight_decay;
};

template <bool kClip, bool kDecay>
void update_range(const Step& s, const float* grad, float* param, float* mu,
                  float* nu, const float* param_in, const float* mu_in,
                  const float* nu_in, int64_t begin, int64_t end) {
#pragma GCC ivdep
  for (int64_t i = begin; i < end; ++i) {
    float g = grad[i];
    if (kClip) g = (g / s.norm) * s.max_norm;
    const float m = s.one_minus_b1 * g + s.b1 * mu_in[i];
    const float v = s.one_minus_b2 * (g * g) + s.b2 * nu_in[i];
    float u = (m / s.correction1) / (std::sqrt(v / s.correction2) + s.eps);
    const float p = param_in[i];
    if (kDecay) u = u + s.weight_decay * p;
    param[i] = p + s.step_size * u;
    mu[i] = m;
    nu[i] = v;
  }
}

// Splits [0, n) into chunks claimed by the FFI pool's threads and the caller.
template <class Body>
void parallel_chunks(ffi::ThreadPool& pool, int64_t n, const Body& body) {
  const int64_t tasks = (n + kChunk - 1) / kChunk;
  struct Shared {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto shared = std::make_shared<Shared>();
  auto work = [shared, tasks, n, &body] {
    for (int64_t t; (t = shared->next.fetch_add(1)) < tasks;) {
      body(t * kChunk, std::min(n, (t + 1) * kChunk));
      shared->done.fetch_add(1);
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), tasks) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule(decltype(work)(work));
  work();
  while (shared->done.load() < tasks) std::this_thread::yield();
}

ffi::Error adamw(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> param,
                 ffi::Buffer<ffi::F32> grad, ffi::Buffer<ffi::F32> mu,
                 ffi::Buffer<ffi::F32> nu, ffi::Buffer<ffi::F32> scalars,
                 ffi::ResultBuffer<ffi::F32> param_out,
                 ffi::ResultBuffer<ffi::F32> mu_out,
                 ffi::ResultBuffer<ffi::F32> nu_out, float b1,
                 float one_minus_b1, float b2, float one_minus_b2, float eps,
                 float weight_decay) {
  const int64_t n = param.element_count();
  if (grad.element_count() != n || mu.element_count() != n ||
      nu.element_count() != n || param_out->element_count() != n ||
      mu_out->element_count() != n || nu_out->element_count() != n) {
    return ffi::Error::InvalidArgument(
        "fused AdamW: param, grad, mu and nu must have the same size");
  }
  if (scalars.element_count() != 6) {
    return ffi::Error::InvalidArgument(
        "fused AdamW: the per-step scalars must be a float32 [6] vector");
  }
  const float* k = scalars.typed_data();
  const Step s{k[0] != 0.0f, k[1], k[2], k[3], k[4], k[5],
               b1,  one_minus_b1, b2, one_minus_b2, eps, weight_decay};
  const float* g = grad.typed_data();
  const float* p_in = param.typed_data();
  const float* m_in = mu.typed_data();
  const float* v_in = nu.typed_data();
  float* p = param_out->typed_data();
  float* m = mu_out->typed_data();
  float* v = nu_out->typed_data();
  const bool decay = weight_decay != 0.0f;
  parallel_chunks(pool, n, [&](int64_t begin, int64_t end) {
    if (s.clip && decay) {
      update_range<true, true>(s, g, p, m, v, p_in, m_in, v_in, begin, end);
    } else if (s.clip) {
      update_range<true, false>(s, g, p, m, v, p_in, m_in, v_in, begin, end);
    } else if (decay) {
      update_range<false, true>(s, g, p, m, v, p_in, m_in, v_in, begin, end);
    } else {
      update_range<false, false>(s, g, p, m, v, p_in, m_in, v_in, begin, end);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MllmAdamW, adamw,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("b1")
                                  .Attr<float>("one_minus_b1")
                                  .Attr<float>("b2")
                                  .Attr<float>("one_minus_b2")
                                  .Attr<float>("eps")
                                  .Attr<float>("weight_decay"));
