/*
 * linereader.h: the lines of batch input, read from a file descriptor in blocks, with bounded memory.
 *
 * One implementation for every reader of batch lines in C (the first pass of core.scan_ids and the
 * engine), with the semantics of lua/aigate/jsonl.lua: a line is the bytes before a '\n' (a '\r'
 * before it stays in the line: JSON and line_is_blank take it as white space), and the bytes after
 * the last '\n' are a last line when there are any. A line longer than max_line is skipped while it
 * is read, never held whole, and reported by its length. The descriptor may be a regular file or a
 * non-blocking pipe (standard input): when it has no data yet the reader says so and keeps what it
 * holds of a partial line for the next call. Pure C, no Lua: unit-tested in
 * tests/unit/test_linereader.c and fuzzed in tests/fuzz/fuzz_linereader.c.
 */
#ifndef AIGATE_LINEREADER_H
#define AIGATE_LINEREADER_H

#include <stddef.h>

#include "buf.h"

struct line_reader {
    int fd;
    struct buf buf;     /* bytes read and not handed out yet, from pos on */
    size_t pos;         /* where the next line starts in buf */
    size_t scanned;     /* buf[pos, scanned) holds no '\n' (a pipe's partial line is not searched twice) */
    size_t skipped;     /* > 0: the bytes dropped so far of a line longer than max_line */
    int eof;            /* read() returned 0 */
    int complete;       /* the last line returned ended with '\n' (not a last line cut short) */
    long long lineno;   /* the number of the last line returned (from 1) */
    long long consumed; /* bytes of the lines returned so far, their newlines included */
    size_t max_line;
};

/* A reader of fd (not owned: the caller closes it); lines longer than max_line bytes are skipped. */
void line_reader_init(struct line_reader *r, int fd, size_t max_line);
/* The next line:
 *   1: a line: *line and *len valid until the next call (*line not NUL-terminated, without its
 *      '\n'), *oversize 0; for a line longer than max_line, *line NULL, *len 0, *oversize its length;
 *   0: end of input (again on every later call);
 *  -1: a read error (errno set);
 *  -2: no data yet (a non-blocking fd): wait until fd is readable and call again. */
int line_reader_next(struct line_reader *r, const char **line, size_t *len, size_t *oversize);
/* Whether s[0..len) is only white space (' ', '\t', '\r', '\n', '\f', '\v'; empty too): a blank
 * line, which a batch skips. */
int line_is_blank(const char *s, size_t len);
/* Frees the reader's buffer (not fd); the reader may be initialised again. */
void line_reader_free(struct line_reader *r);

#endif
