/*
 * logfile.c: core.log_open, a line log (aigate's request log) written without blocking the loop.
 *
 * A request is never held up by its log line: log:write appends the line to a buffer in memory and
 * returns; the buffer is written FLUSH_AFTER_US later (a timer: the lines of that time go in one
 * write, after the replies that made them; at once once FLUSH_NOW bytes wait), with non-blocking
 * writes, and when the file cannot take more (a pipe nobody reads fast enough, a stalled terminal)
 * the rest waits for the descriptor to be writable. The buffer is bounded: a line that does not fit
 * is dropped and counted, with a warning on stderr, so that a stuck reader costs lines, never memory
 * or latency. log:reopen opens the path again (aigate.reqlog calls it on SIGUSR1, through
 * core.wait_signal: logrotate renames the file, then signals; the next lines go to a new file).
 * What is buffered is written when the log is closed or collected (at exit, lua_close collects it),
 * waiting for a pipe at most CLOSE_WAIT_MS.
 *
 * Standard output ("-"): a pipe or terminal gets a descriptor of its own (/proc/self/fd/1 opened
 * again: a new open file description, so that O_NONBLOCK does not reach the terminal or pipe the
 * shell and stdio share); a socket (a service manager's journal) is written with send(MSG_DONTWAIT);
 * a regular file is written through a duplicate of fd 1, whose offset stdio's writes share.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <event2/event.h>
#include <lauxlib.h>
#include <lua.h>

#include "aigate.h"
#include "buf.h"

#define LOG_MT             "aigate.log"
#define DEFAULT_MAX_BUFFER (4 * 1024 * 1024)
#define CLOSE_WAIT_MS      2000
#define FLUSH_AFTER_US     2000
#define FLUSH_NOW          (64 * 1024)

static const struct timeval flush_after = { 0, FLUSH_AFTER_US };

struct logfile {
    char *path;         /* NULL: standard output */
    int fd;             /* -1 once closed */
    int is_socket;      /* written with send(MSG_DONTWAIT) */
    struct buf pending; /* bytes [off, len) not written yet */
    size_t off;
    size_t max_buffer;
    long long lines, dropped, streak; /* accepted, dropped in all, dropped since the last warning */
    int failed;                       /* a write failed (not EAGAIN): lines are dropped until a reopen */
    int armed;                        /* ev is active or waits for the descriptor, or flush waits */
    struct event *ev;
    struct event *flush; /* a timer: lines are written a little after they come, several at once */
    struct logfile *next;
};

static struct logfile *open_logs;

static size_t pending_len(const struct logfile *lf)
{
    return lf->pending.len - lf->off;
}

static void warn_dropped(struct logfile *lf)
{
    if (lf->streak > 0) {
        fprintf(stderr, "aigate: log %s: %lld line(s) dropped (it was not written fast enough)\n",
                lf->path ? lf->path : "(stdout)", lf->streak);
        lf->streak = 0;
    }
}

/* Writes what it can without blocking. Returns 1 when bytes are left for a writable descriptor,
 * else 0 (all written, or dropped after a failure). */
static int write_some(struct logfile *lf)
{
    while (pending_len(lf) > 0) {
        const char *p = lf->pending.data + lf->off;
        size_t n = pending_len(lf);
        ssize_t w = lf->is_socket ? send(lf->fd, p, n, MSG_DONTWAIT | MSG_NOSIGNAL) : write(lf->fd, p, n);
        if (w > 0) {
            lf->off += (size_t)w;
            continue;
        }
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            /* what was written goes, so that the buffer holds at most max_buffer bytes */
            if (lf->off > 0)
                buf_consume(&lf->pending, lf->off);
            lf->off = 0;
            return 1;
        }
        fprintf(stderr,
                "aigate: log %s: write failed (%s): lines are dropped until it is reopened (SIGUSR1)\n",
                lf->path ? lf->path : "(stdout)", w < 0 ? strerror(errno) : "nothing written");
        lf->failed = 1;
        break;
    }
    buf_reset(&lf->pending);
    lf->off = 0;
    return 0;
}

static void log_cb(evutil_socket_t fd, short what, void *arg)
{
    struct logfile *lf = arg;

    (void)fd;
    (void)what;
    lf->armed = 0;
    if (lf->fd < 0)
        return;
    if (write_some(lf)) {
        /* full: wait for room (only pipes, terminals and sockets get here: regular files never
         * answer EAGAIN, and epoll refuses them) */
        if (event_add(lf->ev, NULL) == 0)
            lf->armed = 1;
        return;
    }
    warn_dropped(lf); /* drained: say how many lines did not make it */
}

static int make_event(struct logfile *lf)
{
    lf->ev = event_new(g_base, lf->fd, EV_WRITE, log_cb, lf);
    if (lf->flush == NULL)
        lf->flush = evtimer_new(g_base, log_cb, lf);
    return lf->ev && lf->flush ? 0 : -1;
}

/* Opens path (NULL: standard output) for lf. Returns 0, or -1 with errno set. */
static int open_fd(struct logfile *lf)
{
    struct stat st;

    lf->is_socket = 0;
    if (lf->path) {
        lf->fd = open(lf->path, O_WRONLY | O_CREAT | O_APPEND | O_NONBLOCK | O_CLOEXEC, 0644);
        return lf->fd < 0 ? -1 : 0;
    }
    if (fstat(1, &st) != 0)
        return -1;
    if (S_ISSOCK(st.st_mode) || S_ISREG(st.st_mode) || S_ISBLK(st.st_mode)) {
        /* a socket: send(MSG_DONTWAIT); a file: its offset is shared with stdio's writes (a new
         * description would write over them), and a file never makes a write wait for a reader */
        lf->fd = fcntl(1, F_DUPFD_CLOEXEC, 3);
        lf->is_socket = S_ISSOCK(st.st_mode);
        return lf->fd < 0 ? -1 : 0;
    }
    lf->fd = open("/proc/self/fd/1", O_WRONLY | O_APPEND | O_NONBLOCK | O_CLOEXEC);
    if (lf->fd < 0) /* no /proc: stdout itself, whose writes may block (the shared flags stay) */
        lf->fd = fcntl(1, F_DUPFD_CLOEXEC, 3);
    return lf->fd < 0 ? -1 : 0;
}

/* Writes what is buffered, waiting for a pipe at most CLOSE_WAIT_MS, and closes the descriptor. */
static void flush_close(struct logfile *lf)
{
    struct timespec t0, t;

    if (lf->fd < 0)
        return;
    if (lf->ev) {
        event_free(lf->ev);
        lf->ev = NULL;
    }
    if (lf->flush) {
        event_free(lf->flush);
        lf->flush = NULL;
    }
    lf->armed = 0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    while (!lf->failed && write_some(lf)) {
        struct pollfd pfd = { .fd = lf->fd, .events = POLLOUT };
        long left;
        clock_gettime(CLOCK_MONOTONIC, &t);
        left = CLOSE_WAIT_MS - ((t.tv_sec - t0.tv_sec) * 1000 + (t.tv_nsec - t0.tv_nsec) / 1000000);
        if (left <= 0 || (poll(&pfd, 1, (int)left) < 0 && errno != EINTR)) {
            fprintf(stderr, "aigate: log %s: %zu byte(s) not written at close (nothing read them)\n",
                    lf->path ? lf->path : "(stdout)", pending_len(lf));
            break;
        }
    }
    warn_dropped(lf);
    close(lf->fd);
    lf->fd = -1;
    buf_free(&lf->pending);
    lf->off = 0;
}

static void unlink_log(struct logfile *lf)
{
    struct logfile **pp;

    for (pp = &open_logs; *pp; pp = &(*pp)->next) {
        if (*pp == lf) {
            *pp = lf->next;
            break;
        }
    }
    lf->next = NULL;
}

/* Reopens a log opened by path: what is buffered goes to the old file if it takes it at once, the
 * rest to the new one. Returns 0, or -1 with errno set (the old file is kept then). */
static int reopen(struct logfile *lf)
{
    int old = lf->fd;
    struct event *old_ev = lf->ev;

    if (lf->path == NULL || old < 0)
        return 0;
    write_some(lf);
    if (open_fd(lf) != 0) {
        int err = errno;
        lf->fd = old;
        errno = err;
        return -1;
    }
    if (make_event(lf) != 0) {
        close(lf->fd);
        lf->fd = old;
        lf->ev = old_ev;
        errno = ENOMEM;
        return -1;
    }
    event_free(old_ev);
    close(old);
    lf->failed = 0;
    lf->armed = 0;
    if (pending_len(lf) > 0) {
        event_active(lf->ev, EV_WRITE, 0);
        lf->armed = 1;
    }
    return 0;
}

static struct logfile *check_log(lua_State *L)
{
    struct logfile *lf = luaL_checkudata(L, 1, LOG_MT);
    if (lf->fd < 0)
        luaL_error(L, "the log is closed");
    return lf;
}

/* log:write(line) -> true, or false when the line was dropped (buffer full, or the file failed).
 * A newline is added. Never blocks and never yields: callable from anywhere. */
static int log_write(lua_State *L)
{
    struct logfile *lf = check_log(L);
    size_t len;
    const char *line = luaL_checklstring(L, 2, &len);

    if (lf->failed || pending_len(lf) + len + 1 > lf->max_buffer) {
        if (!lf->failed && lf->streak == 0)
            fprintf(stderr,
                    "aigate: log %s: a line of %zu bytes does not fit (%zu bytes wait to be written, at "
                    "most %zu): dropping lines until it drains\n",
                    lf->path ? lf->path : "(stdout)", len + 1, pending_len(lf), lf->max_buffer);
        lf->dropped++;
        lf->streak++;
        lua_pushboolean(L, 0);
        return 1;
    }
    buf_append(&lf->pending, line, len);
    buf_append_char(&lf->pending, '\n');
    lf->lines++;
    if (!lf->armed) {
        /* A line per request is a write per request: written FLUSH_AFTER_US later, with the lines
         * that came meanwhile, and after the reply that made it went out; at once when many wait. */
        if (pending_len(lf) >= FLUSH_NOW)
            event_active(lf->ev, EV_WRITE, 0);
        else
            evtimer_add(lf->flush, &flush_after);
        lf->armed = 1;
    }
    lua_pushboolean(L, 1);
    return 1;
}

/* log:stats() -> {lines = accepted, dropped = n, buffered = bytes not written yet}. */
static int log_stats(lua_State *L)
{
    struct logfile *lf = luaL_checkudata(L, 1, LOG_MT);

    lua_createtable(L, 0, 3);
    lua_pushinteger(L, lf->lines);
    lua_setfield(L, -2, "lines");
    lua_pushinteger(L, lf->dropped);
    lua_setfield(L, -2, "dropped");
    lua_pushinteger(L, lf->fd < 0 ? 0 : (lua_Integer)pending_len(lf));
    lua_setfield(L, -2, "buffered");
    return 1;
}

/* log:reopen() -> true, or nil, err (what SIGUSR1 does to every log opened by path). */
static int log_reopen(lua_State *L)
{
    struct logfile *lf = check_log(L);

    if (reopen(lf) != 0) {
        lua_pushnil(L);
        lua_pushfstring(L, "%s: %s", lf->path, strerror(errno));
        return 2;
    }
    lua_pushboolean(L, 1);
    return 1;
}

/* log:close(): writes what is buffered (a pipe is waited for at most CLOSE_WAIT_MS) and closes. */
static int log_close(lua_State *L)
{
    struct logfile *lf = luaL_checkudata(L, 1, LOG_MT);

    if (lf->fd >= 0) {
        flush_close(lf);
        unlink_log(lf);
    }
    return 0;
}

static int log_gc(lua_State *L)
{
    struct logfile *lf = luaL_checkudata(L, 1, LOG_MT);

    log_close(L);
    free(lf->path);
    lf->path = NULL;
    return 0;
}

/* core.log_open(path [, max_buffer]) -> log, or nil, err. path "-": standard output. */
static int l_log_open(lua_State *L)
{
    const char *path = luaL_checkstring(L, 1);
    lua_Integer max = luaL_optinteger(L, 2, DEFAULT_MAX_BUFFER);
    struct logfile *lf;
    struct stat st;

    luaL_argcheck(L, max > 0, 2, "the buffer's size must be > 0");
    lf = lua_newuserdatauv(L, sizeof(*lf), 0);
    memset(lf, 0, sizeof(*lf));
    lf->fd = -1;
    buf_init(&lf->pending);
    luaL_setmetatable(L, LOG_MT);
    lf->max_buffer = (size_t)max;
    if (strcmp(path, "-") != 0 && strcmp(path, "/dev/stdout") != 0) { /* (its offset is stdio's too) */
        lf->path = strdup(path);
        if (lf->path == NULL)
            return luaL_error(L, "out of memory");
    }
    if (open_fd(lf) != 0) {
        int err = errno;
        lua_pushnil(L);
        if (err == ENXIO && lf->path && stat(path, &st) == 0 && S_ISFIFO(st.st_mode))
            lua_pushfstring(L, "%s: a FIFO that no process reads: start its reader first", path);
        else
            lua_pushfstring(L, "%s: %s", path, strerror(err));
        return 2;
    }
    if (make_event(lf) != 0) {
        close(lf->fd);
        lf->fd = -1;
        return luaL_error(L, "out of memory");
    }
    lf->next = open_logs;
    open_logs = lf;
    return 1;
}

void core_register_log(lua_State *L)
{
    static const luaL_Reg methods[] = {
        { "write", log_write }, { "stats", log_stats }, { "reopen", log_reopen },
        { "close", log_close }, { NULL, NULL },
    };

    if (luaL_newmetatable(L, LOG_MT)) {
        luaL_newlib(L, methods);
        lua_setfield(L, -2, "__index");
        lua_pushcfunction(L, log_gc);
        lua_setfield(L, -2, "__gc");
        lua_pushstring(L, "aigate log");
        lua_setfield(L, -2, "__name");
    }
    lua_pop(L, 1);
    lua_pushcfunction(L, l_log_open);
    lua_setfield(L, -2, "log_open");
}
