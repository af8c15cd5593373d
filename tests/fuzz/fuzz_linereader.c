/*
 * fuzz_linereader.c: libFuzzer harness of the line reader (src/linereader.c).
 *
 * The first input byte sets max_line (0 to 127; 128 and up: 1 MiB, so nothing is oversize), the
 * second seeds the lengths of the pieces; the rest is the stream. It is written into a non-blocking
 * pipe in pieces of those lengths (empty ones included), the reader taking every line it can after
 * each piece until it has no data, then to the end once the writer closed. The lines it gives must
 * be those of a plain split of the same bytes at '\n' (a last line without one included), each line
 * longer than max_line reported by its length instead; its line count and bytes consumed must match,
 * and its buffer must stay within max_line and a few blocks. Aborts on a broken property.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "buf.h"
#include "linereader.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void fail(const char *what)
{
    fprintf(stderr, "fuzz_linereader: %s\n", what);
    abort();
}

/* One line as the comparison sees it: a tag, the length, the bytes when kept, whether complete. */
static void render(struct buf *out, const char *line, size_t len, size_t oversize, int complete)
{
    buf_append_char(out, line ? 'L' : 'O');
    if (line) {
        buf_append(out, &len, sizeof(len));
        if (len > 0)
            buf_append(out, line, len);
    } else {
        buf_append(out, &oversize, sizeof(oversize));
    }
    buf_append_char(out, complete ? '\n' : '|');
}

static void reference(const char *s, size_t n, size_t max_line, struct buf *out, long long *lines)
{
    size_t start = 0;
    size_t i;

    *lines = 0;
    for (i = 0; i <= n; i++) {
        size_t len;
        if (i < n && s[i] != '\n')
            continue;
        if (i == n && start == n)
            break;
        len = i - start;
        if (len > max_line)
            render(out, NULL, 0, len, i < n);
        else
            render(out, s + start, len, 0, i < n);
        (*lines)++;
        start = i + 1;
    }
}

/* Takes lines until the reader has no data (-2) or the end (0); returns that code. */
static int drain(struct line_reader *r, struct buf *out)
{
    for (;;) {
        const char *line;
        size_t len;
        size_t oversize;
        int rc = line_reader_next(r, &line, &len, &oversize);

        if (rc != 1)
            return rc;
        if ((line == NULL) != (oversize > 0))
            fail("a line is either kept or oversize");
        if (line && len > r->max_line)
            fail("a kept line longer than max_line");
        if (r->buf.cap > 4 * (r->max_line + 65536 + 1))
            fail("the buffer grew past max_line and a few blocks");
        render(out, line, len, oversize, r->complete);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct line_reader r;
    struct buf got, want;
    const char *s;
    size_t n, max_line, off = 0;
    unsigned seed;
    long long lines;
    int p[2];
    int rc;

    if (size < 2)
        return 0;
    max_line = data[0] < 128 ? data[0] : (size_t)1 << 20;
    seed = data[1] * 2654435761u + 1;
    s = (const char *)data + 2;
    n = size - 2;
    if (pipe(p) != 0)
        fail("pipe");
    fcntl(p[0], F_SETFL, fcntl(p[0], F_GETFL) | O_NONBLOCK);
    fcntl(p[1], F_SETFL, fcntl(p[1], F_GETFL) | O_NONBLOCK);
    buf_init(&got);
    buf_init(&want);
    line_reader_init(&r, p[0], max_line);
    while (off < n) {
        size_t piece;
        ssize_t w;
        seed = seed * 1103515245u + 12345u;
        piece = (seed >> 16) % 300;
        if (piece > n - off)
            piece = n - off;
        w = piece ? write(p[1], s + off, piece) : 0;
        if (w < 0 && errno != EAGAIN)
            fail("write");
        if (w > 0)
            off += (size_t)w;
        if (drain(&r, &got) != -2)
            fail("the end or an error before the writer closed");
    }
    close(p[1]);
    rc = drain(&r, &got);
    if (rc != 0)
        fail("no end after the writer closed");
    if (drain(&r, &got) != 0)
        fail("the end is not the end again");
    reference(s, n, max_line, &want, &lines);
    if (got.len != want.len || (want.len && memcmp(got.data, want.data, want.len) != 0))
        fail("the lines differ from a plain split");
    if (r.lineno != lines)
        fail("the line count differs");
    if (r.consumed != (long long)n)
        fail("the bytes consumed are not the input's length");
    line_reader_free(&r);
    close(p[0]);
    buf_free(&got);
    buf_free(&want);
    return 0;
}
