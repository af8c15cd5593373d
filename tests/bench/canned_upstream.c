/*
 * canned_upstream.c: the benchmark's upstream. An evhttp server on loopback that answers every request
 * with the same small chat.completion JSON, optionally after a fixed delay, so that a client's cost per
 * request can be measured without a real model behind it.
 *
 * Usage: canned_upstream PORT [DELAY_MS [LOG]]   (PORT 0: any free port). Prints "listening PORT" on
 * stdout once it accepts connections, then serves until killed. With LOG, the first request received
 * (method, URI, headers but Host, body) is written to that file, for checking that two clients send
 * the same request. Used by tests/bench/run.sh.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <event2/http.h>
#include <event2/keyvalq_struct.h>
#include <event2/util.h>

static const char reply_body[] =
    "{\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion\",\"created\":1700000000,"
    "\"model\":\"bench-model\",\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\","
    "\"content\":\"Hello from the canned upstream.\"},\"finish_reason\":\"stop\"}],"
    "\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":6,\"total_tokens\":15}}";

static struct event_base *base;
static struct timeval delay;
static int delayed;
static const char *log_path; /* NULL once the first request is logged */

struct pending_reply {
    struct evhttp_request *req;
    struct event *timer;
};

static void send_reply(struct evhttp_request *req)
{
    struct evbuffer *out = evhttp_request_get_output_buffer(req);
    struct evkeyvalq *headers = evhttp_request_get_output_headers(req);

    evhttp_add_header(headers, "Content-Type", "application/json");
    evbuffer_add_reference(out, reply_body, sizeof(reply_body) - 1, NULL, NULL);
    evhttp_send_reply(req, 200, "OK", NULL);
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

int main(int argc, char **argv)
{
    struct evhttp *http;
    struct evhttp_bound_socket *sock;
    struct rlimit rl;
    int port;
    long delay_ms;

    if (argc < 2) {
        fprintf(stderr, "usage: canned_upstream PORT [DELAY_MS [LOG]]\n");
        return 2;
    }
    port = atoi(argv[1]);
    delay_ms = argc > 2 ? atol(argv[2]) : 0;
    log_path = argc > 3 ? argv[3] : NULL;
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
    printf("listening %d\n", port);
    fflush(stdout);
    event_base_dispatch(base);
    evhttp_free(http);
    event_base_free(base);
    return 0;
}
