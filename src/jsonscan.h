/*
 * jsonscan.h: JSON scanners that read text in place, without Lua (src/jsonscan.c).
 *
 * Two readers, for two jobs:
 * - a strict scanner (RFC 8259, strings of valid UTF-8) driven by callbacks, with which the batch
 *   engine (src/engine.c) reads the shape of the lines it sends itself (src/lineshape.c) and the
 *   replies whose bytes it copies into result lines as they are (src/reply.c): whatever it accepts is
 *   JSON any decoder reads the same way;
 * - js_line_read, the C half of the id rule of `aigate batch` input lines: it reads a line exactly as
 *   the decoder of the run does (lua-cjson with decode_invalid_numbers off), so that the first pass
 *   and the run agree on every line's id, and finds what that decoder cannot see (duplicate keys,
 *   bytes that are not UTF-8, NUL bytes). tests/fuzz/fuzz_line_id.c checks it against lua-cjson.
 */
#ifndef AIGATE_JSONSCAN_H
#define AIGATE_JSONSCAN_H

#include <stddef.h>
#include <stdint.h>

#include "buf.h"

#define JS_STRICT_DEPTH  900  /* deeper texts are refused by the strict scanner (cjson's limit is 1000) */
#define JS_LINE_DEPTH    1000 /* lua-cjson's decode_max_depth */
#define JS_MAX_INT_TEXT  15   /* longest integer text that is exact in a double */
#define JS_MAX_KEY_SHOWN 40   /* bytes of a duplicate key an error message quotes */

/* ---- the strict scanner ---------------------------------------------------------------------- */

/* A string or number token: where its text is, and what it needs. */
struct js_token {
    const char *start; /* the string with its quotes, or the number */
    size_t len;
    int escaped;   /* a string with a backslash or a DEL byte (its text is not the JSON we would write) */
    int is_int;    /* a number without fraction or exponent */
    int is_string; /* a string (else a number, or nothing) */
};

struct js_scan {
    const char *p;
    const char *end;
    int depth;
};

/* The members of the object at s->p (a '{'): member(ctx, s, key) is called at each value, which it
 * must scan (with js_scan_value or its own scanner). 0, or -1 when invalid or refused by member. */
typedef int (*js_member_fn)(void *ctx, struct js_scan *s, const struct js_token *key);
/* The elements of the array at s->p (a '['): element(ctx, s, index) scans each. */
typedef int (*js_element_fn)(void *ctx, struct js_scan *s, int index);

void js_skip_ws(struct js_scan *s);
/* Any value at s->p (whitespace skipped before, not after). tok (may be NULL) gets a string or number
 * token; *kind gets its first character ('{', '[', '"', 'n', 't', 'f' or '0' for numbers). */
int js_scan_value(struct js_scan *s, struct js_token *tok, char *kind);
int js_scan_items(struct js_scan *s, js_member_fn member, js_element_fn element, void *ctx);
/* A whole text that is one JSON object (whitespace around it allowed), its members by member. */
int js_scan_whole_object(const char *text, size_t len, js_member_fn member, void *ctx);
/* The text of an object key known to have no escapes equals name. */
int js_key_is(const struct js_token *key, const char *name);
/* An integer as the decoder gives it back: no fraction, exponent or "-0", exact in a double. */
int js_plain_int(const struct js_token *v, char kind);
/* The length of the UTF-8 character at p (1 to 4), or 0 when the bytes there are not one (overlong
 * forms, surrogates and code points past U+10FFFF are not). */
size_t js_utf8_char(const unsigned char *p, const unsigned char *end);

/* The offset of the first byte of s[0..len) that is not part of valid UTF-8 (as js_utf8_char
 * reads it), or len when all of it is. ASCII runs go 8 bytes at a time. */
size_t js_utf8_check(const char *s, size_t len);

/* FNV-1a of s[0..len): the hash of keys within a line and of ids across lines. */
uint32_t js_hash(const char *s, size_t len);

/* Appends the bytes a JSON string token (tok[0..len), quotes included) stands for, read by the same
 * code as js_line_read's strings. 0, or -1 when the decoder refuses it (a \u escape of a lone
 * surrogate, which no UTF-8 text can hold, or a token that is not one string). */
int js_unescape(const char *tok, size_t len, struct buf *out);

/* ---- batch input lines, as the decoder reads them -------------------------------------------- */

enum js_problem {
    JS_OK = 0,
    JS_NUL,        /* a NUL byte at offset (the decoder would stop there) */
    JS_INVALID,    /* the decoder refuses the line; offset: where this scanner stopped */
    JS_NOT_OBJECT, /* valid JSON, but not an object */
    JS_BAD_UTF8,   /* a string holds a byte at offset that is not UTF-8 */
    JS_DUP_KEY,    /* an object has a key twice: offset of the second; key, key_len: it as written */
};

enum js_id_kind {
    JS_ID_NONE,    /* neither "custom_id" nor "id", or both null: the line's number names it */
    JS_ID_TEXT,    /* the id's bytes are in the buffer given */
    JS_ID_BAD,     /* the field is not a non-empty string or a number (id_field says which) */
    JS_ID_NUMBER,  /* a number whose text as Lua writes it only the decoder can tell */
    JS_ID_UNKNOWN, /* not determinable: the field is repeated, or its string is not UTF-8 */
};

struct js_line {
    enum js_problem problem;
    size_t offset;
    const char *key; /* JS_DUP_KEY */
    size_t key_len;
    enum js_id_kind id;
    const char *id_field; /* "custom_id" or "id" (JS_ID_TEXT, BAD, NUMBER, UNKNOWN) */
    size_t members;       /* keys in all objects of the line, repeated ones included */
};

/* Reads line (len bytes) as lua-cjson's decode does with decode_invalid_numbers off. Problems are
 * reported in the order of enum js_problem, the first only; the id is read unless the problem is
 * JS_NUL, JS_INVALID or JS_NOT_OBJECT (then it is JS_ID_NONE). id gets the id's bytes for
 * JS_ID_TEXT. */
void js_line_read(const char *line, size_t len, struct js_line *r, struct buf *id);

#endif
