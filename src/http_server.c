/*
 * http_server.c: `core.listen`, an HTTP/1.1 server on libevent's evhttp whose requests are Lua tasks.
 *
 * Each request becomes a task running the server's handler with a request table and a response
 * object (`struct response`, a userdata). The response can be sent whole, streamed in chunks (SSE),
 * or cut: raw bytes written straight to the socket and the connection dropped, which the mock gateway
 * uses to simulate a broken upstream. When the client goes away before the reply is finished,
 * evhttp detaches the request and the guard calls on_close; we mark the response closed and the
 * request is freed by the final evhttp_send_reply or evhttp_request_free call, whichever path ends it.
 * The connections are evhttp's under a guard (http_guard.c) that applies the limits given to
 * core.listen: header size and count, body size, connections, and the header, body and keep-alive
 * timeouts. Used by the mock gateway (lua/aigate/mock.lua) and any script that serves HTTP.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <event2/http.h>
#include <event2/keyvalq_struct.h>
#include <lauxlib.h>
#include <lua.h>

#include "aigate.h"
#include "http.h"
#include "watch.h"
#include "http_guard.h"

#define SERVER_MT   "aigate.server"
#define RESPONSE_MT "aigate.response"

struct server {
    struct http_guard *guard;
    int handler_ref;
    int self_ref; /* an open server stays alive until closed */
    int port;
    struct server *next; /* all open servers, closed at shut-down */
    struct server *prev;
};

struct response {
    struct evhttp_request *req;      /* NULL once evhttp owns or has freed it */
    struct evhttp_connection *evcon; /* NULL once the client went away */
    struct http_conn *conn;          /* the guard's view of evcon; NULL once released or gone */
    int started;
    int finished;
    int closed;
    struct watch *watchers; /* transfers tied to this client (core.request's tied_to) */
};

static struct server *open_servers;

/* ---- response life cycle --------------------------------------------------------------------- */

/* The guard tells us the client went away before the reply was done. */
static void on_close(void *user, void *arg)
{
    struct response *r = user;

    (void)arg;
    r->closed = 1;
    r->evcon = NULL;
    r->conn = NULL;
    if (r->req && evhttp_request_get_connection(r->req) != NULL) {
        /* Still attached: evhttp frees it with the connection. */
        r->req = NULL;
        r->finished = 1;
    }
    watch_release_all(&r->watchers, 1);
}

/*
 * The reply is complete on our side: the connection may wait for its next request. Runs before the
 * last evhttp call of the reply, which may free the connection at once.
 */
static void release_conn(struct response *r)
{
    struct http_conn *c = r->conn;

    r->conn = NULL;
    if (c)
        http_conn_done(c);
}

static void add_headers(lua_State *L, int idx, struct evhttp_request *req)
{
    struct evkeyvalq *out = evhttp_request_get_output_headers(req);

    if (lua_isnoneornil(L, idx))
        return;
    luaL_checktype(L, idx, LUA_TTABLE);
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        const char *name = lua_tostring(L, -2);
        const char *value = lua_tostring(L, -1);
        if (name == NULL || value == NULL || lua_type(L, -2) != LUA_TSTRING)
            luaL_error(L, "bad header table (names must be strings, values strings or numbers)");
        evhttp_remove_header(out, name);
        evhttp_add_header(out, name, value);
        lua_pop(L, 1);
    }
}

/*
 * Writes what evhttp queued for the client now, in this turn of the loop, instead of in the next one:
 * the client has its reply before the handler goes on with what it does after replying (the request
 * log, the metrics) and before the loop collects garbage or runs other tasks. The write event evhttp
 * armed still fires: it finds the buffer empty (or writes what the socket did not take) and tells
 * evhttp the reply is out, as before. A failed write is left to that event too, which reports it.
 */
static void flush_now(struct evhttp_connection *evcon)
{
    struct bufferevent *bev;
    struct evbuffer *out;

    if (evcon == NULL)
        return;
    bev = evhttp_connection_get_bufferevent(evcon);
    out = bufferevent_get_output(bev);
    if (evbuffer_get_length(out) == 0)
        return;
    evbuffer_unfreeze(out, 1); /* a socket bufferevent's output is frozen at its start between writes */
    while (evbuffer_get_length(out) > 0 && evbuffer_write(out, bufferevent_getfd(bev)) > 0)
        ;
    evbuffer_freeze(out, 1);
}

/* Ends the response however far it got. Safe to call more than once. */
static void response_end(struct response *r, int status_if_unstarted)
{
    struct evhttp_request *req = r->req;

    if (r->finished || req == NULL) {
        r->finished = 1;
        return;
    }
    release_conn(r);
    r->finished = 1;
    r->req = NULL;
    if (r->started) {
        /* (Not flushed at once: a reply that is not chunked, to an HTTP/1.0 client, may be done
         * within this call, and its connection freed.) */
        evhttp_send_reply_end(req);
    } else {
        struct evbuffer *body = evbuffer_new();
        evbuffer_add_printf(body, "{\"error\":{\"message\":\"the handler sent no response\"}}\n");
        evhttp_add_header(evhttp_request_get_output_headers(req), "Content-Type", "application/json");
        evhttp_send_reply(req, status_if_unstarted, "Internal Server Error", body);
        evbuffer_free(body);
    }
}

static struct response *check_response(lua_State *L)
{
    return luaL_checkudata(L, 1, RESPONSE_MT);
}

int http_response_tie(lua_State *L, int idx, struct watch *w)
{
    struct response *r = luaL_testudata(L, idx, RESPONSE_MT);

    if (r == NULL)
        return -1;
    if (r->closed)
        return 1;
    watch_add(&r->watchers, w);
    return 0;
}

static int usable(lua_State *L, struct response *r)
{
    if (r->closed || r->req == NULL) {
        lua_pushnil(L);
        lua_pushstring(L, "closed");
        return 0;
    }
    return 1;
}

static int l_respond(lua_State *L)
{
    struct response *r = check_response(L);
    int status = (int)luaL_checkinteger(L, 2);
    size_t len = 0;
    const char *body = luaL_optlstring(L, 4, "", &len);
    struct evbuffer *buf;
    struct evhttp_request *req;

    if (!usable(L, r))
        return 2;
    if (r->started || r->finished)
        return luaL_error(L, "response already started");
    add_headers(L, 3, r->req);
    req = r->req;
    release_conn(r);
    r->finished = 1;
    r->req = NULL;
    buf = evbuffer_new();
    evbuffer_add(buf, body, len);
    evhttp_send_reply(req, status, NULL, buf);
    evbuffer_free(buf);
    flush_now(r->evcon);
    lua_pushboolean(L, 1);
    return 1;
}

static int l_start(lua_State *L)
{
    struct response *r = check_response(L);
    int status = (int)luaL_checkinteger(L, 2);

    if (!usable(L, r))
        return 2;
    if (r->started || r->finished)
        return luaL_error(L, "response already started");
    add_headers(L, 3, r->req);
    r->started = 1;
    evhttp_send_reply_start(r->req, status, NULL);
    lua_pushboolean(L, 1);
    return 1;
}

static int l_write(lua_State *L)
{
    struct response *r = check_response(L);
    size_t len;
    const char *data = luaL_checklstring(L, 2, &len);
    struct evbuffer *buf;

    if (!r->started && !r->closed)
        return luaL_error(L, "write before start");
    if (!usable(L, r) || r->finished) {
        lua_settop(L, 0);
        lua_pushnil(L);
        lua_pushstring(L, "closed");
        return 2;
    }
    if (len > 0) {
        buf = evbuffer_new();
        evbuffer_add(buf, data, len);
        evhttp_send_reply_chunk(r->req, buf);
        evbuffer_free(buf);
    }
    lua_pushboolean(L, 1);
    return 1;
}

static int l_finish(lua_State *L)
{
    struct response *r = check_response(L);

    response_end(r, 500);
    lua_pushboolean(L, 1);
    return 1;
}

/* Writes raw bytes to the socket and drops the connection without any HTTP framing. */
static int l_cut(lua_State *L)
{
    struct response *r = check_response(L);
    size_t len = 0;
    const char *raw = luaL_optlstring(L, 2, "", &len);
    struct evhttp_connection *evcon = r->evcon;
    struct bufferevent *bev;
    evutil_socket_t fd;

    if (!usable(L, r) || evcon == NULL || r->finished)
        return 2;
    bev = evhttp_connection_get_bufferevent(evcon);
    fd = bufferevent_getfd(bev);
    flush_now(evcon); /* whatever evhttp still holds (a started reply) goes out first, then our bytes */
    while (len > 0) {
        ssize_t n = send(fd, raw, len, MSG_NOSIGNAL);
        if (n <= 0)
            break;
        raw += n;
        len -= (size_t)n;
    }
    shutdown(fd, SHUT_RDWR);
    if (r->conn)
        http_conn_set_user(r->conn, NULL); /* the connection goes, no close notice for us */
    r->conn = NULL;
    r->finished = 1;
    r->closed = 1;
    r->req = NULL;
    r->evcon = NULL;
    evhttp_connection_free(evcon); /* frees the request with it */
    lua_pushboolean(L, 1);
    return 1;
}

static int l_response_index(lua_State *L)
{
    struct response *r = check_response(L);
    const char *key = luaL_checkstring(L, 2);

    if (strcmp(key, "closed") == 0) {
        lua_pushboolean(L, r->closed);
        return 1;
    }
    luaL_getmetatable(L, RESPONSE_MT);
    lua_getfield(L, -1, "methods");
    lua_getfield(L, -1, key);
    return 1;
}

static int l_response_gc(lua_State *L)
{
    struct response *r = check_response(L);

    watch_release_all(&r->watchers, 0);
    response_end(r, 500);
    return 0;
}

/* ---- request dispatch ------------------------------------------------------------------------ */

/* Pushes the request table for req. */
static void push_request(lua_State *L, struct evhttp_request *req)
{
    static const char *methods[] = { "GET",     "POST",  "HEAD",    "PUT",  "DELETE",
                                     "OPTIONS", "TRACE", "CONNECT", "PATCH" };
    enum evhttp_cmd_type cmd = evhttp_request_get_command(req);
    const struct evhttp_uri *uri = evhttp_request_get_evhttp_uri(req);
    struct evkeyvalq *in = evhttp_request_get_input_headers(req);
    struct evkeyval *kv;
    struct evbuffer *body = evhttp_request_get_input_buffer(req);
    size_t body_len = evbuffer_get_length(body);
    struct evhttp_connection *evcon = evhttp_request_get_connection(req);
    const char *method = "GET";
    char *peer_addr = NULL;
    ev_uint16_t peer_port = 0;
    size_t i;
    int n;

    for (i = 0; i < sizeof(methods) / sizeof(methods[0]); i++) {
        if (cmd == (enum evhttp_cmd_type)(1 << i))
            method = methods[i];
    }
    lua_createtable(L, 0, 8);
    lua_pushstring(L, method);
    lua_setfield(L, -2, "method");
    lua_pushstring(L, evhttp_request_get_uri(req));
    lua_setfield(L, -2, "uri");
    lua_pushstring(L, uri && evhttp_uri_get_path(uri) ? evhttp_uri_get_path(uri) : "/");
    lua_setfield(L, -2, "path");
    if (uri && evhttp_uri_get_query(uri)) {
        lua_pushstring(L, evhttp_uri_get_query(uri));
        lua_setfield(L, -2, "query");
    }
    n = 0;
    for (kv = in->tqh_first; kv; kv = kv->next.tqe_next)
        n++;
    lua_createtable(L, 0, n);
    for (kv = in->tqh_first; kv; kv = kv->next.tqe_next) {
        luaL_Buffer b;
        const char *k;
        luaL_buffinit(L, &b);
        for (k = kv->key; *k; k++)
            luaL_addchar(&b, (char)((*k >= 'A' && *k <= 'Z') ? *k + 32 : *k));
        luaL_pushresult(&b);
        lua_pushstring(L, kv->value);
        lua_settable(L, -3);
    }
    lua_setfield(L, -2, "headers");
    lua_pushlstring(L, (const char *)evbuffer_pullup(body, -1), body_len);
    lua_setfield(L, -2, "body");
    if (evcon) {
        evhttp_connection_get_peer(evcon, &peer_addr, &peer_port);
        lua_pushfstring(L, "%s:%d", peer_addr ? peer_addr : "?", (int)peer_port);
        lua_setfield(L, -2, "peer");
    }
}

static void handler_done(struct task *t, int ok, void *ud)
{
    struct response *r = ud;

    if (!ok)
        task_report_error("handler failed", lua_tostring(task_thread(t), -1));
    /* The response userdata is an argument of the finished task; it is still alive here. */
    response_end(r, 500);
}

static void request_cb(struct evhttp_request *req, struct http_conn *conn, void *arg)
{
    struct server *s = arg;
    lua_State *L = g_L;
    struct response *r;
    struct evhttp_connection *evcon = evhttp_request_get_connection(req);
    STACK_CHECK_BEGIN(L);

    lua_rawgeti(L, LUA_REGISTRYINDEX, s->handler_ref);
    push_request(L, req);
    r = lua_newuserdatauv(L, sizeof(*r), 0);
    memset(r, 0, sizeof(*r));
    r->req = req;
    r->evcon = evcon;
    r->conn = conn;
    luaL_setmetatable(L, RESPONSE_MT);
    http_conn_set_user(conn, r);
    /* The task keeps the response userdata alive as its argument until handler_done has run. */
    task_spawn(L, 2, handler_done, r);
    lua_pop(L, 1);
    STACK_CHECK_END(L, 0);
}

/*
 * Binds a listening socket with a deep accept queue: evhttp's own binding uses a backlog of 128, and
 * a burst of hundreds of connections would then wait a second for SYN retransmits.
 * Returns the fd, or -1 with errno set (EINVAL for an unusable host).
 */
static evutil_socket_t bind_socket(const char *host, int port)
{
    struct addrinfo hints;
    struct addrinfo *ai = NULL;
    char service[16];
    evutil_socket_t fd;
    int one = 1;
    int err;

    memset(&hints, 0, sizeof(hints));
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
    snprintf(service, sizeof(service), "%d", port);
    if (getaddrinfo(host, service, &hints, &ai) != 0 || ai == NULL) {
        errno = EINVAL;
        return -1;
    }
    fd = socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, ai->ai_protocol);
    if (fd < 0) {
        err = errno;
        freeaddrinfo(ai);
        errno = err;
        return -1;
    }
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (bind(fd, ai->ai_addr, ai->ai_addrlen) != 0 || listen(fd, 4096) != 0) {
        err = errno;
        close(fd);
        freeaddrinfo(ai);
        errno = err;
        return -1;
    }
    freeaddrinfo(ai);
    return fd;
}

/* ---- core.listen ----------------------------------------------------------------------------- */

static void server_close(struct server *s)
{
    if (s->guard == NULL)
        return;
    http_guard_free(s->guard);
    s->guard = NULL;
    luaL_unref(g_L, LUA_REGISTRYINDEX, s->handler_ref);
    luaL_unref(g_L, LUA_REGISTRYINDEX, s->self_ref);
    s->handler_ref = LUA_NOREF;
    s->self_ref = LUA_NOREF;
    if (s->prev)
        s->prev->next = s->next;
    else
        open_servers = s->next;
    if (s->next)
        s->next->prev = s->prev;
}

static int l_server_close(lua_State *L)
{
    server_close(luaL_checkudata(L, 1, SERVER_MT));
    return 0;
}

static int l_server_index(lua_State *L)
{
    struct server *s = luaL_checkudata(L, 1, SERVER_MT);
    const char *key = luaL_checkstring(L, 2);

    if (strcmp(key, "port") == 0) {
        lua_pushinteger(L, s->port);
        return 1;
    }
    luaL_getmetatable(L, SERVER_MT);
    lua_getfield(L, -1, "methods");
    lua_getfield(L, -1, key);
    return 1;
}

static void register_metatables(lua_State *L)
{
    static const luaL_Reg response_methods[] = {
        { "respond", l_respond }, { "start", l_start }, { "write", l_write },
        { "finish", l_finish },   { "cut", l_cut },     { NULL, NULL },
    };
    static const luaL_Reg server_methods[] = {
        { "close", l_server_close },
        { NULL, NULL },
    };

    if (luaL_newmetatable(L, RESPONSE_MT)) {
        luaL_newlib(L, response_methods);
        lua_setfield(L, -2, "methods");
        lua_pushcfunction(L, l_response_index);
        lua_setfield(L, -2, "__index");
        lua_pushcfunction(L, l_response_gc);
        lua_setfield(L, -2, "__gc");
    }
    lua_pop(L, 1);
    if (luaL_newmetatable(L, SERVER_MT)) {
        luaL_newlib(L, server_methods); /* a table, as the response's: the API test lists them */
        lua_setfield(L, -2, "methods");
        lua_pushcfunction(L, l_server_index);
        lua_setfield(L, -2, "__index");
        lua_pushcfunction(L, l_server_close);
        lua_setfield(L, -2, "__gc");
    }
    lua_pop(L, 1);
}

/* An optional whole-number option of 'listen' in [min, max], or dflt when absent. */
static lua_Integer int_option(lua_State *L, const char *name, lua_Integer dflt, lua_Integer min,
                              lua_Integer max)
{
    lua_Integer v;
    int ok = 0;

    lua_getfield(L, 1, name);
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        return dflt;
    }
    v = lua_type(L, -1) == LUA_TNUMBER ? lua_tointegerx(L, -1, &ok) : 0;
    if (!ok || v < min || v > max)
        luaL_error(L, "bad option '%s' to 'listen' (whole number in %I..%I expected, got %s)", name, min, max,
                   luaL_tolstring(L, -1, NULL));
    lua_pop(L, 1);
    return v;
}

/* An optional duration option of 'listen' in seconds (more than 0, at most a day). */
static double seconds_option(lua_State *L, const char *name, double dflt)
{
    lua_Number v;

    lua_getfield(L, 1, name);
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        return dflt;
    }
    v = lua_type(L, -1) == LUA_TNUMBER ? lua_tonumber(L, -1) : 0;
    if (!(v > 0 && v <= 86400))
        luaL_error(L, "bad option '%s' to 'listen' (seconds expected, more than 0 and at most 86400, got %s)",
                   name, luaL_tolstring(L, -1, NULL));
    lua_pop(L, 1);
    return (double)v;
}

/* Descriptors kept for everything but client connections: upstream requests, files, the loop's own. */
#define FD_RESERVE 128

/* max_connections lowered to fit under the process's descriptor limit (main raised the soft limit to
 * the hard one): past that limit accept() fails, the listener retries it in a loop, and no connection
 * can be closed to make room, as the cap does when it is reached first. */
static int fit_fd_limit(int max_connections)
{
    struct rlimit rl;
    rlim_t room;

    if (getrlimit(RLIMIT_NOFILE, &rl) != 0 || rl.rlim_cur == RLIM_INFINITY)
        return max_connections;
    room = rl.rlim_cur > 2 * FD_RESERVE ? rl.rlim_cur - FD_RESERVE : rl.rlim_cur / 2;
    if (room < 1)
        room = 1;
    return (rlim_t)max_connections > room ? (int)room : max_connections;
}

/* The limits of the options table at index 1 (see http_guard.h for what each one means). */
static void read_limits(lua_State *L, struct http_limits *lim)
{
    static const struct http_limits dflt = HTTP_LIMITS_DEFAULT;
    const lua_Integer tib = (lua_Integer)1 << 40;

    lim->max_header_size = (size_t)int_option(L, "max_header_size", (lua_Integer)dflt.max_header_size, 256,
                                              (lua_Integer)1 << 30);
    lim->max_headers = (int)int_option(L, "max_headers", dflt.max_headers, 1, 100000);
    lim->max_body_size = (size_t)int_option(L, "max_body_size", (lua_Integer)dflt.max_body_size, 0, tib);
    lim->max_body_memory =
        (size_t)int_option(L, "max_body_memory", (lua_Integer)dflt.max_body_memory, 0, tib);
    lim->max_connections = (int)int_option(L, "max_connections", dflt.max_connections, 1, 1000000);
    lim->max_connections = fit_fd_limit(lim->max_connections);
    lim->header_timeout = seconds_option(L, "header_timeout", dflt.header_timeout);
    lim->body_timeout = seconds_option(L, "body_timeout", dflt.body_timeout);
    lim->idle_timeout = seconds_option(L, "idle_timeout", dflt.idle_timeout);
}

int core_listen(lua_State *L)
{
    const char *host;
    lua_Integer port;
    struct server *s;
    struct evhttp *http;
    struct evhttp_bound_socket *bound;
    struct http_limits limits;
    struct sockaddr_storage ss;
    socklen_t sslen = sizeof(ss);
    evutil_socket_t fd;

    luaL_checktype(L, 1, LUA_TTABLE);
    register_metatables(L);
    read_limits(L, &limits);
    lua_getfield(L, 1, "host");
    host = luaL_optstring(L, -1, "127.0.0.1");
    lua_getfield(L, 1, "port");
    port = luaL_optinteger(L, -1, 0);
    if (port < 0 || port > 65535)
        return luaL_error(L, "bad option 'port' to 'listen' (0..65535 expected)");
    lua_getfield(L, 1, "handler");
    if (!lua_isfunction(L, -1))
        return luaL_error(L, "bad option 'handler' to 'listen' (function expected, got %s)",
                          luaL_typename(L, -1));

    s = lua_newuserdatauv(L, sizeof(*s), 0);
    memset(s, 0, sizeof(*s));
    s->handler_ref = LUA_NOREF;
    s->self_ref = LUA_NOREF;
    luaL_setmetatable(L, SERVER_MT);
    s->guard = http_guard_new(g_base, &limits, request_cb, on_close, s);
    if (s->guard == NULL)
        return luaL_error(L, "out of memory");
    http = http_guard_evhttp(s->guard);
    fd = bind_socket(host, (int)port);
    bound = fd < 0 ? NULL : evhttp_accept_socket_with_handle(http, fd);
    if (bound == NULL) {
        int err = errno;
        if (fd >= 0)
            close(fd);
        http_guard_free(s->guard);
        s->guard = NULL;
        lua_pushnil(L);
        lua_pushfstring(L, "listen: cannot listen on %s:%d: %s", host, (int)port,
                        err == EINVAL ? "not a usable address" : strerror(err));
        return 2;
    }
    if (getsockname(evhttp_bound_socket_get_fd(bound), (struct sockaddr *)&ss, &sslen) == 0) {
        if (ss.ss_family == AF_INET)
            s->port = ntohs(((struct sockaddr_in *)&ss)->sin_port);
        else if (ss.ss_family == AF_INET6)
            s->port = ntohs(((struct sockaddr_in6 *)&ss)->sin6_port);
    }
    evhttp_set_allowed_methods(http, EVHTTP_REQ_GET | EVHTTP_REQ_POST | EVHTTP_REQ_HEAD | EVHTTP_REQ_PUT |
                                         EVHTTP_REQ_DELETE | EVHTTP_REQ_OPTIONS | EVHTTP_REQ_PATCH);
    lua_pushvalue(L, -2); /* the handler */
    s->handler_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_pushvalue(L, -1);
    s->self_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    s->next = open_servers;
    if (open_servers)
        open_servers->prev = s;
    open_servers = s;
    return 1;
}

void http_server_shutdown(void)
{
    while (open_servers)
        server_close(open_servers);
}
