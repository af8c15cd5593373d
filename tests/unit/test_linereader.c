/* test_linereader.c: unit tests of the line reader (src/linereader.c) on real files and pipes. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "buf.h"
#include "linereader.h"
#include "unit.h"

/* A file holding data[0..len), opened for reading (the name is removed at once). */
static int file_with(const char *data, size_t len)
{
    char path[] = "/tmp/aigate-test-linereader-XXXXXX";
    int fd = mkstemp(path);
    size_t off = 0;

    if (fd < 0) {
        perror("mkstemp");
        exit(2);
    }
    unlink(path);
    while (off < len) {
        ssize_t n = write(fd, data + off, len - off);
        if (n <= 0) {
            perror("write");
            exit(2);
        }
        off += (size_t)n;
    }
    lseek(fd, 0, SEEK_SET);
    return fd;
}

/* Every line of fd rendered as "[line]" or "<oversize N>", "|" after a line cut short at the end;
 * stops at the end ("$"), an error ("!") or no data ("?"). */
static void read_all(struct line_reader *r, struct buf *out)
{
    for (;;) {
        const char *line;
        size_t len;
        size_t oversize;
        char tmp[48];
        int rc = line_reader_next(r, &line, &len, &oversize);

        if (rc != 1) {
            buf_append_char(out, rc == 0 ? '$' : rc == -1 ? '!' : '?');
            return;
        }
        if (line == NULL) {
            snprintf(tmp, sizeof(tmp), "<oversize %zu>", oversize);
            buf_append(out, tmp, strlen(tmp));
        } else {
            buf_append_char(out, '[');
            buf_append(out, line, len);
            buf_append_char(out, ']');
        }
        if (!r->complete)
            buf_append_char(out, '|');
    }
}

/* The lines of a file holding s, read with max_line. */
static int file_lines(const char *s, size_t len, size_t max_line, const char *want, long long lines)
{
    struct line_reader r;
    struct buf out;
    int fd = file_with(s, len);
    int ok;

    buf_init(&out);
    line_reader_init(&r, fd, max_line);
    read_all(&r, &out);
    ok = out.len == strlen(want) && memcmp(out.data, want, out.len) == 0 && r.lineno == lines &&
         r.consumed == (long long)len;
    if (!ok)
        printf("# got %s (lines %lld, consumed %lld of %zu), want %s\n", out.data, r.lineno, r.consumed, len,
               want);
    line_reader_free(&r);
    buf_free(&out);
    close(fd);
    return ok;
}

#define LINES(lit, max, want, n) file_lines((lit), sizeof(lit) - 1, (max), (want), (n))

static void test_files(void)
{
    CHECK(LINES("", 100, "$", 0), "an empty file has no line");
    CHECK(LINES("a\nbc\n", 100, "[a][bc]$", 2), "lines end at '\\n'");
    CHECK(LINES("a\nbc", 100, "[a][bc]|$", 2), "a last line without '\\n' is a line, marked cut short");
    CHECK(LINES("\n\n", 100, "[][]$", 2), "empty lines are lines");
    CHECK(LINES("\n", 100, "[]$", 1), "one newline is one empty line");
    CHECK(LINES("a\r\nb\r\n", 100, "[a\r][b\r]$", 2), "CRLF: the '\\r' stays in the line");
    CHECK(LINES("a\rb\n", 100, "[a\rb]$", 1), "a lone '\\r' does not end a line");
    CHECK(LINES("abcd\nabcde\nab\n", 4, "[abcd]<oversize 5>[ab]$", 3),
          "a line of max_line is kept, one more skipped");
    CHECK(LINES("abcdefgh", 4, "<oversize 8>|$", 1), "an oversize last line without '\\n'");
    CHECK(LINES("\n", 0, "[]$", 1), "max_line 0 keeps empty lines");
}

/* A NUL inside a line: compared by length. */
static void test_nul(void)
{
    static const char data[] = "x\0y\nz\n";
    struct line_reader r;
    const char *line;
    size_t len, over;
    int fd = file_with(data, sizeof(data) - 1);

    line_reader_init(&r, fd, 100);
    CHECK(line_reader_next(&r, &line, &len, &over) == 1 && len == 3 && memcmp(line, "x\0y", 3) == 0,
          "a NUL byte is a byte of the line");
    CHECK(line_reader_next(&r, &line, &len, &over) == 1 && len == 1 && line[0] == 'z',
          "the next line after it");
    CHECK(line_reader_next(&r, &line, &len, &over) == 0, "then the end");
    CHECK(line_reader_next(&r, &line, &len, &over) == 0, "the end again on a later call");
    line_reader_free(&r);
    close(fd);
}

/* Long lines around the reader's block size (65536), kept or skipped, and the lines around them. */
static void test_blocks(void)
{
    static const size_t sizes[] = { 65535, 65536, 65537, 131071, 131072, 131073, 200000 };
    size_t i;

    for (i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
        size_t n = sizes[i];
        struct buf data, want;
        char name[96];
        char tmp[48];
        int kept, skipped, last;

        buf_init(&data);
        buf_init(&want);
        buf_append(&data, "first\n", 6);
        buf_reserve(&data, n);
        memset(data.data + data.len, 'x', n);
        data.len += n;
        buf_append(&data, "\nafter\n", 7);
        buf_append(&want, "[first]", 7);
        buf_reserve(&want, n + 2);
        buf_append_char(&want, '[');
        memset(want.data + want.len, 'x', n);
        want.len += n;
        buf_append(&want, "][after]$", 9);
        kept = file_lines(data.data, data.len, n, want.data, 3);
        snprintf(name, sizeof(name), "a line of %zu bytes with max_line %zu is kept whole", n, n);
        CHECK(kept, name);

        buf_reset(&want);
        snprintf(tmp, sizeof(tmp), "[first]<oversize %zu>[after]$", n);
        buf_append(&want, tmp, strlen(tmp));
        skipped = file_lines(data.data, data.len, n - 1, want.data, 3);
        snprintf(name, sizeof(name), "a line of %zu bytes with max_line %zu is skipped, the next one read", n,
                 n - 1);
        CHECK(skipped, name);

        /* the same long line last, without its newline */
        data.len -= 7;
        buf_reset(&want);
        snprintf(tmp, sizeof(tmp), "[first]<oversize %zu>|$", n);
        buf_append(&want, tmp, strlen(tmp));
        last = file_lines(data.data, data.len, 100, want.data, 2);
        snprintf(name, sizeof(name), "a last line of %zu bytes without '\\n' is skipped", n);
        CHECK(last, name);
        buf_free(&data);
        buf_free(&want);
    }
}

/* The buffer never holds an oversize line: what it keeps stays near max_line plus one block. */
static void test_memory(void)
{
    struct buf data;
    struct line_reader r;
    const char *line;
    size_t len, over;
    int fd;

    buf_init(&data);
    buf_reserve(&data, 4 << 20);
    memset(data.data, 'y', 4 << 20);
    data.len = 4 << 20;
    buf_append(&data, "\nok\n", 4);
    fd = file_with(data.data, data.len);
    line_reader_init(&r, fd, 1000);
    CHECK(line_reader_next(&r, &line, &len, &over) == 1 && line == NULL && over == (size_t)4 << 20,
          "a 4 MiB line is reported by its length");
    CHECK(r.buf.cap <= 4 * 65536, "and was never held (the buffer stays small)");
    CHECK(line_reader_next(&r, &line, &len, &over) == 1 && len == 2 && memcmp(line, "ok", 2) == 0,
          "the line after it is read");
    line_reader_free(&r);
    close(fd);
    buf_free(&data);
}

static void write_all(int fd, const char *s)
{
    size_t len = strlen(s);

    if (write(fd, s, len) != (ssize_t)len) {
        perror("write");
        exit(2);
    }
}

static void nonblocking_pipe(int p[2])
{
    if (pipe(p) != 0) {
        perror("pipe");
        exit(2);
    }
    fcntl(p[0], F_SETFL, fcntl(p[0], F_GETFL) | O_NONBLOCK);
}

static void test_pipes(void)
{
    struct line_reader r;
    const char *line;
    size_t len, over;
    int p[2];
    int rc;

    nonblocking_pipe(p);
    line_reader_init(&r, p[0], 100);
    errno = 0;
    rc = line_reader_next(&r, &line, &len, &over);
    CHECK(rc == -2 && (errno == EAGAIN || errno == EWOULDBLOCK), "an empty non-blocking pipe: no data yet");
    write_all(p[1], "ab");
    CHECK(line_reader_next(&r, &line, &len, &over) == -2, "a partial line: no line yet");
    write_all(p[1], "c\nde");
    rc = line_reader_next(&r, &line, &len, &over);
    CHECK(rc == 1 && len == 3 && memcmp(line, "abc", 3) == 0, "the line completed by a later write");
    CHECK(r.lineno == 1 && r.consumed == 4, "its number and the bytes consumed");
    CHECK(line_reader_next(&r, &line, &len, &over) == -2, "the next partial line waits");
    write_all(p[1], "f\r\n\n");
    rc = line_reader_next(&r, &line, &len, &over);
    CHECK(rc == 1 && len == 4 && memcmp(line, "def\r", 4) == 0, "a CRLF line written in two pieces");
    rc = line_reader_next(&r, &line, &len, &over);
    CHECK(rc == 1 && len == 0 && line != NULL, "an empty line from the pipe");
    write_all(p[1], "last");
    CHECK(line_reader_next(&r, &line, &len, &over) == -2, "a last line before the writer closes");
    close(p[1]);
    rc = line_reader_next(&r, &line, &len, &over);
    CHECK(rc == 1 && len == 4 && memcmp(line, "last", 4) == 0 && !r.complete,
          "the writer closed: the last line, cut short");
    CHECK(line_reader_next(&r, &line, &len, &over) == 0, "then the end");
    CHECK(r.lineno == 4 && r.consumed == 14, "four lines, every byte consumed");
    line_reader_free(&r);
    close(p[0]);

    /* an oversize line arriving in pieces, across calls that found no data */
    nonblocking_pipe(p);
    line_reader_init(&r, p[0], 4);
    write_all(p[1], "0123456789");
    CHECK(line_reader_next(&r, &line, &len, &over) == -2, "an oversize line in progress: no line yet");
    write_all(p[1], "abcdef");
    CHECK(line_reader_next(&r, &line, &len, &over) == -2, "still in progress");
    write_all(p[1], "gh\nok\n");
    rc = line_reader_next(&r, &line, &len, &over);
    CHECK(rc == 1 && line == NULL && over == 18, "its whole length once its newline came");
    rc = line_reader_next(&r, &line, &len, &over);
    CHECK(rc == 1 && len == 2 && memcmp(line, "ok", 2) == 0, "the line after it");
    CHECK(r.consumed == 22, "bytes consumed count the skipped line");
    close(p[1]);
    CHECK(line_reader_next(&r, &line, &len, &over) == 0, "the end of the pipe");
    line_reader_free(&r);
    close(p[0]);
}

static void test_errors(void)
{
    struct line_reader r;
    const char *line;
    size_t len, over;
    int fd = open("/", O_RDONLY);

    line_reader_init(&r, fd, 100);
    errno = 0;
    CHECK(line_reader_next(&r, &line, &len, &over) == -1 && errno == EISDIR, "a read error: -1 with errno");
    line_reader_free(&r);
    close(fd);
    line_reader_init(&r, -1, 100);
    errno = 0;
    CHECK(line_reader_next(&r, &line, &len, &over) == -1 && errno == EBADF, "a closed descriptor: -1, EBADF");
    line_reader_free(&r);
    line_reader_free(&r);
    CHECK(r.buf.data == NULL, "free twice is harmless");
}

static void test_blank(void)
{
    CHECK(line_is_blank("", 0), "the empty line is blank");
    CHECK(line_is_blank(" \t\r\n\f\v", 6), "white space is blank");
    CHECK(!line_is_blank(" x ", 3), "a character is not");
    CHECK(!line_is_blank("\0", 1), "a NUL is not white space");
    CHECK(!line_is_blank("\xc2\xa0", 2), "nor a no-break space");
}

/* Lines from pseudo-random data (newlines often) match a plain split, at several max_line. */
static void test_random(void)
{
    unsigned long long seed = 88172645463325252ULL;
    int round;
    int bad = 0;

    for (round = 0; round < 40; round++) {
        struct buf data, want;
        struct line_reader r;
        size_t n = (size_t)(round * 7919) % 300000;
        size_t max_line = (size_t)round * 997 % 70000;
        size_t i, start = 0;
        int fd;

        buf_init(&data);
        buf_init(&want);
        buf_reserve(&data, n);
        for (i = 0; i < n; i++) {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            data.data[i] =
                (seed % (unsigned)(round % 5 == 0 ? 100000 : 300)) == 0 ? '\n' : (char)('a' + seed % 26);
        }
        data.len = n;
        for (i = 0; i <= n; i++) {
            if (i < n && data.data[i] != '\n')
                continue;
            if (i == n && start == n)
                break;
            if (i - start > max_line) {
                char tmp[48];
                snprintf(tmp, sizeof(tmp), "<oversize %zu>", i - start);
                buf_append(&want, tmp, strlen(tmp));
            } else {
                buf_append_char(&want, '[');
                buf_append(&want, data.data + start, i - start);
                buf_append_char(&want, ']');
            }
            if (i == n)
                buf_append_char(&want, '|');
            start = i + 1;
        }
        buf_append_char(&want, '$');
        fd = file_with(data.data ? data.data : "", n);
        line_reader_init(&r, fd, max_line);
        buf_reset(&data);
        read_all(&r, &data);
        if (data.len != want.len || memcmp(data.data, want.data, want.len) != 0 || r.consumed != (long long)n)
            bad++;
        line_reader_free(&r);
        close(fd);
        buf_free(&data);
        buf_free(&want);
    }
    CHECK(bad == 0, "40 pseudo-random files read as a plain split reads them");
}

int main(void)
{
    test_files();
    test_nul();
    test_blocks();
    test_memory();
    test_pipes();
    test_errors();
    test_blank();
    test_random();
    return unit_finish();
}
