/*
 * jsontext.c: JSON strings as aigate writes them (see jsontext.h).
 */
#include <string.h>

#include "jsontext.h"

#define APPEND_LIT(b, s) buf_append((b), (s), sizeof(s) - 1)

/* What js_quote writes for each byte: 0 the byte itself, else an escape. */
static const char *escape_of(unsigned char c, char u[7])
{
    static const char hex[] = "0123456789abcdef";

    switch (c) {
    case '"':
        return "\\\"";
    case '\\':
        return "\\\\";
    case '\n':
        return "\\n";
    case '\r':
        return "\\r";
    case '\t':
        return "\\t";
    case '\b':
        return "\\b";
    case '\f':
        return "\\f";
    default:
        break;
    }
    if (c < 0x20 || c == 0x7f) {
        u[0] = '\\';
        u[1] = 'u';
        u[2] = '0';
        u[3] = '0';
        u[4] = hex[c >> 4];
        u[5] = hex[c & 15];
        u[6] = '\0';
        return u;
    }
    return NULL;
}

void js_quote(struct buf *b, const char *s, size_t len)
{
    size_t i, run = 0;
    char u[7];

    buf_append_char(b, '"');
    for (i = 0; i < len; i++) {
        unsigned char c = (unsigned char)s[i];
        const char *e = (c >= 0x20 && c != '"' && c != '\\' && c != 0x7f) ? NULL : escape_of(c, u);
        if (e == NULL)
            continue;
        buf_append(b, s + run, i - run);
        buf_append(b, e, strlen(e));
        run = i + 1;
    }
    buf_append(b, s + run, len - run);
    buf_append_char(b, '"');
}

static int hex_value(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

static long read_u4(const char *p)
{
    long v = 0;
    int i;

    for (i = 0; i < 4; i++) {
        int h = hex_value(p[i]);
        if (h < 0)
            return -1;
        v = v * 16 + h;
    }
    return v;
}

static void append_utf8(struct buf *b, unsigned long cp)
{
    char t[4];

    if (cp < 0x80) {
        t[0] = (char)cp;
        buf_append(b, t, 1);
    } else if (cp < 0x800) {
        t[0] = (char)(0xc0 | (cp >> 6));
        t[1] = (char)(0x80 | (cp & 0x3f));
        buf_append(b, t, 2);
    } else if (cp < 0x10000) {
        t[0] = (char)(0xe0 | (cp >> 12));
        t[1] = (char)(0x80 | ((cp >> 6) & 0x3f));
        t[2] = (char)(0x80 | (cp & 0x3f));
        buf_append(b, t, 3);
    } else {
        t[0] = (char)(0xf0 | (cp >> 18));
        t[1] = (char)(0x80 | ((cp >> 12) & 0x3f));
        t[2] = (char)(0x80 | ((cp >> 6) & 0x3f));
        t[3] = (char)(0x80 | (cp & 0x3f));
        buf_append(b, t, 4);
    }
}

int js_unescape(const char *tok, size_t len, struct buf *out)
{
    const char *p = tok + 1;
    const char *end = tok + len - 1;
    const char *run = p;

    while (p < end) {
        long cp;
        if (*p != '\\') {
            p++;
            continue;
        }
        buf_append(out, run, (size_t)(p - run));
        switch (p[1]) {
        case 'b':
            buf_append_char(out, '\b');
            break;
        case 'f':
            buf_append_char(out, '\f');
            break;
        case 'n':
            buf_append_char(out, '\n');
            break;
        case 'r':
            buf_append_char(out, '\r');
            break;
        case 't':
            buf_append_char(out, '\t');
            break;
        case 'u':
            if (end - p < 6 || (cp = read_u4(p + 2)) < 0)
                return -1;
            if (cp >= 0xd800 && cp <= 0xdbff) {
                long lo;
                if (end - p < 12 || p[6] != '\\' || p[7] != 'u' || (lo = read_u4(p + 8)) < 0xdc00 ||
                    lo > 0xdfff)
                    return -1;
                append_utf8(out,
                            0x10000 + (((unsigned long)cp - 0xd800) << 10) + ((unsigned long)lo - 0xdc00));
                p += 6;
            } else if (cp >= 0xdc00 && cp <= 0xdfff) {
                return -1;
            } else {
                append_utf8(out, (unsigned long)cp);
            }
            p += 4;
            break;
        default: /* " \ / */
            buf_append_char(out, p[1]);
            break;
        }
        p += 2;
        run = p;
    }
    buf_append(out, run, (size_t)(end - run));
    return 0;
}

int js_needs_requote(const char *tok, size_t len)
{
    size_t i;

    /* A valid token holds no raw control byte: only an escape or DEL can differ from js_quote's. */
    for (i = 1; i + 1 < len; i++) {
        unsigned char c = (unsigned char)tok[i];
        if (c == 0x7f)
            return 1;
        if (c != '\\')
            continue;
        switch (tok[i + 1]) {
        case '"':
        case '\\':
        case 'n':
        case 'r':
        case 't':
        case 'b':
        case 'f':
            i++; /* written as js_quote writes it */
            continue;
        default:
            return 1; /* \/ and \u: js_quote writes these bytes otherwise (or the same, rarely) */
        }
    }
    return 0;
}
