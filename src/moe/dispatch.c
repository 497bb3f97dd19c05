/* Dispatch: capacity, token dropping (probs / position / random policy), and the permutation of the
 * kept slots into per-expert row blocks (a stable counting sort by expert). docs/LAYER.md §6. */
#include "core/core.h"
#include "moe/layer_internal.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int64_t moe_capacity_ceil(float cf, int64_t Tv, int k, int E) {
    double est = (double)cf * (double)Tv * k / E;
    if (est >= 0x1p62) return INT64_MAX;
    if (est < 0.5) return 1; /* the exact value is in (0, 1) */
    char buf[32];
    int digits = 1;
    for (;; digits++) { /* 9 significant digits read back as any float */
        snprintf(buf, sizeof buf, "%.*e", digits - 1, (double)cf);
        if (digits == 9 || strtof(buf, NULL) == cf) break;
    }
    uint64_t num = 0;
    const char *s = buf;
    for (; *s && *s != 'e'; s++)
        if (*s != '.') num = num * 10 + (uint64_t)(*s - '0');
    int q = atoi(s + 1) - (digits - 1); /* cf = num * 10^q */
    unsigned __int128 a = (unsigned __int128)num * (uint64_t)Tv * (uint64_t)k, b = (uint64_t)E;
    for (; q > 0; q--) a *= 10; /* a < 2^62 E (est < 2^62); b < 2 num Tv k (est >= 1/2) */
    for (; q < 0; q++) b *= 10;
    return (int64_t)((a + b - 1) / b);
}

float moe_capacity_factor(const moe_layer_config *c, int training) {
    return !training && c->eval_capacity_factor != 0 ? c->eval_capacity_factor : c->capacity_factor;
}

int moe_dispatch_capacity(const moe_layer_config *c, float cf, int64_t Tv, int k,
                          const int64_t *counts) {
    if (cf == 0 || Tv == 0) return 0;
    int64_t C = moe_capacity_ceil(fabsf(cf), Tv, k, c->n_experts);
    if (C < c->min_capacity) C = c->min_capacity;
    if (cf > 0 || !counts) return (int)(C < Tv ? C : Tv);
    int64_t mx = 0;
    for (int e = 0; e < c->n_experts; e++) mx = counts[e] > mx ? counts[e] : mx;
    return (int)(C < mx ? C : mx);
}

int moe_group_capacity(const moe_layer_config *c, float cf, int T, int k) {
    int G = c->local_group_size > 0 && c->local_group_size < T ? c->local_group_size : T, C = 0;
    for (int t0 = 0; t0 < T; t0 += G)
        C += moe_dispatch_capacity(c, cf, T - t0 < G ? T - t0 : G, k, NULL);
    return C;
}

int moe_expert_choice_capacity(const moe_layer_config *c, float cf, int64_t Tv, int k) {
    int64_t C = moe_capacity_ceil(cf > 0 ? cf : 1.0f, Tv, k, c->n_experts);
    return (int)(C < Tv ? C : Tv);
}

/* Stable merge sort of slot ids by key w, descending. */
static void sort_by_weight(int32_t *a, int n, const float *w, int32_t *tmp) {
    if (n < 2) return;
    int h = n / 2;
    sort_by_weight(a, h, w, tmp);
    sort_by_weight(a + h, n - h, w, tmp);
    int i = 0, j = h, o = 0;
    while (i < h && j < n) tmp[o++] = w[a[j]] > w[a[i]] ? a[j++] : a[i++];
    while (i < h) tmp[o++] = a[i++];
    while (j < n) tmp[o++] = a[j++];
    memcpy(a, tmp, sizeof(int32_t) * (size_t)n);
}

void moe_capacity_keep(int T, int k, int E, int C, moe_drop_policy policy,
                       const int32_t *slot_expert, const float *slot_key, uint8_t *kept,
                       int32_t *scratch) {
    int S = T * k;
    int32_t *off = scratch, *list = off + E + 1, *tmp = list + S;
    memset(off, 0, sizeof(int32_t) * (size_t)(E + 1));
    for (int s = 0; s < S; s++)
        if (slot_expert[s] >= 0) off[slot_expert[s] + 1]++;
    for (int e = 0; e < E; e++) off[e + 1] += off[e];
    /* Candidates of each expert in priority order: position, by token (Megatron's and
     * DeepSpeed's topkgating: the tokens at the end of the batch are dropped, whichever choice
     * the expert is for them); position by choice, by (j, t) (GShard's and DeepSpeed's
     * top2gating: first choices before second ones); probs and random, (j, t) before the
     * stable sort by the key (the weight, a random priority), so ties go to first choices;
     * batch-prioritized, each choice's run of (j, t) sorted by the key (the token's score). */
    int32_t *fill = tmp;
    for (int e = 0; e < E; e++) fill[e] = off[e];
    int by_token = policy == MOE_DROP_POSITION;
    for (int j = 0; j < (by_token ? 1 : k); j++)
        for (int i = 0; i < (by_token ? S : T); i++) {
            int s = by_token ? i : i * k + j, e = slot_expert[s];
            if (e >= 0) list[fill[e]++] = s;
        }
    for (int e = 0; e < E; e++) {
        int n = off[e + 1] - off[e];
        int32_t *cand = list + off[e];
        if (n > C && policy == MOE_DROP_PRIORITY) {
            for (int a = 0, b; a < n; a = b) {
                for (b = a + 1; b < n && cand[b] % k == cand[a] % k; b++) continue;
                sort_by_weight(cand + a, b - a, slot_key, tmp);
            }
        } else if (n > C && policy != MOE_DROP_POSITION && policy != MOE_DROP_CHOICE) {
            sort_by_weight(cand, n, slot_key, tmp);
        }
        for (int i = C; i < n; i++) kept[cand[i]] = 0;
    }
}

void moe_dispatch_plan(moe_layer *L) {
    const moe_layer_config *c = &L->cfg;
    moe_fwd_state *st = &L->st;
    int E = c->n_experts, S = st->n_slots;
    for (int s = 0; s < S; s++) st->slot_kept[s] = st->slot_expert[s] >= 0;
    /* each rank's own tokens, under data and expert parallelism too: the decisions of one
     * process with that micro-batch (Megatron-Core's) */
    if (c->router != MOE_ROUTER_EXPERT_CHOICE) {
        float cf = st->cf;
        const float *key = st->slot_w;
        if (cf != 0 && c->drop_policy == MOE_DROP_RANDOM) {
            /* DeepSpeed's random token selection: a priority in [0, 1) for each slot */
            uint64_t stream = moe_rng_stream(MOE_RNG_RTS, (uint64_t)c->layer_id, st->step, 0);
            for (int s = 0; s < S; s++)
                st->rts_key[s] = moe_rng_uniform(c->seed, stream, (uint64_t)s);
            key = st->rts_key;
        } else if (cf != 0 && c->drop_policy == MOE_DROP_PRIORITY) {
            /* batch-prioritized routing: each slot has its token's largest full-E score (slot
             * t k + j is token t's j-th: the maximum once a token) */
            for (int t = 0; t < st->T; t++) {
                const double *p = st->p + (size_t)t * E;
                double m = p[0];
                for (int e = 1; e < E; e++) m = p[e] > m ? p[e] : m;
                for (int j = 0; j < st->k; j++) st->rts_key[(size_t)t * st->k + j] = (float)m;
            }
            key = st->rts_key;
        }
        /* GShard's local groups: each group of G consecutive tokens has the capacity of its
         * own valid tokens (capped, when dynamic, by its own largest count: st->kept counts
         * the group's slots until it is set below) and keeps its slots by itself; an
         * expert's capacity is the sum over the groups */
        int T = st->T, k = st->k, G = c->local_group_size > 0 ? c->local_group_size : T;
        st->capacity = 0;
        for (int t0 = 0; cf != 0 && t0 < T; t0 += G) {
            int n = T - t0 < G ? T - t0 : G;
            int64_t tv = 0;
            for (int t = t0; t < t0 + n; t++) tv += !st->mask || st->mask[t];
            memset(st->kept, 0, sizeof(int64_t) * (size_t)E);
            for (int s = t0 * k; s < (t0 + n) * k; s++)
                if (st->slot_expert[s] >= 0) st->kept[st->slot_expert[s]]++;
            int C = moe_dispatch_capacity(c, cf, tv, k, st->kept);
            moe_capacity_keep(n, k, E, C, c->drop_policy, st->slot_expert + (size_t)t0 * k,
                              key + (size_t)t0 * k, st->slot_kept + (size_t)t0 * k, st->scratch);
            st->capacity += C;
        }
    }
    int pad = c->pad_to_capacity && c->router != MOE_ROUTER_EXPERT_CHOICE;
    memset(st->kept, 0, sizeof(int64_t) * (size_t)E);
    for (int s = 0; s < S; s++)
        if (st->slot_kept[s]) st->kept[st->slot_expert[s]]++;
    st->expert_off[0] = 0;
    for (int e = 0; e < E; e++)
        st->expert_off[e + 1] = st->expert_off[e] + (pad ? st->capacity : (int32_t)st->kept[e]);
    st->n_rows = st->expert_off[E];
    int32_t *fill = st->scratch;
    for (int e = 0; e < E; e++) fill[e] = st->expert_off[e];
    for (int s = 0; s < S; s++) {
        st->slot_row[s] = -1;
        if (!st->slot_kept[s]) continue;
        int r = fill[st->slot_expert[s]]++;
        st->slot_row[s] = r;
        st->row_slot[r] = s;
        st->row_w[r] = st->slot_w[s];
    }
    for (int e = 0; e < E; e++)
        for (int r = fill[e]; r < st->expert_off[e + 1]; r++) {
            st->row_slot[r] = -1;
            st->row_w[r] = 0;
        }
}
