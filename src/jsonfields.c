/*
 * jsonfields.c: core.json_fields(t, spec), the JSON text of chosen fields of a table in a fixed
 * order, for lines written on a hot path (the request log writes one per request; in Lua this was
 * 14 us of a serve request, here about 1).
 *
 * spec is an array; each entry is a field name (its value written as a scalar) or a table {name,
 * spec} (a nested object of those fields) or {name, spec, array = true} (an array of such objects).
 * Fields that are nil are left out. Strings are written by js_quote (jsontext.c, the one escaping of
 * every JSON string aigate writes), integers as integers, other numbers with 14 significant digits
 * (non-finite ones as null), booleans as true and false; any other value raises.
 */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include <lauxlib.h>
#include <lua.h>

#include "aigate.h"
#include "buf.h"
#include "jsontext.h"

#define MAX_DEPTH 4

static void put(struct buf *b, const char *s, size_t n)
{
    buf_append(b, s, n);
}

/* The value at the top of L's stack (not popped). */
static void write_scalar(lua_State *L, struct buf *b, const char *name)
{
    char num[64];
    int n;

    switch (lua_type(L, -1)) {
    case LUA_TSTRING: {
        size_t len;
        const char *s = lua_tolstring(L, -1, &len);
        js_quote(b, s, len);
        return;
    }
    case LUA_TNUMBER:
        if (lua_isinteger(L, -1)) {
            n = snprintf(num, sizeof(num), "%lld", (long long)lua_tointeger(L, -1));
        } else {
            double d = lua_tonumber(L, -1);
            n = isfinite(d) ? snprintf(num, sizeof(num), "%.14g", d) : snprintf(num, sizeof(num), "null");
        }
        put(b, num, (size_t)n);
        return;
    case LUA_TBOOLEAN:
        if (lua_toboolean(L, -1))
            put(b, "true", 4);
        else
            put(b, "false", 5);
        return;
    default:
        luaL_error(L, "json_fields: field '%s' is a %s (expected a string, number or boolean)", name,
                   luaL_typename(L, -1));
    }
}

static void write_object(lua_State *L, struct buf *b, int t, int spec, int depth);

/* The field of entry i of the spec at index spec, of the table at t, if set. first: nothing written
 * in this object yet; returns whether that is still so. */
static int write_field(lua_State *L, struct buf *b, int t, int spec, lua_Integer i, int first, int depth)
{
    const char *name;
    int entry, nested = 0, array = 0;

    lua_rawgeti(L, spec, i);
    entry = lua_gettop(L);
    if (lua_type(L, entry) == LUA_TTABLE) {
        lua_rawgeti(L, entry, 1);
        lua_rawgeti(L, entry, 2);
        lua_getfield(L, entry, "array");
        array = lua_toboolean(L, -1);
        lua_pop(L, 1);
        nested = 1;
    } else {
        lua_pushvalue(L, entry);
    }
    if (lua_type(L, entry + 1) != LUA_TSTRING)
        luaL_error(L, "json_fields: spec entry %d has no field name", (int)i);
    name = lua_tostring(L, entry + 1);
    lua_pushvalue(L, entry + 1);
    lua_rawget(L, t); /* the spec's own string: no metamethod runs, no name is interned again */
    if (!lua_isnil(L, -1)) {
        put(b, first ? "\"" : ",\"", first ? 1 : 2);
        put(b, name, strlen(name));
        put(b, "\":", 2);
        first = 0;
        if (!nested) {
            write_scalar(L, b, name);
        } else if (lua_type(L, -1) != LUA_TTABLE) {
            luaL_error(L, "json_fields: field '%s' is a %s (expected a table)", name, luaL_typename(L, -1));
        } else if (array) {
            int list = lua_gettop(L);
            lua_Integer k, n = (lua_Integer)lua_rawlen(L, list);
            put(b, "[", 1);
            for (k = 1; k <= n; k++) {
                if (k > 1)
                    put(b, ",", 1);
                lua_rawgeti(L, list, k);
                if (lua_type(L, -1) != LUA_TTABLE)
                    luaL_error(L, "json_fields: item %d of '%s' is not a table", (int)k, name);
                write_object(L, b, lua_gettop(L), entry + 2, depth + 1);
                lua_pop(L, 1);
            }
            put(b, "]", 1);
        } else {
            write_object(L, b, lua_gettop(L), entry + 2, depth + 1);
        }
    }
    lua_settop(L, entry - 1);
    return first;
}

static void write_object(lua_State *L, struct buf *b, int t, int spec, int depth)
{
    lua_Integer i, n;
    int first = 1;

    if (depth > MAX_DEPTH)
        luaL_error(L, "json_fields: nested deeper than %d", MAX_DEPTH);
    luaL_checkstack(L, 8, "json_fields");
    if (lua_type(L, spec) != LUA_TTABLE)
        luaL_error(L, "json_fields: a nested spec must be a table");
    n = (lua_Integer)lua_rawlen(L, spec);
    put(b, "{", 1);
    for (i = 1; i <= n; i++)
        first = write_field(L, b, t, spec, i, first, depth);
    put(b, "}", 1);
}

/*
 * The line is written into one buffer kept between calls: no Lua code runs while a line is written
 * (fields are read with rawget), so calls never nest, and a call that raises leaves the buffer to the
 * next one, which starts it again. A buffer grown past KEEP_BYTES by a long line is let go after it.
 */
#define KEEP_BYTES (64 * 1024)

static struct buf line;

int core_json_fields(lua_State *L)
{
    luaL_checktype(L, 1, LUA_TTABLE);
    luaL_checktype(L, 2, LUA_TTABLE);
    lua_settop(L, 2);
    buf_reset(&line);
    write_object(L, &line, 1, 2, 0);
    lua_pushlstring(L, line.data, line.len);
    if (line.cap > KEEP_BYTES) {
        buf_free(&line);
        buf_init(&line);
    }
    return 1;
}
