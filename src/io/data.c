/* Token files: prepare (text -> tokens), load (with every field checked), batches. */
#define _POSIX_C_SOURCE 200809L
#include "io/data.h"
#include "io/tokenizer.h"

#include "core/core.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdint.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

/* ----------------------------------------------------------- atomic write */

/* fsync of the directory holding path, what makes a rename in it durable: 0 or the errno of
 * the open or fsync that failed; dir[cap] receives the directory's name. */
static int sync_dir_errno(const char *path, char *dir, size_t cap) {
    snprintf(dir, cap, "%s", path);
    char *slash = strrchr(dir, '/');
    if (slash) {
        *slash = '\0';
        if (!dir[0]) strcpy(dir, "/");
    } else {
        strcpy(dir, ".");
    }
    int dfd = open(dir, O_RDONLY | O_DIRECTORY);
    int err = dfd < 0 ? errno : fsync(dfd) != 0 ? errno : 0;
    if (dfd >= 0) close(dfd);
    return err;
}

/* The same as an error: path is renamed into place already, but may not survive a crash. */
static moe_status sync_dir_of(const char *path) {
    char dir[4200];
    int err = sync_dir_errno(path, dir, sizeof dir);
    if (err)
        return moe_set_error(MOE_ERR_IO, "%s is written, but its directory %s cannot be synced "
                             "(%s): the new file may not survive a crash", path, dir,
                             strerror(err));
    return MOE_OK;
}

/* Writes n bytes at p to fd, which path names in the error: short writes continued, EINTR
 * retried, a write of nothing taken for a full disk. */
static moe_status write_all(int fd, const void *p, size_t n, const char *path) {
    const char *c = p;
    while (n > 0) {
        ssize_t w = write(fd, c, n);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0)
            return moe_set_error(MOE_ERR_IO, "cannot write %s: %s", path,
                                 strerror(w < 0 ? errno : ENOSPC));
        c += w;
        n -= (size_t)w;
    }
    return MOE_OK;
}

/* fsync, then close (fd is closed whether or not fsync succeeds): the file's data on disk
 * before it is renamed into place. */
static moe_status sync_close(int fd, const char *path) {
    int err = fsync(fd) != 0 ? errno : 0;
    if (close(fd) != 0 && !err) err = errno;
    if (err) return moe_set_error(MOE_ERR_IO, "cannot flush %s: %s", path, strerror(err));
    return MOE_OK;
}

moe_status moe_write_atomic(const char *path, const void *const *parts, const size_t *sizes,
                            int n_parts) {
    char tmp[4200];
    if (snprintf(tmp, sizeof tmp, "%s.tmp", path) >= (int)sizeof tmp)
        return moe_set_error(MOE_ERR_IO, "path too long: %s", path);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) return moe_set_error(MOE_ERR_IO, "cannot create %s: %s", tmp, strerror(errno));
    moe_status st = MOE_OK;
    for (int i = 0; i < n_parts && st == MOE_OK; i++) st = write_all(fd, parts[i], sizes[i], tmp);
    if (st != MOE_OK) close(fd);
    else st = sync_close(fd, tmp);
    if (st != MOE_OK) {
        unlink(tmp);
        return st;
    }
    if (rename(tmp, path) != 0) {
        st = moe_set_error(MOE_ERR_IO, "cannot rename %s to %s: %s", tmp, path, strerror(errno));
        unlink(tmp);
        return st;
    }
    return sync_dir_of(path); /* make the rename itself durable */
}

moe_status moe_mkdirs(const char *path) {
    char buf[4096];
    if (!path[0]) return moe_set_error(MOE_ERR_INVALID, "empty directory name"); /* no buf[1] */
    if (snprintf(buf, sizeof buf, "%s", path) >= (int)sizeof buf)
        return moe_set_error(MOE_ERR_IO, "path too long: %s", path);
    for (char *p = buf + 1;; p++) {
        if (*p != '/' && *p) continue;
        char c = *p;
        *p = '\0';
        if (mkdir(buf, 0755) != 0 && errno != EEXIST)
            return moe_set_error(MOE_ERR_IO, "cannot create %s: %s", buf, strerror(errno));
        *p = c;
        if (!c) break;
    }
    struct stat sb;
    if (stat(path, &sb) != 0 || !S_ISDIR(sb.st_mode))
        return moe_set_error(MOE_ERR_IO, "%s is not a directory", path);
    return MOE_OK;
}

/* ---------------------------------------------------------------- prepare */

/* One split as prepare writes it, streamed to its .next file: the header's 64 bytes first as
 * a placeholder (written last, when the counts are known), then the tokens in the file's width
 * through a buffer; the document table is kept until the tokens are all written. Memory: the
 * buffer and 16 bytes a document, whatever the number of tokens. */
#define SPLIT_BUF (1 << 20) /* bytes gathered before each write */

typedef struct {
    char path[4112];    /* DIR/train.bin.next or DIR/val.bin.next */
    int fd;             /* -1: not open */
    int dtype;          /* bytes per token: MOE_TOKENS_U16 or MOE_TOKENS_U32 */
    unsigned char *buf; /* [SPLIT_BUF] bytes not yet written */
    size_t used;
    int64_t n;          /* tokens so far */
    uint64_t *doc;      /* [2 * n_docs] pairs (first token, source) */
    int64_t n_docs, cap_docs;
} split_out;

static int grow(void **p, int64_t *cap, int64_t need, size_t elem) {
    if (need <= *cap) return 0;
    int64_t c = *cap ? *cap : 1024;
    while (c < need) c *= 2;
    void *q = realloc(*p, (size_t)c * elem);
    if (!q) return -1;
    *p = q;
    *cap = c;
    return 0;
}

/* Creates s->path (replacing a stale one) with the header's place in the buffer. */
static moe_status split_open(split_out *s, int dtype) {
    s->dtype = dtype;
    s->buf = malloc(SPLIT_BUF);
    if (!s->buf) return moe_set_error(MOE_ERR_NOMEM, "out of memory preparing the corpus");
    memset(s->buf, 0, 64);
    s->used = 64;
    s->fd = open(s->path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (s->fd < 0)
        return moe_set_error(MOE_ERR_IO, "cannot create %s: %s", s->path, strerror(errno));
    return MOE_OK;
}

static moe_status split_flush(split_out *s) {
    moe_status st = write_all(s->fd, s->buf, s->used, s->path);
    s->used = 0;
    return st;
}

/* Appends n bytes (the document table, the source names) after what is written. */
static moe_status split_write(split_out *s, const void *p, size_t n) {
    const unsigned char *c = p;
    while (n > 0) {
        if (s->used == SPLIT_BUF) MOE_TRY(split_flush(s));
        size_t k = n < SPLIT_BUF - s->used ? n : SPLIT_BUF - s->used;
        memcpy(s->buf + s->used, c, k);
        s->used += k;
        c += k;
        n -= k;
    }
    return MOE_OK;
}

static inline moe_status split_token(split_out *s, uint32_t id) {
    if (s->used + sizeof id > SPLIT_BUF) MOE_TRY(split_flush(s));
    if (s->dtype == MOE_TOKENS_U16) {
        uint16_t narrow = (uint16_t)id;
        memcpy(s->buf + s->used, &narrow, 2);
    } else {
        memcpy(s->buf + s->used, &id, 4);
    }
    s->used += (size_t)s->dtype;
    s->n++;
    return MOE_OK;
}

static moe_status add_doc(split_out *s, const char *text, size_t len, uint32_t source,
                          const moe_prepare_vocab *v) {
    int32_t *ids = NULL;
    int n = 0;
    if (v) MOE_TRY(moe_tokenizer_encode(v->tokenizer, text, len, 0, &ids, &n));
    moe_status st = MOE_OK;
    for (int i = 0; i < n && st == MOE_OK; i++)
        if (ids[i] >= v->vocab)
            st = moe_set_error(MOE_ERR_INVALID, "the tokenizer gave id %d, beyond the model's "
                               "vocabulary of %d", ids[i], v->vocab);
    if (st == MOE_OK && grow((void **)&s->doc, &s->cap_docs, 2 * (s->n_docs + 1), sizeof(uint64_t)))
        st = moe_set_error(MOE_ERR_NOMEM, "out of memory preparing the corpus");
    if (st == MOE_OK) {
        s->doc[2 * s->n_docs] = (uint64_t)s->n;
        s->doc[2 * s->n_docs + 1] = source;
        s->n_docs++;
    }
    size_t count = v ? (size_t)n : len;
    for (size_t i = 0; i < count && st == MOE_OK; i++)
        st = split_token(s, v ? (uint32_t)ids[i] : (unsigned char)text[i]);
    if (st == MOE_OK) st = split_token(s, v ? (uint32_t)v->eot : MOE_BYTE_EOT);
    free(ids);
    return st;
}

int moe_file_exists(const char *dir, const char *name) {
    char path[4400];
    struct stat sb;
    snprintf(path, sizeof path, "%s/%s", dir, name);
    return stat(path, &sb) == 0;
}

moe_status moe_read_file(const char *path, char **out, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return moe_set_error(MOE_ERR_IO, "cannot open %s: %s", path, strerror(errno));
    char *buf = NULL;
    size_t n = 0, cap = 0;
    for (;;) {
        if (n == cap) {
            cap = cap ? 2 * cap : 65536;
            char *q = realloc(buf, cap);
            if (!q) {
                free(buf);
                fclose(f);
                return moe_set_error(MOE_ERR_NOMEM, "out of memory reading %s", path);
            }
            buf = q;
        }
        size_t r = fread(buf + n, 1, cap - n, f);
        n += r;
        if (r == 0) break;
    }
    int bad = ferror(f), err = errno; /* EISDIR for a directory */
    fclose(f);
    if (bad) {
        free(buf);
        return moe_set_error(MOE_ERR_IO, "cannot read %s: %s", path, strerror(err ? err : EIO));
    }
    *out = buf;
    *len = n;
    return MOE_OK;
}

/* Calls emit(doc) for each document of a text: fortune files are split at lines holding only
 * "%", other text at blank lines. Empty documents are skipped. */
typedef moe_status (*doc_fn)(const char *text, size_t len, void *ctx);

static int line_is(const char *s, size_t len, const char *what) {
    size_t n = strlen(what);
    if (len && s[len - 1] == '\r') len--;
    return len == n && !memcmp(s, what, n);
}

static int blank_line(const char *s, size_t len) {
    for (size_t i = 0; i < len; i++)
        if (s[i] != ' ' && s[i] != '\t' && s[i] != '\r') return 0;
    return 1;
}

static moe_status split_docs(const char *text, size_t len, doc_fn emit, void *ctx) {
    int fortune = 0;
    for (size_t i = 0; i < len && !fortune;) {
        size_t e = i;
        while (e < len && text[e] != '\n') e++;
        fortune = line_is(text + i, e - i, "%");
        i = e + 1;
    }
    size_t start = 0;
    for (size_t i = 0; i <= len;) {
        size_t e = i;
        while (e < len && text[e] != '\n') e++;
        int sep = i < len && (fortune ? line_is(text + i, e - i, "%") : blank_line(text + i, e - i));
        if (sep || i >= len) {
            size_t end = i < len ? i : len;
            /* a document is non-empty if it holds anything but whitespace */
            int empty = 1;
            for (size_t j = start; j < end && empty; j++)
                empty = text[j] == ' ' || text[j] == '\n' || text[j] == '\t' || text[j] == '\r';
            if (!empty) MOE_TRY(emit(text + start, end - start, ctx));
            start = e + 1;
        }
        if (i >= len) break;
        i = e < len ? e + 1 : len; /* a last line without '\n': its document is emitted next */
    }
    return MOE_OK;
}

typedef struct {
    split_out *train, *val;
    uint32_t source;
    int64_t n_docs; /* documents so far */
    double val_fraction;
    uint64_t seed;
    const moe_prepare_vocab *vocab;
} prep_ctx;

/* A uniform in [0, 1) from (seed, the document's bytes), so that copies of a document fall on
 * the same side of the train/validation split (docs/FORMATS.md §1): h = moe_rng_u64(seed,
 * stream(DATA, 1, 0, 0), len), then h = moe_rng_u64(h, w, k) for each little-endian 8-byte word
 * w of the text (k = 0, 1, ...; the last one zero-padded), and its top 53 bits. */
static double doc_uniform(uint64_t seed, const char *text, size_t len) {
    uint64_t h = moe_rng_u64(seed, moe_rng_stream(MOE_RNG_DATA, 1, 0, 0), (uint64_t)len);
    for (size_t i = 0; i < len; i += 8) {
        uint64_t w = 0;
        for (size_t j = 0; j < 8 && i + j < len; j++)
            w |= (uint64_t)(unsigned char)text[i + j] << (8 * j);
        h = moe_rng_u64(h, w, (uint64_t)(i / 8));
    }
    return (double)(h >> 11) * (1.0 / 9007199254740992.0);
}

static moe_status emit_doc(const char *text, size_t len, void *p) {
    prep_ctx *c = p;
    c->n_docs++;
    double u = doc_uniform(c->seed, text, len);
    return add_doc(u < c->val_fraction ? c->val : c->train, text, len, c->source, c->vocab);
}

/* Ends a split's file: the rest of the tokens, the document table and the source names
 * appended, the header written over its place, fsync, close. */
static moe_status split_finish(split_out *s, const char *const *files, int n_files,
                               uint32_t vocab, uint32_t eot) {
    MOE_TRY(split_write(s, s->doc, (size_t)s->n_docs * 16));
    uint32_t nf = (uint32_t)n_files;
    MOE_TRY(split_write(s, &nf, 4));
    for (int i = 0; i < n_files; i++) {
        uint32_t l = (uint32_t)strlen(files[i]);
        MOE_TRY(split_write(s, &l, 4));
        MOE_TRY(split_write(s, files[i], l));
    }
    MOE_TRY(split_flush(s));
    unsigned char hdr[64] = {0};
    uint32_t version = MOE_TOKENS_VERSION, dtype = (uint32_t)s->dtype;
    uint64_t n = (uint64_t)s->n, nd = (uint64_t)s->n_docs;
    memcpy(hdr, MOE_TOKENS_MAGIC, 8);
    memcpy(hdr + 8, &version, 4);
    memcpy(hdr + 12, &dtype, 4);
    memcpy(hdr + 16, &n, 8);
    memcpy(hdr + 24, &vocab, 4);
    memcpy(hdr + 28, &eot, 4);
    memcpy(hdr + 32, &nd, 8);
    if (lseek(s->fd, 0, SEEK_SET) != 0)
        return moe_set_error(MOE_ERR_IO, "cannot seek in %s: %s", s->path, strerror(errno));
    MOE_TRY(write_all(s->fd, hdr, 64, s->path));
    int fd = s->fd;
    s->fd = -1;
    return sync_close(fd, s->path);
}

static void split_free(split_out *s) {
    if (s->fd >= 0) close(s->fd);
    s->fd = -1;
    free(s->buf);
    free(s->doc);
}

moe_status moe_prepare(const char *const *files, int n_files, const char *out_dir,
                       double val_fraction, uint64_t seed, const moe_prepare_vocab *v,
                       moe_prepare_stats *stats) {
    if (n_files < 1) return moe_set_error(MOE_ERR_INVALID, "no input files");
    if (v && v->vocab == MOE_BYTE_VOCAB && v->eot != MOE_BYTE_EOT) /* what the loader refuses */
        return moe_set_error(MOE_ERR_INVALID, "a vocabulary of 257 is read as bytes, "
                             "whose end-of-text id is 256, not %d", v->eot);
    if (!(val_fraction >= 0 && val_fraction < 1))
        return moe_set_error(MOE_ERR_INVALID, "val fraction must be in [0, 1) (got %g)",
                             val_fraction);
    MOE_TRY(moe_mkdirs(out_dir));
    uint32_t vocab = v ? (uint32_t)v->vocab : MOE_BYTE_VOCAB,
             eot = v ? (uint32_t)v->eot : MOE_BYTE_EOT;
    /* both splits streamed in full beside the old pair (.next), then renamed: a failure (a
     * full disk, a bad input file) leaves the previous train.bin and val.bin as they were,
     * never a mixed pair */
    char path[2][4096], old[4112];
    split_out split[2] = {{.fd = -1}, {.fd = -1}};
    moe_status st = MOE_OK;
    for (int i = 0; i < 2; i++) {
        if (snprintf(path[i], sizeof path[i], "%s/%s.bin", out_dir, i ? "val" : "train") >=
                (int)sizeof path[i] ||
            snprintf(split[i].path, sizeof split[i].path, "%s.next", path[i]) >=
                (int)sizeof split[i].path) {
            split[i].path[0] = '\0'; /* nothing to remove */
            if (st == MOE_OK) st = moe_set_error(MOE_ERR_IO, "path too long: %s", out_dir);
        }
    }
    /* an input that is one of the files written here would be read as text (train.bin and
     * val.bin of an earlier prepare into the same directory) or truncated before it is read
     * (a stale .next of an interrupted run) */
    const char *own[4] = {path[0], path[1], split[0].path, split[1].path};
    struct stat out[4], in;
    int exists[4];
    for (int j = 0; j < 4; j++) exists[j] = st == MOE_OK && stat(own[j], &out[j]) == 0;
    for (int i = 0; i < n_files && st == MOE_OK; i++) {
        if (stat(files[i], &in) != 0) continue; /* reading it says what is wrong */
        for (int j = 0; j < 4 && st == MOE_OK; j++)
            if (exists[j] && in.st_dev == out[j].st_dev && in.st_ino == out[j].st_ino) {
                st = moe_set_error(MOE_ERR_INVALID, "input %s is %s, which this prepare writes: "
                                   "leave it out%s", files[i], own[j],
                                   j >= 2 ? " (an interrupted run left it: remove it)" : "");
                split[0].path[0] = split[1].path[0] = '\0'; /* not ours to remove */
            }
    }
    for (int i = 0; i < 2 && st == MOE_OK; i++)
        st = split_open(&split[i], vocab > 65536 ? MOE_TOKENS_U32 : MOE_TOKENS_U16);
    prep_ctx ctx = {&split[0], &split[1], 0, 0, val_fraction, seed, v};
    for (int i = 0; i < n_files && st == MOE_OK; i++) {
        char *text;
        size_t len;
        if ((st = moe_read_file(files[i], &text, &len)) != MOE_OK) break;
        size_t bad = v ? moe_tokenizer_utf8_bad(text, len) : len; /* the tokenizer reads UTF-8 */
        if (bad < len) {
            free(text);
            st = moe_set_error(MOE_ERR_FORMAT, "%s is not UTF-8 (byte %zu)", files[i], bad);
            break;
        }
        ctx.source = (uint32_t)i;
        st = split_docs(text, len, emit_doc, &ctx);
        free(text);
    }
    if (st == MOE_OK && (split[0].n == 0 || (val_fraction > 0 && split[1].n == 0)))
        st = moe_set_error(MOE_ERR_INVALID, "the input holds too little text for a "
                           "train%s split (%lld documents)",
                           val_fraction > 0 ? " and a validation" : "", (long long)ctx.n_docs);
    for (int i = 0; i < 2 && st == MOE_OK; i++)
        st = split_finish(&split[i], files, n_files, vocab, eot);
    /* the old train.bin is kept (a hard link: train.bin stays in place) until val.bin is
     * renamed too, so that a failed second rename can put it back */
    snprintf(old, sizeof old, "%s.old", path[0]);
    int kept = 0;
    if (st == MOE_OK) {
        unlink(old); /* a stale one from an interrupted prepare */
        kept = link(path[0], old) == 0;
        if (!kept && errno != ENOENT)
            st = moe_set_error(MOE_ERR_IO, "cannot keep %s as %s while replacing it: %s", path[0],
                               old, strerror(errno));
    }
    if (st == MOE_OK && rename(split[0].path, path[0]) != 0)
        st = moe_set_error(MOE_ERR_IO, "cannot rename %s to %s: %s", split[0].path, path[0],
                           strerror(errno));
    else if (st == MOE_OK && rename(split[1].path, path[1]) != 0) {
        int e = errno; /* the new train.bin goes: the old one back, or none as before */
        if (kept ? rename(old, path[0]) == 0 : unlink(path[0]) == 0)
            st = moe_set_error(MOE_ERR_IO, "cannot rename %s to %s: %s", split[1].path, path[1],
                               strerror(e));
        else /* the old train.bin stays as .old */
            st = moe_set_error(MOE_ERR_IO, "cannot rename %s to %s (%s) nor put the previous %s "
                               "back (%s): prepare again", split[1].path, path[1], strerror(e),
                               path[0], strerror(errno));
        kept = 0;
    }
    if (kept) unlink(old);
    char dir[4200]; /* the renames made durable; after a failure, as far as they went */
    int err = sync_dir_errno(path[0], dir, sizeof dir);
    if (st == MOE_OK && err) /* the new pair is in place */
        st = moe_set_error(MOE_ERR_IO, "%s and %s are written, but their directory %s cannot be "
                           "synced (%s): they may not survive a crash", path[0], path[1], dir,
                           strerror(err));
    for (int i = 0; i < 2 && st != MOE_OK; i++) unlink(split[i].path); /* closed or not */
    if (st == MOE_OK && stats) {
        stats->train_tokens = split[0].n;
        stats->val_tokens = split[1].n;
        stats->train_docs = split[0].n_docs;
        stats->val_docs = split[1].n_docs;
        stats->n_files = n_files;
    }
    for (int i = 0; i < 2; i++) split_free(&split[i]);
    return st;
}

/* ------------------------------------------------------------------- load */

void moe_tokens_free(moe_tokens *t) {
    if (t->map) munmap(t->map, t->map_len);
    free(t->doc_start);
    free(t->doc_source);
    for (int i = 0; i < t->n_sources; i++) free(t->sources[i]);
    free(t->sources);
    memset(t, 0, sizeof *t);
}

/* The whole file mapped read-only: *len bytes at *out (a file under 64 bytes, which no token
 * file is, is refused before mapping: an empty file cannot be mapped). */
static moe_status map_token_file(const char *path, void **out, size_t *len) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) return moe_set_error(MOE_ERR_IO, "cannot open %s: %s", path, strerror(errno));
    struct stat sb;
    moe_status st = MOE_OK;
    if (fstat(fd, &sb) != 0)
        st = moe_set_error(MOE_ERR_IO, "cannot read %s: %s", path, strerror(errno));
    else if (!S_ISREG(sb.st_mode))
        st = moe_set_error(MOE_ERR_IO, "%s is not a regular file", path);
    else if (sb.st_size < 64)
        st = moe_set_error(MOE_ERR_FORMAT, "%s is not a token file (no %s header); make one "
                           "with moe prepare", path, MOE_TOKENS_MAGIC);
    else if ((uint64_t)sb.st_size > SIZE_MAX)
        st = moe_set_error(MOE_ERR_IO, "%s is too large to map", path);
    if (st == MOE_OK) {
        void *m = mmap(NULL, (size_t)sb.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
        if (m == MAP_FAILED)
            st = moe_set_error(MOE_ERR_IO, "cannot map %s: %s", path, strerror(errno));
        else
            *out = m, *len = (size_t)sb.st_size;
    }
    close(fd); /* the mapping stays */
    return st;
}

moe_status moe_tokens_load(const char *path, moe_tokens *out) {
    memset(out, 0, sizeof *out);
    void *map = NULL;
    size_t size = 0;
    MOE_TRY(map_token_file(path, &map, &size));
    out->map = map;
    out->map_len = size;
    const unsigned char *buf = map;
    moe_status status = MOE_OK;
    uint32_t version, dtype, vocab, eot, n_src;
    uint64_t n, nd;
    if (memcmp(buf, MOE_TOKENS_MAGIC, 8))
        MOE_FAIL_FORMAT("%s is not a token file (no %s header); make one with moe prepare", path,
            MOE_TOKENS_MAGIC);
    memcpy(&version, buf + 8, 4);
    memcpy(&dtype, buf + 12, 4);
    memcpy(&n, buf + 16, 8);
    memcpy(&vocab, buf + 24, 4);
    memcpy(&eot, buf + 28, 4);
    memcpy(&nd, buf + 32, 8);
    if (version != MOE_TOKENS_VERSION) MOE_FAIL_FORMAT("%s: unsupported version %u", path, version);
    if (dtype != MOE_TOKENS_U16 && dtype != MOE_TOKENS_U32)
        MOE_FAIL_FORMAT("%s: unsupported token type %u", path, dtype);
    if (vocab < 2 || vocab > (dtype == MOE_TOKENS_U16 ? 65536u : 1u << 24) || eot >= vocab)
        MOE_FAIL_FORMAT("%s: bad vocabulary size %u / end-of-text id %u", path, vocab, eot);
    if (vocab == MOE_BYTE_VOCAB && eot != MOE_BYTE_EOT) /* 257 means bytes to train and eval */
        MOE_FAIL_FORMAT("%s: end-of-text id %u with the byte vocabulary (257), not %d", path, eot,
                        MOE_BYTE_EOT);
    for (int i = 40; i < 64; i++)
        if (buf[i]) MOE_FAIL_FORMAT("%s: reserved header byte %d is not zero", path, i);
    if (n > 0 && nd == 0) MOE_FAIL_FORMAT("%s: %llu tokens in no document", path,
                                          (unsigned long long)n);
    size_t left = size - 64;
    if (n > left / dtype) MOE_FAIL_FORMAT("%s: truncated: %llu tokens announced, room for %zu",
                                          path, (unsigned long long)n, left / dtype);
    left -= (size_t)n * dtype;
    if (nd > left / 16) MOE_FAIL_FORMAT("%s: truncated document table", path);
    left -= (size_t)nd * 16;
    if (left < 4) MOE_FAIL_FORMAT("%s: truncated source table", path);
    const unsigned char *p = buf + 64 + n * dtype + nd * 16;
    memcpy(&n_src, p, 4);
    p += 4;
    left -= 4;
    if (n_src > left / 4) MOE_FAIL_FORMAT("%s: bad source count %u", path, n_src);
    out->ids = buf + 64; /* page-aligned mapping + 64: aligned for uint16 and uint32 */
    out->id_bytes = (int)dtype;
    out->n_tokens = (int64_t)n;
    out->vocab = (int)vocab;
    out->eot = (int)eot;
    out->n_docs = (int64_t)nd;
    out->doc_start = malloc((size_t)(nd ? nd : 1) * 8);
    out->doc_source = malloc((size_t)(nd ? nd : 1) * 4);
    out->sources = calloc(n_src ? n_src : 1, sizeof(char *));
    if (!out->doc_start || !out->doc_source || !out->sources) {
        status = moe_set_error(MOE_ERR_NOMEM, "out of memory loading %s", path);
        goto done;
    }
    for (uint64_t i = 0; i < n; i++) {
        uint32_t id = moe_tokens_at(out, (int64_t)i);
        if (id >= vocab)
            MOE_FAIL_FORMAT("%s: token %u at %llu is outside the vocabulary (%u)", path, id,
                (unsigned long long)i, vocab);
    }
    for (uint64_t i = 0; i < nd; i++) {
        uint64_t pair[2];
        memcpy(pair, buf + 64 + n * dtype + i * 16, 16);
        if (pair[0] >= n || (i ? pair[0] <= out->doc_start[i - 1] : pair[0] != 0) ||
            pair[1] >= n_src)
            MOE_FAIL_FORMAT("%s: bad document table entry %llu", path, (unsigned long long)i);
        out->doc_start[i] = pair[0];
        out->doc_source[i] = (uint32_t)pair[1];
        /* each document ends with the end-of-text id (its last token before the next one) */
        if (i && moe_tokens_at(out, (int64_t)pair[0] - 1) != eot)
            MOE_FAIL_FORMAT("%s: document %llu does not end with the end-of-text id %u", path,
                            (unsigned long long)i - 1, eot);
    }
    if (n && moe_tokens_at(out, (int64_t)n - 1) != eot)
        MOE_FAIL_FORMAT("%s: document %llu does not end with the end-of-text id %u", path,
                        (unsigned long long)nd - 1, eot);
    for (uint32_t i = 0; i < n_src; i++) {
        uint32_t l;
        if (left < 4) MOE_FAIL_FORMAT("%s: truncated source table", path);
        memcpy(&l, p, 4);
        p += 4;
        left -= 4;
        if (l > left) MOE_FAIL_FORMAT("%s: truncated source name", path);
        out->sources[i] = malloc(l + 1);
        if (!out->sources[i]) {
            status = moe_set_error(MOE_ERR_NOMEM, "out of memory loading %s", path);
            goto done;
        }
        memcpy(out->sources[i], p, l);
        out->sources[i][l] = '\0';
        out->n_sources = (int)i + 1;
        p += l;
        left -= l;
    }
    if (left != 0) MOE_FAIL_FORMAT("%s: %zu unexpected bytes at the end", path, left);
done:
    if (status != MOE_OK) moe_tokens_free(out); /* the mapping too */
    return status;
}

moe_status moe_tokens_check_pair(const char *train_path, const moe_tokens *train,
                                 const char *val_path, const moe_tokens *val) {
    if (train->vocab != val->vocab || train->eot != val->eot)
        return moe_set_error(MOE_ERR_FORMAT, "%s and %s are not a pair: vocabulary %d and %d, "
                             "end-of-text id %d and %d (prepare them together)", train_path,
                             val_path, train->vocab, val->vocab, train->eot, val->eot);
    return MOE_OK;
}

/* A row: the window of t drawn from (seed, stream, row), tokens and targets S each. */
static void batch_row(const moe_tokens *t, uint64_t row, int S, uint64_t seed, uint64_t stream,
                      int32_t *tokens, int32_t *targets) {
    MOE_ASSERT(t->n_tokens > S);
    uint64_t start = moe_rng_u64(seed, stream, row) % (uint64_t)(t->n_tokens - S);
    for (int s = 0; s < S; s++) {
        tokens[s] = (int32_t)moe_tokens_at(t, (int64_t)(start + s));
        targets[s] = (int32_t)moe_tokens_at(t, (int64_t)(start + s + 1));
    }
}

void moe_tokens_batch(const moe_tokens *t, int B, int S, uint64_t seed, uint64_t stream,
                      int32_t *tokens, int32_t *targets) {
    for (int b = 0; b < B; b++)
        batch_row(t, (uint64_t)b, S, seed, stream, tokens + (size_t)b * S, targets + (size_t)b * S);
}

/* A row's set: drawn at index 2^40 + row of the same stream (past any row's window). */
void moe_blend_batch(const moe_blend *bl, int64_t row0, int B, int S, uint64_t seed,
                     uint64_t stream, int32_t *tokens, int32_t *targets) {
    for (int b = 0; b < B; b++) {
        uint64_t row = (uint64_t)row0 + (uint64_t)b;
        int i = 0;
        if (bl->n > 1) {
            double u = moe_rng_uniform64(seed, stream, (1ULL << 40) + row), c = 0;
            for (; i < bl->n - 1 && u >= (c += bl->weight[i]); i++) {}
        }
        batch_row(bl->sets[i], row, S, seed, stream, tokens + (size_t)b * S,
                  targets + (size_t)b * S);
    }
}

moe_status moe_data_spec(const char *spec, char *buf, size_t cap, char **dirs, double *weight,
                         int *n, int *pairs) {
    *n = 0;
    if (pairs) *pairs = 0;
    if (strlen(spec) >= cap) return moe_set_error(MOE_ERR_INVALID, "data-path is too long");
    memcpy(buf, spec, strlen(spec) + 1);
    struct stat sb;
    if (!strpbrk(spec, " \t") || stat(spec, &sb) == 0) { /* a path, with spaces too */
        dirs[0] = buf, weight[0] = 1, *n = 1;
        return MOE_OK;
    }
    if (pairs) *pairs = 1;
    double sum = 0;
    char *save = NULL, *w;
    for (char *tok = strtok_r(buf, " \t", &save); tok; tok = strtok_r(NULL, " \t", &save)) {
        char *end;
        double v = strtod(tok, &end);
        if (*end || !isfinite(v) || v <= 0)
            return moe_set_error(MOE_ERR_INVALID, "data-path '%s': '%s' is not a positive "
                                 "weight (a blend is W1 DIR1 W2 DIR2 ...; no directory '%s')",
                                 spec, tok, spec);
        if (!(w = strtok_r(NULL, " \t", &save)))
            return moe_set_error(MOE_ERR_INVALID, "data-path '%s': the weight %s has no "
                                 "directory after it", spec, tok);
        if (*n == MOE_BLEND_MAX)
            return moe_set_error(MOE_ERR_INVALID, "data-path '%s': more than %d datasets", spec,
                                 MOE_BLEND_MAX);
        dirs[*n] = w, weight[*n] = v, sum += v, ++*n;
    }
    if (!*n) return moe_set_error(MOE_ERR_INVALID, "data-path '%s' names no directory", spec);
    for (int i = 0; i < *n; i++) weight[i] /= sum;
    return MOE_OK;
}
