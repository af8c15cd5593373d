/*
 * http.h: what http_client.c shares with other kinds of transfer on its curl multi handle (engine.c).
 *
 * Every easy handle on the multi handle has CURLOPT_PRIVATE set to a struct xfer, whose done
 * function is called once when curl reports the transfer finished (after the handle was removed
 * from the multi handle). The timeouts (connect, total, first byte, stall) and the CA options are
 * read and applied here for every kind of transfer, so that each behaves and fails alike.
 */
#ifndef AIGATE_HTTP_H
#define AIGATE_HTTP_H

#include <stddef.h>

#include <curl/curl.h>
#include <lua.h>

#include "buf.h"
#include "headers.h" /* the reply's header set: http_header_line, header_value, http_push_headers */

struct watch;

/* Ties w to the server response (core.listen's res) at idx: w->fire is called once when its client
 * goes away. -1 when the value is not a response, 1 when its client is already gone (w not added),
 * 0 when added; the owner takes w off (watch_remove) when it no longer cares. */
int http_response_tie(lua_State *L, int idx, struct watch *w);

#define HTTP_DEFAULT_MAX_SIZE (64 * 1024 * 1024)

struct xfer {
    void (*done)(struct xfer *x, CURLcode rc);
};

struct event;

/* A transfer's limits in seconds (0: none): connecting, the whole transfer, until the first byte
 * of the response, and the longest silence between bytes after the first. */
struct http_timeouts {
    double connect;
    double total;
    double first_byte;
    double stall;
};

/* The first byte and stall timers of one transfer (curl enforces connect and total itself). The
 * first byte timer runs from the start until any byte arrives; the stall timer from the first byte
 * on, and every byte starts its wait again. When one fires, expired is called with the error text
 * ("timeout: ..."); the owner then ends the transfer. The struct must not move while in use. */
struct http_timers {
    double first_byte_timeout;
    double stall_timeout;
    struct event *first_byte_timer;
    struct event *stall_timer;
    double last_progress; /* monotonic seconds of the last byte */
    int got_first_byte;
    void (*expired)(struct http_timers *tm, const char *msg);
};

/* Sets the socket callbacks every easy handle on the shared multi handle must have. */
void http_easy_sockets(CURL *easy);
/* Starts an easy handle on the shared multi handle; 0 or -1. */
int http_client_add(CURL *easy);
/* Takes it off again (before reuse or when cancelled). */
void http_client_remove(CURL *easy);

/* Pushes core.request's error string for a failed transfer: "kind: detail". */
void http_push_error(lua_State *L, CURLcode rc, const char *errbuf, size_t received, size_t max_size);

/* Reads connect_timeout, timeout, first_byte_timeout and stall_timeout (seconds, nil or > 0) from
 * the table at idx; a bad value raises "bad <kind> 'name' to '<fn>' (...)". A value above
 * AIGATE_MAX_SECONDS (math.huge) counts as that. */
void http_read_timeouts(lua_State *L, int idx, const char *kind, const char *fn, struct http_timeouts *to);
/* Sets the connect and total limits on an easy handle (0: none). */
void http_easy_timeouts(CURL *easy, const struct http_timeouts *to);
/* Prepares the timers of a transfer with these limits; expired as above. */
void http_timers_init(struct http_timers *tm, const struct http_timeouts *to,
                      void (*expired)(struct http_timers *tm, const char *msg));
/* At the start of a transfer: arms the first byte timer. 0, or -1 when out of memory. */
int http_timers_start(struct http_timers *tm);
/* For every piece of the response received (header lines and body). */
void http_timers_progress(struct http_timers *tm);
/* At the end of a transfer: disarms both (they can be started again). */
void http_timers_stop(struct http_timers *tm);
/* Frees their events. */
void http_timers_free(struct http_timers *tm);

/* Reads ca_file and ca_path (strings or nil; NULL when nil) from the table at idx, which keeps them
 * alive; a bad value raises as http_read_timeouts does. */
void http_read_ca(lua_State *L, int idx, const char *kind, const char *fn, const char **ca_file,
                  const char **ca_path);
/* Sets CURLOPT_CAINFO and CURLOPT_CAPATH on an easy handle: the given ones, or curl's defaults for
 * NULL (so a pooled handle goes back to the system's CA certificates). */
void http_easy_ca(CURL *easy, const char *ca_file, const char *ca_path);

#endif
