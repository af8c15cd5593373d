/*
 * scan.c: the first pass of `aigate batch` over an input file (core.scan_ids), the record of what it
 * read (struct input), and the id rule's Lua bindings (core.line_id, core.utf8_bad). See scan.h.
 */
#include "scan.h"

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include <lauxlib.h>
#include <lua.h>

#include "buf.h"
#include "idset.h"
#include "jsonscan.h"
#include "linereader.h"

/* ---- the input as the first pass read it ------------------------------------------------------ */

/* What the first pass saw of an input file, for the run to check that it reads the same lines: a
 * hash of each line (blank ones too) and the file's identity, size and modification time. The run
 * stops at the first line that differs, at a line past the last one, at an end before it, and when
 * the file's size or time moves: a line the duplicate check has not seen is never sent. A hash is
 * 4 bytes (4 MB for a million lines, in blocks that never move): a changed line it misses (one in 4
 * billion) still changed the file's time, which stops the batch a moment later. */
#define INPUT_MT "aigate.input"

#define HASH_BLOCK 65536 /* hashes per block: blocks never move, so a growing input costs no copy */

struct input {
    uint32_t **blocks; /* the hash of line i + 1 is blocks[i / HASH_BLOCK][i % HASH_BLOCK] */
    size_t nblocks;
    size_t n;
    dev_t dev;
    ino_t ino;
    off_t size;
    struct timespec mtime;
    char *path;
};

/* A hash of a line's bytes (of its length alone for a line longer than max_line, which is never
 * held): 8 bytes at a time, to cost little beside reading the line. */
uint32_t input_line_hash(const char *s, size_t len, size_t oversize)
{
    uint64_t h = 0x9e3779b97f4a7c15ULL ^ (uint64_t)(oversize ? oversize : len);
    size_t i = 0;

    if (oversize) {
        h *= 0xc4ceb9fe1a85ec53ULL;
        return (uint32_t)(h ^ (h >> 32));
    }
    for (; i + 8 <= len; i += 8) {
        uint64_t w;
        memcpy(&w, s + i, 8);
        h = (h ^ w) * 0xff51afd7ed558ccdULL;
        h ^= h >> 32;
    }
    if (i < len) {
        uint64_t w = 0;
        memcpy(&w, s + i, len - i);
        h = (h ^ w) * 0xc4ceb9fe1a85ec53ULL;
        h ^= h >> 29;
    }
    return (uint32_t)(h ^ (h >> 32));
}

static void input_add(struct input *in, uint32_t h)
{
    if (in->n == in->nblocks * HASH_BLOCK) {
        uint32_t **blocks = realloc(in->blocks, (in->nblocks + 1) * sizeof(*blocks));
        uint32_t *block = malloc(HASH_BLOCK * sizeof(*block));
        if (blocks == NULL || block == NULL) {
            fputs("aigate: out of memory\n", stderr);
            abort();
        }
        blocks[in->nblocks++] = block;
        in->blocks = blocks;
    }
    in->blocks[in->n / HASH_BLOCK][in->n % HASH_BLOCK] = h;
    in->n++;
}

static void input_set_stat(struct input *in, const struct stat *st)
{
    in->dev = st->st_dev;
    in->ino = st->st_ino;
    in->size = st->st_size;
    in->mtime = st->st_mtim;
}

const char *input_stat_differs(const struct input *in, const struct stat *st, char *why, size_t size)
{
    if (st->st_dev != in->dev || st->st_ino != in->ino)
        return "it was replaced by another file";
    if (st->st_size != in->size) {
        snprintf(why, size, "its size went from %lld to %lld bytes", (long long)in->size,
                 (long long)st->st_size);
        return why;
    }
    if (st->st_mtim.tv_sec != in->mtime.tv_sec || st->st_mtim.tv_nsec != in->mtime.tv_nsec)
        return "it was written to (its modification time moved)";
    return NULL;
}

const char *input_line_differs(const struct input *in, long long lineno, const char *line, size_t len,
                               size_t oversize, char *why, size_t size)
{
    if (lineno < 1 || (size_t)lineno > in->n) {
        snprintf(why, size, "it has a line %lld, and had %zu lines when first read (lines were added)",
                 (long long)lineno, in->n);
        return why;
    }
    if (in->blocks[(lineno - 1) / HASH_BLOCK][(lineno - 1) % HASH_BLOCK] !=
        input_line_hash(line, len, oversize)) {
        snprintf(why, size, "line %lld is not the line first read there", (long long)lineno);
        return why;
    }
    return NULL;
}

const char *input_end_differs(const struct input *in, long long lineno, long long bytes, char *why,
                              size_t size)
{
    if (lineno >= 0 && (size_t)lineno < in->n) {
        snprintf(why, size, "it ends at line %lld, and had %zu lines when first read (it was cut)",
                 (long long)lineno, in->n);
        return why;
    }
    if (bytes >= 0 && bytes != (long long)in->size) {
        snprintf(why, size, "it ends after %lld bytes, and had %lld when first read", bytes,
                 (long long)in->size);
        return why;
    }
    return NULL;
}

const char *input_stat(const struct input *in, char *why, size_t size)
{
    struct stat st;

    if (stat(in->path, &st) != 0) {
        snprintf(why, size, "it cannot be read any more (%s)", strerror(errno));
        return why;
    }
    return input_stat_differs(in, &st, why, size);
}

struct input *input_arg(lua_State *L, int idx)
{
    return luaL_checkudata(L, idx, INPUT_MT);
}

size_t input_lines(const struct input *in)
{
    return in->n;
}

const char *input_path(const struct input *in)
{
    return in->path;
}

/* input:check(lineno, line[, oversize]) -> true, or false, why. */
static int input_check(lua_State *L)
{
    struct input *in = input_arg(L, 1);
    lua_Integer lineno = luaL_checkinteger(L, 2);
    size_t len;
    const char *line = luaL_checklstring(L, 3, &len);
    lua_Integer oversize = luaL_optinteger(L, 4, 0);
    char why[160];
    const char *d =
        input_line_differs(in, lineno, line, len, oversize > 0 ? (size_t)oversize : 0, why, sizeof(why));

    lua_pushboolean(L, d == NULL);
    if (d == NULL)
        return 1;
    lua_pushstring(L, d);
    return 2;
}

/* input:check_end(lineno, bytes) -> true, or false, why: the input ended after line lineno. */
static int input_check_end(lua_State *L)
{
    struct input *in = input_arg(L, 1);
    char why[160];
    const char *d = input_end_differs(in, luaL_checkinteger(L, 2), (long long)luaL_optinteger(L, 3, -1), why,
                                      sizeof(why));

    lua_pushboolean(L, d == NULL);
    if (d == NULL)
        return 1;
    lua_pushstring(L, d);
    return 2;
}

/* input:unchanged() -> true, or false, why: the file at the input's path is still the one read. */
static int input_unchanged(lua_State *L)
{
    char why[160];
    const char *d = input_stat(input_arg(L, 1), why, sizeof(why));

    lua_pushboolean(L, d == NULL);
    if (d == NULL)
        return 1;
    lua_pushstring(L, d);
    return 2;
}

/* input.lines: how many lines the first pass read (blank ones included). */
static int input_index(lua_State *L)
{
    struct input *in = input_arg(L, 1);
    const char *key = luaL_checkstring(L, 2);

    if (strcmp(key, "lines") == 0) {
        lua_pushinteger(L, (lua_Integer)in->n);
        return 1;
    }
    lua_getmetatable(L, 1);
    lua_getfield(L, -1, key);
    return 1;
}

static int input_gc(lua_State *L)
{
    struct input *in = input_arg(L, 1);
    size_t i;

    for (i = 0; i < in->nblocks; i++)
        free(in->blocks[i]);
    free(in->blocks);
    free(in->path);
    memset(in, 0, sizeof(*in));
    return 0;
}

static struct input *input_new(lua_State *L, const char *path)
{
    static const luaL_Reg methods[] = {
        { "check", input_check },
        { "check_end", input_check_end },
        { "unchanged", input_unchanged },
        { "__index", input_index },
        { "__gc", input_gc },
        { NULL, NULL },
    };
    struct input *in = lua_newuserdatauv(L, sizeof(*in), 0);

    memset(in, 0, sizeof(*in));
    if (luaL_newmetatable(L, INPUT_MT))
        luaL_setfuncs(L, methods, 0);
    lua_setmetatable(L, -2);
    in->path = strdup(path);
    if (in->path == NULL)
        luaL_error(L, "out of memory");
    return in;
}

/* ---- the first pass over an input file: ids, duplicates, the total ---------------------------- */

/* "line-N": the id of a line that has none (or whose id cannot be read). */
static void line_name(struct buf *out, long long lineno)
{
    char text[32];
    int n = snprintf(text, sizeof(text), "line-%lld", lineno);

    buf_reset(out);
    buf_append(out, text, (size_t)n);
}

/* The id of a line by the rule of batch input lines (jsonscan.h, and aigate.batch's line_id, which
 * completes it): 1 with the id in out: the "custom_id", else the "id", else "line-N", also for a line
 * that fails before its id can be read; 0 when only the decoder can tell (a number as Lua writes it). */
static int rule_line_id(const char *line, size_t len, long long lineno, struct buf *out)
{
    struct js_line r;

    js_line_read(line, len, &r, out);
    if (r.id == JS_ID_NUMBER)
        return 0;
    if (r.id != JS_ID_TEXT)
        line_name(out, lineno);
    return 1;
}

/* The message of a repeated key: the key as the line writes it, cut (at a character) when long. */
static void push_dup_message(lua_State *L, const struct js_line *r)
{
    size_t n = r->key_len;
    const char *more = "";

    if (n > JS_MAX_KEY_SHOWN) {
        n = JS_MAX_KEY_SHOWN;
        while (n > 0 && ((unsigned char)r->key[n] & 0xc0) == 0x80)
            n--; /* not inside a UTF-8 character */
        more = "...";
    }
    lua_pushlstring(L, r->key, n);
    lua_pushfstring(L, "duplicate key %s%s (again at byte offset %I): a key may appear once in an object",
                    lua_tostring(L, -1), more, (lua_Integer)r->offset);
    lua_remove(L, -2);
}

/* core.utf8_bad(s) -> nil when s is valid UTF-8, else the position (from 1) of its first byte that is
 * not: the check of every batch result line, at a few instructions per 8 bytes of ASCII. */
static int core_utf8_bad(lua_State *L)
{
    size_t len;
    const char *s = luaL_checklstring(L, 1, &len);
    size_t at = js_utf8_check(s, len);

    if (at == len)
        lua_pushnil(L);
    else
        lua_pushinteger(L, (lua_Integer)at + 1);
    return 1;
}

/* core.line_id(line, lineno) -> id, code, message: the rule of batch input lines, as far as C tells
 * it (aigate.batch's line_id completes it). id: the line's id, or false when only the decoder can
 * read it (a number as Lua writes it); code, message: what is wrong with the line, nil when nothing
 * (message nil for invalid_json: the decoder's own says where). */
static int core_line_id(lua_State *L)
{
    size_t len;
    const char *line = luaL_checklstring(L, 1, &len);
    lua_Integer lineno = luaL_checkinteger(L, 2);
    struct js_line r;
    struct buf id;
    char text[128];

    buf_init(&id);
    js_line_read(line, len, &r, &id);
    if (r.id == JS_ID_TEXT)
        lua_pushlstring(L, id.data, id.len);
    else if (r.id == JS_ID_NUMBER)
        lua_pushboolean(L, 0);
    else
        lua_pushfstring(L, "line-%I", lineno);
    buf_free(&id);
    switch (r.problem) {
    case JS_OK:
        if (r.id != JS_ID_BAD)
            return 1;
        lua_pushliteral(L, "invalid_line");
        lua_pushfstring(L, "'%s' must be a non-empty string or a number", r.id_field);
        return 3;
    case JS_NUL:
        lua_pushliteral(L, "invalid_json");
        lua_pushfstring(L, "not valid JSON (a NUL byte at byte offset %I)", (lua_Integer)r.offset);
        return 3;
    case JS_INVALID:
        lua_pushliteral(L, "invalid_json");
        return 2;
    case JS_NOT_OBJECT:
        lua_pushliteral(L, "invalid_line");
        lua_pushliteral(L, "not a JSON object");
        return 3;
    case JS_BAD_UTF8:
        lua_pushliteral(L, "invalid_utf8");
        snprintf(text, sizeof(text), "not valid UTF-8 (byte 0x%02x at byte offset %llu)",
                 (unsigned)(unsigned char)line[r.offset], (unsigned long long)r.offset);
        lua_pushstring(L, text);
        return 3;
    case JS_DUP_KEY:
        lua_pushliteral(L, "duplicate_key");
        push_dup_message(L, &r);
        return 3;
    }
    return 1;
}

/* core.scan_ids(path, max_line, done, line_id) -> total, skipped, ndup, dups, input; or nil, err.
 * The first pass of `aigate batch` over a file: every line's id by the rule of batch input lines
 * (rule_line_id, and line_id(line, lineno) in Lua for the lines only the decoder can tell), total =
 * lines to run (first occurrences not in done), skipped = first occurrences in done, ndup duplicates,
 * dups the first ten as "id 'x' on lines a and b"; input: what was read (struct input), for the run
 * to check against. */
static int core_scan_ids(lua_State *L)
{
    struct line_reader rd;
    struct idset set;
    struct buf id;
    struct input *in;
    struct stat st0, st1;
    const char *path = luaL_checkstring(L, 1);
    size_t max_line = (size_t)luaL_checkinteger(L, 2);
    lua_Integer total = 0, skipped = 0, ndup = 0;
    int has_done;
    int fd;
    int rc;

    has_done = lua_istable(L, 3);
    luaL_checktype(L, 4, LUA_TFUNCTION);
    lua_settop(L, 4);
    lua_newtable(L);         /* 5: dups */
    in = input_new(L, path); /* 6 */
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        lua_pushnil(L);
        lua_pushfstring(L, "%s: %s", path, strerror(errno));
        return 2;
    }
    if (fstat(fd, &st0) != 0) {
        int err = errno;
        close(fd);
        lua_pushnil(L);
        lua_pushfstring(L, "%s: %s", path, strerror(err));
        return 2;
    }
    if (!S_ISREG(st0.st_mode)) {
        /* a pipe (say <(cmd)) would be empty for the run once the first pass has read it */
        close(fd);
        lua_pushnil(L);
        lua_pushfstring(L, "%s is not a regular file: give it on standard input ('-') instead", path);
        return 2;
    }
    line_reader_init(&rd, fd, max_line);
    idset_init(&set);
    buf_init(&id);
    for (;;) {
        const char *line;
        size_t len;
        size_t oversize;
        lua_Integer first;

        rc = line_reader_next(&rd, &line, &len, &oversize);
        if (rc == -2) {
            errno = EAGAIN; /* not on a regular file; and -2 means out of memory below */
            rc = -1;
        }
        if (rc <= 0)
            break;
        input_add(in, input_line_hash(line, len, oversize));
        if (oversize) {
            line_name(&id, rd.lineno);
        } else if (line_is_blank(line, len)) {
            continue;
        } else if (!rule_line_id(line, len, rd.lineno, &id)) {
            size_t n;
            const char *s;
            lua_pushvalue(L, 4);
            lua_pushlstring(L, line, len);
            lua_pushinteger(L, rd.lineno);
            if (lua_pcall(L, 2, 1, 0) != LUA_OK) {
                rc = -3;
                break;
            }
            s = lua_tolstring(L, -1, &n);
            buf_reset(&id);
            buf_append(&id, s ? s : "", s ? n : 0);
            lua_pop(L, 1);
        }
        first = idset_add(&set, id.data ? id.data : "", id.len, rd.lineno);
        if (first < 0) {
            rc = -2;
            break;
        }
        if (first > 0) {
            ndup++;
            if (ndup <= 10) {
                lua_pushfstring(L, "id '%s' on lines %I and %I", id.data, first, rd.lineno);
                lua_rawseti(L, 5, (lua_Integer)ndup);
            }
            continue;
        }
        if (has_done) {
            lua_pushlstring(L, id.data ? id.data : "", id.len);
            if (lua_rawget(L, 3) != LUA_TNIL && lua_toboolean(L, -1))
                skipped++;
            else
                total++;
            lua_pop(L, 1);
        } else {
            total++;
        }
    }
    if (rc == 0) {
        /* Read to its end: what was read is what the file held then, or it changed meanwhile. */
        char why[160];
        const char *d;
        if (fstat(fd, &st1) != 0) {
            rc = -1;
        } else {
            input_set_stat(in, &st0);
            d = input_stat_differs(in, &st1, why, sizeof(why));
            if (d == NULL && rd.consumed != (long long)st1.st_size)
                d = "it changed while it was read";
            if (d) {
                lua_pushfstring(L, "%s changed while it was read (%s): run again once it is complete", path,
                                d);
                rc = -3;
            }
        }
    }
    close(fd);
    line_reader_free(&rd);
    buf_free(&id);
    idset_free(&set);
    if (rc == -3) {
        lua_pushnil(L);
        lua_insert(L, -2); /* nil, the error of line_id */
        return 2;
    }
    if (rc < 0) {
        lua_pushnil(L);
        lua_pushstring(L, rc == -2 ? "out of memory" : strerror(errno));
        return 2;
    }
    lua_pushinteger(L, total);
    lua_pushinteger(L, skipped);
    lua_pushinteger(L, ndup);
    lua_pushvalue(L, 5);
    lua_pushvalue(L, 6);
    return 5;
}

void core_register_scan(lua_State *L)
{
    static const luaL_Reg funcs[] = {
        { "scan_ids", core_scan_ids },
        { "line_id", core_line_id },
        { "utf8_bad", core_utf8_bad },
        { NULL, NULL },
    };

    luaL_setfuncs(L, funcs, 0);
}
