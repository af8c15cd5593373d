/*
 * sys.c: the system calls of `aigate.core`, apart from the scheduler (task.c): the environment
 * (getenv, isatty, term_width, pid), files (fsync on a thread, truncate, file_info, open_output) and
 * core.read, which waits on a pipe or terminal without blocking the loop. See CORE_API.md.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include <event2/event.h>
#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>

#include "aigate.h"

/* ---- the environment ------------------------------------------------------------------------- */

static int l_getenv(lua_State *L)
{
    const char *v = getenv(luaL_checkstring(L, 1));
    if (v)
        lua_pushstring(L, v);
    else
        lua_pushnil(L);
    return 1;
}

static int l_isatty(lua_State *L)
{
    lua_Integer fd = luaL_checkinteger(L, 1);
    lua_pushboolean(L, isatty((int)fd));
    return 1;
}

/* core.term_width(fd): the terminal's width in columns, or nil when fd is not a terminal or the
 * terminal does not know its size (a pseudo-terminal nobody sized reports 0). Pushes one value. */
static int l_term_width(lua_State *L)
{
    lua_Integer fd = luaL_checkinteger(L, 1);
    struct winsize ws;

    if (isatty((int)fd) && ioctl((int)fd, TIOCGWINSZ, &ws) == 0 && ws.ws_col > 0)
        lua_pushinteger(L, ws.ws_col);
    else
        lua_pushnil(L);
    return 1;
}

static int l_pid(lua_State *L)
{
    lua_pushinteger(L, (lua_Integer)getpid());
    return 1;
}

/* ---- files ---------------------------------------------------------------------------------- */

/* core.fsync: inside a task the fsync runs on a short-lived thread, so that the event loop goes on
 * while the disk catches up (an fsync takes tens of milliseconds here, time in which hundreds of
 * replies would otherwise wait); the task waits for it. The thread fsyncs a duplicate of the
 * descriptor (the file may be closed meanwhile) and reports through a pipe the loop watches. */
struct fsync_op {
    struct pending pending;
    struct task *task; /* NULL once cancelled: freed when its thread reports */
    int fd;
    int err;
};

static int fsync_pipe[2] = { -1, -1 };
static struct event *fsync_event;
static int fsync_outstanding;

static void *fsync_thread(void *arg)
{
    struct fsync_op *op = arg;
    ssize_t n;

    op->err = fsync(op->fd) == 0 ? 0 : errno;
    close(op->fd);
    do
        n = write(fsync_pipe[1], &op, sizeof(op));
    while (n < 0 && errno == EINTR);
    return NULL;
}

static void fsync_finish(struct fsync_op *op)
{
    struct task *t = op->task;
    lua_State *co;
    int nret = 1;

    fsync_outstanding--;
    if (t == NULL) {
        free(op);
        return;
    }
    co = task_thread(t);
    if (op->err == 0) {
        lua_pushboolean(co, 1);
    } else {
        lua_pushnil(co);
        lua_pushfstring(co, "fsync: %s", strerror(op->err));
        nret = 2;
    }
    free(op);
    task_resume(t, nret);
}

static void fsync_done_cb(evutil_socket_t fd, short what, void *arg)
{
    struct fsync_op *op;

    (void)what;
    (void)arg;
    while (read(fd, &op, sizeof(op)) == (ssize_t)sizeof(op))
        fsync_finish(op);
}

static void fsync_cancel(struct pending *p)
{
    ((struct fsync_op *)p)->task = NULL;
}

static int fsync_setup(void)
{
    if (fsync_event)
        return 0;
    if (pipe(fsync_pipe) != 0)
        return -1;
    fcntl(fsync_pipe[0], F_SETFL, fcntl(fsync_pipe[0], F_GETFL) | O_NONBLOCK);
    fcntl(fsync_pipe[0], F_SETFD, FD_CLOEXEC);
    fcntl(fsync_pipe[1], F_SETFD, FD_CLOEXEC);
    fsync_event = event_new(g_base, fsync_pipe[0], EV_READ | EV_PERSIST, fsync_done_cb, NULL);
    if (fsync_event == NULL || event_add(fsync_event, NULL) != 0)
        return -1;
    return 0;
}

/* Waits for the fsyncs still running (at shutdown: their results are on disk before we exit). */
void sys_shutdown(void)
{
    struct fsync_op *op;

    while (fsync_outstanding > 0) {
        struct pollfd pfd = { fsync_pipe[0], POLLIN, 0 };
        if (poll(&pfd, 1, -1) < 0 && errno != EINTR)
            break;
        while (read(fsync_pipe[0], &op, sizeof(op)) == (ssize_t)sizeof(op))
            fsync_finish(op);
    }
    if (fsync_event)
        event_free(fsync_event);
    fsync_event = NULL;
    if (fsync_pipe[0] >= 0) {
        close(fsync_pipe[0]);
        close(fsync_pipe[1]);
    }
    fsync_pipe[0] = fsync_pipe[1] = -1;
}

/* Whether fsync means anything for fd: true for regular files and block devices. Terminals,
 * /dev/null, pipes and sockets hold nothing to flush to a disk (fsync fails on them with EINVAL),
 * so writing results there is not an error. */
static int has_disk_data(int fd)
{
    struct stat st;

    if (fstat(fd, &st) != 0)
        return 1; /* let fsync report what is wrong */
    return S_ISREG(st.st_mode) || S_ISBLK(st.st_mode);
}

static int l_fsync(lua_State *L)
{
    luaL_Stream *s = luaL_checkudata(L, 1, LUA_FILEHANDLE);
    struct task *t = task_current(L);
    struct fsync_op *op;
    pthread_t th;
    pthread_attr_t attr;
    int started = 0;

    if (s->closef == NULL)
        return luaL_argerror(L, 1, "attempt to use a closed file");
    if (fflush(s->f) != 0)
        goto fail;
    if (!has_disk_data(fileno(s->f))) {
        lua_pushboolean(L, 1);
        return 1;
    }
    if (t != NULL && fsync_setup() == 0 && (op = malloc(sizeof(*op))) != NULL) {
        op->pending.cancel = fsync_cancel;
        op->task = t;
        op->err = 0;
        op->fd = dup(fileno(s->f));
        if (op->fd >= 0 && pthread_attr_init(&attr) == 0) {
            pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
            started = pthread_create(&th, &attr, fsync_thread, op) == 0;
            pthread_attr_destroy(&attr);
        }
        if (started) {
            fsync_outstanding++;
            lua_settop(L, 0);
            return task_yield(L, t, &op->pending);
        }
        if (op->fd >= 0)
            close(op->fd);
        free(op);
    }
    /* Outside a task (or without a thread): here and now. */
    if (fsync(fileno(s->f)) != 0)
        goto fail;
    lua_pushboolean(L, 1);
    return 1;
fail:
    lua_pushnil(L);
    lua_pushfstring(L, "fsync: %s", strerror(errno));
    return 2;
}

/* core.truncate(path, size): cuts a file to size bytes (drops a torn tail). Pushes true or nil, err. */
static int l_truncate(lua_State *L)
{
    const char *path = luaL_checkstring(L, 1);
    lua_Integer size = luaL_checkinteger(L, 2);

    luaL_argcheck(L, size >= 0, 2, "size must be >= 0");
    if (truncate(path, (off_t)size) != 0) {
        lua_pushnil(L);
        lua_pushfstring(L, "truncate: %s: %s", path, strerror(errno));
        return 2;
    }
    lua_pushboolean(L, 1);
    return 1;
}

/* ---- core.read: input from pipes and terminals without blocking the loop ------------------- */

struct read_op {
    struct pending pending;
    struct event *ev;
    struct task *task;
    size_t max;
};

/* Reads up to max bytes from fd and pushes the outcome on L: the bytes, nil at end of input, or
 * nil and an error. Returns the number of values, or 0 when the read would block. */
static int push_read(lua_State *L, int fd, size_t max)
{
    char *data = malloc(max);
    ssize_t n;

    if (data == NULL)
        return luaL_error(L, "out of memory");
    do {
        n = read(fd, data, max);
    } while (n < 0 && errno == EINTR);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
        free(data);
        return 0;
    }
    if (n < 0) {
        int err = errno;
        free(data);
        lua_pushnil(L);
        lua_pushfstring(L, "read: %s", strerror(err));
        return 2;
    }
    if (n == 0)
        lua_pushnil(L);
    else
        lua_pushlstring(L, data, (size_t)n);
    free(data);
    return 1;
}

static int still_readable(int fd)
{
    struct pollfd pfd;
    int rc;

    pfd.fd = fd;
    pfd.events = POLLIN;
    pfd.revents = 0;
    do {
        rc = poll(&pfd, 1, 0);
    } while (rc < 0 && errno == EINTR);
    return rc != 0; /* an error is reported by the read itself */
}

static void read_cancel(struct pending *p)
{
    struct read_op *op = (struct read_op *)p;
    event_free(op->ev);
    free(op);
}

static void read_cb(evutil_socket_t fd, short what, void *arg)
{
    struct read_op *op = arg;
    struct task *t = op->task;
    int nret;

    (void)what;
    /*
     * Several tasks may wait on one descriptor, and all are woken together: the first may take what
     * arrived. Read only if data (or the end) is still there, so that read() cannot block the loop.
     */
    nret = still_readable((int)fd) ? push_read(task_thread(t), (int)fd, op->max) : 0;
    if (nret == 0) {
        event_add(op->ev, NULL); /* spurious wake-up: wait again */
        return;
    }
    event_free(op->ev);
    free(op);
    task_resume(t, nret);
}

static int l_read(lua_State *L)
{
    lua_Integer fd = luaL_checkinteger(L, 1);
    lua_Integer max = luaL_optinteger(L, 2, 65536);
    struct stat st;
    struct task *t;
    struct read_op *op;
    int nret;

    luaL_argcheck(L, fd >= 0, 1, "file descriptor expected");
    luaL_argcheck(L, max > 0, 2, "size must be > 0");
    if (fstat((int)fd, &st) != 0) {
        lua_pushnil(L);
        lua_pushfstring(L, "read: %s", strerror(errno));
        return 2;
    }
    /* Regular files are always "readable": read them at once. */
    if (S_ISREG(st.st_mode) || S_ISBLK(st.st_mode)) {
        nret = push_read(L, (int)fd, (size_t)max);
        if (nret > 0)
            return nret;
    }
    t = task_check(L);
    op = malloc(sizeof(*op));
    if (op == NULL)
        return luaL_error(L, "out of memory");
    op->pending.cancel = read_cancel;
    op->task = t;
    op->max = (size_t)max;
    op->ev = event_new(g_base, (evutil_socket_t)fd, EV_READ, read_cb, op);
    if (op->ev == NULL || event_add(op->ev, NULL) != 0) {
        if (op->ev)
            event_free(op->ev);
        free(op);
        lua_pushnil(L);
        lua_pushstring(L, "read: cannot watch this file descriptor");
        return 2;
    }
    lua_settop(L, 0);
    return task_yield(L, t, &op->pending);
}

/* ---- batch outputs ------------------------------------------------------------------------- */

/* A larger buffer for an output file than glibc's default of one block (4 KiB: Lua's setvbuf cannot
 * pass a size glibc keeps): a 700-byte result line then costs a fraction of a write call. */
#define OUT_BUFFER      (256 * 1024)
#define OUT_PIPE_BUFFER (64 * 1024) /* a FIFO or a device: the batch flushes it every 10 ms anyway */

/* A file opened by core.open_output: a Lua file (Lua's io functions see the luaL_Stream) whose
 * buffer is ours, freed once the stream is closed (by file:close or by the collector). */
struct out_stream {
    luaL_Stream s;
    char *buffer;
};

static int out_close(lua_State *L)
{
    struct out_stream *o = luaL_checkudata(L, 1, LUA_FILEHANDLE);
    int ok = fclose(o->s.f) == 0;
    int err = errno;

    free(o->buffer);
    o->buffer = NULL;
    errno = err;
    return luaL_fileresult(L, ok, NULL);
}

/* core.open_output(path, append) -> file; or nil, err[, "no_reader"]. Opens the output of a batch
 * (appending to it, or emptied) without blocking: a FIFO with no reader yet gives nil, err,
 * "no_reader", and the caller waits and tries again while the event loop goes on (so that SIGINT
 * and SIGTERM end the wait, where a plain open would block the process in the kernel). Once open,
 * writes block as on any file: a slow reader slows the batch down. */
static int l_open_output(lua_State *L)
{
    const char *path = luaL_checkstring(L, 1);
    int append = lua_toboolean(L, 2);
    struct out_stream *o;
    struct stat st;
    size_t size;
    int fd;
    int flags;

    o = lua_newuserdatauv(L, sizeof(*o), 0);
    o->s.f = NULL;
    o->s.closef = NULL; /* a closed file until it is open */
    o->buffer = NULL;
    luaL_setmetatable(L, LUA_FILEHANDLE);
    fd = open(path, O_WRONLY | O_CREAT | O_NONBLOCK | O_CLOEXEC | (append ? O_APPEND : O_TRUNC), 0666);
    if (fd < 0) {
        int err = errno;
        lua_pushnil(L);
        lua_pushfstring(L, "%s: %s", path, strerror(err));
        if (err == ENXIO && stat(path, &st) == 0 && S_ISFIFO(st.st_mode)) {
            lua_pushliteral(L, "no_reader");
            return 3;
        }
        return 2;
    }
    flags = fcntl(fd, F_GETFL);
    if (flags < 0 || fcntl(fd, F_SETFL, flags & ~O_NONBLOCK) != 0 || fstat(fd, &st) != 0 ||
        (o->s.f = fdopen(fd, append ? "ab" : "wb")) == NULL) {
        int err = errno;
        close(fd);
        lua_pushnil(L);
        lua_pushfstring(L, "%s: %s", path, strerror(err));
        return 2;
    }
    o->s.closef = out_close;
    size = S_ISREG(st.st_mode) ? OUT_BUFFER : OUT_PIPE_BUFFER;
    o->buffer = malloc(size);
    if (o->buffer && setvbuf(o->s.f, o->buffer, _IOFBF, size) != 0) {
        free(o->buffer);
        o->buffer = NULL;
    }
    return 1;
}

/* core.file_info(path) -> kind ("file", "fifo", "directory" or "other"), size; or nil, err. */
static int l_file_info(lua_State *L)
{
    const char *path = luaL_checkstring(L, 1);
    struct stat st;

    if (stat(path, &st) != 0) {
        lua_pushnil(L);
        lua_pushfstring(L, "%s: %s", path, strerror(errno));
        return 2;
    }
    lua_pushstring(L, S_ISREG(st.st_mode)    ? "file"
                      : S_ISFIFO(st.st_mode) ? "fifo"
                      : S_ISDIR(st.st_mode)  ? "directory"
                                             : "other");
    lua_pushinteger(L, (lua_Integer)st.st_size);
    return 2;
}

void core_register_sys(lua_State *L)
{
    static const luaL_Reg funcs[] = {
        { "getenv", l_getenv },
        { "isatty", l_isatty },
        { "term_width", l_term_width },
        { "pid", l_pid },
        { "fsync", l_fsync },
        { "truncate", l_truncate },
        { "read", l_read },
        { "open_output", l_open_output },
        { "file_info", l_file_info },
        { NULL, NULL },
    };

    luaL_setfuncs(L, funcs, 0);
    lua_pushinteger(L, EPIPE); /* the errno of a write whose reader went away (io.write's third result) */
    lua_setfield(L, -2, "EPIPE");
}
