/* dist/ — processes: the rank grid of expert and data parallelism, and the collectives the
 * layer, the model and the trainer use. Built on MPI when CMake finds it (MOE_HAVE_MPI); a
 * build without MPI, or a process not launched by mpirun, is one rank and every collective
 * is a copy. DESIGN.md §dist, README "Expert parallelism". */
#ifndef MOE_DIST_COMM_H
#define MOE_DIST_COMM_H

#include "moe.h"

#include <stddef.h>
#include <stdint.h>

typedef struct moe_comm moe_comm; /* a group of ranks (an MPI communicator) */

int moe_comm_size(const moe_comm *c); /* 1 for NULL */
int moe_comm_rank(const moe_comm *c); /* 0 for NULL */

/* In-place sums / maxima over the group. */
moe_status moe_comm_sum_f32(moe_comm *c, float *buf, size_t n);
moe_status moe_comm_sum_f64(moe_comm *c, double *buf, size_t n);
moe_status moe_comm_sum_i64(moe_comm *c, int64_t *buf, size_t n);
moe_status moe_comm_max_i64(moe_comm *c, int64_t *buf, size_t n);
/* Non-blocking in-place float sum; moe_comm_wait completes it (NULL request: nothing). */
typedef struct moe_comm_req moe_comm_req;
moe_status moe_comm_isum_f32(moe_comm *c, float *buf, size_t n, moe_comm_req **req);
moe_status moe_comm_wait(moe_comm_req *req);
/* Lets MPI move a request along (MPI_Test) while the caller computes. */
void moe_comm_progress(moe_comm_req *req);
/* Every rank sends n int64 to each rank: send [size, n] -> recv [size, n]. */
moe_status moe_comm_alltoall_i64(moe_comm *c, const int64_t *send, int64_t *recv, int n);
/* Bytes: send block q (scount[q] bytes at sdispl[q]) to rank q; receive from q into rdispl[q]. */
moe_status moe_comm_alltoallv(moe_comm *c, const void *send, const int64_t *scount,
                              const int64_t *sdispl, void *recv, const int64_t *rcount,
                              const int64_t *rdispl);
/* Makes moe_comm_alltoallv run in two stages (Tutel's 2DH, DeepSpeed-MoE's hierarchical
 * all-to-all): inside each machine, then between machines, so that the slow links carry few
 * large messages. The group's ranks form machines of node_size consecutive ranks; 0 takes the
 * machines from MPI (MPI_COMM_TYPE_SHARED), and is refused unless they are alike. 1 or the
 * group size leave one stage. Collective over the group. */
moe_status moe_comm_set_two_stage(moe_comm *c, int node_size);
int moe_comm_two_stage(const moe_comm *c); /* ranks per machine in two-stage mode, else 0 */
/* Gathers n bytes of every rank, in rank order: recv [size * n]. */
moe_status moe_comm_allgather(moe_comm *c, const void *send, void *recv, size_t n);
moe_status moe_comm_bcast(moe_comm *c, void *buf, size_t n, int root);
moe_status moe_comm_barrier(moe_comm *c);

/* The rank grid. The world's ranks form groups of `ep` consecutive ranks (expert-parallel
 * groups: together they hold every expert, rank i of a group the experts
 * [i E/ep, (i+1) E/ep)); ranks with the same place in their groups form the expert-data-parallel
 * groups (replicas of the same experts). Dense parameters are replicated on every rank. */
typedef struct {
    int launched;       /* started by mpirun (MPI initialised) */
    int world_size, world_rank;
    int ep, ep_rank;    /* expert-parallel group size and this rank's place in it */
    int edp, edp_rank;  /* expert-data-parallel group size and place */
    moe_comm *world, *expert, *expert_data;
    int node_size, node_rank; /* ranks on this machine (MPI_COMM_TYPE_SHARED) */
    moe_comm *node;
} moe_dist;

/* Initialises MPI when the process was launched by mpirun (else one rank). */
moe_status moe_dist_init(int *argc, char ***argv, moe_dist *d);
/* Builds the groups for expert-parallel size ep (must divide the world size). */
moe_status moe_dist_grid(moe_dist *d, int ep);
/* Every rank must pass the same bytes (a config, a build id): else an error on every rank
 * naming the first rank that differs. */
moe_status moe_dist_check_same(moe_dist *d, const void *bytes, size_t n, const char *what);
/* An error on one rank: true on every rank if any rank passes failed != 0 (so that all ranks
 * stop together instead of waiting for each other). */
int moe_dist_any(moe_dist *d, int failed);
void moe_dist_finalize(moe_dist *d);
/* Stops every rank (MPI_Abort) with the exit code; plain exit with one rank. */
_Noreturn void moe_dist_abort(moe_dist *d, int code);
/* The process's dist (set by moe_dist_init; NULL-safe defaults before). */
moe_dist *moe_dist_get(void);

#endif
