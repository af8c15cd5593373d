/*
 * core.c: assembles the `aigate.core` Lua module from the primitives of task.c, http_client.c,
 * sys.c, http_server.c, engine.c, scan.c, sse.c and logfile.c. The module's contract is documented in
 * src/CORE_API.md.
 */
#include <lauxlib.h>
#include <lua.h>

#include "aigate.h"

/*
 * core.copy(t) -> a shallow copy of t made with raw reads and writes, sized once: a table filled by
 * a pairs loop is rehashed each time its count passes a power of two, and the policy copies the
 * options of every request this way (aigate.util.copy, which keeps the loop for a table with a
 * metatable).
 */
static int core_copy(lua_State *L)
{
    int narr = 0, nrec = 0;
    lua_Integer n;

    luaL_checktype(L, 1, LUA_TTABLE);
    lua_settop(L, 1);
    n = (lua_Integer)lua_rawlen(L, 1);
    lua_pushnil(L);
    while (lua_next(L, 1)) {
        if (lua_isinteger(L, -2) && lua_tointeger(L, -2) >= 1 && lua_tointeger(L, -2) <= n)
            narr++;
        else
            nrec++;
        lua_pop(L, 1);
    }
    lua_createtable(L, narr, nrec);
    lua_pushnil(L);
    while (lua_next(L, 1)) {
        lua_pushvalue(L, -2);
        lua_insert(L, -2);
        lua_rawset(L, 2);
    }
    return 1;
}

int luaopen_aigate_core(lua_State *L)
{
    static const luaL_Reg funcs[] = {
        { "request", core_request },
        { "listen", core_listen },
        { "sse_parser", core_sse_parser },
        { "engine", core_engine },
        { "json_quote", core_json_quote },
        { "json_fields", core_json_fields },
        { "copy", core_copy },
        { NULL, NULL },
    };

    core_register_engine(L);
    luaL_newlib(L, funcs);
    core_register_tasks(L);
    core_register_sys(L);
    core_register_scan(L);
    core_register_log(L);
    lua_pushstring(L, AIGATE_VERSION);
    lua_setfield(L, -2, "version");
    return 1;
}
