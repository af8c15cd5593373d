/*
 * main.c: start-up and shut-down of the aigate host.
 *
 * Sets up the event loop, libcurl and one Lua state that finds the aigate library (built into the
 * binary, or read from files: set_package_path), then runs the main task:
 * `require("aigate.cli").main(argv)`. The loop runs until that task ends (its result is the exit
 * status) or a signal stops the process; then every pending operation is cancelled and everything is
 * freed, so sanitizer builds see no leaks.
 */
#include <errno.h>
#include <limits.h>
#include <poll.h>
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
#include "luamem.h"

int luaopen_cjson(lua_State *L);
int luaopen_cjson_safe(lua_State *L);

struct event_base *g_base;
lua_State *g_L;

/* The Lua state's memory (luamem.h). */
static struct luamem lua_memory;

/* An error outside any protected call: Lua then aborts; say what it was first. */
static int panic_stderr(lua_State *L)
{
    const char *msg = lua_tostring(L, -1);

    fprintf(stderr, "aigate: unprotected Lua error: %s\n", msg ? msg : "(not a string)");
    return 0;
}

/* Lua's warn(): off until a script sends "@on" ("@off" turns it off again); a warning goes to stderr
 * as "Lua warning: " and its pieces on one line, as the lua interpreter writes it. */
static void warn_stderr(void *ud, const char *msg, int tocont)
{
    static int on, midway;

    (void)ud;
    if (!midway && !tocont && msg[0] == '@') {
        if (strcmp(msg, "@on") == 0)
            on = 1;
        else if (strcmp(msg, "@off") == 0)
            on = 0;
        return;
    }
    if (on) {
        if (!midway)
            fputs("Lua warning: ", stderr);
        fputs(msg, stderr);
        if (!tocont) {
            fputc('\n', stderr);
            fflush(stderr);
        }
    }
    midway = tocont;
}

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

/* The directory name of Debian's multiarch C library directory for this build's target
 * (/usr/lib/<triplet>/lua/5.4, where Debian's Lua C modules are), from the compiler's own macros;
 * -DAIGATE_MULTIARCH='"..."' names another. Without one, that directory is left out of package.cpath. */
#if defined(AIGATE_MULTIARCH)
#define MULTIARCH AIGATE_MULTIARCH
#elif defined(__linux__) && defined(__GLIBC__)
#if defined(__x86_64__) && defined(__ILP32__)
#define MULTIARCH "x86_64-linux-gnux32"
#elif defined(__x86_64__)
#define MULTIARCH "x86_64-linux-gnu"
#elif defined(__aarch64__)
#define MULTIARCH "aarch64-linux-gnu"
#elif defined(__i386__)
#define MULTIARCH "i386-linux-gnu"
#elif defined(__arm__) && defined(__ARM_PCS_VFP)
#define MULTIARCH "arm-linux-gnueabihf"
#elif defined(__arm__)
#define MULTIARCH "arm-linux-gnueabi"
#elif defined(__powerpc64__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define MULTIARCH "powerpc64le-linux-gnu"
#elif defined(__s390x__)
#define MULTIARCH "s390x-linux-gnu"
#elif defined(__riscv) && __riscv_xlen == 64
#define MULTIARCH "riscv64-linux-gnu"
#elif defined(__loongarch64)
#define MULTIARCH "loongarch64-linux-gnu"
#endif
#endif

#ifdef MULTIARCH
#define MULTIARCH_CPATH "/usr/lib/" MULTIARCH "/lua/5.4/?.so;"
#else
#define MULTIARCH_CPATH ""
#endif

/* The end of package.path and package.cpath: the system's Lua 5.4 directories, where Debian's Lua
 * packages put their modules, then (Lua files only) the current directory, in the stock lua5.4
 * interpreter's order. A C module is not loaded from wherever the process happens to run. */
#define SYSTEM_PATH                                                                                          \
    "/usr/local/share/lua/5.4/?.lua;/usr/local/share/lua/5.4/?/init.lua;/usr/share/lua/5.4/?.lua;"           \
    "/usr/share/lua/5.4/?/init.lua;./?.lua;./?/init.lua"
#define SYSTEM_CPATH "/usr/local/lib/lua/5.4/?.so;" MULTIARCH_CPATH "/usr/lib/lua/5.4/?.so"

/* Pushes the entries of a search path spec for package.path (for package.cpath when c), each with a
 * ';' after it. spec holds parts separated by ';': a template (with a '?') is taken as it is, into
 * cpath when it ends in ".so"; a directory DIR gives DIR/?.lua and DIR/?/init.lua, and DIR/?.so. */
static void push_entries(lua_State *L, const char *spec, int c)
{
    luaL_Buffer b;

    luaL_buffinit(L, &b);
    while (spec && *spec) {
        const char *end = strchr(spec, ';');
        size_t len = end ? (size_t)(end - spec) : strlen(spec);

        if (len > 0 && memchr(spec, '?', len)) {
            int so = len >= 3 && memcmp(spec + len - 3, ".so", 3) == 0;
            if (so == c) {
                luaL_addlstring(&b, spec, len);
                luaL_addchar(&b, ';');
            }
        } else if (len > 0) {
            while (len > 1 && spec[len - 1] == '/') /* "dir/" is "dir" */
                len--;
            luaL_addlstring(&b, spec, len);
            luaL_addstring(&b, c ? "/?.so;" : "/?.lua;");
            if (!c) {
                luaL_addlstring(&b, spec, len);
                luaL_addstring(&b, "/?/init.lua;");
            }
        }
        spec = end ? end + 1 : NULL;
    }
    luaL_pushresult(&b);
}

/* searchpath.expand(spec) -> the package.path and package.cpath entries of spec (see push_entries). */
static int searchpath_expand(lua_State *L)
{
    const char *spec = luaL_checkstring(L, 1);

    push_entries(L, spec, 0);
    push_entries(L, spec, 1);
    return 2;
}

/* The last searcher: its message ends the "module 'x' not found" error with where else a module may
 * be put (for any module but aigate's own, whose searcher says it has none of that name). */
static int search_hint(lua_State *L)
{
    const char *name = luaL_checkstring(L, 1);

    if (strcmp(name, "aigate") == 0 || strncmp(name, "aigate.", 7) == 0)
        return 0;
    lua_pushliteral(
        L, "hint: aigate looks for modules beside the config file, then in $AIGATE_LUA_PATH and the config's "
           "lua_path (directories, or templates with '?', separated by ';'; lua_path applies once the config "
           "has loaded), then in the system's Lua 5.4 directories");
    return 1;
}

static void add_hint_searcher(lua_State *L)
{
    lua_getglobal(L, "package");
    lua_getfield(L, -1, "searchers");
    lua_pushcfunction(L, search_hint);
    lua_rawseti(L, -2, (lua_Integer)lua_rawlen(L, -2) + 1);
    lua_pop(L, 2);
}

/* Where modules come from. aigate's own library: built into the binary (library.h), so that no Lua is
 * compiled at start, unless the files are to be read instead: those of $AIGATE_LIBRARY_PATH (a
 * directory, or a path template with '?'), or those of the source tree the binary sits in when one of
 * them changed since the build (an edit takes effect without `make`, as it did when the files were
 * always read). package.path: the library files' directory when there is one (in an unchanged tree,
 * for a module added since the build), so that no other directory has a say on aigate's modules;
 * then the user's ($AIGATE_LUA_PATH, and the config's directory and lua_path once a config is loaded:
 * aigate.config.modules); then SYSTEM_PATH. package.cpath: the user's, then SYSTEM_CPATH. The parts
 * are kept in package.loaded["aigate.searchpath"] for aigate.config.modules. */
static void set_package_path(lua_State *L)
{
    const char *env = getenv("AIGATE_LIBRARY_PATH");
    char dir[PATH_MAX];
    char library[PATH_MAX + 16];
    char cwd[PATH_MAX];
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
    add_hint_searcher(L);

    lua_createtable(L, 0, 7);
    if (dir[0] == '\0')
        lua_pushliteral(L, "");
    else if (strchr(dir, '?'))
        lua_pushfstring(L, "%s;", dir);
    else
        lua_pushfstring(L, "%s/?.lua;%s/?/init.lua;", dir, dir);
    lua_setfield(L, -2, "library");
    env = getenv("AIGATE_LUA_PATH");
    push_entries(L, env, 0);
    lua_setfield(L, -2, "user");
    push_entries(L, env, 1);
    lua_setfield(L, -2, "cuser");
    lua_pushliteral(L, SYSTEM_PATH);
    lua_setfield(L, -2, "system");
    lua_pushliteral(L, SYSTEM_CPATH);
    lua_setfield(L, -2, "csystem");
    if (getcwd(cwd, sizeof(cwd))) {
        lua_pushstring(L, cwd);
        lua_setfield(L, -2, "cwd");
    }
    lua_pushcfunction(L, searchpath_expand);
    lua_setfield(L, -2, "expand");

    lua_getglobal(L, "package");
    lua_getfield(L, -2, "library");
    lua_getfield(L, -3, "user");
    lua_pushliteral(L, SYSTEM_PATH);
    lua_concat(L, 3);
    lua_setfield(L, -2, "path");
    lua_getfield(L, -2, "cuser");
    lua_pushliteral(L, SYSTEM_CPATH);
    lua_concat(L, 2);
    lua_setfield(L, -2, "cpath");
    lua_pop(L, 1);
    luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
    lua_insert(L, -2);
    lua_setfield(L, -2, "aigate.searchpath");
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

/* Output that a failed write lost (a full disk, a file over its size limit, a reader gone) must not
 * end in success. stdio hides such a failure from whatever comes after it (a failed flush empties the
 * buffer, and the next flush succeeds), but keeps the stream's error flag: this looks at it last.
 * A reader that went away (`aigate ... | head`) ends the process quietly with 141, as SIGPIPE would
 * have; any other failure is told on stderr and fails a run that would have succeeded. A command
 * that failed already keeps its status and its own message. */
static int stdout_status(int code)
{
    struct pollfd p;
    int err;

    errno = 0;
    if (fflush(stdout) == 0 && !ferror(stdout))
        return code;
    err = errno;
    p.fd = STDOUT_FILENO;
    p.events = POLLOUT;
    p.revents = 0;
    if (err == EPIPE || (poll(&p, 1, 0) == 1 && (p.revents & POLLERR)))
        return code != 0 ? code : 128 + SIGPIPE;
    if (code != 0)
        return code;
    if (err != 0)
        fprintf(stderr,
                "aigate: writing standard output failed: %s; what was not written is lost: "
                "make room or choose another destination, then run again\n",
                strerror(err));
    else
        fputs("aigate: writing standard output failed (a full disk, or a file over its size limit?); "
              "what was not written is lost: make room or choose another destination, then run again\n",
              stderr);
    return 1;
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
    L = lua_newstate(luamem_alloc, &lua_memory);
    if (L == NULL) {
        fputs("aigate: cannot create the Lua state\n", stderr);
        return 1;
    }
    lua_atpanic(L, panic_stderr);
    lua_setwarnf(L, warn_stderr, NULL);
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

    code = stdout_status(code);
    tasks_shutdown();
    http_server_shutdown();
    lua_close(L);
    luamem_close(&lua_memory);
    g_L = NULL;
    http_client_shutdown();
    event_base_free(g_base);
    return code;
}
