/* test_luamem.c: unit tests of the Lua state's allocator (src/luamem.c). */
#include <stdint.h>
#include <string.h>

#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>

#include "luamem.h"
#include "unit.h"

static int filled_with(const unsigned char *p, size_t n, unsigned char c)
{
    size_t i;

    for (i = 0; i < n; i++)
        if (p[i] != c)
            return 0;
    return 1;
}

static void test_small_blocks_come_back(void)
{
    struct luamem m;
    void *a, *b, *c;

    memset(&m, 0, sizeof(m));
    a = luamem_alloc(&m, NULL, LUA_TTABLE, 56);
    CHECK(a != NULL && ((uintptr_t)a % LUAMEM_GRAIN) == 0, "a small block, aligned");
    CHECK(m.slabs != NULL && m.slab_bytes == LUAMEM_SLAB_MIN, "from a first slab of the least size");
    memset(a, 0xab, 56);
    b = luamem_alloc(&m, NULL, LUA_TSTRING, 60);
    CHECK(b != NULL && b != a, "another block of the same class is another block");
    CHECK(luamem_alloc(&m, b, 60, 0) == NULL, "freeing answers NULL");
    c = luamem_alloc(&m, NULL, LUA_TSTRING, 49);
    CHECK(c == b, "a freed block is the next one of its class");
    CHECK(filled_with(a, 56, 0xab), "a live block is left alone");
    luamem_alloc(&m, a, 56, 0);
    luamem_alloc(&m, c, 49, 0);
    CHECK(luamem_alloc(&m, NULL, 0, 0) == NULL, "nothing asked for: NULL");
    luamem_close(&m);
    CHECK(m.slabs == NULL && m.slab_bytes == 0, "closed: no slab left");
}

static void test_resizing_keeps_the_bytes(void)
{
    struct luamem m;
    unsigned char *p, *q;

    memset(&m, 0, sizeof(m));
    p = luamem_alloc(&m, NULL, 0, 20);
    memset(p, 0x11, 20);
    q = luamem_alloc(&m, p, 20, 30);
    CHECK(q == p, "a resize within the class keeps the block");
    memset(q + 20, 0x11, 10);
    p = luamem_alloc(&m, q, 30, 200);
    CHECK(p != q && filled_with(p, 30, 0x11), "to a larger class: moved, bytes kept");
    memset(p, 0x22, 200);
    q = luamem_alloc(&m, p, 200, 4000);
    CHECK(q != NULL && filled_with(q, 200, 0x22), "to a malloc'd block: bytes kept");
    memset(q, 0x33, 4000);
    p = luamem_alloc(&m, q, 4000, 9000);
    CHECK(p != NULL && filled_with(p, 4000, 0x33), "between malloc'd blocks: bytes kept");
    q = luamem_alloc(&m, p, 9000, 16);
    CHECK(q != NULL && filled_with(q, 16, 0x33), "back to a small block: the bytes that fit kept");
    luamem_alloc(&m, q, 16, 0);
    luamem_close(&m);
}

static void test_every_class_and_growing_slabs(void)
{
    struct luamem m;
    void *blocks[LUAMEM_CLASSES][40];
    size_t c, i, bytes;
    int ok = 1;

    memset(&m, 0, sizeof(m));
    for (c = 0; c < LUAMEM_CLASSES; c++) {
        size_t n = (c + 1) * LUAMEM_GRAIN;
        for (i = 0; i < 40; i++) {
            blocks[c][i] = luamem_alloc(&m, NULL, 0, n);
            if (blocks[c][i] == NULL)
                ok = 0;
            else
                memset(blocks[c][i], (int)(c + i), n);
        }
    }
    CHECK(ok, "40 blocks of every class");
    for (c = 0; c < LUAMEM_CLASSES; c++)
        for (i = 0; i < 40; i++)
            if (!filled_with(blocks[c][i], (c + 1) * LUAMEM_GRAIN, (unsigned char)(c + i)))
                ok = 0;
    CHECK(ok, "no two blocks overlap");
    CHECK(m.slab_size[LUAMEM_CLASSES - 1] > LUAMEM_SLAB_MIN,
          "a class that needed more slabs gets larger ones");
    bytes = m.slab_bytes;
    for (c = 0; c < LUAMEM_CLASSES; c++)
        for (i = 0; i < 40; i++)
            luamem_alloc(&m, blocks[c][i], (c + 1) * LUAMEM_GRAIN, 0);
    for (c = 0; c < LUAMEM_CLASSES; c++)
        for (i = 0; i < 40; i++)
            blocks[c][i] = luamem_alloc(&m, NULL, 0, (c + 1) * LUAMEM_GRAIN);
    CHECK(m.slab_bytes == bytes, "the same blocks again: no new slab");
    for (c = 0; c < LUAMEM_CLASSES; c++)
        for (i = 0; i < 40; i++)
            luamem_alloc(&m, blocks[c][i], (c + 1) * LUAMEM_GRAIN, 0);
    for (i = 0; i < 40; i++)
        blocks[0][i] = luamem_alloc(&m, NULL, 0, LUAMEM_MAX + 1 + i);
    CHECK(m.slab_bytes == bytes, "larger blocks come from malloc");
    for (i = 0; i < 40; i++)
        luamem_alloc(&m, blocks[0][i], LUAMEM_MAX + 1 + i, 0);
    luamem_close(&m);
}

/* A Lua state on the allocator: strings, tables, closures and coroutines made, dropped, collected. */
static void test_a_lua_state(void)
{
    struct luamem m;
    lua_State *L;
    const char *chunk =
        "local t, n = {}, 0\n"
        "for i = 1, 20000 do\n"
        "  t[i % 500] = { i, tostring(i) .. string.rep('x', i % 700), function() return i end }\n"
        "  local co = coroutine.wrap(function(a) local b = coroutine.yield(a + 1) return a + b end)\n"
        "  n = n + co(i) + co(1)\n"
        "end\n"
        "collectgarbage()\n"
        "return n, t[7][1], t[7][3](), #t[499][2]\n";

    memset(&m, 0, sizeof(m));
    L = lua_newstate(luamem_alloc, &m);
    CHECK(L != NULL, "a state");
    if (L == NULL)
        return;
    luaL_openlibs(L);
    CHECK(luaL_dostring(L, chunk) == LUA_OK, "a chunk that allocates runs");
    CHECK(lua_tointeger(L, -4) == 400060000 && lua_tointeger(L, -3) == 19507 &&
              lua_tointeger(L, -2) == 19507 && lua_tointeger(L, -1) == 5 + (19999 % 700),
          "with the right results");
    lua_close(L);
    luamem_close(&m);
}

int main(void)
{
    test_small_blocks_come_back();
    test_resizing_keeps_the_bytes();
    test_every_class_and_growing_slabs();
    test_a_lua_state();
    return unit_finish();
}
