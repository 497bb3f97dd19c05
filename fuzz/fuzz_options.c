/* The option parser: the first byte chooses a config file's text (key = value lines) or a
 * command line (the rest split at newlines into arguments); then the cross-option checks and
 * the write/read round trip of what was accepted. */
#include "fuzz.h"

#include "io/options.h"

#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1 || size > 65536) return 0;
    char *text = malloc(size);
    if (!text) return 0;
    memcpy(text, data + 1, size - 1);
    text[size - 1] = '\0';
    moe_options o;
    moe_options_default(&o);
    moe_status st;
    if (data[0] & 1) {
        st = moe_options_load_text(&o, text, "fuzz");
    } else {
        char *argv[65];
        int argc = 0;
        for (char *p = text; argc < 64;) {
            argv[argc++] = p;
            char *nl = strchr(p, '\n');
            if (!nl) break;
            *nl = '\0';
            p = nl + 1;
        }
        argv[argc] = NULL;
        st = moe_options_parse_args(&o, argc, argv, NULL);
    }
    if (st == MOE_OK) st = moe_options_finish(&o, MOE_OPTIONS_MODEL | MOE_OPTIONS_TRAIN);
    if (st == MOE_OK) { /* what was accepted is written and read back to the same options */
        char *out = moe_options_to_text(&o);
        moe_options back;
        moe_options_default(&back);
        if (out && (moe_options_load_text(&back, out, "round trip") != MOE_OK ||
                    moe_options_finish(&back, MOE_OPTIONS_MODEL | MOE_OPTIONS_TRAIN) != MOE_OK))
            abort();
        free(out);
    }
    free(text);
    return 0;
}
