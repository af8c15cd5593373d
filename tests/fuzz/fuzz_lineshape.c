/*
 * fuzz_lineshape.c: the engine's reading of a batch line (line_shape_read, src/lineshape.c) and its
 * writing of strings (js_unescape, src/jsonscan.c, and js_quote, src/jsontext.c) against lua-cjson:
 * - a line whose shape is read (and that the id rule passes) decodes, and holds what the shape says:
 *   a prompt string or messages of role and content strings, a model string, parameters that are
 *   numbers or strings, nothing else;
 * - each string the engine writes again (a prompt, a content) unescapes to the text the decoder gives
 *   (or the engine refuses it: a lone surrogate, which the decoder refuses too), and js_quote of that
 *   text decodes back to it.
 * A property that fails prints the input and aborts.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>

#include "buf.h"
#include "jsonscan.h"
#include "jsontext.h"
#include "lineshape.h"

int luaopen_cjson(lua_State *L);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static lua_State *L;
static int decode_ref = LUA_NOREF;

static void open_lua(void)
{
    L = luaL_newstate();
    if (L == NULL)
        abort();
    luaL_requiref(L, "cjson", luaopen_cjson, 0);
    lua_getfield(L, -1, "new");
    lua_call(L, 0, 1);
    lua_getfield(L, -1, "decode_invalid_numbers");
    lua_pushboolean(L, 0);
    lua_call(L, 1, 0);
    lua_getfield(L, -1, "decode");
    decode_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_settop(L, 0);
}

static void fail(const char *what, const uint8_t *data, size_t size)
{
    fprintf(stderr, "fuzz_lineshape: %s\ninput (%zu bytes): ", what, size);
    fwrite(data, 1, size, stderr);
    fputc('\n', stderr);
    abort();
}

/* Decodes s[0..len) with cjson; 1 with the value on top of L, 0 (nothing pushed) when it refuses. */
static int decode(const char *s, size_t len)
{
    lua_rawgeti(L, LUA_REGISTRYINDEX, decode_ref);
    lua_pushlstring(L, s, len);
    if (lua_pcall(L, 1, 1, 0) != LUA_OK) {
        lua_pop(L, 1);
        return 0;
    }
    return 1;
}

/* The string token tok, written again by the engine, against the decoded text at idx. */
static void check_string(const struct js_token *tok, int idx, const uint8_t *data, size_t size)
{
    struct buf text, quoted;
    size_t dlen;
    const char *d;

    if (lua_type(L, idx) != LUA_TSTRING)
        fail("a string token is not a string once decoded", data, size);
    d = lua_tolstring(L, idx, &dlen);
    buf_init(&text);
    buf_init(&quoted);
    if (js_unescape(tok->start, tok->len, &text) == 0) {
        if (text.len != dlen || (dlen && memcmp(text.data, d, dlen) != 0))
            fail("js_unescape differs from the decoder", data, size);
        js_quote(&quoted, text.data ? text.data : "", text.len);
        if (!decode(quoted.data, quoted.len))
            fail("js_quote wrote a string the decoder refuses", data, size);
        d = lua_tolstring(L, -1, &dlen);
        if (d == NULL || dlen != text.len || (dlen && memcmp(d, text.data, dlen) != 0))
            fail("js_quote's string decodes to another text", data, size);
        lua_pop(L, 1);
        if (!js_needs_requote(tok->start, tok->len) &&
            (quoted.len != tok->len || memcmp(quoted.data, tok->start, tok->len) != 0))
            fail("a token said to need no requote is not what js_quote writes", data, size);
    }
    buf_free(&text);
    buf_free(&quoted);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *line = (const char *)data;
    struct line_shape ls;
    struct js_line jl;
    struct buf id;
    int obj, i;

    if (L == NULL)
        open_lua();
    buf_init(&id);
    js_line_read(line, size, &jl, &id);
    buf_free(&id);
    if (jl.problem != JS_OK || line_shape_read(line, size, &ls) != 0)
        return 0;
    if (!decode(line, size) || !lua_istable(L, -1))
        fail("a line of a shape does not decode to an object", data, size);
    obj = lua_gettop(L);
    if (ls.openai) {
        lua_getfield(L, obj, "body");
        if (!lua_istable(L, -1))
            fail("an OpenAI Batch shape without a body object", data, size);
        obj = lua_gettop(L);
        for (i = 0; i < ls.nparams; i++) {
            int t;
            lua_pushlstring(L, ls.params[i].name.start + 1, ls.params[i].name.len - 2);
            t = lua_rawget(L, obj);
            if (t != (ls.params[i].kind == '"' ? LUA_TSTRING : LUA_TNUMBER))
                fail("a parameter of another type than the shape says", data, size);
            lua_pop(L, 1);
        }
    } else if (ls.has_prompt) {
        lua_getfield(L, obj, "prompt");
        check_string(&ls.prompt, -1, data, size);
        lua_pop(L, 1);
    }
    if (ls.has_model) {
        lua_getfield(L, obj, "model");
        if (lua_type(L, -1) != LUA_TSTRING || lua_rawlen(L, -1) != ls.model.len - 2 ||
            memcmp(lua_tostring(L, -1), ls.model.start + 1, ls.model.len - 2) != 0)
            fail("the model is not the decoded one", data, size);
        lua_pop(L, 1);
    }
    if (ls.has_messages) {
        lua_getfield(L, obj, "messages");
        if (!lua_istable(L, -1) || lua_rawlen(L, -1) != (size_t)ls.nmessages)
            fail("messages differ in number", data, size);
        for (i = 0; i < ls.nmessages; i++) {
            lua_rawgeti(L, -1, i + 1);
            lua_getfield(L, -1, "role");
            if (lua_type(L, -1) != LUA_TSTRING || lua_rawlen(L, -1) != ls.messages[i].role.len - 2)
                fail("a role differs", data, size);
            lua_pop(L, 1);
            lua_getfield(L, -1, "content");
            check_string(&ls.messages[i].content, -1, data, size);
            lua_pop(L, 2);
        }
        lua_pop(L, 1);
    }
    lua_settop(L, 0);
    return 0;
}
