/*
 * test_scan.c: unit tests of the first pass (src/scan.c) through its C interface, the one the engine
 * checks its lines with: core.scan_ids over a real file, then the record it returns (input_arg,
 * input_line_differs, input_end_differs, input_stat) against lines that are and are not the ones read.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>

#include "scan.h"
#include "unit.h"

static char path[] = "/tmp/aigate-test-scan-XXXXXX";

static void write_file(const char *text)
{
    FILE *f = fopen(path, "wb");

    if (f == NULL || fputs(text, f) < 0 || fclose(f) != 0) {
        perror(path);
        exit(2);
    }
}

/* Runs core.scan_ids(path, max_line, done, line_id) with a line_id that names a line "lua-N"; leaves
 * its results on L and returns how many. */
static int scan(lua_State *L, lua_Integer max_line, int with_done)
{
    int top = lua_gettop(L);

    lua_getglobal(L, "core");
    lua_getfield(L, -1, "scan_ids");
    lua_remove(L, -2);
    lua_pushstring(L, path);
    lua_pushinteger(L, max_line);
    if (with_done) {
        lua_newtable(L);
        lua_pushboolean(L, 1);
        lua_setfield(L, -2, "b");
    } else {
        lua_pushnil(L);
    }
    if (luaL_loadstring(L, "local _, n = ... return 'lua-' .. n") != LUA_OK)
        exit(2);
    if (lua_pcall(L, 4, LUA_MULTRET, 0) != LUA_OK) {
        printf("# scan_ids raised: %s\n", lua_tostring(L, -1));
        exit(2);
    }
    return lua_gettop(L) - top;
}

static void test_counts(lua_State *L)
{
    int n;

    write_file("{\"id\":\"a\"}\n\n{\"custom_id\":\"b\"}\n{\"id\":\"a\"}\n{\"id\":1.5}\nnot json\n");
    n = scan(L, 1000, 1);
    CHECK(n == 5, "scan_ids: five results");
    CHECK(lua_tointeger(L, -5) == 3, "total: a, lua-5 (a number only the decoder writes), line-6; not b");
    CHECK(lua_tointeger(L, -4) == 1, "skipped: b, in done");
    CHECK(lua_tointeger(L, -3) == 1, "one duplicate");
    lua_rawgeti(L, -2, 1);
    CHECK(strcmp(lua_tostring(L, -1), "id 'a' on lines 1 and 4") == 0, "the duplicate named with its lines");
    lua_pop(L, 1);
    CHECK(input_lines(input_arg(L, -1)) == 6 && strcmp(input_path(input_arg(L, -1)), path) == 0,
          "the record: six lines (the blank one too), the path");
    lua_pop(L, n);
}

static void test_checks(lua_State *L)
{
    static const char *const lines[] = { "{\"id\":\"a\"}", "", "xxxxxxxxxxxxxxxxxxxx" };
    struct input *in;
    char why[160];
    const char *d;

    write_file("{\"id\":\"a\"}\n\nxxxxxxxxxxxxxxxxxxxx\n");
    scan(L, 10, 0);
    in = input_arg(L, -1);
    CHECK(input_line_differs(in, 1, lines[0], strlen(lines[0]), 0, why, sizeof(why)) == NULL,
          "line 1 as read: no difference");
    CHECK(input_line_differs(in, 2, lines[1], 0, 0, why, sizeof(why)) == NULL, "a blank line is checked too");
    CHECK(input_line_differs(in, 3, NULL, 0, 20, why, sizeof(why)) == NULL,
          "an oversize line: by its length, its bytes never read (NULL)");
    d = input_line_differs(in, 3, NULL, 0, 21, why, sizeof(why));
    CHECK(d && strcmp(d, "line 3 is not the line first read there") == 0,
          "an oversize line of another length");
    d = input_line_differs(in, 1, "{\"id\":\"b\"}", 10, 0, why, sizeof(why));
    CHECK(d && strstr(d, "line 1 is not the line first read there"), "another line 1: why");
    d = input_line_differs(in, 4, "x", 1, 0, why, sizeof(why));
    CHECK(d && strstr(d, "it has a line 4, and had 3 lines when first read"), "a line past the last: why");
    CHECK(input_end_differs(in, 3, 33, why, sizeof(why)) == NULL,
          "the end after line 3, 33 bytes in: as read");
    CHECK(input_end_differs(in, 3, -1, why, sizeof(why)) == NULL, "the end, the bytes not known");
    d = input_end_differs(in, 2, 33, why, sizeof(why));
    CHECK(d && strstr(d, "it ends at line 2, and had 3 lines"), "an end before the last line: why");
    d = input_end_differs(in, 3, 40, why, sizeof(why));
    CHECK(d && strstr(d, "it ends after 40 bytes, and had 33"), "an end at another size: why");
    CHECK(input_stat(in, why, sizeof(why)) == NULL, "input_stat: the file is as read");
    write_file("{\"id\":\"a\"}\n\nxxxxxxxxxxxxxxxxxxxx\nmore\n");
    d = input_stat(in, why, sizeof(why));
    CHECK(d && strstr(d, "its size went from 33 to 38 bytes"), "input_stat: the file grew");
    unlink(path);
    d = input_stat(in, why, sizeof(why));
    CHECK(d && strstr(d, "it cannot be read any more"), "input_stat: the file is gone");
    CHECK(input_line_hash("abc", 3, 0) != input_line_hash("abd", 3, 0) &&
              input_line_hash(NULL, 0, 5) == input_line_hash("", 0, 5) &&
              input_line_hash(NULL, 0, 5) != input_line_hash("", 0, 6),
          "line hashes: of the bytes, or of an oversize line's length");
    lua_pop(L, 5);
}

static void test_refusals(lua_State *L)
{
    int n;

    n = scan(L, 10, 0); /* the file was removed above */
    CHECK(n == 2 && lua_isnil(L, -2) && strstr(lua_tostring(L, -1), "No such file"),
          "a missing file: nil, err");
    lua_pop(L, n);
    strcpy(path, "/tmp");
    n = scan(L, 10, 0);
    CHECK(n == 2 && strstr(lua_tostring(L, -1), "is not a regular file"), "a directory: not a regular file");
    lua_pop(L, n);
}

int main(void)
{
    lua_State *L = luaL_newstate();
    int fd = mkstemp(path);

    if (L == NULL || fd < 0)
        return 2;
    close(fd);
    luaL_openlibs(L);
    lua_newtable(L);
    core_register_scan(L);
    lua_setglobal(L, "core");
    test_counts(L);
    test_checks(L);
    test_refusals(L);
    lua_close(L);
    return unit_finish();
}
