/*
 * library.c: the searcher of the Lua library built into the binary, and the check that a source
 * tree's files are those it was built from (library.h).
 */
#include <limits.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

#include <lauxlib.h>
#include <lua.h>

#include "library.h"

static const struct library_module *find_module(const char *name)
{
    int i;

    for (i = 0; i < library_module_count; i++)
        if (strcmp(library_modules[i].name, name) == 0)
            return &library_modules[i];
    return NULL;
}

int library_matches(const char *lua_dir)
{
    char path[PATH_MAX];
    struct stat st;
    int i;

    for (i = 0; i < library_module_count; i++) {
        const struct library_module *m = &library_modules[i];
        int n = snprintf(path, sizeof(path), "%s/%s", lua_dir, m->chunkname + 1);
        if (n < 0 || (size_t)n >= sizeof(path) || stat(path, &st) != 0)
            return 0;
        if ((long long)st.st_size != m->size || (long long)st.st_mtim.tv_sec != m->mtime_sec ||
            (long)st.st_mtim.tv_nsec != m->mtime_nsec)
            return 0;
    }
    return 1;
}

/* searcher(name) -> loader, "built-in:<file>"; or a message for an aigate module it does not have;
 * or nothing for any other name (the file searchers' messages say where they looked). */
static int search_library(lua_State *L)
{
    const char *name = luaL_checkstring(L, 1);
    const struct library_module *m = find_module(name);

    if (m == NULL) {
        if (strcmp(name, "aigate") == 0 || strncmp(name, "aigate.", 7) == 0) {
            lua_pushfstring(L, "no module '%s' built into aigate", name);
            return 1;
        }
        return 0;
    }
    if (luaL_loadbufferx(L, (const char *)m->code, m->len, m->chunkname, "b") != LUA_OK)
        return luaL_error(L, "error loading module '%s' built into aigate:\n\t%s", name, lua_tostring(L, -1));
    lua_pushfstring(L, "built-in:%s", m->chunkname + 1);
    return 2;
}

void library_add_searcher(lua_State *L)
{
    lua_Integer i, n;

    lua_getglobal(L, "package");
    lua_getfield(L, -1, "searchers");
    n = (lua_Integer)lua_rawlen(L, -1);
    for (i = n; i >= 2; i--) { /* make room at 2 */
        lua_rawgeti(L, -1, i);
        lua_rawseti(L, -2, i + 1);
    }
    lua_pushcfunction(L, search_library);
    lua_rawseti(L, -2, 2);
    lua_pop(L, 2);
}
