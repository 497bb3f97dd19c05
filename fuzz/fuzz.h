/* Fuzz targets (libFuzzer's entry point, also driven by fuzz/driver.c for the regression
 * inputs): each feeds arbitrary bytes to one parser of outside data. */
#ifndef MOE_FUZZ_H
#define MOE_FUZZ_H

#include <stddef.h>
#include <stdint.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* Writes data to path (replacing it); aborts if that fails (the harness, not the input). */
void moe_fuzz_write(const char *path, const uint8_t *data, size_t size);
/* A fresh private directory for this process's files (created once). */
const char *moe_fuzz_dir(void);

#endif
