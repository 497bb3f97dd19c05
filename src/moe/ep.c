/* Expert parallelism (docs/LAYER.md §8). The permuted rows of each rank are grouped by global
 * expert; the block of experts [q El, (q+1) El) goes to rank q of the expert group
 * (MPI_Alltoall of the row counts, MPI_Alltoallv of the rows and their routing weights).
 * Each rank reorders what it receives expert-major, runs its El experts, and sends the
 * outputs back the same way; the backward moves dL/dy there and dL/dx with dL/dw back.
 * Capacity was decided before, on each rank's own tokens (dispatch.c). */
#include "core/core.h"
#include "dist/comm.h"
#include "kernels/kernels.h"
#include "moe/layer_internal.h"

#include <stdlib.h>
#include <string.h>

struct moe_ep_buffers {
    int64_t *scnt, *rcnt;        /* [E]: rows to / from each rank per local expert ([q][le]) */
    int64_t *sc, *sd, *rc, *rd;  /* [P] rows sent / received per rank and their offsets */
    int32_t *eoff;               /* [El + 1] expert-major offsets of the received rows */
    size_t cap_rows;
    int Rr;                      /* rows received this forward */
    int32_t *perm;               /* [Rr] expert-major row -> received (source-major) row */
    float *rx, *rw;              /* [Rr, d], [Rr] source-major staging */
    float *xe, *he, *ae, *ye, *dhe, *dae, *we; /* expert-major rows */
    double *rdw, *dwe;           /* [Rr] */
    uint16_t *x16, *a16, *dy16, *dh16;          /* bf16 experts */
    float *dxp;                  /* [max_tokens, d] replicated mode: the experts' part of dx */
    double t_comm;               /* seconds in the exchanges so far (waits included) */
    int sync;                    /* a barrier before each exchange, timed on its own */
};

void moe_ep_free(moe_layer *L) {
    struct moe_ep_buffers *b = L->ep;
    if (!b) return;
    void *ptrs[] = {b->scnt, b->rcnt, b->sc, b->sd, b->rc, b->rd, b->eoff, b->perm, b->rx, b->rw,
                    b->xe, b->he, b->ae, b->ye, b->dhe, b->dae, b->we, b->rdw, b->dwe, b->x16,
                    b->a16, b->dy16, b->dh16, b->dxp};
    for (size_t i = 0; i < sizeof ptrs / sizeof *ptrs; i++) moe_free(ptrs[i]);
    free(b);
    L->ep = NULL;
}

static int fail(moe_layer *L, moe_status s) {
    if (s != MOE_OK && L->ep_status == MOE_OK) L->ep_status = s;
    return s != MOE_OK;
}

static size_t gf_of(const moe_layer_config *c) {
    return moe_act_gated(c->act) ? 2 * (size_t)c->ffn : (size_t)c->ffn;
}

static moe_status ensure(moe_layer *L) {
    if (L->ep) return MOE_OK;
    int E = L->cfg.n_experts, P = L->cfg.ep_size;
    struct moe_ep_buffers *b = calloc(1, sizeof *b);
    if (!b) return moe_set_error(MOE_ERR_NOMEM, "out of memory for expert parallelism");
    L->ep = b;
    b->scnt = moe_alloc((size_t)E, sizeof(int64_t));
    b->rcnt = moe_alloc((size_t)E, sizeof(int64_t));
    b->sc = moe_alloc((size_t)P, sizeof(int64_t));
    b->sd = moe_alloc((size_t)P, sizeof(int64_t));
    b->rc = moe_alloc((size_t)P, sizeof(int64_t));
    b->rd = moe_alloc((size_t)P, sizeof(int64_t));
    b->eoff = moe_alloc((size_t)E / P + 1, sizeof(int32_t));
    if (!b->scnt || !b->rcnt || !b->sc || !b->sd || !b->rc || !b->rd || !b->eoff)
        return MOE_ERR_NOMEM;
    return MOE_OK;
}

/* Row buffers for R received rows (grown, never shrunk; contents are not kept). */
static moe_status ensure_rows(moe_layer *L, size_t R) {
    struct moe_ep_buffers *b = L->ep;
    if (R <= b->cap_rows && b->rx) return MOE_OK;
    size_t d = (size_t)L->cfg.d, f = (size_t)L->cfg.ffn, gf = gf_of(&L->cfg);
    size_t n = R + R / 4 + 16, b16 = L->cfg.expert_bf16 != 0;
    float **fl[] = {&b->rx, &b->xe, &b->ye};
    for (int i = 0; i < 3; i++) {
        moe_free(*fl[i]);
        *fl[i] = moe_alloc(n * d, sizeof(float));
    }
    moe_free(b->he), moe_free(b->dhe), moe_free(b->ae), moe_free(b->dae);
    moe_free(b->rw), moe_free(b->we), moe_free(b->rdw), moe_free(b->dwe), moe_free(b->perm);
    moe_free(b->x16), moe_free(b->a16), moe_free(b->dy16), moe_free(b->dh16);
    b->he = moe_alloc(n * gf, sizeof(float));
    b->dhe = moe_alloc(n * gf, sizeof(float));
    b->ae = moe_alloc(n * f, sizeof(float));
    b->dae = moe_alloc(n * f, sizeof(float));
    b->rw = moe_alloc(n, sizeof(float));
    b->we = moe_alloc(n, sizeof(float));
    b->rdw = moe_alloc(n, sizeof(double));
    b->dwe = moe_alloc(n, sizeof(double));
    b->perm = moe_alloc(n, sizeof(int32_t));
    b->x16 = moe_alloc(b16 * n * d, sizeof(uint16_t));
    b->a16 = moe_alloc(b16 * n * f, sizeof(uint16_t));
    b->dy16 = moe_alloc(b16 * n * d, sizeof(uint16_t));
    b->dh16 = moe_alloc(b16 * n * gf, sizeof(uint16_t));
    b->cap_rows = n;
    if (!b->rx || !b->xe || !b->ye || !b->he || !b->dhe || !b->ae || !b->dae || !b->rw ||
        !b->we || !b->rdw || !b->dwe || !b->perm || !b->x16 || !b->a16 || !b->dy16 || !b->dh16) {
        b->cap_rows = 0;
        return moe_set_error(MOE_ERR_NOMEM, "out of memory for %zu expert-parallel rows", R);
    }
    return MOE_OK;
}

/* Begins an exchange with the other ranks of the group: returns its start time. With waits
 * timed, a barrier first: the time until the slowest rank arrives is the wait. */
static double comm_begin(moe_layer *L) {
    double t = moe_time_now();
    if (!L->ep->sync) return t;
    moe_status s = moe_comm_barrier(L->ep_comm);
    if (s != MOE_OK) fail(L, s);
    double w = moe_time_now() - t;
    L->ep->t_comm += w;
    L->stats.exchange_wait_s += w;
    return t + w;
}

/* Accounts one exchange with other ranks begun at t0 (its time and the bytes sent); returns
 * its status. */
static moe_status comm_done(moe_layer *L, double t0, int64_t bytes, moe_status s) {
    L->ep->t_comm += moe_time_now() - t0;
    L->stats.exchange_bytes += bytes;
    return s;
}

/* Moves rows of `width` bytes: send rows by sc/sd, receive by rc/rd (row units), or the
 * reverse direction when back is set. */
static moe_status exchange(moe_layer *L, const void *send, void *recv, size_t width, int back) {
    struct moe_ep_buffers *b = L->ep;
    int P = L->cfg.ep_size;
    int64_t sc[P], sd[P], rc[P], rd[P], bytes = 0;
    for (int q = 0; q < P; q++) {
        sc[q] = (back ? b->rc[q] : b->sc[q]) * (int64_t)width;
        sd[q] = (back ? b->rd[q] : b->sd[q]) * (int64_t)width;
        rc[q] = (back ? b->sc[q] : b->rc[q]) * (int64_t)width;
        rd[q] = (back ? b->sd[q] : b->rd[q]) * (int64_t)width;
        bytes += sc[q];
    }
    double t0 = comm_begin(L);
    return comm_done(L, t0, bytes, moe_comm_alltoallv(L->ep_comm, send, sc, sd, recv, rc, rd));
}

/* Expert-major copy of received rows (to_expert) or the reverse, width floats per row. */
static void permute(const struct moe_ep_buffers *b, float *em, float *sm, size_t width,
                    int to_expert) {
#pragma omp parallel for schedule(static)
    for (int r = 0; r < b->Rr; r++) {
        float *e = em + (size_t)r * width, *s = sm + (size_t)b->perm[r] * width;
        if (to_expert) memcpy(e, s, sizeof(float) * width);
        else memcpy(s, e, sizeof(float) * width);
    }
}

/* The received rows, expert-major. */
static moe_expert_rows ep_rows(struct moe_ep_buffers *b) {
    return (moe_expert_rows){b->xe, b->we, b->he, b->ae, b->ye, b->dhe, b->dae, b->dwe,
                             b->x16, b->a16, b->dy16, b->dh16};
}

/* Replicated tokens (every rank of the expert group holds the same batch): each rank computes
 * the rows of its experts in place, the combined outputs are summed over the group. */
static void replicated_forward(moe_layer *L) {
    const moe_layer_config *c = &L->cfg;
    moe_fwd_state *st = &L->st;
    int d = c->d, f = c->ffn, El = c->n_experts / c->ep_size, e0 = c->ep_rank * El;
    size_t gf = gf_of(c);
    int lo = st->expert_off[e0], hi = st->expert_off[e0 + El];
    double t0 = moe_time_now(), t_act = 0;
    if (fail(L, ensure(L))) return;
    L->stats.exchange_bytes = 0;
    L->stats.exchange_wait_s = 0;
    moe_fwd_state local = *st; /* gather only this rank's rows */
    local.row_slot = st->row_slot + lo;
    moe_gather_rows(&local, st->xp + (size_t)lo * d, st->xin_orig, hi - lo, d);
    if (c->expert_bf16) {
        moe_f32_to_bf16(L->p.w_in, st->w_in16, (size_t)El * gf * d);
        moe_f32_to_bf16(L->p.w_out, st->w_out16, (size_t)El * d * f);
    }
    double t1 = moe_time_now();
    moe_expert_rows rows = moe_own_rows(st);
    for (int le = 0; le < El; le++)
        moe_expert_rows_forward(L, &rows, le, st->expert_off[e0 + le],
                                st->expert_off[e0 + le + 1] - st->expert_off[e0 + le], &t_act);
    double t2 = moe_time_now();
    memset(st->y, 0, sizeof(float) * (size_t)lo * d);
    memset(st->y + (size_t)hi * d, 0, sizeof(float) * (size_t)(st->n_rows - hi) * d);
    moe_combine_rows(st, st->y, d);
    double t3 = moe_time_now(), t4 = comm_begin(L);
    fail(L, comm_done(L, t4, (int64_t)sizeof(float) * st->T * d,
                      moe_comm_sum_f32(L->ep_comm, st->r, (size_t)st->T * d)));
    L->stage_s[MOE_STAGE_PERMUTE] += t1 - t0;
    L->stage_s[MOE_STAGE_EXPERT_GEMM] += t2 - t1 - t_act;
    L->stage_s[MOE_STAGE_ACTIVATION] += t_act;
    L->stage_s[MOE_STAGE_COMBINE] += t3 - t2;
    L->stage_s[MOE_STAGE_EXCHANGE] += moe_time_now() - t3;
}

static void replicated_backward(moe_layer *L, float *dx, const float *x) {
    const moe_layer_config *c = &L->cfg;
    moe_fwd_state *st = &L->st;
    int d = c->d, El = c->n_experts / c->ep_size, e0 = c->ep_rank * El, T = st->T;
    int lo = st->expert_off[e0], hi = st->expert_off[e0 + El];
    double t0 = moe_time_now(), t_act = 0;
    if (fail(L, ensure(L))) return;
    struct moe_ep_buffers *b = L->ep;
    if (!b->dxp && !(b->dxp = moe_alloc((size_t)L->max_tokens * d, sizeof(float)))) {
        fail(L, MOE_ERR_NOMEM);
        return;
    }
    moe_fwd_state local = *st;
    local.row_slot = st->row_slot + lo;
    moe_gather_rows(&local, st->xp + (size_t)lo * d, x, hi - lo, d); /* as the forward did */
    moe_gather_rows(&local, st->y + (size_t)lo * d, st->dgrad, hi - lo, d);
    double t1 = moe_time_now();
    moe_expert_rows rows = moe_own_rows(st);
    for (int le = 0; le < El; le++)
        moe_expert_rows_backward(L, &rows, le, st->expert_off[e0 + le],
                                 st->expert_off[e0 + le + 1] - st->expert_off[e0 + le],
                                 MOE_MLP_BWD_ALL, &t_act);
    double t2 = moe_time_now();
    /* the other ranks' rows contribute nothing here; the sums over the group complete them */
    memset(st->xp, 0, sizeof(float) * (size_t)lo * d);
    memset(st->xp + (size_t)hi * d, 0, sizeof(float) * (size_t)(st->n_rows - hi) * d);
    for (int r = 0; r < st->n_rows; r++)
        if (r < lo || r >= hi) st->dw_row[r] = 0;
    memset(b->dxp, 0, sizeof(float) * (size_t)T * d);
    moe_scatter_rows(st, st->xp, b->dxp, d);
    double c2 = b->t_comm, t3 = comm_begin(L);
    if (fail(L, comm_done(L, t3, (int64_t)sizeof(float) * T * d,
                          moe_comm_sum_f32(L->ep_comm, b->dxp, (size_t)T * d))))
        return;
    t3 = comm_begin(L);
    if (fail(L, comm_done(L, t3, (int64_t)sizeof(double) * st->n_slots,
                          moe_comm_sum_f64(L->ep_comm, st->dw, (size_t)st->n_slots))))
        return;
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < (size_t)T * d; i++) dx[i] += b->dxp[i];
    L->stage_s[MOE_STAGE_BWD_EXCHANGE] += b->t_comm - c2;
    L->stage_s[MOE_STAGE_BWD_PERMUTE] += (t1 - t0) + (moe_time_now() - t2) - (b->t_comm - c2);
    L->stage_s[MOE_STAGE_BWD_EXPERT_GEMM] += t2 - t1 - t_act;
    L->stage_s[MOE_STAGE_BWD_ACTIVATION] += t_act;
}

void moe_ep_forward(moe_layer *L) {
    const moe_layer_config *c = &L->cfg;
    if (c->ep_replicated) {
        replicated_forward(L);
        return;
    }
    moe_fwd_state *st = &L->st;
    int d = c->d, f = c->ffn, E = c->n_experts, P = c->ep_size, El = E / P, R = st->n_rows;
    size_t gf = gf_of(c);
    double t0 = moe_time_now(), t_act = 0;
    if (fail(L, ensure(L))) return;
    struct moe_ep_buffers *b = L->ep;
    double c0 = b->t_comm;
    L->stats.exchange_bytes = 0;
    L->stats.exchange_wait_s = 0;
    moe_gather_rows(st, st->xp, st->xin_orig, R, d);
    for (int e = 0; e < E; e++) b->scnt[e] = st->expert_off[e + 1] - st->expert_off[e];
    double tc = comm_begin(L);
    if (fail(L, comm_done(L, tc, (int64_t)sizeof(int64_t) * E,
                          moe_comm_alltoall_i64(L->ep_comm, b->scnt, b->rcnt, El))))
        return;
    int64_t Rr = 0;
    for (int q = 0; q < P; q++) {
        b->sd[q] = st->expert_off[q * El];
        b->sc[q] = st->expert_off[(q + 1) * El] - b->sd[q];
        b->rd[q] = Rr;
        b->rc[q] = 0;
        for (int le = 0; le < El; le++) b->rc[q] += b->rcnt[q * El + le];
        Rr += b->rc[q];
    }
    if (fail(L, ensure_rows(L, (size_t)Rr))) return;
    b->Rr = (int)Rr;
    if (fail(L, exchange(L, st->xp, b->rx, sizeof(float) * (size_t)d, 0)) ||
        fail(L, exchange(L, st->row_w, b->rw, sizeof(float), 0)))
        return;
    /* expert-major order: for each local expert, its rows from rank 0, 1, ... */
    b->eoff[0] = 0;
    for (int le = 0; le < El; le++) {
        int o = b->eoff[le];
        for (int q = 0; q < P; q++) {
            int64_t start = b->rd[q];
            for (int j = 0; j < le; j++) start += b->rcnt[q * El + j];
            for (int64_t i = 0; i < b->rcnt[q * El + le]; i++) b->perm[o++] = (int32_t)(start + i);
        }
        b->eoff[le + 1] = o;
    }
    permute(b, b->xe, b->rx, (size_t)d, 1);
    permute(b, b->we, b->rw, 1, 1);
    if (c->expert_bf16) {
        moe_f32_to_bf16(L->p.w_in, st->w_in16, (size_t)El * gf * d);
        moe_f32_to_bf16(L->p.w_out, st->w_out16, (size_t)El * d * f);
    }
    double t1 = moe_time_now(), c1 = b->t_comm;
    moe_expert_rows rows = ep_rows(b);
    for (int le = 0; le < El; le++)
        moe_expert_rows_forward(L, &rows, le, b->eoff[le], b->eoff[le + 1] - b->eoff[le], &t_act);
    double t2 = moe_time_now(), c2 = b->t_comm;
    permute(b, b->ye, b->rx, (size_t)d, 0);
    if (fail(L, exchange(L, b->rx, st->y, sizeof(float) * (size_t)d, 1))) return;
    moe_combine_rows(st, st->y, d);
    L->stage_s[MOE_STAGE_PERMUTE] += t1 - t0 - (c1 - c0);
    L->stage_s[MOE_STAGE_EXPERT_GEMM] += t2 - t1 - t_act;
    L->stage_s[MOE_STAGE_ACTIVATION] += t_act;
    L->stage_s[MOE_STAGE_COMBINE] += moe_time_now() - t2 - (b->t_comm - c2);
    L->stage_s[MOE_STAGE_EXCHANGE] += b->t_comm - c0;
}

void moe_ep_backward(moe_layer *L, float *dx, const float *x) {
    const moe_layer_config *c = &L->cfg;
    if (c->ep_replicated) {
        replicated_backward(L, dx, x);
        return;
    }
    moe_fwd_state *st = &L->st;
    struct moe_ep_buffers *b = L->ep;
    int d = c->d, El = c->n_experts / c->ep_size, R = st->n_rows;
    double t0 = moe_time_now(), t_act = 0, c0 = b->t_comm;
    moe_gather_rows(st, st->y, st->dgrad, R, d); /* dL/dy of each row */
    if (fail(L, exchange(L, st->y, b->rx, sizeof(float) * (size_t)d, 0))) return;
    permute(b, b->ye, b->rx, (size_t)d, 1);
    double t1 = moe_time_now();
    moe_expert_rows rows = ep_rows(b);
    for (int le = 0; le < El; le++)
        moe_expert_rows_backward(L, &rows, le, b->eoff[le], b->eoff[le + 1] - b->eoff[le],
                                 MOE_MLP_BWD_ALL, &t_act);
    double t2 = moe_time_now();
    permute(b, b->xe, b->rx, (size_t)d, 0);
#pragma omp parallel for schedule(static)
    for (int r = 0; r < b->Rr; r++) b->rdw[b->perm[r]] = b->dwe[r];
    if (fail(L, exchange(L, b->rx, st->xp, sizeof(float) * (size_t)d, 1)) ||
        fail(L, exchange(L, b->rdw, st->dw_row, sizeof(double), 1)))
        return;
    moe_scatter_rows(st, st->xp, dx, d);
    L->stage_s[MOE_STAGE_BWD_EXCHANGE] += b->t_comm - c0;
    L->stage_s[MOE_STAGE_BWD_PERMUTE] += (t1 - t0) + (moe_time_now() - t2) - (b->t_comm - c0);
    L->stage_s[MOE_STAGE_BWD_EXPERT_GEMM] += t2 - t1 - t_act;
    L->stage_s[MOE_STAGE_BWD_ACTIVATION] += t_act;
}

moe_status moe_layer_time_exchange_waits(moe_layer *L, int on) {
    if (L->cfg.ep_size > 1) {
        MOE_TRY(ensure(L));
        L->ep->sync = on != 0;
    }
    return MOE_OK;
}
