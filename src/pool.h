/*
 * pool.h: how many idle upstream connections libcurl may keep for reuse, from how many transfers
 * were in flight lately.
 *
 * A pool smaller than the transfers in flight makes a busy proxy open a new connection for some of
 * its requests; a pool as large as the largest burst ever keeps that burst's connections open after
 * it, and libcurl then checks every one of them once a second (a poll each, strace shows): measured
 * after 1,000 streams, serve's p99 at one connection went from about 0.6 ms to 1.0-1.3 ms. So
 * the pool follows the load: twice the most transfers in flight at once in the current and the
 * previous window of POOL_WINDOW seconds, within [POOL_MIN, POOL_MAX]. libcurl closes the
 * connection idle longest each time a transfer ends with the pool over its size, so after a burst the
 * pool shrinks by one connection per request.
 */
#ifndef AIGATE_POOL_H
#define AIGATE_POOL_H

#define POOL_MIN    64
#define POOL_MAX    1024
#define POOL_WINDOW 1.0

struct pool_window {
    double start;  /* when the current window began (seconds, monotonic); 0: none yet */
    int peak;      /* the most transfers in flight at once in it */
    int prev_peak; /* the same in the window before, when it ended less than a window ago */
};

/* Notes that `running` transfers are in flight at `now` (seconds, monotonic, not decreasing) and
 * returns the pool size for now. */
int pool_note(struct pool_window *w, int running, double now);

#endif
