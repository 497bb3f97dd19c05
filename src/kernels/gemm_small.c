/* Single-threaded fp32 GEMMs for the expert blocks: AVX-512 register tiles that read both
 * operands where they are, so that an expert's weights stream from memory exactly once per
 * product (a BLAS packs them first: at 32 rows per expert the packing pass costs as much as the
 * multiply, bench/RESULTS.md, Scaling).
 *
 * One micro-kernel serves the three layouts the experts need. A tile is MR rows of a
 * "broadcast" operand (element (i, k) anywhere in memory: a[i * sai + k * sak]) times NV
 * 16-float vectors of a "vector" operand (row k contiguous: b + k * ldb), accumulated over k in
 * MR x NV registers:
 *   NN  C = A B        broadcast A (sai = lda, sak = 1), vectors of B's rows;
 *   TN  C = A^T B      broadcast A's columns, vectors of B's rows, both first copied to a
 *                      thread's scratch (gemm_tn), a row tile's panels in one call (tn_row8);
 *   NT  C = A B^T      computed as C^T = B A^T: broadcast B's rows (the weights), vectors of A^T,
 *                      which is transposed into a thread's scratch 64 rows and KC columns at a
 *                      time; the tiles of 48 weight rows are staged and written to C transposed
 *                      (flush_panel); with k even, blocks of up to 56 rows go as vectors of 8
 *                      rows by pairs of k instead (tile_body_paired), padded to 8 rows, not 16.
 * The attention's tiles (moe_gemm_cached) use the same tiles on operands already in cache, with
 * no prefetch, over the part of a causal product that is not zero.
 * NT with at most MOE_GEMM_DOT_ROWS rows of A (a decoding step) is dot products along k instead
 * (dot_body), in fp32 or with bf16 operands (moe_gemm_dot, also over the threads), and in fp32
 * on CPUs with AVX2 but no AVX-512 (dot_body_avx2). */
#include "kernels/kernels.h"

#include "core/core.h"
#include "kernels/avx512.h"

#include <omp.h>
#include <string.h>

#ifdef MOE_X86
#define SMALL_TARGET AVX512_TARGET
#define KC 1024    /* columns of A^T per scratch block (NT) */
#define NT_ROWS 64 /* rows of A per scratch block (NT): at most 4 vectors */

typedef struct {
    const float *a, *b;
    long sai, sak, ldb;
    int k;
    __mmask16 mask[4]; /* valid lanes of each vector of the vector operand */
    /* software prefetch at step k < pf_k: pf_lines lines from pf + (k % pf_mod) pf_si + k pf_sk
     * (bytes) */
    const char *pf;
    long pf_si, pf_sk;
    int pf_k, pf_mod, pf_lines;
    /* then at steps pf_k <= k < pf_k2, from pf_jump bytes further on */
    long pf_jump;
    int pf_k2;
    /* the tile's place in C (row i at c + i ldc), added to when c_acc is set; NULL: the
     * accumulators go to out[i NV + v] instead */
    float *c;
    long ldc;
    int c_acc;
} tile_args;

/* Software prefetch of step k (see tile_args). */
static inline __attribute__((always_inline)) void prefetch_step(const tile_args *t,
                                                                const char **pf, int *pm, int k) {
    if (k == t->pf_k) *pf += t->pf_jump;
    if (k < t->pf_k2) {
        for (int l = 0; l < t->pf_lines; l++)
            _mm_prefetch(*pf + *pm * t->pf_si + 64 * l, _MM_HINT_T0);
        if (++*pm == t->pf_mod) *pm = 0;
    }
    *pf += t->pf_sk;
}

/* acc[i][v] = sum_k a(i, k) * b[k][16 v ...] (plus C's tile when c_acc), stored into C's tile or
 * to out[i * NV + v]. Inlined into one function per (NV, MR) so that the loops unroll and the
 * accumulators live in registers. */
static inline __attribute__((always_inline)) SMALL_TARGET void
tile_body(const tile_args *t, __m512 *out, const int NV, const int MR) {
    __m512 acc[16][4];
    MOE_UNROLL(16)
    for (int i = 0; i < MR; i++)
        MOE_UNROLL(4)
        for (int v = 0; v < NV; v++)
            acc[i][v] = t->c && t->c_acc
                            ? _mm512_maskz_loadu_ps(t->mask[v], t->c + i * t->ldc + 16 * v)
                            : _mm512_setzero_ps();
    /* row i at base[i / 3] + (i % 3) sai: a base per three rows and the stride in registers,
     * addressed as base + stride * {0, 1, 2} (a pointer per row spills) */
    const long sai = t->sai, sak = t->sak, ldb = t->ldb;
    const float *b = t->b, *base[6];
    MOE_UNROLL(6)
    for (int q = 0; q < 6; q++) base[q] = t->a + 3 * q * sai;
    const char *pf = t->pf;
    int pm = 0;
    for (int k = 0; k < t->k; k++, b += ldb) {
        prefetch_step(t, &pf, &pm, k);
        __m512 bv[4];
        MOE_UNROLL(4)
        for (int v = 0; v < NV; v++) bv[v] = _mm512_maskz_loadu_ps(t->mask[v], b + 16 * v);
        MOE_UNROLL(16)
        for (int i = 0; i < MR; i++) {
            __m512 ai = _mm512_set1_ps(base[i / 3][(i % 3) * sai]);
            MOE_UNROLL(4)
            for (int v = 0; v < NV; v++) acc[i][v] = _mm512_fmadd_ps(ai, bv[v], acc[i][v]);
        }
        MOE_UNROLL(6)
        for (int q = 0; q < 6; q++) base[q] += sak;
    }
    if (t->c) {
        MOE_UNROLL(16)
        for (int i = 0; i < MR; i++)
            MOE_UNROLL(4)
            for (int v = 0; v < NV; v++)
                _mm512_mask_storeu_ps(t->c + i * t->ldc + 16 * v, t->mask[v], acc[i][v]);
        return;
    }
    MOE_UNROLL(16)
    for (int i = 0; i < MR; i++)
        MOE_UNROLL(4)
        for (int v = 0; v < NV; v++) out[i * NV + v] = acc[i][v];
}

typedef void (*tile_fn)(const tile_args *, __m512 *);
#define TILE(NV, MR)                                                                             \
    static SMALL_TARGET void tile_##NV##_##MR(const tile_args *t, __m512 *out) {                 \
        tile_body(t, out, NV, MR);                                                               \
    }
#define TILES8(NV) TILE(NV, 1) TILE(NV, 2) TILE(NV, 3) TILE(NV, 4) TILE(NV, 5) TILE(NV, 6) \
    TILE(NV, 7) TILE(NV, 8)
TILES8(1)
TILES8(2)
TILES8(3)
TILES8(4)
TILE(1, 9) TILE(1, 10) TILE(1, 11) TILE(1, 12) TILE(1, 13) TILE(1, 14) TILE(1, 15) TILE(1, 16)
TILE(2, 9) TILE(2, 10) TILE(2, 11) TILE(2, 12)

/* Rows per tile for NV vectors: about 24 accumulators, the rest of the 32 registers for the
 * vectors and the broadcast. */
static const int mr_max[5] = {0, 16, 12, 8, 6};
#define ROW8(NV) tile_##NV##_1, tile_##NV##_2, tile_##NV##_3, tile_##NV##_4, tile_##NV##_5, \
    tile_##NV##_6, tile_##NV##_7, tile_##NV##_8
static const tile_fn tiles[5][17] = {
    {0},
    {0, ROW8(1), tile_1_9, tile_1_10, tile_1_11, tile_1_12, tile_1_13, tile_1_14, tile_1_15,
     tile_1_16},
    {0, ROW8(2), tile_2_9, tile_2_10, tile_2_11, tile_2_12},
    {0, ROW8(3)},
    {0, ROW8(4)},
};

/* NT with k even: every vector of the vector operand holds eight rows of A at two consecutive
 * k (lane 2r + p: row r at k + p; pair_transpose), against the broadcast pair (k, k + 1) of a
 * weight row as one 64-bit element, NP such vectors (8 NP rows) by MR weight rows. A block of
 * rows is then padded to 8 rather than to 16 (an expert's 32 +- 6 rows at E = 256 wasted up to
 * 15 lanes of a vector), and each weight row's pair is one broadcast for all NP vectors. The
 * pair lanes are added at the end: out[i NO + j] (NO = (NP + 1) / 2) holds rows 16 j ... 16 j
 * + 15 of weight row i, from paired vectors 2 j and 2 j + 1 (zero past NP). k even; every row
 * of A sums its even and odd k apart, wherever it is in its block. */
static inline __attribute__((always_inline)) SMALL_TARGET void
tile_body_paired(const tile_args *t, __m512 *out, const int NP, const int MR) {
    __m512 acc[16][7];
    MOE_UNROLL(16)
    for (int i = 0; i < MR; i++)
        MOE_UNROLL(7)
        for (int v = 0; v < NP; v++) acc[i][v] = _mm512_setzero_ps();
    const long sai = t->sai, ldb = t->ldb;
    const float *b = t->b, *base[6];
    MOE_UNROLL(6)
    for (int q = 0; q < 6; q++) base[q] = t->a + 3 * q * sai;
    const char *pf = t->pf;
    int pm = 0;
    for (int k = 0; k < t->k; k += 2, b += ldb) {
        prefetch_step(t, &pf, &pm, k);
        if (MR > 8) prefetch_step(t, &pf, &pm, k + 1);
        else pf += t->pf_sk; /* a row every MR <= 8 pairs: each of its lines still */
        __m512 xv[7];
        MOE_UNROLL(7)
        for (int v = 0; v < NP; v++) {
            xv[v] = _mm512_load_ps(b + 16 * v);
            __asm__("" : "+v"(xv[v])); /* in a register: gcc folds it into each FMA otherwise */
        }
        MOE_UNROLL(16)
        for (int i = 0; i < MR; i++) {
            double pair; /* the two floats' bits, moved and never computed on */
            memcpy(&pair, base[i / 3] + (i % 3) * sai, sizeof pair);
            __m512 w2 = _mm512_castpd_ps(_mm512_set1_pd(pair));
            MOE_UNROLL(7)
            for (int v = 0; v < NP; v++) acc[i][v] = _mm512_fmadd_ps(w2, xv[v], acc[i][v]);
        }
        MOE_UNROLL(6)
        for (int q = 0; q < 6; q++) base[q] += 2;
    }
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28,
                                           30);
    const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29,
                                          31);
    const int NO = (NP + 1) / 2;
    MOE_UNROLL(16)
    for (int i = 0; i < MR; i++)
        MOE_UNROLL(4)
        for (int j = 0; j < NO; j++) {
            __m512 lo = acc[i][2 * j];
            __m512 hi = 2 * j + 1 < NP ? acc[i][2 * j + 1] : _mm512_setzero_ps();
            out[i * NO + j] = _mm512_add_ps(_mm512_permutex2var_ps(lo, even, hi),
                                            _mm512_permutex2var_ps(lo, odd, hi));
        }
}

#define TILEP(NP, MR)                                                                            \
    static SMALL_TARGET void tilep_##NP##_##MR(const tile_args *t, __m512 *out) {                \
        tile_body_paired(t, out, NP, MR);                                                        \
    }
#define TILESP3(NP) TILEP(NP, 1) TILEP(NP, 2) TILEP(NP, 3)
#define TILESP4(NP) TILESP3(NP) TILEP(NP, 4)
TILESP4(1)
TILESP4(2)
TILESP4(3)
TILESP4(4)
TILESP4(5)
TILESP4(6)
TILESP3(7)
TILEP(1, 5) TILEP(1, 6) TILEP(1, 7) TILEP(1, 8) TILEP(1, 9) TILEP(1, 10) TILEP(1, 11)
TILEP(1, 12) TILEP(1, 13) TILEP(1, 14) TILEP(1, 15) TILEP(1, 16)
TILEP(2, 5) TILEP(2, 6) TILEP(2, 7) TILEP(2, 8) TILEP(2, 9) TILEP(2, 10) TILEP(2, 11) TILEP(2, 12)
TILEP(3, 5) TILEP(3, 6) TILEP(3, 7) TILEP(3, 8)
TILEP(4, 5) TILEP(4, 6) TILEP(5, 5)
/* Weight rows per paired tile by paired vectors NP: the NP MR accumulators, the NP vectors of a
 * pair of k and the broadcast within the 32 vector registers. */
static const int mr_paired[8] = {0, 16, 12, 8, 6, 5, 4, 3};
#define ROWP3(NP) tilep_##NP##_1, tilep_##NP##_2, tilep_##NP##_3
#define ROWP4(NP) ROWP3(NP), tilep_##NP##_4
static const tile_fn tiles_paired[8][17] = {
    {0},
    {0, ROWP4(1), tilep_1_5, tilep_1_6, tilep_1_7, tilep_1_8, tilep_1_9, tilep_1_10, tilep_1_11,
     tilep_1_12, tilep_1_13, tilep_1_14, tilep_1_15, tilep_1_16},
    {0, ROWP4(2), tilep_2_5, tilep_2_6, tilep_2_7, tilep_2_8, tilep_2_9, tilep_2_10, tilep_2_11,
     tilep_2_12},
    {0, ROWP4(3), tilep_3_5, tilep_3_6, tilep_3_7, tilep_3_8},
    {0, ROWP4(4), tilep_4_5, tilep_4_6},
    {0, ROWP4(5), tilep_5_5},
    {0, ROWP4(6)},
    {0, ROWP3(7)},
};

/* Where a tile goes: C[i][n] (or C[n][i] when transposed), added to C when acc is set. */
typedef struct {
    float *c;
    long ldc;
    int trans, acc;
} tile_dst;

/* Eight 16-float rows r[0..8) transposed: column l (the eight r[i][l]) is in p[l % 4] (l < 8)
 * or q[l % 4] (l >= 8), in the low half when l % 8 < 4, else in the high half; column8 takes
 * it out. */
typedef struct {
    __m512 p[4], q[4]; /* p[j]: columns j, j + 4; q[j]: columns j + 8, j + 12 */
} cols8x16;

static inline __attribute__((always_inline)) SMALL_TARGET void transpose8x16(const __m512 *r,
                                                                             cols8x16 *c) {
    __m512 t[8], u[8];
    for (int i = 0; i < 4; i++) { /* t[2i], t[2i+1]: rows 2i, 2i+1 interleaved */
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int h = 0; h < 2; h++) { /* u[4h + j]: rows 4h..4h+3 of column 4 lane + j */
        const __m512 *th = t + 4 * h;
        u[4 * h + 0] = _mm512_shuffle_ps(th[0], th[2], 0x44);
        u[4 * h + 1] = _mm512_shuffle_ps(th[0], th[2], 0xEE);
        u[4 * h + 2] = _mm512_shuffle_ps(th[1], th[3], 0x44);
        u[4 * h + 3] = _mm512_shuffle_ps(th[1], th[3], 0xEE);
    }
    const __m512i lo = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
    const __m512i hi = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30,
                                         31);
    for (int j = 0; j < 4; j++) {
        c->p[j] = _mm512_permutex2var_ps(u[j], lo, u[j + 4]);
        c->q[j] = _mm512_permutex2var_ps(u[j], hi, u[j + 4]);
    }
}

/* Column l of a transpose8x16 in the low eight lanes. */
static inline __attribute__((always_inline)) SMALL_TARGET __m512 column8(const cols8x16 *c,
                                                                          int l) {
    __m512 x = l < 8 ? c->p[l & 3] : c->q[l & 3];
    return l & 4 ? _mm512_shuffle_f32x4(x, x, 0xEE) : x;
}

/* NT: a panel of NT_PANEL consecutive weight rows (columns of C) is staged as C^T, weight row
 * p at stage[p * NT_ROWS ...] with the x rows along it, then written to C by whole 16-float
 * runs of each row (C's rows are often 4 KB apart: stored tile by tile, a few floats per row,
 * every row's line fell into one L1 set and was fetched again by each tile). */
#define NT_PANEL 48

/* C[n0 + i][p0 + p] = (or +=) stage[p * NT_ROWS + i] for p < rows_p, i < n_x: 16 x 16 at a
 * time, transposed in registers. */
static SMALL_TARGET void flush_panel(const tile_dst *d, const float *stage, int p0, int rows_p,
                                     int n0, int n_x) {
    for (int i = 0; i < n_x; i += 16) {
        int lanes = n_x - i < 16 ? n_x - i : 16;
        for (int p = 0; p < rows_p; p += 16) {
            __mmask16 m = (__mmask16)(rows_p - p >= 16 ? 0xFFFFu : (1u << (rows_p - p)) - 1u);
            cols8x16 lo, hi;
            __m512 r[8];
            for (int h = 0; h < 2; h++) {
                for (int q = 0; q < 8; q++)
                    r[q] = _mm512_load_ps(stage + (p + 8 * h + q) * NT_ROWS + i);
                transpose8x16(r, h ? &hi : &lo);
            }
            for (int l = 0; l < lanes; l++) {
                __m512 x = _mm512_shuffle_f32x4(column8(&lo, l), column8(&hi, l), 0x44);
                float *c = d->c + (long)(n0 + i + l) * d->ldc + p0 + p;
                if (d->acc) x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(m, c));
                _mm512_mask_storeu_ps(c, m, x);
            }
        }
    }
}

/* Which operand streams from memory (the expert's weights); the loop order and the
 * prefetches follow from it. TN has its own loop (gemm_tn). */
enum { STREAM_VEC, STREAM_BCAST };
#define PF_FLOATS 128 /* floats of each broadcast row ahead (STREAM_BCAST) */
#define KB 64         /* rows of the vector operand per block (STREAM_VEC) */

typedef struct {
    int M, N, K, nv_max, stream;
    const float *a, *b;
    long sai, sak, ldb;
    const tile_dst *d;
    int paired;   /* NT: the vector operand holds pairs of k (tile_body_paired), nv_max vectors */
    float *stage; /* NT: NT_PANEL x NT_ROWS floats (flush_panel) */
} tile_job;

/* The valid lanes of a tile's nv vectors with `left` columns from its first. */
static void set_masks(tile_args *t, int nv, int left) {
    for (int v = 0; v < nv; v++) {
        int lanes = left - 16 * v >= 16 ? 16 : left - 16 * v;
        t->mask[v] = (__mmask16)((1u << lanes) - 1u);
    }
}

static int vectors_at(const tile_job *j, int n0) {
    int left = j->N - n0;
    return (left + 15) / 16 < j->nv_max ? (left + 15) / 16 : j->nv_max;
}

/* One tile: rows [i0, i0 + mr) x vectors from n0, over k in [k0, k0 + kn). */
static SMALL_TARGET void one_tile(const tile_job *j, int i0, int mr, int n0, int k0, int kn) {
    __m512 out[64];
    int left = j->N - n0, nv = j->paired ? j->nv_max : vectors_at(j, n0);
    tile_args t = {.a = j->a + i0 * j->sai + k0 * j->sak, .b = j->b + k0 * j->ldb + n0,
                   .sai = j->sai, .sak = j->sak, .ldb = j->ldb, .k = kn, .pf_k = kn, .pf_mod = 1};
    if (!j->paired) set_masks(&t, nv, left); /* paired vectors are whole (zero past the rows) */
    const tile_dst *d = j->d;
    if (j->stream == STREAM_VEC) {
        /* the next block of rows of B, in order, shared out over this block's tiles (tile q of
         * nq takes the q-th part) so that memory is read as one steady sequential stream */
        int cap = mr_max[nv], nt = (j->M + cap - 1) / cap, step = 16 * j->nv_max;
        int nq = (j->N + step - 1) / step * nt, q = n0 / step * nt + i0 / cap;
        int rows = j->K - k0 - kn < KB ? j->K - k0 - kn : KB;
        long lines = ((long)rows * j->ldb * 4 + 63) / 64, per = (lines + nq - 1) / nq;
        t.pf = (const char *)(j->b + (k0 + kn) * j->ldb) + 64 * per * q;
        t.pf_lines = (int)((per + kn - 1) / kn);
        t.pf_sk = 64 * t.pf_lines;
        long left_lines = lines - per * q < per ? lines - per * q : per;
        t.pf_k = left_lines > 0 ? (int)((left_lines + t.pf_lines - 1) / t.pf_lines) : 0;
    } else { /* STREAM_BCAST: further along each row */
        t.pf = (const char *)(t.a + PF_FLOATS);
        t.pf_mod = mr, t.pf_si = 4 * j->sai, t.pf_sk = 4, t.pf_lines = 1;
        /* a tile spans all of k here; none past the rows' ends, then the next tile's rows
         * from their starts */
        t.pf_k = kn > PF_FLOATS ? kn - PF_FLOATS : 0;
        if (i0 + mr < j->M) t.pf_jump = 4 * ((long)mr * j->sai - PF_FLOATS - t.pf_k), t.pf_k2 = kn;
    }
    if (t.pf_k2 < t.pf_k) t.pf_k2 = t.pf_k;
    if (!d->trans) t.c = d->c + i0 * d->ldc + n0, t.ldc = d->ldc, t.c_acc = d->acc || k0 > 0;
    if (j->paired) tiles_paired[nv][mr](&t, out), nv = (nv + 1) / 2; /* 16 rows an output */
    else tiles[nv][mr](&t, out);
    if (d->trans) /* into its panel's stage (panels start at multiples of NT_PANEL) */
        for (int i = 0; i < mr; i++)
            for (int v = 0; v < nv; v++)
                _mm512_store_ps(j->stage + (i0 % NT_PANEL + i) * NT_ROWS + 16 * v, out[i * nv + v]);
}

/* NN: C = (or +=) the product of rows [0, M) of A and columns [0, N) of B over K, in tiles
 * of at most nv_max vectors and mr_max[nv] rows, k in blocks of KB rows of B, each block's
 * panels used by every row tile while in L1. */
static SMALL_TARGET void run_tiles(const tile_job *j) {
    int step = 16 * j->nv_max;
    for (int k0 = 0; k0 < j->K; k0 += KB) {
        int kn = j->K - k0 < KB ? j->K - k0 : KB;
        for (int n0 = 0; n0 < j->N; n0 += step)
            for (int i0 = 0, cap = mr_max[vectors_at(j, n0)]; i0 < j->M; i0 += cap)
                one_tile(j, i0, j->M - i0 < cap ? j->M - i0 : cap, n0, k0, kn);
    }
}

/* NT: the tiles of weight rows [p0, end) (at most NT_PANEL) against one block of rows of A
 * (all its vectors, all of k), staged and written to C (flush_panel). */
static SMALL_TARGET void nt_panel(const tile_job *j, int p0, int end) {
    int cap = j->paired ? mr_paired[j->nv_max] : mr_max[j->nv_max];
    for (int i0 = p0; i0 < end; i0 += cap)
        one_tile(j, i0, end - i0 < cap ? end - i0 : cap, 0, 0, j->K);
    flush_panel(j->d, j->stage, p0, end - p0, 0, j->N);
}

/* xt[kk * w + r] = A[r][kk] for r < mc and kk < kc, 0 for mc <= r < w (mc rounded up to
 * vectors): 8 rows x 16 columns at a time, transposed in registers. */
static SMALL_TARGET void transpose_rows(const float *A, int lda, int mc, int kc, int w, float *xt) {
    for (int kk = 0; kk < kc; kk += 16) {
        int lanes = kc - kk < 16 ? kc - kk : 16;
        __mmask16 mask = (__mmask16)((1u << lanes) - 1u);
        for (int r0 = 0; r0 < w; r0 += 8) {
            __m512 r[8];
            for (int i = 0; i < 8; i++)
                r[i] = r0 + i < mc ? _mm512_maskz_loadu_ps(mask, A + (long)(r0 + i) * lda + kk)
                                   : _mm512_setzero_ps();
            cols8x16 c;
            transpose8x16(r, &c);
            for (int l = 0; l < lanes; l++)
                _mm512_mask_storeu_ps(xt + (long)(kk + l) * w + r0, 0xFF, column8(&c, l));
        }
    }
}

/* xp[(kk / 2) w + 16 g + 2 r + p] = A[8 g + r][kk + p] for even kk < kc (kc even) and rows 8 g
 * + r < mc, 0 for the rows past mc up to w / 2 (tile_body_paired): eight rows by eight pairs
 * of k at a time, transposed in registers as 64-bit elements. */
static SMALL_TARGET void pair_transpose(const float *A, int lda, int mc, int kc, int w, float *xp) {
    const __m512i lo = _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11);
    const __m512i hi = _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15);
    for (int kk = 0; kk < kc; kk += 16) {
        int lanes = kc - kk < 16 ? kc - kk : 16;
        __mmask16 mask = (__mmask16)((1u << lanes) - 1u);
        for (int r0 = 0; 2 * r0 < w; r0 += 8) {
            __m512d r[8], t[8], v[8];
            for (int i = 0; i < 8; i++)
                r[i] = _mm512_castps_pd(r0 + i < mc ? _mm512_maskz_loadu_ps(
                                                          mask, A + (long)(r0 + i) * lda + kk)
                                                    : _mm512_setzero_ps());
            for (int i = 0; i < 4; i++) { /* 128-bit lane l: rows 2i, 2i + 1 at pair 2l (+1) */
                t[2 * i] = _mm512_unpacklo_pd(r[2 * i], r[2 * i + 1]);
                t[2 * i + 1] = _mm512_unpackhi_pd(r[2 * i], r[2 * i + 1]);
            }
            /* v[4h + 2e]: rows 4h .. 4h + 3 at pairs e, 2 + e; v[4h + 2e + 1]: at 4 + e, 6 + e */
            for (int h = 0; h < 2; h++)
                for (int e = 0; e < 2; e++) {
                    v[4 * h + 2 * e] = _mm512_permutex2var_pd(t[4 * h + e], lo, t[4 * h + 2 + e]);
                    v[4 * h + 2 * e + 1] =
                        _mm512_permutex2var_pd(t[4 * h + e], hi, t[4 * h + 2 + e]);
                }
            for (int q = 0; 2 * q < lanes; q++) { /* pair q: rows 0-3 in v[b], 4-7 in v[b + 4] */
                int b = 2 * (q & 1) + (q >> 2);
                __m512d x = q & 2 ? _mm512_shuffle_f64x2(v[b], v[b + 4], 0xEE)
                                  : _mm512_shuffle_f64x2(v[b], v[b + 4], 0x44);
                _mm512_store_pd((double *)(xp + (long)(kk / 2 + q) * w + 2 * r0), x);
            }
        }
    }
}

/* Blocks of up to this many rows go in pairs of k (NT, k even); 57-64 rows in whole vectors:
 * 8 paired vectors leave registers for tiles of 3 weight rows, slower than 4 whole vectors by 6
 * (bench/RESULTS.md, session 40). */
#define NT_PAIRED_ROWS 56

/* A thread's transposed operands: gemm_nt's A^T (two blocks), gemm_cached's B^T */
static _Thread_local float xt[KC * NT_ROWS] __attribute__((aligned(64)));
static _Thread_local float xt2[KC * NT_ROWS] __attribute__((aligned(64)));

/* NT: rows [0, mc) of A (at a) and kc columns from there transposed into scratch (in pairs
 * of k when kc is even and mc at most NT_PAIRED_ROWS), as the job of their tiles. */
static SMALL_TARGET tile_job nt_block(const float *a, int lda, int mc, int kc, int n,
                                      const float *B, int ldb, float *scratch,
                                      const tile_dst *d, float *stage) {
    int paired = kc % 2 == 0 && mc <= NT_PAIRED_ROWS;
    int nv = paired ? (mc + 7) / 8 : (mc + 15) / 16, w = 16 * nv;
    if (paired) pair_transpose(a, lda, mc, kc, w, scratch);
    else transpose_rows(a, lda, mc, kc, w, scratch);
    return (tile_job){n, mc, kc, nv, STREAM_BCAST, B, scratch, ldb, 1, w, d, paired, stage};
}

/* moe_gemm_cached: tiles of up to 4 vectors of columns and mr_max rows, over all of k (or the
 * part of it tri leaves a tile: the range its rows need together), with no prefetch (the
 * operands are in cache); B^T first transposed 64 columns at a time. */
#define CACHED_KB 256 /* rows of B per block of k: the block stays in L2 for all row tiles */
static SMALL_TARGET void gemm_cached(int m, int n, int k, const float *A, long sai, long sak,
                                     const float *B, long ldb, int bt, int beta1, float *C,
                                     long ldc, moe_tri tri, int off) {
    for (int n0 = 0; n0 < n; n0 += 64) {
        int nc = n - n0 < 64 ? n - n0 : 64, nv = (nc + 15) / 16, cap = mr_max[nv];
        const float *b = B + n0;
        long lb = ldb;
        if (bt) {
            transpose_rows(B + n0 * ldb, (int)ldb, nc, k, 16 * nv, xt);
            b = xt, lb = 16 * nv;
        }
        for (int kb = 0; kb < k; kb += CACHED_KB)
            for (int i0 = 0; i0 < m; i0 += cap) {
                int mr = m - i0 < cap ? m - i0 : cap, last = i0 + mr - 1, tv = nv, k0 = 0, k1 = k;
                if (tri == MOE_TRI_COLS) { /* columns < last + off */
                    int hi = last + off < n ? last + off : n;
                    tv = hi - n0 <= 0 ? 0 : (hi - n0 + 15) / 16 < nv ? (hi - n0 + 15) / 16 : nv;
                }
                if (tri == MOE_TRI_K_BELOW) k1 = last + off < 0 ? 0 : last + off < k ? last + off : k;
                if (tri == MOE_TRI_K_FROM) k0 = i0 + off < 0 ? 0 : i0 + off < k ? i0 + off : k;
                /* this block's part of the tile's range of k; the first block writes the tile
                 * (zeros for an empty part, with beta 0), the others add */
                k0 = k0 > kb ? k0 : kb;
                k1 = k1 < kb + CACHED_KB ? k1 : kb + CACHED_KB;
                int acc = beta1 || kb > 0;
                if (!tv || (acc && k1 <= k0)) continue;
                tile_args t = {.a = A + i0 * sai + k0 * sak, .b = b + k0 * lb, .sai = sai,
                               .sak = sak, .ldb = lb, .k = k1 > k0 ? k1 - k0 : 0,
                               .c = C + i0 * ldc + n0, .ldc = ldc, .c_acc = acc,
                               .pf = (const char *)A};
                set_masks(&t, tv, nc);
                tiles[tv][mr](&t, NULL);
            }
    }
}

/* TN: C (+)= A^T B over the rows k of A (the gradient rows of an expert, m wide) and B (its
 * inputs, n wide); C (the weight gradient) streams from memory, in row tiles of 8 by panels of
 * 48 columns, each C line read and written once, in order, with the tile PF_TILES_C ahead
 * prefetched. Both small operands are first copied to the thread's scratch, TK rows of k and
 * TN_COLS columns of B at a time: B's panels as [k][48], a row tile's 8 columns of A as [k][8]
 * (read where they are, their rows a few KB apart fall into a few L1 sets). A row tile's whole
 * panels are one call (tn_row8), the rest the tiles above. With k past TK, C is read and
 * written again per block of k: the layer takes OpenBLAS there (bench/RESULTS.md, session
 * 22). */
#define TK 128
#define TN_COLS 1024
#define TN_MR 8 /* mr_max[3] */
#define TN_PANEL 48
#define PF_TILES_C 2 /* tiles ahead whose C is prefetched */
/* Where a TN block's C tile PF_TILES_C tiles after panel q of row tile i0 starts (the block:
 * cn columns from c0 in np panels to a row tile, then the next row tile), its rows (0: none,
 * NULL) and its lines per row. */
static const char *tn_ahead(float *C, long ldc, int m, int c0, int cn, int np, int i0, int q,
                            int *rows, int *lines) {
    int pq = q + PF_TILES_C, pi = i0;
    while (pq >= np) pq -= np, pi += TN_MR;
    int left = cn - pq * TN_PANEL;
    *rows = m - pi < TN_MR ? m - pi : TN_MR;
    *lines = left >= TN_PANEL ? 3 : (left + 15) / 16;
    if (*rows <= 0) return *rows = 0, NULL;
    return (const char *)(C + (long)pi * ldc + c0 + pq * TN_PANEL);
}

/* TN, row tile i0 of 8 whole rows over its panels [0, nfull) of 48 whole columns from c0:
 * C (+)= ap^T bp, ap [kk][8], panel q of bp at bp + 48 kn q as [kk][48]; the C tile
 * PF_TILES_C tiles ahead prefetched a row per step. */
static SMALL_TARGET void tn_row8(const float *ap, const float *bp, int kn, int nfull, int np,
                                 float *C, long ldc, int m, int c0, int cn, int i0, int acc) {
    float *c = C + (long)i0 * ldc + c0;
    for (int q = 0; q < nfull; q++, c += TN_PANEL) {
        __m512 r[TN_MR][3];
        MOE_UNROLL(8)
        for (int i = 0; i < TN_MR; i++)
            MOE_UNROLL(3)
            for (int v = 0; v < 3; v++)
                r[i][v] = acc ? _mm512_loadu_ps(c + i * ldc + 16 * v) : _mm512_setzero_ps();
        int pr, pl;
        const char *pf = tn_ahead(C, ldc, m, c0, cn, np, i0, q, &pr, &pl);
        const float *a = ap, *b = bp + (long)q * kn * TN_PANEL;
        for (int kk = 0; kk < kn; kk++, a += TN_MR, b += TN_PANEL) {
            if (kk < pr)
                for (int l = 0; l < pl; l++) _mm_prefetch(pf + 4 * kk * ldc + 64 * l, _MM_HINT_T0);
            __m512 b0 = _mm512_load_ps(b), b1 = _mm512_load_ps(b + 16),
                   b2 = _mm512_load_ps(b + 32);
            MOE_UNROLL(8)
            for (int i = 0; i < TN_MR; i++) {
                __m512 ai = _mm512_set1_ps(a[i]);
                r[i][0] = _mm512_fmadd_ps(ai, b0, r[i][0]);
                r[i][1] = _mm512_fmadd_ps(ai, b1, r[i][1]);
                r[i][2] = _mm512_fmadd_ps(ai, b2, r[i][2]);
            }
        }
        for (int row = kn; row < pr; row++) /* k shorter than the tile */
            for (int l = 0; l < pl; l++) _mm_prefetch(pf + 4 * row * ldc + 64 * l, _MM_HINT_T0);
        MOE_UNROLL(8)
        for (int i = 0; i < TN_MR; i++)
            MOE_UNROLL(3)
            for (int v = 0; v < 3; v++) _mm512_storeu_ps(c + i * ldc + 16 * v, r[i][v]);
    }
}

static SMALL_TARGET void gemm_tn(int m, int n, int k, const float *A, int lda, const float *B,
                                 int ldb, int beta1, float *C, int ldc) {
    /* whole panels: the last one of a block padded to 48 columns */
    static _Thread_local float bp[(TN_COLS + TN_PANEL - 1) / TN_PANEL * TN_PANEL * TK]
        __attribute__((aligned(64)));
    static _Thread_local float ap[TN_MR * TK] __attribute__((aligned(64)));
    for (int k0 = 0; k0 < k; k0 += TK) {
        int kn = k - k0 < TK ? k - k0 : TK;
        for (int c0 = 0; c0 < n; c0 += TN_COLS) {
            int cn = n - c0 < TN_COLS ? n - c0 : TN_COLS, np = (cn + TN_PANEL - 1) / TN_PANEL;
            for (int q = 0; q < np; q++) { /* panel q: [kk][48] */
                int w = cn - q * TN_PANEL < TN_PANEL ? cn - q * TN_PANEL : TN_PANEL;
                for (int kk = 0; kk < kn; kk++)
                    memcpy(bp + ((long)q * kn + kk) * TN_PANEL,
                           B + (long)(k0 + kk) * ldb + c0 + q * TN_PANEL, sizeof(float) * w);
            }
            for (int i0 = 0; i0 < m; i0 += TN_MR) {
                int mr = m - i0 < TN_MR ? m - i0 : TN_MR;
                __mmask16 am = (__mmask16)((1u << mr) - 1u);
                for (int kk = 0; kk < kn; kk++) { /* the row tile's 8 lanes, 0 past m */
                    const float *row = A + (long)(k0 + kk) * lda + i0;
                    _mm512_mask_storeu_ps(ap + kk * TN_MR, 0xFF, _mm512_maskz_loadu_ps(am, row));
                }
                int q = 0;
                if (mr == TN_MR) {
                    q = cn / TN_PANEL;
                    tn_row8(ap, bp, kn, q, np, C, ldc, m, c0, cn, i0, beta1 || k0 > 0);
                }
                for (; q < np; q++) {
                    /* the panel's columns within this block */
                    int n0 = c0 + q * TN_PANEL, left = c0 + cn - n0;
                    int nv = left >= TN_PANEL ? 3 : (left + 15) / 16;
                    tile_args t = {.a = ap, .b = bp + (long)q * kn * TN_PANEL, .sai = 1,
                                   .sak = TN_MR, .ldb = TN_PANEL, .k = kn, .pf_mod = 1,
                                   .c = C + (long)i0 * ldc + n0, .ldc = ldc,
                                   .c_acc = beta1 || k0 > 0};
                    set_masks(&t, nv, left);
                    int pr, pl; /* the C tile PF_TILES_C tiles ahead, a row per step */
                    t.pf = tn_ahead(C, ldc, m, c0, cn, np, i0, q, &pr, &pl);
                    if (pr)
                        t.pf_si = 4L * ldc, t.pf_mod = pr, t.pf_k = t.pf_k2 = pr, t.pf_lines = pl;
                    tiles[nv][mr](&t, NULL); /* into C (t.c): out unused */
                }
            }
        }
    }
}

/* NT with at most MOE_GEMM_DOT_ROWS rows of A (decoding: a token per call): every element of
 * C a dot product of a row of A and a weight row along k, a vector at a time (16 floats, or 32
 * bf16 pairs through vdpbf16ps), the lanes added at the end; R weight rows at once, each read
 * from memory once, in order, PF_DOT bytes ahead. With so few rows the tiles above would fill
 * 1-2 of 16 lanes, and a library packs the weights first, a pass as long as the multiply
 * (bench/RESULTS.md, decoding). */
#define PF_DOT 1024
#define BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512bf16")))
static inline __attribute__((always_inline)) BF16_TARGET void
dot_body(const void *A, int lda, const void *B, int ldb, int k, int beta1, float *C, int ldc,
         const int M, const int R, const int BF16) {
    const int step = BF16 ? 32 : 16, es = BF16 ? 2 : 4; /* elements per vector, bytes each */
    const char *a0 = A, *b0 = B;
    __m512 acc[MOE_GEMM_DOT_ROWS][8];
    MOE_UNROLL(4)
    for (int i = 0; i < M; i++)
        MOE_UNROLL(8)
        for (int r = 0; r < R; r++) acc[i][r] = _mm512_setzero_ps();
    for (int kk = 0; kk < k; kk += step) {
        int left = k - kk; /* the step's valid elements: all but in the last */
        __mmask32 m16 = left >= 32 ? ~0u : (1u << left) - 1u;
        __mmask16 m32 = (__mmask16)(left >= 16 ? 0xFFFFu : (1u << left) - 1u);
        __m512i bv[8];
        MOE_UNROLL(8)
        for (int r = 0; r < R; r++) {
            const char *row = b0 + ((long)r * ldb + kk) * es;
            _mm_prefetch(row + PF_DOT, _MM_HINT_T0);
            bv[r] = BF16 ? _mm512_maskz_loadu_epi16(m16, row) : _mm512_maskz_loadu_epi32(m32, row);
        }
        MOE_UNROLL(4)
        for (int i = 0; i < M; i++) {
            const char *row = a0 + ((long)i * lda + kk) * es;
            __m512i a = BF16 ? _mm512_maskz_loadu_epi16(m16, row)
                             : _mm512_maskz_loadu_epi32(m32, row);
            MOE_UNROLL(8)
            for (int r = 0; r < R; r++)
                acc[i][r] = BF16 ? _mm512_dpbf16_ps(acc[i][r], (__m512bh)a, (__m512bh)bv[r])
                                 : _mm512_fmadd_ps(_mm512_castsi512_ps(a),
                                                   _mm512_castsi512_ps(bv[r]), acc[i][r]);
        }
    }
    MOE_UNROLL(4)
    for (int i = 0; i < M; i++)
        MOE_UNROLL(8)
        for (int r = 0; r < R; r++) {
            float v = _mm512_reduce_add_ps(acc[i][r]);
            C[(long)i * ldc + r] = beta1 ? C[(long)i * ldc + r] + v : v;
        }
}

typedef void (*dot_fn)(const void *, int, const void *, int, int, int, float *, int);
#define DOT(M, R, BF16)                                                                          \
    static BF16_TARGET void dot_##M##_##R##_##BF16(const void *A, int lda, const void *B,       \
                                                   int ldb, int k, int beta1, float *C,          \
                                                   int ldc) {                                    \
        dot_body(A, lda, B, ldb, k, beta1, C, ldc, M, R, BF16);                                  \
    }
#define DOTS(BF16) DOT(1, 8, BF16) DOT(2, 8, BF16) DOT(3, 4, BF16) DOT(4, 4, BF16) \
    DOT(1, 1, BF16) DOT(2, 1, BF16) DOT(3, 1, BF16) DOT(4, 1, BF16)
DOTS(0)
DOTS(1)

/* The same in fp32 with AVX2 and FMA (CPUs without AVX-512): 8 floats a vector, two vectors (a
 * cache line of each weight row) a step, and 16 registers: the rows of A are read from L1 at
 * each use, and R weight rows at once for M rows of A keep M R accumulators within them. */
#define AVX2_TARGET __attribute__((target("avx2,fma")))
static inline __attribute__((always_inline)) AVX2_TARGET void
dot_body_avx2(const float *A, int lda, const float *B, int ldb, int k, int beta1, float *C,
              int ldc, const int M, const int R) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    __m256 acc[MOE_GEMM_DOT_ROWS][8];
    MOE_UNROLL(4)
    for (int i = 0; i < M; i++)
        MOE_UNROLL(8)
        for (int r = 0; r < R; r++) acc[i][r] = _mm256_setzero_ps();
    int whole = k & ~15;
    for (int kk = 0; kk < whole; kk += 16)
        MOE_UNROLL(2)
        for (int h = 0; h < 16; h += 8)
            MOE_UNROLL(8)
            for (int r = 0; r < R; r++) {
                const float *row = B + (long)r * ldb + kk + h;
                if (!h) _mm_prefetch((const char *)row + PF_DOT, _MM_HINT_T0);
                __m256 b = _mm256_loadu_ps(row);
                MOE_UNROLL(4)
                for (int i = 0; i < M; i++)
                    acc[i][r] = _mm256_fmadd_ps(_mm256_loadu_ps(A + (long)i * lda + kk + h), b,
                                                acc[i][r]);
            }
    for (int h = whole; h < k; h += 8) { /* the last 1-15 elements, masked */
        __m256i valid = _mm256_cmpgt_epi32(_mm256_set1_epi32(k - h), lane);
        MOE_UNROLL(8)
        for (int r = 0; r < R; r++) {
            __m256 b = _mm256_maskload_ps(B + (long)r * ldb + h, valid);
            MOE_UNROLL(4)
            for (int i = 0; i < M; i++)
                acc[i][r] = _mm256_fmadd_ps(_mm256_maskload_ps(A + (long)i * lda + h, valid), b,
                                            acc[i][r]);
        }
    }
    MOE_UNROLL(4)
    for (int i = 0; i < M; i++)
        MOE_UNROLL(8)
        for (int r = 0; r < R; r++) {
            __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc[i][r]),
                                  _mm256_extractf128_ps(acc[i][r], 1));
            s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            float v = _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
            C[(long)i * ldc + r] = beta1 ? C[(long)i * ldc + r] + v : v;
        }
}

#define DOT_AVX2(M, R)                                                                           \
    static AVX2_TARGET void dot2_##M##_##R(const void *A, int lda, const void *B, int ldb, int k,  \
                                          int beta1, float *C, int ldc) {                        \
        dot_body_avx2(A, lda, B, ldb, k, beta1, C, ldc, M, R);                                   \
    }
DOT_AVX2(1, 8) DOT_AVX2(2, 4) DOT_AVX2(3, 4) DOT_AVX2(4, 2)
DOT_AVX2(1, 1) DOT_AVX2(2, 1) DOT_AVX2(3, 1) DOT_AVX2(4, 1)

/* A set of dot tiles: R weight rows at once for M rows of A, and one at a time; elements of es
 * bytes. */
typedef struct {
    size_t es;
    int r[MOE_GEMM_DOT_ROWS + 1];
    dot_fn tiles[MOE_GEMM_DOT_ROWS + 1], ones[MOE_GEMM_DOT_ROWS + 1];
} dot_set;
static const dot_set dot_sets[3] = {
    {4,
     {0, 8, 8, 4, 4},
     {0, dot_1_8_0, dot_2_8_0, dot_3_4_0, dot_4_4_0},
     {0, dot_1_1_0, dot_2_1_0, dot_3_1_0, dot_4_1_0}},
    {2,
     {0, 8, 8, 4, 4},
     {0, dot_1_8_1, dot_2_8_1, dot_3_4_1, dot_4_4_1},
     {0, dot_1_1_1, dot_2_1_1, dot_3_1_1, dot_4_1_1}},
    {4,
     {0, 8, 4, 4, 2},
     {0, dot2_1_8, dot2_2_4, dot2_3_4, dot2_4_2},
     {0, dot2_1_1, dot2_2_1, dot2_3_1, dot2_4_1}}};
enum { DOT_FP32, DOT_BF16, DOT_AVX2 };

/* Weight rows [lo, hi) of C = A B^T. */
static void gemm_nt_dot(const dot_set *set, int m, int lo, int hi, int k, const void *A, int lda,
                        const void *B, int ldb, int beta1, float *C, int ldc) {
    const char *b = B;
    size_t row = (size_t)ldb * set->es;
    int R = set->r[m], j = lo;
    for (; j + R <= hi; j += R) set->tiles[m](A, lda, b + j * row, ldb, k, beta1, C + j, ldc);
    for (; j < hi; j++) set->ones[m](A, lda, b + j * row, ldb, k, beta1, C + j, ldc);
}

/* C = A B^T (+ C): per block of up to 64 rows of A and KC columns, A^T into scratch, then the
 * rows of B (the weights) broadcast against it; every element of B is read once per 64 rows.
 * With kc even the rows go in pairs of k (tile_body_paired), padded to 8 rows rather than 16:
 * an expert's rows rarely fill their last vector. A last block of fewer than 64 rows goes with
 * the block before it, panel by panel of weight rows, so that the panel is read from memory
 * once for both (66 rows read the weights once, not twice); one of at most MOE_GEMM_DOT_ROWS
 * rows as dot products (a tile would pad it to 8 rows). */
static SMALL_TARGET void gemm_nt(int m, int n, int k, const float *A, int lda, const float *B,
                                 int ldb, int beta1, float *C, int ldc) {
    static _Thread_local float stage[NT_PANEL * NT_ROWS] __attribute__((aligned(64)));
    for (int m0 = 0; m0 < m; m0 += NT_ROWS) {
        int mc = m - m0 < NT_ROWS ? m - m0 : NT_ROWS, m1 = m0 + mc;
        int mc2 = m - m1 < NT_ROWS ? m - m1 : 0; /* the last block's rows, with this one */
        int dot2 = mc2 && mc2 <= MOE_GEMM_DOT_ROWS && __builtin_cpu_supports("avx512bw");
        for (int k0 = 0; k0 < k; k0 += KC) {
            int kc = k - k0 < KC ? k - k0 : KC;
            tile_dst d = {C + (long)m0 * ldc, ldc, 1, beta1 || k0 > 0};
            tile_dst d2 = {C + (long)m1 * ldc, ldc, 1, beta1 || k0 > 0};
            tile_job j = nt_block(A + (long)m0 * lda + k0, lda, mc, kc, n, B + k0, ldb, xt, &d,
                                  stage);
            tile_job j2 = j;
            if (mc2 && !dot2)
                j2 = nt_block(A + (long)m1 * lda + k0, lda, mc2, kc, n, B + k0, ldb, xt2, &d2,
                              stage);
            for (int p0 = 0; p0 < n; p0 += NT_PANEL) {
                int end = n - p0 < NT_PANEL ? n : p0 + NT_PANEL;
                nt_panel(&j, p0, end);
                if (dot2)
                    gemm_nt_dot(&dot_sets[DOT_FP32], mc2, p0, end, kc, A + (long)m1 * lda + k0,
                                lda, B + k0, ldb, d2.acc, d2.c, ldc);
                else if (mc2) nt_panel(&j2, p0, end);
            }
        }
        m0 += mc2 ? NT_ROWS : 0;
    }
}

#define DOT_PART_MIN 65536
static int dot_run(int set, int m, int n, int k, const void *A, int lda, const void *B, int ldb,
                   float beta, float *C, int ldc) {
    if (m < 1 || m > MOE_GEMM_DOT_ROWS || n < 1 || k < 1 || (beta != 0.0f && beta != 1.0f))
        return 0;
    const dot_set *s = &dot_sets[set];
    /* a part of at least 64 weight rows and DOT_PART_MIN elements: a parallel region costs
     * about a microsecond, as long as a thread takes for 64 K products (bench/RESULTS.md,
     * session 28) */
    long most = (long)n * k / DOT_PART_MIN;
    if (most > n / 64) most = n / 64;
    int parts = omp_in_parallel() ? 1 : moe_num_threads();
    parts = parts < most ? parts : (int)most;
    if (parts <= 1) {
        gemm_nt_dot(s, m, 0, n, k, A, lda, B, ldb, beta != 0.0f, C, ldc);
        return 1;
    }
#pragma omp parallel /* the whole team, some idle: a smaller one would be allocated anew */
    if (omp_get_thread_num() < parts) {
        int lo, hi;
        moe_part16(n, omp_get_thread_num(), parts, &lo, &hi);
        gemm_nt_dot(s, m, lo, hi, k, A, lda, B, ldb, beta != 0.0f, C, ldc);
    }
    return 1;
}

int moe_gemm_dot(int bf16, int m, int n, int k, const void *A, int lda, const void *B, int ldb,
                 float beta, float *C, int ldc) {
    if (bf16)
        return __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512bf16") &&
               dot_run(DOT_BF16, m, n, k, A, lda, B, ldb, beta, C, ldc);
    if (__builtin_cpu_supports("avx512bw"))
        return dot_run(DOT_FP32, m, n, k, A, lda, B, ldb, beta, C, ldc);
    return moe_gemm_dot_avx2(m, n, k, A, lda, B, ldb, beta, C, ldc);
}

int moe_gemm_dot_avx2(int m, int n, int k, const float *A, int lda, const float *B, int ldb,
                      float beta, float *C, int ldc) {
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           dot_run(DOT_AVX2, m, n, k, A, lda, B, ldb, beta, C, ldc);
}

int moe_gemm_small_available(void) { return moe_avx512(); }

int moe_transpose_floats(const float *A, int lda, int rows, int cols, float *T, int ldt) {
    if (!moe_gemm_small_available() || ldt % 8 || ldt < rows) return 0;
    transpose_rows(A, lda, rows, cols, ldt, T);
    return 1;
}

int moe_gemm_cached(int m, int n, int k, const float *A, long sai, long sak, const float *B,
                    long ldb, int bt, int beta1, float *C, long ldc, moe_tri tri, int off) {
    if (!moe_gemm_small_available() || (bt && k > KC) || m <= 0 || n <= 0 || k <= 0) return 0;
    gemm_cached(m, n, k, A, sai, sak, B, ldb, bt, beta1, C, ldc, tri, off);
    return 1;
}

moe_status moe_gemm_small(int ta, int tb, int m, int n, int k, const float *A, int lda,
                          const float *B, int ldb, float beta, float *C, int ldc) {
    if ((ta && tb) || (beta != 0.0f && beta != 1.0f))
        return moe_set_error(MOE_ERR_INVALID, "small GEMM: both operands transposed, or beta "
                             "%g (0 or 1)", beta);
    if (!moe_gemm_small_available())
        return moe_set_error(MOE_ERR_STATE, "small GEMM: this CPU has no AVX-512");
    if (m <= 0 || n <= 0) return MOE_OK;
    if (k <= 0) {
        if (beta == 0.0f)
            for (int i = 0; i < m; i++)
                for (int j = 0; j < n; j++) C[(long)i * ldc + j] = 0;
        return MOE_OK;
    }
    if (tb && m <= MOE_GEMM_DOT_ROWS && __builtin_cpu_supports("avx512bw")) {
        gemm_nt_dot(&dot_sets[DOT_FP32], m, 0, n, k, A, lda, B, ldb, beta != 0.0f, C, ldc);
        return MOE_OK;
    }
    if (tb) {
        gemm_nt(m, n, k, A, lda, B, ldb, beta != 0.0f, C, ldc);
        return MOE_OK;
    }
    if (ta) {
        gemm_tn(m, n, k, A, lda, B, ldb, beta != 0.0f, C, ldc);
        return MOE_OK;
    }
    tile_dst d = {C, ldc, 0, beta != 0.0f};
    tile_job j = {m, n, k, 3, STREAM_VEC, A, B, lda, 1, ldb, &d, 0, NULL};
    run_tiles(&j);
    return MOE_OK;
}
#else
int moe_gemm_small_available(void) { return 0; }

int moe_transpose_floats(const float *A, int lda, int rows, int cols, float *T, int ldt) {
    (void)A, (void)lda, (void)rows, (void)cols, (void)T, (void)ldt;
    return 0;
}

int moe_gemm_cached(int m, int n, int k, const float *A, long sai, long sak, const float *B,
                    long ldb, int bt, int beta1, float *C, long ldc, moe_tri tri, int off) {
    (void)m, (void)n, (void)k, (void)A, (void)sai, (void)sak, (void)B, (void)ldb, (void)bt;
    (void)beta1, (void)C, (void)ldc, (void)tri, (void)off;
    return 0;
}

moe_status moe_gemm_small(int ta, int tb, int m, int n, int k, const float *A, int lda,
                          const float *B, int ldb, float beta, float *C, int ldc) {
    (void)ta, (void)tb, (void)m, (void)n, (void)k, (void)A, (void)lda, (void)B, (void)ldb;
    (void)beta, (void)C, (void)ldc;
    return moe_set_error(MOE_ERR_STATE, "small GEMM: not built for this CPU");
}

int moe_gemm_dot(int bf16, int m, int n, int k, const void *A, int lda, const void *B, int ldb,
                 float beta, float *C, int ldc) {
    (void)bf16, (void)m, (void)n, (void)k, (void)A, (void)lda, (void)B, (void)ldb, (void)beta;
    (void)C, (void)ldc;
    return 0;
}

int moe_gemm_dot_avx2(int m, int n, int k, const float *A, int lda, const float *B, int ldb,
                      float beta, float *C, int ldc) {
    (void)m, (void)n, (void)k, (void)A, (void)lda, (void)B, (void)ldb, (void)beta, (void)C;
    (void)ldc;
    return 0;
}
#endif
