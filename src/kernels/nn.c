/* Transformer kernels: RMSNorm, rotary position embedding, causal grouped-query attention,
 * softmax cross-entropy. Forward and backward; backward adds into gradient buffers. */
#include "kernels/kernels.h"

#include <math.h>
#include <string.h>

/* ---------------------------------------------------------------- RMSNorm */

void moe_rmsnorm_forward(float *y, float *rstd, const float *x, const float *w, int T, int d,
                         float eps) {
#pragma omp parallel for schedule(static)
    for (int t = 0; t < T; t++) {
        const float *xt = x + (size_t)t * d;
        double ss = 0;
        for (int i = 0; i < d; i++) ss += (double)xt[i] * xt[i];
        float r = (float)(1.0 / sqrt(ss / d + eps));
        rstd[t] = r;
        float *yt = y + (size_t)t * d;
        for (int i = 0; i < d; i++) yt[i] = xt[i] * r * w[i];
    }
}

void moe_rmsnorm_backward(float *dx, float *dw, const float *dy, const float *x, const float *w,
                          const float *rstd, int T, int d) {
#pragma omp parallel for schedule(static)
    for (int t = 0; t < T; t++) {
        const float *xt = x + (size_t)t * d, *gt = dy + (size_t)t * d;
        double dot = 0; /* sum_i dy_i w_i x_i */
        for (int i = 0; i < d; i++) dot += (double)gt[i] * w[i] * xt[i];
        float r = rstd[t];
        float c = (float)(dot * r * r * r / d);
        float *dxt = dx + (size_t)t * d;
        for (int i = 0; i < d; i++) dxt[i] += gt[i] * w[i] * r - c * xt[i];
    }
    /* dw in a fixed order over tokens: column sums, parallel over columns. */
#pragma omp parallel for schedule(static)
    for (int i = 0; i < d; i++) {
        double s = 0;
        for (int t = 0; t < T; t++) s += (double)dy[(size_t)t * d + i] * x[(size_t)t * d + i] * rstd[t];
        dw[i] += (float)s;
    }
}

/* ------------------------------------------------------------------- RoPE */

/* Rotates pairs (i, i + hd/2) of every head by pos * theta^(-2i/hd) (the "rotate half"
 * convention of Llama, Mixtral, Qwen, DeepSeek in Hugging Face). dir = +1 forward,
 * -1 backward (the transpose of a rotation is the rotation by the opposite angle). */
void moe_rope_apply(float *x, int T, int n_heads, int hd, const int *pos, float theta, int dir) {
    int half = hd / 2;
#pragma omp parallel for schedule(static)
    for (int t = 0; t < T; t++) {
        for (int i = 0; i < half; i++) {
            double freq = pow((double)theta, -2.0 * i / hd);
            double ang = pos[t] * freq;
            float c = (float)cos(ang), s = (float)(dir * sin(ang));
            for (int h = 0; h < n_heads; h++) {
                float *v = x + ((size_t)t * n_heads + h) * hd;
                float a = v[i], b = v[i + half];
                v[i] = a * c - b * s;
                v[i + half] = b * c + a * s;
            }
        }
    }
}

/* ------------------------------------------------------------- attention */

/* Causal attention over B sequences of S tokens. q [B*S, H*hd], k and v [B*S, KV*hd]
 * (query head h reads kv head h / (H/KV)); probs [B, H, S, S] saved for backward;
 * out [B*S, H*hd]. */
void moe_attention_forward(float *out, float *probs, const float *q, const float *k,
                           const float *v, int B, int S, int H, int KV, int hd) {
    int rep = H / KV, qs = H * hd, ks = KV * hd;
    float scale = 1.0f / sqrtf((float)hd);
#pragma omp parallel for collapse(2) schedule(static)
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++) {
            int g = h / rep;
            float *P = probs + ((size_t)b * H + h) * S * S;
            for (int i = 0; i < S; i++) {
                const float *qi = q + ((size_t)b * S + i) * qs + h * hd;
                float *Pi = P + (size_t)i * S;
                float mx = -INFINITY;
                for (int j = 0; j <= i; j++) {
                    const float *kj = k + ((size_t)b * S + j) * ks + g * hd;
                    float s = 0;
                    for (int c = 0; c < hd; c++) s += qi[c] * kj[c];
                    Pi[j] = s * scale;
                    if (Pi[j] > mx) mx = Pi[j];
                }
                float sum = 0;
                for (int j = 0; j <= i; j++) {
                    Pi[j] = expf(Pi[j] - mx);
                    sum += Pi[j];
                }
                float inv = 1.0f / sum;
                for (int j = 0; j <= i; j++) Pi[j] *= inv;
                for (int j = i + 1; j < S; j++) Pi[j] = 0;
                float *oi = out + ((size_t)b * S + i) * qs + h * hd;
                for (int c = 0; c < hd; c++) oi[c] = 0;
                for (int j = 0; j <= i; j++) {
                    const float *vj = v + ((size_t)b * S + j) * ks + g * hd;
                    float p = Pi[j];
                    for (int c = 0; c < hd; c++) oi[c] += p * vj[c];
                }
            }
        }
}

/* Backward: dq += ..., dk += ..., dv += ... (dk, dv accumulate over the query heads of a
 * group). Parallel over (sequence, kv head) so that no two threads write the same rows. */
void moe_attention_backward(float *dq, float *dk, float *dv, const float *dout,
                            const float *probs, const float *q, const float *k, const float *v,
                            int B, int S, int H, int KV, int hd) {
    int rep = H / KV, qs = H * hd, ks = KV * hd;
    float scale = 1.0f / sqrtf((float)hd);
#pragma omp parallel for collapse(2) schedule(static)
    for (int b = 0; b < B; b++)
        for (int g = 0; g < KV; g++)
            for (int h = g * rep; h < (g + 1) * rep; h++) {
                const float *P = probs + ((size_t)b * H + h) * S * S;
                for (int i = 0; i < S; i++) {
                    const float *Pi = P + (size_t)i * S;
                    const float *doi = dout + ((size_t)b * S + i) * qs + h * hd;
                    const float *qi = q + ((size_t)b * S + i) * qs + h * hd;
                    float *dqi = dq + ((size_t)b * S + i) * qs + h * hd;
                    /* dP_ij = do_i . v_j; dS_ij = P_ij (dP_ij - sum_j' P_ij' dP_ij') */
                    float dot = 0;
                    for (int j = 0; j <= i; j++) {
                        const float *vj = v + ((size_t)b * S + j) * ks + g * hd;
                        float dp = 0;
                        for (int c = 0; c < hd; c++) dp += doi[c] * vj[c];
                        dot += Pi[j] * dp;
                    }
                    for (int j = 0; j <= i; j++) {
                        const float *vj = v + ((size_t)b * S + j) * ks + g * hd;
                        const float *kj = k + ((size_t)b * S + j) * ks + g * hd;
                        float *dvj = dv + ((size_t)b * S + j) * ks + g * hd;
                        float *dkj = dk + ((size_t)b * S + j) * ks + g * hd;
                        float dp = 0;
                        for (int c = 0; c < hd; c++) dp += doi[c] * vj[c];
                        float ds = Pi[j] * (dp - dot) * scale;
                        for (int c = 0; c < hd; c++) {
                            dvj[c] += Pi[j] * doi[c];
                            dqi[c] += ds * kj[c];
                            dkj[c] += ds * qi[c];
                        }
                    }
                }
            }
}

/* Attention of n new tokens at positions P..P+n-1 of one sequence over a key/value cache
 * k, v [P+n, KV*hd] that already holds them: q [n, H*hd] -> out [n, H*hd]; scores [P+n]
 * scratch per thread is taken from `scratch` [n * H * (P+n)]. */
void moe_attention_cached(float *out, float *scratch, const float *q, const float *k,
                          const float *v, int n, int P, int H, int KV, int hd) {
    int rep = H / KV, qs = H * hd, ks = KV * hd, len = P + n;
    float scale = 1.0f / sqrtf((float)hd);
#pragma omp parallel for collapse(2) schedule(static)
    for (int i = 0; i < n; i++)
        for (int h = 0; h < H; h++) {
            int g = h / rep, last = P + i;
            const float *qi = q + (size_t)i * qs + h * hd;
            float *s = scratch + ((size_t)i * H + h) * len, mx = -INFINITY, sum = 0;
            for (int j = 0; j <= last; j++) {
                const float *kj = k + (size_t)j * ks + g * hd;
                float dot = 0;
                for (int c = 0; c < hd; c++) dot += qi[c] * kj[c];
                s[j] = dot * scale;
                mx = s[j] > mx ? s[j] : mx;
            }
            for (int j = 0; j <= last; j++) sum += s[j] = expf(s[j] - mx);
            float *oi = out + (size_t)i * qs + h * hd;
            for (int c = 0; c < hd; c++) oi[c] = 0;
            for (int j = 0; j <= last; j++) {
                const float *vj = v + (size_t)j * ks + g * hd;
                float p = s[j] / sum;
                for (int c = 0; c < hd; c++) oi[c] += p * vj[c];
            }
        }
}

/* ---------------------------------------------------------- cross-entropy */

/* For each row t with target y[t] >= 0: row_loss[t] = logsumexp(logits_t) - logits_t[y_t]
 * (0 for rows with y < 0, which are ignored). Returns the sum over the rows, added in row
 * order so that it does not depend on the thread count, and sets *n_counted.
 * If dlogits is not NULL, writes dlogits = scale * (softmax - onehot) (0 for ignored rows). */
double moe_xent_forward_backward(float *dlogits, double *row_loss, const float *logits,
                                 const int32_t *y, int T, int V, float scale, int *n_counted) {
#pragma omp parallel for schedule(static)
    for (int t = 0; t < T; t++) {
        const float *lt = logits + (size_t)t * V;
        float *gt = dlogits ? dlogits + (size_t)t * V : NULL;
        row_loss[t] = 0;
        if (y[t] < 0) {
            if (gt) memset(gt, 0, sizeof(float) * (size_t)V);
            continue;
        }
        float mx = lt[0];
        for (int j = 1; j < V; j++) mx = lt[j] > mx ? lt[j] : mx;
        double s = 0;
        for (int j = 0; j < V; j++) s += exp((double)lt[j] - mx);
        double lse = mx + log(s);
        row_loss[t] = lse - lt[y[t]];
        if (gt) {
            for (int j = 0; j < V; j++) gt[j] = (float)(scale * exp((double)lt[j] - lse));
            gt[y[t]] -= scale;
        }
    }
    double total = 0;
    int n = 0;
    for (int t = 0; t < T; t++) {
        total += row_loss[t];
        n += y[t] >= 0;
    }
    *n_counted = n;
    return total;
}
