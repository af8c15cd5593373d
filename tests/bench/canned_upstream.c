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
 */
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

static const char *stats_path;
static unsigned long request_count;
static unsigned long answered_200, answered_429, answered_503;

struct pending_reply {
    struct evhttp_request *req;
    struct event *timer;
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

static void delayed_cb(evutil_socket_t fd, short what, void *arg)
{
    struct pending_reply *p = arg;

    (void)fd;
    (void)what;
    send_reply(p->req);
    event_free(p->timer);
    free(p);
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

    (void)arg;
    no_delay(req);
    if (log_path)
        log_request(req);
    if (refused(req))
        return;
    if (!delayed) {
        send_reply(req);
        return;
    }
    p = malloc(sizeof(*p));
    if (p == NULL) {
        evhttp_send_error(req, 503, "out of memory");
        return;
    }
    p->req = req;
    p->timer = evtimer_new(base, delayed_cb, p);
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

static int usage(void)
{
    fprintf(stderr, "usage: canned_upstream [--rps N] [--fail-rate P] [--seed S] [--stats FILE] "
                    "PORT [DELAY_MS [LOG]]\n");
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
        else
            return -1;
    }
    if (rps < 0 || fail_rate < 0 || fail_rate > 1)
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
    sock = evhttp_bind_socket_with_handle(http, "127.0.0.1", (ev_uint16_t)port);
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
