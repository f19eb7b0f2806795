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

/* Row mean and 1/std (biased variance, as LayerNorm) of x[0:width]. */
static inline void row_stats(const float *x, int64_t width, float eps, float *mean_out, float *rstd_out) {
  /* four accumulators per pass: the adds of one chain wait on each other (4-cycle latency) */
  vf a0 = splat(0.f), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 4 * LANES <= width; i += 4 * LANES) {
    a0 += load(x + i); a1 += load(x + i + LANES); a2 += load(x + i + 2 * LANES); a3 += load(x + i + 3 * LANES);
  }
  for (; i + LANES <= width; i += LANES) a0 += load(x + i);
  float sum = hsum((a0 + a1) + (a2 + a3));
  for (; i < width; ++i) sum += x[i];
  float mean = sum / (float)width;
  vf m = splat(mean);
  a0 = splat(0.f); a1 = a0; a2 = a0; a3 = a0;
  for (i = 0; i + 4 * LANES <= width; i += 4 * LANES) {
    vf d0 = load(x + i) - m, d1 = load(x + i + LANES) - m, d2 = load(x + i + 2 * LANES) - m, d3 = load(x + i + 3 * LANES) - m;
    a0 += d0 * d0; a1 += d1 * d1; a2 += d2 * d2; a3 += d3 * d3;
  }
  for (; i + LANES <= width; i += LANES) { vf d = load(x + i) - m; a0 += d * d; }
  float var = hsum((a0 + a1) + (a2 + a3));
  for (; i < width; ++i) { float d = x[i] - mean; var += d * d; }
  *mean_out = mean;
  *rstd_out = 1.0f / sqrtf(var / (float)width + eps);
}

/* Mean and 1/std of x[0:width] + c[0:width] (c may be NULL). */
static inline void row_stats_add(const float *x, const float *c, int64_t width, float eps, float *mean_out, float *rstd_out) {
  vf a0 = splat(0.f), a1 = a0;
  int64_t i = 0;
  for (; i + 2 * LANES <= width; i += 2 * LANES) {
    a0 += load(x + i) + load(c + i);
    a1 += load(x + i + LANES) + load(c + i + LANES);
  }
  for (; i + LANES <= width; i += LANES) a0 += load(x + i) + load(c + i);
  float sum = hsum(a0 + a1);
  for (; i < width; ++i) sum += x[i] + c[i];
  float mean = sum / (float)width;
  vf m = splat(mean);
  a0 = splat(0.f); a1 = a0;
  for (i = 0; i + 2 * LANES <= width; i += 2 * LANES) {
    vf d0 = load(x + i) + load(c + i) - m, d1 = load(x + i + LANES) + load(c + i + LANES) - m;
    a0 += d0 * d0; a1 += d1 * d1;
  }
  for (; i + LANES <= width; i += LANES) { vf d = load(x + i) + load(c + i) - m; a0 += d * d; }
  float var = hsum(a0 + a1);
  for (; i < width; ++i) { float d = x[i] + c[i] - mean; var += d * d; }
  *mean_out = mean;
  *rstd_out = 1.0f / sqrtf(var / (float)width + eps);
}

/* out (rows, width) = act(LayerNorm(x + add[row / add_every]) * gamma + beta); out may be x.
 * add: (rows / add_every, width) or NULL; act: 0 none, 1 Mish.
 * mean_out / rstd_out (rows,) may be NULL (saved for the backward pass otherwise; they describe
 * x + add, so give the backward pass x + add as its input). */
void ln_act_forward(const float *x, float *out, int64_t rows, int64_t width, const float *add, int64_t add_every,
                    const float *gamma, const float *beta, float eps, int act, float *mean_out, float *rstd_out) {
  for (int64_t r = 0; r < rows; ++r) {
    const float *src = x + r * width;
    const float *c = add ? add + (r / add_every) * width : NULL;
    float *dst = out + r * width;
    float mean, rstd;
    if (c) row_stats_add(src, c, width, eps, &mean, &rstd);
    else row_stats(src, width, eps, &mean, &rstd);
    if (mean_out) { mean_out[r] = mean; rstd_out[r] = rstd; }
    vf m = splat(mean), s = splat(rstd);
    for (int64_t i = 0; i < width; i += LANES) {
      int64_t n = width - i < LANES ? width - i : LANES;
      vf v = n == LANES ? load(src + i) : load_part(src + i, n, 0.f);
      if (c) v += n == LANES ? load(c + i) : load_part(c + i, n, 0.f);
      vf g = n == LANES ? load(gamma + i) : load_part(gamma + i, n, 0.f);
      vf b = n == LANES ? load(beta + i) : load_part(beta + i, n, 0.f);
      vf y = (v - m) * s * g + b;
      if (act == 1) y = vmish(y);
      if (n == LANES) store(dst + i, y); else store_part(dst + i, y, n);
    }
  }
}

/* Backward of y = act(LayerNorm(x) * gamma + beta), recomputing from the input x (rows, width) and
 * the saved mean / rstd. Writes grad_x (rows, width); accumulates grad_gamma, grad_beta (width,). */
void ln_act_backward(const float *x, const float *grad_y, const float *mean, const float *rstd,
                     const float *gamma, const float *beta, int64_t rows, int64_t width, int act,
                     float *grad_x, float *grad_gamma, float *grad_beta) {
  for (int64_t r = 0; r < rows; ++r) {
    const float *xr = x + r * width, *gr = grad_y + r * width;
    float *out = grad_x + r * width;
    vf m = splat(mean[r]), s = splat(rstd[r]);
    vf sum_g = splat(0.f), sum_gx = splat(0.f);
    /* pass 1: g_hat = dL/dxhat = dL/dy * act'(pre) * gamma, stored in grad_x; row sums for the LN backward */
    for (int64_t i = 0; i < width; i += LANES) {
      int64_t n = width - i < LANES ? width - i : LANES;
      vf xv = n == LANES ? load(xr + i) : load_part(xr + i, n, 0.f);
      vf gy = n == LANES ? load(gr + i) : load_part(gr + i, n, 0.f);
      vf ga = n == LANES ? load(gamma + i) : load_part(gamma + i, n, 0.f);
      vf be = n == LANES ? load(beta + i) : load_part(beta + i, n, 0.f);
      vf xhat = (xv - m) * s;
      vf pre = xhat * ga + be;
      vf d = gy;
      if (act == 1) { /* mish'(p) = t + p (1 - t^2) sigmoid(p), t = n / (n + 2), n = e (e + 2) */
        vf e = vexp(vmin(pre, splat(20.0f)));
        vf nn = e * (e + splat(2.0f));
        vf t = nn / (nn + splat(2.0f));
        vf sig = e / (e + splat(1.0f));
        d = gy * (t + pre * (splat(1.0f) - t * t) * sig);
      }
      if (n < LANES) { xhat = load_part((const float *)&xhat, n, 0.f); d = load_part((const float *)&d, n, 0.f); }
      vf gb = n == LANES ? load(grad_beta + i) : load_part(grad_beta + i, n, 0.f);
      vf gg = n == LANES ? load(grad_gamma + i) : load_part(grad_gamma + i, n, 0.f);
      gb += d;
      gg += d * xhat;
      vf gh = d * ga;
      sum_g += gh;
      sum_gx += gh * xhat;
      if (n == LANES) { store(grad_beta + i, gb); store(grad_gamma + i, gg); store(out + i, gh); }
      else { store_part(grad_beta + i, gb, n); store_part(grad_gamma + i, gg, n); store_part(out + i, gh, n); }
    }
    /* pass 2: dx = rstd * (g_hat - mean(g_hat) - xhat * mean(g_hat * xhat)) */
    vf mg = splat(hsum(sum_g) / (float)width), mgx = splat(hsum(sum_gx) / (float)width);
    for (int64_t i = 0; i < width; i += LANES) {
      int64_t n = width - i < LANES ? width - i : LANES;
      vf xv = n == LANES ? load(xr + i) : load_part(xr + i, n, 0.f);
      vf gh = n == LANES ? load(out + i) : load_part(out + i, n, 0.f);
      vf dx = s * (gh - mg - (xv - m) * s * mgx);
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
  ln_act_forward(x, x, rows, width, NULL, 1, gamma, beta, eps, 0, NULL, NULL);
  float shift[width];
  for (int64_t r = 0; r < rows; ++r) {
    float *row = x + r * width;
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
