/*
 * jsonscan.c: the JSON scanners of jsonscan.h: the strict one the batch engine copies bytes with,
 * and js_line_read, the C half of the id rule of batch input lines.
 *
 * js_line_read follows lua-cjson 2.1's decoder step by step (json_next_token and its helpers), with
 * decode_invalid_numbers off as aigate.batch sets it: whitespace is space, tab, CR and LF; strings
 * take any byte but NUL, and the escapes \" \\ \/ \b \f \n \r \t \uXXXX, a surrogate only as a high
 * one followed by a low one; numbers start with '-' or a digit, a '0' followed by a digit or an 'x'
 * is refused, and the rest is what strtod reads: digits with at most one '.' and at least one digit,
 * then an exponent when it has digits (so "1." and "-.5" are numbers, ".5" is not); the literals
 * are lowercase; nesting past 1000 is refused. Anything else is the decoder refusing the line.
 */
#include "jsonscan.h"

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- the strict scanner ---------------------------------------------------------------------- */

/* Strings are read 8 bytes at a time while none of them needs a look: a word w has a byte b when
 * has_zero(w ^ (b repeated)), and a byte below n (n <= 0x80, no byte of w at or past 0x80) when
 * has_below(w, n). Both are exact as to whether there is one. */
#define ONES            0x0101010101010101ULL
#define HIGHS           0x8080808080808080ULL
#define has_zero(w)     (((w)-ONES) & ~(w)&HIGHS)
#define has_below(w, n) (((w)-ONES * (n)) & ~(w)&HIGHS)

static uint64_t word_at(const char *p)
{
    uint64_t w;

    memcpy(&w, p, sizeof(w));
    return w;
}

/* None of the 8 bytes at p is '"', '\\' or past 0x7f (what a string of a batch line takes as it is). */
static int plain_word(uint64_t w)
{
    return !((w & HIGHS) | has_zero(w ^ (ONES * '"')) | has_zero(w ^ (ONES * '\\')));
}

/* ... nor a control byte or DEL (what the strict scanner takes as it is). */
static int strict_word(uint64_t w)
{
    return plain_word(w) && !has_below(w, 0x20) && !has_zero(w ^ (ONES * 0x7f));
}

void js_skip_ws(struct js_scan *s)
{
    while (s->p < s->end && (*s->p == ' ' || *s->p == '\t' || *s->p == '\n' || *s->p == '\r'))
        s->p++;
}

static int hexval(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

size_t js_utf8_char(const unsigned char *p, const unsigned char *end)
{
    unsigned c = p[0];
    size_t n;
    size_t i;

    if (c < 0x80)
        return 1;
    if (c < 0xc2)
        return 0; /* a continuation byte, or an overlong form of U+0000..U+007F */
    n = c < 0xe0 ? 2 : c < 0xf0 ? 3 : c < 0xf5 ? 4 : 0;
    if (n == 0 || (size_t)(end - p) < n)
        return 0;
    for (i = 1; i < n; i++)
        if ((p[i] & 0xc0) != 0x80)
            return 0;
    if ((c == 0xe0 && p[1] < 0xa0) || (c == 0xf0 && p[1] < 0x90))
        return 0; /* overlong */
    if (c == 0xed && p[1] > 0x9f)
        return 0; /* a surrogate */
    if (c == 0xf4 && p[1] > 0x8f)
        return 0; /* past U+10FFFF */
    return n;
}

size_t js_utf8_check(const char *s, size_t len)
{
    const unsigned char *p = (const unsigned char *)s;
    const unsigned char *end = p + len;

    while (p < end) {
        size_t n;
        if (end - p >= 8 && (word_at((const char *)p) & HIGHS) == 0) {
            p += 8;
            continue;
        }
        n = js_utf8_char(p, end);
        if (n == 0)
            return (size_t)(p - (const unsigned char *)s);
        p += n;
    }
    return len;
}

/* A string at s->p (a '"'). 0, or -1 when invalid or not handled here (a \u escape of a surrogate,
 * a byte that is not UTF-8). */
static int scan_string(struct js_scan *s, struct js_token *tok)
{
    const char *p = s->p + 1;

    tok->start = s->p;
    tok->escaped = 0;
    tok->is_string = 1;
    tok->is_int = 0;
    while (p < s->end) {
        unsigned char c;
        /* the usual bytes (letters, most punctuation): 8 at a time, then one by one */
        while (s->end - p >= 8 && strict_word(word_at(p)))
            p += 8;
        while (p < s->end && (unsigned char)*p > '\\' && (unsigned char)*p < 0x7f)
            p++;
        if (p >= s->end)
            break;
        c = (unsigned char)*p;
        if (c >= 0x80) {
            size_t n = js_utf8_char((const unsigned char *)p, (const unsigned char *)s->end);
            if (n == 0)
                return -1;
            p += n;
            continue;
        }
        if (c == '"') {
            s->p = p + 1;
            tok->len = (size_t)(s->p - tok->start);
            return 0;
        }
        if (c < 0x20)
            return -1;
        if (c == 0x7f) {
            tok->escaped = 1;
        } else if (c == '\\') {
            tok->escaped = 1;
            if (p + 1 >= s->end)
                return -1;
            c = (unsigned char)p[1];
            if (c == 'u') {
                int i;
                int v = 0;
                if (s->end - p < 6)
                    return -1;
                for (i = 2; i < 6; i++) {
                    int h = hexval(p[i]);
                    if (h < 0)
                        return -1;
                    v = v * 16 + h;
                }
                if (v >= 0xd800 && v <= 0xdfff)
                    return -1;
                p += 6;
                continue;
            }
            if (c == '\0' || strchr("\"\\/bfnrt", (int)c) == NULL)
                return -1;
            p += 2;
            continue;
        }
        p++;
    }
    return -1;
}

static int scan_number(struct js_scan *s, struct js_token *tok)
{
    const char *p = s->p;

    tok->start = p;
    tok->is_string = 0;
    tok->escaped = 0;
    tok->is_int = 1;
    if (p < s->end && *p == '-')
        p++;
    if (p >= s->end)
        return -1;
    if (*p == '0') {
        p++;
    } else if (*p >= '1' && *p <= '9') {
        while (p < s->end && *p >= '0' && *p <= '9')
            p++;
    } else {
        return -1;
    }
    if (p < s->end && *p == '.') {
        tok->is_int = 0;
        p++;
        if (p >= s->end || *p < '0' || *p > '9')
            return -1;
        while (p < s->end && *p >= '0' && *p <= '9')
            p++;
    }
    if (p < s->end && (*p == 'e' || *p == 'E')) {
        tok->is_int = 0;
        p++;
        if (p < s->end && (*p == '+' || *p == '-'))
            p++;
        if (p >= s->end || *p < '0' || *p > '9')
            return -1;
        while (p < s->end && *p >= '0' && *p <= '9')
            p++;
    }
    tok->len = (size_t)(p - tok->start);
    s->p = p;
    return 0;
}

static int scan_literal(struct js_scan *s, const char *word)
{
    size_t n = strlen(word);

    if ((size_t)(s->end - s->p) < n || memcmp(s->p, word, n) != 0)
        return -1;
    s->p += n;
    return 0;
}

int js_scan_items(struct js_scan *s, js_member_fn member, js_element_fn element, void *ctx)
{
    char close = member ? '}' : ']';
    struct js_token key;
    int index = 0;

    if (++s->depth > JS_STRICT_DEPTH)
        return -1;
    s->p++;
    js_skip_ws(s);
    if (s->p < s->end && *s->p == close) {
        s->p++;
        s->depth--;
        return 0;
    }
    for (;;) {
        if (member) {
            if (s->p >= s->end || *s->p != '"' || scan_string(s, &key) != 0)
                return -1;
            js_skip_ws(s);
            if (s->p >= s->end || *s->p != ':')
                return -1;
            s->p++;
            js_skip_ws(s);
            if (s->p >= s->end || member(ctx, s, &key) != 0)
                return -1;
        } else if (s->p >= s->end || element(ctx, s, index++) != 0) {
            return -1;
        }
        js_skip_ws(s);
        if (s->p >= s->end)
            return -1;
        if (*s->p == ',') {
            s->p++;
            js_skip_ws(s);
            continue;
        }
        if (*s->p != close)
            return -1;
        s->p++;
        s->depth--;
        return 0;
    }
}

static int skip_member(void *ctx, struct js_scan *s, const struct js_token *key)
{
    char kind;

    (void)ctx;
    (void)key;
    return js_scan_value(s, NULL, &kind);
}

static int skip_element(void *ctx, struct js_scan *s, int index)
{
    char kind;

    (void)ctx;
    (void)index;
    return js_scan_value(s, NULL, &kind);
}

int js_scan_value(struct js_scan *s, struct js_token *tok, char *kind)
{
    struct js_token local;

    if (tok == NULL)
        tok = &local;
    tok->is_string = 0;
    tok->start = NULL;
    if (s->p >= s->end)
        return -1;
    *kind = *s->p;
    switch (*s->p) {
    case '{':
        return js_scan_items(s, skip_member, NULL, NULL);
    case '[':
        return js_scan_items(s, NULL, skip_element, NULL);
    case '"':
        return scan_string(s, tok);
    case 'n':
        return scan_literal(s, "null");
    case 't':
        return scan_literal(s, "true");
    case 'f':
        return scan_literal(s, "false");
    default:
        *kind = '0';
        return scan_number(s, tok);
    }
}

int js_key_is(const struct js_token *key, const char *name)
{
    size_t n = strlen(name);
    return key->len == n + 2 && memcmp(key->start + 1, name, n) == 0;
}

int js_scan_whole_object(const char *text, size_t len, js_member_fn member, void *ctx)
{
    struct js_scan s = { text, text + len, 0 };

    js_skip_ws(&s);
    if (s.p >= s.end || *s.p != '{' || js_scan_items(&s, member, NULL, ctx) != 0)
        return -1;
    js_skip_ws(&s);
    return s.p == s.end ? 0 : -1;
}

int js_plain_int(const struct js_token *v, char kind)
{
    return kind == '0' && v->is_int && v->len <= JS_MAX_INT_TEXT &&
           !(v->len == 2 && v->start[0] == '-' && v->start[1] == '0');
}

/* ---- batch input lines, as the decoder reads them -------------------------------------------- */

/* A key of an object, kept until the end of the line to find repeated ones. Its decoded bytes are
 * in the line itself (no escapes) or in the arena. */
struct key_rec {
    uint32_t object; /* objects are numbered in the order they open */
    uint32_t hash;   /* of the decoded bytes (only to sort many keys) */
    size_t off;      /* of the decoded bytes, in the line or the arena */
    size_t len;
    size_t at; /* offset of the key (its opening quote) in the line */
    size_t raw_len;
    int in_arena;
};

/* One of the top-level fields that name the line. */
struct id_field {
    int count;
    char kind;    /* first character of its (last) value */
    size_t at;    /* its value's offset */
    int bad_utf8; /* its string holds a byte that is not UTF-8 */
};

#define SMALL_KEYS 16 /* keys of a usual line: kept without allocating */

struct js_reader {
    const char *line;
    const char *p;
    const char *end;
    struct key_rec *keys; /* small, or allocated once a line has more keys */
    size_t nkeys, cap;
    struct buf arena; /* decoded keys that had escapes */
    uint32_t objects;
    size_t members;
    size_t bad_utf8;        /* offset of the first byte that is not UTF-8, or SIZE_MAX */
    int string_bad;         /* the last string read held such a byte */
    struct id_field ids[2]; /* "custom_id", "id" */
    const struct key_rec *dup;
    struct key_rec small[SMALL_KEYS]; /* last: not cleared for each line */
};

static void line_ws(struct js_reader *r)
{
    const char *p = r->p;

    while (p < r->end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r'))
        p++;
    r->p = p;
}

static void append_utf8(struct buf *out, unsigned long cp)
{
    char u[4];
    size_t n;

    if (cp < 0x80) {
        u[0] = (char)cp;
        n = 1;
    } else if (cp < 0x800) {
        u[0] = (char)(0xc0 | (cp >> 6));
        u[1] = (char)(0x80 | (cp & 0x3f));
        n = 2;
    } else if (cp < 0x10000) {
        u[0] = (char)(0xe0 | (cp >> 12));
        u[1] = (char)(0x80 | ((cp >> 6) & 0x3f));
        u[2] = (char)(0x80 | (cp & 0x3f));
        n = 3;
    } else {
        u[0] = (char)(0xf0 | (cp >> 18));
        u[1] = (char)(0x80 | ((cp >> 12) & 0x3f));
        u[2] = (char)(0x80 | ((cp >> 6) & 0x3f));
        u[3] = (char)(0x80 | (cp & 0x3f));
        n = 4;
    }
    buf_append(out, u, n);
}

/* Four hex digits at p (fewer bytes before end count as a bad digit); -1 when they are not. */
static long hex4(const char *p, const char *end)
{
    long v = 0;
    int i;

    if (end - p < 4)
        return -1;
    for (i = 0; i < 4; i++) {
        int h = hexval(p[i]);
        if (h < 0)
            return -1;
        v = v * 16 + h;
    }
    return v;
}

/* The string at r->p (a '"'): 0, or -1 when the decoder refuses it. *escaped: it has a backslash.
 * With out, its decoded bytes are appended there. A byte that is not UTF-8 sets r->string_bad (and
 * r->bad_utf8 for the first in the line); the decoder takes such bytes as they are. */
static int line_string(struct js_reader *r, int *escaped, struct buf *out)
{
    const char *p = r->p + 1;
    const char *end = r->end; /* (a local: kept in a register in the loop) */
    const char *run = p;      /* bytes not yet appended to out */

    *escaped = 0;
    r->string_bad = 0;
    while (p < end) {
        unsigned char c;
        /* the usual bytes, control bytes included (the line has no NUL): 8 at a time, then one by one */
        while (end - p >= 8 && plain_word(word_at(p)))
            p += 8;
        while (p < end && (unsigned char)*p < 0x80 && *p != '"' && *p != '\\')
            p++;
        if (p >= end)
            break;
        c = (unsigned char)*p;
        if (c == '"') {
            if (out)
                buf_append(out, run, (size_t)(p - run));
            r->p = p + 1;
            return 0;
        }
        if (c >= 0x80) {
            size_t n = js_utf8_char((const unsigned char *)p, (const unsigned char *)end);
            if (n == 0) {
                if (r->bad_utf8 == SIZE_MAX)
                    r->bad_utf8 = (size_t)(p - r->line);
                r->string_bad = 1;
                n = 1;
            }
            p += n;
            continue;
        }
        *escaped = 1;
        if (out)
            buf_append(out, run, (size_t)(p - run));
        if (p + 1 >= end)
            return -1;
        c = (unsigned char)p[1];
        if (c == 'u') {
            long cp = hex4(p + 2, end);
            if (cp < 0)
                return -1;
            p += 6;
            if ((cp & 0xf800) == 0xd800) {
                long low;
                if (cp & 0x400)
                    return -1; /* a low surrogate first */
                if (end - p < 2 || p[0] != '\\' || p[1] != 'u')
                    return -1;
                low = hex4(p + 2, end);
                if (low < 0 || (low & 0xfc00) != 0xdc00)
                    return -1;
                cp = (((cp & 0x3ff) << 10) | (low & 0x3ff)) + 0x10000;
                p += 6;
            }
            if (out)
                append_utf8(out, (unsigned long)cp);
        } else {
            const char *from = "\"\\/bfnrt";
            const char *to = "\"\\/\b\f\n\r\t";
            const char *e = c ? strchr(from, (int)c) : NULL;
            if (e == NULL)
                return -1;
            if (out)
                buf_append_char(out, to[e - from]);
            p += 2;
        }
        run = p;
    }
    return -1;
}

int js_unescape(const char *tok, size_t len, struct buf *out)
{
    struct js_reader r; /* only the fields line_string reads */
    int escaped;

    r.line = tok;
    r.p = tok;
    r.end = tok + len;
    r.bad_utf8 = SIZE_MAX;
    r.string_bad = 0;
    if (len < 2 || tok[0] != '"' || line_string(&r, &escaped, out) != 0 || r.p != r.end)
        return -1;
    return 0;
}

/* A number at r->p (a '-' or a digit) as the decoder reads it. *plain: an integer as
 * js_plain_int has it (its text is r->p before the call up to r->p after). 0, or -1 when refused. */
static int line_number(struct js_reader *r, int *plain)
{
    const char *start = r->p;
    const char *p = start;
    size_t digits = 0;
    int is_int = 1;

    if (*p == '-')
        p++;
    /* what the decoder refuses before strtod sees it: hex, leading zeros, inf and nan */
    if (p < r->end && *p == '0' && p + 1 < r->end && ((p[1] | 0x20) == 'x' || (p[1] >= '0' && p[1] <= '9')))
        return -1;
    while (p < r->end && *p >= '0' && *p <= '9') {
        p++;
        digits++;
    }
    if (p < r->end && *p == '.') {
        is_int = 0;
        p++;
        while (p < r->end && *p >= '0' && *p <= '9') {
            p++;
            digits++;
        }
    }
    if (digits == 0)
        return -1; /* strtod reads nothing ("-", "-.", "-x", "-inf", ...) */
    if (p < r->end && (*p == 'e' || *p == 'E')) {
        const char *q = p + 1;
        if (q < r->end && (*q == '+' || *q == '-'))
            q++;
        if (q < r->end && *q >= '0' && *q <= '9') {
            is_int = 0;
            while (q < r->end && *q >= '0' && *q <= '9')
                q++;
            p = q;
        }
    }
    r->p = p;
    *plain = is_int && (size_t)(p - start) <= JS_MAX_INT_TEXT &&
             !(p - start == 2 && start[0] == '-' && start[1] == '0');
    return 0;
}

uint32_t js_hash(const char *s, size_t len)
{
    uint32_t h = 2166136261u;
    size_t i;

    for (i = 0; i < len; i++) {
        h ^= (unsigned char)s[i];
        h *= 16777619u;
    }
    return h;
}

static const char *key_text(const struct js_reader *r, const struct key_rec *k)
{
    return k->in_arena ? r->arena.data + k->off : r->line + k->off;
}

/* Reads the key at r->p (a '"') of object number `object` and keeps it. 0, or -1 when refused. */
static int line_key(struct js_reader *r, uint32_t object)
{
    struct key_rec k;
    size_t before = r->arena.len;
    int escaped;

    k.object = object;
    k.at = (size_t)(r->p - r->line);
    if (line_string(r, &escaped, NULL) != 0)
        return -1;
    k.raw_len = (size_t)(r->p - r->line) - k.at;
    if (escaped) {
        /* read it again, decoding it into the arena */
        const char *after = r->p;
        r->p = r->line + k.at;
        line_string(r, &escaped, &r->arena);
        r->p = after;
        k.in_arena = 1;
        k.off = before;
        k.len = r->arena.len - before;
    } else {
        k.in_arena = 0;
        k.off = k.at + 1;
        k.len = k.raw_len - 2;
    }
    k.hash = 0; /* made when there are too many keys to compare each with each */
    if (r->nkeys == r->cap) {
        size_t cap = r->cap * 2;
        struct key_rec *keys =
            r->keys == r->small ? malloc(cap * sizeof(*keys)) : realloc(r->keys, cap * sizeof(*keys));
        if (keys == NULL) {
            fputs("aigate: out of memory\n", stderr);
            abort();
        }
        if (r->keys == r->small)
            memcpy(keys, r->small, sizeof(r->small));
        r->keys = keys;
        r->cap = cap;
    }
    r->keys[r->nkeys++] = k;
    r->members++;
    return 0;
}

/* Is the key just read (the last one kept) "custom_id" (0) or "id" (1)? -1 otherwise. */
static int id_key(const struct js_reader *r)
{
    const struct key_rec *k = &r->keys[r->nkeys - 1];
    const char *t = key_text(r, k);

    if (k->len == 9 && memcmp(t, "custom_id", 9) == 0)
        return 0;
    if (k->len == 2 && memcmp(t, "id", 2) == 0)
        return 1;
    return -1;
}

/* The whole line: 0 when the decoder takes it, -1 when it refuses it (r->p where this stopped). */
static int line_scan(struct js_reader *r)
{
    char open[JS_LINE_DEPTH + 1];
    uint32_t object[JS_LINE_DEPTH + 1];
    int depth = 0;
    int field = -1; /* the value being read is that of ids[field] */
    int escaped;
    int plain;

    line_ws(r);
value:
    if (r->p >= r->end)
        return -1;
    if (field >= 0) {
        struct id_field *f = &r->ids[field];
        f->count++;
        f->kind = *r->p == '-' || (*r->p >= '0' && *r->p <= '9') ? '0' : *r->p;
        f->at = (size_t)(r->p - r->line);
        f->bad_utf8 = 0;
    }
    switch (*r->p) {
    case '{':
    case '[':
        if (++depth > JS_LINE_DEPTH)
            return -1;
        open[depth] = *r->p;
        object[depth] = *r->p == '{' ? ++r->objects : 0;
        r->p++;
        line_ws(r);
        if (r->p < r->end && *r->p == (open[depth] == '{' ? '}' : ']')) {
            r->p++;
            depth--;
            break;
        }
        if (open[depth] == '{')
            goto key;
        field = -1;
        goto value;
    case '"':
        if (line_string(r, &escaped, NULL) != 0)
            return -1;
        if (field >= 0)
            r->ids[field].bad_utf8 = r->string_bad;
        break;
    case 't':
    case 'f':
    case 'n': {
        const char *word = *r->p == 't' ? "true" : *r->p == 'f' ? "false" : "null";
        size_t n = strlen(word);
        if ((size_t)(r->end - r->p) < n || memcmp(r->p, word, n) != 0)
            return -1;
        r->p += n;
        break;
    }
    default:
        if (*r->p != '-' && (*r->p < '0' || *r->p > '9'))
            return -1;
        if (line_number(r, &plain) != 0)
            return -1;
        break;
    }
    field = -1;
    /* after a value */
    for (;;) {
        line_ws(r);
        if (depth == 0)
            return r->p == r->end ? 0 : -1;
        if (r->p >= r->end)
            return -1;
        if (*r->p == ',') {
            r->p++;
            line_ws(r);
            if (open[depth] == '{')
                goto key;
            goto value;
        }
        if (*r->p != (open[depth] == '{' ? '}' : ']'))
            return -1;
        r->p++;
        depth--;
    }
key:
    if (r->p >= r->end || *r->p != '"' || line_key(r, object[depth]) != 0)
        return -1;
    field = depth == 1 ? id_key(r) : -1;
    line_ws(r);
    if (r->p >= r->end || *r->p != ':')
        return -1;
    r->p++;
    line_ws(r);
    goto value;
}

static int key_cmp(const struct js_reader *r, const struct key_rec *a, const struct key_rec *b)
{
    int c;

    if (a->object != b->object)
        return a->object < b->object ? -1 : 1;
    if (a->hash != b->hash)
        return a->hash < b->hash ? -1 : 1;
    if (a->len != b->len)
        return a->len < b->len ? -1 : 1;
    c = a->len ? memcmp(key_text(r, a), key_text(r, b), a->len) : 0;
    if (c)
        return c;
    return a->at < b->at ? -1 : a->at > b->at;
}

/* qsort has no context argument: the reader being sorted for (one thread runs this). */
static const struct js_reader *sorting;

static int key_order(const void *a, const void *b)
{
    return key_cmp(sorting, a, b);
}

static int same_key(const struct js_reader *r, const struct key_rec *a, const struct key_rec *b)
{
    return a->object == b->object && a->hash == b->hash && a->len == b->len &&
           (a->len == 0 || memcmp(key_text(r, a), key_text(r, b), a->len) == 0);
}

/* The first repeated key: the one whose second occurrence comes first in the line; NULL if none. */
static const struct key_rec *find_dup(struct js_reader *r)
{
    struct key_rec *k = r->keys;
    size_t n = r->nkeys;
    const struct key_rec *best = NULL;
    size_t i, j;

    if (n < 2)
        return NULL;
    if (n <= SMALL_KEYS) {
        /* few keys (the usual line): each against those before it, in the order of the line */
        for (j = 1; j < n; j++)
            for (i = 0; i < j; i++)
                if (same_key(r, &k[i], &k[j]))
                    return &k[j];
        return NULL;
    }
    /* many: sorted, equal keys are next to each other, in the order of the line */
    for (i = 0; i < n; i++)
        k[i].hash = js_hash(key_text(r, &k[i]), k[i].len);
    sorting = r;
    qsort(k, n, sizeof(*k), key_order);
    sorting = NULL;
    for (i = 0; i < n; i = j) {
        for (j = i + 1; j < n && same_key(r, &k[i], &k[j]); j++)
            ;
        if (j - i >= 2 && (best == NULL || k[i + 1].at < best->at))
            best = &k[i + 1];
    }
    return best;
}

/* The id from the field that names the line. */
static void read_id(struct js_reader *r, struct js_line *out, struct buf *id)
{
    const struct id_field *f = NULL;
    int i;

    out->id = JS_ID_NONE;
    for (i = 0; i < 2; i++) {
        const struct id_field *c = &r->ids[i];
        if (c->count > 1) {
            out->id = JS_ID_UNKNOWN; /* which of its values would be taken is not for the text to say */
            out->id_field = i == 0 ? "custom_id" : "id";
            return;
        }
        if (c->count == 1 && c->kind != 'n') {
            f = c;
            out->id_field = i == 0 ? "custom_id" : "id";
            break;
        }
    }
    if (f == NULL)
        return;
    if (f->kind == '"') {
        int escaped;
        size_t before = id->len;
        if (f->bad_utf8) {
            out->id = JS_ID_UNKNOWN;
            return;
        }
        r->p = r->line + f->at;
        line_string(r, &escaped, id);
        out->id = id->len > before ? JS_ID_TEXT : JS_ID_BAD;
    } else if (f->kind == '0') {
        int plain = 0;
        r->p = r->line + f->at;
        line_number(r, &plain);
        if (plain) {
            buf_append(id, r->line + f->at, (size_t)(r->p - r->line) - f->at);
            out->id = JS_ID_TEXT;
        } else {
            out->id = JS_ID_NUMBER;
        }
    } else {
        out->id = JS_ID_BAD; /* true, false, an object or an array */
    }
}

void js_line_read(const char *line, size_t len, struct js_line *out, struct buf *id)
{
    struct js_reader r;
    const char *nul = len ? memchr(line, '\0', len) : NULL;
    const char *first;

    memset(out, 0, sizeof(*out));
    out->problem = JS_OK;
    out->id = JS_ID_NONE;
    buf_reset(id);
    if (nul) {
        out->problem = JS_NUL;
        out->offset = (size_t)(nul - line);
        return;
    }
    memset(&r, 0, offsetof(struct js_reader, small)); /* the keys' room needs no clearing */
    r.line = line;
    r.p = line;
    r.end = line + len;
    r.bad_utf8 = SIZE_MAX;
    r.keys = r.small;
    r.cap = SMALL_KEYS;
    buf_init(&r.arena);
    if (line_scan(&r) != 0) {
        out->problem = JS_INVALID;
        out->offset = (size_t)(r.p - line);
        goto done;
    }
    out->members = r.members;
    first = line;
    while (first < r.end && (*first == ' ' || *first == '\t' || *first == '\n' || *first == '\r'))
        first++;
    if (first >= r.end || *first != '{') {
        out->problem = JS_NOT_OBJECT;
        goto done;
    }
    r.dup = find_dup(&r);
    if (r.bad_utf8 != SIZE_MAX) {
        out->problem = JS_BAD_UTF8;
        out->offset = r.bad_utf8;
    } else if (r.dup) {
        out->problem = JS_DUP_KEY;
        out->offset = r.dup->at;
        out->key = line + r.dup->at;
        out->key_len = r.dup->raw_len;
    }
    read_id(&r, out, id);
done:
    if (r.keys != r.small)
        free(r.keys);
    buf_free(&r.arena);
}
