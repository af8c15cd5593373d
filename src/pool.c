/*
 * pool.c: the size of the idle upstream connection pool (see pool.h).
 */
#include "pool.h"

int pool_note(struct pool_window *w, int running, double now)
{
    int most;

    if (w->start == 0 || now - w->start >= POOL_WINDOW) {
        /* A new window; the one that ended counts for one more window only if it ended just now. */
        w->prev_peak = (w->start != 0 && now - w->start < 2 * POOL_WINDOW) ? w->peak : 0;
        w->peak = running;
        w->start = now;
    } else if (running > w->peak) {
        w->peak = running;
    }
    most = w->peak > w->prev_peak ? w->peak : w->prev_peak;
    if (most > POOL_MAX / 2)
        return POOL_MAX;
    return 2 * most < POOL_MIN ? POOL_MIN : 2 * most;
}
