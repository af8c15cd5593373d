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
 * Also here: core.sleep (and core.wake, which ends one early), core.wait, core.wait_signal
 * (SIGINT/SIGTERM), the clocks, and the VM watchdog. The system calls (files, descriptors, the
 * environment) are in src/sys.c.
 */
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <unistd.h>

#include <event2/event.h>
#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>

#include "aigate.h"
#include "clock.h"

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

int g_exit_code = -1;

void host_exit(int code)
{
    if (g_exit_code < 0)
        g_exit_code = code;
    event_base_loopbreak(g_base);
}

/* redact_text(msg) -> the C string msg (a light userdata) through aigate.secrets.redact, the redaction
 * every sink of the process uses; as it is when that module was never loaded (aigate.cli loads it
 * before any other code runs, so then no code of the user's has run and no secret can be in it).
 * Called in protected mode only: it allocates. */
static int redact_text(lua_State *L)
{
    const char *msg = lua_touserdata(L, 1);

    lua_settop(L, 0);
    lua_pushstring(L, msg);
    lua_getfield(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
    if (lua_getfield(L, -1, "aigate.secrets") != LUA_TTABLE) {
        lua_settop(L, 1);
        return 1;
    }
    lua_getfield(L, -1, "redact");
    lua_pushvalue(L, 1);
    lua_call(L, 1, 1);
    return 1;
}

/* ---- the VM watchdog: the instruction budget and interrupts of busy Lua ------------------------ */

/*
 * Lua code that never yields stops the whole process: no other task runs, no reply is read, and the
 * libevent signal events cannot run either, so Ctrl-C and SIGTERM were lost. A count hook on every
 * thread would catch such code, but it costs a function call per Lua instruction (a fifth more
 * instructions per request on the Lua paths), whatever its count. So no hook is set while code
 * behaves: a timer on the main thread's CPU clock ticks every VM_TICK_NS of CPU, and a tick that
 * finds the same entry running as the tick before arms a count hook on the threads of that entry.
 * The hook then counts the entry's instructions against the budget and raises an error past it; a
 * SIGINT or SIGTERM that the loop has not seen for two ticks of the same entry makes it raise
 * "interrupted" at the next instruction and the process ends as the signal would have ended it.
 *
 * The budget counts only code outside the aigate library (config files, hooks, route functions,
 * scripts): the library's own long passes over a batch file are finite, and user code is what can
 * loop for ever. A hook call that finds library code running takes the hook off until the next
 * tick, so that such a pass does not pay for it (code that mixes both is counted in part, later
 * stopped). The first error is catchable (a route function's failure fails its request, as
 * any error of it does); code that catches it and goes on past the budget once more gets the error
 * at every instruction until the entry ends, so that no pcall loop can keep the process.
 *
 * Signal safety: the tick and signal handlers only read the volatile fields below and call
 * lua_sethook, which the Lua manual allows in a signal handler.
 */
#define VM_TICK_NS    50000000L /* 50 ms of the main thread's CPU */
#define VM_PROBE      1000      /* instructions to the first call of the hook, which looks whose code runs */
#define VM_COUNT      100000    /* instructions between two calls of the counting hook after */
#define VM_MAX_DEPTH  32        /* nested threads tracked in one entry */
#define VM_ENTRY_MASK 0x3fffffff

static struct {
    lua_State *volatile running[VM_MAX_DEPTH]; /* the threads of the entry, outermost first */
    volatile sig_atomic_t depth;               /* threads entered (only VM_MAX_DEPTH are kept) */
    volatile sig_atomic_t entry;               /* numbers the entries */
    volatile sig_atomic_t tick_entry;          /* the entry the last tick saw, or -1 */
    volatile sig_atomic_t armed_entry;         /* the entry the hook was armed for */
    volatile sig_atomic_t enabled;
    volatile sig_atomic_t budget_on;    /* budget > 0 */
    volatile sig_atomic_t signal;       /* SIGINT/SIGTERM caught, not yet seen by the loop */
    volatile sig_atomic_t signal_entry; /* the entry running while it waits */
    volatile sig_atomic_t signal_ticks; /* ticks of that entry since */
    volatile sig_atomic_t interrupt;    /* the signal that interrupts running code */
    int interrupted;                    /* the signal whose interrupt error was raised */
    long long budget;
    long long used; /* instructions of user code counted in this entry */
    int overruns;   /* budget errors raised in this entry */
    char library[4096];
    size_t library_len;
    timer_t timer;
    int has_timer;
    int pipe[2];
    struct event *signal_event;
    struct sigaction old_int, old_term, old_tick;
} vm = { .tick_entry = -1, .budget = VM_DEFAULT_BUDGET, .budget_on = 1, .pipe = { -1, -1 } };

static void vm_hook(lua_State *L, lua_Debug *ar);

int vm_enter(lua_State *L)
{
    int depth = vm.depth;

    if (depth == 0) {
        vm.entry = (vm.entry + 1) & VM_ENTRY_MASK;
        vm.used = 0;
        vm.overruns = 0;
    }
    if (depth < VM_MAX_DEPTH)
        vm.running[depth] = L;
    vm.depth = depth + 1; /* after the slot is set: a handler reads depth first */
    return depth;
}

void vm_leave(int depth)
{
    vm.depth = depth;
}

int task_interrupted(void)
{
    return vm.interrupted;
}

int vm_budget_from_env(void)
{
    const char *v = getenv("AIGATE_MAX_INSTRUCTIONS");
    char *end;
    long long n;

    if (v == NULL || *v == '\0')
        return 0;
    errno = 0;
    n = strtoll(v, &end, 10);
    if (errno != 0 || *end != '\0' || n < 0)
        return -1;
    vm.budget = n;
    vm.budget_on = n > 0;
    return 0;
}

void vm_set_library(const char *prefix)
{
    snprintf(vm.library, sizeof(vm.library), "%s", prefix);
    vm.library_len = strlen(vm.library);
}

/* Sets the hook on the threads of the running entry; count 1 for an interrupt. Signal-safe. */
static void vm_arm(int count)
{
    int n = vm.depth < VM_MAX_DEPTH ? vm.depth : VM_MAX_DEPTH;
    int i;

    vm.armed_entry = vm.entry;
    for (i = 0; i < n; i++) {
        lua_State *th = vm.running[i];
        if (lua_gethook(th) != vm_hook || (count == 1 && lua_gethookcount(th) != 1))
            lua_sethook(th, vm_hook, LUA_MASKCOUNT, count);
    }
}

static void vm_tick(int sig)
{
    int saved = errno;
    int entry = vm.entry;

    (void)sig;
    if (!vm.enabled || vm.depth == 0) {
        vm.tick_entry = -1;
        errno = saved;
        return;
    }
    if (vm.signal) {
        if (vm.signal_entry != entry) {
            vm.signal_entry = entry;
            vm.signal_ticks = 0;
        }
        if (++vm.signal_ticks >= 2) {
            vm.interrupt = vm.signal;
            vm_arm(1);
        }
    }
    if (entry == vm.tick_entry && vm.budget_on && !vm.interrupt)
        vm_arm(VM_PROBE);
    vm.tick_entry = entry;
    errno = saved;
}

/* SIGINT and SIGTERM: noted for the watchdog, and passed to the loop through a pipe (signal_cb). */
static void vm_signal_handler(int sig)
{
    int saved = errno;
    unsigned char b = (unsigned char)sig;

    if (!vm.signal) {
        vm.signal_entry = vm.depth > 0 ? vm.entry : -1;
        vm.signal_ticks = 0;
        vm.signal = sig;
    }
    if (write(vm.pipe[1], &b, 1) < 0) {
        /* full pipe: the loop has signals enough to read */
    }
    errno = saved;
}

/* Pushes "<where>: <what the function is>" for the function the hook interrupted. */
static void push_function_desc(lua_State *L, lua_Debug *ar)
{
    lua_getinfo(L, "Sln", ar);
    if (*ar->what == 'm')
        lua_pushfstring(L, "%s:%d: the main chunk of %s", ar->short_src, ar->currentline, ar->short_src);
    else if (ar->name)
        lua_pushfstring(L, "%s:%d: function '%s' at %s:%d", ar->short_src, ar->currentline, ar->name,
                        ar->short_src, ar->linedefined);
    else
        lua_pushfstring(L, "%s:%d: the function at %s:%d", ar->short_src, ar->currentline, ar->short_src,
                        ar->linedefined);
}

static void vm_hook(lua_State *L, lua_Debug *ar)
{
    if (!vm.enabled || vm.depth == 0 || vm.armed_entry != vm.entry) {
        lua_sethook(L, NULL, 0, 0); /* armed for an entry that has ended */
        return;
    }
    if (vm.interrupt) {
        lua_sethook(L, vm_hook, LUA_MASKCOUNT, 1); /* and at every instruction after, on this thread */
        vm.interrupted = vm.interrupt;
        host_exit(vm.interrupt == SIGINT ? 130 : 143);
        push_function_desc(L, ar);
        lua_pushfstring(L, " was running when %s came: interrupted",
                        vm.interrupt == SIGINT ? "SIGINT" : "SIGTERM");
        lua_concat(L, 2);
        lua_error(L);
    }
    if (vm.overruns > 1)
        goto overrun;
    if (!vm.budget_on) {
        lua_sethook(L, NULL, 0, 0);
        return;
    }
    lua_getinfo(L, "S", ar);
    if (vm.library_len > 0 && strncmp(ar->source, vm.library, vm.library_len) == 0) {
        lua_sethook(L, NULL, 0, 0); /* the library's own long pass: no hook (the next tick looks again) */
        return;
    }
    vm.used += lua_gethookcount(L);
    if (lua_gethookcount(L) != VM_COUNT)
        lua_sethook(L, vm_hook, LUA_MASKCOUNT, VM_COUNT);
    if (vm.used < vm.budget)
        return;
    vm.used = 0;
    if (++vm.overruns > 1)
        vm_arm(1); /* the second overrun of the entry: no Lua code of it runs on */
overrun:
    push_function_desc(L, ar);
    lua_pushfstring(L,
                    " ran more than %I instructions without yielding (no other task runs meanwhile): "
                    "stopped. A long computation can call aigate.sleep(0) now and then; "
                    "AIGATE_MAX_INSTRUCTIONS sets the limit (0: none)",
                    (lua_Integer)vm.budget);
    lua_concat(L, 2);
    lua_error(L);
}

void task_report_error(const char *what, const char *msg)
{
    /* Task errors hold whatever the failing code put in its message (a token read from the
     * environment too), so they go out redacted like every other text. The call is made on the main
     * thread, as push_traceback does: this may run in a finalizer of any coroutine, or at shut-down.
     * When redaction itself fails, the message is withheld rather than printed as it is. */
    lua_State *L = g_L;
    int top;

    if (msg == NULL)
        msg = "(no message)";
    if (L == NULL || !lua_checkstack(L, 2)) {
        fprintf(stderr, "aigate: %s: (the message cannot be redacted, so it is not shown)\n", what);
        fflush(stderr);
        return;
    }
    top = lua_gettop(L);
    lua_pushcfunction(L, redact_text);
    lua_pushlightuserdata(L, (void *)msg);
    if (lua_pcall(L, 1, 1, 0) == LUA_OK && lua_type(L, -1) == LUA_TSTRING)
        msg = lua_tostring(L, -1);
    else
        msg = "(the message could not be redacted, so it is not shown)";
    fprintf(stderr, "aigate: %s: %s\n", what, msg);
    fflush(stderr);
    lua_settop(L, top);
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
    int depth, rc;

    lua_xmove(L, M, 1);
    lua_pushcfunction(M, error_text);
    lua_insert(M, -2);
    depth = vm_enter(M); /* a __tostring runs there */
    rc = lua_pcall(M, 1, 1, 0);
    vm_leave(depth);
    if (rc != LUA_OK || lua_type(M, -1) != LUA_TSTRING) {
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
    int rc, depth;

    lua_pushcfunction(L, traceback_handler);
    lua_insert(L, base);
    depth = vm_enter(L);
    rc = lua_pcall(L, nargs, nresults, base);
    vm_leave(depth);
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

/*
 * coroutine.resume, coroutine.wrap and coroutine.close of the host. They refuse a task's coroutine:
 * only the event loop resumes a task, with the result of what it waits for; resumed from Lua it
 * would run on while the loop still holds its wait, and the loop's resume would then corrupt it.
 * And they tell the VM watchdog which thread runs (vm_enter), so that a loop inside a plain
 * coroutine can be stopped too. resume and wrap behave as the standard ones otherwise.
 */
static int refuse_task_thread(lua_State *L)
{
    return luaL_error(L, "cannot resume or close the coroutine of an aigate task: the event loop runs it "
                         "(wait for the task with aigate.wait)");
}

/* Resumes co with the narg values on top of L: returns the number of values it yielded or returned,
 * moved to L, or -1 with the error on top of L. */
static int resume_coroutine(lua_State *L, lua_State *co, int narg)
{
    int nres = 0;
    int status, depth;

    if (!lua_checkstack(co, narg)) {
        lua_pushliteral(L, "too many arguments to resume");
        return -1;
    }
    lua_xmove(L, co, narg);
    depth = vm_enter(co);
    status = lua_resume(co, L, narg, &nres);
    vm_leave(depth);
    if (status != LUA_OK && status != LUA_YIELD) {
        lua_xmove(co, L, 1);
        return -1;
    }
    if (!lua_checkstack(L, nres + 1)) {
        lua_pop(co, nres);
        lua_pushliteral(L, "too many results to resume");
        return -1;
    }
    lua_xmove(co, L, nres);
    return nres;
}

static int co_resume(lua_State *L)
{
    lua_State *co = lua_tothread(L, 1);
    int n;

    luaL_argexpected(L, co != NULL, 1, "coroutine");
    if (is_task_thread(L, 1))
        return refuse_task_thread(L);
    n = resume_coroutine(L, co, lua_gettop(L) - 1);
    if (n < 0) {
        lua_pushboolean(L, 0);
        lua_insert(L, -2);
        return 2;
    }
    lua_pushboolean(L, 1);
    lua_insert(L, -(n + 1));
    return n + 1;
}

/* The function coroutine.wrap returns: upvalue 1 is its coroutine. An error closes the coroutine
 * and is raised again, with the caller's position before a string message. */
static int co_wrapped(lua_State *L)
{
    lua_State *co = lua_tothread(L, lua_upvalueindex(1));
    int n = resume_coroutine(L, co, lua_gettop(L));

    if (n < 0) {
        int status = lua_status(co);
        if (status != LUA_OK && status != LUA_YIELD) {
            int depth = vm_enter(co); /* its to-be-closed variables run */
            status = lua_resetthread(co);
            vm_leave(depth);
            lua_xmove(co, L, 1);
        }
        if (status != LUA_ERRMEM && lua_type(L, -1) == LUA_TSTRING) {
            luaL_where(L, 1);
            lua_insert(L, -2);
            lua_concat(L, 2);
        }
        return lua_error(L);
    }
    return n;
}

static int co_wrap(lua_State *L)
{
    lua_State *co;

    luaL_checktype(L, 1, LUA_TFUNCTION);
    co = lua_newthread(L);
    lua_pushvalue(L, 1);
    lua_xmove(L, co, 1);
    lua_pushcclosure(L, co_wrapped, 1);
    return 1;
}

/* coroutine.close: the standard one (upvalue 1), on a thread the watchdog knows. */
static int co_close(lua_State *L)
{
    int n = lua_gettop(L);
    lua_State *co = lua_tothread(L, 1);
    int depth, rc;

    if (is_task_thread(L, 1))
        return refuse_task_thread(L);
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_insert(L, 1);
    depth = co ? vm_enter(co) : vm.depth;
    rc = lua_pcall(L, n, LUA_MULTRET, 0);
    vm_leave(depth);
    if (rc != LUA_OK)
        return lua_error(L);
    return lua_gettop(L);
}

void task_guard_coroutines(lua_State *L)
{
    if (lua_getglobal(L, "coroutine") != LUA_TTABLE) {
        lua_pop(L, 1);
        return;
    }
    lua_pushcfunction(L, co_resume);
    lua_setfield(L, -2, "resume");
    lua_pushcfunction(L, co_wrap);
    lua_setfield(L, -2, "wrap");
    lua_getfield(L, -1, "close");
    lua_pushcclosure(L, co_close, 1);
    lua_setfield(L, -2, "close");
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

/* Puts the tasks of list back at the head of the run queue, in their order. */
static void runq_requeue(struct task *list)
{
    struct task *last = list;

    while (last->runq_next)
        last = last->runq_next;
    last->runq_next = runq_head;
    if (runq_tail == NULL)
        runq_tail = last;
    runq_head = list;
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
        /* Shutting down: put the rest back so that shut-down sees and frees them. A signal came:
         * the loop hands it to its waiters first (signal_cb), and the rest runs after. */
        if (batch && (g_exit_code >= 0 || vm.signal)) {
            runq_requeue(batch);
            return;
        }
    }
}

/* ---- task life cycle ------------------------------------------------------------------------- */

struct task *task_current(lua_State *L)
{
    struct task *t = *(struct task **)lua_getextraspace(L);

    /* a coroutine made inside a task has its extra space too: only the task's own is one */
    return t != NULL && t->co == L ? t : NULL;
}

struct task *task_check(lua_State *L)
{
    struct task *t = task_current(L);

    if (t == NULL)
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
    int depth;

    t->pending = NULL;
    t->state = TASK_RUNNING;
    depth = vm_enter(t->co);
    rc = lua_resume(t->co, NULL, nargs, &nres);
    vm_leave(depth);
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
    /* Interrupted: the process ends as the signal ends it, and the task's error is not reported. */
    if (vm.interrupted)
        t->waited = 1;
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
    double left = op->deadline - monotonic_seconds();

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
    op->deadline = monotonic_seconds() + seconds;
    sleep_arm(op, seconds);
    lua_settop(L, 0);
    return task_yield(L, t, &op->pending);
}

/* core.self() -> the running task's handle, or nil outside a task (a plain coroutine, a callback). */
static int l_self(lua_State *L)
{
    struct task *t = task_current(L);

    if (t == NULL || t->anchor == LUA_NOREF) {
        lua_pushnil(L);
        return 1;
    }
    lua_rawgeti(L, LUA_REGISTRYINDEX, t->anchor);
    return 1;
}

/* core.wake(handle) -> true when the task was in core.sleep: its sleep ends at once and returns true
 * (on the next loop turn, in the order of the wakes); false when it was doing anything else. */
static int l_wake(lua_State *L)
{
    struct task *t = luaL_checkudata(L, 1, TASK_MT);
    struct pending *p = t->pending;

    if (t->state != TASK_WAITING || p == NULL || p->cancel != sleep_cancel) {
        lua_pushboolean(L, 0);
        return 1;
    }
    t->pending = NULL;
    sleep_cancel(p);
    lua_pushboolean(t->co, 1);
    runq_push(t, 1);
    lua_pushboolean(L, 1);
    return 1;
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
static void signal_cb(int sig)
{
    const char *name = sig == SIGINT ? "INT" : "TERM";
    struct task *list = signal_waiters;
    struct task *w;

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

/* The loop's side of vm_signal_handler: each byte of the pipe is a signal caught. */
static void signal_pipe_cb(evutil_socket_t fd, short what, void *arg)
{
    unsigned char sigs[16];
    ssize_t n, i;

    (void)what;
    (void)arg;
    while ((n = read(fd, sigs, sizeof(sigs))) > 0) {
        /* Seen: the watchdog leaves running code alone (an interrupt decided meanwhile, whose code
         * ended before it could raise it, is void). */
        vm.signal = 0;
        if (!vm.interrupted)
            vm.interrupt = 0;
        for (i = 0; i < n; i++)
            signal_cb(sigs[i]);
    }
}

/*
 * The signals that ask a running program for something (reload, reopen) rather than to stop:
 * libevent's signal events, installed when first waited for. A signal that comes while no task
 * waits is kept (once), and the next wait returns it at once, so none is lost between two waits.
 */
struct soft_signal {
    int sig;
    const char *name;
    struct event *ev;
    int pending;
    struct task *waiters;
};

static struct soft_signal soft_signals[] = {
    { SIGHUP, "HUP", NULL, 0, NULL },
    { SIGUSR1, "USR1", NULL, 0, NULL },
    { SIGUSR2, "USR2", NULL, 0, NULL },
};
#define NSOFT (sizeof(soft_signals) / sizeof(soft_signals[0]))

struct soft_op {
    struct pending pending;
    struct task *task;
    struct soft_signal *s;
};

static void soft_cancel(struct pending *p)
{
    struct soft_op *op = (struct soft_op *)p;
    struct task **pp = &op->s->waiters;

    while (*pp && *pp != op->task)
        pp = &(*pp)->next_waiter;
    if (*pp)
        *pp = op->task->next_waiter;
    free(op);
}

static void soft_cb(evutil_socket_t sig, short what, void *arg)
{
    struct soft_signal *s = arg;
    struct task *list = s->waiters;
    struct task *w;

    (void)sig;
    (void)what;
    if (list == NULL || g_exit_code >= 0) {
        s->pending = 1;
        return;
    }
    s->waiters = NULL; /* a waiter may wait again while the others are resumed */
    while ((w = list) != NULL) {
        list = w->next_waiter;
        w->next_waiter = NULL;
        free(w->pending);
        w->pending = NULL;
        lua_pushstring(w->co, s->name);
        task_resume(w, 1);
    }
}

/* core.wait_signal(name) for a soft signal. */
static int wait_soft_signal(lua_State *L, struct task *t, const char *name)
{
    struct soft_signal *s = NULL;
    struct soft_op *op;
    size_t i;

    for (i = 0; i < NSOFT; i++)
        if (strcmp(soft_signals[i].name, name) == 0)
            s = &soft_signals[i];
    if (s == NULL)
        return luaL_error(L,
                          "wait_signal: unknown signal '%s' (expected HUP, USR1 or USR2; no name waits "
                          "for INT or TERM)",
                          name);
    if (s->ev == NULL) {
        s->ev = evsignal_new(g_base, s->sig, soft_cb, s);
        if (s->ev == NULL || event_add(s->ev, NULL) != 0)
            return luaL_error(L, "wait_signal: cannot watch SIG%s", name);
    }
    if (s->pending) {
        s->pending = 0;
        lua_pushstring(L, s->name);
        return 1;
    }
    op = malloc(sizeof(*op));
    if (op == NULL)
        return luaL_error(L, "out of memory");
    op->pending.cancel = soft_cancel;
    op->task = t;
    op->s = s;
    t->next_waiter = s->waiters;
    s->waiters = t;
    lua_settop(L, 0);
    return task_yield(L, t, &op->pending);
}

static void soft_signals_free(void)
{
    size_t i;

    for (i = 0; i < NSOFT; i++) {
        if (soft_signals[i].ev)
            event_free(soft_signals[i].ev);
        soft_signals[i].ev = NULL;
    }
}

static int l_wait_signal(lua_State *L)
{
    struct task *t = task_check(L);
    struct signal_op *op;

    if (!lua_isnoneornil(L, 1))
        return wait_soft_signal(L, t, luaL_checkstring(L, 1));
    op = malloc(sizeof(*op));
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
    lua_pushnumber(L, monotonic_seconds());
    return 1;
}

static int l_time(lua_State *L)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    lua_pushnumber(L, (double)ts.tv_sec + (double)ts.tv_nsec / 1e9);
    return 1;
}

/* core.max_instructions([n]) -> the budget before (0: none); sets it to n when given. */
static int l_max_instructions(lua_State *L)
{
    long long before = vm.budget;

    if (!lua_isnoneornil(L, 1)) {
        lua_Integer n = luaL_checkinteger(L, 1);
        luaL_argcheck(L, n >= 0, 1, "must be >= 0 (0: no budget)");
        vm.budget = n;
        vm.budget_on = n > 0;
    }
    lua_pushinteger(L, (lua_Integer)before);
    return 1;
}

void core_register_tasks(lua_State *L)
{
    static const luaL_Reg funcs[] = {
        { "spawn", l_spawn },
        { "wait", l_wait },
        { "sleep", l_sleep },
        { "self", l_self },
        { "wake", l_wake }, /* ends a task's core.sleep early: wait queues without polling */
        { "wait_signal", l_wait_signal },
        { "now", l_now },
        { "time", l_time },
        { "max_instructions", l_max_instructions },
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

/*
 * SIGINT and SIGTERM get a handler of ours rather than libevent's signal events, whose handler only
 * wakes the loop: the watchdog must know of a signal while Lua code keeps the loop from running.
 * The handler writes the signal to a pipe that the loop reads (priority 0). SA_RESTART as libevent.
 */
static int vm_signals_init(void)
{
    struct sigaction sa;
    int i;

    if (pipe(vm.pipe) != 0)
        return -1;
    for (i = 0; i < 2; i++) {
        fcntl(vm.pipe[i], F_SETFL, fcntl(vm.pipe[i], F_GETFL) | O_NONBLOCK);
        fcntl(vm.pipe[i], F_SETFD, FD_CLOEXEC);
    }
    vm.signal_event = event_new(g_base, vm.pipe[0], EV_READ | EV_PERSIST, signal_pipe_cb, NULL);
    if (vm.signal_event == NULL)
        return -1;
    event_priority_set(vm.signal_event, 0);
    event_add(vm.signal_event, NULL);
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = vm_signal_handler;
    sa.sa_flags = SA_RESTART;
    sigemptyset(&sa.sa_mask);
    sigaddset(&sa.sa_mask, SIGINT);
    sigaddset(&sa.sa_mask, SIGTERM);
    sigaddset(&sa.sa_mask, SIGVTALRM);
    if (sigaction(SIGINT, &sa, &vm.old_int) != 0 || sigaction(SIGTERM, &sa, &vm.old_term) != 0)
        return -1;
    return 0;
}

/* The tick: SIGVTALRM to the main thread after each VM_TICK_NS of its CPU time (an idle process
 * gets none). Without such a timer the process runs as before, with no watchdog. */
static void vm_timer_init(void)
{
    struct sigaction sa;
    struct sigevent sev;
    struct itimerspec its;

    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = vm_tick;
    sa.sa_flags = SA_RESTART;
    sigemptyset(&sa.sa_mask);
    sigaddset(&sa.sa_mask, SIGINT);
    sigaddset(&sa.sa_mask, SIGTERM);
    if (sigaction(SIGVTALRM, &sa, &vm.old_tick) != 0)
        return;
    memset(&sev, 0, sizeof(sev));
    sev.sigev_notify = SIGEV_THREAD_ID;
    sev.sigev_signo = SIGVTALRM;
    sev._sigev_un._tid = (pid_t)syscall(SYS_gettid); /* glibc's name for sigev_notify_thread_id */
    if (timer_create(CLOCK_THREAD_CPUTIME_ID, &sev, &vm.timer) != 0)
        return;
    its.it_value.tv_sec = 0;
    its.it_value.tv_nsec = VM_TICK_NS;
    its.it_interval = its.it_value;
    if (timer_settime(vm.timer, 0, &its, NULL) != 0) {
        timer_delete(vm.timer);
        return;
    }
    vm.has_timer = 1;
}

/* After the last fsync: a signal until then is ignored, as while the loop ran. */
static void vm_shutdown(void)
{
    vm.enabled = 0;
    if (vm.has_timer)
        timer_delete(vm.timer);
    vm.has_timer = 0;
    sigaction(SIGVTALRM, &vm.old_tick, NULL);
    sigaction(SIGINT, &vm.old_int, NULL);
    sigaction(SIGTERM, &vm.old_term, NULL);
    if (vm.signal_event)
        event_free(vm.signal_event);
    vm.signal_event = NULL;
    soft_signals_free();
    if (vm.pipe[0] >= 0) {
        close(vm.pipe[0]);
        close(vm.pipe[1]);
    }
    vm.pipe[0] = vm.pipe[1] = -1;
}

int tasks_init(void)
{
    /* Two priorities: signals 0, everything else the default, 1. */
    if (event_base_priority_init(g_base, 2) != 0)
        return -1;
    runq_event = event_new(g_base, -1, 0, runq_cb, NULL);
    if (runq_event == NULL || vm_signals_init() != 0)
        return -1;
    vm_timer_init();
    vm.enabled = 1;
    return 0;
}

void tasks_shutdown(void)
{
    vm.enabled = 0; /* a hook still set takes itself off */
    task_cancel_all();
    sys_shutdown(); /* fsyncs still running: waited for while the signal handlers are ours */
    vm_shutdown();
    live_tasks = NULL;
    signal_waiters = NULL;
    event_free(runq_event);
    runq_event = NULL;
    runq_head = NULL;
    runq_tail = NULL;
}
