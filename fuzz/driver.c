/* Runs a fuzz target on files (the seed corpora and the regression inputs) without libFuzzer:
 * the build's tests call it, so every input that once crashed stays a test. */
#include "fuzz.h"

#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv) {
    int n = 0;
    for (int i = 1; i < argc; i++) {
        FILE *f = fopen(argv[i], "rb");
        if (!f) {
            perror(argv[i]);
            return 1;
        }
        uint8_t *buf = NULL;
        size_t size = 0, cap = 0, got;
        do {
            if (size == cap) {
                cap = cap ? 2 * cap : 4096;
                uint8_t *b = realloc(buf, cap);
                if (!b) abort();
                buf = b;
            }
            got = fread(buf + size, 1, cap - size, f);
            size += got;
        } while (got > 0);
        fclose(f);
        LLVMFuzzerTestOneInput(buf, size);
        free(buf);
        n++;
    }
    printf("%d inputs ran\n", n);
    return 0;
}
