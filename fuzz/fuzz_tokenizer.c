/* Tokenizers (tokenizer.json). Input byte 0 even: the rest is a tokenizer.json, loaded, then
 * a fixed multilingual text encoded and its ids decoded. Odd: the rest is a text for a fixed
 * byte-level tokenizer (Qwen's split pattern, added tokens, no normaliser), which must decode
 * back to exactly the text when the text is UTF-8 (and holds no "<x>", which swallows the
 * whitespace around it). */
#include "fuzz.h"

#include "io/tokenizer.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char FIXED[] =
    "{\"added_tokens\":[{\"id\":300,\"content\":\"<|im_start|>\",\"special\":true},"
    "{\"id\":301,\"content\":\"<x>\",\"lstrip\":true,\"rstrip\":true}],"
    "\"normalizer\":null,\"pre_tokenizer\":{\"type\":\"Sequence\",\"pretokenizers\":["
    "{\"type\":\"Split\",\"pattern\":{\"Regex\":\"\\\\p{N}{1,3}\"},\"behavior\":\"Isolated\"},"
    "{\"type\":\"Split\",\"pattern\":{\"Regex\":\"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\\\r\\\\n"
    "\\\\p{L}\\\\p{N}]?\\\\p{L}+|\\\\p{N}| ?[^\\\\s\\\\p{L}\\\\p{N}]+[\\\\r\\\\n]*|\\\\s*[\\\\r"
    "\\\\n]+|\\\\s+(?!\\\\S)|\\\\s+\"},\"behavior\":\"Isolated\"},"
    "{\"type\":\"ByteLevel\",\"add_prefix_space\":false,\"use_regex\":false}]},"
    "\"decoder\":{\"type\":\"ByteLevel\"},\"model\":{\"type\":\"BPE\",\"vocab\":{";

/* The fixed tokenizer: FIXED, the 256 byte characters, merges of a few pairs. */
static moe_tokenizer *fixed(void) {
    static moe_tokenizer *t;
    if (t) return t;
    char *json = malloc(16384), path[300];
    size_t n = (size_t)snprintf(json, 16384, "%s", FIXED);
    int id = 0;
    for (int b = 0; b < 256; b++) { /* GPT-2's printable stand-ins, as tokenizer.c maps them */
        int printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || b >= 174;
        int cp = printable ? b : 256 + id++;
        n += (size_t)snprintf(json + n, 16384 - n, "%s\"\\u%04x\":%d", b ? "," : "", cp, b);
    }
    n += (size_t)snprintf(json + n, 16384 - n, ",\"\\u0120t\":256,\"he\":257,\"\\u0120the\":258,"
                          "\"in\":259},\"merges\":[\"\\u0120 t\",\"h e\",\"\\u0120t he\","
                          "\"i n\"]}}");
    snprintf(path, sizeof path, "%s/fixed.json", moe_fuzz_dir());
    moe_fuzz_write(path, (const uint8_t *)json, n);
    free(json);
    if (moe_tokenizer_load(path, &t) != MOE_OK) __builtin_trap();
    return t;
}

static void round_trip(const moe_tokenizer *t, const char *text, size_t len, int exact) {
    int32_t *ids;
    int n;
    if (moe_tokenizer_encode(t, text, len, 1, &ids, &n) != MOE_OK) return;
    char *back;
    size_t blen;
    if (moe_tokenizer_decode(t, ids, n, 0, &back, &blen) != MOE_OK) __builtin_trap();
    if (exact && (blen != len || memcmp(back, text, len))) __builtin_trap();
    free(back);
    free(ids);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    if (data[0] & 1) {
        const char *text = (const char *)data + 1;
        int strips = 0;
        for (size_t i = 0; i + 3 <= size - 1; i++) strips |= !memcmp(text + i, "<x>", 3);
        round_trip(fixed(), text, size - 1, !strips);
        return 0;
    }
    char path[300];
    snprintf(path, sizeof path, "%s/tokenizer.json", moe_fuzz_dir());
    moe_fuzz_write(path, data + 1, size - 1);
    moe_tokenizer *t;
    if (moe_tokenizer_load(path, &t) != MOE_OK) return 0;
    static const char text[] = "Hello, world! It's 2026: café, 東京, 😀  \n\n <x> <|im_start|>";
    round_trip(t, text, sizeof text - 1, 0);
    moe_tokenizer_free(t);
    return 0;
}
