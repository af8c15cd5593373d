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
