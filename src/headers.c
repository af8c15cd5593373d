/*
 * headers.c: the header sets of headers.h.
 */
#include "headers.h"

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <curl/curl.h>
#include <lua.h>

/* The code of a status line "HTTP/x code reason": the digits after the first space, read within the
 * line, since curl's buffer has no NUL after it. 0 when there are none or more than three. */
static long status_code(const char *line, size_t len)
{
    const char *sp = memchr(line, ' ', len);
    const char *end = line + len;
    const char *p;
    long code = 0;
    int digits = 0;

    if (sp == NULL)
        return 0;
    for (p = sp + 1; p < end && *p == ' '; p++)
        ;
    for (; p < end && *p >= '0' && *p <= '9'; p++) {
        if (++digits > 3)
            return 0;
        code = code * 10 + (*p - '0');
    }
    return code;
}

void http_header_line(struct buf *hdrs, long *status, const char *data, size_t len)
{
    const char *colon;
    size_t name_len;
    size_t i;
    const char *value;
    const char *vend;

    if (len == 0)
        return;
    if (len >= 5 && memcmp(data, "HTTP/", 5) == 0) {
        /* A new status line (after 1xx, or a new response): start the header set again. */
        *status = status_code(data, len);
        buf_reset(hdrs);
        return;
    }
    /* A NUL would end the name or the value early and shift every pair after it. */
    if (memchr(data, '\0', len) != NULL)
        return;
    colon = memchr(data, ':', len);
    if (colon == NULL)
        return;
    name_len = (size_t)(colon - data);
    value = colon + 1;
    vend = data + len;
    while (value < vend && (*value == ' ' || *value == '\t'))
        value++;
    while (vend > value && (vend[-1] == '\r' || vend[-1] == '\n' || vend[-1] == ' ' || vend[-1] == '\t'))
        vend--;
    buf_reserve(hdrs, name_len + (size_t)(vend - value) + 2);
    for (i = 0; i < name_len; i++)
        hdrs->data[hdrs->len++] = (char)tolower((unsigned char)data[i]);
    hdrs->data[hdrs->len++] = '\0';
    memcpy(hdrs->data + hdrs->len, value, (size_t)(vend - value));
    hdrs->len += (size_t)(vend - value);
    hdrs->data[hdrs->len++] = '\0';
    hdrs->data[hdrs->len] = '\0'; /* as every buf is */
}

int header_next(const struct buf *hdrs, size_t *pos, const char **name, const char **value)
{
    const char *n;
    const char *nend;
    const char *vend;
    size_t left;

    if (*pos >= hdrs->len)
        return 0; /* also an empty set, whose data may be NULL */
    n = hdrs->data + *pos;
    left = hdrs->len - *pos;
    nend = memchr(n, '\0', left);
    if (nend == NULL || nend + 1 >= n + left)
        return 0;
    vend = memchr(nend + 1, '\0', (size_t)(n + left - (nend + 1)));
    if (vend == NULL)
        return 0;
    *name = n;
    *value = nend + 1;
    *pos += (size_t)(vend + 1 - n);
    return 1;
}

int header_value(const struct buf *hdrs, const char *name, struct buf *out)
{
    size_t pos = 0;
    const char *n;
    const char *v;
    int found = 0;

    while (header_next(hdrs, &pos, &n, &v)) {
        if (strcmp(n, name) == 0) {
            if (found++)
                buf_append(out, ", ", 2);
            buf_append(out, v, strlen(v));
        }
    }
    return found;
}

void http_push_headers(lua_State *L, const struct buf *hdrs)
{
    size_t pos = 0;
    const char *name;
    const char *value;

    int n = 0;

    while (header_next(hdrs, &pos, &name, &value))
        n++;
    lua_createtable(L, 0, n); /* sized once: a table grown field by field is rehashed at each power of two */
    pos = 0;
    while (header_next(hdrs, &pos, &name, &value)) {
        lua_getfield(L, -1, name);
        if (lua_isstring(L, -1)) {
            lua_pushstring(L, ", ");
            lua_pushstring(L, value);
            lua_concat(L, 3);
        } else {
            lua_pop(L, 1);
            lua_pushstring(L, value);
        }
        lua_setfield(L, -2, name);
    }
}

struct curl_slist *header_list_append(struct curl_slist *list, const char *name, size_t name_len,
                                      const char *value, size_t value_len)
{
    struct buf line;
    struct curl_slist *more;

    buf_init(&line);
    buf_append(&line, name, name_len);
    if (value_len == 0) {
        buf_append_char(&line, ';');
    } else {
        buf_append(&line, ": ", 2);
        buf_append(&line, value, value_len);
    }
    more = curl_slist_append(list, line.data);
    buf_free(&line);
    if (more == NULL) {
        fputs("aigate: out of memory\n", stderr);
        abort();
    }
    return more;
}

int header_table_check(lua_State *L, int idx)
{
    int ok = 1;

    if (lua_isnoneornil(L, idx))
        return 0;
    if (!lua_istable(L, idx))
        return -1;
    idx = lua_absindex(L, idx);
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        if (lua_type(L, -2) != LUA_TSTRING || lua_type(L, -1) != LUA_TSTRING)
            ok = 0;
        lua_pop(L, 1);
        if (!ok) {
            lua_pop(L, 1);
            return -1;
        }
    }
    return 0;
}

int header_list_from_table(lua_State *L, int idx, struct curl_slist **list)
{
    *list = NULL;
    if (header_table_check(L, idx) != 0)
        return -1;
    if (!lua_isnoneornil(L, idx)) {
        idx = lua_absindex(L, idx);
        lua_pushnil(L);
        while (lua_next(L, idx)) {
            size_t name_len;
            size_t value_len;
            const char *name = lua_tolstring(L, -2, &name_len); /* strings: no conversion in place */
            const char *value = lua_tolstring(L, -1, &value_len);
            *list = header_list_append(*list, name, name_len, value, value_len);
            lua_pop(L, 1);
        }
    }
    *list = curl_slist_append(*list, "Expect:");
    if (*list == NULL) {
        fputs("aigate: out of memory\n", stderr);
        abort();
    }
    return 0;
}
