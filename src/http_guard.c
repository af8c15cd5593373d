/*
 * http_guard.c: connection limits around libevent 2.1's evhttp (see http_guard.h).
 *
 * evhttp 2.1 offers no hook when a connection is accepted or closed, nor a look at a request head
 * before it parses it. Three public calls give us both:
 * - evhttp_set_bevcb: evhttp asks us for each new connection's bufferevent. We make it and add a
 *   callback to its input buffer, which sees every byte read before evhttp's read callback does.
 * - bufferevent_getcb: once the accept is done, the bufferevent's callback argument is evhttp's
 *   connection object; we set its close callback, which evhttp calls when it frees the connection.
 * - bufferevent_setcb: to reject a request we replace evhttp's callbacks with ours ("take over"),
 *   answer, and close gracefully; evhttp sees none of the bytes that follow.
 *
 * The input callback scans each request head as it arrives, with evhttp's line rules
 * (EVBUFFER_EOL_CRLF: a line ends at LF, a CR before it is dropped), counting bytes and lines. Each
 * byte is looked at once, so an endless line costs linear time (evhttp alone searches its whole buffer
 * again on every read: quadratic up to its size limit, which was infinite), and a head over a limit
 * gets 431 before evhttp parses it.
 *
 * A connection's states:
 *   NEW     accepted; evhttp's connection object is not known yet (attach runs next)
 *   IDLE    no byte of a request yet: a new connection (header_timeout from the accept) or a kept-alive
 *           one (idle_timeout); the oldest idle connection is closed when a new one needs its place
 *   HEAD    reading a request head (header_timeout for all of it); when no connection is idle, the
 *           one whose head started first gives its place to a new one (408): honest clients send a
 *           head in one write, so a head still coming in is a slow client, and slowloris cannot
 *           keep new clients out by filling the cap
 *   BODY    the head is complete and evhttp reads the body (body_timeout between bytes)
 *   BUSY    the request is with the handler, until http_conn_done
 *   LINGER  taken over: our error reply goes out, then the write side is shut and the client's bytes
 *           are read and dropped until it closes, so that closing cannot reset the connection before
 *           the client has read the reply; within LINGER_IDLE and LINGER_MAX. Counts as idle.
 */
#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include <netinet/in.h>
#include <netinet/tcp.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <event2/http.h>

#include "clock.h"
#include "http_guard.h"

/* Lingering after an error reply: nginx's defaults (lingering_timeout, lingering_time). */
#define LINGER_IDLE 5.0
#define LINGER_MAX  30.0
/*
 * evhttp's own timeout on each read and write of a connection. Our timers govern reading, so this is
 * in effect how long a client may leave a reply unread before it is dropped.
 */
#define IO_TIMEOUT 600.0
/*
 * How long a request is with the handler before the socket is watched for the client leaving (see
 * busy_read). Most requests are answered sooner, and then cost no system call for it; a client that
 * leaves is noticed at most this much later.
 */
#define BUSY_WATCH_AFTER 0.005
/* The start of each head line kept for reading Content-Length. */
#define PREFIX_MAX 48

enum conn_state { C_NEW, C_IDLE, C_HEAD, C_BODY, C_BUSY, C_LINGER };

struct head_scan {
    size_t bytes;             /* of the head so far, line ends included */
    int lines;                /* complete lines, the request line included */
    size_t line_len;          /* bytes of the current line, a trailing CR not counted */
    int cr;                   /* the last byte was a CR */
    int cl_seen;              /* a Content-Length line was seen (evhttp reads the first) */
    long long content_length; /* -1: none, or not a plain number (evhttp then answers 400) */
    size_t prefix_len;
    char prefix[PREFIX_MAX];
};

struct http_conn {
    struct http_guard *g;
    struct bufferevent *bev;
    struct evhttp_connection *evcon; /* NULL until attached */
    struct evbuffer_cb_entry *input_cb;
    struct event *timer; /* the state's deadline; also runs the attach and the pipelined rescan */
    struct event *gone;  /* while BUSY: reading is evhttp's no more, so this notices a client leaving */
    evutil_socket_t fd;
    enum conn_state state;
    unsigned long requests;
    struct head_scan scan;
    size_t body_bytes; /* bytes of the unfinished body counted in g->body_bytes */
    void *user;
    int rescan; /* bytes of the next request were read with the last one */
    double accepted;
    double head_started;
    double linger_start;
    int linger_eof;
    int in_idle;
    struct http_conn *prev, *next;           /* every connection */
    struct http_conn *idle_prev, *idle_next; /* idle and lingering ones, oldest first */
};

struct http_guard {
    struct event_base *base;
    struct evhttp *http;
    struct http_limits limits;
    http_request_fn on_request;
    http_close_fn on_close;
    void *arg;
    struct http_conn *conns;
    struct http_conn *idle_head, *idle_tail;
    int nconns;
    size_t body_bytes;
    unsigned long refused, evicted, rejected;
};

/*
 * Connections by file descriptor, for finding a request's connection (evhttp keeps no user pointer
 * on its connection object). Shared by every guard of the process; freed with the last one.
 */
static struct http_conn **by_fd;
static size_t by_fd_len;
static int guards_alive;

static int table_set(evutil_socket_t fd, struct http_conn *c)
{
    if (fd < 0)
        return -1;
    if ((size_t)fd >= by_fd_len) {
        size_t len = by_fd_len ? by_fd_len : 256;
        struct http_conn **grown;
        while (len <= (size_t)fd)
            len *= 2;
        grown = realloc(by_fd, len * sizeof(*grown));
        if (grown == NULL)
            return -1;
        memset(grown + by_fd_len, 0, (len - by_fd_len) * sizeof(*grown));
        by_fd = grown;
        by_fd_len = len;
    }
    by_fd[fd] = c;
    return 0;
}

static struct http_conn *conn_of(struct evhttp_connection *evcon)
{
    evutil_socket_t fd = bufferevent_getfd(evhttp_connection_get_bufferevent(evcon));
    struct http_conn *c;

    if (fd < 0 || (size_t)fd >= by_fd_len)
        return NULL;
    c = by_fd[fd];
    return c && c->evcon == evcon ? c : NULL;
}

static void arm(struct http_conn *c, double seconds)
{
    struct timeval tv;

    if (seconds < 0)
        seconds = 0;
    tv.tv_sec = (time_t)seconds;
    tv.tv_usec = (suseconds_t)((seconds - (double)tv.tv_sec) * 1e6);
    evtimer_add(c->timer, &tv);
}

/* ---- bookkeeping ----------------------------------------------------------------------------- */

static void idle_push(struct http_conn *c)
{
    struct http_guard *g = c->g;

    if (c->in_idle)
        return;
    c->in_idle = 1;
    c->idle_next = NULL;
    c->idle_prev = g->idle_tail;
    if (g->idle_tail)
        g->idle_tail->idle_next = c;
    else
        g->idle_head = c;
    g->idle_tail = c;
}

static void idle_remove(struct http_conn *c)
{
    struct http_guard *g = c->g;

    if (!c->in_idle)
        return;
    c->in_idle = 0;
    if (c->idle_prev)
        c->idle_prev->idle_next = c->idle_next;
    else
        g->idle_head = c->idle_next;
    if (c->idle_next)
        c->idle_next->idle_prev = c->idle_prev;
    else
        g->idle_tail = c->idle_prev;
    c->idle_prev = c->idle_next = NULL;
}

static void body_release(struct http_conn *c)
{
    c->g->body_bytes -= c->body_bytes;
    c->body_bytes = 0;
}

/* Forgets c; its bufferevent is evhttp's to free (or already freed, held by our reference). */
static void conn_free(struct http_conn *c)
{
    struct http_guard *g = c->g;

    if (c->input_cb)
        evbuffer_remove_cb_entry(bufferevent_get_input(c->bev), c->input_cb);
    event_free(c->timer);
    if (c->gone)
        event_free(c->gone);
    if (c->fd >= 0 && (size_t)c->fd < by_fd_len && by_fd[c->fd] == c)
        by_fd[c->fd] = NULL;
    idle_remove(c);
    body_release(c);
    if (c->prev)
        c->prev->next = c->next;
    else
        g->conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    g->nconns--;
    free(c);
}

/* evhttp frees the connection: tell the user, then forget it. */
static void conn_closed(struct evhttp_connection *evcon, void *arg)
{
    struct http_conn *c = arg;
    void *user = c->user;

    (void)evcon;
    c->user = NULL;
    if (user)
        c->g->on_close(user, c->g->arg);
    if (c->state == C_LINGER)
        bufferevent_setcb(c->bev, NULL, NULL, NULL, NULL);
    conn_free(c);
}

/* Closes c without a word (evhttp frees it and calls conn_closed). Never from inside evhttp. */
static void conn_close(struct http_conn *c)
{
    evhttp_connection_free(c->evcon);
}

/* ---- taking over: an error reply, then a graceful close --------------------------------------- */

static void linger_arm(struct http_conn *c)
{
    double t = monotonic_seconds();
    double until = c->linger_start + LINGER_MAX;

    if (t + LINGER_IDLE < until)
        until = t + LINGER_IDLE;
    arm(c, until - t);
}

static void linger_read(struct bufferevent *bev, void *arg)
{
    struct http_conn *c;

    /* evhttp's deferred read passes its own argument: ask the bufferevent for ours. */
    (void)arg;
    bufferevent_getcb(bev, NULL, NULL, NULL, &arg);
    c = arg;
    evbuffer_drain(bufferevent_get_input(bev), evbuffer_get_length(bufferevent_get_input(bev)));
    linger_arm(c);
}

/* The reply is out: no more from us (the client sees the end after the reply). */
static void linger_write(struct bufferevent *bev, void *arg)
{
    struct http_conn *c = arg;

    if (evbuffer_get_length(bufferevent_get_output(bev)) > 0)
        return;
    shutdown(c->fd, SHUT_WR);
    if (c->linger_eof)
        conn_close(c);
}

static void linger_event(struct bufferevent *bev, short what, void *arg)
{
    struct http_conn *c = arg;

    if ((what & BEV_EVENT_EOF) && !(what & BEV_EVENT_ERROR) &&
        evbuffer_get_length(bufferevent_get_output(bev)) > 0) {
        /* The client is done sending but our reply is not out yet: finish writing it first. */
        c->linger_eof = 1;
        bufferevent_disable(bev, EV_READ);
        return;
    }
    conn_close(c);
}

/*
 * Answers status with a JSON error and closes the connection gracefully, whatever evhttp was doing
 * with it (no request of it is with the handler). Safe inside the input callback: nothing is freed.
 */
#define ENVELOPE "{\"error\":{\"message\":\"%s\",\"type\":\"%s\",\"param\":null,\"code\":\"%s\"}}\n"

/* The envelope's code for a rejection's status. */
static const char *reject_code(int status)
{
    switch (status) {
    case 408:
        return "request_timeout";
    case 413:
        return "request_too_large";
    case 431:
        return "headers_too_large";
    case 503:
        return "server_busy";
    default:
        return "bad_request";
    }
}

static void conn_reject(struct http_conn *c, int status, const char *reason, const char *message)
{
    char head[256];
    char body[512];
    int hlen;
    int blen;

    if (c->state == C_LINGER)
        return;
    body_release(c);
    idle_remove(c);
    c->state = C_LINGER;
    c->linger_start = monotonic_seconds();
    c->linger_eof = 0;
    bufferevent_setcb(c->bev, linger_read, linger_write, linger_event, c);
    bufferevent_set_timeouts(c->bev, NULL, NULL);
    /* OpenAI's error envelope, whole (type, param, code), so that its SDKs read it as the API's. */
    blen = snprintf(body, sizeof(body), ENVELOPE, message,
                    status >= 500 ? "server_error" : "invalid_request_error", reject_code(status));
    if (blen < 0 || (size_t)blen >= sizeof(body))
        blen = snprintf(body, sizeof(body), ENVELOPE, reason,
                        status >= 500 ? "server_error" : "invalid_request_error", reject_code(status));
    hlen = snprintf(head, sizeof(head),
                    "HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s"
                    "Connection: close\r\n\r\n",
                    status, reason, blen, status == 503 ? "Retry-After: 1\r\n" : "");
    bufferevent_write(c->bev, head, (size_t)hlen);
    bufferevent_write(c->bev, body, (size_t)blen);
    bufferevent_enable(c->bev, EV_READ | EV_WRITE);
    idle_push(c);
    linger_arm(c);
}

/* Rejects with status and a message made from fmt (a limit's name and value, no quotes). */
static void reject_limit(struct http_conn *c, int status, const char *fmt, ...)
{
    va_list ap;
    static const struct {
        int status;
        const char *reason;
    } reasons[] = {
        { 408, "Request Timeout" },
        { 413, "Payload Too Large" },
        { 431, "Request Header Fields Too Large" },
        { 503, "Service Unavailable" },
    };
    const char *reason = "Bad Request";
    char message[256];
    size_t i;

    for (i = 0; i < sizeof(reasons) / sizeof(reasons[0]); i++) {
        if (reasons[i].status == status)
            reason = reasons[i].reason;
    }
    va_start(ap, fmt);
    vsnprintf(message, sizeof(message), fmt, ap);
    va_end(ap);
    c->g->rejected++;
    conn_reject(c, status, reason, message);
}

/* ---- the request head ------------------------------------------------------------------------ */

enum scan_result { SCAN_MORE, SCAN_DONE, SCAN_TOO_LARGE, SCAN_TOO_MANY };

static int lower(int ch)
{
    return ch >= 'A' && ch <= 'Z' ? ch + 32 : ch;
}

/* At the end of a header line: the first Content-Length, when its value is a plain number. */
static void read_content_length(struct head_scan *s)
{
    static const char name[] = "content-length:";
    const char *p = s->prefix + sizeof(name) - 1;
    const char *end = s->prefix + s->prefix_len;
    long long v = 0;
    size_t i;

    if (s->cl_seen || s->prefix_len < sizeof(name) - 1)
        return;
    for (i = 0; i < sizeof(name) - 1; i++) {
        if (lower((unsigned char)s->prefix[i]) != name[i])
            return;
    }
    s->cl_seen = 1;
    if (s->line_len > s->prefix_len)
        return; /* longer than we keep: evhttp decides */
    while (p < end && (*p == ' ' || *p == '\t'))
        p++;
    if (p == end || *p < '0' || *p > '9')
        return;
    for (; p < end && *p >= '0' && *p <= '9'; p++)
        v = v > (LLONG_MAX - 9) / 10 ? LLONG_MAX : v * 10 + (*p - '0');
    while (p < end && (*p == ' ' || *p == '\t'))
        p++;
    if (p == end)
        s->content_length = v;
}

static void line_add(struct head_scan *s, unsigned char ch)
{
    if (s->prefix_len < PREFIX_MAX)
        s->prefix[s->prefix_len++] = (char)ch;
    s->line_len++;
}

/*
 * Scans n more bytes of a head. SCAN_DONE: the blank line ending it was found, after *used bytes.
 * A line is blank for evhttp when it is empty or starts with a NUL byte (it reads lines as C strings).
 */
static enum scan_result scan_head(struct head_scan *s, const struct http_limits *lim, const unsigned char *p,
                                  size_t n, size_t *used)
{
    size_t i;

    for (i = 0; i < n; i++) {
        unsigned char ch = p[i];
        if (++s->bytes > lim->max_header_size)
            return SCAN_TOO_LARGE;
        if (ch == '\n') {
            if (s->lines > 0 && (s->line_len == 0 || s->prefix[0] == '\0')) {
                *used = i + 1;
                return SCAN_DONE;
            }
            if (s->lines > 0)
                read_content_length(s);
            if (++s->lines - 1 > lim->max_headers)
                return SCAN_TOO_MANY;
            s->line_len = 0;
            s->prefix_len = 0;
            s->cr = 0;
            continue;
        }
        if (s->cr)
            line_add(s, '\r'); /* a CR not before LF belongs to the line */
        s->cr = ch == '\r';
        if (!s->cr)
            line_add(s, ch);
    }
    *used = n;
    return SCAN_MORE;
}

static void head_start(struct http_conn *c)
{
    idle_remove(c);
    memset(&c->scan, 0, sizeof(c->scan));
    c->scan.content_length = -1;
    /* A new connection's clock started at the accept; a kept-alive one's starts now. */
    if (c->requests > 0 || c->state != C_IDLE) {
        c->head_started = monotonic_seconds();
        arm(c, c->g->limits.header_timeout);
    } else {
        c->head_started = c->accepted;
    }
    c->state = C_HEAD;
}

static void body_add(struct http_conn *c, size_t n)
{
    struct http_guard *g = c->g;

    c->body_bytes += n;
    g->body_bytes += n;
    /* A body too large on its own is evhttp's to answer (413); chunked framing may take it past. */
    if (g->body_bytes > g->limits.max_body_memory && c->body_bytes <= g->limits.max_body_size) {
        reject_limit(c, 503,
                     "too many request bytes on their way: more than %zu (the server's max_body_memory); "
                     "try again",
                     g->limits.max_body_memory);
        return;
    }
    arm(c, g->limits.body_timeout);
}

static void head_done(struct http_conn *c, size_t rest)
{
    const struct http_limits *lim = &c->g->limits;

    c->state = C_BODY;
    if (c->scan.content_length >= 0 && (unsigned long long)c->scan.content_length > lim->max_body_size) {
        reject_limit(c, 413, "request body too large: more than %zu bytes (the server's max_body_size)",
                     lim->max_body_size);
        return;
    }
    arm(c, lim->body_timeout);
    if (rest > 0)
        body_add(c, rest);
}

/* Scans n bytes of buf from offset start as head bytes, then as body bytes once the head is done. */
static void scan_input(struct http_conn *c, struct evbuffer *buf, size_t start, size_t n)
{
    struct evbuffer_ptr pos;
    struct evbuffer_iovec vec[8];
    int nvec;
    int i;

    while (n > 0 && c->state == C_HEAD) {
        if (evbuffer_ptr_set(buf, &pos, start, EVBUFFER_PTR_SET) != 0)
            return;
        nvec = evbuffer_peek(buf, (ev_ssize_t)n, &pos, vec, 8);
        if (nvec <= 0)
            return;
        if (nvec > 8)
            nvec = 8;
        for (i = 0; i < nvec && n > 0; i++) {
            size_t len = vec[i].iov_len < n ? vec[i].iov_len : n;
            size_t used = 0;
            switch (scan_head(&c->scan, &c->g->limits, vec[i].iov_base, len, &used)) {
            case SCAN_MORE:
                break;
            case SCAN_DONE:
                head_done(c, n - used);
                return;
            case SCAN_TOO_LARGE:
                reject_limit(c, 431,
                             "request head too large: more than %zu bytes (the server's max_header_size)",
                             c->g->limits.max_header_size);
                return;
            case SCAN_TOO_MANY:
                reject_limit(c, 431, "too many request headers: more than %d (the server's max_headers)",
                             c->g->limits.max_headers);
                return;
            }
            start += len;
            n -= len;
        }
    }
}

/* ---- evhttp's hooks -------------------------------------------------------------------------- */

static int conn_attach(struct http_conn *c);

/* Every byte read from the client, before evhttp's read callback sees it. */
static void input_cb(struct evbuffer *buf, const struct evbuffer_cb_info *info, void *arg)
{
    struct http_conn *c = arg;
    size_t n = info->n_added;

    if (n == 0)
        return;
    if (c->state == C_NEW && !conn_attach(c))
        return;
    switch (c->state) {
    case C_IDLE:
        head_start(c);
        if (c->rescan) {
            c->rescan = 0;
            n = evbuffer_get_length(buf); /* the pipelined bytes read before these too */
        }
        /* fall through */
    case C_HEAD:
        scan_input(c, buf, evbuffer_get_length(buf) - n, n);
        break;
    case C_BODY:
        body_add(c, n);
        break;
    default:
        break;
    }
}

/* Drops the connections that evhttp left without attaching (it freed them while setting them up). */
static void conn_forget(struct http_conn *c)
{
    struct bufferevent *bev = c->bev;

    conn_free(c);
    bufferevent_decref(bev);
}

/*
 * Makes room for a new connection: closes the oldest idle connection with nothing left to write, or
 * else answers 408 to the connection whose head started first. 0 when every connection is further on.
 */
static int evict(struct http_guard *g)
{
    struct http_conn *v;
    struct http_conn *slowest = NULL;

    for (v = g->idle_head; v; v = v->idle_next) {
        if (v->state == C_LINGER ||
            (v->state == C_IDLE && evbuffer_get_length(bufferevent_get_output(v->bev)) == 0)) {
            g->evicted++;
            conn_close(v);
            return 1;
        }
    }
    for (v = g->conns; v; v = v->next) {
        if (v->state == C_HEAD && (slowest == NULL || v->head_started < slowest->head_started))
            slowest = v;
    }
    if (slowest == NULL)
        return 0;
    g->evicted++;
    reject_limit(slowest, 408,
                 "request head not complete while the server is full (the server's max_connections, %d)",
                 g->limits.max_connections);
    return 1;
}

/*
 * Right after the accept (the loop runs it before any read on the connection): learns evhttp's
 * connection object, hooks its close, and applies the connection cap. Returns 0 when c is gone or
 * being refused.
 */
static int conn_attach(struct http_conn *c)
{
    struct http_guard *g = c->g;
    bufferevent_data_cb readcb = NULL;
    void *cbarg = NULL;

    bufferevent_getcb(c->bev, &readcb, NULL, NULL, &cbarg);
    if (readcb == NULL || cbarg == NULL) {
        conn_forget(c);
        return 0;
    }
    c->evcon = cbarg;
    bufferevent_decref(c->bev);
    c->fd = bufferevent_getfd(c->bev);
    /* Nagle's algorithm off, once per connection: without it a small write (the next SSE event of a
     * stream, a reply on a reused keep-alive connection) waits for the ACK of the previous one, which
     * the client delays by up to 40 ms. */
    if (c->fd >= 0)
        setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &(int){ 1 }, sizeof(int));
    evhttp_connection_set_closecb(c->evcon, conn_closed, c);
    c->state = C_IDLE;
    c->accepted = monotonic_seconds();
    if (table_set(c->fd, c) != 0) {
        g->rejected++;
        conn_reject(c, 503, "Service Unavailable", "out of memory");
        return 0;
    }
    if (g->nconns > g->limits.max_connections && !evict(g)) {
        g->refused++;
        reject_limit(c, 503, "too many connections: more than %d (the server's max_connections); try again",
                     g->limits.max_connections);
        return 0;
    }
    idle_push(c);
    arm(c, g->limits.header_timeout);
    return 1;
}

static void busy_watch(struct http_conn *c);

static void conn_timer(evutil_socket_t fd, short what, void *arg)
{
    struct http_conn *c = arg;
    const struct http_limits *lim = &c->g->limits;
    struct evbuffer *input;

    (void)fd;
    (void)what;
    switch (c->state) {
    case C_NEW:
        conn_attach(c);
        return;
    case C_IDLE:
        if (c->rescan) {
            /* Bytes of the next request came with the last one (pipelining): scan them now. */
            c->rescan = 0;
            input = bufferevent_get_input(c->bev);
            arm(c, lim->idle_timeout);
            if (evbuffer_get_length(input) > 0) {
                head_start(c);
                scan_input(c, input, 0, evbuffer_get_length(input));
            }
            return;
        }
        if (evbuffer_get_length(bufferevent_get_output(c->bev)) > 0) {
            arm(c, lim->idle_timeout); /* the last reply is still going out */
            return;
        }
        conn_close(c);
        return;
    case C_HEAD:
        reject_limit(c, 408, "request head not complete after %g s (the server's header_timeout)",
                     lim->header_timeout);
        return;
    case C_BODY:
        reject_limit(c, 408, "request body stalled: no byte for %g s (the server's body_timeout)",
                     lim->body_timeout);
        return;
    case C_LINGER:
        conn_close(c);
        return;
    case C_BUSY:
        busy_watch(c);
        return;
    }
}

/* evhttp asks for a new connection's bufferevent (no socket attached yet). */
static struct bufferevent *new_bufferevent(struct event_base *base, void *arg)
{
    struct http_guard *g = arg;
    struct bufferevent *bev = bufferevent_socket_new(base, -1, 0);
    struct http_conn *c;

    if (bev == NULL)
        return NULL;
    c = calloc(1, sizeof(*c));
    if (c == NULL)
        return bev; /* untracked: its requests get 503 */
    c->timer = evtimer_new(base, conn_timer, c);
    c->input_cb = evbuffer_add_cb(bufferevent_get_input(bev), input_cb, c);
    if (c->timer == NULL || c->input_cb == NULL) {
        if (c->input_cb)
            evbuffer_remove_cb_entry(bufferevent_get_input(bev), c->input_cb);
        if (c->timer)
            event_free(c->timer);
        free(c);
        return bev;
    }
    c->g = g;
    c->bev = bev;
    c->fd = -1;
    c->state = C_NEW;
    c->next = g->conns;
    if (g->conns)
        g->conns->prev = c;
    g->conns = c;
    g->nconns++;
    /* Keeps the bufferevent's memory ours until attached, even if evhttp gives it up before. */
    bufferevent_incref(bev);
    event_active(c->timer, EV_TIMEOUT, 1);
    return bev;
}

/*
 * While a request is with the handler evhttp does not read the connection, so a client that goes
 * away would be noticed only when the reply is written. The handler may wait a long time before that
 * (an upstream that has not answered yet), so the socket is watched meanwhile: EOF or an error means
 * the client is gone (nginx does the same), and the connection is closed at once, which tells the
 * handler (on_close), and through it the transfers tied to the client. Bytes waiting are the next
 * request, pipelined: the watch stops, as nothing more can be told until evhttp reads them.
 */
static void busy_read(evutil_socket_t fd, short what, void *arg)
{
    struct http_conn *c = arg;
    char b;
    ssize_t n;

    (void)what;
    n = recv(fd, &b, 1, MSG_PEEK | MSG_DONTWAIT);
    if (n > 0) {
        event_del(c->gone);
        return;
    }
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
        return;
    conn_close(c);
}

static void busy_watch(struct http_conn *c)
{
    if (c->gone == NULL)
        c->gone = event_new(c->g->base, c->fd, EV_READ | EV_PERSIST, busy_read, c);
    if (c->gone)
        event_add(c->gone, NULL); /* without it, a client leaving is noticed at the first write */
}

static void guard_request(struct evhttp_request *req, void *arg)
{
    struct http_guard *g = arg;
    struct evhttp_connection *evcon = evhttp_request_get_connection(req);
    struct http_conn *c = evcon ? conn_of(evcon) : NULL;

    if (c == NULL) {
        evhttp_send_error(req, 503, "Service Unavailable");
        return;
    }
    if (c->state == C_LINGER || c->state == C_BUSY)
        return; /* being closed: evhttp frees the request with the connection */
    evtimer_del(c->timer);
    body_release(c);
    idle_remove(c);
    c->state = C_BUSY;
    c->requests++;
    arm(c, BUSY_WATCH_AFTER); /* then busy_watch */
    g->on_request(req, c, g->arg);
}

/* ---- the interface --------------------------------------------------------------------------- */

struct http_guard *http_guard_new(struct event_base *base, const struct http_limits *limits,
                                  http_request_fn on_request, http_close_fn on_close, void *arg)
{
    struct http_guard *g = calloc(1, sizeof(*g));
    struct timeval io;
    double longest = IO_TIMEOUT;

    if (g == NULL)
        return NULL;
    g->http = evhttp_new(base);
    if (g->http == NULL) {
        free(g);
        return NULL;
    }
    g->base = base;
    g->limits = *limits;
    if (g->limits.max_body_memory < g->limits.max_body_size)
        g->limits.max_body_memory = g->limits.max_body_size;
    g->on_request = on_request;
    g->on_close = on_close;
    g->arg = arg;
    /* evhttp's own head limit stays as a backstop (it answers 400) for heads we did not scan. */
    evhttp_set_max_headers_size(g->http, (ev_ssize_t)g->limits.max_header_size);
    evhttp_set_max_body_size(g->http, (ev_ssize_t)g->limits.max_body_size);
    if (limits->header_timeout > longest)
        longest = limits->header_timeout;
    if (limits->body_timeout > longest)
        longest = limits->body_timeout;
    if (limits->idle_timeout > longest)
        longest = limits->idle_timeout;
    io.tv_sec = (time_t)longest;
    io.tv_usec = 0;
    evhttp_set_timeout_tv(g->http, &io);
    evhttp_set_bevcb(g->http, new_bufferevent, g);
    evhttp_set_gencb(g->http, guard_request, g);
    guards_alive++;
    return g;
}

struct evhttp *http_guard_evhttp(struct http_guard *g)
{
    return g->http;
}

void http_guard_free(struct http_guard *g)
{
    if (g == NULL)
        return;
    evhttp_free(g->http); /* every attached connection: conn_closed */
    while (g->conns) {
        if (g->conns->state == C_NEW)
            conn_forget(g->conns);
        else
            conn_free(g->conns);
    }
    free(g);
    if (--guards_alive == 0) {
        free(by_fd);
        by_fd = NULL;
        by_fd_len = 0;
    }
}

void http_conn_set_user(struct http_conn *c, void *user)
{
    c->user = user;
}

void http_conn_done(struct http_conn *c)
{
    c->user = NULL;
    if (c->state != C_BUSY)
        return;
    if (c->gone)
        event_del(c->gone);
    c->state = C_IDLE;
    idle_push(c);
    arm(c, c->g->limits.idle_timeout);
    /* The reply may be sent (and the connection freed) right after this: scan from the loop. */
    if (evbuffer_get_length(bufferevent_get_input(c->bev)) > 0) {
        c->rescan = 1;
        event_active(c->timer, EV_TIMEOUT, 1);
    }
}

void http_guard_stats(const struct http_guard *g, struct http_guard_stats *out)
{
    out->connections = g->nconns;
    out->body_bytes = g->body_bytes;
    out->refused = g->refused;
    out->evicted = g->evicted;
    out->rejected = g->rejected;
}
