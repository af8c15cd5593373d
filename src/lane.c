/*
 * lane.c: `core.lane(spec)`, the batch engine's fast path for lines whose request is a fixed body
 * with one prompt in it (see CORE_API.md).
 *
 * The policy stays in Lua: aigate.batch asks the policy for a model's lane, and only when the lane
 * is a plain target with nothing per line but the prompt does it make an engine here with the
 * prepared request (URL, headers, the body around the messages) and the fixed parts of a result
 * line. For each line, `stage` reads the line with the strict JSON scanner of src/jsonscan.c and
 * accepts only the short form {"id", "prompt"[, "model"]} with nothing to unescape; `send` posts it
 * on the shared curl multi handle and yields. When the reply is a 2xx chat completion of the usual shape
 * (valid JSON, choices, integer usage, nothing to re-escape), the task gets the result line built here; for
 * anything else it gets the reply (or the transport error) and Lua runs it through the general
 * path, so every unusual case is decided by the same code as aigate.chat.
 */
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <unistd.h>

#include <curl/curl.h>
#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>

#include "aigate.h"
#include "buf.h"
#include "clock.h"
#include "http.h"
#include "jsonscan.h"
#include "linereader.h"
#include "scan.h"

#define LANE_MT "aigate.lane"

#define APPEND_LIT(b, s) buf_append((b), (s), sizeof(s) - 1)

struct lane;
struct input;

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
    size_t max_size;                                 /* the largest reply body */
    struct buf prefix, suffix;                       /* the request body around the messages */
    struct buf model_part, route_part, attempt_part; /* fixed pieces of a result line */
    struct buf request_id_headers;                   /* "name\0name\0...": where a reply's id is, in order */
    struct slot *free;
    struct slot *staged;
    int inflight; /* slots sent and not done: while > 0 the lane keeps itself alive (self_ref) */
    int self_ref;
    /* lane:attach: working through an input file */
    struct line_reader rd; /* rd.fd < 0: detached */
    FILE *out;             /* the output, a Lua file handle kept alive by out_ref */
    int out_ref;
    int done_ref;        /* the ids already in the output (a table), or LUA_NOREF */
    struct input *input; /* what the first pass read, kept alive by input_ref; NULL: not checked */
    int input_ref;
    int changed;          /* the input is not what the first pass read: no line is taken any more */
    int go;               /* lane:set_go: may a worker go on to its next line without Lua */
    struct buf id_prefix; /* "batch_req_<run prefix>" */
    unsigned long long counter;
    lua_Integer ok, tokens[3]; /* since the last drain */
    double *lat;
    size_t nlat, caplat;
    struct buf outline;
};

/* ---- replies --------------------------------------------------------------------------------- */

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
static int scan_reply(const char *body, size_t len, struct reply *r)
{
    memset(r, 0, sizeof(*r));
    /* The result line carries the reply's bytes: one line, an object from its first byte to its
     * last. */
    if (len == 0 || body[0] != '{' || body[len - 1] != '}' || memchr(body, '\n', len) ||
        memchr(body, '\r', len))
        return -1;
    if (js_scan_whole_object(body, len, reply_member, r) != 0 || r->bad || !r->choices_ok)
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

static size_t slot_write(char *data, size_t size, size_t nmemb, void *userdata)
{
    struct slot *sl = userdata;
    size_t len = size * nmemb;

    http_timers_progress(&sl->timers);
    sl->received += len;
    if (sl->received > sl->lane->max_size)
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
            http_push_error(co, rc, sl->errbuf, sl->received, sl->lane->max_size);
    }
}

static void slot_done(struct xfer *x, CURLcode rc)
{
    struct slot *sl = (struct slot *)(void *)((char *)x - offsetof(struct slot, xfer));
    struct task *t = sl->task;
    lua_State *co = task_thread(t);
    double latency = monotonic_seconds() - sl->t0;
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
static void slot_fill(struct lane *ln, struct slot *sl, const struct js_token *id,
                      const struct js_token *prompt, lua_Integer lineno)
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
    sl->t0 = monotonic_seconds();
    if (http_timers_start(&sl->timers) != 0 || http_client_add(sl->easy) != 0) {
        http_timers_stop(&sl->timers);
        return -1;
    }
    return 0;
}

/* Is id one of the results already in the output? */
static int already_done(struct lane *ln, lua_State *co, const struct js_token *id)
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
        const char *line = "";
        size_t len = 0;
        size_t oversize = 0;
        struct js_token id = { 0 };
        struct js_token prompt = { 0 };
        const char *changed = ln->changed ? "it changed" : NULL;
        char why[160];
        int rc;

        if (ln->rd.fd < 0) {
            lua_pushnil(co); /* detached (the batch stopped): no more lines */
            return 1;
        }
        rc = changed ? 1 : line_reader_next(&ln->rd, &line, &len, &oversize);

        if (rc == 0) {
            if (ln->input)
                changed = input_end_differs(ln->input, ln->rd.lineno, ln->rd.consumed, why, sizeof(why));
            if (changed == NULL) {
                lua_pushnil(co);
                return 1;
            }
        }
        if (rc < 0) {
            lua_pushliteral(co, "error");
            lua_pushstring(co, strerror(errno));
            return 2;
        }
        if (changed == NULL && ln->input)
            changed = input_line_differs(ln->input, ln->rd.lineno, line, len, oversize, why, sizeof(why));
        if (changed) {
            ln->changed = 1;
            lua_pushliteral(co, "changed");
            lua_pushstring(co, changed);
            return 2;
        }
        if (oversize) {
            lua_pushliteral(co, "line");
            lua_pushliteral(co, "");
            lua_pushinteger(co, ln->rd.lineno);
            lua_pushinteger(co, (lua_Integer)oversize);
            return 4;
        }
        if (line_is_blank(line, len))
            continue;
        if (!ln->go || js_short_line(line, len, ln->model, &id, &prompt) != 0) {
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
    struct js_token id = { 0 };
    struct js_token prompt = { 0 };
    struct slot *sl;

    if (js_short_line(line, len, ln->model, &id, &prompt) != 0) {
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
    if (ln->rd.fd >= 0)
        close(ln->rd.fd);
    line_reader_free(&ln->rd);
    ln->rd.fd = -1;
    ln->out = NULL;
    ln->input = NULL;
    luaL_unref(L, LUA_REGISTRYINDEX, ln->out_ref);
    luaL_unref(L, LUA_REGISTRYINDEX, ln->done_ref);
    luaL_unref(L, LUA_REGISTRYINDEX, ln->input_ref);
    ln->out_ref = ln->done_ref = ln->input_ref = LUA_NOREF;
}

/* lane:attach{input = path, output = file, max_line = n, done = table|nil, id_prefix = s,
 * first_pass = input|nil} -> true or nil, err. */
static int lane_attach(lua_State *L)
{
    struct lane *ln = check_lane(L);
    luaL_Stream *out;
    const char *path;
    size_t max_line;
    int fd;

    luaL_checktype(L, 2, LUA_TTABLE);
    lua_getfield(L, 2, "output");
    out = luaL_checkudata(L, -1, LUA_FILEHANDLE);
    if (out->closef == NULL)
        return luaL_error(L, "lane:attach: the output is closed");
    detach(L, ln);
    ln->out = out->f;
    ln->out_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_getfield(L, 2, "done");
    if (lua_istable(L, -1))
        ln->done_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    else
        lua_pop(L, 1);
    lua_getfield(L, 2, "first_pass");
    if (!lua_isnil(L, -1)) {
        ln->input = input_arg(L, -1);
        ln->input_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    } else {
        lua_pop(L, 1);
    }
    ln->changed = 0;
    lua_getfield(L, 2, "max_line");
    max_line = (size_t)luaL_checkinteger(L, -1);
    lua_pop(L, 1);
    buf_reset(&ln->id_prefix);
    field_buf_at(L, 2, "id_prefix", &ln->id_prefix);
    lua_getfield(L, 2, "input");
    path = luaL_checkstring(L, -1);
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        lua_pushnil(L);
        lua_pushfstring(L, "%s: %s", path, strerror(errno));
        return 2;
    }
    lua_pop(L, 1);
    line_reader_init(&ln->rd, fd, max_line);
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

    if (ln->rd.fd < 0)
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
    line_reader_free(&ln->rd);
    buf_free(&ln->outline);
    free(ln->lat);
    memset(ln, 0, sizeof(*ln));
    ln->rd.fd = -1; /* not standard input */
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
 * ca_file, ca_path, request_id_headers, max_size]} -> lane. */
int core_lane(lua_State *L)
{
    struct lane *ln;
    const char *ca_file;
    const char *ca_path;

    luaL_checktype(L, 1, LUA_TTABLE);
    ln = lua_newuserdatauv(L, sizeof(*ln), 0);
    memset(ln, 0, sizeof(*ln));
    ln->self_ref = LUA_NOREF;
    ln->out_ref = LUA_NOREF;
    ln->done_ref = LUA_NOREF;
    ln->input_ref = LUA_NOREF;
    line_reader_init(&ln->rd, -1, 0); /* detached */
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
    ln->max_size = HTTP_DEFAULT_MAX_SIZE;
    lua_getfield(L, 1, "max_size");
    if (!lua_isnil(L, -1)) {
        int isnum;
        lua_Integer n = lua_tointegerx(L, -1, &isnum);
        if (!isnum || n <= 0)
            return luaL_error(L, "bad field 'max_size' to 'lane' (positive integer expected)");
        ln->max_size = (size_t)n;
    }
    lua_pop(L, 1);
    ln->ca_file = copy_or_null(L, ca_file);
    ln->ca_path = copy_or_null(L, ca_path);
    lua_getfield(L, 1, "headers");
    if (!lua_istable(L, -1))
        return luaL_error(L, "bad field 'headers' to 'lane' (table expected, got %s)", luaL_typename(L, -1));
    if (header_list_from_table(L, -1, &ln->headers) != 0)
        return luaL_error(L, "bad field 'headers' to 'lane' (names and values must be strings)");
    lua_pop(L, 1);
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
