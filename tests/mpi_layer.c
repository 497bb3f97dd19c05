/* Expert parallelism against one process: run with mpirun -np W (arguments: ep, and
 * "replicated" for the replicated-token mode, where every rank holds the whole batch, or
 * "two-stage=G" for the two-stage all-to-all with machines of G ranks). Every rank
 * builds the same global batch and the same full parameters, runs the single-process layer on
 * the whole batch, and the expert-parallel layer on its slice of the tokens with its slice of
 * the experts; outputs and input gradients must match row for row, parameter gradients after
 * summing over the ranks that hold the same parameters. With a capacity, the one process runs
 * each rank's tokens as a micro-batch of its own (each rank decides its drops). Option sets
 * cover dropless and capacity (position and probs), global-batch aux and z losses, shared
 * experts, sigmoid +
 * groups + expert bias, and the fake gate that leaves some ranks without tokens. */
#include "dist/comm.h"
#include "kernels/kernels.h"
#include "moe.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int failures;

static float *rnd(size_t n, uint64_t seed, uint64_t stream, float scale) {
    float *x = malloc(n * sizeof(float));
    for (size_t i = 0; i < n; i++) x[i] = scale * (2 * moe_rng_uniform(seed, stream, i) - 1);
    return x;
}

/* max |a - b| <= tol * max(1, max |b|) */
static void check(moe_dist *d, const char *cfg, const char *what, const float *a, const float *b,
                  size_t n, double tol) {
    double err = 0, scale = 1;
    for (size_t i = 0; i < n; i++) {
        double e = fabs((double)a[i] - b[i]);
        err = e > err || isnan(e) ? e : err;
        scale = fabs(b[i]) > scale ? fabs(b[i]) : scale;
    }
    if (!(err <= tol * scale)) {
        printf("rank %d: %s: %s differs: max error %.3g (scale %.3g)\n", d->world_rank, cfg, what,
               err, scale);
        failures++;
    }
}

typedef struct {
    const char *name;
    void (*set)(moe_layer_config *c);
} option_set;

static void dropless(moe_layer_config *c) { (void)c; }
static void cap_position(moe_layer_config *c) {
    c->capacity_factor = 1.0f;
    c->drop_policy = MOE_DROP_POSITION;
}
static void cap_probs(moe_layer_config *c) {
    c->capacity_factor = 1.25f;
    c->drop_policy = MOE_DROP_PROBS;
}
static void cap_dynamic(moe_layer_config *c) { c->capacity_factor = -1.5f; }
static void balancing(moe_layer_config *c) {
    c->lb_type = MOE_LB_GLOBAL_AUX;
    c->aux_coeff = 0.1f;
    c->z_coeff = 0.01f;
    c->shared_ffn = 12;
    c->shared_gate = 1;
}
static void deepseek(moe_layer_config *c) {
    c->score = MOE_SCORE_SIGMOID;
    c->n_groups = 4;
    c->group_topk = 2;
    c->enable_expert_bias = 1;
    c->route_scale = 2.5f;
    c->expert_bias = 1;
}
static void idle_ranks(moe_layer_config *c) { /* experts 0..3 get nothing */
    c->router = MOE_ROUTER_FAKE_BALANCED;
    c->fake_skip_first = 4;
}
static void bf16(moe_layer_config *c) { c->expert_bf16 = moe_gemm_bf16_available(); }

/* The all-to-all of the expert group on its own: random sizes (zeros among them), displacements
 * with gaps and out of rank order; every received byte must be the one its sender wrote. */
static void check_alltoallv(moe_dist *d, uint64_t seed) {
    int P = d->ep, me = d->ep_rank;
    int64_t sc[P], sd[P], rc[P], rd[P], ts = 0, tr = 0;
    for (int q = 0; q < P; q++) { /* sizes from (me -> q) and (q -> me) */
        sc[q] = (int64_t)(moe_rng_uniform(seed, 7, (uint64_t)(me * P + q)) * 300) % 97 * 3;
        rc[q] = (int64_t)(moe_rng_uniform(seed, 7, (uint64_t)(q * P + me)) * 300) % 97 * 3;
    }
    for (int i = 0; i < P; i++) { /* blocks in reverse rank order, 5 bytes apart */
        int q = P - 1 - i;
        sd[q] = ts, ts += sc[q] + 5;
        rd[q] = tr, tr += rc[q] + 5;
    }
    unsigned char *send = malloc((size_t)ts + 1), *recv = malloc((size_t)tr + 1);
    for (int q = 0; q < P; q++)
        for (int64_t i = 0; i < sc[q]; i++) send[sd[q] + i] = (unsigned char)(me * 31 + q * 7 + i);
    memset(recv, 0xee, (size_t)tr + 1);
    if (moe_comm_alltoallv(d->expert, send, sc, sd, recv, rc, rd) != MOE_OK) {
        printf("rank %d: all-to-all: %s\n", d->world_rank, moe_last_error());
        failures++;
    }
    for (int q = 0; q < P; q++)
        for (int64_t i = 0; i < rc[q]; i++)
            if (recv[rd[q] + i] != (unsigned char)(q * 31 + me * 7 + i)) {
                printf("rank %d: all-to-all: byte %lld from rank %d wrong\n", d->world_rank,
                       (long long)i, q);
                failures++;
                break;
            }
    for (int q = 0; q < P; q++) /* the gaps untouched */
        for (int64_t i = rd[q] + rc[q]; i < rd[q] + rc[q] + 5 && i < tr; i++)
            if (recv[i] != 0xee) {
                printf("rank %d: all-to-all wrote a gap\n", d->world_rank);
                failures++;
                break;
            }
    free(send), free(recv);
}

/* The expert-parallel layer L's parameters from the one-process ref (config c, gated
 * experts): its rank's slice of the experts, the rest whole. */
static void copy_params(const moe_layer_config *c, moe_layer *ref, moe_layer *L, int ep_rank) {
    moe_layer_params pr = moe_layer_get_params(ref), pl = moe_layer_get_params(L);
    size_t dd = (size_t)c->d, gf = 2 * (size_t)c->ffn, per_in = gf * dd, per_out = dd * c->ffn;
    size_t El = (size_t)moe_layer_get_config(L)->n_experts / moe_layer_get_config(L)->ep_size;
    size_t off = (size_t)ep_rank * El;
    memcpy(pl.router_w, pr.router_w, sizeof(float) * (size_t)c->n_experts * dd);
    memcpy(pl.w_in, pr.w_in + off * per_in, sizeof(float) * El * per_in);
    memcpy(pl.w_out, pr.w_out + off * per_out, sizeof(float) * El * per_out);
    if (c->expert_bias) {
        memcpy(pl.b_in, pr.b_in + off * gf, sizeof(float) * El * gf);
        memcpy(pl.b_out, pr.b_out + off * dd, sizeof(float) * El * dd);
    }
    if (c->shared_ffn) {
        memcpy(pl.shared_w_in, pr.shared_w_in, sizeof(float) * 2 * c->shared_ffn * dd);
        memcpy(pl.shared_w_out, pr.shared_w_out, sizeof(float) * (size_t)c->shared_ffn * dd);
        memcpy(pl.shared_gate_w, pr.shared_gate_w, sizeof(float) * dd);
    }
}

/* Global-batch aux loss with every token of the last rank masked: that rank still takes part
 * in the sum of the counts (or the others wait for it), its losses are 0, and the others' aux
 * losses average to one process's over the unmasked tokens. */
static void masked_rank(moe_dist *d, uint64_t seed, int Tl) {
    int W = d->world_size, Tv = (W - 1) * Tl, last = d->world_rank == W - 1;
    moe_layer_config c = moe_layer_config_default();
    c.d = 16, c.n_experts = 8, c.topk = 2, c.ffn = 10, c.seed = seed;
    c.lb_type = MOE_LB_GLOBAL_AUX, c.aux_coeff = 0.1f;
    moe_layer_config ce = c;
    ce.ep_size = d->ep, ce.ep_rank = d->ep_rank;
    moe_layer *ref, *L;
    if (moe_layer_create(&c, Tv, NULL, NULL, &ref) != MOE_OK ||
        moe_layer_create(&ce, Tl, NULL, NULL, &L) != MOE_OK) {
        printf("masked rank: %s\n", moe_last_error());
        moe_dist_abort(d, 1);
    }
    moe_layer_init_params(ref, seed, 0.3f);
    copy_params(&c, ref, L, d->ep_rank);
    moe_layer_set_comms(L, d->expert, d->world);
    size_t n = (size_t)W * Tl * c.d;
    float *x = rnd(n, seed, 3, 1.0f), *dout = rnd(n, seed, 4, 1.0f), *out = calloc(n, 4),
          *dx = calloc(n, 4);
    uint8_t mask[Tl];
    memset(mask, last ? 0 : 1, sizeof mask);
    moe_forward_args a = moe_forward_args_default(), al;
    a.training = 1;
    al = a;
    al.mask = mask;
    size_t mine = (size_t)d->world_rank * Tl * c.d;
    if (moe_layer_forward(ref, out, x, Tv, &a) != MOE_OK ||
        moe_layer_forward(L, out + mine, x + mine, Tl, &al) != MOE_OK ||
        moe_layer_backward(L, dx + mine, dout + mine, x + mine) != MOE_OK) {
        printf("rank %d: masked rank: %s\n", d->world_rank, moe_last_error());
        moe_dist_abort(d, 1);
    }
    double aux = moe_layer_get_stats(L)->aux_loss, want = moe_layer_get_stats(ref)->aux_loss;
    if (last && aux != 0) {
        printf("rank %d: masked rank: aux loss %g of no tokens\n", d->world_rank, aux);
        failures++;
    }
    moe_comm_sum_f64(d->world, &aux, 1);
    if (!(fabs(aux / (W - 1) - want) <= 1e-6 * (1 + want))) {
        printf("rank %d: masked rank: aux %.9g over the ranks, one process %.9g\n", d->world_rank,
               aux / (W - 1), want);
        failures++;
    }
    free(x), free(dout), free(out), free(dx);
    moe_layer_destroy(ref);
    moe_layer_destroy(L);
}

int main(int argc, char **argv) {
    moe_dist d;
    if (moe_dist_init(&argc, &argv, &d) != MOE_OK) {
        fprintf(stderr, "%s\n", moe_last_error());
        return 1;
    }
    int ep = argc > 1 ? atoi(argv[1]) : d.world_size;
    int replicated = argc > 2 && !strcmp(argv[2], "replicated");
    int node = argc > 2 && !strncmp(argv[2], "two-stage=", 10) ? atoi(argv[2] + 10) : 1;
    if (moe_dist_grid(&d, ep) != MOE_OK || moe_comm_set_two_stage(d.expert, node) != MOE_OK) {
        fprintf(stderr, "%s\n", moe_last_error());
        moe_dist_abort(&d, 1);
    }
    if (node > 1 && moe_comm_two_stage(d.expert) != node) {
        printf("two-stage all-to-all with %d ranks per machine not set up\n", node);
        failures++;
    }
    uint64_t seed = 0x5eed0000u + 77;
    for (int rep = 0; rep < 3; rep++) check_alltoallv(&d, seed + (uint64_t)rep);
    const option_set sets[] = {{"dropless", dropless},     {"capacity position", cap_position},
                               {"capacity probs", cap_probs}, {"dynamic capacity", cap_dynamic},
                               {"global aux, z, shared", balancing}, {"sigmoid groups bias", deepseek},
                               {"idle ranks", idle_ranks},   {"bf16 experts", bf16}};
    /* replicated: the data-parallel ranks are the expert-data groups; each rank of an expert
     * group holds its group's whole slice */
    int W = replicated ? d.edp : d.world_size, Tl = 24, Tg = W * Tl;
    int my = replicated ? d.edp_rank : d.world_rank;
    moe_comm *data = replicated ? d.expert_data : d.world;
    for (size_t si = 0; si < sizeof sets / sizeof *sets; si++) {
        moe_layer_config c = moe_layer_config_default();
        c.d = 16;
        c.n_experts = 8;
        c.topk = 2;
        c.ffn = 10;
        c.seed = seed;
        sets[si].set(&c);
        int El = c.n_experts / ep, dd = c.d;
        moe_layer *ref, *L;
        moe_layer_config ce = c;
        ce.ep_size = ep;
        ce.ep_rank = d.ep_rank;
        ce.ep_replicated = replicated;
        if (moe_layer_create(&c, Tg, NULL, NULL, &ref) != MOE_OK ||
            moe_layer_create(&ce, Tl, NULL, NULL, &L) != MOE_OK) {
            printf("%s: %s\n", sets[si].name, moe_last_error());
            moe_dist_abort(&d, 1);
        }
        moe_layer_init_params(ref, seed + si, 0.3f);
        copy_params(&c, ref, L, d.ep_rank);
        size_t per_in = 2 * (size_t)c.ffn * dd, per_out = (size_t)dd * c.ffn;
        size_t off = (size_t)d.ep_rank * El;
        if (c.enable_expert_bias) { /* a non-zero selection bias, the same everywhere */
            float *b0 = moe_layer_expert_bias(ref), *b1 = moe_layer_expert_bias(L);
            for (int e = 0; e < c.n_experts; e++) b0[e] = b1[e] = 0.05f * (float)(e % 3);
        }
        moe_layer_set_comms(L, d.expert, data);
        float *x = rnd((size_t)Tg * dd, seed, 1, 1.0f), *dout = rnd((size_t)Tg * dd, seed, 2, 1.0f);
        float *out = calloc((size_t)Tg * dd, 4), *dx = calloc((size_t)Tg * dd, 4);
        float *out_l = calloc((size_t)Tl * dd, 4), *dx_l = calloc((size_t)Tl * dd, 4);
        moe_forward_args a = moe_forward_args_default();
        a.training = 1;
        moe_forward_args al = a;
        al.loss_scale = 1.0f / W; /* each rank's losses are means over its own tokens */
        size_t mine = (size_t)my * Tl * dd;
        /* with a capacity, one process runs each rank's tokens as a micro-batch of its own
         * (each rank decides its drops, LAYER.md §8), its gradients added over them */
        int slices = c.capacity_factor != 0 ? W : 1, Ts = Tg / slices, cap_mine = 0;
        int64_t dropped_ref = 0;
        double losses_ref[2] = {0, 0};
        moe_forward_args ar = a;
        ar.loss_scale = 1.0f / (float)slices;
        int ok = 1;
        for (int q = 0; ok && q < slices; q++) {
            size_t o = (size_t)q * Ts * dd;
            ok = moe_layer_forward(ref, out + o, x + o, Ts, &ar) == MOE_OK &&
                 moe_layer_backward(ref, dx + o, dout + o, x + o) == MOE_OK;
            const moe_layer_stats *sq = moe_layer_get_stats(ref);
            dropped_ref += sq->dropped;
            losses_ref[0] += sq->aux_loss / slices, losses_ref[1] += sq->z_loss / slices;
            if (q == my * slices / W) cap_mine = sq->capacity;
        }
        ok = ok && moe_layer_forward(L, out_l, x + mine, Tl, &al) == MOE_OK &&
             moe_layer_backward(L, dx_l, dout + mine, x + mine) == MOE_OK;
        if (!ok) {
            printf("rank %d: %s: %s\n", d.world_rank, sets[si].name, moe_last_error());
            moe_dist_abort(&d, 1);
        }
        double tol = c.expert_bf16 ? 1e-5 : 2e-5; /* same bf16 rounding on both sides */
        check(&d, sets[si].name, "output", out_l, out + mine, (size_t)Tl * dd, tol);
        check(&d, sets[si].name, "input gradient", dx_l, dx + mine, (size_t)Tl * dd, tol);
        /* parameter gradients: dense ones summed over every rank, experts over their replicas */
        moe_layer_params gr = moe_layer_get_grads(ref), gl = moe_layer_get_grads(L);
        moe_comm_sum_f32(data, gl.router_w, (size_t)c.n_experts * dd);
        check(&d, sets[si].name, "router gradient", gl.router_w, gr.router_w,
              (size_t)c.n_experts * dd, tol);
        moe_comm_sum_f32(d.expert_data, gl.w_in, El * per_in);
        moe_comm_sum_f32(d.expert_data, gl.w_out, El * per_out);
        check(&d, sets[si].name, "expert w_in gradient", gl.w_in, gr.w_in + off * per_in,
              El * per_in, tol);
        check(&d, sets[si].name, "expert w_out gradient", gl.w_out, gr.w_out + off * per_out,
              El * per_out, tol);
        if (c.shared_ffn) {
            moe_comm_sum_f32(data, gl.shared_w_in, 2 * (size_t)c.shared_ffn * dd);
            check(&d, sets[si].name, "shared w_in gradient", gl.shared_w_in, gr.shared_w_in,
                  2 * (size_t)c.shared_ffn * dd, tol);
        }
        /* the bytes the exchanges sent, over the expert group. All-to-all: the counts (8 E), and
         * per row sent x and w forward, dL/dy backward; per row received y forward, dL/dx and
         * dL/dw backward; rows received over the group = rows sent. Replicated: the routed
         * outputs and dL/dx all-reduced, and dL/dw of every slot. */
        int64_t sent[2] = {moe_layer_get_stats(L)->exchange_bytes, 0};
        for (int e = 0; e < c.n_experts; e++) sent[1] += moe_layer_get_stats(L)->kept[e];
        moe_comm_sum_i64(d.expert, sent, 2);
        int64_t want = ep == 1      ? 0
                       : replicated ? (int64_t)ep * (8LL * Tl * dd + 8LL * Tl * c.topk)
                                    : 8LL * c.n_experts * ep + sent[1] * (16LL * dd + 12);
        if (sent[0] != want) {
            printf("rank %d: %s: exchanges sent %lld bytes, expected %lld\n", d.world_rank,
                   sets[si].name, (long long)sent[0], (long long)want);
            failures++;
        }
        /* the same drops and capacity as one process, and the losses' mean over ranks */
        const moe_layer_stats *sl = moe_layer_get_stats(L);
        int64_t dropped = sl->dropped;
        double losses[2] = {sl->aux_loss / W, sl->z_loss / W};
        moe_comm_sum_i64(data, &dropped, 1);
        moe_comm_sum_f64(data, losses, 2);
        if (dropped != dropped_ref || sl->capacity != cap_mine) {
            printf("rank %d: %s: dropped %lld, capacity %d; one process: %lld, %d\n", d.world_rank,
                   sets[si].name, (long long)dropped, sl->capacity, (long long)dropped_ref,
                   cap_mine);
            failures++;
        }
        if (fabs(losses[0] - losses_ref[0]) > 1e-6 * (1 + losses_ref[0]) ||
            fabs(losses[1] - losses_ref[1]) > 1e-6 * (1 + losses_ref[1])) {
            printf("rank %d: %s: aux %.9g z %.9g; one process %.9g %.9g\n", d.world_rank,
                   sets[si].name, losses[0], losses[1], losses_ref[0], losses_ref[1]);
            failures++;
        }
        if (d.world_rank == 0)
            printf("%-24s ep=%d of %d ranks%s%s: dropped %lld, capacity %d\n", sets[si].name, ep,
                   d.world_size, replicated ? ", replicated tokens" : "",
                   node > 1 ? ", two-stage all-to-all" : "", (long long)dropped_ref, cap_mine);
        free(x), free(dout), free(out), free(dx), free(out_l), free(dx_l);
        moe_layer_destroy(ref);
        moe_layer_destroy(L);
    }
    if (!replicated && W > 1) masked_rank(&d, seed, Tl);
    int64_t bad = failures;
    moe_comm_sum_i64(d.world, &bad, 1);
    if (d.world_rank == 0) printf("%s: %lld failures\n", bad ? "FAIL" : "ok", (long long)bad);
    moe_dist_finalize(&d);
    return bad ? 1 : 0;
}
