/* io/tfevents — TensorBoard event files without a protobuf library: TFRecord framing with
 * masked CRC-32C around hand-encoded Event protos holding scalar summaries (and a resumed run's
 * SessionLog START). */
#ifndef MOE_IO_TFEVENTS_H
#define MOE_IO_TFEVENTS_H

#include "moe.h"

#include <stddef.h>
#include <stdint.h>

typedef struct moe_tfevents moe_tfevents;

/* Creates dir/events.out.tfevents.<seconds>.<host> and writes the file_version event. */
moe_status moe_tfevents_open(const char *dir, double wall_time, moe_tfevents **out);
/* Appends one scalar and flushes. */
moe_status moe_tfevents_scalar(moe_tfevents *w, const char *tag, int64_t step, float value,
                               double wall_time);
/* Appends a SessionLog START event at `step` and flushes: written by a resumed run, it tells
 * TensorBoard to drop the events of step >= `step` that it read before (those of a run that went
 * on past its checkpoint without saving). */
moe_status moe_tfevents_session_start(moe_tfevents *w, int64_t step, double wall_time);
void moe_tfevents_close(moe_tfevents *w);

uint32_t moe_crc32c(const void *data, size_t n);
/* One framed record (length, masked CRCs, payload) of a scalar event (tag == NULL: the
 * file_version event) into buf; returns its size (0 if cap is too small). */
size_t moe_tfevents_record(unsigned char *buf, size_t cap, const char *tag, int64_t step,
                           float value, double wall_time);
/* The same for a SessionLog START event at `step`. */
size_t moe_tfevents_session_start_record(unsigned char *buf, size_t cap, int64_t step,
                                         double wall_time);

#endif
