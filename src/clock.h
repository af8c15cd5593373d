/*
 * clock.h: the monotonic clock in seconds, the one every timer, deadline and latency of the host is
 * measured on (core.now too). Inline, so that parts linked on their own (the fuzz harnesses) need no
 * other file.
 */
#ifndef AIGATE_CLOCK_H
#define AIGATE_CLOCK_H

#include <time.h>

static inline double monotonic_seconds(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

#endif
