/* A layer with random parameters and their float64 copy for the reference (tests only). */
#ifndef MOE_LAYER_FIXTURE_H
#define MOE_LAYER_FIXTURE_H

#include "moe.h"
#include "ref_moe.h"

typedef struct {
    moe_layer_config cfg;
    moe_layer *layer;
    int max_tokens;
    size_t n_params;
    double *p64;      /* [n_params] float64 copy of the parameters */
    ref_params ref;   /* pointers into p64 */
    double bias[256]; /* expert bias (float64 copy) */
} layer_fixture;

/* Creates the layer, draws parameters uniform in [-scale, scale] (biases too) and, with the
 * expert bias enabled, a random bias; asserts on failure. */
void fixture_init(layer_fixture *f, const moe_layer_config *cfg, int max_tokens, uint64_t seed,
                  float scale);
/* Refreshes p64 from the layer's parameters (after they were changed). */
void fixture_sync(layer_fixture *f);
void fixture_free(layer_fixture *f);
/* Choices for routing replay of up to 64 tokens, k of E experts each, other than a router's
 * would be: token t's j-th is (7t + j) mod E, in the reverse order for odd t (static buffer). */
const int32_t *fixture_replay(int E, int k);

#endif
