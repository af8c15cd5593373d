/*
 * fuzz_sse.c: libFuzzer harness of the Server-Sent Events parser (src/sse.c).
 *
 * The input is a stream body. It is parsed in one piece, byte by byte, and in pieces of lengths drawn
 * from the input itself (empty ones included), each piece in a heap block of its own exact size so
 * that a read past a chunk shows under ASan. Every way must give the same events, and sse_finish the
 * same ones after them. Each event must keep the rules of sse.h: no CR in its data, no line end in
 * its name or id, no NUL in its id. Aborts on a broken property.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "buf.h"
#include "sse.h"

static void fail(const char *what)
{
    fprintf(stderr, "fuzz_sse: %s\n", what);
    abort();
}

static void append_field(struct buf *out, char tag, const char *s, size_t len)
{
    buf_append_char(out, tag);
    buf_append(out, &len, sizeof(len));
    if (len > 0)
        buf_append(out, s, len);
}

/* Renders each event into a buf (tags and lengths, so no two event lists look alike) and checks it. */
static void collect(void *ud, const struct sse_event *ev)
{
    struct buf *out = ud;

    if (ev->data == NULL)
        fail("event without data");
    if (memchr(ev->data, '\r', ev->data_len))
        fail("CR in an event's data");
    append_field(out, 'd', ev->data, ev->data_len);
    if (ev->event) {
        if (memchr(ev->event, '\r', ev->event_len) || memchr(ev->event, '\n', ev->event_len))
            fail("line end in an event name");
        append_field(out, 'e', ev->event, ev->event_len);
    }
    if (ev->id) {
        if (memchr(ev->id, '\r', ev->id_len) || memchr(ev->id, '\n', ev->id_len) ||
            memchr(ev->id, '\0', ev->id_len))
            fail("line end or NUL in an event id");
        append_field(out, 'i', ev->id, ev->id_len);
    }
    buf_append_char(out, ';');
}

static void feed_copy(struct sse_parser *p, const uint8_t *data, size_t len, struct buf *out)
{
    char *copy = malloc(len ? len : 1);

    if (copy == NULL)
        abort();
    if (len > 0)
        memcpy(copy, data, len);
    sse_feed(p, copy, len, collect, out);
    free(copy);
}

/* A small deterministic generator seeded by the input (FNV-1a, then xorshift). */
static uint64_t seed_of(const uint8_t *data, size_t size)
{
    uint64_t h = 1469598103934665603ULL;
    size_t i;

    for (i = 0; i < size; i++)
        h = (h ^ data[i]) * 1099511628211ULL;
    return h ? h : 1;
}

static uint64_t next_draw(uint64_t *s)
{
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return *s;
}

/* Parses data cut into pieces: mode 0 one piece, 1 byte by byte, 2 drawn lengths. Leaves the
 * events before sse_finish in fed, and all of them in finished. */
static void parse(const uint8_t *data, size_t size, int mode, struct buf *fed, struct buf *finished)
{
    struct sse_parser p;
    uint64_t draw = seed_of(data, size);
    size_t pos = 0;

    sse_init(&p);
    if (mode == 0) {
        feed_copy(&p, data, size, fed);
    } else {
        while (pos < size) {
            size_t n = mode == 1 ? 1 : (size_t)(next_draw(&draw) % 9);
            if (n > size - pos)
                n = size - pos;
            feed_copy(&p, data + pos, n, fed);
            pos += n;
        }
    }
    buf_append(finished, fed->data, fed->len);
    sse_finish(&p, collect, finished);
    sse_finish(&p, collect, finished); /* a second finish has nothing left to give */
    sse_free(&p);
}

static int same(const struct buf *a, const struct buf *b)
{
    return a->len == b->len && (a->len == 0 || memcmp(a->data, b->data, a->len) == 0);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct buf fed[3];
    struct buf finished[3];
    int mode;

    for (mode = 0; mode < 3; mode++) {
        buf_init(&fed[mode]);
        buf_init(&finished[mode]);
        parse(data, size, mode, &fed[mode], &finished[mode]);
    }
    if (!same(&fed[0], &fed[1]) || !same(&finished[0], &finished[1]))
        fail("byte by byte gives other events than one piece");
    if (!same(&fed[0], &fed[2]) || !same(&finished[0], &finished[2]))
        fail("drawn pieces give other events than one piece");
    for (mode = 0; mode < 3; mode++) {
        buf_free(&fed[mode]);
        buf_free(&finished[mode]);
    }
    return 0;
}
