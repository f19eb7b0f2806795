/* Fused element-wise kernels for CPU inference and training (float32, row-major, single-threaded).
 *
 * Written with GCC/Clang vector extensions, one register wide: 16 lanes with AVX-512 (-march=native
 * on machines that have it), 8 otherwise. GCC 12 lowers a 16-lane vector on AVX2 to scalar
 * compares, selects and conversions (vmin, vsel, vexp's rounding): a 3x slower MPPI value
 * estimate. No -ffast-math: the exp below relies on exact float rounding. Built by
 * agent/native/build.py, bound by agent/native/bindings.py.
 *
 * ABI checked at load time: every exported function is preceded by SIGNATURE(name, "r:args"), one
 * character per argument (p pointer, l int64_t, i int, f float, d double; r the result, v void),
 * which bindings.py compares with its ctypes table; the structs handed over by pointer are
 * described by native_layout() (sizes and field offsets), compared with their ctypes mirrors.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif
#ifdef __SSE__
#include <xmmintrin.h>
#endif
/* exported `const char name__signature[]`: the function's argument kinds, read by bindings.py */
#define SIGNATURE(name, kinds) const char name##__signature[] = kinds;

#ifdef _OPENMP
#include <omp.h>
static inline int thread_index(void) { return omp_get_thread_num(); }
#else
static inline int thread_index(void) { return 0; }
#endif

#ifdef __AVX512F__
#define LANES 16
#else
#define LANES 8
#endif
typedef float vf __attribute__((vector_size(LANES * 4)));
typedef int32_t vi __attribute__((vector_size(LANES * 4)));

static inline vf splat(float v) { return (vf){0} + v; }
static inline vf load(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void store(float *p, vf v) { memcpy(p, &v, sizeof v); }
static inline vf load_part(const float *p, int64_t n, float fill) {
  vf v = splat(fill);
  memcpy(&v, p, (size_t)n * sizeof(float));
  return v;
}
static inline void store_part(float *p, vf v, int64_t n) { memcpy(p, &v, (size_t)n * sizeof(float)); }
/* lanes of a where mask is set (all ones), of b elsewhere */
static inline vf vsel(vi mask, vf a, vf b) {
  vi ai, bi;
  memcpy(&ai, &a, sizeof ai);
  memcpy(&bi, &b, sizeof bi);
  vi out = (mask & ai) | (~mask & bi);
  vf result;
  memcpy(&result, &out, sizeof result);
  return result;
}
static inline vf vmin(vf a, vf b) { return vsel(a < b, a, b); }
static inline vf vmax(vf a, vf b) { return vsel(a > b, a, b); }
static inline float hsum(vf v) { /* pairwise: log2(LANES) dependent adds, not LANES */
  float a[LANES];
  memcpy(a, &v, sizeof a);
  for (int w = LANES / 2; w > 0; w >>= 1)
    for (int i = 0; i < w; ++i) a[i] += a[i + w];
  return a[0];
}
static inline float hmax(vf v) { float m = v[0]; for (int i = 1; i < LANES; ++i) m = v[i] > m ? v[i] : m; return m; }

/* e^x, relative error < 2e-7 (Cephes expf polynomial on [-ln2/2, ln2/2]); 0 below -87.3,
 * +inf above 88.7. */
#ifdef __AVX512F__
static inline vf vexp(vf x) {
  __m512 xv;
  memcpy(&xv, &x, sizeof xv);
  /* n = round(x / ln2); r = x - n ln2 (two-part ln2); e^x = 2^n p(r), scaled by vscalefps, which
   * also saturates to 0 / inf without clamps or integer bit tricks */
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xv, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), xv);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500E-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894E-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459E-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201E-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  __m512 out = _mm512_scalef_ps(p, n);
  vf result;
  memcpy(&result, &out, sizeof result);
  return result;
}
#else
static inline vf vexp(vf x) {
  const vf magic = splat(12582912.0f); /* 1.5 * 2^23: adding it rounds to an integer */
  x = vmax(vmin(x, splat(88.3762626647949f)), splat(-87.5f));
  vf t = x * splat(1.44269504088896341f) + magic;
  vf n = t - magic;
  vf r = x - n * splat(0.693359375f) + n * splat(2.12194440e-4f);
  vf p = splat(1.9875691500E-4f);
  p = p * r + splat(1.3981999507E-3f);
  p = p * r + splat(8.3334519073E-3f);
  p = p * r + splat(4.1665795894E-2f);
  p = p * r + splat(1.6666665459E-1f);
  p = p * r + splat(5.0000001201E-1f);
  p = p * r * r + r + splat(1.0f);
  vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  vf scale;
  memcpy(&scale, &bits, sizeof scale);
  vf out = p * scale;
  return vsel(x > splat(-87.0f), out, splat(0.0f));
}
#endif

#ifdef __AVX512F__
/* 1 / d: 14-bit estimate refined by one Newton step (~1 ulp), much cheaper than a division */
static inline vf vrecip(vf d) {
  __m512 x;
  memcpy(&x, &d, sizeof x);
  __m512 r = _mm512_rcp14_ps(x);
  vf rv;
  memcpy(&rv, &r, sizeof rv);
  return rv * (splat(2.0f) - d * rv);
}
#else
static inline vf vrecip(vf d) { return splat(1.0f) / d; }
#endif

/* mish(y) = y tanh(softplus(y)) = y n / (n + 2) = y - 2y / (n + 2), n = e^y (e^y + 2) */
static inline vf vmish(vf y) {
  vf e = vexp(vmin(y, splat(20.0f)));
  vf n = e * (e + splat(2.0f));
  return y * n * vrecip(n + splat(2.0f));
}

/* Row mean and 1/std (biased variance, as LayerNorm) of scale * (x[0:width] + c[0:width]) (c may be NULL). */
static inline void row_stats(const float *x, const float *c, int64_t width, float scale, float eps,
                             float *mean_out, float *rstd_out) {
  /* four accumulators: the adds of one chain wait on each other (4-cycle latency) */
  vf a0 = splat(0.f), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  if (c) {
    for (; i + 2 * LANES <= width; i += 2 * LANES) {
      a0 += load(x + i) + load(c + i);
      a1 += load(x + i + LANES) + load(c + i + LANES);
    }
    for (; i + LANES <= width; i += LANES) a0 += load(x + i) + load(c + i);
  } else {
    for (; i + 4 * LANES <= width; i += 4 * LANES) {
      a0 += load(x + i); a1 += load(x + i + LANES); a2 += load(x + i + 2 * LANES); a3 += load(x + i + 3 * LANES);
    }
    for (; i + LANES <= width; i += LANES) a0 += load(x + i);
  }
  float sum = hsum((a0 + a1) + (a2 + a3));
  for (; i < width; ++i) sum += x[i] + (c ? c[i] : 0.f);
  float mean = sum / (float)width;
  vf m = splat(mean);
  a0 = splat(0.f); a1 = a0; a2 = a0; a3 = a0;
  i = 0;
  if (c) {
    for (; i + 2 * LANES <= width; i += 2 * LANES) {
      vf d0 = load(x + i) + load(c + i) - m, d1 = load(x + i + LANES) + load(c + i + LANES) - m;
      a0 += d0 * d0; a1 += d1 * d1;
    }
    for (; i + LANES <= width; i += LANES) { vf d = load(x + i) + load(c + i) - m; a0 += d * d; }
  } else {
    for (; i + 4 * LANES <= width; i += 4 * LANES) {
      vf d0 = load(x + i) - m, d1 = load(x + i + LANES) - m, d2 = load(x + i + 2 * LANES) - m, d3 = load(x + i + 3 * LANES) - m;
      a0 += d0 * d0; a1 += d1 * d1; a2 += d2 * d2; a3 += d3 * d3;
    }
    for (; i + LANES <= width; i += LANES) { vf d = load(x + i) - m; a0 += d * d; }
  }
  float var = hsum((a0 + a1) + (a2 + a3));
  for (; i < width; ++i) { float d = x[i] + (c ? c[i] : 0.f) - mean; var += d * d; }
  *mean_out = scale * mean;
  *rstd_out = 1.0f / sqrtf(scale * scale * (var / (float)width) + eps);
}

/* One row: dst = act(LayerNorm(scale * (src + c)) * gamma + beta); dst may be src. */
static inline void ln_act_row(const float *src, const float *c, float *dst, int64_t width, const float *gamma,
                              const float *beta, float scale, float eps, int act, float *mean_out, float *rstd_out) {
  float mean, rstd;
  row_stats(src, c, width, scale, eps, &mean, &rstd);
  if (mean_out) { *mean_out = mean; *rstd_out = rstd; }
  vf m = splat(mean), s = splat(rstd), k = splat(scale);
  for (int64_t i = 0; i < width; i += LANES) {
    int64_t n = width - i < LANES ? width - i : LANES;
    vf v = n == LANES ? load(src + i) : load_part(src + i, n, 0.f);
    if (c) v += n == LANES ? load(c + i) : load_part(c + i, n, 0.f);
    vf g = n == LANES ? load(gamma + i) : load_part(gamma + i, n, 0.f);
    vf b = n == LANES ? load(beta + i) : load_part(beta + i, n, 0.f);
    vf y = (v * k - m) * s * g + b;
    if (act == 1) y = vmish(y);
    if (n == LANES) store(dst + i, y); else store_part(dst + i, y, n);
  }
}

/* Rows of `heads` independent LayerNorms (+ act) with their own gamma / beta (heads, width), in any
 * row / head strides, so one call can also transpose (rows, heads, width) into (heads, rows, width).
 * Item k in [0, rows * heads) is head h = k / rows, row r = k % rows:
 *   out[r * o_rs + h * o_hs] = act(LayerNorm(scale * (x[r * x_rs + h * x_hs] + add[r / add_every]))
 *                                  * gamma[h] + beta[h])
 * add: (rows / add_every, width) or NULL (heads == 1 only); act: 0 none, 1 Mish; out may be x.
 * mean_out / rstd_out (heads * rows,), indexed k, may be NULL; they describe scale * (x + add), so
 * the backward pass of a call with add must be given x + add as its input. Runs on `threads` threads
 * of the OpenMP pool (torch's own, when built with -fopenmp and loaded into a torch process). */
SIGNATURE(ln_act_forward, "v:pplllllllplppffippi")
void ln_act_forward(const float *x, float *out, int64_t rows, int64_t heads, int64_t width,
                    int64_t x_rs, int64_t x_hs, int64_t o_rs, int64_t o_hs, const float *add, int64_t add_every,
                    const float *gamma, const float *beta, float scale, float eps, int act,
                    float *mean_out, float *rstd_out, int threads) {
  int64_t items = rows * heads;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
  for (int64_t k = 0; k < items; ++k) {
    int64_t h = k / rows, r = k % rows;
    ln_act_row(x + r * x_rs + h * x_hs, add ? add + (r / add_every) * width : NULL, out + r * o_rs + h * o_hs,
               width, gamma + h * width, beta + h * width, scale, eps, act,
               mean_out ? mean_out + k : NULL, rstd_out ? rstd_out + k : NULL);
  }
}

/* Backward of ln_act_forward (no add), recomputing from its input x and the saved mean / rstd.
 * grad_y is laid out with strides (g_rs, g_hs), x and grad_x with (x_rs, x_hs). Writes grad_x;
 * accumulates d gamma, d beta into grad_affine (threads, 2, heads, width), slice [t] from thread t
 * (NULL: skipped). */
SIGNATURE(ln_act_backward, "v:ppplllllllppppfipi")
void ln_act_backward(const float *x, const float *grad_y, float *grad_x, int64_t rows, int64_t heads, int64_t width,
                     int64_t x_rs, int64_t x_hs, int64_t g_rs, int64_t g_hs, const float *mean, const float *rstd,
                     const float *gamma, const float *beta, float scale, int act,
                     float *grad_affine, int threads) {
  int64_t items = rows * heads;
  vf k_scale = splat(scale);
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
  for (int64_t k = 0; k < items; ++k) {
    int64_t h = k / rows, r = k % rows;
    const float *xr = x + r * x_rs + h * x_hs, *gr = grad_y + r * g_rs + h * g_hs;
    const float *ga_row = gamma + h * width, *be_row = beta + h * width;
    /* each thread accumulates the affine gradients into its own (2, heads, width) slice */
    float *gg_row = NULL, *gb_row = NULL;
    if (grad_affine) {
      gg_row = grad_affine + (thread_index() * 2 * heads + h) * width;
      gb_row = gg_row + heads * width;
    }
    float *out = grad_x + r * x_rs + h * x_hs;
    vf m = splat(mean[k]), s = splat(rstd[k]);
    vf sum_g = splat(0.f), sum_gx = splat(0.f);
    /* pass 1: g_hat = dL/dxhat = dL/dy * act'(pre) * gamma, stored in grad_x; row sums for the LN backward */
    for (int64_t i = 0; i < width; i += LANES) {
      int64_t n = width - i < LANES ? width - i : LANES;
      vf xv = n == LANES ? load(xr + i) : load_part(xr + i, n, 0.f);
      vf gy = n == LANES ? load(gr + i) : load_part(gr + i, n, 0.f);
      vf ga = n == LANES ? load(ga_row + i) : load_part(ga_row + i, n, 0.f);
      vf be = n == LANES ? load(be_row + i) : load_part(be_row + i, n, 0.f);
      vf xhat = (xv * k_scale - m) * s;
      vf pre = xhat * ga + be;
      vf d = gy;
      if (act == 1) { /* mish'(p) = t + p (1 - t^2) sigmoid(p), t = n / (n + 2), n = e (e + 2) */
        vf e = vexp(vmin(pre, splat(20.0f)));
        vf nn = e * (e + splat(2.0f));
        vf t = nn * vrecip(nn + splat(2.0f));
        vf sig = e * vrecip(e + splat(1.0f));
        d = gy * (t + pre * (splat(1.0f) - t * t) * sig);
      }
      if (n < LANES) { xhat = load_part((const float *)&xhat, n, 0.f); d = load_part((const float *)&d, n, 0.f); }
      if (gb_row) {
        vf gb = n == LANES ? load(gb_row + i) : load_part(gb_row + i, n, 0.f);
        vf gg = n == LANES ? load(gg_row + i) : load_part(gg_row + i, n, 0.f);
        gb += d;
        gg += d * xhat;
        if (n == LANES) { store(gb_row + i, gb); store(gg_row + i, gg); }
        else { store_part(gb_row + i, gb, n); store_part(gg_row + i, gg, n); }
      }
      vf gh = d * ga;
      sum_g += gh;
      sum_gx += gh * xhat;
      if (n == LANES) store(out + i, gh); else store_part(out + i, gh, n);
    }
    /* pass 2: dx = scale * rstd * (g_hat - mean(g_hat) - xhat * mean(g_hat * xhat)) */
    vf mg = splat(hsum(sum_g) / (float)width), mgx = splat(hsum(sum_gx) / (float)width), ks = s * k_scale;
    for (int64_t i = 0; i < width; i += LANES) {
      int64_t n = width - i < LANES ? width - i : LANES;
      vf xv = n == LANES ? load(xr + i) : load_part(xr + i, n, 0.f);
      vf gh = n == LANES ? load(out + i) : load_part(out + i, n, 0.f);
      vf dx = ks * (gh - mg - (xv * k_scale - m) * s * mgx);
      if (n == LANES) store(out + i, dx); else store_part(out + i, dx, n);
    }
  }
}

/* symexp(sum_k softmax(row + bias)_k * center_k) over the first `bins` entries, centers =
 * linspace(vmin, vmax, bins); bias may be NULL. */
static inline float decode_row(const float *row, const float *bias, int64_t bins, float vmin_, float step) {
  vf mx = splat(-INFINITY);
  int64_t i = 0;
  for (; i < bins; i += LANES) {
    int64_t n = bins - i < LANES ? bins - i : LANES;
    vf v = n == LANES ? load(row + i) : load_part(row + i, n, -INFINITY);
    if (bias) v += n == LANES ? load(bias + i) : load_part(bias + i, n, 0.f);
    mx = vmax(mx, v);
  }
  vf m = splat(hmax(mx)), sum = splat(0.f), wsum = splat(0.f);
  vf lane;
  for (int k = 0; k < LANES; ++k) lane[k] = (float)k;
  for (i = 0; i < bins; i += LANES) {
    int64_t n = bins - i < LANES ? bins - i : LANES;
    vf v = n == LANES ? load(row + i) : load_part(row + i, n, -INFINITY);
    if (bias) v += n == LANES ? load(bias + i) : load_part(bias + i, n, 0.f);
    vf e = vexp(v - m);
    if (n < LANES) e = vsel(lane < splat((float)n), e, splat(0.f));
    vf center = splat(vmin_) + (lane + splat((float)i)) * splat(step);
    sum += e;
    wsum += e * center;
  }
  float v = hsum(wsum) / hsum(sum);
  return copysignf(expf(fabsf(v)) - 1.0f, v) * (v != 0.0f);
}

/* Expected value of two-hot logits: out[r] = symexp(sum_k softmax(logits[r])_k * center_k),
 * centers = linspace(vmin, vmax, bins). logits (rows, stride >= bins): the first `bins` columns are
 * used; out (rows,). */
SIGNATURE(two_hot_decode, "v:plpllff")
void two_hot_decode(const float *logits, int64_t stride, float *out, int64_t rows, int64_t bins, float vmin_, float vmax_) {
  float step = (vmax_ - vmin_) / (float)(bins - 1);
  for (int64_t r = 0; r < rows; ++r) out[r] = decode_row(logits + r * stride, NULL, bins, vmin_, step);
}

/* In place: softmax within consecutive groups of `group` features (SimNorm); width % group == 0. */
static inline void simnorm_row(float *row, int64_t width, int64_t group) {
  float shift[width];
  for (int64_t j = 0; j < width; j += group) { /* each group's maximum, spread over its lanes */
    float mx = row[j];
    for (int64_t k = 1; k < group; ++k) mx = row[j + k] > mx ? row[j + k] : mx;
    for (int64_t k = 0; k < group; ++k) shift[j + k] = mx;
  }
  int64_t i = 0;
  for (; i + LANES <= width; i += LANES) store(row + i, vexp(load(row + i) - load(shift + i)));
  for (; i < width; ++i) row[i] = expf(row[i] - shift[i]);
  for (int64_t j = 0; j < width; j += group) {
    float s = 0.f;
    for (int64_t k = 0; k < group; ++k) s += row[j + k];
    float inv = 1.0f / s;
    for (int64_t k = 0; k < group; ++k) row[j + k] *= inv;
  }
}

/* x (rows, width) in place: LayerNorm(x) * gamma + beta, then softmax within consecutive groups of
 * `group` features (SimNorm). width must be a multiple of group. */
SIGNATURE(ln_simnorm, "v:pllppfl")
void ln_simnorm(float *x, int64_t rows, int64_t width, const float *gamma, const float *beta, float eps, int64_t group) {
  for (int64_t r = 0; r < rows; ++r) {
    float *row = x + r * width;
    ln_act_row(row, NULL, row, width, gamma, beta, 1.0f, eps, 0, NULL, NULL);
    simnorm_row(row, width, group);
  }
}

/* ---- MPPI value estimation: agent/rollout.py's PlanningKernels.step / pi / q_avg in one call ----
 * GEMMs go to the BLAS sgemm the caller hands over (torch's own MKL); the rows are processed in
 * blocks, so each layer's output is consumed by its fused epilogue and the next GEMM while it is
 * still in cache, and blocks are spread over the OpenMP threads with single-threaded BLAS. */
/* Fortran BLAS sgemm_. Its integer arguments are passed as pointers to int64_t holding small
 * values, which reads correctly as 32-bit (LP64) or 64-bit (ILP64) integers on little-endian CPUs. */
typedef void (*sgemm_fn)(const char *, const char *, const int64_t *, const int64_t *, const int64_t *, const float *,
                         const float *, const int64_t *, const float *, const int64_t *, const float *, float *,
                         const int64_t *);
typedef int (*set_threads_fn)(int);

typedef struct {
  const float *w;             /* (in, out) row-major: the layer's weight transposed */
  const float *bias;          /* (out,), or (E, out) when per_env */
  const float *gamma, *beta;  /* LayerNorm affine (out,); unused for an output layer */
  int64_t in, out, per_env;
} layer_t;

typedef struct {
  sgemm_fn sgemm;
  set_threads_fn set_threads_local; /* MKL's mkl_set_num_threads_local, or NULL */
  layer_t first;                    /* reward | dynamics first layers side by side: out = 2 * mlp, per env */
  layer_t reward1, reward_out, next1, next_out;
  layer_t pi0, pi1, pi_out;
  const layer_t *q[2];              /* the two Q heads averaged: q_layers layers each, the first per env, */
  int64_t q_layers;                 /* hidden layers (LayerNorm + Mish) then the output layer (two-hot) */
  int64_t latent, action, mlp, bins, simnorm, rows_per_env, horizon;
  double discount;
  float vmin, vmax, log_std_min, log_std_max, ln_eps;
} value_net_t;

/* Sizes ("layer_t") and field offsets ("layer_t.bias") of the structs above, -1 for unknown names. */
#define SIZE_OF(type) {#type, sizeof(type)}
#define OFFSET_OF(type, field) {#type "." #field, offsetof(type, field)}
static const struct { const char *name; size_t value; } layout[] = {
  SIZE_OF(layer_t), OFFSET_OF(layer_t, w), OFFSET_OF(layer_t, bias), OFFSET_OF(layer_t, gamma),
  OFFSET_OF(layer_t, beta), OFFSET_OF(layer_t, in), OFFSET_OF(layer_t, out), OFFSET_OF(layer_t, per_env),
  SIZE_OF(value_net_t), OFFSET_OF(value_net_t, sgemm), OFFSET_OF(value_net_t, set_threads_local),
  OFFSET_OF(value_net_t, first), OFFSET_OF(value_net_t, reward1), OFFSET_OF(value_net_t, reward_out),
  OFFSET_OF(value_net_t, next1), OFFSET_OF(value_net_t, next_out), OFFSET_OF(value_net_t, pi0),
  OFFSET_OF(value_net_t, pi1), OFFSET_OF(value_net_t, pi_out), OFFSET_OF(value_net_t, q),
  OFFSET_OF(value_net_t, q_layers), OFFSET_OF(value_net_t, latent), OFFSET_OF(value_net_t, action),
  OFFSET_OF(value_net_t, mlp), OFFSET_OF(value_net_t, bins), OFFSET_OF(value_net_t, simnorm),
  OFFSET_OF(value_net_t, rows_per_env), OFFSET_OF(value_net_t, horizon), OFFSET_OF(value_net_t, discount),
  OFFSET_OF(value_net_t, vmin), OFFSET_OF(value_net_t, vmax), OFFSET_OF(value_net_t, log_std_min),
  OFFSET_OF(value_net_t, log_std_max), OFFSET_OF(value_net_t, ln_eps),
};

SIGNATURE(native_layout, "l:p")
int64_t native_layout(const char *name) {
  for (size_t i = 0; i < sizeof layout / sizeof layout[0]; ++i)
    if (strcmp(layout[i].name, name) == 0) return (int64_t)layout[i].value;
  return -1;
}

/* c (rows, l->out) = a (rows, l->in; row stride lda) @ l->w */
static void gemm(const value_net_t *net, const float *a, int64_t lda, const layer_t *l, float *c, int64_t rows) {
  int64_t m = l->out, n = rows, k = l->in, ld_w = l->out, ld_a = lda, ld_c = l->out;
  float one = 1.0f, zero = 0.0f;
  /* row-major C = A W is column-major C^T = W^T A^T */
  net->sgemm("N", "N", &m, &n, &k, &one, l->w, &ld_w, a, &ld_a, &zero, c, &ld_c);
}

/* In place on c (rows, stride): columns [col, col + width) get act(LayerNorm(c + bias) * gamma + beta),
 * bias / gamma / beta read from column `col` of the layer's (possibly per-env) parameters. */
static void epilogue(const value_net_t *net, const layer_t *l, float *c, int64_t stride, int64_t col, int64_t width,
                     int64_t rows, int64_t row0, int act) {
  for (int64_t r = 0; r < rows; ++r) {
    const float *add = l->per_env ? l->bias + ((row0 + r) / net->rows_per_env) * l->out : l->bias;
    float *row = c + r * stride + col;
    ln_act_row(row, add + col, row, width, l->gamma + col, l->beta + col, 1.0f, net->ln_eps, act, NULL, NULL);
  }
}

static int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

/* Widths of the scratch buffers of one block row: hidden (h1, h2: 2 * mlp, or a wider Q hidden
 * layer) and output (o: the widest output layer, or the latent). */
static int64_t hidden_width(const value_net_t *net) {
  int64_t w = 2 * net->mlp;
  for (int h = 0; h < 2; ++h)
    for (int64_t i = 0; i + 1 < net->q_layers; ++i) w = max64(w, net->q[h][i].out);
  return w;
}

static int64_t output_width(const value_net_t *net) {
  int64_t w = max64(max64(net->reward_out.out, net->pi_out.out), net->latent);
  for (int h = 0; h < 2; ++h) w = max64(w, net->q[h][net->q_layers - 1].out);
  return w;
}

static int64_t block_scratch(const value_net_t *net, int64_t block) {
  int64_t L = net->latent, A = net->action;
  return block * ((L + A) + 2 * hidden_width(net) + output_width(net) + L + 2);
}

/* out[row0 : row0 + R] for one block of rows; see plan_values. */
static void value_block(const value_net_t *net, const float *z, const float *actions, const float *mask,
                        const float *eps, float *out, int64_t rows, int64_t row0, int64_t R, float *scratch) {
  const int64_t L = net->latent, A = net->action, M = net->mlp, LA = L + A, HW = hidden_width(net);
  float *za = scratch, *h1 = za + R * LA, *h2 = h1 + R * HW, *o = h2 + R * HW;
  float *zc = o + R * output_width(net), *ret = zc + R * L, *q = ret + R;
  float step = (net->vmax - net->vmin) / (float)(net->bins - 1);
  memcpy(zc, z + row0 * L, (size_t)(R * L) * sizeof(float));
  for (int64_t r = 0; r < R; ++r) ret[r] = 0.0f;
  double discount = 1.0;
  for (int64_t t = 0; t < net->horizon; ++t) {
    const float *a_t = actions + (t * rows + row0) * A;
    for (int64_t r = 0; r < R; ++r) {
      memcpy(za + r * LA, zc + r * L, (size_t)L * sizeof(float));
      memcpy(za + r * LA + L, a_t + r * A, (size_t)A * sizeof(float));
    }
    gemm(net, za, LA, &net->first, h1, R);                   /* (R, 2M): reward | dynamics */
    epilogue(net, &net->first, h1, 2 * M, 0, M, R, row0, 1);
    epilogue(net, &net->first, h1, 2 * M, M, M, R, row0, 1);
    gemm(net, h1, 2 * M, &net->reward1, h2, R);
    epilogue(net, &net->reward1, h2, M, 0, M, R, row0, 1);
    gemm(net, h1 + M, 2 * M, &net->next1, h2 + R * M, R);
    epilogue(net, &net->next1, h2 + R * M, M, 0, M, R, row0, 1);
    gemm(net, h2, M, &net->reward_out, o, R);
    float d = (float)discount;
    for (int64_t r = 0; r < R; ++r)
      ret[r] += d * decode_row(o + r * net->reward_out.out, net->reward_out.bias, net->bins, net->vmin, step);
    gemm(net, h2 + R * M, M, &net->next_out, zc, R);
    for (int64_t r = 0; r < R; ++r) {
      float *row = zc + r * L;
      ln_act_row(row, net->next_out.bias, row, L, net->next_out.gamma, net->next_out.beta, 1.0f, net->ln_eps, 0, NULL, NULL);
      simnorm_row(row, L, net->simnorm);
    }
    discount *= net->discount;
  }
  /* terminal action from the policy prior: tanh(mean + eps * exp(log_std)), masked */
  gemm(net, zc, L, &net->pi0, h1, R);
  epilogue(net, &net->pi0, h1, M, 0, M, R, row0, 1);
  gemm(net, h1, M, &net->pi1, h2, R);
  epilogue(net, &net->pi1, h2, M, 0, M, R, row0, 1);
  gemm(net, h2, M, &net->pi_out, o, R);
  const float *pb = net->pi_out.bias;
  for (int64_t r = 0; r < R; ++r) {
    const float *po = o + r * net->pi_out.out, *mr = mask + (row0 + r) * A, *er = eps + (row0 + r) * A;
    memcpy(za + r * LA, zc + r * L, (size_t)L * sizeof(float));
    for (int64_t j = 0; j < A; ++j) {
      float mean = (po[j] + pb[j]) * mr[j];
      float log_std = (net->log_std_min + 0.5f * (net->log_std_max - net->log_std_min) * (tanhf(po[A + j] + pb[A + j]) + 1.0f)) * mr[j];
      za[r * LA + L + j] = tanhf(mean + er[j] * mr[j] * expf(log_std));
    }
  }
  for (int64_t r = 0; r < R; ++r) q[r] = 0.0f;
  for (int h = 0; h < 2; ++h) { /* hidden layers ping-pong between h1 and h2, then the output layer */
    const layer_t *layers = net->q[h], *last = &layers[net->q_layers - 1];
    const float *in = za;
    int64_t ld = LA;
    for (int64_t i = 0; i + 1 < net->q_layers; ++i) {
      float *dst = i % 2 ? h2 : h1;
      gemm(net, in, ld, &layers[i], dst, R);
      epilogue(net, &layers[i], dst, layers[i].out, 0, layers[i].out, R, row0, 1);
      in = dst;
      ld = layers[i].out;
    }
    gemm(net, in, ld, last, o, R);
    for (int64_t r = 0; r < R; ++r)
      q[r] += decode_row(o + r * last->out, last->bias, net->bins, net->vmin, step);
  }
  float d = (float)discount;
  for (int64_t r = 0; r < R; ++r) out[row0 + r] = ret[r] + d * (q[r] / 2.0f);
}

SIGNATURE(gemm_selftest, "i:p")
/* 1 when `sgemm` multiplies a small row-major (3, 5) @ (5, 4) product exactly as a plain loop. */
int gemm_selftest(sgemm_fn sgemm) {
  float a[15], w[20], c[12];
  for (int i = 0; i < 15; ++i) a[i] = (float)(i % 7) - 3.0f;
  for (int i = 0; i < 20; ++i) w[i] = (float)(i % 5) - 1.5f;
  value_net_t net;
  memset(&net, 0, sizeof net);
  net.sgemm = sgemm;
  layer_t l = {w, NULL, NULL, NULL, 5, 4, 0};
  gemm(&net, a, 5, &l, c, 3);
  for (int r = 0; r < 3; ++r)
    for (int j = 0; j < 4; ++j) {
      float expected = 0.0f;
      for (int k = 0; k < 5; ++k) expected += a[r * 5 + k] * w[k * 4 + j];
      if (fabsf(c[r * 4 + j] - expected) > 1e-4f) return 0;
    }
  return 1;
}

/* Discounted model return over the horizon plus the terminal value (mean of two Q heads at the
 * policy's action) for every sampled action sequence.
 * z: (rows, latent) start latents; actions: (horizon, rows, action); mask, eps: (rows, action);
 * out: (rows,). Rows are environment-major (row / rows_per_env is the environment of the per-env
 * constants). Blocks of `block` rows run on `threads` OpenMP threads, BLAS single-threaded in each.
 * Returns 0, or -1 when scratch memory could not be allocated. */
SIGNATURE(plan_values, "i:pppppplli")
int plan_values(const value_net_t *net, const float *z, const float *actions, const float *mask, const float *eps,
                float *out, int64_t rows, int64_t block, int threads) {
  int64_t blocks = (rows + block - 1) / block;
  int failed = 0;
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
#ifdef __SSE__
    /* flush denormals (SimNorm's exp makes them; they are ~20x slower), as the torch path does */
    unsigned int csr = _mm_getcsr();
    _mm_setcsr(csr | 0x8040);
#endif
    int previous = net->set_threads_local ? net->set_threads_local(1) : 0;
    float *scratch = (float *)malloc((size_t)block_scratch(net, block) * sizeof(float));
    if (!scratch) {
#pragma omp atomic write
      failed = 1;
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < blocks; ++b) {
      if (!scratch) continue;
      int64_t row0 = b * block, R = rows - row0 < block ? rows - row0 : block;
      value_block(net, z, actions, mask, eps, out, rows, row0, R, scratch);
    }
    free(scratch);
    if (net->set_threads_local) net->set_threads_local(previous);
#ifdef __SSE__
    _mm_setcsr(csr);
#endif
  }
  return failed ? -1 : 0;
}
