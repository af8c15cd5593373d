/*
 * lane.c: `core.lane(spec)`, the batch engine's fast path for lines whose request is a fixed body
 * with one prompt in it (see CORE_API.md).
 *
 * The policy stays in Lua: aigate.batch asks the policy for a model's lane, and only when the lane
 * is a plain target with nothing per line but the prompt does it make an engine here with the
 * prepared request (URL, headers, the body around the messages) and the fixed parts of a result
 * line. For each line, `stage` reads the line with a strict JSON scanner and accepts only the short
 * form {"id", "prompt"[, "model"]} with nothing to unescape; `send` posts it on the shared curl
 * multi handle and yields. When the reply is a 2xx chat completion of the usual shape (valid JSON,
 * choices, integer usage, nothing to re-escape), the task gets the result line built here; for
 * anything else it gets the reply (or the transport error) and Lua runs it through the general
 * path, so every unusual case is decided by the same code as aigate.chat.
 */
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <curl/curl.h>
#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>

#include "aigate.h"
#include "buf.h"
#include "http.h"

#define LANE_MT      "aigate.lane"
#define SCAN_DEPTH   900 /* deeper replies go to Lua (cjson's own limit is 1000) */
#define MAX_INT_TEXT 15  /* integers longer than this go to Lua (exact in a double) */

#define APPEND_LIT(b, s) buf_append((b), (s), sizeof(s) - 1)

struct lane;

/* Lines of a file, read in blocks; a line longer than max_line is skipped, never held. */
struct reader {
    FILE *in;
    struct buf buf;
    size_t pos;
    int eof;
    lua_Integer lineno;
    size_t max_line;
};

struct slot {
    struct pending pending; /* the task's wait */
    struct xfer xfer;       /* CURLOPT_PRIVATE */
    struct lane *lane;
    struct task *task;
    CURL *easy;
    struct buf body;    /* the request body */
    struct buf reply;   /* the response body */
    struct buf headers; /* "name\0value\0" of the response */
    struct buf id_json; /* the line's id as the result line writes it */
    long status;
    size_t received;
    lua_Integer lineno;
    double t0;
    int working;       /* sent by lane:work: its end goes on to the next line */
    struct buf source; /* lane:work: the input line, for Lua when the reply is not written here */
    struct slot *next; /* free list */
    struct http_timers timers;
    char abort_msg[128]; /* a timer's error, when one ended the request */
    char errbuf[CURL_ERROR_SIZE];
};

struct lane {
    char *url;
    char *model; /* the id a line's "model" field may repeat */
    struct curl_slist *headers;
    struct http_timeouts timeouts;
    char *ca_file, *ca_path;                         /* NULL: curl's defaults */
    struct buf prefix, suffix;                       /* the request body around the messages */
    struct buf model_part, route_part, attempt_part; /* fixed pieces of a result line */
    struct buf request_id_headers;                   /* "name\0name\0...": where a reply's id is, in order */
    struct slot *free;
    struct slot *staged;
    int inflight; /* slots sent and not done: while > 0 the lane keeps itself alive (self_ref) */
    int self_ref;
    /* lane:attach: working through an input file */
    struct reader rd;
    FILE *out; /* the output, a Lua file handle kept alive by out_ref */
    int out_ref;
    int done_ref;         /* the ids already in the output (a table), or LUA_NOREF */
    int go;               /* lane:set_go: may a worker go on to its next line without Lua */
    struct buf id_prefix; /* "batch_req_<run prefix>" */
    unsigned long long counter;
    lua_Integer ok, tokens[3]; /* since the last drain */
    double *lat;
    size_t nlat, caplat;
    struct buf outline;
};

/* ---- a strict JSON scanner ------------------------------------------------------------------- */

/* A string or number token: where its text is, and what it needs. */
struct token {
    const char *start; /* the string with its quotes, or the number */
    size_t len;
    int escaped;   /* a string with a backslash or a DEL byte (its text is not the JSON we would write) */
    int is_int;    /* a number without fraction or exponent */
    int is_string; /* a string (else a number, or nothing) */
};

struct scan {
    const char *p;
    const char *end;
    int depth;
};

static void skip_ws(struct scan *s)
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

/* A string at s->p (a '"'). 0, or -1 when invalid or not handled here (a \u escape of a surrogate). */
static int scan_string(struct scan *s, struct token *tok)
{
    const char *p = s->p + 1;

    tok->start = s->p;
    tok->escaped = 0;
    tok->is_string = 1;
    tok->is_int = 0;
    while (p < s->end) {
        unsigned char c = (unsigned char)*p;
        if (c > '\\' && c != 0x7f) {
            p++; /* the usual byte: letters, most punctuation, UTF-8 */
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
                if (p + 6 > s->end)
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
            if (strchr("\"\\/bfnrt", (int)c) == NULL || c == '\0')
                return -1;
            p += 2;
            continue;
        }
        p++;
    }
    return -1;
}

static int scan_number(struct scan *s, struct token *tok)
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

static int scan_literal(struct scan *s, const char *word)
{
    size_t n = strlen(word);

    if ((size_t)(s->end - s->p) < n || memcmp(s->p, word, n) != 0)
        return -1;
    s->p += n;
    return 0;
}

/* Any value at s->p (whitespace skipped before, not after). tok (may be NULL) gets a string or
 * number token; *kind gets its first character ('{', '[', '"', 'n', 't', 'f' or '0' for numbers). */
static int scan_value(struct scan *s, struct token *tok, char *kind);

/* The members of the object at s->p (a '{'): member(ctx, s, key) is called at each value, which it
 * must scan (with scan_value or its own scanner). 0, or -1 when invalid or refused by member. */
typedef int (*member_fn)(void *ctx, struct scan *s, const struct token *key);
/* The elements of the array at s->p (a '['): element(ctx, s, index) scans each. */
typedef int (*element_fn)(void *ctx, struct scan *s, int index);

static int scan_items(struct scan *s, member_fn member, element_fn element, void *ctx)
{
    char close = member ? '}' : ']';
    struct token key;
    int index = 0;

    if (++s->depth > SCAN_DEPTH)
        return -1;
    s->p++;
    skip_ws(s);
    if (s->p < s->end && *s->p == close) {
        s->p++;
        s->depth--;
        return 0;
    }
    for (;;) {
        if (member) {
            if (s->p >= s->end || *s->p != '"' || scan_string(s, &key) != 0)
                return -1;
            skip_ws(s);
            if (s->p >= s->end || *s->p != ':')
                return -1;
            s->p++;
            skip_ws(s);
            if (s->p >= s->end || member(ctx, s, &key) != 0)
                return -1;
        } else if (s->p >= s->end || element(ctx, s, index++) != 0) {
            return -1;
        }
        skip_ws(s);
        if (s->p >= s->end)
            return -1;
        if (*s->p == ',') {
            s->p++;
            skip_ws(s);
            continue;
        }
        if (*s->p != close)
            return -1;
        s->p++;
        s->depth--;
        return 0;
    }
}

static int skip_member(void *ctx, struct scan *s, const struct token *key)
{
    char kind;

    (void)ctx;
    (void)key;
    return scan_value(s, NULL, &kind);
}

static int skip_element(void *ctx, struct scan *s, int index)
{
    char kind;

    (void)ctx;
    (void)index;
    return scan_value(s, NULL, &kind);
}

static int scan_value(struct scan *s, struct token *tok, char *kind)
{
    struct token local;

    if (tok == NULL)
        tok = &local;
    tok->is_string = 0;
    tok->start = NULL;
    if (s->p >= s->end)
        return -1;
    *kind = *s->p;
    switch (*s->p) {
    case '{':
        return scan_items(s, skip_member, NULL, NULL);
    case '[':
        return scan_items(s, NULL, skip_element, NULL);
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

/* The text of an object key known to have no escapes equals name. */
static int key_is(const struct token *key, const char *name)
{
    size_t n = strlen(name);
    return key->len == n + 2 && memcmp(key->start + 1, name, n) == 0;
}

/* A whole text that is one JSON object (whitespace around it allowed), its members by member. */
static int scan_whole_object(const char *text, size_t len, member_fn member, void *ctx)
{
    struct scan s = { text, text + len, 0 };

    skip_ws(&s);
    if (s.p >= s.end || *s.p != '{' || scan_items(&s, member, NULL, ctx) != 0)
        return -1;
    skip_ws(&s);
    return s.p == s.end ? 0 : -1;
}

/* An integer id as the decoder gives it back: no fraction, exponent or "-0", exact in a double. */
static int plain_int(const struct token *v, char kind)
{
    return kind == '0' && v->is_int && v->len <= MAX_INT_TEXT &&
           !(v->len == 2 && v->start[0] == '-' && v->start[1] == '0');
}

/* ---- input lines ----------------------------------------------------------------------------- */

struct short_line {
    const struct lane *ln;
    struct token id, prompt;
    int have_id, have_prompt, have_model;
};

static int short_member(void *ctx, struct scan *s, const struct token *key)
{
    struct short_line *sl = ctx;
    struct token val;
    char kind;

    if (key->escaped || scan_value(s, &val, &kind) != 0)
        return -1;
    if (key_is(key, "id")) {
        if (sl->have_id++)
            return -1;
        if (val.is_string ? (val.escaped || val.len == 2) : !plain_int(&val, kind))
            return -1;
        sl->id = val;
    } else if (key_is(key, "prompt")) {
        if (sl->have_prompt++ || !val.is_string || val.escaped)
            return -1;
        sl->prompt = val;
    } else if (key_is(key, "model")) {
        if (sl->have_model++ || !val.is_string || val.escaped || val.len != strlen(sl->ln->model) + 2 ||
            memcmp(val.start + 1, sl->ln->model, val.len - 2) != 0)
            return -1;
    } else {
        return -1;
    }
    return 0;
}

/* The short form {"id": "x" | 12, "prompt": "...", "model": "<the lane's>"}, nothing else, no
 * escapes. Fills id (its text: a string's content or the integer's digits) and prompt (with quotes). */
static int parse_line(const struct lane *ln, const char *line, size_t len, struct token *id,
                      struct token *prompt)
{
    struct short_line sl;

    memset(&sl, 0, sizeof(sl));
    sl.ln = ln;
    if (scan_whole_object(line, len, short_member, &sl) != 0 || !sl.have_id || !sl.have_prompt)
        return -1;
    *id = sl.id;
    *prompt = sl.prompt;
    return 0;
}

/* ---- replies --------------------------------------------------------------------------------- */

struct reply {
    struct token id, model;
    int has_id, has_model;
    int id_kind, model_kind; /* first character of the value */
    long long usage[3];      /* prompt, completion, total */
    int has_usage[3];
    int seen_usage, seen_choices;
    int choices_ok;
    int bad; /* an error object, success false, or a shape left to Lua */
};

static const char *const USAGE_KEYS[3] = { "prompt_tokens", "completion_tokens", "total_tokens" };

static int usage_member(void *ctx, struct scan *s, const struct token *key)
{
    struct reply *r = ctx;
    struct token val;
    char kind;
    int i;

    if (scan_value(s, &val, &kind) != 0)
        return -1;
    if (key->escaped) {
        r->bad = 1; /* a key that may decode to one of ours */
        return 0;
    }
    for (i = 0; i < 3; i++) {
        if (!key_is(key, USAGE_KEYS[i]))
            continue;
        if (r->has_usage[i])
            r->bad = 1; /* repeated: the decoder keeps the last, leave it to Lua */
        if (kind == '0') {
            char text[MAX_INT_TEXT + 1];
            if (!val.is_int || val.len > MAX_INT_TEXT) {
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
static int choice_element(void *ctx, struct scan *s, int index)
{
    struct reply *r = ctx;
    char kind;

    if (index == 0 && (*s->p == '{' || *s->p == '['))
        r->choices_ok = 1;
    return scan_value(s, NULL, &kind);
}

static int reply_member(void *ctx, struct scan *s, const struct token *key)
{
    struct reply *r = ctx;
    struct token val;
    char kind;

    if (key->escaped)
        return -1;
    if (key_is(key, "usage")) {
        if (r->seen_usage++)
            return -1;
        if (*s->p == '{')
            return scan_items(s, usage_member, NULL, r);
        return scan_value(s, NULL, &kind); /* any other value: no usage */
    }
    if (key_is(key, "choices")) {
        if (r->seen_choices++)
            return -1;
        if (*s->p == '[')
            return scan_items(s, NULL, choice_element, r);
        return scan_value(s, NULL, &kind);
    }
    if (scan_value(s, &val, &kind) != 0)
        return -1;
    if (key_is(key, "id")) {
        if (r->has_id++)
            return -1;
        r->id = val;
        r->id_kind = kind;
    } else if (key_is(key, "model")) {
        if (r->has_model++)
            return -1;
        r->model = val;
        r->model_kind = kind;
    } else if (key_is(key, "error")) {
        if (kind != 'n')
            r->bad = 1;
    } else if (key_is(key, "success")) {
        if (kind == 'f')
            r->bad = 1;
    }
    return 0;
}

/* Scans a reply body. 0 when it is a completion this file can write (r filled), -1 otherwise. */
static int scan_reply(const char *body, size_t len, struct reply *r)
{
    memset(r, 0, sizeof(*r));
    /* The result line carries the reply's bytes: one line, an object from its first byte to its
     * last. */
    if (len == 0 || body[0] != '{' || body[len - 1] != '}' || memchr(body, '\n', len) ||
        memchr(body, '\r', len))
        return -1;
    if (scan_whole_object(body, len, reply_member, r) != 0 || r->bad || !r->choices_ok)
        return -1;
    /* id and model are written as the decoder would give them back: plain strings only. */
    if (r->has_id && r->id_kind != 'n' && r->id_kind != 'f' && !(r->id.is_string && !r->id.escaped))
        return -1;
    if (r->has_model && r->model.is_string && r->model.escaped)
        return -1;
    return 0;
}

/* ---- result lines ---------------------------------------------------------------------------- */

/* A JSON string of bytes, escaped as aigate's encoder does: '"', '\\', control bytes and DEL. */
static void append_quoted(struct buf *b, const char *s, size_t len)
{
    static const char hex[] = "0123456789abcdef";
    size_t i;

    buf_append_char(b, '"');
    for (i = 0; i < len; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == '"' || c == '\\') {
            buf_append_char(b, '\\');
            buf_append_char(b, (char)c);
        } else if (c == '\n') {
            APPEND_LIT(b, "\\n");
        } else if (c == '\r') {
            APPEND_LIT(b, "\\r");
        } else if (c == '\t') {
            APPEND_LIT(b, "\\t");
        } else if (c == '\b') {
            APPEND_LIT(b, "\\b");
        } else if (c == '\f') {
            APPEND_LIT(b, "\\f");
        } else if (c < 0x20 || c == 0x7f) {
            char u[6] = { '\\', 'u', '0', '0', hex[c >> 4], hex[c & 15] };
            buf_append(b, u, 6);
        } else {
            buf_append_char(b, (char)c);
        }
    }
    buf_append_char(b, '"');
}

static void append_int(struct buf *b, long long v)
{
    char tmp[24];
    char *p = tmp + sizeof(tmp);
    unsigned long long u = v < 0 ? 0ULL - (unsigned long long)v : (unsigned long long)v;

    do {
        *--p = (char)('0' + u % 10);
        u /= 10;
    } while (u);
    if (v < 0)
        *--p = '-';
    buf_append(b, p, (size_t)(tmp + sizeof(tmp) - p));
}

/* A latency as the result line writes it: whole seconds as integers, else fmt ("%.6f", "%.14g"). */
static void append_seconds(struct buf *b, double v, const char *fmt)
{
    char tmp[64];
    int n;

    if (v == (double)(long long)v) {
        append_int(b, (long long)v);
        return;
    }
    n = snprintf(tmp, sizeof(tmp), fmt, v);
    if (n > 0)
        buf_append(b, tmp, (size_t)n < sizeof(tmp) ? (size_t)n : sizeof(tmp) - 1);
}

/* The reply's request id into out: the first of the headers the lane was given (Lua's
 * errors.REQUEST_ID_HEADERS) that the reply has with a value. Returns 1 when found. */
static int request_id(const struct lane *ln, const struct slot *sl, struct buf *out)
{
    size_t pos = 0;

    while (pos < ln->request_id_headers.len) {
        const char *name = ln->request_id_headers.data + pos;
        buf_reset(out);
        if (header_value(&sl->headers, name, out) && out->len > 0)
            return 1;
        pos += strlen(name) + 1;
    }
    return 0;
}

/* The result line of a success after its '{"id":"..."' (what Lua's success_line writes). */
static void build_line(struct buf *b, const struct lane *ln, const struct slot *sl, const struct reply *r,
                       double latency)
{
    struct buf hv;
    int i;

    buf_init(&hv);
    APPEND_LIT(b, ",\"custom_id\":");
    buf_append(b, sl->id_json.data, sl->id_json.len);
    APPEND_LIT(b, ",\"error\":null,\"response\":{\"status_code\":");
    append_int(b, sl->status);
    APPEND_LIT(b, ",\"request_id\":");
    if (request_id(ln, sl, &hv))
        append_quoted(b, hv.data, hv.len);
    else
        APPEND_LIT(b, "null");
    APPEND_LIT(b, ",\"body\":");
    buf_append(b, sl->reply.data, sl->reply.len);
    APPEND_LIT(b, "},\"aigate\":{\"line\":");
    append_int(b, (long long)sl->lineno);
    buf_append(b, ln->model_part.data, ln->model_part.len);
    if (r->has_model && r->model.is_string) {
        APPEND_LIT(b, ",\"response_model\":");
        buf_append(b, r->model.start, r->model.len);
    }
    APPEND_LIT(b, ",\"latency\":");
    append_seconds(b, latency, "%.6f");
    /* counts the reply did not give are null, and no usage at all is null (as Lua's usage_json) */
    if (r->has_usage[0] || r->has_usage[1] || r->has_usage[2]) {
        APPEND_LIT(b, ",\"usage\":{");
        for (i = 0; i < 3; i++) {
            if (i)
                buf_append_char(b, ',');
            buf_append_char(b, '"');
            buf_append(b, USAGE_KEYS[i], strlen(USAGE_KEYS[i]));
            APPEND_LIT(b, "\":");
            if (r->has_usage[i])
                append_int(b, r->usage[i]);
            else
                APPEND_LIT(b, "null");
        }
        buf_append_char(b, '}');
    } else {
        APPEND_LIT(b, ",\"usage\":null");
    }
    buf_append(b, ln->route_part.data, ln->route_part.len);
    buf_reset(&hv);
    if (header_value(&sl->headers, "cf-aig-cache-status", &hv)) {
        APPEND_LIT(b, ",\"cache_status\":");
        append_quoted(b, hv.data, hv.len);
    }
    buf_append(b, ln->attempt_part.data, ln->attempt_part.len);
    append_int(b, sl->status);
    APPEND_LIT(b, ",\"latency\":");
    append_seconds(b, latency, "%.14g");
    APPEND_LIT(b, "}]}}");
    buf_free(&hv);
}

/* ---- transfers ------------------------------------------------------------------------------- */

static double now_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static size_t slot_write(char *data, size_t size, size_t nmemb, void *userdata)
{
    struct slot *sl = userdata;
    size_t len = size * nmemb;

    http_timers_progress(&sl->timers);
    sl->received += len;
    if (sl->received > HTTP_DEFAULT_MAX_SIZE)
        return 0;
    buf_append(&sl->reply, data, len);
    return len;
}

static size_t slot_header(char *data, size_t size, size_t nitems, void *userdata)
{
    struct slot *sl = userdata;
    size_t len = size * nitems;

    http_timers_progress(&sl->timers);
    http_header_line(&sl->headers, &sl->status, data, len);
    return len;
}

static void slot_release(struct slot *sl)
{
    sl->task = NULL;
    sl->next = sl->lane->free;
    sl->lane->free = sl;
}

/* A sent slot is done or cancelled: back to the free list; the lane may be collected again once
 * nothing is in flight. */
static void slot_finished(struct slot *sl)
{
    struct lane *ln = sl->lane;

    slot_release(sl);
    if (--ln->inflight == 0) {
        luaL_unref(g_L, LUA_REGISTRYINDEX, ln->self_ref);
        ln->self_ref = LUA_NOREF;
    }
}

static void slot_cancel(struct pending *p)
{
    struct slot *sl = (struct slot *)p;

    http_client_remove(sl->easy);
    http_timers_stop(&sl->timers);
    slot_finished(sl);
}

/* Resumes the task: true, line, latency, prompt, completion, total for a success written here;
 * false, latency, status, headers, body for any other reply; false, latency, nil, nil, nil, err
 * for a transport failure. */
static void work_done(struct slot *sl, CURLcode rc, double latency);

/* Pushes the outcome of a request the engine does not finish itself: status, headers, body, nil
 * for a reply; nil, nil, nil, err for a transport failure (err as core.request gives it). */
static void push_outcome(lua_State *co, struct slot *sl, CURLcode rc)
{
    if (rc == CURLE_OK) {
        lua_pushinteger(co, sl->status);
        http_push_headers(co, &sl->headers);
        lua_pushlstring(co, sl->reply.data ? sl->reply.data : "", sl->reply.len);
        lua_pushnil(co);
    } else {
        lua_pushnil(co);
        lua_pushnil(co);
        lua_pushnil(co);
        if (sl->abort_msg[0])
            lua_pushstring(co, sl->abort_msg);
        else
            http_push_error(co, rc, sl->errbuf, sl->received, HTTP_DEFAULT_MAX_SIZE);
    }
}

static void slot_done(struct xfer *x, CURLcode rc)
{
    struct slot *sl = (struct slot *)(void *)((char *)x - offsetof(struct slot, xfer));
    struct task *t = sl->task;
    lua_State *co = task_thread(t);
    double latency = now_seconds() - sl->t0;
    struct reply r;
    STACK_CHECK_BEGIN(co);

    http_client_remove(sl->easy);
    http_timers_stop(&sl->timers);
    if (sl->working) {
        work_done(sl, rc, latency);
        return;
    }
    if (rc == CURLE_OK && sl->status >= 200 && sl->status <= 299 &&
        scan_reply(sl->reply.data ? sl->reply.data : "", sl->reply.len, &r) == 0) {
        struct buf line;
        int i;
        buf_init(&line);
        build_line(&line, sl->lane, sl, &r, latency);
        lua_pushboolean(co, 1);
        lua_pushlstring(co, line.data, line.len);
        buf_free(&line);
        lua_pushnumber(co, latency);
        for (i = 0; i < 3; i++) {
            if (r.has_usage[i])
                lua_pushinteger(co, (lua_Integer)r.usage[i]);
            else
                lua_pushnil(co);
        }
    } else {
        lua_pushboolean(co, 0);
        lua_pushnumber(co, latency);
        push_outcome(co, sl, rc);
    }
    STACK_CHECK_END(co, 6);
    slot_finished(sl);
    task_resume(t, 6);
}

/* A first byte or stall timer fired: the request ends with its error. */
static void slot_expired(struct http_timers *tm, const char *msg)
{
    struct slot *sl = (struct slot *)(void *)((char *)tm - offsetof(struct slot, timers));

    snprintf(sl->abort_msg, sizeof(sl->abort_msg), "%s", msg);
    slot_done(&sl->xfer, CURLE_ABORTED_BY_CALLBACK);
}

static struct slot *slot_new(struct lane *ln)
{
    struct slot *sl = calloc(1, sizeof(*sl));

    if (sl == NULL)
        return NULL;
    sl->easy = curl_easy_init();
    if (sl->easy == NULL) {
        free(sl);
        return NULL;
    }
    sl->lane = ln;
    sl->pending.cancel = slot_cancel;
    sl->xfer.done = slot_done;
    buf_init(&sl->body);
    buf_init(&sl->reply);
    buf_init(&sl->headers);
    buf_init(&sl->id_json);
    buf_init(&sl->source);
    curl_easy_setopt(sl->easy, CURLOPT_URL, ln->url);
    curl_easy_setopt(sl->easy, CURLOPT_HTTPHEADER, ln->headers);
    curl_easy_setopt(sl->easy, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(sl->easy, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(sl->easy, CURLOPT_PRIVATE, &sl->xfer);
    curl_easy_setopt(sl->easy, CURLOPT_ERRORBUFFER, sl->errbuf);
    curl_easy_setopt(sl->easy, CURLOPT_WRITEFUNCTION, slot_write);
    curl_easy_setopt(sl->easy, CURLOPT_WRITEDATA, sl);
    curl_easy_setopt(sl->easy, CURLOPT_HEADERFUNCTION, slot_header);
    curl_easy_setopt(sl->easy, CURLOPT_HEADERDATA, sl);
    http_easy_sockets(sl->easy);
    http_easy_timeouts(sl->easy, &ln->timeouts);
    if (ln->ca_file || ln->ca_path)
        http_easy_ca(sl->easy, ln->ca_file, ln->ca_path);
    http_timers_init(&sl->timers, &ln->timeouts, slot_expired);
    return sl;
}

static void slot_free(struct slot *sl)
{
    http_timers_free(&sl->timers);
    curl_easy_cleanup(sl->easy);
    buf_free(&sl->body);
    buf_free(&sl->reply);
    buf_free(&sl->headers);
    buf_free(&sl->id_json);
    buf_free(&sl->source);
    free(sl);
}

/* A slot for a new request: a free one, else a new one (NULL when out of memory). */
static struct slot *slot_take(struct lane *ln)
{
    struct slot *sl = ln->free;

    if (sl) {
        ln->free = sl->next;
        return sl;
    }
    return slot_new(ln);
}

/* A request is in flight: while any is, the lane (at index 1 of L) keeps itself alive. */
static void lane_hold(lua_State *L, struct lane *ln)
{
    if (ln->inflight++ == 0) {
        lua_pushvalue(L, 1);
        ln->self_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    }
}

/* ---- working through an input file ----------------------------------------------------------- */

#define READ_BLOCK 65536

/* The next line of the input: 1 (line, len; or oversize > 0 with the length of a line longer than
 * max_line, which is skipped, never held), 0 at the end, -1 on a read error. */
static int read_line(struct reader *rd, const char **line, size_t *len, size_t *oversize)
{
    size_t skipped = 0;

    *oversize = 0;
    if (rd->buf.data == NULL)
        buf_reserve(&rd->buf, READ_BLOCK); /* base below is an offset into it, even while empty */
    for (;;) {
        char *base = rd->buf.data + rd->pos;
        size_t avail = rd->buf.len - rd->pos;
        char *nl = avail ? memchr(base, '\n', avail) : NULL;
        size_t n;

        if (nl) {
            n = (size_t)(nl - base);
            rd->pos += n + 1;
            rd->lineno++;
            if (skipped || n > rd->max_line) {
                *oversize = skipped + n;
                *len = 0;
                *line = "";
                return 1;
            }
            *line = base;
            *len = n;
            return 1;
        }
        if (rd->eof) {
            if (avail == 0 && skipped == 0)
                return 0;
            rd->pos += avail;
            rd->lineno++;
            if (skipped || avail > rd->max_line) {
                *oversize = skipped + avail;
                *len = 0;
                *line = "";
                return 1;
            }
            *line = base;
            *len = avail;
            return 1;
        }
        if (avail > rd->max_line) {
            /* Too long already: forget it and count the rest up to its newline. */
            skipped += avail;
            rd->buf.len = 0;
            rd->pos = 0;
            avail = 0;
        } else if (rd->pos > 0) {
            memmove(rd->buf.data, base, avail);
            rd->buf.len = avail;
            rd->pos = 0;
        }
        buf_reserve(&rd->buf, READ_BLOCK);
        n = fread(rd->buf.data + rd->buf.len, 1, READ_BLOCK, rd->in);
        rd->buf.len += n;
        if (n == 0) {
            if (ferror(rd->in))
                return -1;
            rd->eof = 1;
        }
    }
}

static int is_blank(const char *s, size_t len)
{
    size_t i;

    for (i = 0; i < len; i++)
        if (s[i] != ' ' && s[i] != '\t' && s[i] != '\r' && s[i] != '\n' && s[i] != '\f' && s[i] != '\v')
            return 0;
    return 1;
}

static void append_hex16(struct buf *b, unsigned long long v)
{
    static const char hex[] = "0123456789abcdef";
    char tmp[16];
    int i;

    for (i = 15; i >= 0; i--) {
        tmp[i] = hex[v & 15];
        v >>= 4;
    }
    buf_append(b, tmp, 16);
}

/* Fills the slot's request from a parsed line (the body, the id, the line number). */
static void slot_fill(struct lane *ln, struct slot *sl, const struct token *id, const struct token *prompt,
                      lua_Integer lineno)
{
    buf_reset(&sl->body);
    buf_append(&sl->body, ln->prefix.data, ln->prefix.len);
    APPEND_LIT(&sl->body, "[{\"content\":");
    buf_append(&sl->body, prompt->start, prompt->len);
    APPEND_LIT(&sl->body, ",\"role\":\"user\"}]");
    buf_append(&sl->body, ln->suffix.data, ln->suffix.len);
    sl->lineno = lineno;
    buf_reset(&sl->id_json);
    if (id->is_string) {
        buf_append(&sl->id_json, id->start, id->len);
    } else {
        buf_append_char(&sl->id_json, '"');
        buf_append(&sl->id_json, id->start, id->len);
        buf_append_char(&sl->id_json, '"');
    }
}

/* Starts the slot's request; 0, or -1 when curl refused it. */
static int slot_start(struct slot *sl)
{
    buf_reset(&sl->reply);
    buf_reset(&sl->headers);
    sl->status = 0;
    sl->received = 0;
    sl->errbuf[0] = '\0';
    sl->abort_msg[0] = '\0';
    curl_easy_setopt(sl->easy, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)sl->body.len);
    curl_easy_setopt(sl->easy, CURLOPT_POSTFIELDS, sl->body.data);
    sl->t0 = now_seconds();
    if (http_timers_start(&sl->timers) != 0 || http_client_add(sl->easy) != 0) {
        http_timers_stop(&sl->timers);
        return -1;
    }
    return 0;
}

/* Is id one of the results already in the output? */
static int already_done(struct lane *ln, lua_State *co, const struct token *id)
{
    int done;

    if (ln->done_ref == LUA_NOREF)
        return 0;
    lua_rawgeti(co, LUA_REGISTRYINDEX, ln->done_ref);
    if (id->is_string)
        lua_pushlstring(co, id->start + 1, id->len - 2);
    else
        lua_pushlstring(co, id->start, id->len);
    lua_rawget(co, -2);
    done = lua_toboolean(co, -1);
    lua_pop(co, 2);
    return done;
}

/* Takes input lines for the slot until one is sent (returns -1: in flight) or Lua is needed: then
 * pushes on co nil (end of input), "error", message (a read error) or "line", line, lineno[,
 * oversize] (a line for Lua: not for the engine, or the engine held) and returns their count. */
static int work_step(struct lane *ln, struct slot *sl, lua_State *co)
{
    for (;;) {
        const char *line;
        size_t len;
        size_t oversize;
        struct token id = { 0 };
        struct token prompt = { 0 };
        int rc = read_line(&ln->rd, &line, &len, &oversize);

        if (rc == 0) {
            lua_pushnil(co);
            return 1;
        }
        if (rc < 0) {
            lua_pushliteral(co, "error");
            lua_pushstring(co, strerror(errno));
            return 2;
        }
        if (oversize) {
            lua_pushliteral(co, "line");
            lua_pushliteral(co, "");
            lua_pushinteger(co, ln->rd.lineno);
            lua_pushinteger(co, (lua_Integer)oversize);
            return 4;
        }
        if (is_blank(line, len))
            continue;
        if (!ln->go || parse_line(ln, line, len, &id, &prompt) != 0) {
            lua_pushliteral(co, "line");
            lua_pushlstring(co, line, len);
            lua_pushinteger(co, ln->rd.lineno);
            return 3;
        }
        if (already_done(ln, co, &id))
            continue;
        slot_fill(ln, sl, &id, &prompt, ln->rd.lineno);
        buf_reset(&sl->source);
        buf_append(&sl->source, line, len);
        if (slot_start(sl) != 0) {
            lua_pushliteral(co, "reply");
            lua_pushlstring(co, line, len);
            lua_pushinteger(co, sl->lineno);
            lua_pushnumber(co, 0);
            lua_pushnil(co);
            lua_pushnil(co);
            lua_pushnil(co);
            lua_pushliteral(co, "error: cannot start the transfer");
            return 8;
        }
        return -1;
    }
}

/* A request sent by lane:work ended. A success written here goes on to the next line without Lua
 * while the lane may go on (lane:set_go), else resumes the task with "held"; anything else resumes
 * it with "reply", line, lineno, latency, status, headers, body (or nil, nil, nil, err for a
 * transport failure). */
static void work_done(struct slot *sl, CURLcode rc, double latency)
{
    struct lane *ln = sl->lane;
    struct task *t = sl->task;
    lua_State *co = task_thread(t);
    struct reply r;
    int nret;
    STACK_CHECK_BEGIN(co);

    if (rc == CURLE_OK && sl->status >= 200 && sl->status <= 299 && ln->out &&
        scan_reply(sl->reply.data ? sl->reply.data : "", sl->reply.len, &r) == 0) {
        int i;
        buf_reset(&ln->outline);
        APPEND_LIT(&ln->outline, "{\"id\":\"");
        buf_append(&ln->outline, ln->id_prefix.data, ln->id_prefix.len);
        append_hex16(&ln->outline, ++ln->counter);
        buf_append_char(&ln->outline, '"');
        build_line(&ln->outline, ln, sl, &r, latency);
        buf_append_char(&ln->outline, '\n');
        fwrite(ln->outline.data, 1, ln->outline.len, ln->out);
        ln->ok++;
        for (i = 0; i < 2; i++)
            ln->tokens[i] += r.has_usage[i] ? (lua_Integer)r.usage[i] : 0;
        ln->tokens[2] +=
            r.has_usage[2]
                ? (lua_Integer)r.usage[2]
                : (lua_Integer)((r.has_usage[0] ? r.usage[0] : 0) + (r.has_usage[1] ? r.usage[1] : 0));
        if (ln->nlat == ln->caplat) {
            size_t cap = ln->caplat ? ln->caplat * 2 : 256;
            double *p = realloc(ln->lat, cap * sizeof(*p));
            if (p == NULL) {
                fputs("aigate: out of memory\n", stderr);
                abort();
            }
            ln->lat = p;
            ln->caplat = cap;
        }
        ln->lat[ln->nlat++] = latency;
        if (!ln->go) {
            /* Held meanwhile (Ctrl-C, a 429, a breaker): Lua decides before another line is taken. */
            lua_pushliteral(co, "held");
            nret = 1;
        } else {
            nret = work_step(ln, sl, co);
            if (nret < 0)
                return; /* the next line is in flight on the same slot and task */
        }
    } else {
        lua_pushliteral(co, "reply");
        lua_pushlstring(co, sl->source.data ? sl->source.data : "", sl->source.len);
        lua_pushinteger(co, sl->lineno);
        lua_pushnumber(co, latency);
        push_outcome(co, sl, rc);
        nret = 8;
    }
    STACK_CHECK_END(co, nret);
    sl->working = 0;
    slot_finished(sl);
    task_resume(t, nret);
}

/* ---- the first pass over an input file: ids, duplicates, the total ---------------------------- */

/* The custom_id and id fields of a line (first character of each value, 0 when absent). */
struct line_ids {
    struct token ids[2];
    char kinds[2];
};

static int id_member(void *ctx, struct scan *s, const struct token *key)
{
    struct line_ids *li = ctx;
    struct token val;
    char kind;
    int i;

    if (key->escaped || scan_value(s, &val, &kind) != 0)
        return -1;
    i = key_is(key, "custom_id") ? 0 : key_is(key, "id") ? 1 : -1;
    if (i >= 0) {
        if (li->kinds[i])
            return -1; /* repeated */
        li->kinds[i] = kind;
        li->ids[i] = val;
    }
    return 0;
}

/* The id of a line when this scanner can tell it for sure: the "custom_id", else the "id", of a
 * JSON object, a string with nothing to unescape or an integer; "line-N" when it has neither.
 * Returns 1 with the id in out, 0 when Lua must decide (anything else, including invalid JSON). */
static int fast_line_id(const char *line, size_t len, lua_Integer lineno, struct buf *out)
{
    struct line_ids li;
    int i;

    memset(&li, 0, sizeof(li));
    if (scan_whole_object(line, len, id_member, &li) != 0)
        return 0;
    buf_reset(out);
    for (i = 0; i < 2; i++) {
        const struct token *v = &li.ids[i];
        if (li.kinds[i] == 0 || li.kinds[i] == 'n')
            continue; /* absent or null: the next field */
        if (li.kinds[i] == '"' && !v->escaped && v->len > 2) {
            buf_append(out, v->start + 1, v->len - 2);
            return 1;
        }
        if (plain_int(v, li.kinds[i])) {
            buf_append(out, v->start, v->len);
            return 1;
        }
        return 0;
    }
    APPEND_LIT(out, "line-");
    append_int(out, (long long)lineno);
    return 1;
}

/* A set of ids with the line each was first seen on (open addressing, FNV-1a). The ids' bytes are
 * kept one after another in an arena and a slot is 16 bytes, so a million ids take about 40 MB. */
struct identry {
    uint32_t off; /* in keys */
    uint32_t len;
    uint32_t hash;
    uint32_t lineno; /* 0: an empty slot */
};

struct idset {
    struct identry *e;
    size_t cap;
    size_t n;
    struct buf keys;
};

static uint32_t id_hash(const char *s, size_t len)
{
    uint32_t h = 2166136261u;
    size_t i;

    for (i = 0; i < len; i++) {
        h ^= (unsigned char)s[i];
        h *= 16777619u;
    }
    return h;
}

/* Adds id; returns 0 when new, or the line it was first seen on. -1 when out of memory. */
static lua_Integer idset_add(struct idset *set, const char *id, size_t len, lua_Integer lineno)
{
    uint32_t h = id_hash(id, len);
    size_t i;

    if ((set->n + 1) * 4 > set->cap * 3) {
        size_t cap = set->cap ? set->cap * 2 : 1024;
        struct identry *e = calloc(cap, sizeof(*e));
        if (e == NULL)
            return -1;
        for (i = 0; i < set->cap; i++) {
            if (set->e[i].lineno) {
                size_t j = set->e[i].hash & (cap - 1);
                while (e[j].lineno)
                    j = (j + 1) & (cap - 1);
                e[j] = set->e[i];
            }
        }
        free(set->e);
        set->e = e;
        set->cap = cap;
    }
    i = h & (set->cap - 1);
    while (set->e[i].lineno) {
        const struct identry *x = &set->e[i];
        if (x->hash == h && x->len == len && memcmp(set->keys.data + x->off, id, len) == 0)
            return x->lineno;
        i = (i + 1) & (set->cap - 1);
    }
    if (set->keys.len + len > UINT32_MAX || len > UINT32_MAX)
        return -1;
    set->e[i].off = (uint32_t)set->keys.len;
    set->e[i].len = (uint32_t)len;
    set->e[i].hash = h;
    set->e[i].lineno = lineno > (lua_Integer)UINT32_MAX ? UINT32_MAX : (uint32_t)lineno;
    buf_append(&set->keys, id, len);
    set->n++;
    return 0;
}

static void idset_free(struct idset *set)
{
    free(set->e);
    buf_free(&set->keys);
}

/* core.scan_ids(path, max_line, done, line_id) -> total, skipped, ndup, dups; or nil, err.
 * The first pass of `aigate batch` over a file: every line's id (by fast_line_id, else by calling
 * line_id(line, lineno) in Lua), total = lines to run (first occurrences not in done), skipped =
 * first occurrences in done, ndup duplicates, dups the first ten as "id 'x' on lines a and b". */
int core_scan_ids(lua_State *L)
{
    struct reader rd;
    struct idset set = { NULL, 0, 0, { NULL, 0, 0 } };
    struct buf id;
    const char *path = luaL_checkstring(L, 1);
    lua_Integer total = 0, skipped = 0, ndup = 0;
    int has_done;
    int rc;

    rd.max_line = (size_t)luaL_checkinteger(L, 2);
    has_done = lua_istable(L, 3);
    luaL_checktype(L, 4, LUA_TFUNCTION);
    lua_settop(L, 4);
    lua_newtable(L); /* 5: dups */
    rd.in = fopen(path, "rb");
    if (rd.in == NULL) {
        lua_pushnil(L);
        lua_pushfstring(L, "%s: %s", path, strerror(errno));
        return 2;
    }
    buf_init(&rd.buf);
    rd.pos = 0;
    rd.eof = 0;
    rd.lineno = 0;
    buf_init(&id);
    for (;;) {
        const char *line;
        size_t len;
        size_t oversize;
        lua_Integer first;

        rc = read_line(&rd, &line, &len, &oversize);
        if (rc <= 0)
            break;
        if (oversize) {
            buf_reset(&id);
            APPEND_LIT(&id, "line-");
            append_int(&id, (long long)rd.lineno);
        } else if (is_blank(line, len)) {
            continue;
        } else if (!fast_line_id(line, len, rd.lineno, &id)) {
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
    fclose(rd.in);
    buf_free(&rd.buf);
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
    return 4;
}

/* ---- the Lua object -------------------------------------------------------------------------- */

static struct lane *check_lane(lua_State *L)
{
    struct lane *ln = luaL_checkudata(L, 1, LANE_MT);
    if (ln->url == NULL)
        luaL_error(L, "attempt to use a closed lane");
    return ln;
}

/* lane:stage(line, lineno) -> the line's id, or nil when the line is not for this lane. */
static int lane_stage(lua_State *L)
{
    struct lane *ln = check_lane(L);
    size_t len;
    const char *line = luaL_checklstring(L, 2, &len);
    lua_Integer lineno = luaL_checkinteger(L, 3);
    struct token id = { 0 };
    struct token prompt = { 0 };
    struct slot *sl;

    if (parse_line(ln, line, len, &id, &prompt) != 0) {
        lua_pushnil(L);
        return 1;
    }
    sl = ln->staged ? ln->staged : slot_take(ln);
    if (sl == NULL)
        return luaL_error(L, "out of memory");
    ln->staged = sl;
    slot_fill(ln, sl, &id, &prompt, lineno);
    if (id.is_string)
        lua_pushlstring(L, id.start + 1, id.len - 2);
    else
        lua_pushlstring(L, id.start, id.len);
    return 1;
}

/* lane:send() yields: sends the line staged last (see slot_done for what comes back). */
static int lane_send(lua_State *L)
{
    struct lane *ln = check_lane(L);
    struct task *t = task_check(L);
    struct slot *sl = ln->staged;

    if (sl == NULL)
        return luaL_error(L, "lane:send: no line staged");
    ln->staged = NULL;
    sl->task = t;
    if (slot_start(sl) != 0) {
        slot_release(sl);
        lua_pushboolean(L, 0);
        lua_pushnumber(L, 0);
        lua_pushnil(L);
        lua_pushnil(L);
        lua_pushnil(L);
        lua_pushstring(L, "error: cannot start the transfer");
        return 6;
    }
    lane_hold(L, ln);
    lua_settop(L, 0);
    return task_yield(L, t, &sl->pending);
}

static void field_buf_at(lua_State *L, int idx, const char *name, struct buf *b);

static void detach(lua_State *L, struct lane *ln)
{
    if (ln->rd.in)
        fclose(ln->rd.in);
    ln->rd.in = NULL;
    ln->out = NULL;
    luaL_unref(L, LUA_REGISTRYINDEX, ln->out_ref);
    luaL_unref(L, LUA_REGISTRYINDEX, ln->done_ref);
    ln->out_ref = ln->done_ref = LUA_NOREF;
}

/* A larger buffer for an output file than glibc's default of one block (4 KiB: Lua's setvbuf
 * cannot pass a size glibc keeps): a 700-byte result line then costs a fraction of a write call.
 * The buffer must outlive the stream, which Lua closes later, so buffers are never freed; a
 * process runs few batches (tests run several), and past OUT_BUFFERS streams keep glibc's. */
#define OUT_BUFFER  (256 * 1024)
#define OUT_BUFFERS 32
static char *out_buffers[OUT_BUFFERS];
static int n_out_buffers;

static void give_buffer(FILE *f)
{
    char *b;

    if (f == stdout || n_out_buffers == OUT_BUFFERS)
        return;
    b = malloc(OUT_BUFFER);
    if (b == NULL)
        return;
    if (setvbuf(f, b, _IOFBF, OUT_BUFFER) != 0) {
        free(b);
        return;
    }
    out_buffers[n_out_buffers++] = b;
}

/* lane:attach{input = path, output = file, max_line = n, done = table|nil, id_prefix = s}
 * -> true or nil, err. */
static int lane_attach(lua_State *L)
{
    struct lane *ln = check_lane(L);
    luaL_Stream *out;
    const char *path;

    luaL_checktype(L, 2, LUA_TTABLE);
    lua_getfield(L, 2, "output");
    out = luaL_checkudata(L, -1, LUA_FILEHANDLE);
    if (out->closef == NULL)
        return luaL_error(L, "lane:attach: the output is closed");
    detach(L, ln);
    ln->out = out->f;
    ln->out_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    give_buffer(ln->out);
    lua_getfield(L, 2, "done");
    if (lua_istable(L, -1))
        ln->done_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    else
        lua_pop(L, 1);
    lua_getfield(L, 2, "max_line");
    ln->rd.max_line = (size_t)luaL_checkinteger(L, -1);
    lua_pop(L, 1);
    buf_reset(&ln->id_prefix);
    field_buf_at(L, 2, "id_prefix", &ln->id_prefix);
    lua_getfield(L, 2, "input");
    path = luaL_checkstring(L, -1);
    ln->rd.in = fopen(path, "rb");
    if (ln->rd.in == NULL) {
        lua_pushnil(L);
        lua_pushfstring(L, "%s: %s", path, strerror(errno));
        return 2;
    }
    lua_pop(L, 1);
    buf_reset(&ln->rd.buf);
    ln->rd.pos = 0;
    ln->rd.eof = 0;
    ln->rd.lineno = 0;
    lua_pushboolean(L, 1);
    return 1;
}

static int lane_detach(lua_State *L)
{
    detach(L, check_lane(L));
    return 0;
}

/* lane:work() yields while lines go by the engine; see work_step and work_done for what comes back. */
static int lane_work(lua_State *L)
{
    struct lane *ln = check_lane(L);
    struct task *t = task_check(L);
    struct slot *sl;
    int nret;

    if (ln->rd.in == NULL)
        return luaL_error(L, "lane:work: no input attached");
    sl = slot_take(ln);
    if (sl == NULL)
        return luaL_error(L, "out of memory");
    sl->task = t;
    sl->working = 1;
    lua_settop(L, 1);
    nret = work_step(ln, sl, L);
    if (nret >= 0) {
        sl->working = 0;
        slot_release(sl);
        return nret;
    }
    lane_hold(L, ln);
    lua_settop(L, 0);
    return task_yield(L, t, &sl->pending);
}

static int lane_set_go(lua_State *L)
{
    check_lane(L)->go = lua_toboolean(L, 2);
    return 0;
}

/* lane:next_id() -> the next result id ("batch_req_" run prefix, 16 hex digits). */
static int lane_next_id(lua_State *L)
{
    struct lane *ln = check_lane(L);
    struct buf b;

    buf_init(&b);
    buf_append(&b, ln->id_prefix.data, ln->id_prefix.len);
    append_hex16(&b, ++ln->counter);
    lua_pushlstring(L, b.data, b.len);
    buf_free(&b);
    return 1;
}

/* lane:drain() -> ok, prompt, completion, total tokens, {latencies} of the results written here
 * since the last drain. */
static int lane_drain(lua_State *L)
{
    struct lane *ln = check_lane(L);
    size_t i;

    lua_pushinteger(L, ln->ok);
    lua_pushinteger(L, ln->tokens[0]);
    lua_pushinteger(L, ln->tokens[1]);
    lua_pushinteger(L, ln->tokens[2]);
    lua_createtable(L, (int)ln->nlat, 0);
    for (i = 0; i < ln->nlat; i++) {
        lua_pushnumber(L, ln->lat[i]);
        lua_rawseti(L, -2, (lua_Integer)i + 1);
    }
    ln->ok = 0;
    ln->tokens[0] = ln->tokens[1] = ln->tokens[2] = 0;
    ln->nlat = 0;
    return 5;
}

static int lane_gc(lua_State *L)
{
    struct lane *ln = luaL_checkudata(L, 1, LANE_MT);
    struct slot *sl;

    /* Every field is freed whatever was set: a lane whose construction failed is collected too. */
    if (ln->staged)
        slot_free(ln->staged);
    while ((sl = ln->free) != NULL) {
        ln->free = sl->next;
        slot_free(sl);
    }
    detach(L, ln);
    curl_slist_free_all(ln->headers);
    free(ln->url);
    free(ln->model);
    free(ln->ca_file);
    free(ln->ca_path);
    buf_free(&ln->prefix);
    buf_free(&ln->suffix);
    buf_free(&ln->model_part);
    buf_free(&ln->route_part);
    buf_free(&ln->attempt_part);
    buf_free(&ln->request_id_headers);
    buf_free(&ln->id_prefix);
    buf_free(&ln->rd.buf);
    buf_free(&ln->outline);
    free(ln->lat);
    memset(ln, 0, sizeof(*ln));
    return 0;
}

static void field_buf_at(lua_State *L, int idx, const char *name, struct buf *b)
{
    size_t len;
    const char *s;

    lua_getfield(L, idx, name);
    s = lua_tolstring(L, -1, &len);
    if (s == NULL || lua_type(L, -1) != LUA_TSTRING)
        luaL_error(L, "bad field '%s' to 'lane' (string expected, got %s)", name, luaL_typename(L, -1));
    buf_append(b, s, len);
    lua_pop(L, 1);
}

static void field_buf(lua_State *L, const char *name, struct buf *b)
{
    field_buf_at(L, 1, name, b);
}

static char *field_string(lua_State *L, const char *name)
{
    struct buf b;
    char *s;

    buf_init(&b);
    field_buf(L, name, &b);
    s = strndup(b.data ? b.data : "", b.len);
    buf_free(&b);
    if (s == NULL)
        luaL_error(L, "out of memory");
    return s;
}

/* A copy of s, or NULL for NULL; raises when out of memory. */
static char *copy_or_null(lua_State *L, const char *s)
{
    char *c;

    if (s == NULL)
        return NULL;
    c = strdup(s);
    if (c == NULL)
        luaL_error(L, "out of memory");
    return c;
}

/* core.lane{url, headers, prefix, suffix, model, model_part, route_part, attempt_part[, timeouts,
 * ca_file, ca_path, request_id_headers]} -> lane. */
int core_lane(lua_State *L)
{
    struct lane *ln;
    struct buf line;
    const char *ca_file;
    const char *ca_path;

    luaL_checktype(L, 1, LUA_TTABLE);
    ln = lua_newuserdatauv(L, sizeof(*ln), 0);
    memset(ln, 0, sizeof(*ln));
    ln->self_ref = LUA_NOREF;
    ln->out_ref = LUA_NOREF;
    ln->done_ref = LUA_NOREF;
    buf_init(&ln->rd.buf);
    buf_init(&ln->id_prefix);
    buf_init(&ln->outline);
    buf_init(&ln->prefix);
    buf_init(&ln->suffix);
    buf_init(&ln->model_part);
    buf_init(&ln->route_part);
    buf_init(&ln->attempt_part);
    buf_init(&ln->request_id_headers);
    luaL_setmetatable(L, LANE_MT);
    ln->url = field_string(L, "url");
    ln->model = field_string(L, "model");
    field_buf(L, "prefix", &ln->prefix);
    field_buf(L, "suffix", &ln->suffix);
    field_buf(L, "model_part", &ln->model_part);
    field_buf(L, "route_part", &ln->route_part);
    field_buf(L, "attempt_part", &ln->attempt_part);
    lua_getfield(L, 1, "request_id_headers");
    if (!lua_isnil(L, -1)) {
        lua_Integer i;
        luaL_checktype(L, -1, LUA_TTABLE);
        for (i = 1; lua_rawgeti(L, -1, i) == LUA_TSTRING; i++) {
            buf_append(&ln->request_id_headers, lua_tostring(L, -1), lua_rawlen(L, -1));
            buf_append_char(&ln->request_id_headers, '\0');
            lua_pop(L, 1);
        }
        lua_pop(L, 1);
    }
    lua_pop(L, 1);
    http_read_timeouts(L, 1, "field", "lane", &ln->timeouts);
    http_read_ca(L, 1, "field", "lane", &ca_file, &ca_path);
    ln->ca_file = copy_or_null(L, ca_file);
    ln->ca_path = copy_or_null(L, ca_path);
    lua_getfield(L, 1, "headers");
    if (!lua_istable(L, -1))
        return luaL_error(L, "bad field 'headers' to 'lane' (table expected, got %s)", luaL_typename(L, -1));
    buf_init(&line);
    lua_pushnil(L);
    while (lua_next(L, -2)) {
        if (lua_type(L, -2) != LUA_TSTRING || lua_type(L, -1) != LUA_TSTRING) {
            buf_free(&line);
            return luaL_error(L, "bad field 'headers' to 'lane' (names and values must be strings)");
        }
        buf_reset(&line);
        buf_append(&line, lua_tostring(L, -2), lua_rawlen(L, -2));
        if (lua_rawlen(L, -1) == 0) {
            buf_append_char(&line, ';');
        } else {
            APPEND_LIT(&line, ": ");
            buf_append(&line, lua_tostring(L, -1), lua_rawlen(L, -1));
        }
        ln->headers = curl_slist_append(ln->headers, line.data);
        lua_pop(L, 1);
    }
    buf_free(&line);
    lua_pop(L, 1);
    ln->headers = curl_slist_append(ln->headers, "Expect:");
    return 1;
}

void core_register_lane(lua_State *L)
{
    static const luaL_Reg methods[] = {
        { "stage", lane_stage },     { "send", lane_send },   { "attach", lane_attach },
        { "detach", lane_detach },   { "work", lane_work },   { "set_go", lane_set_go },
        { "next_id", lane_next_id }, { "drain", lane_drain }, { NULL, NULL },
    };

    if (luaL_newmetatable(L, LANE_MT)) {
        luaL_newlib(L, methods);
        lua_setfield(L, -2, "__index");
        lua_pushcfunction(L, lane_gc);
        lua_setfield(L, -2, "__gc");
    }
    lua_pop(L, 1);
}
