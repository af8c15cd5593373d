/* test_pool.c: unit tests of the idle connection pool's size (src/pool.c). */
#include "pool.h"
#include "unit.h"

static void test_follows_the_load(void)
{
    struct pool_window w = { 0, 0, 0 };

    CHECK(pool_note(&w, 1, 100.0) == POOL_MIN, "a few transfers: the least pool");
    CHECK(pool_note(&w, 50, 100.2) == 100, "50 in flight: twice as many kept");
    CHECK(pool_note(&w, 10, 100.5) == 100, "fewer later in the window: the window's most still counts");
    CHECK(pool_note(&w, 3, 101.1) == 100, "the next window: the last one's most still counts");
    CHECK(pool_note(&w, 3, 102.2) == POOL_MIN, "a window later, it is forgotten");
    CHECK(pool_note(&w, 1000, 102.3) == POOL_MAX, "a burst: at most POOL_MAX");
    CHECK(pool_note(&w, 600, 103.3) == POOL_MAX, "half of POOL_MAX and more: POOL_MAX");
    CHECK(pool_note(&w, 2, 110.0) == POOL_MIN, "after a quiet time: no window before counts");
}

static void test_a_gap_forgets_the_burst(void)
{
    struct pool_window w = { 0, 0, 0 };

    pool_note(&w, 900, 5.0);
    CHECK(pool_note(&w, 1, 7.5) == POOL_MIN, "a window that ended over a window ago does not count");
    CHECK(w.prev_peak == 0 && w.peak == 1, "the new window starts from what is in flight");
}

int main(void)
{
    test_follows_the_load();
    test_a_gap_forgets_the_burst();
    return unit_finish();
}
