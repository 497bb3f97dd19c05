/* io/safetensors — the safetensors format: an 8-byte little-endian header length, a JSON
 * header {name: {dtype, shape, data_offsets}, "__metadata__": {string: string}}, then the
 * tensor bytes. Every field of a file read is checked before use. */
#ifndef MOE_IO_SAFETENSORS_H
#define MOE_IO_SAFETENSORS_H

#include "moe.h"

#include <stddef.h>
#include <stdint.h>

typedef enum {
    MOE_DT_F32 = 0,
    MOE_DT_F16 = 1,
    MOE_DT_BF16 = 2,
    MOE_DT_F64 = 3,
    MOE_DT_I64 = 4,
    MOE_DT_I32 = 5,
    /* read (moe inspect lists them), never loaded as parameters */
    MOE_DT_I16 = 6,
    MOE_DT_I8 = 7,
    MOE_DT_U64 = 8,
    MOE_DT_U32 = 9,
    MOE_DT_U16 = 10,
    MOE_DT_U8 = 11,
    MOE_DT_BOOL = 12,
    MOE_DT_F8_E4M3 = 13,
    MOE_DT_F8_E5M2 = 14,
} moe_dtype;
/* IEEE half precision as float32 (subnormals, infinities and NaN too). */
float moe_f16_to_f32(uint16_t h);
/* The dtype's name in safetensors' headers ("F32", "F8_E4M3", ...). */
const char *moe_st_dtype_name(moe_dtype d);

typedef struct {
    char name[160];
    moe_dtype dtype;
    int ndim;
    int64_t shape[8];
    size_t numel;
    const unsigned char *data; /* into the file buffer */
    size_t nbytes;
} moe_st_tensor;

typedef struct {
    int n_tensors;
    moe_st_tensor *tensors;
    int n_meta;
    char **meta_keys, **meta_values;
    unsigned char *buf; /* the whole file, memory-mapped read-only */
    size_t size;
} moe_safetensors;

moe_status moe_st_read(const char *path, moe_safetensors *out);
void moe_st_free(moe_safetensors *st);
const moe_st_tensor *moe_st_find(const moe_safetensors *st, const char *name);
const char *moe_st_meta(const moe_safetensors *st, const char *key);
/* Copies a tensor into float32 (from F32, F16, BF16 or F64); the shape must match. With out
 * NULL, only checks that it would succeed and that every value is a finite float32. */
moe_status moe_st_get_f32(const moe_safetensors *st, const char *name, int ndim,
                          const int64_t *shape, float *out);

typedef struct {
    const char *name;
    moe_dtype dtype; /* F32, F64 or I64 */
    int ndim;
    int64_t shape[8];
    const void *data;
} moe_st_entry;

/* Writes atomically (temporary file, fsync, rename). meta: n_meta key/value pairs. */
moe_status moe_st_write(const char *path, const moe_st_entry *entries, int n,
                        const char *const *meta_keys, const char *const *meta_values, int n_meta);

#endif
