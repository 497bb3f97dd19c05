/* Topic routing (which experts each source file of the corpus uses) and moe report: one
 * self-contained HTML page with SVG charts of a run. */
#define _POSIX_C_SOURCE 200809L
#include "tools/cli.h"

#include "core/core.h"
#include "io/data.h"
#include "io/tokenizer.h"

#include <cJSON.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------ topics.json */

/* s with every byte that does not start valid UTF-8 replaced by U+FFFD (a file or directory
 * name is bytes, a Latin-1 one among them); NULL when out of memory. */
static char *valid_utf8(const char *s) {
    size_t n = strlen(s), o = 0;
    char *u = malloc(3 * n + 1);
    for (size_t i = 0; u && i < n;) {
        size_t ok = moe_tokenizer_utf8_bad(s + i, n - i);
        memcpy(u + o, s + i, ok);
        o += ok, i += ok;
        if (i < n) memcpy(u + o, "\xEF\xBF\xBD", 3), o += 3, i++;
    }
    if (u) u[o] = '\0';
    return u;
}

/* A file written whole or not at all: its text goes to memory, then to disk in one atomic
 * write (moe_write_atomic: a full disk or a read-only directory leaves what was there). */
typedef struct {
    FILE *f;
    char *buf;
    size_t len;
} text_file;

static moe_status text_open(text_file *t) {
    t->buf = NULL, t->len = 0;
    t->f = open_memstream(&t->buf, &t->len);
    return t->f ? MOE_OK : moe_set_error(MOE_ERR_NOMEM, "out of memory");
}

/* Closes the text and writes it to path (ok 0: only frees it). */
static moe_status text_commit(text_file *t, const char *path, int ok) {
    int bad = ferror(t->f); /* a write into memory that failed (no memory): a cut text */
    moe_status s = fclose(t->f) != 0 || bad ? moe_set_error(MOE_ERR_NOMEM, "out of memory")
                                            : MOE_OK;
    const void *part = t->buf;
    if (s == MOE_OK && ok) s = moe_write_atomic(path, &part, &t->len, 1);
    free(t->buf);
    return s;
}

moe_status moe_cli_topics(moe_model *m, const moe_blend *data, int batch, const char *path) {
    const moe_model_config *c = moe_model_get_config(m);
    int S = c->seq_len, L = c->n_layers, tot_e = 0, n_topics = 0;
    int64_t most = 0; /* the topics: each set's sources, set after set */
    for (int i = 0; i < data->n; i++) {
        n_topics += data->sets[i]->n_sources;
        most = data->sets[i]->n_tokens > most ? data->sets[i]->n_tokens : most;
    }
    int *off = malloc(sizeof(int) * (size_t)(L + 1));
    for (int l = 0; off && l < L; l++) {
        off[l] = tot_e;
        tot_e += moe_model_layer_experts(c, l);
    }
    if (off) off[L] = tot_e;
    int64_t *counts = calloc((size_t)n_topics * (size_t)(tot_e ? tot_e : 1), sizeof(int64_t));
    int64_t *ntok = calloc((size_t)n_topics + 1, sizeof(int64_t));
    int32_t *tok = malloc(sizeof(int32_t) * (size_t)batch * S);
    int32_t *buf = malloc(sizeof(int32_t) * (size_t)(most + 1));
    moe_status st = MOE_OK;
    if (!off || !counts || !ntok || !tok || !buf) {
        st = moe_set_error(MOE_ERR_NOMEM, "out of memory for topic routing");
        goto done;
    }
    moe_model_args args = moe_model_args_default();
    args.training = 0;
    for (int i = 0, t = 0; i < data->n && st == MOE_OK; i++) {
        const moe_tokens *set = data->sets[i];
        for (int s = 0; s < set->n_sources && st == MOE_OK; s++, t++) {
            int64_t n = 0; /* the source's documents, concatenated */
            for (int64_t d = 0; d < set->n_docs; d++) {
                if ((int)set->doc_source[d] != s) continue;
                int64_t end = d + 1 < set->n_docs ? (int64_t)set->doc_start[d + 1] : set->n_tokens;
                for (int64_t k = (int64_t)set->doc_start[d]; k < end; k++)
                    buf[n++] = (int32_t)moe_tokens_at(set, k);
            }
            for (int64_t w = 0; w + S <= n && st == MOE_OK; w += (int64_t)batch * S) {
                int b = (int)((n - w) / S < batch ? (n - w) / S : batch);
                memcpy(tok, buf + w, sizeof(int32_t) * (size_t)b * S);
                st = moe_model_forward(m, tok, NULL, b, S, &args, NULL);
                for (int l = 0; l < L && st == MOE_OK; l++) {
                    moe_layer *ml = moe_model_moe_layer(m, l);
                    if (!ml) continue;
                    const moe_layer_stats *ls = moe_layer_get_stats(ml);
                    for (int e = 0; e < ls->n_experts; e++)
                        counts[(size_t)t * tot_e + off[l] + e] += ls->counts[e];
                }
                ntok[t] += (int64_t)b * S;
            }
        }
    }
    if (st != MOE_OK) goto done;
    text_file out;
    if ((st = text_open(&out)) != MOE_OK) goto done;
    FILE *f = out.f;
    fprintf(f, "{\"topics\":[");
    for (int i = 0, t = 0, first = 1; i < data->n; i++)
        for (int s = 0; s < data->sets[i]->n_sources; s++, t++) {
            if (!ntok[t]) continue;
            const char *src = data->sets[i]->sources[s], *name = strrchr(src, '/');
            /* a file name is bytes: topics.json stays JSON, and the report's page the UTF-8 it
             * declares */
            char *utf8 = valid_utf8(name ? name + 1 : src);
            if (!utf8) {
                text_commit(&out, path, 0);
                st = moe_set_error(MOE_ERR_NOMEM, "out of memory for topic routing");
                goto done;
            }
            cJSON *js = cJSON_CreateString(utf8);
            free(utf8);
            char *quoted = js ? cJSON_PrintUnformatted(js) : NULL;
            fprintf(f, "%s{\"name\":%s,\"tokens\":%lld,\"layers\":[", first ? "" : ",",
                    quoted ? quoted : "\"?\"", (long long)ntok[t]);
            cJSON_free(quoted);
            cJSON_Delete(js);
            for (int l = 0, fl = 1; l < L; l++) {
                if (off[l + 1] == off[l]) continue;
                fprintf(f, "%s{\"layer\":%d,\"counts\":[", fl ? "" : ",", l);
                for (int e = 0; e < off[l + 1] - off[l]; e++)
                    fprintf(f, "%s%lld", e ? "," : "",
                            (long long)counts[(size_t)t * tot_e + off[l] + e]);
                fprintf(f, "]}");
                fl = 0;
            }
            fprintf(f, "]}");
            first = 0;
        }
    fprintf(f, "]}\n");
    st = text_commit(&out, path, 1);
done:
    free(off);
    free(counts);
    free(ntok);
    free(tok);
    free(buf);
    return st;
}

/* ----------------------------------------------------------------- report */

/* The heatmaps' bounds: at most this many columns (consecutive steps averaged) and cells per
 * layer (experts averaged in groups): a run of many steps, layers and experts stays a page. */
enum { MAX_COLS = 200, MAX_CELLS = 20000 };

typedef struct {
    int n;                                     /* records */
    double *step, *loss, *nll, *aux, *z, *val; /* [n]; val: NAN where absent */
    int n_layers, cap_layers;                  /* the MoE layers of any record, by id */
    int *layer_id, *n_experts;                 /* the most experts any record gives the layer */
    int cols;                                  /* heatmap columns: MAX_COLS at most */
    double **load; /* [layer][col * E + e]: the expert's share of the layer's slots, summed over
                    * the column's records */
    int *col_steps; /* [cols] the column's records of steps that were not skipped */
} series;

/* The per-record fields of the series, in the order of their keys in metrics.jsonl. */
static const char *const series_keys[] = {"step", "loss", "nll", "aux", "z", "val_nll"};
static void series_columns(series *s, double **field[6]) {
    field[0] = &s->step, field[1] = &s->loss, field[2] = &s->nll, field[3] = &s->aux,
    field[4] = &s->z, field[5] = &s->val;
}

/* The index of MoE layer `id` in the series (sorted by id), or where it would go. */
static int layer_index(const series *s, int id) {
    int lo = 0, hi = s->n_layers;
    while (lo < hi) {
        int mid = (lo + hi) / 2;
        if (s->layer_id[mid] < id) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

/* First pass: counts the record and notes its layers and their experts. */
static int scan(series *s, const cJSON *rec) {
    const cJSON *layers = cJSON_GetObjectItemCaseSensitive(rec, "expert_load");
    for (const cJSON *ly = layers ? layers->child : NULL; ly; ly = ly->next) {
        int id = cJSON_GetObjectItemCaseSensitive(ly, "layer")->valueint;
        int E = cJSON_GetArraySize(cJSON_GetObjectItemCaseSensitive(ly, "counts"));
        int li = layer_index(s, id);
        if (li == s->n_layers || s->layer_id[li] != id) {
            if (s->n_layers == s->cap_layers) {
                int cap = s->cap_layers ? 2 * s->cap_layers : 16;
                int *ids = realloc(s->layer_id, sizeof(int) * (size_t)cap);
                if (ids) s->layer_id = ids;
                int *ne = realloc(s->n_experts, sizeof(int) * (size_t)cap);
                if (ne) s->n_experts = ne;
                if (!ids || !ne) return -1;
                s->cap_layers = cap;
            }
            size_t after = sizeof(int) * (size_t)(s->n_layers - li);
            memmove(s->layer_id + li + 1, s->layer_id + li, after);
            memmove(s->n_experts + li + 1, s->n_experts + li, after);
            s->layer_id[li] = id;
            s->n_experts[li] = 0;
            s->n_layers++;
        }
        if (E > s->n_experts[li]) s->n_experts[li] = E;
    }
    s->n++;
    return 0;
}

/* Column of record i: records [c * n / cols, (c + 1) * n / cols) make column c. */
static int column_of(const series *s, int i) {
    int c = (int)((long long)i * s->cols / s->n);
    while ((long long)(c + 1) * s->n / s->cols <= i) c++;
    return c;
}

/* Second pass: record i into the series. A layer or expert that the record leaves out (a record
 * of fewer layers or experts than others, which a hand-edited or foreign file can hold) counts as
 * no tokens: share 0, drawn white, the same on every run (never memory left unset). */
static void push(series *s, const cJSON *rec, int i) {
    double **field[6];
    series_columns(s, field);
    for (int k = 0; k < 6; k++) {
        const cJSON *v = cJSON_GetObjectItemCaseSensitive(rec, series_keys[k]);
        (*field[k])[i] = cJSON_IsNumber(v) ? v->valuedouble : NAN;
    }
    int col = column_of(s, i);
    if (cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(rec, "skipped"))) return; /* no update */
    s->col_steps[col]++;
    const cJSON *layers = cJSON_GetObjectItemCaseSensitive(rec, "expert_load");
    for (const cJSON *ly = layers ? layers->child : NULL; ly; ly = ly->next) {
        int li = layer_index(s, cJSON_GetObjectItemCaseSensitive(ly, "layer")->valueint);
        int E = s->n_experts[li], e = 0;
        const cJSON *cnt = cJSON_GetObjectItemCaseSensitive(ly, "counts");
        double sum = 0, *row = s->load[li] + (size_t)col * E;
        for (const cJSON *c = cnt->child; c; c = c->next) sum += c->valuedouble;
        for (const cJSON *c = cnt->child; c && sum > 0; c = c->next, e++)
            row[e] += c->valuedouble / sum;
    }
}

/* A line chart: series y[k][i] over x[i] (NAN points skipped). */
static void line_chart(FILE *f, const char *title, const double *x, int n, const double *const *y,
                       const char *const *names, const char *const *colors, int k, int log_y) {
    const int W = 640, H = 260, l = 60, r = 130, t = 30, b = 40;
    double x0 = n ? x[0] : 0, x1 = n ? x[n - 1] : 1, y0 = INFINITY, y1 = -INFINITY;
    for (int j = 0; j < k; j++)
        for (int i = 0; i < n; i++)
            if (isfinite(y[j][i]) && (!log_y || y[j][i] > 0)) {
                double v = log_y ? log10(y[j][i]) : y[j][i];
                y0 = fmin(y0, v), y1 = fmax(y1, v);
            }
    if (y0 > y1) y0 = y1 = 0; /* no point to draw (a log axis: none above 0) */
    if (!(y1 > y0)) y0 -= 1, y1 += 1;
    if (!(x1 > x0)) x1 = x0 + 1;
    fprintf(f, "<figure><svg viewBox='0 0 %d %d' width='%d' height='%d'>", W, H, W, H);
    fprintf(f, "<text x='%d' y='18' class='t'>%s</text>", l, title);
    fprintf(f, "<rect x='%d' y='%d' width='%d' height='%d' class='frame'/>", l, t, W - l - r, H - t - b);
    for (int g = 0; g <= 4; g++) {
        double v = y0 + (y1 - y0) * g / 4;
        int py = H - b - (int)((H - t - b) * g / 4.0);
        fprintf(f, "<line x1='%d' x2='%d' y1='%d' y2='%d' class='grid'/>", l, W - r, py, py);
        fprintf(f, "<text x='%d' y='%d' class='ax' text-anchor='end'>%.3g</text>", l - 4, py + 4,
                log_y ? pow(10, v) : v);
    }
    fprintf(f, "<text x='%d' y='%d' class='ax'>%.0f</text><text x='%d' y='%d' class='ax' "
               "text-anchor='end'>step %.0f</text>", l, H - b + 16, x0, W - r, H - b + 16, x1);
    for (int j = 0; j < k; j++) {
        fprintf(f, "<polyline fill='none' stroke='%s' stroke-width='1.5' points='", colors[j]);
        for (int i = 0; i < n; i++) {
            if (!isfinite(y[j][i]) || (log_y && y[j][i] <= 0)) continue;
            double v = log_y ? log10(y[j][i]) : y[j][i];
            fprintf(f, "%.1f,%.1f ", l + (W - l - r) * (x[i] - x0) / (x1 - x0),
                    H - b - (H - t - b) * (v - y0) / (y1 - y0));
        }
        fprintf(f, "'/><text x='%d' y='%d' class='ax' fill='%s'>%s</text>", W - r + 8, t + 14 + 16 * j,
                colors[j], names[j]);
    }
    fprintf(f, "</svg></figure>\n");
}

static void heat_cell(FILE *f, double x, double y, double w, double h, double v) {
    /* white (0) to dark blue (1) */
    int c = (int)(255 * (1 - fmin(1, fmax(0, v))));
    fprintf(f, "<rect x='%.1f' y='%.1f' width='%.2f' height='%.2f' fill='rgb(%d,%d,255)'/>", x, y,
            w + 0.3, h + 0.3, c, c + (255 - c) / 3);
}

/* Expert load over time: x = step, y = expert; colour = share of the layer's slots,
 * relative to 2/E (twice the balanced share is full colour). Columns average consecutive steps
 * and rows groups of experts so that a layer draws MAX_CELLS cells at most. */
static void load_heatmap(FILE *f, const series *s, int li) {
    int E = s->n_experts[li], cols = s->cols, rows = E < MAX_CELLS / cols ? E : MAX_CELLS / cols;
    if (!E) return;
    const int W = 640, l = 60, t = 30, cell_h = rows > 32 ? 4 : 10, H = t + rows * cell_h + 30;
    fprintf(f, "<figure><svg viewBox='0 0 %d %d' width='%d' height='%d'>", W, H, W, H);
    fprintf(f, "<text x='%d' y='18' class='t'>layer %d: expert load over training</text>", l,
            s->layer_id[li]);
    double cw = (double)(W - l - 20) / cols;
    for (int c = 0; c < cols; c++) {
        int steps = s->col_steps[c] ? s->col_steps[c] : 1; /* skipped steps: no load */
        for (int r = 0; r < rows; r++) {
            int e0 = (int)((long long)r * E / rows), e1 = (int)((long long)(r + 1) * E / rows);
            double v = 0;
            for (int e = e0; e < e1; e++) v += s->load[li][(size_t)c * E + e];
            v /= (double)steps * (e1 - e0);
            heat_cell(f, l + cw * c, t + r * cell_h, cw, cell_h, v * E / 2);
        }
    }
    fprintf(f, "<text x='%d' y='%d' class='ax'>step %.0f</text><text x='%d' y='%d' class='ax' "
               "text-anchor='end'>step %.0f</text></svg><figcaption>Rows: experts 0..%d", l, H - 8,
            s->step[0], W - 20, H - 8, s->step[s->n - 1], E - 1);
    if (rows < E) fprintf(f, " in %d groups of about %.3g (their mean)", rows, (double)E / rows);
    if (cols < s->n)
        fprintf(f, "; columns: %d, each the mean of about %.3g steps", cols, (double)s->n / cols);
    fprintf(f, "; colour: the expert's share of the layer's routed tokens (full colour = twice the "
               "balanced share 1/%d; what a record leaves out counts as no tokens).</figcaption>"
               "</figure>\n", E);
}

/* Text into HTML: the characters that could start markup or end an attribute, as references;
 * bytes that are not UTF-8 (a run directory's Latin-1 name) as U+FFFD, since the page says
 * it is UTF-8. */
static void html_text(FILE *f, const char *s) {
    char *u = valid_utf8(s);
    for (const char *c = u ? u : "?"; *c; c++)
        if (*c == '<' || *c == '&' || *c == '\'' || *c == '"') fprintf(f, "&#%d;", *c);
        else fputc(*c, f);
    free(u);
}

/* An expert-load entry of metrics.jsonl or topics.json: {"layer": number, "counts": [numbers]}. */
static int layer_entry_ok(const cJSON *ly) {
    const cJSON *layer = cJSON_GetObjectItemCaseSensitive(ly, "layer");
    const cJSON *cnt = cJSON_GetObjectItemCaseSensitive(ly, "counts");
    if (!cJSON_IsNumber(layer) || !cJSON_IsArray(cnt)) return 0;
    for (const cJSON *c = cnt->child; c; c = c->next)
        if (!cJSON_IsNumber(c)) return 0;
    return 1;
}

/* topics.json's "topics": an array of objects whose "layers" are arrays of such entries. */
static int topics_ok(const cJSON *topics) {
    if (!cJSON_IsArray(topics)) return 0;
    for (const cJSON *tp = topics->child; tp; tp = tp->next) {
        const cJSON *ls = cJSON_GetObjectItemCaseSensitive(tp, "layers");
        if (!cJSON_IsArray(ls)) return 0;
        for (const cJSON *ly = ls->child; ly; ly = ly->next)
            if (!layer_entry_ok(ly)) return 0;
    }
    return 1;
}

/* Topics x experts of one layer (topics checked by topics_ok): share of each topic's slots per
 * expert. */
static void topic_heatmap(FILE *f, cJSON *topics, int layer) {
    int nt = cJSON_GetArraySize(topics), E = 0;
    for (cJSON *tp = topics->child; tp; tp = tp->next) {
        cJSON *ls = cJSON_GetObjectItemCaseSensitive(tp, "layers");
        for (cJSON *ly = ls ? ls->child : NULL; ly; ly = ly->next)
            if (cJSON_GetObjectItemCaseSensitive(ly, "layer")->valueint == layer)
                E = cJSON_GetArraySize(cJSON_GetObjectItemCaseSensitive(ly, "counts"));
    }
    if (!E || !nt) return;
    const int l = 130, t = 30, ch = 12, W = 640, H = t + nt * ch + 20;
    double cw = (double)(W - l - 20) / E;
    fprintf(f, "<figure><svg viewBox='0 0 %d %d' width='%d' height='%d'>", W, H, W, H);
    fprintf(f, "<text x='10' y='18' class='t'>layer %d: experts used by each topic</text>", layer);
    int row = 0;
    for (cJSON *tp = topics->child; tp; tp = tp->next, row++) {
        cJSON *name = cJSON_GetObjectItemCaseSensitive(tp, "name");
        fprintf(f, "<text x='%d' y='%d' class='ax' text-anchor='end'>", l - 4, t + row * ch + 10);
        html_text(f, cJSON_IsString(name) ? name->valuestring : "?");
        fprintf(f, "</text>");
        cJSON *ls = cJSON_GetObjectItemCaseSensitive(tp, "layers");
        for (cJSON *ly = ls ? ls->child : NULL; ly; ly = ly->next) {
            if (cJSON_GetObjectItemCaseSensitive(ly, "layer")->valueint != layer) continue;
            cJSON *cnt = cJSON_GetObjectItemCaseSensitive(ly, "counts");
            double sum = 0;
            for (cJSON *c = cnt->child; c; c = c->next) sum += c->valuedouble;
            int e = 0;
            for (cJSON *c = cnt->child; c; c = c->next, e++)
                heat_cell(f, l + cw * e, t + row * ch, cw, ch, sum > 0 ? c->valuedouble / sum * E / 2 : 0);
        }
    }
    fprintf(f, "</svg><figcaption>Rows: source files of the corpus; columns: experts 0..%d; "
               "colour: share of the topic's routed tokens (full colour = twice 1/%d).</figcaption>"
               "</figure>\n", E - 1, E);
}

/* The file's bytes, NUL-terminated; its length (NUL bytes inside included) into *len. */
static char *slurp(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    size_t n = 0, cap = 1 << 16;
    char *b = malloc(cap);
    for (size_t r; b && (r = fread(b + n, 1, cap - n - 1, f)) > 0;) {
        n += r;
        if (n + 1 == cap) {
            char *q = realloc(b, cap *= 2);
            if (!q) free(b);
            b = q;
        }
    }
    fclose(f);
    if (b) b[n] = '\0';
    if (len) *len = n;
    return b;
}

cJSON *moe_cli_metrics_record(const char *line, size_t n) {
    const char *end = NULL;
    cJSON *rec = NULL;
    /* a NUL (a crash's tail) would end cJSON's reading of a string: no record holds one */
    if (!memchr(line, '\0', n)) rec = cJSON_ParseWithLengthOpts(line, n, &end, 0);
    while (rec && end < line + n && strchr(" \t\r", *end)) end++;
    if (cJSON_IsObject(rec) && end == line + n) return rec;
    cJSON_Delete(rec);
    return NULL;
}

/* One line of metrics.jsonl as a checked record; NULL with *why when it is none. */
static cJSON *parse_record(const char *line, size_t n, const char **why) {
    cJSON *rec = moe_cli_metrics_record(line, n);
    if (!rec) {
        *why = "not a JSON object";
        return NULL;
    }
    cJSON *layers = cJSON_GetObjectItemCaseSensitive(rec, "expert_load");
    int ok = !layers || cJSON_IsArray(layers);
    for (cJSON *ly = layers ? layers->child : NULL; ly && ok; ly = ly->next)
        ok = layer_entry_ok(ly);
    if (!ok) {
        cJSON_Delete(rec);
        *why = "expert_load is not a list of {\"layer\": N, \"counts\": [...]}";
    }
    return ok ? rec : NULL;
}

/* The records of metrics.jsonl (len bytes; line numbers count blank lines too): pass 0 checks
 * them and notes the layers (scan), pass 1 fills the series (push). An unterminated last line
 * that is no record (a run stopped while writing it) is left out with a warning, and *len cut
 * before it; another line that is none is an error. */
static int read_records(const char *path, const char *text, size_t *len, series *s, int pass) {
    int lineno = 0, i = 0;
    for (const char *line = text; line < text + *len;) {
        const char *nl = memchr(line, '\n', (size_t)(text + *len - line)), *why = NULL;
        const char *end = nl ? nl : text + *len;
        lineno++;
        size_t blank = strspn(line, " \t\r");
        cJSON *rec = line + blank >= end ? NULL : parse_record(line, (size_t)(end - line), &why);
        if (why && !nl) {
            fprintf(stderr, "moe report: warning: %s:%d: left out an incomplete last line (a run "
                            "stopped while writing it)\n", path, lineno);
            *len = (size_t)(line - text);
            break;
        }
        if (why) {
            fprintf(stderr, "moe report: %s:%d: %s\n", path, lineno, why);
            return -1;
        }
        int rc = !rec ? 0 : pass ? (push(s, rec, i++), 0) : scan(s, rec);
        cJSON_Delete(rec);
        if (rc) {
            fprintf(stderr, "moe report: out of memory for %s\n", path);
            return -1;
        }
        line = nl ? nl + 1 : end;
    }
    return 0;
}

static void series_free(series *s) {
    double **field[6];
    series_columns(s, field);
    for (int i = 0; i < 6; i++) free(*field[i]);
    for (int l = 0; s->load && l < s->n_layers; l++) free(s->load[l]);
    free(s->load);
    free(s->col_steps);
    free(s->layer_id);
    free(s->n_experts);
}

int moe_cmd_report(int argc, char **argv) {
    if (argc != 1) {
        fprintf(stderr, "moe report: usage: moe report RUN_DIR (writes RUN_DIR/report.html)\n");
        return 2;
    }
    const char *run = argv[0];
    char path[4300];
    snprintf(path, sizeof path, "%s/metrics.jsonl", run);
    size_t len;
    char *text = slurp(path, &len);
    if (!text) {
        fprintf(stderr, "moe report: cannot read %s: %s\n", path, strerror(errno));
        return 1;
    }
    series s;
    memset(&s, 0, sizeof s);
    int bad = read_records(path, text, &len, &s, 0);
    if (!bad && s.n) {
        s.cols = s.n < MAX_COLS ? s.n : MAX_COLS;
        double **field[6];
        series_columns(&s, field);
        for (int i = 0; i < 6; i++) bad |= !(*field[i] = malloc(sizeof(double) * (size_t)s.n));
        bad |= !(s.load = calloc((size_t)s.n_layers + 1, sizeof *s.load));
        bad |= !(s.col_steps = calloc((size_t)s.cols, sizeof *s.col_steps));
        for (int l = 0; !bad && l < s.n_layers; l++)
            bad |= !(s.load[l] = calloc((size_t)s.cols * s.n_experts[l] + 1, sizeof(double)));
        if (bad) fprintf(stderr, "moe report: out of memory for %s\n", path);
        if (!bad) bad = read_records(path, text, &len, &s, 1);
    }
    free(text);
    if (bad || s.n == 0) {
        if (!bad) fprintf(stderr, "moe report: %s holds no steps\n", path);
        series_free(&s);
        return 1;
    }
    snprintf(path, sizeof path, "%s/topics.json", run);
    char *ttext = slurp(path, NULL);
    int ttext_read = ttext != NULL; /* topics.json is optional, but checked when there */
    cJSON *topics_doc = ttext ? cJSON_Parse(ttext) : NULL;
    free(ttext);
    cJSON *topics = topics_doc ? cJSON_GetObjectItemCaseSensitive(topics_doc, "topics") : NULL;
    if (ttext_read && !topics_ok(topics)) {
        fprintf(stderr, "moe report: %s is not {\"topics\": [{\"name\": ..., \"layers\": "
                        "[{\"layer\": N, \"counts\": [...]}]}]}\n", path);
        cJSON_Delete(topics_doc);
        series_free(&s);
        return 1;
    }
    snprintf(path, sizeof path, "%s/report.html", run);
    text_file out;
    if (text_open(&out) != MOE_OK) {
        fprintf(stderr, "moe report: %s\n", moe_last_error());
        cJSON_Delete(topics_doc);
        series_free(&s);
        return 1;
    }
    FILE *f = out.f;
    double last_val = NAN, last_loss = NAN; /* a skipped step has no loss, maybe a val_nll */
    for (int i = 0; i < s.n; i++) {
        if (isfinite(s.val[i])) last_val = s.val[i];
        if (isfinite(s.loss[i])) last_loss = s.loss[i];
    }
    fprintf(f, "<!DOCTYPE html><html><head><meta charset='utf-8'><title>moe report: ");
    html_text(f, run);
    fprintf(f, "</title><style>body{font-family:sans-serif;max-width:700px;margin:2em auto;"
               "color:#222}svg{background:#fff}.t{font-size:13px;font-weight:bold}"
               ".ax{font-size:11px;fill:#444}.frame{fill:none;stroke:#888}.grid{stroke:#eee}"
               "figure{margin:1em 0}figcaption{font-size:12px;color:#555}</style></head>"
               "<body><h1>moe.c run report</h1><p>");
    html_text(f, run);
    fprintf(f, ": %d steps, last step %.0f", s.n, s.step[s.n - 1]);
    if (isfinite(last_loss)) fprintf(f, ", final training loss %.4f", last_loss);
    if (isfinite(last_val)) fprintf(f, ", last validation loss %.4f nats/byte", last_val);
    else fprintf(f, ", no validation loss");
    fprintf(f, ".</p>\n");
    const double *y1[] = {s.nll, s.val};
    const char *n1[] = {"train nll", "val nll"}, *c1[] = {"#1f77b4", "#d62728"};
    line_chart(f, "Loss (nats/byte)", s.step, s.n, y1, n1, c1, 2, 0);
    const double *y2[] = {s.aux, s.z};
    const char *n2[] = {"aux loss", "z loss"}, *c2[] = {"#2ca02c", "#9467bd"};
    line_chart(f, "Balancing losses (coefficients included)", s.step, s.n, y2, n2, c2, 2, 1);
    fprintf(f, "<h2>Expert load</h2>\n");
    for (int li = 0; li < s.n_layers; li++) load_heatmap(f, &s, li);
    if (topics) {
        fprintf(f, "<h2>Topics and experts</h2><p>Validation text of each source file routed "
                   "through the final model.</p>\n");
        for (int li = 0; li < s.n_layers; li++) topic_heatmap(f, topics, s.layer_id[li]);
    }
    fprintf(f, "</body></html>\n");
    int rc = text_commit(&out, path, 1) != MOE_OK;
    cJSON_Delete(topics_doc);
    series_free(&s);
    if (rc) {
        fprintf(stderr, "moe report: %s\n", moe_last_error());
        return 1;
    }
    printf("wrote %s\n", path);
    return 0;
}
