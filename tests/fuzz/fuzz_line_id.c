/*
 * fuzz_line_id.c: the C half of the id rule of batch input lines (js_line_read, src/jsonscan.c)
 * against the decoder the run uses (lua-cjson, decode_invalid_numbers off), on every input:
 * - the same acceptance: the scanner refuses a line (JS_INVALID) exactly when the decoder does;
 * - the same id: a "custom_id", else an "id", read from the decoded object as aigate.batch's id_of
 *   writes it, is the text the scanner gives (or the scanner says it cannot tell, for a reason the
 *   decoded object confirms: a number, a repeated key);
 * - what the decoder cannot see: with no key repeated, the decoded objects hold exactly the keys the
 *   scanner counted (fewer when it found one repeated); every decoded string is UTF-8 unless the
 *   scanner said otherwise; a NUL byte is always found;
 * - the engine's strict scanner takes exactly the objects a plain reader of strict JSON (written
 *   here) takes, each one the decoder takes too (the shapes the engine reads with it are checked
 *   by fuzz_lineshape.c).
 * A property that fails prints the input and aborts.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>

#include "buf.h"
#include "jsonscan.h"

int luaopen_cjson(lua_State *L);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static lua_State *L;
static int decode_ref = LUA_NOREF;
static int utf8_len_ref = LUA_NOREF;

static void close_lua(void)
{
    if (L)
        lua_close(L);
    L = NULL;
}

/* One Lua state for the whole run: cjson's decoder with the settings aigate.batch gives its own,
 * and utf8.len (strict in Lua 5.4) as a second opinion on UTF-8. */
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
    luaL_requiref(L, "utf8", luaopen_utf8, 0);
    lua_getfield(L, -1, "len");
    utf8_len_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_settop(L, 0);
    atexit(close_lua);
}

static void fail(const char *what, const uint8_t *data, size_t size)
{
    size_t i;

    fprintf(stderr, "fuzz_line_id: %s\ninput (%zu bytes): ", what, size);
    for (i = 0; i < size && i < 400; i++)
        fprintf(stderr, data[i] >= 0x20 && data[i] < 0x7f ? "%c" : "\\x%02x", data[i]);
    fputc('\n', stderr);
    abort();
}

static int utf8_ok(int idx)
{
    int ok;

    lua_rawgeti(L, LUA_REGISTRYINDEX, utf8_len_ref);
    lua_pushvalue(L, idx > 0 ? idx : idx - 1);
    lua_call(L, 1, 1);
    ok = !lua_isnil(L, -1);
    lua_pop(L, 1);
    return ok;
}

/* Counts the string keys of every table in the value at the top (objects have only those, arrays
 * none), and whether every string in it is UTF-8. */
static void walk(size_t *keys, int *all_utf8)
{
    if (lua_type(L, -1) == LUA_TSTRING) {
        if (!utf8_ok(-1))
            *all_utf8 = 0;
        return;
    }
    if (lua_type(L, -1) != LUA_TTABLE)
        return;
    luaL_checkstack(L, 4, "deep");
    lua_pushnil(L);
    while (lua_next(L, -2)) {
        if (lua_type(L, -2) == LUA_TSTRING) {
            (*keys)++;
            if (!utf8_ok(-2))
                *all_utf8 = 0;
        }
        walk(keys, all_utf8);
        lua_pop(L, 1);
    }
}

enum { CJ_NONE, CJ_TEXT, CJ_BAD, CJ_NUMBER };

/* The id of the decoded object at the top as aigate.batch's id_of reads it: its kind, and its text
 * on the stack top for CJ_TEXT (else nothing pushed). */
static int cjson_id(int *is_number)
{
    static const char *const fields[2] = { "custom_id", "id" };
    int i;

    *is_number = 0;
    for (i = 0; i < 2; i++) {
        int t;
        lua_getfield(L, -1, fields[i]);
        t = lua_type(L, -1);
        if (t == LUA_TNIL || (t == LUA_TLIGHTUSERDATA && lua_touserdata(L, -1) == NULL)) {
            lua_pop(L, 1);
            continue;
        }
        if (t == LUA_TSTRING) {
            if (lua_rawlen(L, -1) > 0)
                return CJ_TEXT;
            lua_pop(L, 1);
            return CJ_BAD;
        }
        if (t == LUA_TNUMBER) {
            lua_Integer n;
            double d = lua_tonumber(L, -1);
            *is_number = 1;
            if (lua_isinteger(L, -1) || (lua_numbertointeger(d, &n) && (double)n == d)) {
                n = lua_isinteger(L, -1) ? lua_tointeger(L, -1) : (lua_Integer)d;
                lua_pop(L, 1);
                lua_pushfstring(L, "%I", n);
                return CJ_TEXT;
            }
            if (d != d || d == HUGE_VAL || d == -HUGE_VAL) {
                lua_pop(L, 1);
                return CJ_BAD;
            }
            lua_tostring(L, -1);
            return CJ_TEXT;
        }
        lua_pop(L, 1);
        return CJ_BAD;
    }
    return CJ_NONE;
}

/* ---- a second strict reader, written plainly, for the engine's scanner to be checked against ---- */

struct ref {
    const unsigned char *p, *end;
    int depth;
};

static void ref_ws(struct ref *r)
{
    while (r->p < r->end && (*r->p == ' ' || *r->p == '\t' || *r->p == '\n' || *r->p == '\r'))
        r->p++;
}

/* A UTF-8 character at r->p by its code point: 1 when it is one (well formed, shortest form, not a
 * surrogate, at most U+10FFFF). */
static int ref_utf8(struct ref *r)
{
    unsigned c = *r->p;
    unsigned long cp;
    int n, i;

    if (c >= 0xf0 && c <= 0xf7) {
        n = 4;
        cp = c & 0x07;
    } else if (c >= 0xe0) {
        n = c <= 0xef ? 3 : 0;
        cp = c & 0x0f;
    } else if (c >= 0xc0) {
        n = 2;
        cp = c & 0x1f;
    } else {
        return 0;
    }
    if (n == 0 || r->end - r->p < n)
        return 0;
    for (i = 1; i < n; i++) {
        if ((r->p[i] & 0xc0) != 0x80)
            return 0;
        cp = (cp << 6) | (r->p[i] & 0x3f);
    }
    if ((n == 2 && cp < 0x80) || (n == 3 && cp < 0x800) || (n == 4 && cp < 0x10000) || cp > 0x10ffff ||
        (cp >= 0xd800 && cp <= 0xdfff))
        return 0;
    r->p += n;
    return 1;
}

/* The engine's strings: no control byte, no \u escape of a surrogate, UTF-8. */
static int ref_string(struct ref *r)
{
    r->p++;
    while (r->p < r->end) {
        unsigned c = *r->p;
        if (c == '"') {
            r->p++;
            return 1;
        }
        if (c < 0x20)
            return 0;
        if (c >= 0x80) {
            if (!ref_utf8(r))
                return 0;
            continue;
        }
        if (c == '\\') {
            if (r->end - r->p < 2)
                return 0;
            c = r->p[1];
            if (c == 'u') {
                unsigned v = 0;
                int i;
                if (r->end - r->p < 6)
                    return 0;
                for (i = 2; i < 6; i++) {
                    unsigned h = r->p[i];
                    if (h >= '0' && h <= '9')
                        v = v * 16 + (h - '0');
                    else if ((h | 0x20) >= 'a' && (h | 0x20) <= 'f')
                        v = v * 16 + ((h | 0x20) - 'a' + 10);
                    else
                        return 0;
                }
                if (v >= 0xd800 && v <= 0xdfff)
                    return 0;
                r->p += 6;
                continue;
            }
            if (!(c == '"' || c == '\\' || c == '/' || c == 'b' || c == 'f' || c == 'n' || c == 'r' ||
                  c == 't'))
                return 0;
            r->p += 2;
            continue;
        }
        r->p++;
    }
    return 0;
}

static int ref_digits(struct ref *r)
{
    const unsigned char *start = r->p;

    while (r->p < r->end && *r->p >= '0' && *r->p <= '9')
        r->p++;
    return r->p > start;
}

static int ref_value(struct ref *r)
{
    static const char *const words[3] = { "true", "false", "null" };
    int i;

    if (r->p >= r->end)
        return 0;
    if (*r->p == '{' || *r->p == '[') {
        int object = *r->p == '{';
        if (++r->depth > JS_STRICT_DEPTH)
            return 0;
        r->p++;
        ref_ws(r);
        if (r->p < r->end && *r->p == (object ? '}' : ']')) {
            r->p++;
            r->depth--;
            return 1;
        }
        for (;;) {
            if (object) {
                if (r->p >= r->end || *r->p != '"' || !ref_string(r))
                    return 0;
                ref_ws(r);
                if (r->p >= r->end || *r->p != ':')
                    return 0;
                r->p++;
                ref_ws(r);
            }
            if (!ref_value(r))
                return 0;
            ref_ws(r);
            if (r->p < r->end && *r->p == ',') {
                r->p++;
                ref_ws(r);
                continue;
            }
            if (r->p < r->end && *r->p == (object ? '}' : ']')) {
                r->p++;
                r->depth--;
                return 1;
            }
            return 0;
        }
    }
    if (*r->p == '"')
        return ref_string(r);
    for (i = 0; i < 3; i++) {
        size_t n = strlen(words[i]);
        if ((size_t)(r->end - r->p) >= n && memcmp(r->p, words[i], n) == 0) {
            r->p += n;
            return 1;
        }
    }
    if (*r->p == '-')
        r->p++;
    if (r->p < r->end && *r->p == '0')
        r->p++;
    else if (!ref_digits(r))
        return 0;
    if (r->p < r->end && *r->p == '.') {
        r->p++;
        if (!ref_digits(r))
            return 0;
    }
    if (r->p < r->end && (*r->p == 'e' || *r->p == 'E')) {
        r->p++;
        if (r->p < r->end && (*r->p == '+' || *r->p == '-'))
            r->p++;
        if (!ref_digits(r))
            return 0;
    }
    return 1;
}

/* A whole text that is one object, as the engine's strict scanner must read it. */
static int ref_strict_object(const uint8_t *data, size_t size)
{
    struct ref r = { data, data + size, 0 };

    ref_ws(&r);
    if (r.p >= r.end || *r.p != '{' || !ref_value(&r))
        return 0;
    ref_ws(&r);
    return r.p == r.end;
}

static int skip_member(void *ctx, struct js_scan *s, const struct js_token *key)
{
    char kind;

    (void)ctx;
    (void)key;
    return js_scan_value(s, NULL, &kind);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *text = size ? (const char *)data : ""; /* (never NULL + 0) */
    struct js_line r;
    struct buf id;
    int accepted;
    int strict;

    if (L == NULL)
        open_lua();
    buf_init(&id);
    js_line_read(text, size, &r, &id);
    strict = js_scan_whole_object(text, size, skip_member, NULL) == 0;
    if (strict != ref_strict_object((const uint8_t *)text, size))
        fail(strict ? "the strict scanner takes a text it must refuse"
                    : "the strict scanner refuses a strict text",
             data, size);
    if (memchr(text, '\0', size)) {
        if (r.problem != JS_NUL || strict)
            fail("a NUL byte not reported", data, size);
        buf_free(&id);
        return 0;
    }
    lua_settop(L, 0);
    lua_rawgeti(L, LUA_REGISTRYINDEX, decode_ref);
    lua_pushlstring(L, text, size);
    accepted = lua_pcall(L, 1, 1, 0) == LUA_OK;
    if (accepted != (r.problem != JS_INVALID))
        fail(accepted ? "the decoder takes a line the scanner refuses"
                      : "the scanner takes a line the decoder refuses",
             data, size);
    if (strict && !(accepted && (r.problem == JS_OK || r.problem == JS_DUP_KEY)))
        fail("the strict scanner takes a line the rule refuses", data, size);
    if (accepted && lua_type(L, -1) == LUA_TTABLE && r.problem != JS_NOT_OBJECT) {
        size_t keys = 0;
        int all_utf8 = 1;
        int is_number;
        int kind;

        walk(&keys, &all_utf8);
        if (r.problem == JS_DUP_KEY ? keys >= r.members : (r.problem != JS_BAD_UTF8 && keys != r.members))
            fail("repeated keys: the scanner and the decoded object disagree", data, size);
        if (r.problem != JS_BAD_UTF8 && !all_utf8)
            fail("a decoded string is not UTF-8 and the scanner did not say", data, size);
        if (r.problem == JS_BAD_UTF8 && keys == r.members && all_utf8)
            fail("the scanner found a byte that is not UTF-8 and every decoded string is", data, size);
        kind = cjson_id(&is_number);
        switch (r.id) {
        case JS_ID_NONE:
            if (kind != CJ_NONE)
                fail("the decoded object has an id and the scanner saw none", data, size);
            break;
        case JS_ID_TEXT:
            if (kind != CJ_TEXT || lua_rawlen(L, -1) != id.len ||
                memcmp(lua_tostring(L, -1), id.data, id.len) != 0)
                fail("the scanner's id is not the decoded object's", data, size);
            break;
        case JS_ID_BAD:
            if (kind != CJ_BAD)
                fail("the scanner refuses an id the decoded object has", data, size);
            break;
        case JS_ID_NUMBER:
            if (!is_number)
                fail("the scanner left to the decoder an id that is not a number", data, size);
            break;
        case JS_ID_UNKNOWN:
            if (r.problem != JS_DUP_KEY && r.problem != JS_BAD_UTF8)
                fail("the scanner cannot tell an id, with no reason", data, size);
            break;
        }
    } else if (accepted && r.problem != JS_NOT_OBJECT) {
        fail("the decoder took a line that is not an object, the scanner says it is one", data, size);
    }
    if (r.problem == JS_NOT_OBJECT && accepted && lua_type(L, -1) == LUA_TTABLE) {
        /* an array: the first byte past the whitespace must be '[' */
        size_t i = 0;
        while (i < size && (text[i] == ' ' || text[i] == '\t' || text[i] == '\n' || text[i] == '\r'))
            i++;
        if (i >= size || text[i] != '[')
            fail("the scanner says not an object, and it decodes to a table not from an array", data, size);
    }
    lua_settop(L, 0);
    lua_gc(L, LUA_GCCOLLECT, 0);
    buf_free(&id);
    return 0;
}
