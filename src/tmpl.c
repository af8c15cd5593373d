/*
 * tmpl.c: templates with typed holes (see tmpl.h).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>

#include "jsontext.h"
#include "tmpl.h"

void tmpl_append_int(struct buf *b, long long v)
{
    char tmp[24];
    char *p = tmp + sizeof(tmp);
    unsigned long long u = v < 0 ? 0ULL - (unsigned long long)v : (unsigned long long)v;

    do {
        *--p = (char)('0' + u % 10);
        u /= 10;
    } while (u);
    if (v < 0)
        *--p = '-';
    buf_append(b, p, (size_t)(tmp + sizeof(tmp) - p));
}

void tmpl_free(struct tmpl *t)
{
    size_t i;
    int j;

    if (t == NULL)
        return;
    for (i = 0; i < t->n; i++) {
        struct tmpl_op *op = &t->ops[i];
        free(op->text);
        for (j = 0; j < op->nheaders; j++)
            free(op->headers[j]);
        tmpl_free(op->yes);
    }
    free(t->ops);
    free(t);
}

/* A number format is "%.<1 or 2 digits>" then f or g: nothing else reaches snprintf. */
static int good_fmt(const char *f)
{
    size_t n = strlen(f);

    if (n < 4 || n > 5 || f[0] != '%' || f[1] != '.' || (f[n - 1] != 'f' && f[n - 1] != 'g'))
        return 0;
    return f[2] >= '0' && f[2] <= '9' && (n == 4 || (f[3] >= '0' && f[3] <= '9'));
}

static char *dup_lstring(lua_State *L, const char *s, size_t len)
{
    char *c = malloc(len + 1);

    if (c == NULL)
        luaL_error(L, "out of memory");
    memcpy(c, s, len);
    c[len] = '\0';
    return c;
}

static const char *const KIND_NAMES[] = { "str", "int", "num", "raw", "alt", NULL };
static const enum tmpl_kind KINDS[] = { TMPL_STR, TMPL_INT, TMPL_NUM, TMPL_RAW, TMPL_ALT };

static void read_at(lua_State *L, int idx, const char *const *names, int depth, struct tmpl **slot);

/* The hole at the top of L into op. */
static void read_hole(lua_State *L, struct tmpl_op *op, const char *const *names, int depth)
{
    const char *s;
    int i;

    lua_getfield(L, -1, "hole");
    s = lua_tostring(L, -1);
    for (i = 0; s && KIND_NAMES[i] && strcmp(s, KIND_NAMES[i]) != 0; i++)
        ;
    if (s == NULL || KIND_NAMES[i] == NULL)
        luaL_error(L, "template: a hole has no known kind (got %s)", s ? s : luaL_typename(L, -1));
    op->kind = KINDS[i];
    lua_pop(L, 1);
    lua_getfield(L, -1, "src");
    s = lua_tostring(L, -1);
    for (i = 0; s && names[i] && strcmp(s, names[i]) != 0; i++)
        ;
    if (s == NULL || names[i] == NULL)
        luaL_error(L, "template: no value named '%s' here", s ? s : "?");
    op->src = i;
    lua_pop(L, 1);
    if (op->kind == TMPL_NUM) {
        lua_getfield(L, -1, "fmt");
        s = lua_tostring(L, -1);
        if (s == NULL || !good_fmt(s))
            luaL_error(L, "template: hole '%s' needs a fmt like %%.6f (got %s)", names[op->src],
                       s ? s : "nil");
        strcpy(op->fmt, s);
        lua_pop(L, 1);
    }
    lua_getfield(L, -1, "headers");
    if (lua_istable(L, -1)) {
        for (i = 1; lua_rawgeti(L, -1, i) == LUA_TSTRING; i++) {
            size_t len;
            if (op->nheaders == TMPL_MAX_HEADERS)
                luaL_error(L, "template: more than %d headers for one hole", TMPL_MAX_HEADERS);
            s = lua_tolstring(L, -1, &len);
            op->headers[op->nheaders++] = dup_lstring(L, s, len);
            lua_pop(L, 1);
        }
        lua_pop(L, 1);
    }
    lua_pop(L, 1);
    lua_getfield(L, -1, op->kind == TMPL_ALT ? "no" : "opt");
    if (lua_type(L, -1) == LUA_TSTRING) {
        size_t len;
        s = lua_tolstring(L, -1, &len);
        op->text = dup_lstring(L, s, len);
        op->len = len;
        op->has_opt = op->kind != TMPL_ALT;
    } else if (op->kind == TMPL_ALT) {
        luaL_error(L, "template: alt hole '%s' needs its 'no' text", names[op->src]);
    }
    lua_pop(L, 1);
    if (op->kind == TMPL_ALT) {
        lua_getfield(L, -1, "yes");
        if (!lua_istable(L, -1))
            luaL_error(L, "template: alt hole '%s' needs its 'yes' template", names[op->src]);
        read_at(L, lua_gettop(L), names, depth + 1, &op->yes);
        lua_pop(L, 1);
    }
}

/* Reads the template at idx into *slot. Each allocation hangs from *slot as soon as it is made (an
 * op is counted before it is filled, its fields zero until then), so that when a bad item raises, the
 * caller frees what was read with tmpl_free(*slot). */
static void read_at(lua_State *L, int idx, const char *const *names, int depth, struct tmpl **slot)
{
    struct tmpl *t;
    lua_Integer n, i;

    if (depth > TMPL_MAX_DEPTH)
        luaL_error(L, "template: nested deeper than %d", TMPL_MAX_DEPTH);
    luaL_checktype(L, idx, LUA_TTABLE);
    n = (lua_Integer)lua_rawlen(L, idx);
    t = calloc(1, sizeof(*t));
    if (t == NULL)
        luaL_error(L, "out of memory");
    *slot = t;
    if (n > 0 && (t->ops = calloc((size_t)n, sizeof(*t->ops))) == NULL)
        luaL_error(L, "out of memory");
    for (i = 1; i <= n; i++) {
        struct tmpl_op *op = &t->ops[t->n++];
        int type = lua_rawgeti(L, idx, i);
        if (type == LUA_TSTRING) {
            size_t len;
            const char *s = lua_tolstring(L, -1, &len);
            op->kind = TMPL_LIT;
            op->text = dup_lstring(L, s, len);
            op->len = len;
        } else if (type == LUA_TTABLE) {
            read_hole(L, op, names, depth);
        } else {
            luaL_error(L, "template: item %d is a %s (a string or a hole expected)", (int)i,
                       lua_typename(L, type));
        }
        lua_pop(L, 1);
    }
}

struct read_args {
    const char *const *names;
    struct tmpl *t;
};

static int read_protected(lua_State *L)
{
    struct read_args *a = lua_touserdata(L, 2);

    read_at(L, 1, a->names, 0, &a->t);
    return 0;
}

struct tmpl *tmpl_read(lua_State *L, int idx, const char *const *names)
{
    struct read_args a = { names, NULL };

    idx = lua_absindex(L, idx);
    lua_pushcfunction(L, read_protected);
    lua_pushvalue(L, idx);
    lua_pushlightuserdata(L, &a);
    if (lua_pcall(L, 2, 0, 0) != LUA_OK) {
        tmpl_free(a.t);
        lua_error(L); /* the message, raised again with nothing left allocated */
    }
    return a.t;
}

static void append_num(struct buf *b, double v, const char *fmt)
{
    char tmp[64];
    int n;

    if (v == (double)(long long)v) {
        tmpl_append_int(b, (long long)v);
        return;
    }
    n = snprintf(tmp, sizeof(tmp), fmt, v);
    if (n > 0)
        buf_append(b, tmp, (size_t)n < sizeof(tmp) ? (size_t)n : sizeof(tmp) - 1);
}

void tmpl_fill(const struct tmpl *t, struct buf *out, tmpl_get_fn get, void *ctx)
{
    size_t i;

    for (i = 0; i < t->n; i++) {
        const struct tmpl_op *op = &t->ops[i];
        struct tmpl_value v;

        if (op->kind == TMPL_LIT) {
            buf_append(out, op->text, op->len);
            continue;
        }
        memset(&v, 0, sizeof(v));
        get(ctx, op, &v);
        if (op->kind == TMPL_ALT) {
            if (v.type)
                tmpl_fill(op->yes, out, get, ctx);
            else
                buf_append(out, op->text, op->len);
            continue;
        }
        if (v.type == 0) {
            if (!op->has_opt)
                buf_append(out, "null", 4);
            continue;
        }
        if (op->has_opt)
            buf_append(out, op->text, op->len);
        switch (op->kind) {
        case TMPL_STR:
            if (v.type == 's')
                js_quote(out, v.s, v.len);
            else
                buf_append(out, "null", 4);
            break;
        case TMPL_RAW:
            buf_append(out, v.s, v.len);
            break;
        case TMPL_INT:
        case TMPL_NUM:
            if (v.type == 'i')
                tmpl_append_int(out, v.i);
            else if (v.type == 'd')
                append_num(out, v.d, op->kind == TMPL_NUM ? op->fmt : "%.14g");
            else
                buf_append(out, "null", 4);
            break;
        default:
            break;
        }
    }
}
