/* test_tmpl.c: unit tests of templates with typed holes (src/tmpl.c). */
#include <string.h>

#include <lauxlib.h>
#include <lualib.h>

#include "tmpl.h"
#include "unit.h"

static const char *const NAMES[] = { "s", "i", "d", "raw", "absent", "hdr", NULL };

/* The values: s a string, i an integer, d a number, raw bytes; absent never; hdr from "headers". */
static void get(void *ctx, const struct tmpl_op *op, struct tmpl_value *v)
{
    const double *d = ctx;

    if (op->nheaders > 0) {
        if (strcmp(op->headers[op->nheaders - 1], "x-present") == 0) {
            v->type = 's';
            v->s = "h/v\"";
            v->len = 4;
        }
        return;
    }
    switch (op->src) {
    case 0:
        v->type = 's';
        v->s = "a\"b\n";
        v->len = 4;
        break;
    case 1:
        v->type = 'i';
        v->i = -42;
        break;
    case 2:
        v->type = 'd';
        v->d = *d;
        break;
    case 3:
        v->type = 's';
        v->s = "{\"x\":[1]}";
        v->len = 9;
        break;
    default:
        break;
    }
}

/* The template the Lua chunk returns, filled; "ERR: message" when reading it raises. */
static const char *filled(lua_State *L, const char *chunk, double d, struct buf *out)
{
    struct tmpl *t;

    buf_reset(out);
    if (luaL_dostring(L, chunk) != LUA_OK)
        return lua_tostring(L, -1);
    t = tmpl_read(L, -1, NAMES);
    lua_settop(L, 0);
    tmpl_fill(t, out, get, &d);
    buf_append_char(out, '\0');
    tmpl_free(t);
    return out->data;
}

/* Does reading the template the chunk returns raise? (tmpl_read runs under lua_pcall.) */
static int read_fails(lua_State *L, const char *chunk)
{
    int rc;

    lua_getglobal(L, "read_template");
    if (luaL_dostring(L, chunk) != LUA_OK)
        return 0;
    rc = lua_pcall(L, 1, 0, 0);
    lua_settop(L, 0);
    return rc != LUA_OK;
}

static int l_read_template(lua_State *L)
{
    tmpl_free(tmpl_read(L, 1, NAMES));
    return 0;
}

int main(void)
{
    lua_State *L = luaL_newstate();
    struct buf out;

    luaL_openlibs(L);
    lua_register(L, "read_template", l_read_template);
    buf_init(&out);
    CHECK(strcmp(filled(L, "return {'a', 'b'}", 0, &out), "ab") == 0, "literals only");
    CHECK(strcmp(filled(L, "return {'[', {hole='str', src='s'}, ']'}", 0, &out), "[\"a\\\"b\\n\"]") == 0,
          "str: the value quoted");
    CHECK(strcmp(filled(L, "return {{hole='int', src='i'}}", 0, &out), "-42") == 0, "int: an integer");
    CHECK(strcmp(filled(L, "return {{hole='num', src='d', fmt='%.6f'}}", 0.25, &out), "0.250000") == 0,
          "num: a fraction in its format");
    CHECK(strcmp(filled(L, "return {{hole='num', src='d', fmt='%.6f'}}", 3.0, &out), "3") == 0,
          "num: a whole number as an integer");
    CHECK(strcmp(filled(L, "return {{hole='num', src='d', fmt='%.14g'}}", 0.1 + 0.2, &out), "0.3") == 0,
          "num: %.14g");
    CHECK(strcmp(filled(L, "return {{hole='raw', src='raw'}}", 0, &out), "{\"x\":[1]}") == 0,
          "raw: as it is");
    CHECK(strcmp(filled(L, "return {'a', {hole='str', src='absent'}, 'b'}", 0, &out), "anullb") == 0,
          "an absent value: null");
    CHECK(strcmp(filled(L, "return {'a', {hole='str', src='absent', opt=',\"k\":'}, 'b'}", 0, &out), "ab") ==
              0,
          "an absent value with opt: nothing");
    CHECK(strcmp(filled(L, "return {'a', {hole='int', src='i', opt=',\"k\":'}}", 0, &out), "a,\"k\":-42") ==
              0,
          "a present value with opt: the text and the value");
    CHECK(strcmp(filled(L, "return {{hole='alt', src='i', yes={'{', {hole='int', src='i'}, '}'}, no='null'}}",
                        0, &out),
                 "{-42}") == 0,
          "alt: yes when present");
    CHECK(strcmp(filled(L, "return {{hole='alt', src='absent', yes={'{'}, no='null'}}", 0, &out), "null") ==
              0,
          "alt: no when absent");
    CHECK(strcmp(filled(L, "return {{hole='str', src='hdr', headers={'x-missing', 'x-present'}}}", 0, &out),
                 "\"h/v\\\"\"") == 0,
          "headers: the value of the first header there");
    CHECK(strcmp(filled(L, "return {{hole='str', src='hdr', headers={'x-missing'}}}", 0, &out), "null") == 0,
          "headers: null when none is there");
    CHECK(read_fails(L, "return {{hole='str', src='nope'}}"),
          "a value name the filler does not know is refused");
    CHECK(read_fails(L, "return {{hole='what', src='s'}}"), "an unknown kind is refused");
    CHECK(read_fails(L, "return {{hole='num', src='d'}}"), "num without a format is refused");
    CHECK(read_fails(L, "return {{hole='num', src='d', fmt='%s'}}"),
          "a format that is not %.Nf or %.Ng is refused");
    CHECK(read_fails(L, "return {{hole='num', src='d', fmt='%.6f%n'}}"),
          "a format with more in it is refused");
    CHECK(read_fails(L, "return {{hole='alt', src='i', no='x'}}"), "alt without yes is refused");
    CHECK(read_fails(L, "return {1}"), "an item that is neither text nor a hole is refused");
    CHECK(read_fails(
              L, "return {{hole='alt', src='i', no='', yes={{hole='alt', src='i', no='', yes={{hole='alt', "
                 "src='i', no='', yes={{hole='alt', src='i', no='', yes={{hole='alt', src='i', no='', "
                 "yes={}}}}}}}}}}}"),
          "templates nested too deep are refused");
    buf_free(&out);
    lua_close(L);
    return unit_finish();
}
