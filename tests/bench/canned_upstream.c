/*
 * canned_upstream.c: the benchmark's upstream. An evhttp server on loopback that answers every request
 * with the same small chat.completion JSON, optionally after a fixed delay, so that a client's cost per
 * request can be measured without a real model behind it.
 *
 * Usage: canned_upstream PORT [DELAY_MS]   (PORT 0: any free port). Prints "listening PORT" on stdout
 * once it accepts connections, then serves until killed. Used by tests/bench/run.sh.
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

static const char reply_body[] =
    "{\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion\",\"created\":1700000000,"
    "\"model\":\"bench-model\",\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\","
    "\"content\":\"Hello from the canned upstream.\"},\"finish_reason\":\"stop\"}],"
    "\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":6,\"total_tokens\":15}}";

static struct event_base *base;
static struct timeval delay;
static int delayed;

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

static void request_cb(struct evhttp_request *req, void *arg)
{
    struct pending_reply *p;

    (void)arg;
    no_delay(req);
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
        fprintf(stderr, "usage: canned_upstream PORT [DELAY_MS]\n");
        return 2;
    }
    port = atoi(argv[1]);
    delay_ms = argc > 2 ? atol(argv[2]) : 0;
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
