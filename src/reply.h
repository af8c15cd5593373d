/*
 * reply.h: the fast reading of a chat completion reply (src/reply.c), in place.
 *
 * The engine writes a success itself only when the reply is a 2xx body of the usual shape, read
 * here: one line holding one JSON object, with choices (its first element an object or an array),
 * no error object, no "success": false, usage counts as integers, a model that is text.
 * Anything else is not refused, only left to Lua: the engine hands the reply to the policy, which
 * reads it with the client's reader (aigate.client read_reply), the one that decides in the end.
 */
#ifndef AIGATE_REPLY_H
#define AIGATE_REPLY_H

#include <stddef.h>

#include "buf.h"
#include "jsonscan.h"

struct reply {
    struct js_token id, model;
    int has_id, has_model;
    int id_kind, model_kind; /* first character of the value */
    long long usage[3];      /* prompt, completion, total */
    int has_usage[3];
    int seen_usage, seen_choices;
    int choices_ok;
    int bad; /* an error object, success false, or a shape left to Lua */
};

/* 0 when body is a completion the engine may write as it is (r filled), -1 otherwise. */
int reply_scan(const char *body, size_t len, struct reply *r);

/* The reply's model as the decoder gives it back (escapes read, into scratch when it has any): 1
 * with *s and *len, or 0 when the reply has no model string. */
int reply_model(const struct reply *r, struct buf *scratch, const char **s, size_t *len);

#endif
