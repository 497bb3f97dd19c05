/* Collectives over MPI, or copies for one rank. */
#define _POSIX_C_SOURCE 200809L
#include "dist/comm.h"

#include "core/core.h"

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef MOE_HAVE_MPI
#include <mpi.h>
struct moe_comm {
    MPI_Comm c;
    int node;                    /* two-stage all-to-all: ranks per machine (0: one stage) */
    MPI_Comm intra, inter;       /* the ranks of this machine; this place on every machine */
    char *scratch;               /* staging of the two-stage all-to-all, grown as needed */
    size_t scratch_cap;
};
struct moe_comm_req {
    MPI_Request r;
};
#else
struct moe_comm {
    int unused;
};
struct moe_comm_req {
    int unused;
};
#endif

static moe_dist g_dist = {.world_size = 1, .ep = 1, .edp = 1, .node_size = 1};

moe_dist *moe_dist_get(void) { return &g_dist; }

int moe_comm_size(const moe_comm *c) {
#ifdef MOE_HAVE_MPI
    int n = 1;
    if (c) MPI_Comm_size(c->c, &n);
    return n;
#else
    (void)c;
    return 1;
#endif
}

int moe_comm_rank(const moe_comm *c) {
#ifdef MOE_HAVE_MPI
    int r = 0;
    if (c) MPI_Comm_rank(c->c, &r);
    return r;
#else
    (void)c;
    return 0;
#endif
}

#ifdef MOE_HAVE_MPI
static moe_status mpi_check(int rc, const char *what) {
    if (rc == MPI_SUCCESS) return MOE_OK;
    char msg[MPI_MAX_ERROR_STRING];
    int len = 0;
    MPI_Error_string(rc, msg, &len);
    return moe_set_error(MOE_ERR_IO, "%s failed: %s", what, msg);
}

static moe_status to_int(const int64_t *v, int n, int *out, const char *what) {
    for (int i = 0; i < n; i++) {
        if (v[i] < 0 || v[i] > INT_MAX)
            return moe_set_error(MOE_ERR_INVALID, "%s: a count of %lld exceeds MPI's int", what,
                                 (long long)v[i]);
        out[i] = (int)v[i];
    }
    return MOE_OK;
}

static moe_status reduce(moe_comm *c, void *buf, size_t n, MPI_Datatype t, MPI_Op op) {
    if (!c || moe_comm_size(c) == 1 || n == 0) return MOE_OK;
    if (n > INT_MAX) return moe_set_error(MOE_ERR_INVALID, "all-reduce of %zu elements", n);
    return mpi_check(MPI_Allreduce(MPI_IN_PLACE, buf, (int)n, t, op, c->c), "MPI_Allreduce");
}
#endif

moe_status moe_comm_sum_f32(moe_comm *c, float *buf, size_t n) {
#ifdef MOE_HAVE_MPI
    return reduce(c, buf, n, MPI_FLOAT, MPI_SUM);
#else
    (void)c, (void)buf, (void)n;
    return MOE_OK;
#endif
}

moe_status moe_comm_sum_f64(moe_comm *c, double *buf, size_t n) {
#ifdef MOE_HAVE_MPI
    return reduce(c, buf, n, MPI_DOUBLE, MPI_SUM);
#else
    (void)c, (void)buf, (void)n;
    return MOE_OK;
#endif
}

moe_status moe_comm_sum_i64(moe_comm *c, int64_t *buf, size_t n) {
#ifdef MOE_HAVE_MPI
    return reduce(c, buf, n, MPI_INT64_T, MPI_SUM);
#else
    (void)c, (void)buf, (void)n;
    return MOE_OK;
#endif
}

moe_status moe_comm_max_i64(moe_comm *c, int64_t *buf, size_t n) {
#ifdef MOE_HAVE_MPI
    return reduce(c, buf, n, MPI_INT64_T, MPI_MAX);
#else
    (void)c, (void)buf, (void)n;
    return MOE_OK;
#endif
}

moe_status moe_comm_isum_f32(moe_comm *c, float *buf, size_t n, moe_comm_req **req) {
    *req = NULL;
#ifdef MOE_HAVE_MPI
    if (!c || moe_comm_size(c) == 1 || n == 0) return MOE_OK;
    if (n > INT_MAX) return moe_set_error(MOE_ERR_INVALID, "all-reduce of %zu elements", n);
    moe_comm_req *r = malloc(sizeof *r);
    if (!r) return moe_set_error(MOE_ERR_NOMEM, "out of memory for a request");
    moe_status st = mpi_check(MPI_Iallreduce(MPI_IN_PLACE, buf, (int)n, MPI_FLOAT, MPI_SUM, c->c,
                                             &r->r), "MPI_Iallreduce");
    if (st != MOE_OK) free(r);
    else *req = r;
    return st;
#else
    (void)c, (void)buf, (void)n;
    return MOE_OK;
#endif
}

moe_status moe_comm_wait(moe_comm_req *req) {
    if (!req) return MOE_OK;
#ifdef MOE_HAVE_MPI
    moe_status st = mpi_check(MPI_Wait(&req->r, MPI_STATUS_IGNORE), "MPI_Wait");
    free(req);
    return st;
#else
    return MOE_OK;
#endif
}

void moe_comm_progress(moe_comm_req *req) {
#ifdef MOE_HAVE_MPI
    int done;
    if (req) MPI_Test(&req->r, &done, MPI_STATUS_IGNORE);
#else
    (void)req;
#endif
}

moe_status moe_comm_alltoall_i64(moe_comm *c, const int64_t *send, int64_t *recv, int n) {
    int size = moe_comm_size(c);
    if (size == 1) {
        memmove(recv, send, sizeof(int64_t) * (size_t)n);
        return MOE_OK;
    }
#ifdef MOE_HAVE_MPI
    return mpi_check(MPI_Alltoall(send, n, MPI_INT64_T, recv, n, MPI_INT64_T, c->c), "MPI_Alltoall");
#else
    return MOE_OK;
#endif
}

#ifdef MOE_HAVE_MPI
static int64_t gcd64(int64_t a, int64_t b) {
    while (b) {
        int64_t t = a % b;
        a = b, b = t;
    }
    return a;
}

/* The largest block of bytes (at most 2^30) that divides every count and displacement: MPI's
 * counts are ints, so the exchange counts blocks of bytes, not bytes (rows of d floats give
 * 4d times the room of 2 GiB). A block is a contiguous run of MPI_BYTE: the two sides may
 * choose different blocks, since MPI matches the sequence of bytes. */
static moe_status block_counts(const int64_t *count, const int64_t *displ, int n, int *c, int *d,
                               MPI_Datatype *type) {
    int64_t g = 0;
    for (int i = 0; i < n; i++) g = gcd64(gcd64(g, count[i]), displ[i]);
    if (g > (int64_t)1 << 30) g = gcd64(g, (int64_t)1 << 30);
    if (g < 1) g = 1;
    int64_t cb[n], db[n];
    for (int i = 0; i < n; i++) cb[i] = count[i] / g, db[i] = displ[i] / g;
    MOE_TRY(to_int(cb, n, c, "MPI_Alltoallv"));
    MOE_TRY(to_int(db, n, d, "MPI_Alltoallv"));
    MOE_TRY(mpi_check(MPI_Type_contiguous((int)g, MPI_BYTE, type), "MPI_Type_contiguous"));
    return mpi_check(MPI_Type_commit(type), "MPI_Type_commit");
}

static moe_status alltoallv_i64(MPI_Comm comm, int size, const void *send, const int64_t *scount,
                                const int64_t *sdispl, void *recv, const int64_t *rcount,
                                const int64_t *rdispl) {
    int sc[size], sd[size], rc[size], rd[size];
    MPI_Datatype st = MPI_DATATYPE_NULL, rt = MPI_DATATYPE_NULL;
    moe_status s = block_counts(scount, sdispl, size, sc, sd, &st);
    if (s == MOE_OK) s = block_counts(rcount, rdispl, size, rc, rd, &rt);
    if (s == MOE_OK)
        s = mpi_check(MPI_Alltoallv(send, sc, sd, st, recv, rc, rd, rt, comm), "MPI_Alltoallv");
    if (st != MPI_DATATYPE_NULL) MPI_Type_free(&st);
    if (rt != MPI_DATATYPE_NULL) MPI_Type_free(&rt);
    return s;
}

static void prefix(const int64_t *count, int n, int64_t *displ, int64_t *total) {
    int64_t o = 0;
    for (int i = 0; i < n; i++) displ[i] = o, o += count[i];
    *total = o;
}

/* Two stages over P = N machines x G ranks, rank (n, g) = n G + g. Stage 1, inside each
 * machine: rank (n, g) hands its local peer h every block bound for (m, h), any m. Stage 2,
 * between machines: rank (n, h) sends machine m's rank h the blocks of all (n, g) bound for it.
 * Each message of stage 2 is G blocks combined, so the inter-machine exchange has P / G times
 * fewer, larger messages than the flat one. */
static moe_status alltoallv_two_stage(moe_comm *c, const char *send, const int64_t *scount,
                                      const int64_t *sdispl, char *recv, const int64_t *rcount,
                                      const int64_t *rdispl) {
    int P = moe_comm_size(c), G = c->node, N = P / G;
    int64_t cs[G * N], cr[G * N]; /* bytes: [h][m] from me to (m, h); [g][m] from (n, g) to (m, me) */
    for (int h = 0; h < G; h++)
        for (int m = 0; m < N; m++) cs[h * N + m] = scount[m * G + h];
    MOE_TRY(mpi_check(MPI_Alltoall(cs, N, MPI_INT64_T, cr, N, MPI_INT64_T, c->intra),
                      "MPI_Alltoall"));
    int64_t s1c[G], s1d[G], r1c[G], r1d[G], s2c[N], s2d[N], r2c[N], r2d[N], ts, t1, t2;
    for (int h = 0; h < G; h++) {
        s1c[h] = r1c[h] = 0;
        for (int m = 0; m < N; m++) s1c[h] += cs[h * N + m], r1c[h] += cr[h * N + m];
    }
    for (int m = 0; m < N; m++) {
        s2c[m] = r2c[m] = 0;
        for (int g = 0; g < G; g++) s2c[m] += cr[g * N + m], r2c[m] += rcount[m * G + g];
    }
    prefix(s1c, G, s1d, &ts);
    prefix(r1c, G, r1d, &t1);
    prefix(s2c, N, s2d, &t2);
    int64_t tr = 0;
    for (int m = 0; m < N; m++) r2d[m] = tr, tr += r2c[m];
    size_t need = (size_t)(ts + 2 * t1 + tr);
    if (need > c->scratch_cap) {
        char *p = realloc(c->scratch, need);
        if (!p) return moe_set_error(MOE_ERR_NOMEM, "out of memory for a %zu-byte all-to-all", need);
        c->scratch = p, c->scratch_cap = need;
    }
    char *a = c->scratch, *b = a + ts, *b2 = b + t1, *r = b2 + t1;
    int64_t o = 0; /* stage-1 send: [h][m] */
    for (int h = 0; h < G; h++)
        for (int m = 0; m < N; m++) {
            memcpy(a + o, send + sdispl[m * G + h], (size_t)scount[m * G + h]);
            o += scount[m * G + h];
        }
    MOE_TRY(alltoallv_i64(c->intra, G, a, s1c, s1d, b, r1c, r1d));
    int64_t at[G]; /* stage-2 send: [m][g] from the [g][m] received */
    for (int g = 0; g < G; g++) at[g] = r1d[g];
    o = 0;
    for (int m = 0; m < N; m++)
        for (int g = 0; g < G; g++) {
            memcpy(b2 + o, b + at[g], (size_t)cr[g * N + m]);
            o += cr[g * N + m], at[g] += cr[g * N + m];
        }
    MOE_TRY(alltoallv_i64(c->inter, N, b2, s2c, s2d, r, r2c, r2d));
    o = 0; /* received in source-rank order [m][g] */
    for (int q = 0; q < P; q++) {
        memcpy(recv + rdispl[q], r + o, (size_t)rcount[q]);
        o += rcount[q];
    }
    return MOE_OK;
}
#endif

moe_status moe_comm_alltoallv(moe_comm *c, const void *send, const int64_t *scount,
                              const int64_t *sdispl, void *recv, const int64_t *rcount,
                              const int64_t *rdispl) {
    int size = moe_comm_size(c);
    if (size == 1) {
        if (scount[0]) memmove((char *)recv + rdispl[0], (const char *)send + sdispl[0], (size_t)scount[0]);
        return MOE_OK;
    }
#ifdef MOE_HAVE_MPI
    if (c->node) return alltoallv_two_stage(c, send, scount, sdispl, recv, rcount, rdispl);
    return alltoallv_i64(c->c, size, send, scount, sdispl, recv, rcount, rdispl);
#else
    (void)rcount; /* without MPI every group is one rank */
    return MOE_OK;
#endif
}

moe_status moe_comm_set_two_stage(moe_comm *c, int node_size) {
    int P = moe_comm_size(c);
#ifdef MOE_HAVE_MPI
    if (!c || P == 1) return MOE_OK;
    int r = moe_comm_rank(c), G = node_size;
    if (G == 0) { /* the machines MPI reports: the same number of consecutive ranks on each */
        MPI_Comm shared;
        MOE_TRY(mpi_check(MPI_Comm_split_type(c->c, MPI_COMM_TYPE_SHARED, r, MPI_INFO_NULL,
                                              &shared), "MPI_Comm_split_type"));
        int mine[3], all[3 * P]; /* ranks on this machine, its first and last rank */
        MPI_Comm_size(shared, &mine[0]);
        int rc = MPI_Allreduce(&r, &mine[1], 1, MPI_INT, MPI_MIN, shared);
        if (rc == MPI_SUCCESS) rc = MPI_Allreduce(&r, &mine[2], 1, MPI_INT, MPI_MAX, shared);
        MPI_Comm_free(&shared);
        MOE_TRY(mpi_check(rc, "MPI_Allreduce"));
        MOE_TRY(mpi_check(MPI_Allgather(mine, 3, MPI_INT, all, 3, MPI_INT, c->c), "MPI_Allgather"));
        G = mine[0];
        for (int q = 0; q < P; q++)
            if (all[3 * q] != G || P % G != 0 || all[3 * q + 1] != q / G * G ||
                all[3 * q + 2] != all[3 * q + 1] + G - 1)
                return moe_set_error(MOE_ERR_INVALID, "two-stage all-to-all: the machines must "
                                     "hold the same number of consecutive ranks of the expert "
                                     "group (rank %d differs; mpirun --map-by slot)", q);
    }
    if (G < 1 || P % G != 0)
        return moe_set_error(MOE_ERR_INVALID, "two-stage all-to-all: %d ranks per machine do "
                             "not divide the %d ranks of the expert group", G, P);
    if (c->node) MPI_Comm_free(&c->intra), MPI_Comm_free(&c->inter);
    c->node = 0;
    free(c->scratch);
    c->scratch = NULL, c->scratch_cap = 0;
    if (G == 1 || G == P) return MOE_OK; /* one stage is all there is */
    MOE_TRY(mpi_check(MPI_Comm_split(c->c, r / G, r, &c->intra), "MPI_Comm_split"));
    MOE_TRY(mpi_check(MPI_Comm_split(c->c, r % G, r, &c->inter), "MPI_Comm_split"));
    c->node = G;
    return MOE_OK;
#else
    (void)c, (void)node_size, (void)P;
    return MOE_OK;
#endif
}

int moe_comm_two_stage(const moe_comm *c) {
#ifdef MOE_HAVE_MPI
    return c ? c->node : 0;
#else
    (void)c;
    return 0;
#endif
}

moe_status moe_comm_allgather(moe_comm *c, const void *send, void *recv, size_t n) {
    if (moe_comm_size(c) == 1) {
        memmove(recv, send, n);
        return MOE_OK;
    }
#ifdef MOE_HAVE_MPI
    if (n > INT_MAX) return moe_set_error(MOE_ERR_INVALID, "all-gather of %zu bytes", n);
    return mpi_check(MPI_Allgather(send, (int)n, MPI_BYTE, recv, (int)n, MPI_BYTE, c->c),
                     "MPI_Allgather");
#else
    return MOE_OK;
#endif
}

moe_status moe_comm_bcast(moe_comm *c, void *buf, size_t n, int root) {
#ifdef MOE_HAVE_MPI
    if (!c || moe_comm_size(c) == 1 || n == 0) return MOE_OK;
    if (n > INT_MAX) return moe_set_error(MOE_ERR_INVALID, "broadcast of %zu bytes", n);
    return mpi_check(MPI_Bcast(buf, (int)n, MPI_BYTE, root, c->c), "MPI_Bcast");
#else
    (void)c, (void)buf, (void)n, (void)root;
    return MOE_OK;
#endif
}

moe_status moe_comm_barrier(moe_comm *c) {
#ifdef MOE_HAVE_MPI
    if (!c || moe_comm_size(c) == 1) return MOE_OK;
    return mpi_check(MPI_Barrier(c->c), "MPI_Barrier");
#else
    (void)c;
    return MOE_OK;
#endif
}

/* ------------------------------------------------------------------ grid */

/* The number of processes a launcher announced: mpirun (Open MPI, MPICH/Hydra) and Slurm's
 * PMI set OMPI_COMM_WORLD_SIZE or PMI_SIZE; PMIx only a rank (then 1). 0: not launched. */
static long launched_size(void) {
    const char *sizes[] = {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE"};
    const char *ranks[] = {"PMIX_RANK", "PMI_RANK"};
    for (int i = 0; i < 2; i++) {
        const char *v = getenv(sizes[i]);
        long n = v ? strtol(v, NULL, 10) : 0;
        if (v) return n > 1 ? n : 1;
    }
    return getenv(ranks[0]) || getenv(ranks[1]) ? 1 : 0;
}

moe_status moe_dist_init(int *argc, char ***argv, moe_dist *d) {
    *d = g_dist;
    long launched = launched_size();
#ifdef MOE_HAVE_MPI
    if (!launched) return MOE_OK;
    int provided;
    MOE_TRY(mpi_check(MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided), "MPI_Init"));
    d->launched = 1;
    MPI_Comm_size(MPI_COMM_WORLD, &d->world_size);
    MPI_Comm_rank(MPI_COMM_WORLD, &d->world_rank);
    static struct moe_comm world, node;
    world.c = MPI_COMM_WORLD;
    d->world = &world;
    MOE_TRY(mpi_check(MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, d->world_rank,
                                          MPI_INFO_NULL, &node.c), "MPI_Comm_split_type"));
    d->node = &node;
    d->node_size = moe_comm_size(d->node);
    d->node_rank = moe_comm_rank(d->node);
#else
    (void)argc, (void)argv;
    /* Every process would be rank 0 of its own run, all writing the same files. */
    if (launched > 1)
        return moe_set_error(MOE_ERR_INVALID, "this moe was built without MPI, but a launcher "
                             "started it as one of %ld processes: rebuild it with MPI (Debian: "
                             "libopenmpi-dev) or run one process", launched);
#endif
    g_dist = *d;
    return MOE_OK;
}

moe_status moe_dist_grid(moe_dist *d, int ep) {
    if (ep < 1 || d->world_size % ep != 0)
        return moe_set_error(MOE_ERR_INVALID, "expert-model-parallel-size %d does not divide the "
                             "%d processes", ep, d->world_size);
    d->ep = ep;
    d->ep_rank = d->world_rank % ep;
    d->edp = d->world_size / ep;
    d->edp_rank = d->world_rank / ep;
#ifdef MOE_HAVE_MPI
    if (d->launched) {
        static struct moe_comm expert, expert_data;
        static int made;
        if (made) {
            MOE_TRY(moe_comm_set_two_stage(&expert, 1));
            MPI_Comm_free(&expert.c);
            MPI_Comm_free(&expert_data.c);
        }
        MOE_TRY(mpi_check(MPI_Comm_split(MPI_COMM_WORLD, d->edp_rank, d->ep_rank, &expert.c),
                          "MPI_Comm_split"));
        MOE_TRY(mpi_check(MPI_Comm_split(MPI_COMM_WORLD, d->ep_rank, d->edp_rank, &expert_data.c),
                          "MPI_Comm_split"));
        made = 1;
        d->expert = &expert;
        d->expert_data = &expert_data;
    }
#endif
    g_dist = *d;
    return MOE_OK;
}

int moe_dist_any(moe_dist *d, int failed) {
    int64_t v = failed != 0;
    if (moe_comm_max_i64(d->world, &v, 1) != MOE_OK) return 1;
    return v != 0;
}

moe_status moe_dist_check_same(moe_dist *d, const void *bytes, size_t n, const char *what) {
    if (d->world_size == 1) return MOE_OK;
    uint64_t h = 1469598103934665603ull; /* FNV-1a */
    for (size_t i = 0; i < n; i++) h = (h ^ ((const unsigned char *)bytes)[i]) * 1099511628211ull;
    uint64_t *all = malloc(sizeof(uint64_t) * (size_t)d->world_size);
    if (!all) return moe_set_error(MOE_ERR_NOMEM, "out of memory");
    moe_status st = moe_comm_allgather(d->world, &h, all, sizeof h);
    int bad = -1;
    for (int r = 0; st == MOE_OK && r < d->world_size && bad < 0; r++)
        if (all[r] != all[0]) bad = r;
    free(all);
    MOE_TRY(st);
    if (bad >= 0)
        return moe_set_error(MOE_ERR_INVALID, "rank %d has a different %s than rank 0 (every "
                             "rank must run the same build with the same options)", bad, what);
    return MOE_OK;
}

void moe_dist_finalize(moe_dist *d) {
#ifdef MOE_HAVE_MPI
    if (d->expert) moe_comm_set_two_stage(d->expert, 1);
    if (d->launched) MPI_Finalize();
#endif
    d->launched = 0;
}

_Noreturn void moe_dist_abort(moe_dist *d, int code) {
    fflush(stdout);
    fflush(stderr);
#ifdef MOE_HAVE_MPI
    if (d->launched && d->world_size > 1) MPI_Abort(MPI_COMM_WORLD, code);
#else
    (void)d;
#endif
    exit(code);
}
