/*
 * reply.c: the fast reading of a chat completion reply (see reply.h).
 */
#include <stdlib.h>
#include <string.h>

#include "jsontext.h"
#include "reply.h"

static const char *const USAGE_KEYS[3] = { "prompt_tokens", "completion_tokens", "total_tokens" };

static int usage_member(void *ctx, struct js_scan *s, const struct js_token *key)
{
    struct reply *r = ctx;
    struct js_token val;
    char kind;
    int i;

    if (js_scan_value(s, &val, &kind) != 0)
        return -1;
    if (key->escaped) {
        r->bad = 1; /* a key that may decode to one of ours */
        return 0;
    }
    for (i = 0; i < 3; i++) {
        if (!js_key_is(key, USAGE_KEYS[i]))
            continue;
        if (r->has_usage[i])
            r->bad = 1; /* repeated: the decoder keeps the last, leave it to Lua */
        if (kind == '0') {
            char text[JS_MAX_INT_TEXT + 1];
            if (!val.is_int || val.len > JS_MAX_INT_TEXT) {
                r->bad = 1; /* a float or a huge count: Lua writes it */
            } else {
                memcpy(text, val.start, val.len);
                text[val.len] = '\0';
                r->usage[i] = strtoll(text, NULL, 10);
                r->has_usage[i] = 1;
            }
        }
    }
    return 0;
}

/* The first element of choices must be an object or an array (a table once decoded). */
static int choice_element(void *ctx, struct js_scan *s, int index)
{
    struct reply *r = ctx;
    char kind;

    if (index == 0 && (*s->p == '{' || *s->p == '['))
        r->choices_ok = 1;
    return js_scan_value(s, NULL, &kind);
}

static int reply_member(void *ctx, struct js_scan *s, const struct js_token *key)
{
    struct reply *r = ctx;
    struct js_token val;
    char kind;

    if (key->escaped)
        return -1;
    if (js_key_is(key, "usage")) {
        if (r->seen_usage++)
            return -1;
        if (*s->p == '{')
            return js_scan_items(s, usage_member, NULL, r);
        return js_scan_value(s, NULL, &kind); /* any other value: no usage */
    }
    if (js_key_is(key, "choices")) {
        if (r->seen_choices++)
            return -1;
        if (*s->p == '[')
            return js_scan_items(s, NULL, choice_element, r);
        return js_scan_value(s, NULL, &kind);
    }
    if (js_scan_value(s, &val, &kind) != 0)
        return -1;
    if (js_key_is(key, "id")) {
        if (r->has_id++)
            return -1;
        r->id = val;
        r->id_kind = kind;
    } else if (js_key_is(key, "model")) {
        if (r->has_model++)
            return -1;
        r->model = val;
        r->model_kind = kind;
    } else if (js_key_is(key, "error")) {
        if (kind != 'n')
            r->bad = 1;
    } else if (js_key_is(key, "success")) {
        if (kind == 'f')
            r->bad = 1;
    }
    return 0;
}

/* Scans a reply body. 0 when it is a completion this file can write (r filled), -1 otherwise. */
int reply_scan(const char *body, size_t len, struct reply *r)
{
    memset(r, 0, sizeof(*r));
    /* The result line carries the reply's bytes: one line, an object from its first byte to its
     * last. */
    if (len == 0 || body[0] != '{' || body[len - 1] != '}' || memchr(body, '\n', len) ||
        memchr(body, '\r', len))
        return -1;
    if (js_scan_whole_object(body, len, reply_member, r) != 0 || r->bad || !r->choices_ok)
        return -1;
    /* The model is written as the decoder gives it back (reply_model): a string with escapes is
     * read again, and one that stands for no UTF-8 text (a lone surrogate) is Lua's. */
    if (r->has_model && r->model.is_string && r->model.escaped) {
        struct buf text;
        int rc;
        buf_init(&text);
        rc = js_unescape(r->model.start, r->model.len, &text);
        buf_free(&text);
        if (rc != 0)
            return -1;
    }
    return 0;
}

int reply_model(const struct reply *r, struct buf *scratch, const char **s, size_t *len)
{
    if (!r->has_model || !r->model.is_string)
        return 0;
    if (!r->model.escaped) {
        *s = r->model.start + 1;
        *len = r->model.len - 2;
        return 1;
    }
    buf_reset(scratch);
    if (js_unescape(r->model.start, r->model.len, scratch) != 0)
        return 0;
    *s = scratch->data ? scratch->data : "";
    *len = scratch->len;
    return 1;
}
