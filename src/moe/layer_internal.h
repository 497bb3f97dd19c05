/* Private declarations shared by the stages of the MoE layer (moe/). */
#ifndef MOE_LAYER_INTERNAL_H
#define MOE_LAYER_INTERNAL_H

#include "moe.h"

int moe_act_gated(moe_activation a);

#endif
