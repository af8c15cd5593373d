/*
 * canned_upstream.c: the benchmark's upstream. An evhttp server on loopback that answers every request
 * with the same small chat.completion JSON, optionally after a fixed delay, so that a client's cost per
 * request can be measured without a real model behind it.
 *
 * Usage: canned_upstream [OPTIONS] PORT [DELAY_MS [LOG]]   (PORT 0: any free port). Prints "listening
 * PORT" on stdout once it accepts connections, then serves until SIGTERM or SIGINT. With LOG, the first
 * request received (method, URI, headers but Host, body) is written to that file, for checking that two
 * clients send the same request. Every reply carries an x-request-id header.
 *
 * Options, for measuring how a client copes with an upstream that says no (tests/bench/limits.sh):
 *   --rps N         at most N requests per second: a token bucket of N tokens, refilled at N per second,
 *                   full at start (so a burst of N passes at once, then N per second on average). A
 *                   request that finds no token is answered 429 at once, with "Retry-After: 1" and
 *                   an OpenAI-style rate-limit error body.
 *   --fail-rate P   answer that share (0..1) of the requests that passed the limit with 503 and an
 *                   OpenAI-style server error body, at once; which ones is drawn at random.
 *   --seed S        the seed of that draw (default 1): the same seed, the same sequence of answers.
 *   --stats FILE    on SIGTERM or SIGINT, write "200 N 429 N 503 N" (the replies sent) to FILE.
 * Errors are answered without the delay; only successes wait DELAY_MS.
 *
 * Streaming, for measuring a proxy in front of it (tests/bench/serve.sh): a request whose body has
 * "stream":true is answered as OpenAI streams, text/event-stream in chunks: EVENTS chat.completion.chunk
 * events, a usage chunk and "data: [DONE]", after the same DELAY_MS ("hold then answer").
 *   --events N      the content events of a streamed reply (default 5)
 *   --drip MS       spread them over MS milliseconds: the first at once, the last MS later, the usage
 *                   chunk and [DONE] with the last (default 0: all at once)
 *   --events-log F  append "arrived T" when a request arrives and "closed T" when the client of a
 *                   request not yet fully answered goes away (T: CLOCK_MONOTONIC seconds, the clock
 *                   of every process on the machine), a line each, written at once: how long a proxy
 *                   takes to cancel its upstream request after its own client left.
 */
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <event2/http.h>
#include <event2/keyvalq_struct.h>
#include <event2/util.h>

#include "bench.h"

static const char reply_body[] =
    "{\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion\",\"created\":1700000000,"
    "\"model\":\"bench-model\",\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\","
    "\"content\":\"Hello from the canned upstream.\"},\"finish_reason\":\"stop\"}],"
    "\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":6,\"total_tokens\":15}}";

static const char rate_limit_body[] = "{\"error\":{\"message\":\"Rate limit reached\",\"type\":\"requests\","
                                      "\"code\":\"rate_limit_exceeded\"}}";

static const char unavailable_body[] =
    "{\"error\":{\"message\":\"The server is overloaded, please try again later\","
    "\"type\":\"server_error\",\"code\":\"service_unavailable\"}}";

/* One event of a streamed reply; %d is its index. */
static const char chunk_event[] =
    "data: {\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,"
    "\"model\":\"bench-model\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"token %d \"},"
    "\"finish_reason\":null}]}\n\n";

static const char usage_event[] =
    "data: {\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,"
    "\"model\":\"bench-model\",\"choices\":[],"
    "\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":6,\"total_tokens\":15}}\n\n"
    "data: [DONE]\n\n";

static struct event_base *base;
static struct timeval delay;
static int delayed;
static const char *log_path; /* NULL once the first request is logged */

/* The rate limit: a token bucket (rps 0: no limit). */
static double rps;
static double tokens;
static double refilled_at; /* monotonic seconds of the last refill */

static double fail_rate;
static uint64_t rng_state = 1;

static int stream_events = 5;
static long drip_ms;
static FILE *events_log;

static const char *stats_path;
static unsigned long request_count;
static unsigned long answered_200, answered_429, answered_503;

/* A request answered later: held for DELAY_MS, streamed, or both. */
struct pending_reply {
    struct evhttp_request *req;
    struct evhttp_connection *conn; /* its connection while the client is there, else NULL */
    struct event *timer;
    struct event *watch; /* while held: the client's socket, to log its close (evhttp does not look) */
    int streamed;
    int sent; /* content events sent */
};

/* Sends STATUS with BODY (static) and an x-request-id header numbering the replies. */
static void send_canned(struct evhttp_request *req, int status, const char *reason, const char *body,
                        size_t len)
{
    struct evbuffer *out = evhttp_request_get_output_buffer(req);
    struct evkeyvalq *headers = evhttp_request_get_output_headers(req);
    char id[32];

    snprintf(id, sizeof(id), "req_bench%lu", ++request_count);
    evhttp_add_header(headers, "Content-Type", "application/json");
    evhttp_add_header(headers, "x-request-id", id);
    if (status == 429)
        evhttp_add_header(headers, "Retry-After", "1");
    evbuffer_add_reference(out, body, len, NULL, NULL);
    evhttp_send_reply(req, status, reason, NULL);
}

static void send_reply(struct evhttp_request *req)
{
    answered_200++;
    send_canned(req, 200, "OK", reply_body, sizeof(reply_body) - 1);
}

/* Takes a token from the bucket: 1 when the request may pass, 0 when it is over the limit. */
static int take_token(void)
{
    double t = bench_now();

    tokens += (t - refilled_at) * rps;
    if (tokens > rps)
        tokens = rps;
    refilled_at = t;
    if (tokens < 1.0)
        return 0;
    tokens -= 1.0;
    return 1;
}

/* Answers an error when the request is over the limit or drawn to fail: 1 if it did, else 0. */
static int refused(struct evhttp_request *req)
{
    if (rps > 0 && !take_token()) {
        answered_429++;
        send_canned(req, 429, "Too Many Requests", rate_limit_body, sizeof(rate_limit_body) - 1);
        return 1;
    }
    if (fail_rate > 0 && bench_random(&rng_state) < fail_rate) {
        answered_503++;
        send_canned(req, 503, "Service Unavailable", unavailable_body, sizeof(unavailable_body) - 1);
        return 1;
    }
    return 0;
}

/* Writes "WHAT T" to the events log, at once. */
static void log_event(const char *what)
{
    if (events_log) {
        fprintf(events_log, "%s %.6f\n", what, bench_now());
        fflush(events_log);
    }
}

/* The client of a pending reply went away (the connection's close callback): logged; the reply is
 * finished all the same (evhttp then frees the request, whose connection is gone). */
static void client_closed_cb(struct evhttp_connection *conn, void *arg)
{
    struct pending_reply *p = arg;

    (void)conn;
    p->conn = NULL;
    log_event("closed");
}

static void stop_watch(struct pending_reply *p)
{
    if (p->watch) {
        event_free(p->watch);
        p->watch = NULL;
    }
}

/* Done with P: the close callback off its connection (kept alive for the next request), P freed. */
static void finish_pending(struct pending_reply *p)
{
    stop_watch(p);
    if (p->conn)
        evhttp_connection_set_closecb(p->conn, NULL, NULL);
    event_free(p->timer);
    free(p);
}

/* The client's socket is readable while its request is held: its end (EOF or an error) is logged
 * and the connection dropped with the request; anything else it sent (a pipelined request) is left
 * to evhttp, and the watch ends. */
static void watch_cb(evutil_socket_t fd, short what, void *arg)
{
    struct pending_reply *p = arg;
    char c;
    ssize_t n = recv(fd, &c, 1, MSG_PEEK | MSG_DONTWAIT);

    (void)what;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
        return;
    stop_watch(p);
    if (n > 0)
        return;
    log_event("closed");
    evhttp_connection_set_closecb(p->conn, NULL, NULL);
    evhttp_connection_free(p->conn); /* frees the request too */
    event_free(p->timer);
    free(p);
}

/* Sends the next event of a streamed reply; after the last, the usage chunk, [DONE] and the end. */
static void stream_next(struct pending_reply *p)
{
    struct evbuffer *chunk = evbuffer_new();
    int last = p->sent + 1 >= stream_events;

    if (chunk == NULL || p->conn == NULL) {
        if (chunk)
            evbuffer_free(chunk);
        evhttp_send_reply_end(p->req);
        finish_pending(p);
        return;
    }
    evbuffer_add_printf(chunk, chunk_event, p->sent++);
    if (last)
        evbuffer_add(chunk, usage_event, sizeof(usage_event) - 1);
    evhttp_send_reply_chunk(p->req, chunk);
    evbuffer_free(chunk);
    if (last) {
        evhttp_send_reply_end(p->req);
        finish_pending(p);
        return;
    }
    if (drip_ms > 0) {
        long gap_us = drip_ms * 1000 / (stream_events > 1 ? stream_events - 1 : 1);
        struct timeval gap = { gap_us / 1000000, gap_us % 1000000 };
        evtimer_add(p->timer, &gap);
    } else {
        stream_next(p);
    }
}

/* Starts a streamed reply: the status line and headers, then the first event. */
static void stream_start(struct pending_reply *p)
{
    struct evkeyvalq *headers = evhttp_request_get_output_headers(p->req);
    char id[32];

    answered_200++;
    snprintf(id, sizeof(id), "req_bench%lu", ++request_count);
    evhttp_add_header(headers, "Content-Type", "text/event-stream");
    evhttp_add_header(headers, "Cache-Control", "no-cache");
    evhttp_add_header(headers, "x-request-id", id);
    evhttp_send_reply_start(p->req, 200, "OK");
    stream_next(p);
}

/* The timer of a pending reply: the hold is over (answer or start the stream), or the next event. */
static void pending_cb(evutil_socket_t fd, short what, void *arg)
{
    struct pending_reply *p = arg;

    (void)fd;
    (void)what;
    stop_watch(p);
    if (!p->streamed) {
        if (p->conn)
            send_reply(p->req);
        else
            evhttp_send_reply_end(p->req); /* the client left: only frees the request */
        finish_pending(p);
    } else if (p->sent == 0) {
        if (p->conn)
            stream_start(p);
        else {
            evhttp_send_reply_end(p->req);
            finish_pending(p);
        }
    } else {
        stream_next(p);
    }
}

/* 1 when the request's body asks for a stream ("stream":true, as clients and proxies write it). */
static int wants_stream(struct evhttp_request *req)
{
    struct evbuffer *body = evhttp_request_get_input_buffer(req);
    size_t n = evbuffer_get_length(body);
    const char *data = n ? (const char *)evbuffer_pullup(body, (ev_ssize_t)n) : NULL;
    size_t i;

    for (i = 0; data && i + 13 <= n; i++)
        if (memcmp(data + i, "\"stream\":true", 13) == 0 ||
            (i + 14 <= n && memcmp(data + i, "\"stream\": true", 14) == 0))
            return 1;
    return 0;
}

/* TCP_NODELAY on the request's connection, as servers in front of real APIs set it: a reply goes
 * out at once, never held back by Nagle's algorithm until the client's delayed ACK. */
static void no_delay(struct evhttp_request *req)
{
    struct evhttp_connection *conn = evhttp_request_get_connection(req);
    struct bufferevent *bev = conn ? evhttp_connection_get_bufferevent(conn) : NULL;
    int one = 1;

    if (bev)
        setsockopt(bufferevent_getfd(bev), IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

/* Writes the first request to log_path: "METHOD URI", the headers in the order received (Host left
 * out: its port differs), a blank line and the body. */
static void log_request(struct evhttp_request *req)
{
    struct evkeyvalq *headers = evhttp_request_get_input_headers(req);
    struct evbuffer *body = evhttp_request_get_input_buffer(req);
    struct evkeyval *h;
    FILE *f = fopen(log_path, "w");
    size_t n;
    char *data;

    log_path = NULL;
    if (f == NULL)
        return;
    fprintf(f, "%s %s\n", evhttp_request_get_command(req) == EVHTTP_REQ_POST ? "POST" : "OTHER",
            evhttp_request_get_uri(req));
    for (h = headers->tqh_first; h; h = h->next.tqe_next)
        if (evutil_ascii_strcasecmp(h->key, "Host") != 0)
            fprintf(f, "%s: %s\n", h->key, h->value);
    fputc('\n', f);
    n = evbuffer_get_length(body);
    data = (char *)evbuffer_pullup(body, (ev_ssize_t)n);
    if (data)
        fwrite(data, 1, n, f);
    fclose(f);
}

static void request_cb(struct evhttp_request *req, void *arg)
{
    struct pending_reply *p;
    int streamed;

    (void)arg;
    no_delay(req);
    if (log_path)
        log_request(req);
    log_event("arrived");
    if (refused(req))
        return;
    streamed = wants_stream(req);
    if (!delayed && !streamed) {
        send_reply(req);
        return;
    }
    p = calloc(1, sizeof(*p));
    if (p == NULL) {
        evhttp_send_error(req, 503, "out of memory");
        return;
    }
    p->req = req;
    p->streamed = streamed;
    p->conn = evhttp_request_get_connection(req);
    p->timer = evtimer_new(base, pending_cb, p);
    if (p->conn)
        evhttp_connection_set_closecb(p->conn, client_closed_cb, p);
    if (!delayed) {
        stream_start(p);
        return;
    }
    if (events_log && p->conn) {
        p->watch = event_new(base, bufferevent_getfd(evhttp_connection_get_bufferevent(p->conn)),
                             EV_READ | EV_PERSIST, watch_cb, p);
        if (p->watch)
            event_add(p->watch, NULL);
    }
    evtimer_add(p->timer, &delay);
}

/* SIGTERM or SIGINT: stop serving, so that main writes the counts. */
static void stop_cb(evutil_socket_t sig, short what, void *arg)
{
    (void)sig;
    (void)what;
    (void)arg;
    event_base_loopbreak(base);
}

static void write_stats(void)
{
    FILE *f;

    if (stats_path == NULL)
        return;
    f = fopen(stats_path, "w");
    if (f == NULL) {
        fprintf(stderr, "canned_upstream: cannot write %s\n", stats_path);
        return;
    }
    fprintf(f, "200 %lu 429 %lu 503 %lu\n", answered_200, answered_429, answered_503);
    fclose(f);
}

/* Binds 127.0.0.1:PORT with a deep accept queue (evhttp's own binding asks for 128: a thousand
 * connections at once would overflow it, and each SYN dropped costs the client a second). */
static evutil_socket_t listen_loopback(int port)
{
    struct sockaddr_in sa;
    evutil_socket_t fd = socket(AF_INET, SOCK_STREAM, 0);

    if (fd < 0)
        return -1;
    memset(&sa, 0, sizeof(sa));
    sa.sin_family = AF_INET;
    sa.sin_port = htons((unsigned short)port);
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (evutil_make_listen_socket_reuseable(fd) < 0 || evutil_make_socket_nonblocking(fd) < 0 ||
        bind(fd, (struct sockaddr *)&sa, sizeof(sa)) != 0 || listen(fd, 4096) != 0) {
        evutil_closesocket(fd);
        return -1;
    }
    return fd;
}

static int usage(void)
{
    fprintf(stderr, "usage: canned_upstream [--rps N] [--fail-rate P] [--seed S] [--stats FILE] [--events N] "
                    "[--drip MS] [--events-log FILE] PORT [DELAY_MS [LOG]]\n");
    return 2;
}

/* Reads the options that lead ARGV; returns the index of the first positional argument, or -1. */
static int parse_options(int argc, char **argv)
{
    int i;

    for (i = 1; i < argc && strncmp(argv[i], "--", 2) == 0; i += 2) {
        const char *opt = argv[i];
        const char *val = i + 1 < argc ? argv[i + 1] : NULL;
        if (val == NULL)
            return -1;
        if (strcmp(opt, "--rps") == 0)
            rps = atof(val);
        else if (strcmp(opt, "--fail-rate") == 0)
            fail_rate = atof(val);
        else if (strcmp(opt, "--seed") == 0)
            rng_state = strtoull(val, NULL, 10);
        else if (strcmp(opt, "--stats") == 0)
            stats_path = val;
        else if (strcmp(opt, "--events") == 0)
            stream_events = atoi(val);
        else if (strcmp(opt, "--drip") == 0)
            drip_ms = atol(val);
        else if (strcmp(opt, "--events-log") == 0) {
            events_log = fopen(val, "a");
            if (events_log == NULL) {
                fprintf(stderr, "canned_upstream: cannot write %s: %s\n", val, strerror(errno));
                return -1;
            }
        } else
            return -1;
    }
    if (rps < 0 || fail_rate < 0 || fail_rate > 1 || stream_events < 1 || drip_ms < 0)
        return -1;
    return i;
}

int main(int argc, char **argv)
{
    struct evhttp *http;
    struct evhttp_bound_socket *sock;
    struct event *sigterm, *sigint;
    struct rlimit rl;
    int port;
    long delay_ms;
    int first = parse_options(argc, argv);

    if (first < 0 || first >= argc)
        return usage();
    argv += first - 1;
    argc -= first - 1;
    port = atoi(argv[1]);
    delay_ms = argc > 2 ? atol(argv[2]) : 0;
    log_path = argc > 3 ? argv[3] : NULL;
    tokens = rps;
    refilled_at = bench_now();
    delayed = delay_ms > 0;
    delay.tv_sec = delay_ms / 1000;
    delay.tv_usec = (delay_ms % 1000) * 1000;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    {
        /* Precise timers (timerfd): the delay is what was asked for, not rounded up to the next
         * millisecond by epoll_wait's timeout. */
        struct event_config *cfg = event_config_new();
        if (cfg == NULL)
            return 1;
        event_config_set_flag(cfg, EVENT_BASE_FLAG_PRECISE_TIMER);
        base = event_base_new_with_config(cfg);
        event_config_free(cfg);
    }
    http = evhttp_new(base);
    if (base == NULL || http == NULL)
        return 1;
    evhttp_set_gencb(http, request_cb, NULL);
    {
        evutil_socket_t fd = listen_loopback(port);
        sock = fd < 0 ? NULL : evhttp_accept_socket_with_handle(http, fd);
    }
    if (sock == NULL) {
        fprintf(stderr, "canned_upstream: cannot listen on 127.0.0.1:%d\n", port);
        return 1;
    }
    {
        struct sockaddr_storage ss;
        ev_socklen_t len = sizeof(ss);
        evutil_socket_t fd = evhttp_bound_socket_get_fd(sock);
        getsockname(fd, (struct sockaddr *)&ss, &len);
        port = ntohs(((struct sockaddr_in *)&ss)->sin_port);
    }
    sigterm = evsignal_new(base, SIGTERM, stop_cb, NULL);
    sigint = evsignal_new(base, SIGINT, stop_cb, NULL);
    if (sigterm == NULL || sigint == NULL || evsignal_add(sigterm, NULL) < 0 ||
        evsignal_add(sigint, NULL) < 0)
        return 1;
    printf("listening %d\n", port);
    fflush(stdout);
    event_base_dispatch(base);
    write_stats();
    event_free(sigterm);
    event_free(sigint);
    evhttp_free(http);
    event_base_free(base);
    return 0;
}
