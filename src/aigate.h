/*
 * aigate.h: what the C files of the host share.
 *
 * The host is one process, one Lua state and one libevent loop. task.c runs every unit of Lua work as
 * a coroutine (a task) and resumes it when the operation it waits on completes; http_client.c,
 * http_server.c and the timers in task.c are the operations. core.c assembles the `aigate.core`
 * module from the functions declared here; main.c owns start-up and shut-down.
 */
#ifndef AIGATE_H
#define AIGATE_H

#include <lua.h>

#define AIGATE_VERSION "0.1.0"

/*
 * Stack balance at the C/Lua boundaries: in debug builds (AIGATE_DEBUG, set by `make asan`) a block
 * between STACK_CHECK_BEGIN(L) and STACK_CHECK_END(L, n) must leave exactly n more values on L.
 */
#ifdef AIGATE_DEBUG
#include <assert.h>
#define STACK_CHECK_BEGIN(L)      int stack_check_top_ = lua_gettop(L)
#define STACK_CHECK_END(L, delta) assert(lua_gettop(L) == stack_check_top_ + (delta))
#else
#define STACK_CHECK_BEGIN(L)      ((void)0)
#define STACK_CHECK_END(L, delta) ((void)0)
#endif

struct event_base;
struct timeval;

/* The loop and the Lua state, set up by main.c before any task runs. */
extern struct event_base *g_base;
extern lua_State *g_L;

/*
 * A pending operation: what a yielded task waits on. Each operation embeds this as its first member
 * and knows how to cancel itself (free its resources without resuming the task); cancel is called
 * only at shut-down for tasks that are still waiting.
 */
struct pending {
    void (*cancel)(struct pending *p);
};

struct task;
typedef void (*task_done_fn)(struct task *t, int ok, void *ud);

/* Returns the task whose coroutine is L, or raises "attempt to yield outside an aigate task". */
struct task *task_check(lua_State *L);
/* The task whose coroutine is L, or NULL (the main thread, a plain coroutine, a callback). */
struct task *task_current(lua_State *L);
/* The coroutine of a task. */
lua_State *task_thread(struct task *t);
/*
 * Creates a task from the function and nargs arguments on top of L (popped) and queues it to run on
 * the next loop turn. Pushes the task's handle on L. done (may be NULL) is called when it ends, with
 * its results (ok) or its error message (!ok) on top of the task's coroutine.
 */
struct task *task_spawn(lua_State *L, int nargs, task_done_fn done, void *ud);
/* Marks t as waiting on p and yields the running coroutine L; use as `return task_yield(L, t, p);`. */
int task_yield(lua_State *L, struct task *t, struct pending *p);
/* Resumes a waiting task with the nargs values pushed on its coroutine. Only from loop callbacks. */
void task_resume(struct task *t, int nargs);
/* Cancels every pending operation of every task (shut-down). */
void task_cancel_all(void);
/* Prints msg on stderr as "aigate: <what>: <msg>". */
void task_report_error(const char *what, const char *msg);

/* Makes coroutine.resume and coroutine.close refuse a task's coroutine (after luaL_openlibs). */
void task_guard_coroutines(lua_State *L);
/* Converts the error value on top of L to a string with a traceback of co (replaces it); never
 * raises, whatever the error object's __tostring does. */
void push_traceback(lua_State *L, lua_State *co, int level);
/* Calls the function below nargs arguments on L in protected mode with a traceback handler. */
int pcall_traceback(lua_State *L, int nargs, int nresults);

/* Exit status requested by the main task or a signal; the loop stops when set. */
extern int g_exit_code;
void host_exit(int code);

/*
 * Busy Lua code (task.c, "the VM watchdog"). Every run of Lua code started by the loop is an entry;
 * C code that runs Lua on another thread (a coroutine, the main thread) marks it with vm_enter /
 * vm_leave, so that a watchdog can reach the code that is running: an entry that keeps the CPU for
 * long gets a count hook, which enforces the instruction budget and turns SIGINT/SIGTERM into an
 * error when the loop cannot see them.
 */
/* Marks L as running Lua code; returns what vm_leave needs. */
int vm_enter(lua_State *L);
void vm_leave(int depth);
/* The instruction budget of one entry, for code outside the aigate library (0: no budget). */
#define VM_DEFAULT_BUDGET 1000000000LL
/* Reads $AIGATE_MAX_INSTRUCTIONS; returns -1 when it is set but not a whole number >= 0. */
int vm_budget_from_env(void);
/* How the chunk names of the aigate library's code start ("=aigate/" built in, "@DIR/aigate/" read
 * from files): its code is not counted. */
void vm_set_library(const char *prefix);
/* The signal (SIGINT/SIGTERM) that interrupted busy Lua code, or 0. */
int task_interrupted(void);

/* Durations: anything longer than this many seconds (about 31 years) waits this long, so that
 * math.huge means "for ever" and no conversion overflows. */
#define AIGATE_MAX_SECONDS 1e9
/* seconds (>= 0, at most AIGATE_MAX_SECONDS) as a timeval, rounded up to the next microsecond. */
void seconds_to_timeval(double seconds, struct timeval *tv);

/* Module pieces, each in the file named for it. */
int core_sse_parser(lua_State *L);
int core_request(lua_State *L);
int core_listen(lua_State *L);
int core_engine(lua_State *L);
int core_json_quote(lua_State *L);
int core_json_fields(lua_State *L); /* chosen fields of a table as JSON (jsonfields.c) */
void core_register_engine(lua_State *L);
void core_register_scan(lua_State *L);  /* scan_ids, line_id, utf8_bad (src/scan.h) */
void core_register_tasks(lua_State *L); /* spawn, wait, sleep, now, time, ... into the table on top */
void core_register_sys(lua_State *L);   /* getenv, isatty, fsync, read, truncate, open_output, ... (sys.c) */
void core_register_log(lua_State *L);   /* log_open: the request log (logfile.c) */
void sys_shutdown(void);                /* waits for the fsyncs still running (called by tasks_shutdown) */
int tasks_init(void);
void tasks_shutdown(void);

int http_client_init(void);
void http_client_shutdown(void);
void http_server_shutdown(void);

int luaopen_aigate_core(lua_State *L);

#endif
