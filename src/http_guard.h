/*
 * http_guard.h: the limits of an evhttp server facing clients it cannot trust.
 *
 * libevent 2.1's evhttp bounds a request's header bytes and body bytes, nothing else: a client can
 * open connections without end, send its head one byte a minute, stall a body half way, or fill
 * memory with unfinished bodies on many connections. The guard owns the evhttp object and watches
 * every connection from accept to close (http_guard.c says how), so that each limit below ends the
 * offending connection with an HTTP error, or closes it when no request was started, and every
 * other connection goes on being served. It holds no Lua: the server (http_server.c) and the
 * fuzzing harness (tests/fuzz/fuzz_http_request.c) both drive it.
 */
#ifndef AIGATE_HTTP_GUARD_H
#define AIGATE_HTTP_GUARD_H

#include <stddef.h>

struct event_base;
struct evhttp;
struct evhttp_request;

struct http_limits {
    size_t max_header_size; /* bytes of a request line and its headers, line ends included (431) */
    int max_headers;        /* header lines of a request, continuation lines included (431) */
    size_t max_body_size;   /* bytes of one request body (413) */
    size_t max_body_memory; /* bytes of unfinished request bodies on all connections together (503) */
    int max_connections;    /* open connections; past it the oldest idle one is closed, else the oldest
                               unfinished head (408), else the new one gets 503 */
    double header_timeout; /* seconds for a whole request head, and for a new connection's first byte (408) */
    double body_timeout;   /* seconds without a byte while a body is read (408) */
    double idle_timeout;   /* seconds a kept-alive connection may wait for its next request (closed) */
};

/*
 * The defaults, chosen for a server on a developer's machine or behind a proxy:
 * - 64 KiB of head: real requests carry a few KiB (a token, a dozen headers); nginx allows 32 KiB
 *   and Node 16 KiB, so 64 KiB turns no honest client away while bounding the head's memory.
 * - 100 headers: Apache's default; an API client sends about fifteen.
 * - 64 MiB of body: the limit the server always had, and the client's reply limit.
 * - 256 MiB of unfinished bodies: four bodies of the largest size can be on their way at once; without
 *   it, 1024 connections of 64 MiB each would be 64 GiB.
 * - 1024 connections: aigate's largest fan-out (-j) is far below it, and it keeps the process inside
 *   a default file descriptor limit.
 * - 10 s for a head: a client sends its head in one write, so this only ends slowloris clients.
 * - 60 s without a body byte: generous for an upload over a slow link, yet a stalled body is let go.
 * - 60 s of keep-alive: long enough for a client's pool to reuse the connection between requests.
 */
#define HTTP_LIMITS_DEFAULT                                                                                  \
    {                                                                                                        \
        64 * 1024, 100, 64 * 1024 * 1024, 256 * 1024 * 1024, 1024, 10.0, 60.0, 60.0                          \
    }

struct http_guard;
struct http_conn;

/* A complete request within the limits, on its connection (never NULL). */
typedef void (*http_request_fn)(struct evhttp_request *req, struct http_conn *conn, void *arg);
/* The connection closed while user data was attached to it (http_conn_set_user). */
typedef void (*http_close_fn)(void *user, void *arg);

/*
 * Makes an evhttp server on base with the limits (copied), whose requests go to on_request and whose
 * connection losses go to on_close, each with arg. The caller binds sockets to http_guard_evhttp(g)
 * and may set its allowed methods, but leaves its callbacks, timeouts and size limits alone.
 * Returns NULL when out of memory.
 */
struct http_guard *http_guard_new(struct event_base *base, const struct http_limits *limits,
                                  http_request_fn on_request, http_close_fn on_close, void *arg);
struct evhttp *http_guard_evhttp(struct http_guard *g);
/* Closes every connection (on_close runs for those with user data) and frees the server. */
void http_guard_free(struct http_guard *g);

/* Attaches user data to conn (NULL detaches it): on_close gets it if the connection closes first. */
void http_conn_set_user(struct http_conn *conn, void *user);
/*
 * The reply to the connection's request is complete (sent whole, finished or abandoned): detaches the
 * user data and starts waiting for the connection's next request.
 */
void http_conn_done(struct http_conn *conn);

struct http_guard_stats {
    int connections;        /* open, lingering ones included */
    size_t body_bytes;      /* bytes of unfinished bodies held now */
    unsigned long refused;  /* connections answered 503 for the connection cap */
    unsigned long evicted;  /* connections closed (idle) or answered 408 (slow head) to make room */
    unsigned long rejected; /* error replies of the guard (408, 413, 431, 503), refusals included */
};

void http_guard_stats(const struct http_guard *g, struct http_guard_stats *out);

#endif
