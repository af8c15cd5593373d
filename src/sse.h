/*
 * sse.h: an incremental Server-Sent Events parser.
 *
 * Fed the body of a `text/event-stream` response in chunks split anywhere (inside a line, inside a
 * CRLF pair), it calls back once per complete event. Follows the WHATWG event-stream rules: lines end
 * with CRLF, LF or CR; `:` starts a comment; `data` lines are joined with "\n"; one leading space after
 * the colon is dropped; a blank line dispatches. Pure C (no Lua) so it can be unit-tested; the Lua
 * binding `core.sse_parser()` is at the bottom of sse.c. It is on the streaming hot path.
 */
#ifndef AIGATE_SSE_H
#define AIGATE_SSE_H

#include <stddef.h>

#include "buf.h"

struct sse_event {
    const char *data;
    size_t data_len;
    const char *event; /* NULL when the event had no `event:` field */
    size_t event_len;
    const char *id; /* NULL when the event had no `id:` field */
    size_t id_len;
};

typedef void (*sse_emit_fn)(void *ud, const struct sse_event *ev);

struct sse_parser {
    struct buf line; /* an incomplete line carried over from the previous chunk */
    struct buf data; /* data of the event being assembled, each line followed by '\n' */
    struct buf event;
    struct buf id;
    int has_data;
    int has_event;
    int has_id;
    int skip_lf; /* the previous chunk ended in CR: a leading LF belongs to it */
    int started; /* past the optional byte order mark */
};

void sse_init(struct sse_parser *p);
void sse_free(struct sse_parser *p);
/* Feeds a chunk; calls emit for every event completed by it. */
void sse_feed(struct sse_parser *p, const char *chunk, size_t len, sse_emit_fn emit, void *ud);
/* End of stream: a pending unterminated line is processed and an event that has data is dispatched. */
void sse_finish(struct sse_parser *p, sse_emit_fn emit, void *ud);

#endif
