/* unit.c: the counters and output of unit.h. */
#include "unit.h"

#include <stdio.h>
#include <string.h>

static int passed;
static int failed;

void unit_check(int cond, const char *file, const char *name, const char *detail)
{
    const char *base = strrchr(file, '/');

    base = base ? base + 1 : file;
    if (cond) {
        passed++;
        printf("ok - %s: %s\n", base, name);
    } else {
        failed++;
        printf("not ok - %s: %s: %s\n", base, name, detail);
    }
}

int unit_finish(void)
{
    printf("%d passed, %d failed\n", passed, failed);
    return failed == 0 ? 0 : 1;
}
