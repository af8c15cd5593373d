/*
 * core.c: assembles the `aigate.core` Lua module from the primitives of task.c, http_client.c,
 * sys.c, http_server.c, engine.c, scan.c, sse.c and logfile.c. The module's contract is documented in
 * src/CORE_API.md.
 */
#include <lauxlib.h>
#include <lua.h>

#include "aigate.h"

int luaopen_aigate_core(lua_State *L)
{
    static const luaL_Reg funcs[] = {
        { "request", core_request },
        { "listen", core_listen },
        { "sse_parser", core_sse_parser },
        { "engine", core_engine },
        { "json_quote", core_json_quote },
        { "json_fields", core_json_fields },
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
