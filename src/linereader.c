/*
 * linereader.c: the line reader of linereader.h.
 *
 * The buffer holds at most max_line bytes of a line without its '\n' plus one block: past max_line
 * the bytes of the line are counted and dropped, up to its '\n'.
 */
#include "linereader.h"

#include <errno.h>
#include <string.h>
#include <unistd.h>

#define READ_BLOCK 65536

void line_reader_init(struct line_reader *r, int fd, size_t max_line)
{
    memset(r, 0, sizeof(*r));
    r->fd = fd;
    buf_init(&r->buf);
    r->complete = 1;
    r->max_line = max_line;
}

void line_reader_free(struct line_reader *r)
{
    buf_free(&r->buf);
    r->pos = r->scanned = r->skipped = 0;
}

/* Hands out the line s[0..n) (after r->skipped bytes dropped of it), newline says whether a '\n'
 * ended it. */
static int deliver(struct line_reader *r, const char *s, size_t n, int newline, const char **line,
                   size_t *len, size_t *oversize)
{
    size_t whole = r->skipped + n;

    r->lineno++;
    r->consumed += (long long)whole + (newline ? 1 : 0);
    r->complete = newline;
    r->skipped = 0;
    if (whole > r->max_line) {
        *line = NULL;
        *len = 0;
        *oversize = whole;
    } else {
        *line = s;
        *len = n;
        *oversize = 0;
    }
    return 1;
}

int line_reader_next(struct line_reader *r, const char **line, size_t *len, size_t *oversize)
{
    *line = NULL;
    *len = 0;
    *oversize = 0;
    if (r->buf.data == NULL)
        buf_reserve(&r->buf, READ_BLOCK); /* offsets into it below, even while it is empty */
    for (;;) {
        char *base = r->buf.data + r->pos;
        size_t avail = r->buf.len - r->pos;
        char *nl;
        ssize_t n;

        if (r->scanned < r->pos)
            r->scanned = r->pos;
        nl = r->buf.len > r->scanned ? memchr(r->buf.data + r->scanned, '\n', r->buf.len - r->scanned) : NULL;
        if (nl) {
            size_t k = (size_t)(nl - base);
            r->pos += k + 1;
            r->scanned = r->pos;
            return deliver(r, base, k, 1, line, len, oversize);
        }
        r->scanned = r->buf.len;
        if (r->eof) {
            if (avail == 0 && r->skipped == 0)
                return 0;
            r->pos = r->buf.len;
            return deliver(r, base, avail, 0, line, len, oversize);
        }
        if (avail > r->max_line) {
            /* Too long already: forget it and count the rest up to its newline. */
            r->skipped += avail;
            r->buf.len = 0;
            r->pos = 0;
            r->scanned = 0;
        } else if (r->pos > 0) {
            memmove(r->buf.data, base, avail);
            r->buf.len = avail;
            r->pos = 0;
            r->scanned = avail;
        }
        buf_reserve(&r->buf, READ_BLOCK);
        n = read(r->fd, r->buf.data + r->buf.len, READ_BLOCK);
        if (n > 0) {
            r->buf.len += (size_t)n;
        } else if (n == 0) {
            r->eof = 1;
        } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
            return -2; /* what is held of a partial line stays for the next call */
        } else if (errno != EINTR) {
            return -1;
        }
    }
}

int line_is_blank(const char *s, size_t len)
{
    size_t i;

    for (i = 0; i < len; i++)
        if (s[i] != ' ' && s[i] != '\t' && s[i] != '\r' && s[i] != '\n' && s[i] != '\f' && s[i] != '\v')
            return 0;
    return 1;
}
