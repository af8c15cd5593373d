/*
 * http_client.c: `core.request`, HTTP requests on libcurl's multi socket interface driven by libevent.
 *
 * curl tells us which sockets to watch (socket_cb) and when to call it back (timer_cb); libevent
 * watches them and calls curl_multi_socket_action. Each request is a `struct transfer`, reachable
 * from its easy handle through CURLOPT_PRIVATE and owned by the task that waits on it. When curl
 * reports the transfer done (or one of our own timers, first byte or stall, fires), the result table
 * is built on the task's coroutine and the task is resumed. Response bodies are collected in a buf,
 * or, for a 2xx reply with `on_chunk`, handed to that Lua function piece by piece (on the main
 * thread, protected) so streaming costs no task switches. Easy handles are pooled.
 */
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <curl/curl.h>
#include <event2/event.h>
#include <lauxlib.h>
#include <lua.h>

#include "aigate.h"
#include "buf.h"
#include "clock.h"
#include "http.h"
#include "pool.h"
#include "watch.h"

#define DEFAULT_MAX_SIZE HTTP_DEFAULT_MAX_SIZE
#define EASY_POOL_MAX    256

struct transfer {
    struct pending pending;
    struct xfer xfer; /* CURLOPT_PRIVATE */
    struct task *task;
    CURL *easy;
    struct curl_slist *headers;
    int body_ref;  /* keeps the request body string alive for CURLOPT_POSTFIELDS */
    int chunk_ref; /* on_chunk function or LUA_NOREF */
    struct buf body;
    struct buf resp_headers; /* "name\0value\0" pairs of the last response */
    long status;
    int streaming; /* 2xx and on_chunk set: body goes to the callback */
    int custom_ca; /* ca_file or ca_path set: the handle goes back to the defaults after */
    size_t received;
    size_t max_size;
    struct http_timers timers;
    char *abort_msg;       /* why we stopped it ourselves */
    struct watch gone;     /* on the tied_to response's list: its client went away */
    struct event *gone_ev; /* fired by that, so that the abort runs from the loop */
    char errbuf[CURL_ERROR_SIZE];
};

/* A socket curl asked us to watch. Sockets curl opens for connections (open_socket_cb) stay
 * registered with libevent while idle in curl's connection pool (curl says CURL_POLL_REMOVE when a
 * transfer ends and asks again when the next one takes the connection, usually at once): that
 * saves an epoll_ctl DEL and ADD per request. An idle socket that becomes ready is dropped then;
 * close_socket_cb drops it before curl closes it, so no registration outlives its socket. */
struct sockinfo {
    struct event *ev;
    curl_socket_t fd;
    short kind;
    int idle;  /* curl said CURL_POLL_REMOVE; still registered */
    int owned; /* opened by open_socket_cb: closed through close_socket_cb */
};

static struct sockinfo **socks; /* by file descriptor */
static size_t nsocks;
static unsigned char *owned_fds; /* by file descriptor: opened by open_socket_cb */
static size_t nowned;

/* Makes table (of n elements of size each) hold index i. 0 or -1. */
static int grow(void **table, size_t *n, size_t size, size_t i)
{
    size_t cap = *n ? *n : 64;
    void *p;

    if (i < *n)
        return 0;
    while (cap <= i)
        cap *= 2;
    p = realloc(*table, cap * size);
    if (p == NULL)
        return -1;
    memset((char *)p + *n * size, 0, (cap - *n) * size);
    *table = p;
    *n = cap;
    return 0;
}

static void drop_socket(struct sockinfo *si)
{
    socks[si->fd] = NULL;
    event_free(si->ev);
    free(si);
}

static CURLM *multi;
static struct event *multi_timer;
static CURL *easy_pool[EASY_POOL_MAX];
static int easy_pool_len;
static char *default_ca_file; /* curl's own CA settings, for handles that had others */
static char *default_ca_path;

static void check_multi_info(void);
static size_t header_cb(char *data, size_t size, size_t nitems, void *userdata);
static size_t write_cb(char *data, size_t size, size_t nmemb, void *userdata);

/* ---- curl <-> libevent glue ------------------------------------------------------------------ */

static struct pool_window pool_window;
static int pool_size; /* CURLMOPT_MAXCONNECTS as set */

/* The idle connection pool follows the transfers in flight (pool.h), told after every action. */
static void pool_follow(int running)
{
    int size = pool_note(&pool_window, running, monotonic_seconds());

    if (size != pool_size) {
        pool_size = size;
        curl_multi_setopt(multi, CURLMOPT_MAXCONNECTS, (long)size);
    }
}

static void event_cb(evutil_socket_t fd, short kind, void *arg)
{
    struct sockinfo *si = arg;
    int action = 0;
    int running;

    if (si->idle) {
        drop_socket(si); /* an idle pooled connection became ready (closed by the peer): curl will see */
        return;
    }
    if (kind & EV_READ)
        action |= CURL_CSELECT_IN;
    if (kind & EV_WRITE)
        action |= CURL_CSELECT_OUT;
    curl_multi_socket_action(multi, fd, action, &running);
    pool_follow(running);
    check_multi_info();
}

static void timer_cb(evutil_socket_t fd, short kind, void *arg)
{
    int running;

    (void)fd;
    (void)kind;
    (void)arg;
    curl_multi_socket_action(multi, CURL_SOCKET_TIMEOUT, 0, &running);
    pool_follow(running);
    check_multi_info();
}

static int multi_timer_cb(CURLM *m, long timeout_ms, void *userp)
{
    struct timeval tv;

    (void)m;
    (void)userp;
    if (timeout_ms < 0) {
        evtimer_del(multi_timer);
        return 0;
    }
    if (timeout_ms == 0) {
        /* "At once" (a transfer just added): run in this turn of the loop, after the callback that
         * added it, instead of in the next one, which would first wait for events (a system call). */
        evtimer_del(multi_timer);
        event_active(multi_timer, EV_TIMEOUT, 1);
        return 0;
    }
    tv.tv_sec = timeout_ms / 1000;
    tv.tv_usec = (timeout_ms % 1000) * 1000;
    evtimer_add(multi_timer, &tv);
    return 0;
}

static int socket_cb(CURL *easy, curl_socket_t s, int what, void *userp, void *socketp)
{
    struct sockinfo *si = socketp;
    short kind;

    (void)easy;
    (void)userp;
    if (si == NULL && (size_t)s < nsocks)
        si = socks[s];
    if (what == CURL_POLL_REMOVE) {
        if (si) {
            if (si->owned)
                si->idle = 1; /* kept: the connection goes back to curl's pool */
            else
                drop_socket(si);
        }
        return 0;
    }
    kind = EV_PERSIST;
    if (what & CURL_POLL_IN)
        kind |= EV_READ;
    if (what & CURL_POLL_OUT)
        kind |= EV_WRITE;
    if (si == NULL) {
        if (grow((void **)&socks, &nsocks, sizeof(*socks), (size_t)s) != 0)
            return -1;
        si = malloc(sizeof(*si));
        if (si == NULL)
            return -1;
        si->fd = s;
        si->kind = kind;
        si->owned = (size_t)s < nowned && owned_fds[s];
        si->ev = event_new(g_base, s, kind, event_cb, si);
        socks[s] = si;
        event_add(si->ev, NULL);
    } else if (si->kind != kind) {
        event_del(si->ev);
        event_assign(si->ev, g_base, s, kind, event_cb, si);
        si->kind = kind;
        event_add(si->ev, NULL);
    }
    si->idle = 0;
    curl_multi_assign(multi, s, si);
    return 0;
}

static curl_socket_t open_socket_cb(void *clientp, curlsocktype purpose, struct curl_sockaddr *addr)
{
    curl_socket_t s;

    (void)clientp;
    (void)purpose;
    s = socket(addr->family, addr->socktype, addr->protocol);
    if (s == CURL_SOCKET_BAD)
        return s;
    if (grow((void **)&owned_fds, &nowned, 1, (size_t)s) != 0) {
        close(s);
        return CURL_SOCKET_BAD;
    }
    owned_fds[s] = 1;
    return s;
}

static int close_socket_cb(void *clientp, curl_socket_t s)
{
    (void)clientp;
    if ((size_t)s < nsocks && socks[s])
        drop_socket(socks[s]);
    if ((size_t)s < nowned)
        owned_fds[s] = 0;
    return close(s);
}

void http_easy_sockets(CURL *easy)
{
    curl_easy_setopt(easy, CURLOPT_OPENSOCKETFUNCTION, open_socket_cb);
    curl_easy_setopt(easy, CURLOPT_CLOSESOCKETFUNCTION, close_socket_cb);
}

/* ---- transfer life cycle --------------------------------------------------------------------- */

/* Pooled handles keep their options: setup_easy sets every option a request depends on, so a handle
 * needs no curl_easy_reset (which frees and re-parses all of them) between requests. */
static void release_easy(CURL *easy)
{
    if (easy_pool_len < EASY_POOL_MAX) {
        easy_pool[easy_pool_len++] = easy;
    } else {
        curl_easy_cleanup(easy);
    }
}

static CURL *acquire_easy(void)
{
    CURL *easy;

    if (easy_pool_len > 0)
        return easy_pool[--easy_pool_len];
    easy = curl_easy_init();
    if (easy) {
        /* The options every request shares, set once per handle. */
        curl_easy_setopt(easy, CURLOPT_NOSIGNAL, 1L);
        curl_easy_setopt(easy, CURLOPT_WRITEFUNCTION, write_cb);
        curl_easy_setopt(easy, CURLOPT_HEADERFUNCTION, header_cb);
        curl_easy_setopt(easy, CURLOPT_USERAGENT, "aigate/" AIGATE_VERSION);
        curl_easy_setopt(easy, CURLOPT_PROTOCOLS_STR, "http,https");
        http_easy_sockets(easy);
    }
    return easy;
}

/* Frees everything the transfer owns; the task is not resumed. */
static void transfer_free(struct transfer *tr)
{
    if (tr->easy) {
        curl_multi_remove_handle(multi, tr->easy);
        if (tr->custom_ca)
            http_easy_ca(tr->easy, NULL, NULL);
        release_easy(tr->easy);
    }
    curl_slist_free_all(tr->headers);
    luaL_unref(g_L, LUA_REGISTRYINDEX, tr->body_ref);
    luaL_unref(g_L, LUA_REGISTRYINDEX, tr->chunk_ref);
    buf_free(&tr->body);
    buf_free(&tr->resp_headers);
    http_timers_free(&tr->timers);
    watch_remove(&tr->gone);
    if (tr->gone_ev)
        event_free(tr->gone_ev);
    free(tr->abort_msg);
    free(tr);
}

static void transfer_cancel(struct pending *p)
{
    transfer_free((struct transfer *)p);
}

/* Pushes the response table {status, headers, body, first_byte} on L. */
static void push_response(lua_State *L, struct transfer *tr)
{
    double first_byte;

    lua_createtable(L, 0, 4);
    /* curl's time from the start to the first byte of the reply (the request log's attempts) */
    if (tr->easy && curl_easy_getinfo(tr->easy, CURLINFO_STARTTRANSFER_TIME, &first_byte) == CURLE_OK) {
        lua_pushnumber(L, first_byte);
        lua_setfield(L, -2, "first_byte");
    }
    lua_pushinteger(L, tr->status);
    lua_setfield(L, -2, "status");
    http_push_headers(L, &tr->resp_headers);
    lua_setfield(L, -2, "headers");
    if (tr->streaming || tr->body.data == NULL)
        lua_pushliteral(L, ""); /* streamed bodies went to on_chunk */
    else
        lua_pushlstring(L, tr->body.data, tr->body.len);
    lua_setfield(L, -2, "body");
}

static const char *error_kind(CURLcode rc)
{
    switch (rc) {
    case CURLE_OPERATION_TIMEDOUT:
        return "timeout";
    case CURLE_COULDNT_CONNECT:
        return "connect";
    case CURLE_COULDNT_RESOLVE_HOST:
    case CURLE_COULDNT_RESOLVE_PROXY:
        return "resolve";
    case CURLE_SSL_CONNECT_ERROR:
    case CURLE_PEER_FAILED_VERIFICATION:
    case CURLE_SSL_CERTPROBLEM:
    case CURLE_SSL_CIPHER:
    case CURLE_SSL_CACERT_BADFILE:
    case CURLE_SSL_ISSUER_ERROR:
        return "tls";
    case CURLE_RECV_ERROR:
    case CURLE_SEND_ERROR:
    case CURLE_GOT_NOTHING:
    case CURLE_PARTIAL_FILE:
    case CURLE_HTTP2:
    case CURLE_HTTP2_STREAM:
        return "closed";
    default:
        return "error";
    }
}

void http_push_error(lua_State *L, CURLcode rc, const char *errbuf, size_t received, size_t max_size)
{
    const char *detail;

    if (rc == CURLE_WRITE_ERROR && received > max_size) {
        lua_pushfstring(L, "too_large: response body exceeds %I bytes", (lua_Integer)max_size);
        return;
    }
    detail = errbuf[0] ? errbuf : curl_easy_strerror(rc);
    /* curl's text as it is ("tls: SSL certificate problem: ..."): its first word may be a name. */
    lua_pushfstring(L, "%s: %s", error_kind(rc), detail);
}

/* Pushes the error string for a failed transfer on L. */
static void push_error(lua_State *L, struct transfer *tr, CURLcode rc)
{
    if (tr->abort_msg) {
        lua_pushstring(L, tr->abort_msg);
        return;
    }
    http_push_error(L, rc, tr->errbuf, tr->received, tr->max_size);
}

/* Ends a transfer: resumes its task with the response, or nil and the error. */
static void transfer_done(struct transfer *tr, CURLcode rc)
{
    struct task *t = tr->task;
    lua_State *co = task_thread(t);
    int nret;
    STACK_CHECK_BEGIN(co);

    if (rc == CURLE_OK && tr->abort_msg == NULL) {
        push_response(co, tr);
        nret = 1;
    } else {
        lua_pushnil(co);
        push_error(co, tr, rc);
        nret = 2;
    }
    STACK_CHECK_END(co, nret);
    transfer_free(tr);
    task_resume(t, nret);
}

static void transfer_xfer_done(struct xfer *x, CURLcode rc)
{
    transfer_done((struct transfer *)(void *)((char *)x - offsetof(struct transfer, xfer)), rc);
}

static void check_multi_info(void)
{
    CURLMsg *msg;
    int left;

    while ((msg = curl_multi_info_read(multi, &left)) != NULL) {
        struct xfer *x;
        if (msg->msg != CURLMSG_DONE)
            continue;
        curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **)&x);
        x->done(x, msg->data.result);
    }
}

int http_client_add(CURL *easy)
{
    return curl_multi_add_handle(multi, easy) == CURLM_OK ? 0 : -1;
}

void http_client_remove(CURL *easy)
{
    curl_multi_remove_handle(multi, easy);
}

/* Stops a transfer from our side (timers, callback errors) and resumes its task with msg. */
static void transfer_abort(struct transfer *tr, const char *msg)
{
    if (tr->abort_msg == NULL)
        tr->abort_msg = strdup(msg);
    transfer_done(tr, CURLE_ABORTED_BY_CALLBACK);
}

static void transfer_expired(struct http_timers *tm, const char *msg)
{
    transfer_abort((struct transfer *)(void *)((char *)tm - offsetof(struct transfer, timers)), msg);
}

#define CLIENT_GONE "aborted: the client went away"

static void client_gone_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    transfer_abort(arg, CLIENT_GONE);
}

/* The server connection the transfer is tied to closed (called from its close, so the abort is
 * deferred to the loop: the task must not be resumed inside the server's own teardown). */
static void client_gone(struct watch *w)
{
    struct transfer *tr = (struct transfer *)(void *)((char *)w - offsetof(struct transfer, gone));

    event_active(tr->gone_ev, EV_TIMEOUT, 1);
}

/* opts.tied_to (a core.listen response), when set: ties the transfer to its client. 0 (tied, or no
 * option), 1 when the client is already gone, -1 when the value is not a response or out of memory
 * (a message pushed). */
static int tie_to_client(lua_State *L, struct transfer *tr)
{
    int rc;

    lua_getfield(L, 1, "tied_to");
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        return 0;
    }
    tr->gone_ev = event_new(g_base, -1, 0, client_gone_cb, tr);
    if (tr->gone_ev == NULL) {
        lua_pushliteral(L, "out of memory");
        return -1;
    }
    tr->gone.fire = client_gone;
    rc = http_response_tie(L, -1, &tr->gone);
    if (rc < 0)
        lua_pushfstring(L, "bad option 'tied_to' to 'request' (a server response expected, got %s)",
                        luaL_typename(L, -1));
    else
        lua_pop(L, 1);
    return rc;
}

/* ---- timeouts and CA certificates, for every kind of transfer -------------------------------- */

/* libevent measures a timer from the time it cached when the loop turn began, which is early by
 * however long Lua ran since: the cache is refreshed first. */
static void arm_timer(struct event *ev, double seconds)
{
    struct timeval tv;

    seconds_to_timeval(seconds, &tv);
    event_base_update_cache_time(g_base);
    evtimer_add(ev, &tv);
}

static void first_byte_timer_cb(evutil_socket_t fd, short kind, void *arg)
{
    struct http_timers *tm = arg;
    char msg[96];

    (void)fd;
    (void)kind;
    snprintf(msg, sizeof(msg), "timeout: no response within %gs (first byte timeout)",
             tm->first_byte_timeout);
    tm->expired(tm, msg);
}

/* The stall timer is armed once, at the first byte; a byte only notes the time (re-arming a libevent
 * timer for every piece received would cost a heap update each). When the timer fires after bytes
 * came, it waits again for what is left of the limit since the last one. */
static void stall_timer_cb(evutil_socket_t fd, short kind, void *arg)
{
    struct http_timers *tm = arg;
    double quiet = monotonic_seconds() - tm->last_progress;
    char msg[96];

    (void)fd;
    (void)kind;
    if (quiet < tm->stall_timeout) {
        arm_timer(tm->stall_timer, tm->stall_timeout - quiet);
        return;
    }
    snprintf(msg, sizeof(msg), "timeout: stream stalled, no data for %gs (stall timeout)", tm->stall_timeout);
    tm->expired(tm, msg);
}

void http_timers_init(struct http_timers *tm, const struct http_timeouts *to,
                      void (*expired)(struct http_timers *tm, const char *msg))
{
    memset(tm, 0, sizeof(*tm));
    tm->first_byte_timeout = to->first_byte;
    tm->stall_timeout = to->stall;
    tm->expired = expired;
}

int http_timers_start(struct http_timers *tm)
{
    tm->got_first_byte = 0;
    if (tm->first_byte_timeout > 0) {
        if (tm->first_byte_timer == NULL)
            tm->first_byte_timer = evtimer_new(g_base, first_byte_timer_cb, tm);
        if (tm->first_byte_timer == NULL)
            return -1;
        arm_timer(tm->first_byte_timer, tm->first_byte_timeout);
    }
    if (tm->stall_timeout > 0 && tm->stall_timer == NULL) {
        tm->stall_timer = evtimer_new(g_base, stall_timer_cb, tm);
        if (tm->stall_timer == NULL)
            return -1;
    }
    return 0;
}

void http_timers_progress(struct http_timers *tm)
{
    if (tm->stall_timer)
        tm->last_progress = monotonic_seconds();
    if (tm->got_first_byte)
        return;
    tm->got_first_byte = 1;
    if (tm->first_byte_timer)
        evtimer_del(tm->first_byte_timer);
    if (tm->stall_timer)
        arm_timer(tm->stall_timer, tm->stall_timeout);
}

void http_timers_stop(struct http_timers *tm)
{
    if (tm->first_byte_timer)
        evtimer_del(tm->first_byte_timer);
    if (tm->stall_timer)
        evtimer_del(tm->stall_timer);
}

void http_timers_free(struct http_timers *tm)
{
    if (tm->first_byte_timer)
        event_free(tm->first_byte_timer);
    if (tm->stall_timer)
        event_free(tm->stall_timer);
    tm->first_byte_timer = NULL;
    tm->stall_timer = NULL;
}

static double read_seconds(lua_State *L, int idx, const char *name, const char *kind, const char *fn)
{
    double v;

    lua_getfield(L, idx, name);
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        return 0;
    }
    if (!lua_isnumber(L, -1))
        luaL_error(L, "bad %s '%s' to '%s' (number expected, got %s)", kind, name, fn, luaL_typename(L, -1));
    v = lua_tonumber(L, -1);
    lua_pop(L, 1);
    if (!(v > 0))
        luaL_error(L, "bad %s '%s' to '%s' (must be > 0)", kind, name, fn);
    /* math.huge and other huge limits: as long as a timer can wait (curl's milliseconds and a
     * timeval overflow far beyond), so "no limit in practice" rather than undefined behaviour */
    return v > AIGATE_MAX_SECONDS ? AIGATE_MAX_SECONDS : v;
}

void http_read_timeouts(lua_State *L, int idx, const char *kind, const char *fn, struct http_timeouts *to)
{
    to->connect = read_seconds(L, idx, "connect_timeout", kind, fn);
    to->total = read_seconds(L, idx, "timeout", kind, fn);
    to->first_byte = read_seconds(L, idx, "first_byte_timeout", kind, fn);
    to->stall = read_seconds(L, idx, "stall_timeout", kind, fn);
}

void http_easy_timeouts(CURL *easy, const struct http_timeouts *to)
{
    curl_easy_setopt(easy, CURLOPT_CONNECTTIMEOUT_MS, (long)(to->connect * 1000));
    curl_easy_setopt(easy, CURLOPT_TIMEOUT_MS, (long)(to->total * 1000));
}

/* The string field name of the table at idx (NULL when nil; the table keeps it alive). */
static const char *read_string(lua_State *L, int idx, const char *name, const char *kind, const char *fn)
{
    const char *v;

    lua_getfield(L, idx, name);
    if (!lua_isnil(L, -1) && lua_type(L, -1) != LUA_TSTRING)
        luaL_error(L, "bad %s '%s' to '%s' (string expected, got %s)", kind, name, fn, luaL_typename(L, -1));
    v = lua_tostring(L, -1);
    lua_pop(L, 1);
    return v;
}

void http_read_ca(lua_State *L, int idx, const char *kind, const char *fn, const char **ca_file,
                  const char **ca_path)
{
    *ca_file = read_string(L, idx, "ca_file", kind, fn);
    *ca_path = read_string(L, idx, "ca_path", kind, fn);
}

void http_easy_ca(CURL *easy, const char *ca_file, const char *ca_path)
{
    curl_easy_setopt(easy, CURLOPT_CAINFO, ca_file ? ca_file : default_ca_file);
    curl_easy_setopt(easy, CURLOPT_CAPATH, ca_path ? ca_path : default_ca_path);
}

static size_t header_cb(char *data, size_t size, size_t nitems, void *userdata)
{
    struct transfer *tr = userdata;
    size_t len = size * nitems;

    http_timers_progress(&tr->timers);
    http_header_line(&tr->resp_headers, &tr->status, data, len);
    return len;
}

/* Hands a body piece to on_chunk (the first one with the reply's {status, headers}). Returns 0 to go
 * on, -1 to abort (abort_msg set). */
static int call_on_chunk(struct transfer *tr, const char *data, size_t len, int first)
{
    lua_State *L = g_L;
    int rc;
    int result = 0;
    STACK_CHECK_BEGIN(L);

    lua_rawgeti(L, LUA_REGISTRYINDEX, tr->chunk_ref);
    lua_pushlstring(L, data, len);
    if (first) {
        /* the first piece also carries the reply's head, so it can be shown before the body */
        lua_createtable(L, 0, 2);
        lua_pushinteger(L, tr->status);
        lua_setfield(L, -2, "status");
        http_push_headers(L, &tr->resp_headers);
        lua_setfield(L, -2, "headers");
    }
    rc = pcall_traceback(L, first ? 2 : 1, 1);
    if (rc != LUA_OK) {
        const char *err = lua_tostring(L, -1);
        size_t n = strlen(err) + 16;
        tr->abort_msg = malloc(n);
        if (tr->abort_msg)
            snprintf(tr->abort_msg, n, "aborted: %s", err);
        result = -1;
    } else if (lua_isboolean(L, -1) && !lua_toboolean(L, -1)) {
        tr->abort_msg = strdup("aborted: by callback");
        result = -1;
    }
    lua_pop(L, 1);
    STACK_CHECK_END(L, 0);
    return result;
}

static size_t write_cb(char *data, size_t size, size_t nmemb, void *userdata)
{
    struct transfer *tr = userdata;
    size_t len = size * nmemb;
    int first = 0;

    http_timers_progress(&tr->timers);
    if (tr->received == 0 && tr->chunk_ref != LUA_NOREF && tr->status >= 200 && tr->status < 300) {
        tr->streaming = 1;
        first = 1;
    }
    tr->received += len;
    /* The same bound for a body handed to on_chunk as for one kept: a stream that never ends (one
     * endless SSE line, say) stops here, and so do the parser's and Lua's buffers behind it. */
    if (tr->received > tr->max_size)
        return 0;
    if (tr->streaming)
        return call_on_chunk(tr, data, len, first) == 0 ? len : 0;
    buf_append(&tr->body, data, len);
    return len;
}

/* ---- core.request ---------------------------------------------------------------------------- */

/* Raises unless opts.headers is nil or a table of string names and string values. */
static void check_headers(lua_State *L)
{
    lua_getfield(L, 1, "headers");
    if (!lua_isnil(L, -1) && !lua_istable(L, -1))
        luaL_error(L, "bad option 'headers' to 'request' (table expected, got %s)", luaL_typename(L, -1));
    if (header_table_check(L, -1) != 0)
        luaL_error(L, "bad option 'headers' to 'request' (names and values must be strings)");
    lua_pop(L, 1);
}

/* Reads opts.headers (already checked) into tr->headers. */
static void collect_headers(lua_State *L, struct transfer *tr)
{
    lua_getfield(L, 1, "headers");
    header_list_from_table(L, -1, &tr->headers);
    lua_pop(L, 1);
}

int core_request(lua_State *L)
{
    struct task *t;
    struct transfer *tr;
    const char *url;
    const char *method;
    size_t body_len = 0;
    const char *body = NULL;
    struct http_timeouts timeouts;
    const char *ca_file;
    const char *ca_path;

    luaL_checktype(L, 1, LUA_TTABLE);
    t = task_check(L);
    lua_getfield(L, 1, "url");
    url = lua_tostring(L, -1);
    if (url == NULL)
        return luaL_error(L, "bad option 'url' to 'request' (string expected, got %s)", luaL_typename(L, -1));
    lua_getfield(L, 1, "body");
    if (!lua_isnil(L, -1)) {
        if (lua_type(L, -1) != LUA_TSTRING)
            return luaL_error(L, "bad option 'body' to 'request' (string expected, got %s)",
                              luaL_typename(L, -1));
        body = lua_tolstring(L, -1, &body_len);
    }
    lua_getfield(L, 1, "method");
    method = lua_isnil(L, -1) ? (body ? "POST" : "GET") : lua_tostring(L, -1);
    if (method == NULL)
        return luaL_error(L, "bad option 'method' to 'request' (string expected)");
    http_read_timeouts(L, 1, "option", "request", &timeouts);
    http_read_ca(L, 1, "option", "request", &ca_file, &ca_path);
    check_headers(L);

    tr = calloc(1, sizeof(*tr));
    if (tr == NULL)
        return luaL_error(L, "out of memory");
    tr->pending.cancel = transfer_cancel;
    tr->xfer.done = transfer_xfer_done;
    tr->task = t;
    tr->body_ref = LUA_NOREF;
    tr->chunk_ref = LUA_NOREF;
    buf_init(&tr->body);
    buf_init(&tr->resp_headers);
    tr->max_size = DEFAULT_MAX_SIZE;
    http_timers_init(&tr->timers, &timeouts, transfer_expired);
    lua_getfield(L, 1, "max_size");
    if (!lua_isnil(L, -1)) {
        lua_Integer n = lua_tointeger(L, -1);
        if (n <= 0) {
            free(tr);
            return luaL_error(L, "bad option 'max_size' to 'request' (positive integer expected)");
        }
        tr->max_size = (size_t)n;
    }
    lua_pop(L, 1);
    lua_getfield(L, 1, "on_chunk");
    if (!lua_isnil(L, -1)) {
        if (!lua_isfunction(L, -1)) {
            free(tr);
            return luaL_error(L, "bad option 'on_chunk' to 'request' (function expected, got %s)",
                              luaL_typename(L, -1));
        }
        tr->chunk_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    } else {
        lua_pop(L, 1);
    }
    switch (tie_to_client(L, tr)) {
    case 0:
        break;
    case 1:
        transfer_free(tr);
        lua_pushnil(L);
        lua_pushliteral(L, CLIENT_GONE);
        return 2;
    default:
        transfer_free(tr);
        return lua_error(L);
    }
    if (body) {
        lua_getfield(L, 1, "body");
        tr->body_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    }
    collect_headers(L, tr);

    tr->easy = acquire_easy();
    if (tr->easy == NULL) {
        transfer_free(tr);
        lua_pushnil(L);
        lua_pushstring(L, "error: cannot create a curl handle");
        return 2;
    }
    /* Every per-request option is set, to its default when unused: pooled handles are not reset. */
    curl_easy_setopt(tr->easy, CURLOPT_URL, url);
    curl_easy_setopt(tr->easy, CURLOPT_PRIVATE, &tr->xfer);
    curl_easy_setopt(tr->easy, CURLOPT_ERRORBUFFER, tr->errbuf);
    curl_easy_setopt(tr->easy, CURLOPT_WRITEDATA, tr);
    curl_easy_setopt(tr->easy, CURLOPT_HEADERDATA, tr);
    curl_easy_setopt(tr->easy, CURLOPT_HTTPHEADER, tr->headers);
    curl_easy_setopt(tr->easy, CURLOPT_NOBODY, 0L);
    if (body) {
        curl_easy_setopt(tr->easy, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)body_len);
        curl_easy_setopt(tr->easy, CURLOPT_POSTFIELDS, body);
    } else {
        curl_easy_setopt(tr->easy, CURLOPT_POSTFIELDS, NULL);
        curl_easy_setopt(tr->easy, CURLOPT_HTTPGET, 1L);
    }
    if (strcmp(method, "HEAD") == 0)
        curl_easy_setopt(tr->easy, CURLOPT_NOBODY, 1L);
    curl_easy_setopt(tr->easy, CURLOPT_CUSTOMREQUEST,
                     strcmp(method, body ? "POST" : "GET") != 0 && strcmp(method, "HEAD") != 0 ? method
                                                                                               : NULL);
    http_easy_timeouts(tr->easy, &timeouts);
    if (ca_file || ca_path) {
        tr->custom_ca = 1;
        http_easy_ca(tr->easy, ca_file, ca_path);
    }
    if (http_timers_start(&tr->timers) != 0 || curl_multi_add_handle(multi, tr->easy) != CURLM_OK) {
        transfer_free(tr);
        lua_pushnil(L);
        lua_pushstring(L, "error: cannot start the transfer");
        return 2;
    }
    lua_settop(L, 0);
    return task_yield(L, t, &tr->pending);
}

/* ---- set-up and shut-down -------------------------------------------------------------------- */

/* Keeps curl's default CA file and directory (CURLINFO_CAINFO/CAPATH of a new handle): a handle
 * that was given others gets these back before it is pooled. 0 or -1. */
static int keep_default_ca(void)
{
    CURL *easy = curl_easy_init();
    char *file = NULL;
    char *path = NULL;

    if (easy == NULL)
        return -1;
    curl_easy_getinfo(easy, CURLINFO_CAINFO, &file);
    curl_easy_getinfo(easy, CURLINFO_CAPATH, &path);
    default_ca_file = file ? strdup(file) : NULL;
    default_ca_path = path ? strdup(path) : NULL;
    curl_easy_cleanup(easy);
    return (file && default_ca_file == NULL) || (path && default_ca_path == NULL) ? -1 : 0;
}

int http_client_init(void)
{
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK)
        return -1;
    if (keep_default_ca() != 0)
        return -1;
    multi = curl_multi_init();
    if (multi == NULL)
        return -1;
    multi_timer = evtimer_new(g_base, timer_cb, NULL);
    curl_multi_setopt(multi, CURLMOPT_SOCKETFUNCTION, socket_cb);
    curl_multi_setopt(multi, CURLMOPT_TIMERFUNCTION, multi_timer_cb);
    /* Idle connections kept for reuse: sized by the transfers in flight lately (pool_follow).
     * libcurl's default sizes the pool by the transfers added at the moment, so it shrinks whenever
     * fewer are in flight and a server proxying 64 connections opened a new upstream connection for
     * about one request in ten. */
    pool_window = (struct pool_window){ 0, 0, 0 };
    pool_size = POOL_MIN;
    curl_multi_setopt(multi, CURLMOPT_MAXCONNECTS, (long)pool_size);
    return 0;
}

void http_client_shutdown(void)
{
    int i;

    /* Transfers still pending were freed by task_cancel_all. */
    curl_multi_cleanup(multi); /* closes the pooled connections (close_socket_cb) */
    multi = NULL;
    for (i = 0; i < easy_pool_len; i++)
        curl_easy_cleanup(easy_pool[i]);
    easy_pool_len = 0;
    for (i = 0; (size_t)i < nsocks; i++)
        if (socks[i])
            drop_socket(socks[i]);
    free(socks);
    socks = NULL;
    nsocks = 0;
    free(owned_fds);
    owned_fds = NULL;
    nowned = 0;
    event_free(multi_timer);
    free(default_ca_file);
    free(default_ca_path);
    default_ca_file = NULL;
    default_ca_path = NULL;
    curl_global_cleanup();
}
