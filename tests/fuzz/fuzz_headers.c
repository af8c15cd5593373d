/*
 * fuzz_headers.c: libFuzzer harness of the header sets (src/headers.c).
 *
 * The input is a reply's head as curl hands it over: cut at each LF (kept), every line goes to
 * http_header_line in a heap block of its exact size, without a NUL after it, so a read past a line
 * shows under ASan. Then, against a count kept here from the same lines:
 *   - the status is the code of the last status line (1 to 3 digits after its first space, else 0);
 *   - the set holds one pair per "name: value" line since that status line (none with a NUL);
 *   - the walk covers the set exactly; names are lowercase, values trimmed;
 *   - header_value gives, for every name, its values in order joined with ", ";
 *   - http_push_headers gives a table with exactly those names and values.
 * The input is also walked as if it were a set (any bytes), which must stay inside it. Aborts on a
 * broken property.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>
#include <lua.h>

#include "buf.h"
#include "headers.h"

static void fail(const char *what)
{
    fprintf(stderr, "fuzz_headers: %s\n", what);
    abort();
}

/* What a line should do, worked out here independently of headers.c. */
static void expect_line(const uint8_t *line, size_t len, long *status, size_t *pairs)
{
    size_t i;

    if (len >= 5 && memcmp(line, "HTTP/", 5) == 0) {
        int digits = 0;
        *status = 0;
        *pairs = 0;
        for (i = 0; i < len && line[i] != ' '; i++)
            ;
        if (i == len)
            return;
        for (i++; i < len && line[i] == ' '; i++)
            ;
        for (; i < len && line[i] >= '0' && line[i] <= '9'; i++) {
            if (++digits > 3) {
                *status = 0;
                return;
            }
            *status = *status * 10 + (line[i] - '0');
        }
        return;
    }
    if (len > 0 && memchr(line, '\0', len) == NULL && memchr(line, ':', len) != NULL)
        (*pairs)++;
}

static int trimmed(const char *v)
{
    size_t n = strlen(v);

    if (n == 0)
        return 1;
    if (v[0] == ' ' || v[0] == '\t')
        return 0;
    return !(v[n - 1] == ' ' || v[n - 1] == '\t' || v[n - 1] == '\r' || v[n - 1] == '\n');
}

/* The values of name joined with ", ", from the walk. */
static void join_values(const struct buf *hdrs, const char *name, struct buf *out)
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
}

static void check_set(const struct buf *hdrs, size_t want_pairs)
{
    size_t pos = 0;
    size_t pairs = 0;
    const char *n;
    const char *v;
    const char *c;
    lua_State *L;
    struct buf got;
    struct buf want;
    size_t keys = 0;
    size_t distinct = 0;

    while (header_next(hdrs, &pos, &n, &v)) {
        pairs++;
        for (c = n; *c; c++)
            if (*c >= 'A' && *c <= 'Z')
                fail("a name not lowercased");
        if (!trimmed(v))
            fail("a value not trimmed");
    }
    if (pos != hdrs->len)
        fail("the walk does not cover the set");
    if (pairs != want_pairs)
        fail("a pair too many or too few");

    L = luaL_newstate();
    if (L == NULL)
        abort();
    http_push_headers(L, hdrs);
    buf_init(&got);
    buf_init(&want);
    pos = 0;
    while (header_next(hdrs, &pos, &n, &v)) {
        const char *s;
        buf_reset(&got);
        buf_reset(&want);
        if (header_value(hdrs, n, &got) < 1)
            fail("header_value misses a name of the set");
        join_values(hdrs, n, &want);
        if (got.len != want.len || memcmp(got.data, want.data, got.len) != 0)
            fail("header_value differs from the set's values joined");
        lua_getfield(L, 1, n);
        s = lua_tostring(L, -1);
        if (s == NULL || lua_rawlen(L, -1) != want.len || memcmp(s, want.data, want.len) != 0)
            fail("http_push_headers' table differs from header_value");
        lua_pop(L, 1);
    }
    /* as many keys as distinct names */
    lua_pushnil(L);
    while (lua_next(L, 1)) {
        keys++;
        lua_pop(L, 1);
    }
    pos = 0;
    while (header_next(hdrs, &pos, &n, &v)) {
        size_t p2 = 0;
        const char *n2 = NULL;
        const char *v2;
        while (header_next(hdrs, &p2, &n2, &v2) && n2 != n && strcmp(n2, n) != 0)
            ;
        if (n2 == n)
            distinct++; /* the first of its name */
    }
    if (keys != distinct)
        fail("http_push_headers' table has other names than the set");
    buf_reset(&got);
    if (header_value(hdrs, "no such header here", &got) != 0 || got.len != 0)
        fail("header_value finds an absent name");
    buf_free(&got);
    buf_free(&want);
    lua_close(L);
}

/* The input taken as a set as it is: every pair the walk gives must lie inside it. */
static void walk_raw(const uint8_t *data, size_t size)
{
    struct buf raw;
    size_t pos = 0;
    size_t last = 0;
    const char *n;
    const char *v;

    raw.data = (char *)(uintptr_t)data; /* read only: header_next does not write */
    raw.len = size;
    raw.cap = size;
    while (header_next(&raw, &pos, &n, &v)) {
        if (pos <= last || pos > size)
            fail("the walk does not move forward inside the set");
        if (n < raw.data || v + strlen(v) >= raw.data + size)
            fail("the walk gives a pair outside the set");
        last = pos;
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct buf hdrs;
    long status = -1;
    long want_status = -1;
    size_t want_pairs = 0;
    size_t pos = 0;

    buf_init(&hdrs);
    check_set(&hdrs, 0);
    while (pos < size) {
        const uint8_t *nl = memchr(data + pos, '\n', size - pos);
        size_t len = nl ? (size_t)(nl - (data + pos)) + 1 : size - pos;
        char *line = malloc(len);
        if (line == NULL)
            abort();
        memcpy(line, data + pos, len);
        http_header_line(&hdrs, &status, line, len);
        free(line);
        expect_line(data + pos, len, &want_status, &want_pairs);
        pos += len;
    }
    if (status != want_status)
        fail("status differs from the last status line's code");
    check_set(&hdrs, want_pairs);
    buf_free(&hdrs);
    walk_raw(data, size);
    return 0;
}
