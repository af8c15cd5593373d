/*
 * fuzz_http_request.c: libFuzzer harness for the HTTP server's request parsing, that is evhttp under
 * the guard's limits (src/http_guard.c), set up by the same call core.listen makes.
 *
 * An input is what one client sends on one connection, after a first byte that says how: the size of
 * each write (1 << (byte & 15) bytes, one write per loop turn, so heads are cut at every place),
 * whether the client then shuts its side and reads until the server closes (bit 4 clear) or closes at
 * once, and whether four other connections are opened first (bit 5), so that this one is over the
 * connection cap: idle ones, of which the oldest is closed for it; with bit 6, ones that have sent
 * part of a head, of which the first gets 408 for it; with bit 7, ones holding unfinished bodies, so
 * that this one is refused (503), or with bits 6 and 7 bodies large enough to pass max_body_memory
 * (the last of them gets 503 and this one takes its place). The server is a real evhttp on an event
 * loop, listening on a Unix socket in the abstract namespace; its handler answers each request at
 * once (a path with "chunked" in it gets a chunked reply), as a Lua handler may.
 *
 * Checked on every input: no request reaches the handler past a limit (header count, bytes of the
 * request line and headers, body bytes); once the client is gone the guard holds no connection and
 * no body byte; nothing hangs (the exchange ends within 20 s). ASan and LSan check the memory.
 */
#include <errno.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <event2/buffer.h>
#include <event2/event.h>
#include <event2/http.h>
#include <event2/keyvalq_struct.h>

#include "../../src/http_guard.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* Small limits, so that short inputs reach them. */
static const struct http_limits limits = { 1024, 8, 4096, 6000, 4, 20.0, 20.0, 20.0 };

static struct event_base *base;
static struct http_guard *guard;
static struct event *watchdog;
static struct sockaddr_un addr;
static socklen_t addr_len;

#define EXTRA 4

struct client {
    evutil_socket_t fd;
    const uint8_t *data;
    size_t size;
    size_t sent;
    size_t piece;
    int linger; /* shut the write side and read until the server closes */
    struct event *on_write;
    struct event *on_read;
};

static void fail(const char *what)
{
    fprintf(stderr, "fuzz_http_request: %s\n", what);
    abort();
}

static void on_request(struct evhttp_request *req, struct http_conn *conn, void *arg)
{
    struct evkeyvalq *in = evhttp_request_get_input_headers(req);
    size_t body = evbuffer_get_length(evhttp_request_get_input_buffer(req));
    size_t head = strlen(evhttp_request_get_uri(req));
    struct evkeyval *kv;
    struct evbuffer *out;
    int n = 0;

    (void)arg;
    for (kv = in->tqh_first; kv; kv = kv->next.tqe_next) {
        n++;
        head += strlen(kv->key) + strlen(kv->value);
    }
    if (n > limits.max_headers)
        fail("a request with more headers than max_headers reached the handler");
    if (head > limits.max_header_size)
        fail("a request with a head larger than max_header_size reached the handler");
    if (body > limits.max_body_size)
        fail("a request with a body larger than max_body_size reached the handler");
    /* As http_server.c does: the connection is released before the reply, which may free it. */
    http_conn_done(conn);
    out = evbuffer_new();
    if (out == NULL)
        fail("out of memory");
    evbuffer_add_printf(out, "%zu %d\n", body, n);
    if (strstr(evhttp_request_get_uri(req), "chunked")) {
        evhttp_send_reply_start(req, 200, "OK");
        evhttp_send_reply_chunk(req, out);
        evhttp_send_reply_end(req);
    } else {
        evhttp_send_reply(req, 200, "OK", out);
    }
    evbuffer_free(out);
}

static void on_close(void *user, void *arg)
{
    (void)user;
    (void)arg;
    fail("the close of a connection without user data was reported");
}

static void hang(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    (void)arg;
    fail("the exchange did not end within 20 s");
}

static void setup(void)
{
    evutil_socket_t fd;

    signal(SIGPIPE, SIG_IGN); /* as aigate's main: a client gone is an error return, not a signal */
    base = event_base_new();
    guard = base ? http_guard_new(base, &limits, on_request, on_close, NULL) : NULL;
    watchdog = base ? evtimer_new(base, hang, NULL) : NULL;
    if (guard == NULL || watchdog == NULL)
        fail("cannot set up the server");
    memset(&addr, 0, sizeof(addr));
    addr.sun_family = AF_UNIX;
    /* The abstract namespace: no file, and one name per process so parallel jobs do not meet. */
    snprintf(addr.sun_path + 1, sizeof(addr.sun_path) - 1, "aigate-fuzz-http-%ld", (long)getpid());
    addr_len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + strlen(addr.sun_path + 1));
    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0 || bind(fd, (struct sockaddr *)&addr, addr_len) != 0 || listen(fd, 64) != 0)
        fail("cannot listen on a Unix socket");
    if (evhttp_accept_socket_with_handle(http_guard_evhttp(guard), fd) == NULL)
        fail("evhttp does not accept on the socket");
    evhttp_set_allowed_methods(http_guard_evhttp(guard), EVHTTP_REQ_GET | EVHTTP_REQ_POST | EVHTTP_REQ_HEAD |
                                                             EVHTTP_REQ_PUT | EVHTTP_REQ_DELETE |
                                                             EVHTTP_REQ_OPTIONS | EVHTTP_REQ_PATCH);
}

static evutil_socket_t connect_client(void)
{
    evutil_socket_t fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);

    if (fd < 0 || connect(fd, (struct sockaddr *)&addr, addr_len) != 0)
        fail("cannot connect to the server");
    return fd;
}

/* A head announcing 4000 bytes of body, then n of them. */
static void send_unfinished_body(evutil_socket_t fd, size_t n)
{
    static const char head[] = "POST / HTTP/1.1\r\nContent-Length: 4000\r\n\r\n";
    char body[2000];

    memset(body, 'b', sizeof(body));
    if (n > sizeof(body) || send(fd, head, sizeof(head) - 1, MSG_NOSIGNAL) != (ssize_t)(sizeof(head) - 1) ||
        send(fd, body, n, MSG_NOSIGNAL) != (ssize_t)n)
        fail("cannot send an unfinished body");
}

static void client_done(struct client *c)
{
    event_del(c->on_write);
    event_del(c->on_read);
    event_base_loopbreak(base);
}

static void client_write(evutil_socket_t fd, short what, void *arg)
{
    struct client *c = arg;
    size_t n = c->size - c->sent;
    ssize_t w;

    (void)what;
    if (n > c->piece)
        n = c->piece;
    if (n > 0) {
        w = send(fd, c->data + c->sent, n, MSG_NOSIGNAL);
        if (w > 0)
            c->sent += (size_t)w;
        else if (w < 0 && errno != EAGAIN && errno != EINTR)
            c->sent = c->size; /* the server closed: nothing more to send */
    }
    if (c->sent < c->size)
        return;
    event_del(c->on_write);
    if (!c->linger) {
        client_done(c);
        return;
    }
    shutdown(fd, SHUT_WR);
}

static void client_read(evutil_socket_t fd, short what, void *arg)
{
    struct client *c = arg;
    char buf[16384];
    ssize_t r;

    (void)what;
    r = recv(fd, buf, sizeof(buf), 0);
    if (r > 0 || (r < 0 && (errno == EAGAIN || errno == EINTR)))
        return;
    client_done(c); /* the server closed (or reset) the connection */
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct client c;
    struct http_guard_stats st;
    struct timeval limit = { 20, 0 };
    evutil_socket_t extra[EXTRA];
    int extras = 0;
    int i;

    if (size < 1)
        return 0;
    if (base == NULL)
        setup();
    memset(&c, 0, sizeof(c));
    c.piece = (size_t)1 << (data[0] & 15);
    c.linger = !(data[0] & 16);
    c.data = data + 1;
    c.size = size - 1;
    if (data[0] & 32) {
        for (extras = 0; extras < EXTRA; extras++) {
            extra[extras] = connect_client();
            if (data[0] & 128)
                send_unfinished_body(extra[extras], (data[0] & 64) ? 1600 : 1400);
            else if ((data[0] & 64) && send(extra[extras], "GET / HTTP/1.1\r\nX: ", 19, MSG_NOSIGNAL) != 19)
                fail("cannot send a partial head");
        }
        /* The server accepts them, then reads their heads, before the fuzzed connection comes. */
        for (i = 0; i < 3; i++)
            event_base_loop(base, EVLOOP_NONBLOCK);
    }
    c.fd = connect_client();
    c.on_write = event_new(base, c.fd, EV_WRITE | EV_PERSIST, client_write, &c);
    c.on_read = event_new(base, c.fd, EV_READ | EV_PERSIST, client_read, &c);
    if (c.on_write == NULL || c.on_read == NULL)
        fail("out of memory");
    event_add(c.on_write, NULL);
    if (c.linger)
        event_add(c.on_read, NULL);
    evtimer_add(watchdog, &limit);
    event_base_dispatch(base);
    event_free(c.on_write);
    event_free(c.on_read);
    close(c.fd);
    for (i = 0; i < extras; i++)
        close(extra[i]);
    /* The server sees the close on its next turns; every connection must then be gone. */
    for (http_guard_stats(guard, &st); st.connections > 0; http_guard_stats(guard, &st))
        event_base_loop(base, EVLOOP_ONCE);
    evtimer_del(watchdog);
    if (st.body_bytes != 0)
        fail("body bytes are still counted with no connection open");
    return 0;
}
