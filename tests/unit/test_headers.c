/*
 * test_headers.c: unit tests of the header sets of src/headers.c. Every line is handed over in a heap
 * copy of its exact length without a NUL after it, as curl's header callback does, so a read past
 * the line shows under the sanitizers (`make asan`).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <curl/curl.h>
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

/* The lines of a curl list, joined with '|'. */
static void list_text(const struct curl_slist *list, struct buf *out)
{
    buf_reset(out);
    for (; list; list = list->next) {
        if (out->len)
            buf_append_char(out, '|');
        buf_append(out, list->data, strlen(list->data));
    }
}

static int list_is(const struct curl_slist *list, const char *want)
{
    struct buf text;
    int same;

    buf_init(&text);
    list_text(list, &text);
    same = text.len == strlen(want) && (text.len == 0 || memcmp(text.data, want, text.len) == 0);
    if (!same)
        printf("# list: %s\n", text.data ? text.data : "");
    buf_free(&text);
    return same;
}

static void request_lists(void)
{
    static struct curl_slist sentinel;
    lua_State *L = luaL_newstate();
    struct curl_slist *list;
    int top;

    list = header_list_append(NULL, "Authorization", 13, "Bearer x", 8);
    list = header_list_append(list, "X-Empty", 7, "", 0);
    list = header_list_append(list, "X-Cut", 5, "a\0b", 3);
    CHECK(list_is(list, "Authorization: Bearer x|X-Empty;|X-Cut: a"),
          "append: name: value, an empty value as name; (curl sends it), cut at a NUL");
    curl_slist_free_all(list);

    lua_pushnil(L);
    top = lua_gettop(L);
    CHECK(header_list_from_table(L, -1, &list) == 0 && list_is(list, "Expect:"), "from nil: Expect: alone");
    CHECK(lua_gettop(L) == top, "from nil: the stack as it was");
    curl_slist_free_all(list);
    lua_pop(L, 1);

    lua_newtable(L);
    lua_pushstring(L, "application/json");
    lua_setfield(L, -2, "Content-Type");
    top = lua_gettop(L);
    CHECK(header_list_from_table(L, top, &list) == 0 &&
              list_is(list, "Content-Type: application/json|Expect:"),
          "from a table: its headers, Expect: last");
    CHECK(lua_gettop(L) == top, "from a table: the stack as it was");
    curl_slist_free_all(list);

    lua_pushinteger(L, 5);
    lua_setfield(L, -2, "X-Number");
    list = &sentinel; /* set to NULL on refusal */
    CHECK(header_list_from_table(L, -1, &list) == -1 && list == NULL,
          "a value that is not a string: -1, no list");
    CHECK(header_table_check(L, -1) == -1 && lua_gettop(L) == top, "check: refused, the stack as it was");
    lua_pop(L, 1);

    lua_newtable(L);
    lua_pushstring(L, "v");
    lua_rawseti(L, -2, 1);
    CHECK(header_table_check(L, -1) == -1, "check: a name that is not a string is refused");
    lua_pop(L, 1);
    lua_pushstring(L, "Accept: */*");
    CHECK(header_table_check(L, -1) == -1, "check: a string is not a table");
    CHECK(header_table_check(L, 10) == 0, "check: none (past the top) is no headers");
    lua_close(L);
}

int main(void)
{
    status_lines();
    header_sets();
    malformed_sets();
    lua_table();
    request_lists();
    return unit_finish();
}
