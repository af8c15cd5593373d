/*
 * engine.c: `core.engine(spec)`, the batch engine: the input lines of a batch read, sent and their
 * results written in C while nothing about a line needs Lua (see CORE_API.md).
 *
 * The engine replays; it does not decide. It reads every line of the input (a file or standard
 * input), applies the id rule (jsonscan.h) and the run's bookkeeping (ids already in the output,
 * repeated ids on standard input), and reads the line's shape (lineshape.h). For each new shape, the
 * model, the form of the messages and the names of the parameters, it asks Lua once (spec.render):
 * Lua answers with what the policy would send for it, as a request body template with typed holes
 * and the group (one model as the policy sends it: URL, headers, limits and the template of the
 * result line), or false when such lines need the general path (a route, a hook, a template ...).
 * Each distinct parameter value is checked by Lua once too (the check of the form). A line of such a
 * shape is then sent here, and a reply that is a plain 2xx completion is written here with the
 * group's result template, which Lua rendered (src/tmpl.h): C fills holes and knows no format.
 * Everything else comes back to Lua: a line the engine does not take (any shape it was not given,
 * or while held) as "line", and the reply of a line it sent and does not finish (an error status, a
 * reply of another shape, a transport failure) as "reply", which Lua hands to aigate.chat so that the
 * policy goes on from it (retries, fallbacks) exactly as if it had sent the request itself.
 */
#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <curl/curl.h>
#include <event2/event.h>
#include <lauxlib.h>
#include <lua.h>

#include "aigate.h"
#include "buf.h"
#include "clock.h"
#include "headers.h"
#include "http.h"
#include "idset.h"
#include "jsonscan.h"
#include "jsontext.h"
#include "lineshape.h"
#include "linereader.h"
#include "reply.h"
#include "scan.h"
#include "tmpl.h"

#define ENGINE_MT "aigate.engine"

#define APPEND_LIT(b, s) buf_append((b), (s), sizeof(s) - 1)

#define MAX_FORMS    4096 /* shapes rendered; lines of more go to the general path */
#define MAX_GROUPS   1024
#define MEMO_MAX     1024 /* parameter values checked per form */
#define FORM_BUCKETS 1024
#define MAX_KEY      4096 /* a shape's key longer than this is not the engine's */

struct engine;

/* One model as the policy sends it. */
struct group {
    char *url;
    struct curl_slist *headers;
    struct http_timeouts timeouts;
    char *ca_file, *ca_path;
    size_t max_size;
    struct tmpl *result; /* the result line of a success */
    int go;
    lua_Integer ok, tokens[3]; /* since the last drain */
};

/* A parameter value Lua checked, by its raw text (first byte: the parameter's index). */
struct memo {
    uint32_t hash;
    char ok;
    char *text;
    size_t len;
};

/* One shape: a model, the form of its messages, the names of its parameters. */
struct form {
    struct form *next; /* in its bucket */
    char *key;
    size_t keylen;
    uint32_t hash;
    int group; /* -1: lines of this shape take the general path */
    struct tmpl *body;
    int check_ref; /* Lua's check(index, raw) of a parameter value */
    struct memo *memo;
    size_t nmemo, capmemo;
};

struct slot {
    struct pending pending; /* the task's wait */
    struct xfer xfer;       /* CURLOPT_PRIVATE */
    struct engine *en;
    struct task *task;
    CURL *easy;
    int group;          /* of the request in flight; the handle is set up for it */
    int set_group;      /* the group the handle's options are set for (-1: none) */
    struct buf body;    /* the request body */
    struct buf reply;   /* the response body */
    struct buf headers; /* "name\0value\0" of the response */
    struct buf id;      /* the line's id */
    struct buf source;  /* the input line, for Lua when the reply is not written here */
    long status;
    size_t received;
    lua_Integer lineno;
    double t0;
    int waiting_input; /* on the engine's list of slots waiting for standard input */
    struct slot *next; /* free list, or the list of slots waiting for input */
    struct http_timers timers;
    char abort_msg[128]; /* a timer's error, when one ended the request */
    char errbuf[CURL_ERROR_SIZE];
};

struct engine {
    lua_State *cb; /* a thread of its own for the calls into Lua (render, check) */
    int cb_ref;
    int render_ref;
    struct line_reader rd;
    int reading;       /* rd is open */
    int own_fd;        /* the engine opened the input (not standard input) */
    int restore_flags; /* standard input's flags before O_NONBLOCK, or -1 */
    struct event *readable;
    struct slot *waiting; /* slots waiting for input */
    FILE *out;            /* the output, a Lua file handle kept alive by out_ref */
    int write_errno;      /* the first failed write of a result line (0: none), for drain */
    int out_ref;
    int done_ref;        /* the ids already in the output (a table), or LUA_NOREF */
    struct input *input; /* what the first pass read, kept alive by input_ref; NULL: not checked */
    int input_ref;
    struct idset seen; /* ids of standard input so far (no first pass there) */
    int check_seen;
    int changed; /* the input is not what the first pass read: no line is taken any more */
    int go;      /* may a worker go on to its next line without Lua */
    int closed;
    struct buf id_prefix; /* "batch_req_<run prefix>" */
    unsigned long long counter;
    struct form *buckets[FORM_BUCKETS];
    size_t nforms;
    struct group *groups;
    int ngroups;
    double *lat; /* latencies of the results written here since the last drain */
    size_t nlat, caplat;
    struct slot *free;
    int inflight; /* slots sent and not done: while > 0 the engine keeps itself alive (self_ref) */
    int self_ref;
    struct buf outline, key, scratch, idbuf;
};

/* The value names of result templates (tmpl.h) the engine fills. */
enum {
    V_REQ_ID,
    V_CUSTOM_ID,
    V_STATUS,
    V_REQUEST_ID,
    V_BODY,
    V_LINE,
    V_RESPONSE_MODEL,
    V_LATENCY,
    V_USAGE,
    V_PROMPT_TOKENS,
    V_COMPLETION_TOKENS,
    V_TOTAL_TOKENS,
    V_CACHE_STATUS
};
static const char *const RESULT_NAMES[] = { "req_id",
                                            "custom_id",
                                            "status",
                                            "request_id",
                                            "body",
                                            "line",
                                            "response_model",
                                            "latency",
                                            "usage",
                                            "prompt_tokens",
                                            "completion_tokens",
                                            "total_tokens",
                                            "cache_status",
                                            NULL };

/* The value names of body templates: the prompt, the contents of the messages, the parameters (in
 * the order of their names). */
#define BODY_CONTENT 1
#define BODY_PARAM   (BODY_CONTENT + SHAPE_MAX_MESSAGES)
static const char *BODY_NAMES[BODY_PARAM + SHAPE_MAX_PARAMS + 1];
static char body_name_text[SHAPE_MAX_MESSAGES + SHAPE_MAX_PARAMS][16];

static void body_names_init(void)
{
    int i;

    if (BODY_NAMES[0])
        return;
    BODY_NAMES[0] = "prompt";
    for (i = 0; i < SHAPE_MAX_MESSAGES; i++) {
        snprintf(body_name_text[i], sizeof(body_name_text[i]), "content%d", i + 1);
        BODY_NAMES[BODY_CONTENT + i] = body_name_text[i];
    }
    for (i = 0; i < SHAPE_MAX_PARAMS; i++) {
        snprintf(body_name_text[SHAPE_MAX_MESSAGES + i], sizeof(body_name_text[0]), "param%d", i + 1);
        BODY_NAMES[BODY_PARAM + i] = body_name_text[SHAPE_MAX_MESSAGES + i];
    }
    BODY_NAMES[BODY_PARAM + SHAPE_MAX_PARAMS] = NULL;
}

/* ---- filling a result line --------------------------------------------------------------------- */

struct result_ctx {
    struct engine *en;
    struct slot *sl;
    const struct reply *r;
    double latency;
    struct buf *hv; /* a header's value */
};

static void result_value(void *ctx, const struct tmpl_op *op, struct tmpl_value *v)
{
    struct result_ctx *c = ctx;
    const struct reply *r = c->r;
    struct slot *sl = c->sl;
    int i;

    if (op->nheaders > 0) {
        for (i = 0; i < op->nheaders; i++) {
            buf_reset(c->hv);
            if (header_value(&sl->headers, op->headers[i], c->hv) && c->hv->len > 0) {
                v->type = 's';
                v->s = c->hv->data;
                v->len = c->hv->len;
                return;
            }
        }
        return;
    }
    switch (op->src) {
    case V_REQ_ID:
        v->type = 's';
        v->s = c->en->scratch.data;
        v->len = c->en->scratch.len;
        break;
    case V_CUSTOM_ID:
        v->type = 's';
        v->s = sl->id.data ? sl->id.data : "";
        v->len = sl->id.len;
        break;
    case V_STATUS:
        v->type = 'i';
        v->i = sl->status;
        break;
    case V_BODY:
        v->type = 's';
        v->s = sl->reply.data ? sl->reply.data : "";
        v->len = sl->reply.len;
        break;
    case V_LINE:
        v->type = 'i';
        v->i = sl->lineno;
        break;
    case V_RESPONSE_MODEL:
        if (reply_model(r, c->hv, &v->s, &v->len))
            v->type = 's';
        break;
    case V_LATENCY:
        v->type = 'd';
        v->d = c->latency;
        break;
    case V_USAGE:
        if (r->has_usage[0] || r->has_usage[1] || r->has_usage[2])
            v->type = 'i';
        break;
    case V_PROMPT_TOKENS:
    case V_COMPLETION_TOKENS:
    case V_TOTAL_TOKENS:
        if (r->has_usage[op->src - V_PROMPT_TOKENS]) {
            v->type = 'i';
            v->i = r->usage[op->src - V_PROMPT_TOKENS];
        }
        break;
    default:
        break;
    }
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

/* The next result id into en->scratch: the run's prefix and a counter of 16 hex digits. */
static void next_id(struct engine *en)
{
    buf_reset(&en->scratch);
    buf_append(&en->scratch, en->id_prefix.data, en->id_prefix.len);
    append_hex16(&en->scratch, ++en->counter);
}

/* ---- transfers ------------------------------------------------------------------------------- */

static size_t slot_write(char *data, size_t size, size_t nmemb, void *userdata)
{
    struct slot *sl = userdata;
    size_t len = size * nmemb;

    http_timers_progress(&sl->timers);
    sl->received += len;
    if (sl->received > sl->en->groups[sl->group].max_size)
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
    sl->next = sl->en->free;
    sl->en->free = sl;
}

/* A slot's task is done with it: back to the free list; the engine may be collected again once
 * nothing is in flight. */
static void slot_finished(struct slot *sl)
{
    struct engine *en = sl->en;

    slot_release(sl);
    if (--en->inflight == 0) {
        luaL_unref(g_L, LUA_REGISTRYINDEX, en->self_ref);
        en->self_ref = LUA_NOREF;
    }
}

static void unwait(struct slot *sl)
{
    struct slot **pp = &sl->en->waiting;

    while (*pp && *pp != sl)
        pp = &(*pp)->next;
    if (*pp)
        *pp = sl->next;
    sl->waiting_input = 0;
}

static void slot_cancel(struct pending *p)
{
    struct slot *sl = (struct slot *)p;

    if (sl->waiting_input) {
        unwait(sl);
    } else {
        http_client_remove(sl->easy);
        http_timers_stop(&sl->timers);
    }
    slot_finished(sl);
}

static void slot_done(struct xfer *x, CURLcode rc);

static void slot_expired(struct http_timers *tm, const char *msg)
{
    struct slot *sl = (struct slot *)(void *)((char *)tm - offsetof(struct slot, timers));

    snprintf(sl->abort_msg, sizeof(sl->abort_msg), "%s", msg);
    slot_done(&sl->xfer, CURLE_ABORTED_BY_CALLBACK);
}

static struct slot *slot_new(struct engine *en)
{
    struct slot *sl = calloc(1, sizeof(*sl));

    if (sl == NULL)
        return NULL;
    sl->easy = curl_easy_init();
    if (sl->easy == NULL) {
        free(sl);
        return NULL;
    }
    sl->en = en;
    sl->set_group = -1;
    sl->pending.cancel = slot_cancel;
    sl->xfer.done = slot_done;
    buf_init(&sl->body);
    buf_init(&sl->reply);
    buf_init(&sl->headers);
    buf_init(&sl->id);
    buf_init(&sl->source);
    curl_easy_setopt(sl->easy, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(sl->easy, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(sl->easy, CURLOPT_PRIVATE, &sl->xfer);
    curl_easy_setopt(sl->easy, CURLOPT_ERRORBUFFER, sl->errbuf);
    curl_easy_setopt(sl->easy, CURLOPT_WRITEFUNCTION, slot_write);
    curl_easy_setopt(sl->easy, CURLOPT_WRITEDATA, sl);
    curl_easy_setopt(sl->easy, CURLOPT_HEADERFUNCTION, slot_header);
    curl_easy_setopt(sl->easy, CURLOPT_HEADERDATA, sl);
    http_easy_sockets(sl->easy);
    return sl;
}

static void slot_free(struct slot *sl)
{
    if (sl->set_group >= 0)
        http_timers_free(&sl->timers);
    curl_easy_cleanup(sl->easy);
    buf_free(&sl->body);
    buf_free(&sl->reply);
    buf_free(&sl->headers);
    buf_free(&sl->id);
    buf_free(&sl->source);
    free(sl);
}

static struct slot *slot_take(struct engine *en)
{
    struct slot *sl = en->free;

    if (sl) {
        en->free = sl->next;
        return sl;
    }
    return slot_new(en);
}

/* Sets the handle up for its group's requests (once per change of group). */
static void slot_use_group(struct slot *sl)
{
    const struct group *g = &sl->en->groups[sl->group];

    if (sl->set_group == sl->group)
        return;
    if (sl->set_group >= 0)
        http_timers_free(&sl->timers);
    curl_easy_setopt(sl->easy, CURLOPT_URL, g->url);
    curl_easy_setopt(sl->easy, CURLOPT_HTTPHEADER, g->headers);
    http_easy_timeouts(sl->easy, &g->timeouts);
    http_easy_ca(sl->easy, g->ca_file, g->ca_path);
    http_timers_init(&sl->timers, &g->timeouts, slot_expired);
    sl->set_group = sl->group;
}

static int slot_start(struct slot *sl)
{
    slot_use_group(sl);
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

/* ---- shapes and forms ------------------------------------------------------------------------ */

/* The key of a line's shape into en->key: model, form, parameters (names and kinds, sorted), or -1
 * when it is too long to be one. order gets the parameters' indexes in the key's order. */
static int shape_key(struct engine *en, const struct line_shape *ls, int *order)
{
    struct buf *k = &en->key;
    int i, j;

    buf_reset(k);
    if (ls->has_model)
        buf_append(k, ls->model.start + 1, ls->model.len - 2);
    buf_append_char(k, '\n');
    if (ls->has_prompt) {
        buf_append_char(k, 'p');
    } else {
        for (i = 0; i < ls->nmessages; i++) {
            if (i)
                buf_append_char(k, ',');
            buf_append(k, ls->messages[i].role.start + 1, ls->messages[i].role.len - 2);
        }
    }
    buf_append_char(k, '\n');
    for (i = 0; i < ls->nparams; i++) {
        const struct js_token *a = &ls->params[i].name;
        for (j = i; j > 0; j--) {
            const struct js_token *b = &ls->params[order[j - 1]].name;
            size_t n = a->len < b->len ? a->len : b->len;
            int c = memcmp(b->start, a->start, n);
            if (c < 0 || (c == 0 && b->len <= a->len))
                break;
            order[j] = order[j - 1];
        }
        order[j] = i;
    }
    for (i = 0; i < ls->nparams; i++) {
        const struct shape_param *p = &ls->params[order[i]];
        buf_append(k, p->name.start + 1, p->name.len - 2);
        buf_append_char(k, ':');
        buf_append_char(k, p->kind);
        buf_append_char(k, ',');
    }
    return k->len > MAX_KEY ? -1 : 0;
}

static void form_free(struct form *f)
{
    size_t i;

    free(f->key);
    tmpl_free(f->body);
    if (f->check_ref != LUA_NOREF)
        luaL_unref(g_L, LUA_REGISTRYINDEX, f->check_ref);
    for (i = 0; i < f->capmemo; i++)
        free(f->memo[i].text);
    free(f->memo);
    free(f);
}

/* Reads a group (the table on top of L) into en's next slot; its index, or raises. */
static int read_group(lua_State *L, struct engine *en)
{
    struct group *g;
    const char *ca_file, *ca_path, *url;
    int idx = lua_gettop(L);

    if (en->ngroups == MAX_GROUPS)
        return luaL_error(L, "engine: more than %d models", MAX_GROUPS);
    if (en->groups == NULL) {
        en->groups = calloc(MAX_GROUPS, sizeof(*en->groups));
        if (en->groups == NULL)
            return luaL_error(L, "out of memory");
    }
    /* Counted at once, so that the collector frees what a bad field leaves half read (a group no
     * form uses: it is never sent to). */
    g = &en->groups[en->ngroups++];
    memset(g, 0, sizeof(*g));
    lua_getfield(L, idx, "url");
    url = luaL_checkstring(L, -1);
    g->url = strdup(url);
    lua_pop(L, 1);
    lua_getfield(L, idx, "headers");
    if (header_list_from_table(L, lua_gettop(L), &g->headers) != 0)
        return luaL_error(L, "engine group: headers must be a table of string names and values");
    lua_pop(L, 1);
    http_read_timeouts(L, idx, "field", "engine group", &g->timeouts);
    http_read_ca(L, idx, "field", "engine group", &ca_file, &ca_path);
    g->ca_file = ca_file ? strdup(ca_file) : NULL;
    g->ca_path = ca_path ? strdup(ca_path) : NULL;
    g->max_size = HTTP_DEFAULT_MAX_SIZE;
    lua_getfield(L, idx, "max_size");
    if (!lua_isnil(L, -1)) {
        lua_Integer n = luaL_checkinteger(L, -1);
        if (n <= 0)
            return luaL_error(L, "engine group: max_size must be positive");
        g->max_size = (size_t)n;
    }
    lua_pop(L, 1);
    lua_getfield(L, idx, "result");
    g->result = tmpl_read(L, -1, RESULT_NAMES);
    lua_pop(L, 1);
    if (g->url == NULL || (ca_file && !g->ca_file) || (ca_path && !g->ca_path))
        return luaL_error(L, "out of memory");
    g->go = 1;
    return (int)(g - en->groups);
}

/* The params of the line as Lua's render takes them: {{name, raw, kind}, ...} in key order. */
static void push_params(lua_State *L, const struct line_shape *ls, const int *order)
{
    int i;

    lua_createtable(L, ls->nparams, 0);
    for (i = 0; i < ls->nparams; i++) {
        const struct shape_param *p = &ls->params[order[i]];
        lua_createtable(L, 3, 0);
        lua_pushlstring(L, p->name.start + 1, p->name.len - 2);
        lua_rawseti(L, -2, 1);
        lua_pushlstring(L, p->value.start, p->value.len);
        lua_rawseti(L, -2, 2);
        lua_pushstring(L, p->kind == '"' ? "string" : "number");
        lua_rawseti(L, -2, 3);
        lua_rawseti(L, -2, i + 1);
    }
}

/* lua_pcall'd by ask_render on the engine's own thread: render(model, form, params) and the reading
 * of its answer. Pushes the form's group (-1: general path; -2: not now) and, for a form, body and
 * check. */
static int render_call(lua_State *L)
{
    struct engine *en = lua_touserdata(L, 1);
    const struct line_shape *ls = lua_touserdata(L, 2);
    const int *order = lua_touserdata(L, 3);
    struct form *f = lua_touserdata(L, 4);
    int i, top;

    lua_rawgeti(L, LUA_REGISTRYINDEX, en->render_ref);
    if (ls->has_model)
        lua_pushlstring(L, ls->model.start + 1, ls->model.len - 2);
    else
        lua_pushnil(L);
    if (ls->has_prompt) {
        lua_pushliteral(L, "prompt");
    } else {
        lua_createtable(L, ls->nmessages, 0);
        for (i = 0; i < ls->nmessages; i++) {
            lua_pushlstring(L, ls->messages[i].role.start + 1, ls->messages[i].role.len - 2);
            lua_rawseti(L, -2, i + 1);
        }
    }
    push_params(L, ls, order);
    lua_pushboolean(L, ls->openai);
    lua_call(L, 4, 1);
    top = lua_gettop(L);
    if (lua_isnil(L, top)) {
        f->group = -2;
        return 0;
    }
    if (!lua_istable(L, top)) {
        f->group = -1;
        return 0;
    }
    lua_getfield(L, top, "group");
    if (lua_istable(L, -1)) {
        f->group = read_group(L, en);
        lua_pushinteger(L, f->group + 1);
        lua_setfield(L, -2, "index"); /* Lua gives it for the next forms of the group */
        lua_pop(L, 1);
    } else {
        lua_Integer gi = luaL_checkinteger(L, -1);
        if (gi < 1 || gi > en->ngroups)
            return luaL_error(L, "engine: render gave group %d of %d", (int)gi, en->ngroups);
        f->group = (int)gi - 1;
        lua_pop(L, 1);
    }
    lua_getfield(L, top, "body");
    body_names_init();
    f->body = tmpl_read(L, -1, BODY_NAMES);
    lua_pop(L, 1);
    lua_getfield(L, top, "check");
    if (lua_isfunction(L, -1))
        f->check_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    else
        lua_pop(L, 1);
    return 0;
}

static struct form *new_form(struct engine *en, uint32_t h)
{
    struct form *f = calloc(1, sizeof(*f));

    if (f == NULL)
        return NULL;
    f->key = malloc(en->key.len ? en->key.len : 1);
    if (f->key == NULL) {
        free(f);
        return NULL;
    }
    memcpy(f->key, en->key.data, en->key.len);
    f->keylen = en->key.len;
    f->hash = h;
    f->check_ref = LUA_NOREF;
    return f;
}

/* Reports an error of the Lua side on stderr (once per form): a bug there sends the shape's lines to
 * the general path rather than stopping the batch. */
static void report_lua_error(lua_State *L, const char *what)
{
    task_report_error(what, lua_tostring(L, -1));
    lua_pop(L, 1);
}

/* The form of a line's shape (en->key), asked of Lua the first time; NULL when lines of this shape
 * go to the general path (for now or for good). */
static struct form *form_of(struct engine *en, const struct line_shape *ls, const int *order)
{
    uint32_t h = js_hash(en->key.data, en->key.len);
    struct form **bucket = &en->buckets[h % FORM_BUCKETS];
    struct form *f;
    lua_State *L = en->cb;

    for (f = *bucket; f; f = f->next)
        if (f->hash == h && f->keylen == en->key.len && memcmp(f->key, en->key.data, f->keylen) == 0)
            return f->group >= 0 ? f : NULL;
    if (en->nforms >= MAX_FORMS || en->render_ref == LUA_NOREF)
        return NULL;
    f = new_form(en, h);
    if (f == NULL)
        return NULL;
    f->group = -1;
    lua_pushcfunction(L, render_call);
    lua_pushlightuserdata(L, en);
    lua_pushlightuserdata(L, (void *)ls);
    lua_pushlightuserdata(L, (void *)order);
    lua_pushlightuserdata(L, f);
    if (lua_pcall(L, 4, 0, 0) != LUA_OK) {
        report_lua_error(L, "batch engine: rendering a model");
        f->group = -1;
        tmpl_free(f->body);
        f->body = NULL;
    }
    lua_settop(L, 0);
    if (f->group == -2) { /* not now: asked again for a later line */
        form_free(f);
        return NULL;
    }
    f->next = *bucket;
    *bucket = f;
    en->nforms++;
    return f->group >= 0 ? f : NULL;
}

/* Has Lua found this parameter value good (its text is what the policy would send)? Asked once per
 * value (up to MEMO_MAX per form; past that, every new value is asked). */
static int check_param(struct engine *en, struct form *f, int index, const struct js_token *v)
{
    uint32_t h;
    size_t i, cap;
    int ok;
    lua_State *L = en->cb;

    if (f->check_ref == LUA_NOREF)
        return 0;
    buf_reset(&en->scratch);
    buf_append_char(&en->scratch, (char)index);
    buf_append(&en->scratch, v->start, v->len);
    h = js_hash(en->scratch.data, en->scratch.len);
    cap = f->capmemo;
    if (cap) {
        for (i = h & (cap - 1); f->memo[i].text; i = (i + 1) & (cap - 1)) {
            const struct memo *m = &f->memo[i];
            if (m->hash == h && m->len == en->scratch.len && memcmp(m->text, en->scratch.data, m->len) == 0)
                return m->ok;
        }
    }
    lua_rawgeti(L, LUA_REGISTRYINDEX, f->check_ref);
    lua_pushinteger(L, index + 1);
    lua_pushlstring(L, v->start, v->len);
    if (lua_pcall(L, 2, 1, 0) != LUA_OK) {
        report_lua_error(L, "batch engine: checking a parameter");
        ok = 0;
    } else {
        ok = lua_toboolean(L, -1);
    }
    lua_settop(L, 0);
    if (f->nmemo >= MEMO_MAX)
        return ok;
    if ((f->nmemo + 1) * 2 > f->capmemo) {
        size_t ncap = f->capmemo ? f->capmemo * 2 : 16;
        struct memo *m = calloc(ncap, sizeof(*m));
        if (m == NULL)
            return ok;
        for (i = 0; i < f->capmemo; i++) {
            if (f->memo[i].text) {
                size_t j = f->memo[i].hash & (ncap - 1);
                while (m[j].text)
                    j = (j + 1) & (ncap - 1);
                m[j] = f->memo[i];
            }
        }
        free(f->memo);
        f->memo = m;
        f->capmemo = ncap;
    }
    i = h & (f->capmemo - 1);
    while (f->memo[i].text)
        i = (i + 1) & (f->capmemo - 1);
    f->memo[i].text = malloc(en->scratch.len);
    if (f->memo[i].text == NULL)
        return ok;
    memcpy(f->memo[i].text, en->scratch.data, en->scratch.len);
    f->memo[i].len = en->scratch.len;
    f->memo[i].hash = h;
    f->memo[i].ok = (char)ok;
    f->nmemo++;
    return ok;
}

/* ---- filling a request body --------------------------------------------------------------------- */

struct body_ctx {
    struct engine *en;
    const struct line_shape *ls;
    const int *order;
    struct buf *text; /* a string written again */
    int bad;          /* a string that cannot be written as the policy would */
};

/* A string token as the Lua encoder writes the text it stands for. */
static void string_value(struct body_ctx *c, const struct js_token *t, struct tmpl_value *v)
{
    if (!js_needs_requote(t->start, t->len)) {
        v->s = t->start;
        v->len = t->len;
        return;
    }
    buf_reset(&c->en->idbuf);
    buf_reset(c->text);
    if (js_unescape(t->start, t->len, &c->en->idbuf) != 0) {
        c->bad = 1;
        v->s = "null";
        v->len = 4;
        return;
    }
    js_quote(c->text, c->en->idbuf.data ? c->en->idbuf.data : "", c->en->idbuf.len);
    v->s = c->text->data;
    v->len = c->text->len;
}

static void body_value(void *ctx, const struct tmpl_op *op, struct tmpl_value *v)
{
    struct body_ctx *c = ctx;
    const struct line_shape *ls = c->ls;

    v->type = 's';
    if (op->src == 0) {
        string_value(c, &ls->prompt, v);
    } else if (op->src < BODY_PARAM) {
        int i = op->src - BODY_CONTENT;
        if (i < ls->nmessages) {
            string_value(c, &ls->messages[i].content, v);
            return;
        }
        c->bad = 1;
        v->type = 0;
    } else {
        int i = op->src - BODY_PARAM;
        if (i < ls->nparams) {
            const struct js_token *t = &ls->params[c->order[i]].value;
            v->s = t->start; /* checked by Lua: what it would write */
            v->len = t->len;
            return;
        }
        c->bad = 1;
        v->type = 0;
    }
}

/* ---- working through the input ------------------------------------------------------------------- */

/* Is id one of the results already in the output? */
static int already_done(struct engine *en, lua_State *co, const char *id, size_t len)
{
    int done;

    if (en->done_ref == LUA_NOREF)
        return 0;
    lua_rawgeti(co, LUA_REGISTRYINDEX, en->done_ref);
    lua_pushlstring(co, id, len);
    lua_rawget(co, -2);
    done = lua_toboolean(co, -1);
    lua_pop(co, 2);
    return done;
}

/* The run's bookkeeping of a line's id: 1 to run it, 0 when the output has it already, -1 when
 * standard input repeats it (*first: the line it was first on). */
static int take_id(struct engine *en, lua_State *co, const char *id, size_t len, lua_Integer lineno,
                   lua_Integer *first)
{
    if (already_done(en, co, id, len))
        return 0;
    if (en->check_seen) {
        lua_Integer was = idset_add(&en->seen, id, len, lineno);
        if (was < 0)
            luaL_error(co, "out of memory");
        if (was > 0) {
            *first = was;
            return -1;
        }
    }
    return 1;
}

static void readable_cb(evutil_socket_t fd, short what, void *arg);

/* Pushes "line", line, lineno, oversize|nil, id|nil: a line for Lua (id: the engine took it). */
static int push_line(lua_State *co, const char *line, size_t len, lua_Integer lineno, size_t oversize,
                     const struct buf *id)
{
    lua_pushliteral(co, "line");
    lua_pushlstring(co, line, len);
    lua_pushinteger(co, lineno);
    if (oversize)
        lua_pushinteger(co, (lua_Integer)oversize);
    else
        lua_pushnil(co);
    if (id)
        lua_pushlstring(co, id->data ? id->data : "", id->len);
    else
        lua_pushnil(co);
    return 5;
}

/* Takes input lines for the slot until one is sent (returns -1: in flight), the input has nothing
 * yet (-2: the slot waits for it), or Lua is needed: then pushes on co what the task gets and
 * returns the count: nil (end of input), "error", message (a read error), "changed", why,
 * "duplicate", id, first line, line, or a line for Lua (push_line). */
static int work_step(struct engine *en, struct slot *sl, lua_State *co)
{
    for (;;) {
        const char *line = "";
        size_t len = 0, oversize = 0;
        const char *changed = en->changed ? "it changed" : NULL;
        char why[160];
        struct js_line jl;
        struct line_shape ls;
        int order[SHAPE_MAX_PARAMS];
        struct form *f;
        lua_Integer lineno, first = 0;
        int rc, i, take;

        if (!en->reading || en->closed) {
            lua_pushnil(co); /* detached (the batch stopped): no more lines */
            return 1;
        }
        rc = changed ? 1 : line_reader_next(&en->rd, &line, &len, &oversize);
        if (rc == -2) {
            sl->waiting_input = 1;
            sl->next = en->waiting;
            en->waiting = sl;
            if (!event_pending(en->readable, EV_READ, NULL))
                event_add(en->readable, NULL);
            return -2;
        }
        lineno = en->rd.lineno;
        if (rc == 0) {
            if (en->input)
                changed = input_end_differs(en->input, lineno, en->rd.consumed, why, sizeof(why));
            if (changed == NULL) {
                lua_pushnil(co);
                return 1;
            }
        }
        if (rc == -1) {
            lua_pushliteral(co, "error");
            lua_pushstring(co, strerror(errno));
            return 2;
        }
        if (changed == NULL && en->input)
            changed = input_line_differs(en->input, lineno, line, len, oversize, why, sizeof(why));
        if (changed) {
            en->changed = 1;
            lua_pushliteral(co, "changed");
            lua_pushstring(co, changed);
            return 2;
        }
        if (!oversize && line_is_blank(line, len))
            continue;
        buf_reset(&sl->id);
        if (oversize) {
            char t[32];
            snprintf(t, sizeof(t), "line-%lld", (long long)lineno);
            buf_append(&sl->id, t, strlen(t));
        } else {
            js_line_read(line, len, &jl, &sl->id);
            if (jl.id == JS_ID_NONE) {
                char t[32];
                snprintf(t, sizeof(t), "line-%lld", (long long)lineno);
                buf_reset(&sl->id);
                buf_append(&sl->id, t, strlen(t));
            } else if (jl.id != JS_ID_TEXT ||
                       (jl.problem != JS_OK && jl.problem != JS_BAD_UTF8 && jl.problem != JS_DUP_KEY)) {
                /* the id is Lua's to tell (id rule), and so is the line */
                return push_line(co, line, len, lineno, 0, NULL);
            }
        }
        take = take_id(en, co, sl->id.data ? sl->id.data : "", sl->id.len, lineno, &first);
        if (take == 0)
            continue;
        if (take < 0) {
            lua_pushliteral(co, "duplicate");
            lua_pushlstring(co, sl->id.data ? sl->id.data : "", sl->id.len);
            lua_pushinteger(co, first);
            lua_pushinteger(co, lineno);
            return 4;
        }
        if (oversize || !en->go || jl.problem != JS_OK || jl.id == JS_ID_BAD ||
            line_shape_read(line, len, &ls) != 0 || shape_key(en, &ls, order) != 0 ||
            (f = form_of(en, &ls, order)) == NULL || !en->groups[f->group].go)
            return push_line(co, line, len, lineno, oversize, &sl->id);
        for (i = 0; i < ls.nparams; i++)
            if (!check_param(en, f, i, &ls.params[order[i]].value))
                return push_line(co, line, len, lineno, 0, &sl->id);
        {
            struct body_ctx bc = { en, &ls, order, &en->outline, 0 };
            buf_reset(&sl->body);
            tmpl_fill(f->body, &sl->body, body_value, &bc);
            if (bc.bad)
                return push_line(co, line, len, lineno, 0, &sl->id);
        }
        sl->group = f->group;
        sl->lineno = lineno;
        buf_reset(&sl->source);
        buf_append(&sl->source, line, len);
        if (slot_start(sl) != 0) {
            lua_pushliteral(co, "reply");
            lua_pushlstring(co, line, len);
            lua_pushinteger(co, lineno);
            lua_pushnumber(co, 0);
            lua_pushnil(co);
            lua_pushnil(co);
            lua_pushnil(co);
            lua_pushliteral(co, "error: cannot start the transfer");
            lua_pushlstring(co, sl->id.data ? sl->id.data : "", sl->id.len);
            return 9;
        }
        return -1;
    }
}

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
            http_push_error(co, rc, sl->errbuf, sl->received, sl->en->groups[sl->group].max_size);
    }
}

/* Writes the result line of a success with its group's template, and counts it. */
static void write_success(struct engine *en, struct slot *sl, const struct reply *r, double latency)
{
    struct group *g = &en->groups[sl->group];
    struct buf hv;
    struct result_ctx c = { en, sl, r, latency, &hv };
    int i;

    buf_init(&hv);
    next_id(en);
    buf_reset(&en->outline);
    tmpl_fill(g->result, &en->outline, result_value, &c);
    buf_append_char(&en->outline, '\n');
    buf_free(&hv);
    /* A write that fills the stream's buffer writes it out and may fail there; the stream then
     * empties its buffer, so only this call's result tells (drain reports it). */
    errno = 0;
    if (fwrite(en->outline.data, 1, en->outline.len, en->out) != en->outline.len && en->write_errno == 0)
        en->write_errno = errno ? errno : EIO;
    g->ok++;
    for (i = 0; i < 2; i++)
        g->tokens[i] += r->has_usage[i] ? (lua_Integer)r->usage[i] : 0;
    g->tokens[2] +=
        r->has_usage[2]
            ? (lua_Integer)r->usage[2]
            : (lua_Integer)((r->has_usage[0] ? r->usage[0] : 0) + (r->has_usage[1] ? r->usage[1] : 0));
    if (en->nlat == en->caplat) {
        size_t cap = en->caplat ? en->caplat * 2 : 256;
        double *p = realloc(en->lat, cap * sizeof(*p));
        if (p == NULL) {
            fputs("aigate: out of memory\n", stderr);
            abort();
        }
        en->lat = p;
        en->caplat = cap;
    }
    en->lat[en->nlat++] = latency;
}

/* Goes on with the slot's task after a success or once input came: the next line, or the task
 * resumed with what Lua needs. */
static void slot_continue(struct slot *sl)
{
    struct engine *en = sl->en;
    lua_State *co = task_thread(sl->task);
    struct task *t = sl->task;
    int nret;

    if (!en->go) {
        /* Held meanwhile (Ctrl-C, a 429, a breaker): Lua decides before another line is taken. */
        lua_pushliteral(co, "held");
        nret = 1;
    } else {
        nret = work_step(en, sl, co);
        if (nret < 0)
            return; /* in flight again, or waiting for input, on the same slot and task */
    }
    slot_finished(sl);
    task_resume(t, nret);
}

/* A request ended. A success written here goes on to the next line without Lua while the engine
 * may go on; anything else resumes the task with "reply", line, lineno, latency, status, headers,
 * body (or nil, nil, nil, err for a transport failure), id. */
static void slot_done(struct xfer *x, CURLcode rc)
{
    struct slot *sl = (struct slot *)(void *)((char *)x - offsetof(struct slot, xfer));
    struct engine *en = sl->en;
    struct task *t = sl->task;
    lua_State *co = task_thread(t);
    double latency = monotonic_seconds() - sl->t0;
    struct reply r;

    http_client_remove(sl->easy);
    http_timers_stop(&sl->timers);
    if (rc == CURLE_OK && sl->status >= 200 && sl->status <= 299 && en->out &&
        reply_scan(sl->reply.data ? sl->reply.data : "", sl->reply.len, &r) == 0) {
        write_success(en, sl, &r, latency);
        slot_continue(sl);
        return;
    }
    lua_pushliteral(co, "reply");
    lua_pushlstring(co, sl->source.data ? sl->source.data : "", sl->source.len);
    lua_pushinteger(co, sl->lineno);
    lua_pushnumber(co, latency);
    push_outcome(co, sl, rc);
    lua_pushlstring(co, sl->id.data ? sl->id.data : "", sl->id.len);
    slot_finished(sl);
    task_resume(t, 9);
}

/* Standard input is readable (or at its end): the slots waiting for it go on. */
static void readable_cb(evutil_socket_t fd, short what, void *arg)
{
    struct engine *en = arg;
    struct slot *list = en->waiting;

    (void)fd;
    (void)what;
    en->waiting = NULL;
    while (list) {
        struct slot *sl = list;
        list = sl->next;
        sl->waiting_input = 0;
        slot_continue(sl);
    }
}

/* ---- the Lua object -------------------------------------------------------------------------- */

static struct engine *check_engine(lua_State *L)
{
    struct engine *en = luaL_checkudata(L, 1, ENGINE_MT);
    if (en->closed)
        luaL_error(L, "attempt to use a closed engine");
    return en;
}

static void engine_hold(lua_State *L, struct engine *en)
{
    if (en->inflight++ == 0) {
        lua_pushvalue(L, 1);
        en->self_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    }
}

/* engine:work() yields while lines go by the engine; see work_step and slot_done for what comes back. */
static int engine_work(lua_State *L)
{
    struct engine *en = check_engine(L);
    struct task *t = task_check(L);
    struct slot *sl = slot_take(en);
    int nret;

    if (sl == NULL)
        return luaL_error(L, "out of memory");
    sl->task = t;
    lua_settop(L, 1);
    nret = work_step(en, sl, L);
    if (nret >= 0) {
        slot_release(sl);
        return nret;
    }
    engine_hold(L, en);
    lua_settop(L, 0);
    return task_yield(L, t, &sl->pending);
}

/* engine:take(id, lineno) -> true (run it), false (the output has it), or nil, first line (standard
 * input repeats it): for the lines whose id only Lua can tell. */
static int engine_take(lua_State *L)
{
    struct engine *en = check_engine(L);
    size_t len;
    const char *id = luaL_checklstring(L, 2, &len);
    lua_Integer lineno = luaL_checkinteger(L, 3), first = 0;
    int take = take_id(en, L, id, len, lineno, &first);

    if (take >= 0) {
        lua_pushboolean(L, take);
        return 1;
    }
    lua_pushnil(L);
    lua_pushinteger(L, first);
    return 2;
}

static int engine_set_go(lua_State *L)
{
    struct engine *en = check_engine(L);

    en->go = lua_toboolean(L, 2);
    /* Held (Ctrl-C, the input changed): the workers waiting for standard input are told at once, from
     * the loop, rather than when a line comes. */
    if (!en->go && en->waiting && en->readable)
        event_active(en->readable, EV_READ, 0);
    return 0;
}

/* engine:set_group_go(index, go): may lines of this group be sent here (its upstream not throttled,
 * its breaker closed). */
static int engine_set_group_go(lua_State *L)
{
    struct engine *en = check_engine(L);
    lua_Integer i = luaL_checkinteger(L, 2);

    luaL_argcheck(L, i >= 1 && i <= en->ngroups, 2, "no such group");
    en->groups[i - 1].go = lua_toboolean(L, 3);
    return 0;
}

/* engine:waiting() -> the workers waiting for standard input (not requests in flight). */
static int engine_waiting(lua_State *L)
{
    struct engine *en = check_engine(L);
    lua_Integer n = 0;
    struct slot *sl;

    for (sl = en->waiting; sl; sl = sl->next)
        n++;
    lua_pushinteger(L, n);
    return 1;
}

static int engine_next_id(lua_State *L)
{
    struct engine *en = check_engine(L);

    next_id(en);
    lua_pushlstring(L, en->scratch.data, en->scratch.len);
    return 1;
}

/* engine:drain() -> {[group] = {ok, prompt, completion, total}}, {latencies}: the results written
 * here since the last drain; nothing when there are none (the batch drains every 10 ms). */
static int engine_drain(lua_State *L)
{
    struct engine *en = check_engine(L);
    size_t i;
    int g;

    if (en->nlat == 0)
        return 0; /* nothing written since the last drain (every result adds a latency) */
    lua_newtable(L);
    for (g = 0; g < en->ngroups; g++) {
        struct group *gr = &en->groups[g];
        if (gr->ok == 0)
            continue;
        lua_createtable(L, 4, 0);
        lua_pushinteger(L, gr->ok);
        lua_rawseti(L, -2, 1);
        for (i = 0; i < 3; i++) {
            lua_pushinteger(L, gr->tokens[i]);
            lua_rawseti(L, -2, (lua_Integer)i + 2);
        }
        lua_rawseti(L, -2, g + 1);
        gr->ok = gr->tokens[0] = gr->tokens[1] = gr->tokens[2] = 0;
    }
    lua_createtable(L, (int)en->nlat, 0);
    for (i = 0; i < en->nlat; i++) {
        lua_pushnumber(L, en->lat[i]);
        lua_rawseti(L, -2, (lua_Integer)i + 1);
    }
    en->nlat = 0;
    if (en->write_errno == 0)
        return 2;
    lua_pushstring(L, strerror(en->write_errno)); /* once: the run stops on it */
    en->write_errno = 0;
    return 3;
}

static void stop_reading(lua_State *L, struct engine *en)
{
    if (en->reading) {
        if (en->restore_flags >= 0)
            (void)fcntl(en->rd.fd, F_SETFL, en->restore_flags);
        if (en->own_fd)
            close(en->rd.fd);
        line_reader_free(&en->rd);
        en->reading = 0;
    }
    if (en->readable) {
        event_free(en->readable);
        en->readable = NULL;
    }
    en->out = NULL;
    en->input = NULL;
    luaL_unref(L, LUA_REGISTRYINDEX, en->out_ref);
    luaL_unref(L, LUA_REGISTRYINDEX, en->done_ref);
    luaL_unref(L, LUA_REGISTRYINDEX, en->input_ref);
    en->out_ref = en->done_ref = en->input_ref = LUA_NOREF;
}

/* engine:detach(): no more lines are read (the batch stopped). */
static int engine_detach(lua_State *L)
{
    struct engine *en = check_engine(L);

    stop_reading(L, en);
    return 0;
}

static int engine_gc(lua_State *L)
{
    struct engine *en = luaL_checkudata(L, 1, ENGINE_MT);
    struct slot *sl;
    size_t b;
    int g;

    stop_reading(L, en);
    while ((sl = en->free) != NULL) {
        en->free = sl->next;
        slot_free(sl);
    }
    for (b = 0; b < FORM_BUCKETS; b++) {
        struct form *f = en->buckets[b];
        while (f) {
            struct form *next = f->next;
            form_free(f);
            f = next;
        }
        en->buckets[b] = NULL;
    }
    for (g = 0; g < en->ngroups; g++) {
        struct group *gr = &en->groups[g];
        curl_slist_free_all(gr->headers);
        free(gr->url);
        free(gr->ca_file);
        free(gr->ca_path);
        tmpl_free(gr->result);
    }
    free(en->groups);
    en->groups = NULL;
    en->ngroups = 0;
    idset_free(&en->seen);
    luaL_unref(L, LUA_REGISTRYINDEX, en->render_ref);
    luaL_unref(L, LUA_REGISTRYINDEX, en->cb_ref);
    en->render_ref = en->cb_ref = LUA_NOREF;
    buf_free(&en->id_prefix);
    buf_free(&en->outline);
    buf_free(&en->key);
    buf_free(&en->scratch);
    buf_free(&en->idbuf);
    free(en->lat);
    en->lat = NULL;
    en->closed = 1;
    return 0;
}

/* The field name of the spec table at idx: a string (len set), or raises naming the field. */
static const char *spec_string(lua_State *L, int idx, const char *name, size_t *len)
{
    const char *s;

    lua_getfield(L, idx, name);
    if (lua_type(L, -1) != LUA_TSTRING)
        luaL_error(L, "bad field '%s' to 'engine' (string expected, got %s)", name, luaL_typename(L, -1));
    s = lua_tolstring(L, -1, len);
    lua_pop(L, 1); /* the spec table keeps it alive */
    return s;
}

/* core.engine{input = path | "-", output = file, max_line = n, id_prefix = s, done = table|nil,
 * first_pass = input|nil, render = function|nil} -> engine, or nil, err when the input cannot be
 * opened. Without render every line goes to Lua (--dry-run, --ordered, ...). */
int core_engine(lua_State *L)
{
    struct engine *en;
    luaL_Stream *out;
    const char *path;
    size_t max_line;
    int fd;

    luaL_checktype(L, 1, LUA_TTABLE);
    en = lua_newuserdatauv(L, sizeof(*en), 0);
    memset(en, 0, sizeof(*en));
    en->self_ref = en->out_ref = en->done_ref = en->input_ref = en->render_ref = en->cb_ref = LUA_NOREF;
    en->restore_flags = -1;
    en->go = 1;
    idset_init(&en->seen);
    buf_init(&en->id_prefix);
    buf_init(&en->outline);
    buf_init(&en->key);
    buf_init(&en->scratch);
    buf_init(&en->idbuf);
    luaL_setmetatable(L, ENGINE_MT);
    en->cb = lua_newthread(L);
    en->cb_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_getfield(L, 1, "render");
    if (lua_isfunction(L, -1))
        en->render_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    else
        lua_pop(L, 1);
    {
        size_t len;
        const char *prefix = spec_string(L, 1, "id_prefix", &len);
        buf_append(&en->id_prefix, prefix, len);
    }
    lua_getfield(L, 1, "max_line");
    if (!lua_isinteger(L, -1) || lua_tointeger(L, -1) <= 0)
        return luaL_error(L, "bad field 'max_line' to 'engine' (positive integer expected)");
    max_line = (size_t)lua_tointeger(L, -1);
    lua_pop(L, 1);
    lua_getfield(L, 1, "output");
    out = luaL_testudata(L, -1, LUA_FILEHANDLE);
    if (out == NULL || out->closef == NULL)
        return luaL_error(L, "bad field 'output' to 'engine' (an open file expected)");
    en->out = out->f;
    en->out_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_getfield(L, 1, "done");
    if (lua_istable(L, -1))
        en->done_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    else
        lua_pop(L, 1);
    lua_getfield(L, 1, "first_pass");
    if (!lua_isnil(L, -1)) {
        en->input = input_arg(L, -1);
        en->input_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    } else {
        lua_pop(L, 1);
    }
    path = spec_string(L, 1, "input", NULL);
    if (strcmp(path, "-") == 0) {
        int flags = fcntl(0, F_GETFL);
        fd = 0;
        en->check_seen = 1;
        if (flags >= 0 && !(flags & O_NONBLOCK) && fcntl(0, F_SETFL, flags | O_NONBLOCK) == 0)
            en->restore_flags = flags;
    } else {
        fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0) {
            lua_pushnil(L);
            lua_pushfstring(L, "%s: %s", path, strerror(errno));
            return 2;
        }
        en->own_fd = 1;
    }
    line_reader_init(&en->rd, fd, max_line);
    en->reading = 1;
    en->readable = event_new(g_base, fd, EV_READ, readable_cb, en);
    if (en->readable == NULL)
        return luaL_error(L, "out of memory");
    return 1;
}

void core_register_engine(lua_State *L)
{
    static const luaL_Reg methods[] = {
        { "work", engine_work },
        { "take", engine_take },
        { "set_go", engine_set_go },
        { "set_group_go", engine_set_group_go },
        { "next_id", engine_next_id },
        { "drain", engine_drain },
        { "detach", engine_detach },
        { "waiting", engine_waiting },
        { NULL, NULL },
    };

    if (luaL_newmetatable(L, ENGINE_MT)) {
        luaL_newlib(L, methods);
        lua_setfield(L, -2, "__index");
        lua_pushcfunction(L, engine_gc);
        lua_setfield(L, -2, "__gc");
    }
    lua_pop(L, 1);
}

/* core.json_quote(s) -> s as a JSON string (jsontext.h: the one escaping of C and Lua). */
int core_json_quote(lua_State *L)
{
    size_t len;
    const char *s = luaL_checklstring(L, 1, &len);
    struct buf b;

    buf_init(&b);
    js_quote(&b, s, len);
    lua_pushlstring(L, b.data, b.len);
    buf_free(&b);
    return 1;
}
