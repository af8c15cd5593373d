/*
 * tmpl.h: templates with typed holes (src/tmpl.c), as Lua renders them and C fills them.
 *
 * A batch result line is rendered by Lua (lua/aigate/batch/result.lua) as a template: literal text
 * and holes that name a value (the line's id, the reply's status, its raw body, the latency, ...)
 * and say how to write it. Lua fills it for the lines it runs; the engine (src/engine.c) fills the
 * same template for the lines it finishes. C knows no output format: the keys, the order, the number
 * formats and which headers hold a value are all in the template.
 *
 * In Lua a template is an array whose items are strings (literal text) or holes:
 *   { hole = "str" | "int" | "num" | "raw" | "alt", src = "<value name>",
 *     fmt = "%.6f" (num: the format of a value that is not a whole number),
 *     headers = { "name", ... } (the value is the first of these reply headers that has one),
 *     opt = '<text>' (when the value is absent the hole writes nothing, else this text and the value),
 *     yes = { template } (alt: written when the value is present), no = "<text>" (alt: when absent) }
 * An absent value writes null (str, int, num, raw), nothing (opt) or the no text (alt).
 */
#ifndef AIGATE_TMPL_H
#define AIGATE_TMPL_H

#include <stddef.h>

#include <lua.h>

#include "buf.h"

#define TMPL_MAX_HEADERS 8 /* header names one hole may read */
#define TMPL_MAX_DEPTH   4 /* alt inside alt */

enum tmpl_kind { TMPL_LIT, TMPL_STR, TMPL_INT, TMPL_NUM, TMPL_RAW, TMPL_ALT };

struct tmpl;

struct tmpl_op {
    enum tmpl_kind kind;
    int src;    /* index into the names the template was read with */
    char *text; /* TMPL_LIT: the text; opt text; alt: the text when absent */
    size_t len;
    int has_opt; /* the hole writes nothing when its value is absent */
    char fmt[8]; /* TMPL_NUM */
    char *headers[TMPL_MAX_HEADERS];
    int nheaders;
    struct tmpl *yes; /* TMPL_ALT */
};

struct tmpl {
    struct tmpl_op *ops;
    size_t n;
};

/* A value for a hole: absent, bytes, an integer or a number. */
struct tmpl_value {
    char type; /* 0 absent, 's' bytes, 'i' integer, 'd' number */
    const char *s;
    size_t len;
    long long i;
    double d;
};

/* Gives the value of op's source (op->src, and op->headers when it has any). */
typedef void (*tmpl_get_fn)(void *ctx, const struct tmpl_op *op, struct tmpl_value *v);

/* Reads the template at idx of L. names: the value names the filler knows (NULL-terminated); a hole
 * with another name, a bad format or a bad shape raises a Lua error naming what is wrong. */
struct tmpl *tmpl_read(lua_State *L, int idx, const char *const *names);
void tmpl_free(struct tmpl *t);

/* Appends the template filled with the values get gives. */
void tmpl_fill(const struct tmpl *t, struct buf *out, tmpl_get_fn get, void *ctx);

/* JSON text helpers shared by every writer in C (the same escaping as the Lua encoder: see
 * js_quote in jsonscan.h). */
void tmpl_append_int(struct buf *b, long long v);

#endif
