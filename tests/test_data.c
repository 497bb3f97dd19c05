/* io/data: an atomic write whose fsync fails closes its file, one whose directory's fsync
 * fails (injected) says so after putting the file in place (moe prepare too), an empty directory path is
 * refused without reading past it, and a token file is mapped, not copied: loading a large one
 * costs no anonymous memory, its tokens read back in either width, and a refused or freed one
 * leaves no mapping behind. moe prepare streams: its memory does not grow with the corpus, and
 * a failure part way (a file's fsync, a missing input after others were written) leaves the
 * previous pair and no .next file. */
#define _POSIX_C_SOURCE 200809L
#include "test_util.h"

#include "core/core.h"
#include "io/data.h"
#include "moe.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <dirent.h>

#include <cmocka.h>

/* The lowest free descriptor: a leaked one moves it up. */
static int next_fd(void) {
    int fd = open("/dev/null", O_RDONLY);
    assert_true(fd >= 0);
    close(fd);
    return fd;
}

/* PATH.tmp a link to /dev/null: the writes succeed and fsync fails (EINVAL), an error after
 * which the file must still be closed. */
static void test_write_atomic_fsync_fails(void **state) {
    (void)state;
    char dir[] = "/tmp/moe_test_data_XXXXXX", path[64], tmp[80];
    assert_non_null(mkdtemp(dir));
    snprintf(path, sizeof path, "%s/f", dir);
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    const char text[] = "abc";
    const void *parts[1] = {text};
    size_t sizes[1] = {3};
    int before = next_fd();
    for (int i = 0; i < 3; i++) {
        assert_int_equal(symlink("/dev/null", tmp), 0);
        assert_int_not_equal(moe_write_atomic(path, parts, sizes, 1), MOE_OK);
        assert_non_null(strstr(moe_last_error(), "cannot flush"));
    }
    assert_int_equal(next_fd(), before);
    unlink(tmp);
    rmdir(dir);
}

/* test_data links with -Wl,--wrap=fsync (tests/CMakeLists.txt): io/data's fsync calls come
 * here; the fail_fsync[1]-th fsync of a directory and the fail_fsync[0]-th of a file (counted
 * in fsyncs[1] and fsyncs[0]) fail with EIO. */
int __real_fsync(int fd);
int __wrap_fsync(int fd);
static int fail_fsync[2], fsyncs[2];
int __wrap_fsync(int fd) {
    struct stat sb;
    int dir = fstat(fd, &sb) == 0 && S_ISDIR(sb.st_mode);
    if (++fsyncs[dir] == fail_fsync[dir]) {
        errno = EIO;
        return -1;
    }
    return __real_fsync(fd);
}

/* Fails the n-th directory fsync from now (0: none). */
static void fail_dir_fsync_at(int n) {
    fsyncs[1] = 0;
    fail_fsync[1] = n;
}

/* Fails the n-th fsync of a file from now (0: none). */
static void fail_file_fsync_at(int n) {
    fsyncs[0] = 0;
    fail_fsync[0] = n;
}

/* dir holds train.bin and val.bin and nothing else (no .next, .tmp or .old file). */
static void assert_only_pair(const char *dir) {
    DIR *d = opendir(dir);
    assert_non_null(d);
    int n = 0;
    for (struct dirent *e; (e = readdir(d));) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        if (strcmp(e->d_name, "train.bin") && strcmp(e->d_name, "val.bin"))
            fail_msg("%s holds %s besides train.bin and val.bin", dir, e->d_name);
        n++;
    }
    closedir(d);
    assert_int_equal(n, 2);
}

static void assert_says(const char *error, const char *want) {
    if (!strstr(error, want)) fail_msg("error '%s' does not say '%s'", error, want);
}

/* moe prepare of "paragraph i" for i < n into out (its error message to err[512]); then the
 * number of tokens in train.bin and val.bin, -1 where a file does not load. */
static moe_status prepare_paragraphs(const char *dir, const char *out, int n, int64_t tokens[2],
                                     char *err) {
    char text[96];
    snprintf(text, sizeof text, "%s/t.txt", dir);
    FILE *f = fopen(text, "w");
    assert_non_null(f);
    for (int i = 0; i < n; i++) fprintf(f, "paragraph %d\n\n", i);
    fclose(f);
    const char *files[1] = {text};
    moe_status st = moe_prepare(files, 1, out, 0.5, 1234, NULL, NULL);
    snprintf(err, 512, "%s", st == MOE_OK ? "" : moe_last_error());
    for (int i = 0; i < 2; i++) {
        char bin[128];
        moe_tokens t;
        snprintf(bin, sizeof bin, "%s/%s.bin", out, i ? "val" : "train");
        tokens[i] = moe_tokens_load(bin, &t) == MOE_OK ? t.n_tokens : -1;
        moe_tokens_free(&t);
    }
    unlink(text);
    return st;
}

/* The directory's fsync after the rename fails: an error naming the directory and the cause,
 * with the new file in place (the rename is done) and no temporary left. moe prepare: a
 * failure while it writes the new pair beside the old (val.bin.next's fsync, after
 * train.bin.next is complete) leaves the old pair and no .next file; one after the pair is
 * renamed into place (the directory's fsync) says so. */
static void test_write_atomic_dir_fsync_fails(void **state) {
    (void)state;
    char dir[] = "/tmp/moe_test_data_XXXXXX", path[64], tmp[80], out[64], want[200];
    assert_non_null(mkdtemp(dir));
    snprintf(path, sizeof path, "%s/f", dir);
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    const void *parts[1] = {"old"};
    size_t sizes[1] = {3};
    assert_int_equal(moe_write_atomic(path, parts, sizes, 1), MOE_OK);
    parts[0] = "new";
    fail_dir_fsync_at(1);
    moe_status st = moe_write_atomic(path, parts, sizes, 1);
    fail_dir_fsync_at(0);
    assert_int_not_equal(st, MOE_OK);
    snprintf(want, sizeof want, "its directory %s cannot be synced (%s)", dir, strerror(EIO));
    assert_says(moe_last_error(), want);
    char got[8] = {0};
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    assert_int_equal(fread(got, 1, sizeof got, f), 3);
    fclose(f);
    assert_string_equal(got, "new");
    assert_int_not_equal(access(tmp, F_OK), 0);

    snprintf(out, sizeof out, "%s/out", dir);
    int64_t old[2], now[2];
    char err[512];
    assert_int_equal(prepare_paragraphs(dir, out, 40, old, err), MOE_OK);
    assert_true(old[0] > 0 && old[1] > 0);
    fail_file_fsync_at(2); /* val.bin.next's */
    st = prepare_paragraphs(dir, out, 80, now, err);
    fail_file_fsync_at(0);
    assert_int_not_equal(st, MOE_OK);
    snprintf(want, sizeof want, "cannot flush %s/val.bin.next: %s", out, strerror(EIO));
    assert_says(err, want);
    assert_memory_equal(now, old, sizeof old);
    assert_only_pair(out);
    fail_dir_fsync_at(1); /* the renames' (the .next files need none) */
    st = prepare_paragraphs(dir, out, 80, now, err);
    fail_dir_fsync_at(0);
    assert_int_not_equal(st, MOE_OK);
    snprintf(want, sizeof want, "are written, but their directory %s cannot be synced (%s)", out,
             strerror(EIO));
    assert_says(err, want);
    assert_true(now[0] + now[1] > old[0] + old[1]); /* the new pair */
    assert_only_pair(out);
    char bin[96];
    for (int i = 0; i < 2; i++) {
        snprintf(bin, sizeof bin, "%s/%s.bin", out, i ? "val" : "train");
        unlink(bin);
    }
    rmdir(out);
    unlink(path);
    rmdir(dir);
}

static void test_mkdirs_empty(void **state) {
    (void)state;
    assert_int_not_equal(moe_mkdirs(""), MOE_OK);
    assert_non_null(strstr(moe_last_error(), "empty"));
}

/* ------------------------------------------------------------ token files */

/* Writes a token file (docs/FORMATS.md §1) of n tokens, id i = (i * 7919) % (vocab - 1), in
 * documents of doc_len tokens each ending with eot = vocab - 1 (n a multiple of doc_len), one
 * source "s"; extra bytes appended after the end. Returns the file's size. */
static size_t write_tokens(const char *path, int dtype, int64_t n, uint32_t vocab, int doc_len,
                           size_t extra) {
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    unsigned char hdr[64] = {0};
    uint32_t version = 1, dt = (uint32_t)dtype, eot = vocab - 1;
    uint64_t nt = (uint64_t)n, nd = (uint64_t)(n / doc_len);
    memcpy(hdr, "MOETOKNS", 8);
    memcpy(hdr + 8, &version, 4);
    memcpy(hdr + 12, &dt, 4);
    memcpy(hdr + 16, &nt, 8);
    memcpy(hdr + 24, &vocab, 4);
    memcpy(hdr + 28, &eot, 4);
    memcpy(hdr + 32, &nd, 8);
    assert_int_equal(fwrite(hdr, 1, 64, f), 64);
    for (int64_t i = 0; i < n; i++) {
        uint32_t id = i % doc_len == doc_len - 1 ? eot : (uint32_t)((i * 7919) % (vocab - 1));
        uint16_t narrow = (uint16_t)id;
        assert_int_equal(fwrite(dtype == 2 ? (void *)&narrow : (void *)&id, (size_t)dtype, 1, f), 1);
    }
    for (uint64_t d = 0; d < nd; d++) {
        uint64_t pair[2] = {d * (uint64_t)doc_len, 0};
        assert_int_equal(fwrite(pair, 16, 1, f), 1);
    }
    uint32_t n_src = 1, len = 1;
    assert_int_equal(fwrite(&n_src, 4, 1, f), 1);
    assert_int_equal(fwrite(&len, 4, 1, f), 1);
    assert_int_equal(fwrite("s", 1, 1, f), 1);
    for (size_t i = 0; i < extra; i++) assert_int_equal(fputc(0, f), 0);
    assert_int_equal(fclose(f), 0);
    struct stat sb;
    assert_int_equal(stat(path, &sb), 0);
    return (size_t)sb.st_size;
}

/* A field of /proc/self/status, in kB ("RssAnon"). */
static long status_kb(const char *field) {
    FILE *f = fopen("/proc/self/status", "r");
    assert_non_null(f);
    char line[256];
    long kb = -1;
    size_t n = strlen(field);
    while (fgets(line, sizeof line, f))
        if (!strncmp(line, field, n) && line[n] == ':') kb = atol(line + n + 1);
    fclose(f);
    assert_true(kb >= 0);
    return kb;
}

/* Whether /proc/self/maps maps path. */
static int is_mapped(const char *path) {
    FILE *f = fopen("/proc/self/maps", "r");
    assert_non_null(f);
    char line[4400];
    int found = 0;
    size_t n = strlen(path);
    while (fgets(line, sizeof line, f)) {
        size_t l = strlen(line);
        if (l && line[l - 1] == '\n') line[--l] = '\0';
        found |= l >= n && !strcmp(line + l - n, path);
    }
    fclose(f);
    return found;
}

/* 8 M uint16 tokens (16 MB): loading and reading every token adds under half the file to the
 * anonymous memory (the tokens stay in the page cache, file-backed; a copy widened to uint32
 * adds twice the file), and every token reads back as written. */
static void test_tokens_mapped(void **state) {
    (void)state;
    char dir[] = "/tmp/moe_test_data_XXXXXX", path[64];
    assert_non_null(mkdtemp(dir));
    snprintf(path, sizeof path, "%s/big.bin", dir);
    const int64_t n = 8 << 20;
    size_t size = write_tokens(path, 2, n, 50000, 1024, 0);
    long before = status_kb("RssAnon");
    moe_tokens t;
    assert_int_equal(moe_tokens_load(path, &t), MOE_OK);
    uint64_t sum = 0, want = 0;
    for (int64_t i = 0; i < t.n_tokens; i++) sum += moe_tokens_at(&t, i);
    long grown = status_kb("RssAnon") - before;
    printf("token file of %zu kB: anonymous memory grew by %ld kB\n", size / 1024, grown);
    if (grown * 1024 >= (long)size / 2)
        fail_msg("loading %zu bytes of tokens added %ld kB of anonymous memory (want < %zu kB)",
                 size, grown, size / 2048);
    for (int64_t i = 0; i < n; i++)
        want += i % 1024 == 1023 ? 49999 : (uint64_t)((i * 7919) % 49999);
    assert_int_equal(t.n_tokens, n);
    assert_int_equal(t.id_bytes, 2);
    assert_int_equal(t.n_docs, n / 1024);
    assert_int_equal(sum, want);
    assert_true(is_mapped(path));
    moe_tokens_free(&t);
    assert_false(is_mapped(path));
    unlink(path);
    rmdir(dir);
}

/* uint32 tokens read back as written, through moe_tokens_at and moe_tokens_batch. */
static void test_tokens_u32(void **state) {
    (void)state;
    char dir[] = "/tmp/moe_test_data_XXXXXX", path[64];
    assert_non_null(mkdtemp(dir));
    snprintf(path, sizeof path, "%s/u32.bin", dir);
    write_tokens(path, 4, 4096, 100000, 64, 0);
    moe_tokens t;
    assert_int_equal(moe_tokens_load(path, &t), MOE_OK);
    assert_int_equal(t.id_bytes, 4);
    for (int64_t i = 0; i < t.n_tokens; i++)
        assert_int_equal(moe_tokens_at(&t, i),
                         i % 64 == 63 ? 99999 : (uint32_t)((i * 7919) % 99999));
    int32_t tok[2 * 16], tgt[2 * 16];
    moe_tokens_batch(&t, 2, 16, 5, 6, tok, tgt);
    for (int i = 0; i < 2 * 16; i++) assert_true(tok[i] >= 0 && tok[i] < 100000);
    for (int i = 0; i < 15; i++) assert_int_equal(tok[i + 1], tgt[i]);
    moe_tokens_free(&t);
    unlink(path);
    rmdir(dir);
}

/* A blend: each row a whole window of one set, the sets in their weights' proportions (3 rows
 * in 4 from the second, within 4.5 standard deviations over 8192 rows), the same rows again for
 * the same stream, a row the same in any batch that holds it; a blend of one set gives
 * moe_tokens_batch's rows. */
static void test_blend_batch(void **state) {
    (void)state;
    enum { N = 5000, S = 8, B = 16, STEPS = 512, OFF = 1000000 };
    uint32_t *a = malloc(N * sizeof *a), *b = malloc(N * sizeof *b);
    for (int i = 0; i < N; i++) a[i] = (uint32_t)i, b[i] = (uint32_t)(OFF + i);
    moe_tokens ta = {.ids = a, .id_bytes = MOE_TOKENS_U32, .n_tokens = N, .vocab = 2 * OFF},
               tb = {.ids = b, .id_bytes = MOE_TOKENS_U32, .n_tokens = N, .vocab = 2 * OFF};
    moe_blend two = {2, {&ta, &tb}, {0.25, 0.75}}, one = {1, {&tb}, {1}};
    uint64_t seed = tu_seed();
    int32_t tok[B * S], tgt[B * S], tok2[B * S], tgt2[B * S];
    int from_b = 0, from_a = 0;
    for (int st = 0; st < STEPS; st++) {
        moe_blend_batch(&two, 0, B, S, seed, (uint64_t)st, tok, tgt);
        for (int r = 0; r < B; r++) {
            int first = tok[r * S], in_b = first >= OFF, start = first - (in_b ? OFF : 0);
            from_b += in_b, from_a += !in_b;
            assert_true(start >= 0 && start + S < N); /* a window with its last target */
            for (int t = 0; t < S; t++) {
                assert_int_equal(tok[r * S + t], first + t);
                assert_int_equal(tgt[r * S + t], first + t + 1);
            }
        }
        moe_blend_batch(&two, 0, B, S, seed, (uint64_t)st, tok2, tgt2);
        assert_memory_equal(tok, tok2, sizeof tok);
        assert_memory_equal(tgt, tgt2, sizeof tgt);
    }
    double f = from_b / (double)(B * STEPS), sd = sqrt(0.25 * 0.75 / (B * STEPS));
    if (!(fabs(f - 0.75) < 4.5 * sd) || !from_a) fail_msg("%.4f of the rows from the second set", f);
    int32_t tok4[4 * S], tgt4[4 * S]; /* rows 5..8 are rows 5..8 of a batch from row 0 */
    moe_blend_batch(&two, 5, 4, S, seed, 9, tok4, tgt4);
    moe_blend_batch(&two, 0, B, S, seed, 9, tok, tgt);
    assert_memory_equal(tok4, tok + 5 * S, sizeof tok4);
    assert_memory_equal(tgt4, tgt + 5 * S, sizeof tgt4);
    moe_blend_batch(&one, 0, B, S, seed, 7, tok, tgt);
    moe_tokens_batch(&tb, B, S, seed, 7, tok2, tgt2);
    assert_memory_equal(tok, tok2, sizeof tok);
    assert_memory_equal(tgt, tgt2, sizeof tgt);
    free(a);
    free(b);
}

/* --data-path's values: a directory (one with spaces in its name too), weighted pairs scaled
 * to sum to 1; refused: a weight without a directory, weights that are not positive numbers,
 * no directory, more than MOE_BLEND_MAX sets. */
static void test_data_spec(void **state) {
    (void)state;
    char buf[2048], *dirs[MOE_BLEND_MAX];
    double w[MOE_BLEND_MAX];
    int n;
    assert_int_equal(moe_data_spec("data/x", buf, sizeof buf, dirs, w, &n, NULL), MOE_OK);
    assert_int_equal(n, 1);
    assert_string_equal(dirs[0], "data/x");
    assert_true(w[0] == 1);
    int pairs;
    assert_int_equal(moe_data_spec("0.3 a  0.9\tb", buf, sizeof buf, dirs, w, &n, &pairs), MOE_OK);
    assert_int_equal(n, 2);
    assert_int_equal(pairs, 1);
    assert_string_equal(dirs[0], "a");
    assert_string_equal(dirs[1], "b");
    assert_true(fabs(w[0] - 0.25) < 1e-15 && fabs(w[1] - 0.75) < 1e-15);
    char dir[] = "/tmp/moe test data XXXXXX";
    assert_non_null(mkdtemp(dir));
    assert_int_equal(moe_data_spec(dir, buf, sizeof buf, dirs, w, &n, &pairs), MOE_OK);
    assert_int_equal(n, 1);
    assert_int_equal(pairs, 0);
    assert_string_equal(dirs[0], dir);
    char file[96]; /* a file with spaces in its name too (moe eval --data-path FILE) */
    snprintf(file, sizeof file, "%s/a token file", dir);
    FILE *f = fopen(file, "w");
    assert_non_null(f);
    fclose(f);
    assert_int_equal(moe_data_spec(file, buf, sizeof buf, dirs, w, &n, &pairs), MOE_OK);
    assert_true(n == 1 && pairs == 0 && !strcmp(dirs[0], file));
    unlink(file);
    rmdir(dir);
    /* a blend of one directory is a blend: its validation split, not a token file */
    assert_int_equal(moe_data_spec("2 d", buf, sizeof buf, dirs, w, &n, &pairs), MOE_OK);
    assert_true(n == 1 && pairs == 1 && !strcmp(dirs[0], "d") && w[0] == 1);
    const char *bad[] = {"0.3 a 0.6", "0 a 1 b", "-1 a", "x a", "inf a", "nan a", " "};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        assert_int_equal(moe_data_spec(bad[i], buf, sizeof buf, dirs, w, &n, NULL), MOE_ERR_INVALID);
        assert_non_null(strstr(moe_last_error(), "data-path"));
    }
    char many[1024] = "";
    for (int i = 0; i <= MOE_BLEND_MAX; i++) strcat(many, "1 d ");
    assert_int_equal(moe_data_spec(many, buf, sizeof buf, dirs, w, &n, NULL), MOE_ERR_INVALID);
    assert_non_null(strstr(moe_last_error(), "more than 64 datasets"));
}

/* Refused files: an empty one (which cannot be mapped) and one under 64 bytes are no token
 * file; one with trailing bytes is refused by name; none stays mapped. */
static void test_tokens_refused(void **state) {
    (void)state;
    char dir[] = "/tmp/moe_test_data_XXXXXX", path[64];
    assert_non_null(mkdtemp(dir));
    snprintf(path, sizeof path, "%s/t.bin", dir);
    moe_tokens t;
    for (int len = 0; len < 64; len += 63) {
        FILE *f = fopen(path, "wb");
        assert_non_null(f);
        for (int i = 0; i < len; i++) fputc('M', f);
        fclose(f);
        assert_int_not_equal(moe_tokens_load(path, &t), MOE_OK);
        assert_non_null(strstr(moe_last_error(), "is not a token file"));
    }
    write_tokens(path, 2, 256, 257, 64, 3);
    assert_int_not_equal(moe_tokens_load(path, &t), MOE_OK);
    assert_non_null(strstr(moe_last_error(), "3 unexpected bytes at the end"));
    assert_false(is_mapped(path));
    assert_int_not_equal(moe_tokens_load(dir, &t), MOE_OK); /* a directory */
    unlink(path);
    rmdir(dir);
}

/* Document i of the duplicates corpus, with its final newline. */
static int dup_doc(char *buf, size_t cap, int i) {
    return snprintf(buf, cap, "document %d: %s\n", i, i % 3 ? "a saying" : "another saying");
}

/* 2000 distinct documents, document i present (i % 4) + 1 times, the copies far apart; with
 * --val-fraction 0.25 no document is on both sides and a quarter of the distinct ones are in
 * validation (binomial: 500 +- 19). */
static void test_prepare_split_by_content(void **state) {
    (void)state;
    enum { N = 2000 };
    char dir[] = "/tmp/moe_test_data_XXXXXX", text[80], out[80], doc[64];
    assert_non_null(mkdtemp(dir));
    snprintf(text, sizeof text, "%s/dups.txt", dir);
    snprintf(out, sizeof out, "%s/out", dir);
    FILE *f = fopen(text, "w");
    assert_non_null(f);
    int copies = 0;
    for (int round = 0; round < 4; round++)
        for (int i = 0; i < N; i++)
            if (i % 4 >= round) {
                dup_doc(doc, sizeof doc, i);
                fprintf(f, "%s%%\n", doc);
                copies++;
            }
    assert_int_equal(fclose(f), 0);
    const char *files[1] = {text};
    moe_prepare_stats st;
    assert_int_equal(moe_prepare(files, 1, out, 0.25, 1234, NULL, &st), MOE_OK);
    assert_int_equal(st.train_docs + st.val_docs, copies);
    unsigned char side[N] = {0}; /* bit 0: in train, bit 1: in validation */
    for (int split = 0; split < 2; split++) {
        char path[96];
        snprintf(path, sizeof path, "%s/%s.bin", out, split ? "val" : "train");
        moe_tokens t;
        assert_int_equal(moe_tokens_load(path, &t), MOE_OK);
        for (int64_t d = 0; d < t.n_docs; d++) {
            int64_t a = (int64_t)t.doc_start[d],
                    b = d + 1 < t.n_docs ? (int64_t)t.doc_start[d + 1] : t.n_tokens;
            char got[64] = {0};
            assert_true(b - a - 1 < (int64_t)sizeof got);
            for (int64_t k = a; k < b - 1; k++) got[k - a] = (char)moe_tokens_at(&t, k);
            int i = -1;
            assert_int_equal(sscanf(got, "document %d:", &i), 1);
            assert_true(i >= 0 && i < N);
            dup_doc(doc, sizeof doc, i);
            assert_string_equal(got, doc);
            side[i] |= (unsigned char)(1 << split);
        }
        moe_tokens_free(&t);
    }
    int val = 0;
    for (int i = 0; i < N; i++) {
        if (side[i] == 3)
            fail_msg("document %d (%d copies) is in both the training and the validation split",
                     i, i % 4 + 1);
        assert_int_not_equal(side[i], 0);
        val += side[i] == 2;
    }
    printf("%d of %d distinct documents in validation\n", val, N);
    if (val < 0.21 * N || val > 0.29 * N)
        fail_msg("%d of %d distinct documents in validation, not about 25%%", val, N);
    for (int split = 0; split < 2; split++) {
        char path[96];
        snprintf(path, sizeof path, "%s/%s.bin", out, split ? "val" : "train");
        unlink(path);
    }
    rmdir(out);
    unlink(text);
    rmdir(dir);
}

/* Writes path: paragraphs ("word word ...\n" lines) each followed by a blank line, until it
 * holds at least size bytes; returns its size and adds its paragraphs to *docs. */
static size_t write_paragraphs(const char *path, size_t size, uint64_t seed, int64_t *docs) {
    static const char *words[] = {"the", "expert", "router", "sends", "each", "token", "to",
                                  "two", "of", "sixty-four", "experts", "and", "adds", "their",
                                  "outputs", "weighted", "by", "its", "scores"};
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    size_t n = 0;
    uint64_t x = seed;
    while (n < size) {
        int lines = 3 + (int)(x >> 60); /* 3 to 18 lines of about 70 bytes */
        for (int l = 0; l < lines; l++) {
            for (int col = 0; col < 64;) {
                x = x * 6364136223846793005ull + 1442695040888963407ull;
                const char *w = words[(x >> 33) % (sizeof words / sizeof *words)];
                n += (size_t)fprintf(f, "%s%s", col ? " " : "", w);
                col += (int)strlen(w) + 1;
            }
            n += (size_t)fprintf(f, "\n");
        }
        n += (size_t)fprintf(f, "\n");
        (*docs)++;
    }
    assert_int_equal(fclose(f), 0);
    return n;
}

/* Peak memory of moe prepare over a 64 MB corpus in 4 files of 16 MB (64 M byte tokens): the
 * growth of the peak resident size (VmHWM, reset through /proc/self/clear_refs) stays under the
 * largest input file + 64 MB. Prepare holds one input file, two 1 MB write buffers and the
 * document table (16 bytes a document, here about 0.1 M documents: 1.7 MB); before it streamed,
 * it held every token as a uint32 and then the training split again as uint16 (over 6 bytes a
 * token: about 400 MB here). Then the files hold every byte of the corpus (each paragraph's text
 * and newline, its blank line turned into the end-of-text id), and a second prepare that fails
 * on a missing input after a whole file went to the .next files leaves the pair unreplaced and
 * no .next file. Under AddressSanitizer (whose quarantine keeps freed memory) a 4 MB corpus and
 * no memory bound. */
static void test_prepare_streams(void **state) {
    (void)state;
#if defined(__SANITIZE_ADDRESS__)
    const size_t file_size = 1 << 20;
#else
    const size_t file_size = 16 << 20;
#endif
    enum { F = 4 };
    char dir[] = "/tmp/moe_test_data_XXXXXX", names[F + 1][80], out[80];
    const char *files[F + 1];
    assert_non_null(mkdtemp(dir));
    snprintf(out, sizeof out, "%s/out", dir);
    int64_t docs = 0;
    size_t bytes = 0, largest = 0;
    for (int i = 0; i <= F; i++) {
        snprintf(names[i], sizeof names[i], "%s/%s%d.txt", dir, i < F ? "text" : "missing", i);
        files[i] = names[i];
        if (i == F) break;
        size_t n = write_paragraphs(names[i], file_size, 1000 + (uint64_t)i, &docs);
        bytes += n;
        largest = n > largest ? n : largest;
    }
    FILE *clear = fopen("/proc/self/clear_refs", "w"); /* "5": VmHWM = VmRSS now */
    if (clear) {
        fputs("5", clear);
        fclose(clear);
    }
    long before = status_kb("VmRSS");
    moe_prepare_stats st;
    assert_int_equal(moe_prepare(files, F, out, 0.05, 1234, NULL, &st), MOE_OK);
    long grown = status_kb("VmHWM") - before, bound = (long)(largest >> 10) + (64 << 10);
    printf("prepare of %zu MB in %d files (%lld documents): peak resident size grew by %ld kB "
           "(bound %ld kB%s)\n", bytes >> 20, F, (long long)docs, grown, bound,
           clear ? "" : "; VmHWM not reset");
#if !defined(__SANITIZE_ADDRESS__)
    if (grown > bound)
        fail_msg("prepare of %zu bytes (largest file %zu) grew the peak resident size by %ld kB, "
                 "more than the largest file + 64 MB (%ld kB)", bytes, largest, grown, bound);
#endif
    assert_int_equal(st.train_docs + st.val_docs, docs);
    assert_int_equal(st.train_tokens + st.val_tokens, (int64_t)bytes);
    struct stat was[2];
    for (int i = 0; i < 2; i++) {
        char bin[96];
        snprintf(bin, sizeof bin, "%s/%s.bin", out, i ? "val" : "train");
        moe_tokens t;
        assert_int_equal(moe_tokens_load(bin, &t), MOE_OK);
        assert_int_equal(t.n_tokens, i ? st.val_tokens : st.train_tokens);
        assert_int_equal(t.n_docs, i ? st.val_docs : st.train_docs);
        assert_int_equal(t.n_sources, F);
        assert_string_equal(t.sources[F - 1], files[F - 1]);
        moe_tokens_free(&t);
        assert_int_equal(stat(bin, &was[i]), 0);
    }
    const char *failing[2] = {files[0], files[F]};
    assert_int_not_equal(moe_prepare(failing, 2, out, 0.05, 1234, NULL, NULL), MOE_OK);
    assert_says(moe_last_error(), files[F]);
    for (int i = 0; i < 2; i++) {
        char bin[96];
        struct stat now;
        snprintf(bin, sizeof bin, "%s/%s.bin", out, i ? "val" : "train");
        assert_int_equal(stat(bin, &now), 0);
        assert_true(now.st_ino == was[i].st_ino && now.st_size == was[i].st_size);
    }
    assert_only_pair(out);
    for (int i = 0; i < 2; i++) {
        char bin[96];
        snprintf(bin, sizeof bin, "%s/%s.bin", out, i ? "val" : "train");
        unlink(bin);
    }
    rmdir(out);
    for (int i = 0; i < F; i++) unlink(files[i]);
    rmdir(dir);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_write_atomic_fsync_fails),
        cmocka_unit_test(test_write_atomic_dir_fsync_fails),
        cmocka_unit_test(test_mkdirs_empty),
        cmocka_unit_test(test_tokens_mapped),
        cmocka_unit_test(test_tokens_u32),
        cmocka_unit_test(test_tokens_refused),
        cmocka_unit_test(test_blend_batch),
        cmocka_unit_test(test_data_spec),
        cmocka_unit_test(test_prepare_split_by_content),
        cmocka_unit_test(test_prepare_streams),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
