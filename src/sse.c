/*
 * sse.c: the Server-Sent Events parser of sse.h and its Lua binding (`core.sse_parser()`).
 */
#include "sse.h"

#include <string.h>

#include <lauxlib.h>
#include <lua.h>

#include "aigate.h"

void sse_init(struct sse_parser *p)
{
    buf_init(&p->line);
    buf_init(&p->data);
    buf_init(&p->event);
    buf_init(&p->id);
    p->has_data = 0;
    p->has_event = 0;
    p->has_id = 0;
    p->skip_lf = 0;
    p->started = 0;
}

void sse_free(struct sse_parser *p)
{
    buf_free(&p->line);
    buf_free(&p->data);
    buf_free(&p->event);
    buf_free(&p->id);
}

static void dispatch(struct sse_parser *p, sse_emit_fn emit, void *ud)
{
    struct sse_event ev;

    if (p->has_data) {
        ev.data = p->data.data;
        ev.data_len = p->data.len - 1; /* drop the '\n' after the last data line */
        ev.event = p->has_event ? p->event.data : NULL;
        ev.event_len = p->event.len;
        ev.id = p->has_id ? p->id.data : NULL;
        ev.id_len = p->id.len;
        emit(ud, &ev);
    }
    buf_reset(&p->data);
    buf_reset(&p->event);
    buf_reset(&p->id);
    p->has_data = 0;
    p->has_event = 0;
    p->has_id = 0;
}

static int field_is(const char *name, size_t len, const char *want)
{
    return strlen(want) == len && memcmp(name, want, len) == 0;
}

static void process_line(struct sse_parser *p, const char *line, size_t len, sse_emit_fn emit, void *ud)
{
    const char *colon;
    const char *value;
    size_t name_len;
    size_t value_len;

    if (len == 0) {
        dispatch(p, emit, ud);
        return;
    }
    if (line[0] == ':')
        return;
    colon = memchr(line, ':', len);
    if (colon == NULL) {
        name_len = len;
        value = line + len;
        value_len = 0;
    } else {
        name_len = (size_t)(colon - line);
        value = colon + 1;
        value_len = len - name_len - 1;
        if (value_len > 0 && value[0] == ' ') {
            value++;
            value_len--;
        }
    }
    if (field_is(line, name_len, "data")) {
        buf_append(&p->data, value, value_len);
        buf_append_char(&p->data, '\n');
        p->has_data = 1;
    } else if (field_is(line, name_len, "event")) {
        buf_reset(&p->event);
        buf_append(&p->event, value, value_len);
        p->has_event = 1;
    } else if (field_is(line, name_len, "id")) {
        if (memchr(value, '\0', value_len) == NULL) {
            buf_reset(&p->id);
            buf_append(&p->id, value, value_len);
            p->has_id = 1;
        }
    }
    /* `retry` and unknown fields are ignored, as the standard says. */
}

static const char *find_eol(const char *s, size_t len)
{
    size_t i;

    for (i = 0; i < len; i++) {
        if (s[i] == '\n' || s[i] == '\r')
            return s + i;
    }
    return NULL;
}

void sse_feed(struct sse_parser *p, const char *chunk, size_t len, sse_emit_fn emit, void *ud)
{
    const char *s = chunk;
    const char *end = chunk + len;

    if (p->skip_lf && s < end) {
        if (*s == '\n')
            s++;
        p->skip_lf = 0;
    }
    if (!p->started) {
        /* A UTF-8 byte order mark may open the stream; it may arrive split across chunks. */
        static const char bom[3] = { '\xEF', '\xBB', '\xBF' };
        size_t have = p->line.len;
        while (s < end && have < 3 && *s == bom[have]) {
            buf_append_char(&p->line, *s);
            s++;
            have++;
        }
        if (have == 3) {
            buf_reset(&p->line);
            p->started = 1;
        } else if (s < end) {
            p->started = 1; /* not a BOM: what was held back is ordinary line text */
        } else {
            return;
        }
    }
    while (s < end) {
        const char *eol = find_eol(s, (size_t)(end - s));
        if (eol == NULL) {
            buf_append(&p->line, s, (size_t)(end - s));
            return;
        }
        if (p->line.len > 0) {
            buf_append(&p->line, s, (size_t)(eol - s));
            process_line(p, p->line.data, p->line.len, emit, ud);
            buf_reset(&p->line);
        } else {
            process_line(p, s, (size_t)(eol - s), emit, ud);
        }
        if (*eol == '\r') {
            if (eol + 1 < end) {
                if (eol[1] == '\n')
                    eol++;
            } else {
                p->skip_lf = 1;
            }
        }
        s = eol + 1;
    }
}

void sse_finish(struct sse_parser *p, sse_emit_fn emit, void *ud)
{
    if (p->line.len > 0) {
        process_line(p, p->line.data, p->line.len, emit, ud);
        buf_reset(&p->line);
    }
    dispatch(p, emit, ud);
}

/* ---- Lua binding ---------------------------------------------------------------------------- */

#define SSE_MT "aigate.sse_parser"

struct lua_emit {
    lua_State *L;
    int table; /* absolute index of the result array */
    lua_Integer n;
};

/* Pushes one event table into the result array. Stack: balanced. */
static void lua_emit_event(void *ud, const struct sse_event *ev)
{
    struct lua_emit *le = ud;
    lua_State *L = le->L;

    lua_createtable(L, 0, 3);
    lua_pushlstring(L, ev->data, ev->data_len);
    lua_setfield(L, -2, "data");
    if (ev->event) {
        lua_pushlstring(L, ev->event, ev->event_len);
        lua_setfield(L, -2, "event");
    }
    if (ev->id) {
        lua_pushlstring(L, ev->id, ev->id_len);
        lua_setfield(L, -2, "id");
    }
    lua_rawseti(L, le->table, ++le->n);
}

static int l_sse_feed(lua_State *L)
{
    struct sse_parser *p = luaL_checkudata(L, 1, SSE_MT);
    size_t len;
    const char *chunk = luaL_checklstring(L, 2, &len);
    struct lua_emit le;

    lua_newtable(L);
    le.L = L;
    le.table = lua_gettop(L);
    le.n = 0;
    sse_feed(p, chunk, len, lua_emit_event, &le);
    return 1;
}

static int l_sse_finish(lua_State *L)
{
    struct sse_parser *p = luaL_checkudata(L, 1, SSE_MT);
    struct lua_emit le;

    lua_newtable(L);
    le.L = L;
    le.table = lua_gettop(L);
    le.n = 0;
    sse_finish(p, lua_emit_event, &le);
    return 1;
}

static int l_sse_gc(lua_State *L)
{
    struct sse_parser *p = luaL_checkudata(L, 1, SSE_MT);
    sse_free(p);
    return 0;
}

int core_sse_parser(lua_State *L)
{
    struct sse_parser *p = lua_newuserdatauv(L, sizeof(*p), 0);
    sse_init(p);
    if (luaL_newmetatable(L, SSE_MT)) {
        static const luaL_Reg methods[] = {
            { "feed", l_sse_feed },
            { "finish", l_sse_finish },
            { NULL, NULL },
        };
        luaL_newlib(L, methods);
        lua_setfield(L, -2, "__index");
        lua_pushcfunction(L, l_sse_gc);
        lua_setfield(L, -2, "__gc");
    }
    lua_setmetatable(L, -2);
    return 1;
}
