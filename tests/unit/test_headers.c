/*
 * test_headers.c: unit tests of the header sets of src/headers.c. Every line is handed over in a heap
 * copy of its exact length without a NUL after it, as curl's header callback does, so a read past
 * the line shows under the sanitizers (`make asan`).
 */
#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>
#include <lua.h>

#include "buf.h"
#include "headers.h"
#include "unit.h"

static void feed(struct buf *hdrs, long *status, const char *line, size_t len)
{
    char *copy = malloc(len ? len : 1);

    memcpy(copy, line, len);
    http_header_line(hdrs, status, copy, len);
    free(copy);
}

#define FEED(hdrs, status, lit) feed((hdrs), (status), (lit), sizeof(lit) - 1)

static int count_pairs(const struct buf *hdrs)
{
    size_t pos = 0;
    const char *n;
    const char *v;
    int count = 0;

    while (header_next(hdrs, &pos, &n, &v))
        count++;
    return count;
}

static int value_is(const struct buf *hdrs, const char *name, const char *want)
{
    struct buf out;
    int found;
    int same;

    buf_init(&out);
    found = header_value(hdrs, name, &out);
    same = want == NULL ? found == 0 && out.len == 0
                        : found > 0 && out.len == strlen(want) && memcmp(out.data, want, out.len) == 0;
    buf_free(&out);
    return same;
}

static void status_lines(void)
{
    struct buf hdrs;
    long status = -1;

    buf_init(&hdrs);
    FEED(&hdrs, &status, "HTTP/1.1 200 OK\r\n");
    CHECK(status == 200, "status line with reason");
    FEED(&hdrs, &status, "HTTP/2 503 \r\n");
    CHECK(status == 503, "HTTP/2 status line");
    FEED(&hdrs, &status, "HTTP/1.1 429");
    CHECK(status == 429, "status code at the very end of the line (nothing read past it)");
    FEED(&hdrs, &status, "HTTP/1.1 20");
    CHECK(status == 20, "a short code is read as it is");
    FEED(&hdrs, &status, "HTTP/1.1 2000 Too Many Digits\r\n");
    CHECK(status == 0, "more than three digits: no status");
    FEED(&hdrs, &status, "HTTP/1.1 99999999999999999999999");
    CHECK(status == 0, "an endless code: no status, no overflow");
    FEED(&hdrs, &status, "HTTP/1.1");
    CHECK(status == 0, "no space: no status");
    FEED(&hdrs, &status, "HTTP/1.1 OK\r\n");
    CHECK(status == 0, "no digits: no status");
    buf_free(&hdrs);
}

static void header_sets(void)
{
    struct buf hdrs;
    long status = 0;

    buf_init(&hdrs);
    CHECK(value_is(&hdrs, "retry-after", NULL), "empty set: lookup finds nothing");
    CHECK(count_pairs(&hdrs) == 0, "empty set: no pairs");

    FEED(&hdrs, &status, "HTTP/1.1 100 Continue\r\n");
    FEED(&hdrs, &status, "X-Early: 1\r\n");
    FEED(&hdrs, &status, "\r\n");
    FEED(&hdrs, &status, "HTTP/1.1 429 Too Many Requests\r\n");
    CHECK(status == 429 && count_pairs(&hdrs) == 0, "a new status line starts the set again");
    FEED(&hdrs, &status, "Content-Type: application/json\r\n");
    FEED(&hdrs, &status, "Retry-After:\t 7 \t\r\n");
    FEED(&hdrs, &status, "X-Multi: a\r\n");
    FEED(&hdrs, &status, "x-multi:b\n");
    FEED(&hdrs, &status, "X-Empty:\r\n");
    FEED(&hdrs, &status, "x-tail: no line end");
    FEED(&hdrs, &status, "no colon here\r\n");
    FEED(&hdrs, &status, "\r\n");
    CHECK(count_pairs(&hdrs) == 6, "six pairs kept");
    CHECK(value_is(&hdrs, "retry-after", "7"), "names lowercased, values trimmed");
    CHECK(value_is(&hdrs, "x-multi", "a, b"), "repeated names joined with \", \"");
    CHECK(value_is(&hdrs, "x-empty", ""), "an empty value is present");
    CHECK(value_is(&hdrs, "x-tail", "no line end"), "a line without its line end");
    CHECK(value_is(&hdrs, "x-early", NULL), "headers of a 1xx reply are gone");

    FEED(&hdrs, &status, "X-Evil: a\0retry-after\0x\r\n");
    FEED(&hdrs, &status, "X-\0Name: v\r\n");
    CHECK(count_pairs(&hdrs) == 6, "a line holding a NUL is dropped");
    CHECK(value_is(&hdrs, "retry-after", "7"), "a NUL cannot smuggle a header in");
    CHECK(hdrs.data[hdrs.len] == '\0', "the set stays NUL-terminated as every buf");
    buf_free(&hdrs);
}

static void malformed_sets(void)
{
    struct buf hdrs;
    size_t pos = 0;
    const char *n;
    const char *v;

    /* header_next stops at a pair cut short instead of reading past the buf */
    buf_init(&hdrs);
    buf_append(&hdrs,
               "a\0"
               "1\0"
               "b\0",
               6);
    CHECK(header_next(&hdrs, &pos, &n, &v) && strcmp(n, "a") == 0 && strcmp(v, "1") == 0, "first pair");
    CHECK(!header_next(&hdrs, &pos, &n, &v) && pos == 4, "a name without its value ends the walk");
    buf_reset(&hdrs);
    buf_append(&hdrs, "abc", 3);
    pos = 0;
    CHECK(!header_next(&hdrs, &pos, &n, &v), "no NUL at all ends the walk");
    buf_free(&hdrs);
}

static void lua_table(void)
{
    lua_State *L = luaL_newstate();
    struct buf hdrs;
    long status = 0;

    buf_init(&hdrs);
    http_push_headers(L, &hdrs);
    lua_pushnil(L);
    CHECK(lua_istable(L, -2) && lua_next(L, -2) == 0, "empty set: empty table");
    lua_settop(L, 0);

    FEED(&hdrs, &status, "X-Multi: a\r\n");
    FEED(&hdrs, &status, "Retry-After: 3\r\n");
    FEED(&hdrs, &status, "x-multi: b\r\n");
    http_push_headers(L, &hdrs);
    lua_getfield(L, 1, "x-multi");
    CHECK(lua_isstring(L, -1) && strcmp(lua_tostring(L, -1), "a, b") == 0, "table: repeated names joined");
    lua_getfield(L, 1, "retry-after");
    CHECK(lua_isstring(L, -1) && strcmp(lua_tostring(L, -1), "3") == 0, "table: lowercased name");
    lua_close(L);
    buf_free(&hdrs);
}

int main(void)
{
    status_lines();
    header_sets();
    malformed_sets();
    lua_table();
    return unit_finish();
}
