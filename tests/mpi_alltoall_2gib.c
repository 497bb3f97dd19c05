/* Expert parallelism beyond MPI's int counts: two ranks each send the other 2^31 + 2^28 bytes
 * (rows of 4096 bytes) through moe_comm_alltoallv, and check a sample of what arrives. It needs
 * about 10 GB of memory, so it is built only with -DMOE_LARGE_TESTS=ON. */
#include "core/core.h"
#include "dist/comm.h"

#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv) {
    moe_dist d;
    if (moe_dist_init(&argc, &argv, &d) != MOE_OK || moe_dist_grid(&d, 2) != MOE_OK) {
        fprintf(stderr, "mpi_alltoall_2gib: %s (run it under mpirun -np 2)\n", moe_last_error());
        return 1;
    }
    int me = d.world_rank, peer = !me;
    int64_t n = ((int64_t)1 << 31) + ((int64_t)1 << 28), row = 4096;
    unsigned char *send = malloc((size_t)(n + row)), *recv = malloc((size_t)(n + row));
    if (!send || !recv) moe_dist_abort(&d, 1);
    for (int64_t i = 0; i < n + row; i++) send[i] = (unsigned char)(i * 7 + me * 13);
    /* rank 0's buffers: its own row first, then the peer's bytes; rank 1's the other way */
    int64_t count[2], displ[2];
    count[me] = row, count[peer] = n;
    displ[0] = 0, displ[1] = count[0];
    if (moe_comm_alltoallv(d.expert, send, count, displ, recv, count, displ) != MOE_OK) {
        fprintf(stderr, "rank %d: %s\n", me, moe_last_error());
        moe_dist_abort(&d, 1);
    }
    int64_t from = me ? row : 0; /* where the peer's bytes for me start in its send buffer */
    int bad = 0;
    for (int64_t i = 0; i < n; i += 9973)
        bad += recv[displ[peer] + i] != (unsigned char)((from + i) * 7 + peer * 13);
    printf("rank %d: received %lld bytes from rank %d, %d bad samples\n", me, (long long)n, peer,
           bad);
    free(send);
    free(recv);
    moe_dist_finalize(&d);
    return bad != 0;
}
