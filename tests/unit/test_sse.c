/*
 * test_sse.c: unit tests of the Server-Sent Events parser (src/sse.c). Data-driven: every stream is
 * fed whole, byte by byte, and split at every position into two chunks, and must give the same events.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "buf.h"
#include "sse.h"
#include "unit.h"

/* Events are rendered as "event|id|data;" into a buffer for comparison. */
static void collect(void *ud, const struct sse_event *ev)
{
    struct buf *out = ud;

    if (ev->event)
        buf_append(out, ev->event, ev->event_len);
    buf_append_char(out, '|');
    if (ev->id)
        buf_append(out, ev->id, ev->id_len);
    buf_append_char(out, '|');
    buf_append(out, ev->data, ev->data_len);
    buf_append_char(out, ';');
}

static void run(const char *stream, size_t len, const size_t *cuts, int ncuts, int finish, struct buf *out)
{
    struct sse_parser p;
    size_t pos = 0;
    int i;

    sse_init(&p);
    for (i = 0; i < ncuts; i++) {
        sse_feed(&p, stream + pos, cuts[i] - pos, collect, out);
        pos = cuts[i];
    }
    sse_feed(&p, stream + pos, len - pos, collect, out);
    if (finish)
        sse_finish(&p, collect, out);
    sse_free(&p);
}

struct sse_case {
    const char *name;
    const char *stream;
    const char *expect;
    int finish;
};

static const struct sse_case cases[] = {
    { "one event", "data: hello\n\n", "||hello;", 0 },
    { "CRLF line ends", "data: a\r\n\r\ndata: b\r\n\r\n", "||a;||b;", 0 },
    { "CR line ends", "data: a\r\rdata: b\r\r", "||a;||b;", 0 },
    { "multi-line data joined with LF", "data: a\ndata: b\ndata\n\n", "||a\nb\n;", 0 },
    { "comments ignored", ": keep-alive\n\ndata: x\n\n", "||x;", 0 },
    { "event and id fields", "event: ping\nid: 7\ndata: {}\n\n", "ping|7|{};", 0 },
    { "no space after colon", "data:tight\n\n", "||tight;", 0 },
    { "only one leading space dropped", "data:  two\n\n", "|| two;", 0 },
    { "blank lines without data dispatch nothing", "\n\n\nid: 1\n\n", "", 0 },
    { "unknown fields and retry ignored", "retry: 10\nfoo: bar\ndata: d\n\n", "||d;", 0 },
    { "openai chunks and DONE", "data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\ndata: [DONE]\n\n",
      "||{\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]};||[DONE];", 0 },
    { "unterminated event dropped without finish", "data: a\n\ndata: tail", "||a;", 0 },
    { "unterminated event kept by finish", "data: a\n\ndata: tail", "||a;||tail;", 1 },
    { "byte order mark skipped",
      "\xEF\xBB\xBF"
      "data: bom\n\n",
      "||bom;", 0 },
    { "mixed line ends", "data: a\r\ndata: b\rdata: c\n\r\n", "||a\nb\nc;", 0 },
    { "empty data line", "data\n\n", "||;", 0 },
};

int main(void)
{
    size_t i;
    char name[160];

    for (i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        const struct sse_case *c = &cases[i];
        size_t len = strlen(c->stream);
        struct buf out;
        size_t cut;
        int whole_ok;
        int split_ok = 1;
        int bytes_ok;
        size_t *cuts;

        buf_init(&out);
        run(c->stream, len, NULL, 0, c->finish, &out);
        whole_ok = strcmp(out.data ? out.data : "", c->expect) == 0;
        snprintf(name, sizeof(name), "%s (whole)", c->name);
        CHECK(whole_ok, name);
        if (!whole_ok)
            printf("#   got [%s]\n", out.data ? out.data : "");

        for (cut = 1; cut < len; cut++) {
            buf_reset(&out);
            run(c->stream, len, &cut, 1, c->finish, &out);
            if (strcmp(out.data ? out.data : "", c->expect) != 0) {
                split_ok = 0;
                printf("#   split at %zu got [%s]\n", cut, out.data ? out.data : "");
            }
        }
        snprintf(name, sizeof(name), "%s (split at every position)", c->name);
        CHECK(split_ok, name);

        cuts = len > 1 ? malloc((len - 1) * sizeof(*cuts)) : NULL;
        for (cut = 1; cut < len; cut++)
            cuts[cut - 1] = cut;
        buf_reset(&out);
        run(c->stream, len, cuts, len > 1 ? (int)(len - 1) : 0, c->finish, &out);
        bytes_ok = strcmp(out.data ? out.data : "", c->expect) == 0;
        snprintf(name, sizeof(name), "%s (byte by byte)", c->name);
        CHECK(bytes_ok, name);
        free(cuts);
        buf_free(&out);
    }
    return unit_finish();
}
