/* Topic routing (which experts each source file of the corpus uses) and moe report: one
 * self-contained HTML page with SVG charts of a run. */
#define _POSIX_C_SOURCE 200809L
#include "tools/cli.h"

#include "core/core.h"
#include "io/data.h"

#include <cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------ topics.json */

moe_status moe_cli_topics(moe_model *m, const moe_tokens *data, int batch, const char *path) {
    const moe_model_config *c = moe_model_get_config(m);
    int S = c->seq_len, L = c->n_layers, tot_e = 0;
    int *off = malloc(sizeof(int) * (size_t)(L + 1));
    for (int l = 0; l < L; l++) {
        off[l] = tot_e;
        tot_e += moe_model_layer_experts(c, l);
    }
    off[L] = tot_e;
    int64_t *counts = calloc((size_t)data->n_sources * (size_t)(tot_e ? tot_e : 1), sizeof(int64_t));
    int64_t *ntok = calloc((size_t)data->n_sources + 1, sizeof(int64_t));
    int32_t *tok = malloc(sizeof(int32_t) * (size_t)batch * S);
    int32_t *buf = malloc(sizeof(int32_t) * (size_t)(data->n_tokens + 1));
    moe_status st = MOE_OK;
    if (!off || !counts || !ntok || !tok || !buf) {
        st = moe_set_error(MOE_ERR_NOMEM, "out of memory for topic routing");
        goto done;
    }
    moe_model_args args = moe_model_args_default();
    args.training = 0;
    for (int s = 0; s < data->n_sources && st == MOE_OK; s++) {
        int64_t n = 0; /* the source's documents, concatenated */
        for (int64_t d = 0; d < data->n_docs; d++) {
            if ((int)data->doc_source[d] != s) continue;
            int64_t end = d + 1 < data->n_docs ? (int64_t)data->doc_start[d + 1] : data->n_tokens;
            for (int64_t i = (int64_t)data->doc_start[d]; i < end; i++) buf[n++] = data->tokens[i];
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
                    counts[(size_t)s * tot_e + off[l] + e] += ls->counts[e];
            }
            ntok[s] += (int64_t)b * S;
        }
    }
    if (st != MOE_OK) goto done;
    FILE *f = fopen(path, "w");
    if (!f) {
        st = moe_set_error(MOE_ERR_IO, "cannot write %s", path);
        goto done;
    }
    fprintf(f, "{\"topics\":[");
    for (int s = 0, first = 1; s < data->n_sources; s++) {
        if (!ntok[s]) continue;
        const char *name = strrchr(data->sources[s], '/');
        name = name ? name + 1 : data->sources[s];
        cJSON *js = cJSON_CreateString(name);
        char *quoted = cJSON_PrintUnformatted(js);
        fprintf(f, "%s{\"name\":%s,\"tokens\":%lld,\"layers\":[", first ? "" : ",", quoted,
                (long long)ntok[s]);
        cJSON_free(quoted);
        cJSON_Delete(js);
        for (int l = 0, fl = 1; l < L; l++) {
            if (off[l + 1] == off[l]) continue;
            fprintf(f, "%s{\"layer\":%d,\"counts\":[", fl ? "" : ",", l);
            for (int e = 0; e < off[l + 1] - off[l]; e++)
                fprintf(f, "%s%lld", e ? "," : "", (long long)counts[(size_t)s * tot_e + off[l] + e]);
            fprintf(f, "]}");
            fl = 0;
        }
        fprintf(f, "]}");
        first = 0;
    }
    fprintf(f, "]}\n");
    if (fclose(f) != 0) st = moe_set_error(MOE_ERR_IO, "cannot write %s", path);
done:
    free(off);
    free(counts);
    free(ntok);
    free(tok);
    free(buf);
    return st;
}

/* ----------------------------------------------------------------- report */

typedef struct {
    int n, cap;
    double *step, *loss, *nll, *aux, *z, *val; /* val: NAN where absent */
    int n_layers;         /* MoE layers seen in the first record */
    int layer_id[64], n_experts[64];
    double *load[64];     /* [n][E] fraction of the layer's slots per expert */
} series;

static void push(series *s, cJSON *rec) {
    if (s->n == s->cap) {
        s->cap = s->cap ? 2 * s->cap : 256;
        double **arrs[] = {&s->step, &s->loss, &s->nll, &s->aux, &s->z, &s->val};
        for (int i = 0; i < 6; i++) *arrs[i] = realloc(*arrs[i], sizeof(double) * (size_t)s->cap);
        for (int l = 0; l < s->n_layers; l++)
            s->load[l] = realloc(s->load[l], sizeof(double) * (size_t)s->cap * s->n_experts[l]);
    }
    const char *keys[] = {"step", "loss", "nll", "aux", "z", "val_nll"};
    double *dst[] = {s->step, s->loss, s->nll, s->aux, s->z, s->val};
    for (int i = 0; i < 6; i++) {
        cJSON *v = cJSON_GetObjectItemCaseSensitive(rec, keys[i]);
        dst[i][s->n] = cJSON_IsNumber(v) ? v->valuedouble : NAN;
    }
    cJSON *layers = cJSON_GetObjectItemCaseSensitive(rec, "expert_load");
    int li = 0;
    for (cJSON *ly = layers ? layers->child : NULL; ly && li < s->n_layers; ly = ly->next, li++) {
        cJSON *cnt = cJSON_GetObjectItemCaseSensitive(ly, "counts");
        double sum = 0;
        int e = 0;
        for (cJSON *c = cnt ? cnt->child : NULL; c && e < s->n_experts[li]; c = c->next, e++) sum += c->valuedouble;
        e = 0;
        for (cJSON *c = cnt ? cnt->child : NULL; c && e < s->n_experts[li]; c = c->next, e++)
            s->load[li][(size_t)s->n * s->n_experts[li] + e] = sum > 0 ? c->valuedouble / sum : 0;
    }
    s->n++;
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
 * relative to 2/E (twice the balanced share is full colour). */
static void load_heatmap(FILE *f, const series *s, int li) {
    int E = s->n_experts[li], cols = s->n < 200 ? s->n : 200;
    const int W = 640, l = 60, t = 30, cell_h = E > 32 ? 4 : 10, H = t + E * cell_h + 30;
    fprintf(f, "<figure><svg viewBox='0 0 %d %d' width='%d' height='%d'>", W, H, W, H);
    fprintf(f, "<text x='%d' y='18' class='t'>layer %d: expert load over training</text>", l,
            s->layer_id[li]);
    double cw = (double)(W - l - 20) / (cols ? cols : 1);
    for (int cidx = 0; cidx < cols; cidx++) {
        int i0 = (int)((long)cidx * s->n / cols), i1 = (int)((long)(cidx + 1) * s->n / cols);
        for (int e = 0; e < E; e++) {
            double v = 0;
            for (int i = i0; i < i1; i++) v += s->load[li][(size_t)i * E + e];
            v /= (i1 > i0 ? i1 - i0 : 1);
            heat_cell(f, l + cw * cidx, t + e * cell_h, cw, cell_h, v * E / 2);
        }
    }
    fprintf(f, "<text x='%d' y='%d' class='ax'>step %.0f</text><text x='%d' y='%d' class='ax' "
               "text-anchor='end'>step %.0f</text></svg><figcaption>Rows: experts 0..%d; colour: "
               "the expert's share of the layer's routed tokens (full colour = twice the balanced "
               "share 1/%d).</figcaption></figure>\n", l, H - 8, s->n ? s->step[0] : 0, W - 20,
            H - 8, s->n ? s->step[s->n - 1] : 0, E - 1, E);
}

/* Text into HTML: the characters that could start markup or end an attribute, as references. */
static void html_text(FILE *f, const char *s) {
    for (const char *c = s; *c; c++)
        if (*c == '<' || *c == '&' || *c == '\'' || *c == '"') fprintf(f, "&#%d;", *c);
        else fputc(*c, f);
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

static char *slurp(const char *path) {
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
    return b;
}

int moe_cmd_report(int argc, char **argv) {
    if (argc != 1) {
        fprintf(stderr, "moe report: usage: moe report RUN_DIR (writes RUN_DIR/report.html)\n");
        return 2;
    }
    const char *run = argv[0];
    char path[4300];
    snprintf(path, sizeof path, "%s/metrics.jsonl", run);
    char *text = slurp(path);
    if (!text) {
        fprintf(stderr, "moe report: cannot read %s\n", path);
        return 1;
    }
    series s;
    memset(&s, 0, sizeof s);
    int lineno = 0, bad = 0;
    for (char *line = strtok(text, "\n"); line; line = strtok(NULL, "\n")) {
        lineno++;
        cJSON *rec = cJSON_Parse(line);
        if (!cJSON_IsObject(rec)) {
            fprintf(stderr, "moe report: %s:%d: not a JSON object\n", path, lineno);
            cJSON_Delete(rec);
            bad = 1;
            break;
        }
        cJSON *layers = cJSON_GetObjectItemCaseSensitive(rec, "expert_load");
        for (cJSON *ly = layers ? layers->child : NULL; ly && !bad; ly = ly->next)
            bad = !layer_entry_ok(ly);
        if (bad || (layers && !cJSON_IsArray(layers))) {
            fprintf(stderr, "moe report: %s:%d: expert_load is not a list of {\"layer\": N, "
                            "\"counts\": [...]}\n", path, lineno);
            cJSON_Delete(rec);
            bad = 1;
            break;
        }
        if (s.n == 0) {
            for (cJSON *ly = layers ? layers->child : NULL; ly && s.n_layers < 64; ly = ly->next) {
                s.layer_id[s.n_layers] = cJSON_GetObjectItemCaseSensitive(ly, "layer")->valueint;
                s.n_experts[s.n_layers++] = cJSON_GetArraySize(cJSON_GetObjectItemCaseSensitive(ly, "counts"));
            }
        }
        push(&s, rec);
        cJSON_Delete(rec);
    }
    free(text);
    if (bad || s.n == 0) {
        if (!bad) fprintf(stderr, "moe report: %s holds no steps\n", path);
        return 1;
    }
    snprintf(path, sizeof path, "%s/topics.json", run);
    char *ttext = slurp(path);
    int ttext_read = ttext != NULL; /* topics.json is optional, but checked when there */
    cJSON *topics_doc = ttext ? cJSON_Parse(ttext) : NULL;
    free(ttext);
    cJSON *topics = topics_doc ? cJSON_GetObjectItemCaseSensitive(topics_doc, "topics") : NULL;
    if (ttext_read && !topics_ok(topics)) {
        fprintf(stderr, "moe report: %s is not {\"topics\": [{\"name\": ..., \"layers\": "
                        "[{\"layer\": N, \"counts\": [...]}]}]}\n", path);
        cJSON_Delete(topics_doc);
        return 1;
    }
    snprintf(path, sizeof path, "%s/report.html", run);
    FILE *f = fopen(path, "w");
    if (!f) {
        fprintf(stderr, "moe report: cannot write %s\n", path);
        return 1;
    }
    double last_val = NAN;
    for (int i = 0; i < s.n; i++)
        if (isfinite(s.val[i])) last_val = s.val[i];
    fprintf(f, "<!DOCTYPE html><html><head><meta charset='utf-8'><title>moe report: ");
    html_text(f, run);
    fprintf(f, "</title><style>body{font-family:sans-serif;max-width:700px;margin:2em auto;"
               "color:#222}svg{background:#fff}.t{font-size:13px;font-weight:bold}"
               ".ax{font-size:11px;fill:#444}.frame{fill:none;stroke:#888}.grid{stroke:#eee}"
               "figure{margin:1em 0}figcaption{font-size:12px;color:#555}</style></head>"
               "<body><h1>moe.c run report</h1><p>");
    html_text(f, run);
    fprintf(f, ": %d steps, last step %.0f, final training loss %.4f, last validation loss "
               "%.4f nats/byte.</p>\n", s.n, s.step[s.n - 1], s.loss[s.n - 1], last_val);
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
    int rc = fclose(f) != 0;
    cJSON_Delete(topics_doc);
    double **arrs[] = {&s.step, &s.loss, &s.nll, &s.aux, &s.z, &s.val};
    for (int i = 0; i < 6; i++) free(*arrs[i]);
    for (int l = 0; l < s.n_layers; l++) free(s.load[l]);
    if (rc) {
        fprintf(stderr, "moe report: cannot write %s\n", path);
        return 1;
    }
    printf("wrote %s\n", path);
    return 0;
}
