/* Private hooks of the model (model.c) for tests. */
#ifndef MOE_MODEL_INTERNAL_H
#define MOE_MODEL_INTERNAL_H

#include "moe.h"

/* on: from now on, each time a block's attention or its FFN begins (forward, decoding,
 * backward), the model fills its scratch region (the FFN's call scratch and the attention's
 * scratch, which share it) with NaN, as if another phase had used it: a buffer read across
 * phases then shows in the results. Off by default (the fill costs a pass over the region). */
void moe_model_poison_scratch(moe_model *m, int on);

#endif
