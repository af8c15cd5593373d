/*
 * buf.h: a growable byte buffer.
 *
 * Used by the HTTP client (response bodies), the SSE parser (partial lines and event data) and the
 * server. Pure C, no Lua; unit-tested in tests/unit/test_buf.c. Allocation failure aborts: a tool of
 * this kind has no sensible way to go on without memory.
 */
#ifndef AIGATE_BUF_H
#define AIGATE_BUF_H

#include <stddef.h>

struct buf {
    char *data;
    size_t len;
    size_t cap;
};

void buf_init(struct buf *b);
void buf_free(struct buf *b);
void buf_reset(struct buf *b);
void buf_reserve(struct buf *b, size_t extra);
void buf_append(struct buf *b, const void *data, size_t len);
void buf_append_char(struct buf *b, char c);
/* Drops the first n bytes (n <= len). */
void buf_consume(struct buf *b, size_t n);

#endif
