#include "moe.h"

#include <stdio.h>

int main(void) {
    printf("moe %s\n", moe_version());
    return 0;
}
