/* Sampling a token from logits: temperature, top-k, top-p (nucleus). */
#include "core/core.h"

#include <math.h>
#include <stdlib.h>

typedef struct {
    double p;
    int id;
} cand;

static int by_prob_desc(const void *a, const void *b) {
    const cand *x = a, *y = b;
    if (x->p != y->p) return x->p > y->p ? -1 : 1;
    return x->id - y->id; /* ties: the lower id first */
}

int moe_sample(const float *logits, int V, float temperature, int top_k, float top_p, double u) {
    int best = 0;
    if (V < 1 || !logits) return -1;
    for (int v = 0; v < V; v++) {
        if (isnan(logits[v])) return -1; /* no distribution (torch.multinomial refuses too) */
        if (logits[v] > logits[best]) best = v;
    }
    if (!isfinite(logits[best])) return -1; /* +inf, or every logit -inf */
    if (!(temperature > 0)) return best;
    int tied = 0; /* top-1 of a unique maximum is it; ties with it are drawn among, below */
    for (int v = 0; top_k == 1 && v < V; v++) tied += logits[v] == logits[best];
    if (top_k == 1 && tied == 1) return best;
    cand *c = malloc(sizeof *c * (size_t)V);
    if (!c) return best;
    for (int v = 0; v < V; v++) {
        c[v].p = exp((logits[v] - logits[best]) / temperature);
        c[v].id = v;
    }
    qsort(c, (size_t)V, sizeof *c, by_prob_desc);
    int n = top_k > 0 && top_k < V ? top_k : V;
    while (n < V && c[n].p == c[n - 1].p) n++; /* ties with the k-th stay (Hugging Face's) */
    double mass_k = 0, kept = 0; /* the mass of the top-k; of the first n candidates */
    for (int i = 0; i < n; i++) mass_k += c[i].p;
    /* top-p of the top-k's distribution, renormalised (as Hugging Face and llama.cpp apply
     * them one after the other) */
    for (int i = 0; i < n; i++) {
        kept += c[i].p;
        if (top_p < 1 && kept >= top_p * mass_k) {
            n = i + 1;
            break;
        }
    }
    double r = u * kept;
    int id = c[n - 1].id;
    for (int i = 0; i < n; i++) {
        r -= c[i].p;
        if (r < 0) {
            id = c[i].id;
            break;
        }
    }
    free(c);
    return id;
}
