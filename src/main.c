/*
 * main.c: start-up and shut-down of the aigate host.
 *
 * Sets up the event loop, libcurl and one Lua state that finds the aigate library (built into the
 * binary, or read from files: set_package_path), then runs the main task:
 * `require("aigate.cli").main(argv)`. The loop runs until that task ends (its result is the exit
 * status) or a signal stops the process; then every pending operation is cancelled and everything is
 * freed, so sanitizer builds see no leaks.
 */
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <event2/event.h>
#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>

#include "aigate.h"
#include "library.h"

int luaopen_cjson(lua_State *L);
int luaopen_cjson_safe(lua_State *L);

struct event_base *g_base;
lua_State *g_L;

static int file_exists(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0;
}

/* Whether the binary sits in a source tree: lua/aigate/init.lua next to it or in its parent directory
 * (the build's own binaries); *out is then that lua/ directory. */
static int find_source_tree(char *out, size_t size)
{
    char exe[PATH_MAX - 64];
    char probe[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
    char *slash;

    if (n <= 0)
        return 0;
    exe[n] = '\0';
    slash = strrchr(exe, '/');
    if (slash)
        *slash = '\0';
    snprintf(probe, sizeof(probe), "%s/lua/aigate/init.lua", exe);
    if (file_exists(probe)) {
        snprintf(out, size, "%s/lua", exe);
        return 1;
    }
    snprintf(probe, sizeof(probe), "%s/../lua/aigate/init.lua", exe);
    if (file_exists(probe)) {
        snprintf(out, size, "%s/../lua", exe);
        return 1;
    }
    return 0;
}

/* Where the aigate library comes from. Built into the binary (library.h), so that no Lua is compiled
 * at start, unless the files are to be read instead: those of $AIGATE_LUA_PATH (a directory, or a
 * path template with '?'), or those of the source tree the binary sits in when one of them changed
 * since the build (an edit takes effect without `make`, as it did when the files were always read).
 * package.path: the files' directory when there is one (in an unchanged tree, for a module added since
 * the build), then the script's own directory. */
static void set_package_path(lua_State *L)
{
    const char *env = getenv("AIGATE_LUA_PATH");
    char dir[PATH_MAX];
    char library[PATH_MAX + 16];
    int files;

    dir[0] = '\0';
    if (env && *env) {
        snprintf(dir, sizeof(dir), "%s", env);
        files = 1;
    } else {
        files = find_source_tree(dir, sizeof(dir)) && !library_matches(dir);
    }
    if (files) {
        const char *q = strchr(dir, '?');
        /* Chunk names of files are "@" and the file name: a template's '?' made "aigate/<module>". */
        if (q)
            snprintf(library, sizeof(library), "@%.*saigate/", (int)(q - dir), dir);
        else
            snprintf(library, sizeof(library), "@%s/aigate/", dir);
        vm_set_library(library);
    } else {
        library_add_searcher(L);
        vm_set_library(LIBRARY_CHUNK_PREFIX);
    }
    lua_getglobal(L, "package");
    if (dir[0] == '\0')
        lua_pushliteral(L, "./?.lua;./?/init.lua");
    else if (strchr(dir, '?'))
        lua_pushfstring(L, "%s;./?.lua;./?/init.lua", dir);
    else
        lua_pushfstring(L, "%s/?.lua;%s/?/init.lua;./?.lua;./?/init.lua", dir, dir);
    lua_setfield(L, -2, "path");
    lua_pop(L, 1);
}

/* The event loop. Interest changes made in one turn of the loop reach the kernel as one epoll_ctl
 * (libevent's changelist): a served request re-arms its client's socket for reading and writing in
 * the same callback, and each epoll_ctl is a system call. */
static struct event_base *new_base(void)
{
    struct event_config *cfg = event_config_new();
    struct event_base *base;

    if (cfg == NULL)
        return NULL;
    event_config_set_flag(cfg, EVENT_BASE_FLAG_EPOLL_USE_CHANGELIST);
    base = event_base_new_with_config(cfg);
    event_config_free(cfg);
    return base;
}

static void preload(lua_State *L, const char *name, lua_CFunction fn)
{
    luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_PRELOAD_TABLE);
    lua_pushcfunction(L, fn);
    lua_setfield(L, -2, name);
    lua_pop(L, 1);
}

static void main_done(struct task *t, int ok, void *ud)
{
    lua_State *co = task_thread(t);
    int code = 0;

    (void)ud;
    if (!ok) {
        if (!task_interrupted()) /* else it ends as the signal ends it: silently, with 130 or 143 */
            task_report_error("error", lua_tostring(co, -1));
        host_exit(1);
        return;
    }
    if (lua_gettop(co) >= 1) {
        if (lua_isinteger(co, 1))
            code = (int)lua_tointeger(co, 1);
        else if (lua_isboolean(co, 1))
            code = lua_toboolean(co, 1) ? 0 : 1;
    }
    host_exit(code);
}

static const char main_chunk[] = "local argv = ...\n"
                                 "return require('aigate.cli').main(argv)\n";

/* The process holds the API token in memory: no core file may be written, and no other process of
 * the user may read its memory (PR_SET_DUMPABLE also makes /proc/<pid> of it root's). The sanitizers
 * cope: LeakSanitizer makes the process dumpable while it stops the world to look for leaks. */
static void refuse_core_dumps(void)
{
    struct rlimit rl;

    rl.rlim_cur = 0;
    rl.rlim_max = 0;
    setrlimit(RLIMIT_CORE, &rl);
    prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
}

static void raise_fd_limit(void)
{
    struct rlimit rl;

    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

int main(int argc, char **argv)
{
    lua_State *L;
    int i;
    int code;

    refuse_core_dumps();
    signal(SIGPIPE, SIG_IGN);
    raise_fd_limit();
    if (vm_budget_from_env() != 0) {
        fprintf(stderr,
                "aigate: AIGATE_MAX_INSTRUCTIONS must be a whole number >= 0 (0: no budget), not '%s'\n",
                getenv("AIGATE_MAX_INSTRUCTIONS"));
        return 2;
    }
    g_base = new_base();
    if (g_base == NULL || tasks_init() != 0 || http_client_init() != 0) {
        fputs("aigate: cannot initialise the event loop\n", stderr);
        return 1;
    }
    L = luaL_newstate();
    if (L == NULL) {
        fputs("aigate: cannot create the Lua state\n", stderr);
        return 1;
    }
    g_L = L;
    /* New threads copy the main thread's extra space: NULL there means "not a task". */
    *(void **)lua_getextraspace(L) = NULL;
    luaL_openlibs(L);
    task_guard_coroutines(L);
    preload(L, "cjson", luaopen_cjson);
    preload(L, "cjson.safe", luaopen_cjson_safe);
    preload(L, "aigate.core", luaopen_aigate_core);
    set_package_path(L);

    if (luaL_loadbuffer(L, main_chunk, sizeof(main_chunk) - 1, "=main") != LUA_OK) {
        fprintf(stderr, "aigate: %s\n", lua_tostring(L, -1));
        return 1;
    }
    lua_createtable(L, argc, 0);
    for (i = 1; i < argc; i++) {
        lua_pushstring(L, argv[i]);
        lua_rawseti(L, -2, i);
    }
    task_spawn(L, 1, main_done, NULL);
    lua_pop(L, 1);

    event_base_dispatch(g_base);
    code = g_exit_code >= 0 ? g_exit_code : 1;

    fflush(stdout);
    tasks_shutdown();
    http_server_shutdown();
    lua_close(L);
    g_L = NULL;
    http_client_shutdown();
    event_base_free(g_base);
    return code;
}
