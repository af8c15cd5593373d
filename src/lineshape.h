/*
 * lineshape.h: the shape of a batch input line (src/lineshape.c), read in place.
 *
 * The engine (src/engine.c) sends a line itself when the line's shape is one the policy rendered a
 * request for. This reader only says what the line holds; it decides nothing about the policy:
 *   short form   {"id", "prompt" | "messages", "model"?}
 *   OpenAI Batch {"custom_id", "method"?, "url"?, "body": {"model"?, "messages", <params>...}}
 *                with method "POST" and a url ending in /chat/completions when they are there
 * where messages are objects of exactly "role" and "content" (strings), and params are numbers or
 * strings. Anything else (other fields, null or nested values, keys with escapes) is not a shape:
 * such a line goes to the general path, which reads every form there is. The line must already have
 * passed js_line_read (valid JSON, no duplicate keys, valid UTF-8).
 */
#ifndef AIGATE_LINESHAPE_H
#define AIGATE_LINESHAPE_H

#include <stddef.h>

#include "jsonscan.h"

#define SHAPE_MAX_MESSAGES 64
#define SHAPE_MAX_PARAMS   16

struct shape_message {
    struct js_token role, content;
};

struct shape_param {
    struct js_token name;  /* the key, with its quotes, no escapes */
    struct js_token value; /* a string (with its quotes) or a number */
    char kind;             /* '"' or '0' */
};

struct line_shape {
    int openai; /* the OpenAI Batch form (else the short form) */
    int has_model, has_prompt, has_messages, has_method, has_url;
    struct js_token model;  /* a string without escapes */
    struct js_token prompt; /* a string */
    struct js_token method; /* a string, as written */
    struct js_token url;    /* a string, as written */
    struct shape_message messages[SHAPE_MAX_MESSAGES];
    int nmessages;
    struct shape_param params[SHAPE_MAX_PARAMS];
    int nparams;
};

/* 0 with s filled when the line has one of the shapes above; -1 otherwise. */
int line_shape_read(const char *line, size_t len, struct line_shape *s);

#endif
