/*
 * task.c: tasks (coroutines driven by the event loop) and the waiting primitives that need no I/O.
 *
 * A task is a Lua coroutine plus a C record kept in the handle userdata that `core.spawn` returns;
 * the coroutine is that userdata's user value, so a finished task's results stay on its stack for as
 * long as somebody holds the handle. While a task runs or waits, the handle is anchored in the
 * registry. A primitive that waits starts its operation, records it as the task's `pending` (so it
 * can be cancelled at shut-down) and yields; the loop callback that completes the operation pushes
 * the results on the coroutine and calls task_resume. New tasks and wake-ups of waiters go through a
 * run queue drained from a libevent callback, so no task is ever resumed from inside Lua code.
 *
 * Also here: core.sleep, core.wait, core.wait_signal (SIGINT/SIGTERM), clocks, getenv, isatty,
 * term_width, fsync, truncate.
 */
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <event2/event.h>
#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>

#include "aigate.h"

#define TASK_MT "aigate.task"

enum task_state {
    TASK_QUEUED,
    TASK_RUNNING,
    TASK_WAITING,
    TASK_DONE,
    TASK_FAILED,
};

struct task {
    lua_State *co;
    int anchor; /* registry ref to the handle while the task is alive */
    enum task_state state;
    int nresume; /* values pushed on co for the next resume */
    int waited;  /* somebody collected the outcome */
    struct pending *pending;
    struct task *waiters; /* tasks blocked in core.wait on this one */
    struct task *next_waiter;
    struct task *runq_next;
    struct task *prev; /* list of live tasks, for shut-down */
    struct task *next;
    task_done_fn done;
    void *done_ud;
};

static struct task *live_tasks;
static struct task *runq_head;
static struct task *runq_tail;
static struct event *runq_event;

static struct task *signal_waiters;
static struct event *sigint_event;
static struct event *sigterm_event;

int g_exit_code = -1;

void host_exit(int code)
{
    if (g_exit_code < 0)
        g_exit_code = code;
    event_base_loopbreak(g_base);
}

void task_report_error(const char *what, const char *msg)
{
    fprintf(stderr, "aigate: %s: %s\n", what, msg);
    fflush(stderr);
}

/* ---- errors and protected calls ------------------------------------------------------------- */

/* error_text(err) -> the message of an error object: a string or number as it is, else what its
 * __tostring gives, else a description of its type. Called in protected mode only. */
static int error_text(lua_State *L)
{
    if (lua_type(L, 1) == LUA_TSTRING || lua_type(L, 1) == LUA_TNUMBER) {
        lua_tostring(L, 1);
        lua_settop(L, 1);
        return 1;
    }
    if (luaL_callmeta(L, 1, "__tostring") && lua_type(L, -1) == LUA_TSTRING)
        return 1;
    lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, 1));
    return 1;
}

void push_traceback(lua_State *L, lua_State *co, int level)
{
    /* The error object's text comes from a protected call on the main thread: a __tostring that
     * raises (or yields) must not raise here, where nothing protects L (a task's dead coroutine). */
    lua_State *M = g_L;
    const char *msg;

    lua_xmove(L, M, 1);
    lua_pushcfunction(M, error_text);
    lua_insert(M, -2);
    if (lua_pcall(M, 1, 1, 0) != LUA_OK || lua_type(M, -1) != LUA_TSTRING) {
        lua_pop(M, 1);
        lua_pushliteral(M, "(error object whose __tostring failed)");
    }
    msg = lua_tostring(M, -1);
    luaL_traceback(M, co, msg, level);
    lua_remove(M, -2);
    lua_xmove(M, L, 1);
}

static int traceback_handler(lua_State *L)
{
    push_traceback(L, L, 1);
    return 1;
}

int pcall_traceback(lua_State *L, int nargs, int nresults)
{
    int base = lua_gettop(L) - nargs;
    int rc;

    lua_pushcfunction(L, traceback_handler);
    lua_insert(L, base);
    rc = lua_pcall(L, nargs, nresults, base);
    lua_remove(L, base);
    return rc;
}

/* ---- tasks own their coroutines ---------------------------------------------------------------- */

/* True when co is the coroutine of an aigate task (its extra space holds the task). */
static int is_task_thread(lua_State *L, int idx)
{
    lua_State *co = lua_tothread(L, idx);

    return co != NULL && *(struct task **)lua_getextraspace(co) != NULL;
}

/* coroutine.resume and coroutine.close, refusing a task's coroutine: only the event loop resumes a
 * task, with the result of what it waits for; resumed from Lua it would run on while the loop still
 * holds its wait, and the loop's resume would then corrupt it. Upvalue 1: the original function. */
static int guarded_coroutine_op(lua_State *L)
{
    int n = lua_gettop(L);

    if (is_task_thread(L, 1))
        return luaL_error(L, "cannot resume or close the coroutine of an aigate task: the event loop runs it "
                             "(wait for the task with aigate.wait)");
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_insert(L, 1);
    lua_call(L, n, LUA_MULTRET);
    return lua_gettop(L);
}

void task_guard_coroutines(lua_State *L)
{
    static const char *const ops[] = { "resume", "close" };
    size_t i;

    if (lua_getglobal(L, "coroutine") != LUA_TTABLE) {
        lua_pop(L, 1);
        return;
    }
    for (i = 0; i < sizeof(ops) / sizeof(ops[0]); i++) {
        lua_getfield(L, -1, ops[i]);
        lua_pushcclosure(L, guarded_coroutine_op, 1);
        lua_setfield(L, -2, ops[i]);
    }
    lua_pop(L, 1);
}

/* ---- the run queue --------------------------------------------------------------------------- */

static void runq_push(struct task *t, int nargs)
{
    t->state = TASK_QUEUED;
    t->nresume = nargs;
    t->runq_next = NULL;
    if (runq_tail)
        runq_tail->runq_next = t;
    else
        runq_head = t;
    runq_tail = t;
    event_active(runq_event, EV_TIMEOUT, 0);
}

static void runq_cb(evutil_socket_t fd, short what, void *arg)
{
    struct task *batch = runq_head;

    (void)fd;
    (void)what;
    (void)arg;
    /* Run only what is queued now; tasks queued meanwhile run on the next turn, after I/O. */
    runq_head = NULL;
    runq_tail = NULL;
    while (batch) {
        struct task *t = batch;
        batch = t->runq_next;
        t->runq_next = NULL;
        task_resume(t, t->nresume);
        if (g_exit_code >= 0) {
            /* Put the rest back so shut-down sees and frees them. */
            while (batch) {
                struct task *rest = batch;
                batch = rest->runq_next;
                runq_push(rest, rest->nresume);
            }
            return;
        }
    }
}

/* ---- task life cycle ------------------------------------------------------------------------- */

struct task *task_check(lua_State *L)
{
    struct task *t = *(struct task **)lua_getextraspace(L);

    if (t == NULL || t->co != L)
        luaL_error(L, "attempt to yield outside an aigate task (inside a plain coroutine or a callback)");
    return t;
}

lua_State *task_thread(struct task *t)
{
    return t->co;
}

static void live_remove(struct task *t)
{
    if (t->prev)
        t->prev->next = t->next;
    else
        live_tasks = t->next;
    if (t->next)
        t->next->prev = t->prev;
    t->prev = NULL;
    t->next = NULL;
}

struct task *task_spawn(lua_State *L, int nargs, task_done_fn done, void *ud)
{
    struct task *t;
    lua_State *co;

    luaL_checktype(L, -nargs - 1, LUA_TFUNCTION);
    t = lua_newuserdatauv(L, sizeof(*t), 1);
    memset(t, 0, sizeof(*t));
    luaL_setmetatable(L, TASK_MT);
    co = lua_newthread(L);
    lua_setiuservalue(L, -2, 1);
    *(struct task **)lua_getextraspace(co) = t;
    t->co = co;
    t->done = done;
    t->done_ud = ud;
    lua_pushvalue(L, -1);
    t->anchor = luaL_ref(L, LUA_REGISTRYINDEX);
    /* Stack: fn args... handle. Move fn and args to the coroutine, keep the handle. */
    lua_insert(L, -nargs - 2);
    lua_xmove(L, co, nargs + 1);
    t->next = live_tasks;
    if (live_tasks)
        live_tasks->prev = t;
    live_tasks = t;
    runq_push(t, nargs);
    return t;
}

int task_yield(lua_State *L, struct task *t, struct pending *p)
{
    t->pending = p;
    return lua_yield(L, 0);
}

/* Pushes on `to` a copy of the outcome of finished task t: true, results... or false, err. */
static int push_outcome(struct task *t, lua_State *to)
{
    int n = lua_gettop(t->co);
    int i;
    STACK_CHECK_BEGIN(to);

    luaL_checkstack(to, n + 1, "too many results");
    lua_pushboolean(to, t->state == TASK_DONE);
    for (i = 1; i <= n; i++) {
        lua_pushvalue(t->co, i);
        lua_xmove(t->co, to, 1);
    }
    t->waited = 1;
    STACK_CHECK_END(to, n + 1);
    return n + 1;
}

static void finish(struct task *t, int ok)
{
    struct task *w;

    t->state = ok ? TASK_DONE : TASK_FAILED;
    t->pending = NULL;
    live_remove(t);
    if (t->done)
        t->done(t, ok, t->done_ud);
    while ((w = t->waiters) != NULL) {
        t->waiters = w->next_waiter;
        w->next_waiter = NULL;
        free(w->pending);
        w->pending = NULL;
        runq_push(w, push_outcome(t, w->co));
    }
    /* Last: this may let the handle (and t itself) be collected. */
    luaL_unref(g_L, LUA_REGISTRYINDEX, t->anchor);
    t->anchor = LUA_NOREF;
}

void task_resume(struct task *t, int nargs)
{
    int nres = 0;
    int rc;

    t->pending = NULL;
    t->state = TASK_RUNNING;
    rc = lua_resume(t->co, NULL, nargs, &nres);
    if (rc == LUA_YIELD) {
        if (t->pending == NULL) {
            /* A bare coroutine.yield() in a task: drop what it yielded and run again next turn. */
            lua_pop(t->co, nres);
            runq_push(t, 0);
        } else {
            t->state = TASK_WAITING;
        }
        return;
    }
    if (rc == LUA_OK) {
        finish(t, 1);
        return;
    }
    /* Error: the coroutine's stack is intact, so the traceback shows where it happened. */
    push_traceback(t->co, t->co, 0);
    lua_replace(t->co, 1);
    lua_settop(t->co, 1);
    finish(t, 0);
}

void task_cancel_all(void)
{
    struct task *t;

    for (t = live_tasks; t; t = t->next) {
        if (t->state == TASK_WAITING && t->pending) {
            struct pending *p = t->pending;
            t->pending = NULL;
            p->cancel(p);
        }
    }
}

static int task_gc(lua_State *L)
{
    struct task *t = luaL_checkudata(L, 1, TASK_MT);

    if (t->state == TASK_FAILED && !t->waited && t->done == NULL) {
        lua_State *co = t->co;
        task_report_error("task failed", lua_tostring(co, 1));
    }
    return 0;
}

/* ---- core.spawn / core.wait ------------------------------------------------------------------ */

static int l_spawn(lua_State *L)
{
    int nargs = lua_gettop(L) - 1;

    luaL_checktype(L, 1, LUA_TFUNCTION);
    task_spawn(L, nargs, NULL, NULL);
    return 1;
}

struct wait_op {
    struct pending pending;
    struct task *waiter;
    struct task *target;
};

static void wait_cancel(struct pending *p)
{
    struct wait_op *op = (struct wait_op *)p;
    struct task **pp = &op->target->waiters;

    while (*pp && *pp != op->waiter)
        pp = &(*pp)->next_waiter;
    if (*pp)
        *pp = op->waiter->next_waiter;
    free(op);
}

/* The task t waits for in core.wait, or NULL. */
static struct task *waits_for(struct task *t)
{
    if (t->state != TASK_WAITING || t->pending == NULL || t->pending->cancel != wait_cancel)
        return NULL;
    return ((struct wait_op *)t->pending)->target;
}

static int l_wait(lua_State *L)
{
    struct task *target = luaL_checkudata(L, 1, TASK_MT);
    struct task *self;
    struct task *t;
    struct wait_op *op;

    if (target->state == TASK_DONE || target->state == TASK_FAILED)
        return push_outcome(target, L);
    self = task_check(L);
    if (self == target)
        return luaL_error(L, "a task cannot wait for itself");
    /* Waits never form a cycle (each one is checked here), so this chain ends. */
    for (t = waits_for(target); t; t = waits_for(t)) {
        if (t == self)
            return luaL_error(L, "deadlock: the task waited for is itself waiting (directly or through other "
                                 "tasks) for this one, so neither would ever go on");
    }
    /*
     * The wait record is freed when the waiter is woken (finish() clears pending before queueing),
     * so it lives in the waiter's chain only; a small malloc keeps cancel simple.
     */
    op = malloc(sizeof(*op));
    if (op == NULL)
        return luaL_error(L, "out of memory");
    op->pending.cancel = wait_cancel;
    op->waiter = self;
    op->target = target;
    self->next_waiter = target->waiters;
    target->waiters = self;
    lua_settop(L, 0);
    return task_yield(L, self, &op->pending);
}

/* ---- core.sleep ------------------------------------------------------------------------------ */

struct sleep_op {
    struct pending pending;
    struct event *ev;
    struct task *task;
    double deadline; /* monotonic seconds */
};

static double monotonic_now(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

void seconds_to_timeval(double seconds, struct timeval *tv)
{
    double whole;
    double usec;

    if (!(seconds > 0))
        seconds = 0;
    if (seconds > AIGATE_MAX_SECONDS)
        seconds = AIGATE_MAX_SECONDS;
    whole = floor(seconds);
    usec = ceil((seconds - whole) * 1e6);
    tv->tv_sec = (time_t)whole;
    tv->tv_usec = (suseconds_t)usec;
    if (tv->tv_usec >= 1000000) {
        tv->tv_sec++;
        tv->tv_usec -= 1000000;
    }
}

/* Arms a sleep's timer for what is left until its deadline. libevent measures a timer from the time
 * it cached when the loop turn began, which is early by however long Lua ran since (and its coarse
 * clock may lag the one core.now reads): the cache is refreshed first, and sleep_cb checks. */
static void sleep_arm(struct sleep_op *op, double seconds)
{
    struct timeval tv;

    seconds_to_timeval(seconds, &tv);
    event_base_update_cache_time(g_base);
    evtimer_add(op->ev, &tv);
}

static void sleep_cancel(struct pending *p)
{
    struct sleep_op *op = (struct sleep_op *)p;
    event_free(op->ev);
    free(op);
}

static void sleep_cb(evutil_socket_t fd, short what, void *arg)
{
    struct sleep_op *op = arg;
    struct task *t = op->task;
    double left = op->deadline - monotonic_now();

    (void)fd;
    (void)what;
    if (left > 0) {
        sleep_arm(op, left);
        return;
    }
    event_free(op->ev);
    free(op);
    task_resume(t, 0);
}

static int l_sleep(lua_State *L)
{
    double seconds = luaL_checknumber(L, 1);
    struct task *t = task_check(L);
    struct sleep_op *op;

    if (!(seconds >= 0))
        return luaL_argerror(L, 1, "seconds must be >= 0");
    if (seconds > AIGATE_MAX_SECONDS)
        seconds = AIGATE_MAX_SECONDS; /* math.huge: as long as a timer can wait, for ever in practice */
    op = malloc(sizeof(*op));
    if (op == NULL)
        return luaL_error(L, "out of memory");
    op->pending.cancel = sleep_cancel;
    op->task = t;
    op->ev = evtimer_new(g_base, sleep_cb, op);
    if (op->ev == NULL) {
        free(op);
        return luaL_error(L, "out of memory");
    }
    op->deadline = monotonic_now() + seconds;
    sleep_arm(op, seconds);
    lua_settop(L, 0);
    return task_yield(L, t, &op->pending);
}

/* ---- signals --------------------------------------------------------------------------------- */

struct signal_op {
    struct pending pending;
    struct task *task;
};

static void signal_cancel(struct pending *p)
{
    struct signal_op *op = (struct signal_op *)p;
    struct task **pp = &signal_waiters;

    while (*pp && *pp != op->task)
        pp = &(*pp)->next_waiter;
    if (*pp)
        *pp = op->task->next_waiter;
    free(op);
}

/* The waiters run at once, not on the next turn, and signal events come before any other event of
 * the same loop turn (priority 0, see tasks_init): what a waiter decides (`aigate batch` stops the
 * engine's workers) holds before any reply that came in with the signal is handled. */
static void signal_cb(evutil_socket_t sig, short what, void *arg)
{
    const char *name = sig == SIGINT ? "INT" : "TERM";
    struct task *list = signal_waiters;
    struct task *w;

    (void)what;
    (void)arg;
    if (list == NULL) {
        host_exit(sig == SIGINT ? 130 : 143);
        return;
    }
    signal_waiters = NULL; /* a waiter may wait again while the others are resumed */
    while ((w = list) != NULL) {
        list = w->next_waiter;
        w->next_waiter = NULL;
        if (g_exit_code >= 0) {
            /* Shutting down: it stays waiting, and the shut-down cancels it. */
            w->next_waiter = signal_waiters;
            signal_waiters = w;
            continue;
        }
        free(w->pending);
        w->pending = NULL;
        lua_pushstring(w->co, name);
        task_resume(w, 1);
    }
}

static int l_wait_signal(lua_State *L)
{
    struct task *t = task_check(L);
    struct signal_op *op = malloc(sizeof(*op));

    if (op == NULL)
        return luaL_error(L, "out of memory");
    op->pending.cancel = signal_cancel;
    op->task = t;
    t->next_waiter = signal_waiters;
    signal_waiters = t;
    lua_settop(L, 0);
    return task_yield(L, t, &op->pending);
}

/* ---- small system primitives ----------------------------------------------------------------- */

static int l_now(lua_State *L)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    lua_pushnumber(L, (double)ts.tv_sec + (double)ts.tv_nsec / 1e9);
    return 1;
}

static int l_time(lua_State *L)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    lua_pushnumber(L, (double)ts.tv_sec + (double)ts.tv_nsec / 1e9);
    return 1;
}

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
static void fsync_drain(void)
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
    struct task *t = *(struct task **)lua_getextraspace(L);
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
    if (t != NULL && t->co == L && fsync_setup() == 0 && (op = malloc(sizeof(*op))) != NULL) {
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
    nret = still_readable((int)fd) ? push_read(t->co, (int)fd, op->max) : 0;
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

static int l_pid(lua_State *L)
{
    lua_pushinteger(L, (lua_Integer)getpid());
    return 1;
}

void core_register_tasks(lua_State *L)
{
    static const luaL_Reg funcs[] = {
        { "spawn", l_spawn },
        { "wait", l_wait },
        { "sleep", l_sleep },
        { "wait_signal", l_wait_signal },
        { "now", l_now },
        { "time", l_time },
        { "getenv", l_getenv },
        { "isatty", l_isatty },
        { "fsync", l_fsync },
        { "truncate", l_truncate },
        { "read", l_read },
        { "pid", l_pid },
        { "term_width", l_term_width },
        { NULL, NULL },
    };

    if (luaL_newmetatable(L, TASK_MT)) {
        lua_pushcfunction(L, task_gc);
        lua_setfield(L, -2, "__gc");
        lua_pushstring(L, "aigate task");
        lua_setfield(L, -2, "__name");
    }
    lua_pop(L, 1);
    luaL_setfuncs(L, funcs, 0);
}

int tasks_init(void)
{
    /* Two priorities: signals 0, everything else the default, 1. */
    if (event_base_priority_init(g_base, 2) != 0)
        return -1;
    runq_event = event_new(g_base, -1, 0, runq_cb, NULL);
    sigint_event = evsignal_new(g_base, SIGINT, signal_cb, NULL);
    sigterm_event = evsignal_new(g_base, SIGTERM, signal_cb, NULL);
    if (runq_event == NULL || sigint_event == NULL || sigterm_event == NULL)
        return -1;
    event_priority_set(sigint_event, 0);
    event_priority_set(sigterm_event, 0);
    evsignal_add(sigint_event, NULL);
    evsignal_add(sigterm_event, NULL);
    return 0;
}

void tasks_shutdown(void)
{
    task_cancel_all();
    fsync_drain();
    live_tasks = NULL;
    signal_waiters = NULL;
    event_free(runq_event);
    event_free(sigint_event);
    event_free(sigterm_event);
    runq_event = NULL;
    runq_head = NULL;
    runq_tail = NULL;
}
