/*
 * lineshape.c: the shape of a batch input line (see lineshape.h).
 */
#include <string.h>

#include "lineshape.h"

static int message_member(void *ctx, struct js_scan *s, const struct js_token *key)
{
    struct shape_message *m = ctx;
    struct js_token val;
    char kind;

    if (key->escaped || js_scan_value(s, &val, &kind) != 0 || !val.is_string)
        return -1;
    if (js_key_is(key, "role")) {
        if (m->role.start || val.escaped)
            return -1;
        m->role = val;
    } else if (js_key_is(key, "content")) {
        if (m->content.start)
            return -1;
        m->content = val;
    } else {
        return -1;
    }
    return 0;
}

static int message_element(void *ctx, struct js_scan *s, int index)
{
    struct line_shape *ls = ctx;
    struct shape_message *m;

    (void)index;
    if (ls->nmessages == SHAPE_MAX_MESSAGES || *s->p != '{')
        return -1;
    m = &ls->messages[ls->nmessages];
    memset(m, 0, sizeof(*m));
    if (js_scan_items(s, message_member, NULL, m) != 0 || !m->role.start || !m->content.start)
        return -1;
    ls->nmessages++;
    return 0;
}

static int read_messages(struct line_shape *ls, struct js_scan *s)
{
    if (ls->has_messages++ || *s->p != '[')
        return -1;
    return js_scan_items(s, NULL, message_element, ls);
}

static int read_model(struct line_shape *ls, struct js_scan *s)
{
    char kind;

    if (ls->has_model++ || js_scan_value(s, &ls->model, &kind) != 0 || !ls->model.is_string ||
        ls->model.escaped)
        return -1;
    return 0;
}

static int body_member(void *ctx, struct js_scan *s, const struct js_token *key)
{
    struct line_shape *ls = ctx;
    struct shape_param *p;
    char kind;

    if (key->escaped)
        return -1;
    if (js_key_is(key, "messages"))
        return read_messages(ls, s);
    if (js_key_is(key, "model"))
        return read_model(ls, s);
    if (ls->nparams == SHAPE_MAX_PARAMS)
        return -1;
    p = &ls->params[ls->nparams];
    p->name = *key;
    if (js_scan_value(s, &p->value, &kind) != 0 || (kind != '"' && kind != '0'))
        return -1;
    p->kind = kind;
    ls->nparams++;
    return 0;
}

static int top_member(void *ctx, struct js_scan *s, const struct js_token *key)
{
    struct line_shape *ls = ctx;
    struct js_token val;
    char kind;
    int openai;

    if (key->escaped)
        return -1;
    openai = js_key_is(key, "custom_id") || js_key_is(key, "method") || js_key_is(key, "url") ||
             js_key_is(key, "body");
    if (!openai && !js_key_is(key, "id") && !js_key_is(key, "prompt") && !js_key_is(key, "model") &&
        !js_key_is(key, "messages"))
        return -1;
    /* one form per line: the general path reads mixed lines its own way */
    if (ls->openai != -1 && ls->openai != openai)
        return -1;
    ls->openai = openai;
    if (js_key_is(key, "body")) {
        if (*s->p != '{')
            return -1;
        return js_scan_items(s, body_member, NULL, ls);
    }
    if (js_key_is(key, "messages"))
        return read_messages(ls, s);
    if (js_key_is(key, "model"))
        return read_model(ls, s);
    if (js_scan_value(s, &val, &kind) != 0)
        return -1;
    if (js_key_is(key, "prompt")) {
        if (!val.is_string)
            return -1;
        ls->prompt = val;
        ls->has_prompt = 1;
    } else if (js_key_is(key, "method")) {
        if (!val.is_string)
            return -1;
        ls->method = val;
        ls->has_method = 1;
    } else if (js_key_is(key, "url")) {
        if (!val.is_string)
            return -1;
        ls->url = val;
        ls->has_url = 1;
    }
    return 0; /* id, custom_id: the id rule (js_line_read) reads them */
}

/* Whether an OpenAI Batch line asks for a chat completion: no method or "POST", no url or one ending
 * in /chat/completions, as the general path reads them (aigate.batch.input). A line for another
 * endpoint (url /v1/embeddings) or method is the general path's to send or refuse, whatever its body
 * holds. */
static int chat_request(const struct line_shape *s)
{
    static const char post[] = "\"POST\"", suffix[] = "/chat/completions\"";
    const size_t npost = sizeof(post) - 1, nsuffix = sizeof(suffix) - 1;

    if (s->has_method &&
        (s->method.escaped || s->method.len != npost || memcmp(s->method.start, post, npost) != 0))
        return 0;
    if (s->has_url && (s->url.escaped || s->url.len < nsuffix + 1 ||
                       memcmp(s->url.start + s->url.len - nsuffix, suffix, nsuffix) != 0))
        return 0;
    return 1;
}

int line_shape_read(const char *line, size_t len, struct line_shape *s)
{
    memset(s, 0, sizeof(*s));
    s->openai = -1;
    if (js_scan_whole_object(line, len, top_member, s) != 0 || s->openai == -1)
        return -1;
    if (s->openai)
        return s->has_messages && !s->has_prompt && chat_request(s) ? 0 : -1; /* the body and its messages */
    return s->has_prompt != s->has_messages ? 0 : -1;
}
