/* Fused element-wise kernels for CPU inference and training (float32, row-major, single-threaded).
 *
 * Written with GCC/Clang vector extensions (16 lanes): one AVX-512 register with -march=native on
 * machines that have it, two AVX2 registers otherwise. No -ffast-math: the exp below relies on
 * exact float rounding. Built and loaded by agent/native/__init__.py.
 */
#include <stdint.h>
#include <string.h>
#include <math.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
static inline int thread_index(void) { return omp_get_thread_num(); }
#else
static inline int thread_index(void) { return 0; }
#endif

typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
#define LANES 16

static inline vf splat(float v) { return (vf){v, v, v, v, v, v, v, v, v, v, v, v, v, v, v, v}; }
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
static inline float hsum(vf v) { /* pairwise: log2(16) dependent adds, not 16 */
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

/* Expected value of two-hot logits: out[r] = symexp(sum_k softmax(logits[r])_k * center_k),
 * centers = linspace(vmin, vmax, bins). logits (rows, stride >= bins): the first `bins` columns are
 * used; out (rows,). */
void two_hot_decode(const float *logits, int64_t stride, float *out, int64_t rows, int64_t bins, float vmin_, float vmax_) {
  float step = (vmax_ - vmin_) / (float)(bins - 1);
  for (int64_t r = 0; r < rows; ++r) {
    const float *row = logits + r * stride;
    vf mx = splat(-INFINITY);
    int64_t i = 0;
    for (; i < bins; i += LANES) {
      int64_t n = bins - i < LANES ? bins - i : LANES;
      mx = vmax(mx, n == LANES ? load(row + i) : load_part(row + i, n, -INFINITY));
    }
    vf m = splat(hmax(mx)), sum = splat(0.f), wsum = splat(0.f);
    vf lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    for (i = 0; i < bins; i += LANES) {
      int64_t n = bins - i < LANES ? bins - i : LANES;
      vf e = vexp((n == LANES ? load(row + i) : load_part(row + i, n, -INFINITY)) - m);
      if (n < LANES) e = vsel(lane < splat((float)n), e, splat(0.f));
      vf center = splat(vmin_) + (lane + splat((float)i)) * splat(step);
      sum += e;
      wsum += e * center;
    }
    float v = hsum(wsum) / hsum(sum);
    float a = fabsf(v);
    out[r] = copysignf(expf(a) - 1.0f, v) * (v != 0.0f);
  }
}

/* x (rows, width) in place: LayerNorm(x) * gamma + beta, then softmax within consecutive groups of
 * `group` features (SimNorm). width must be a multiple of group. */
void ln_simnorm(float *x, int64_t rows, int64_t width, const float *gamma, const float *beta, float eps, int64_t group) {
  float shift[width];
  for (int64_t r = 0; r < rows; ++r) {
    float *row = x + r * width;
    ln_act_row(row, NULL, row, width, gamma, beta, 1.0f, eps, 0, NULL, NULL);
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
}
