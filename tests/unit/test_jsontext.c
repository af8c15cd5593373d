/* test_jsontext.c: unit tests of JSON strings as aigate writes them (src/jsontext.c). */
#include <string.h>

#include "jsonscan.h"
#include "jsontext.h"
#include "unit.h"

static int quoted_is(const char *s, size_t len, const char *want)
{
    struct buf b;
    int ok;

    buf_init(&b);
    js_quote(&b, s, len);
    ok = b.len == strlen(want) && memcmp(b.data, want, b.len) == 0;
    buf_free(&b);
    return ok;
}

static int unescaped_is(const char *tok, const char *want, size_t want_len)
{
    struct buf b;
    int ok;

    buf_init(&b);
    ok = js_unescape(tok, strlen(tok), &b) == 0 && b.len == want_len &&
         (want_len == 0 || memcmp(b.data, want, want_len) == 0);
    buf_free(&b);
    return ok;
}

static int unescape_fails(const char *tok)
{
    struct buf b;
    int rc;

    buf_init(&b);
    rc = js_unescape(tok, strlen(tok), &b);
    buf_free(&b);
    return rc != 0;
}

int main(void)
{
    CHECK(quoted_is("", 0, "\"\""), "quote: the empty string");
    CHECK(quoted_is("plain text", 10, "\"plain text\""), "quote: plain text as it is");
    CHECK(quoted_is("a/b", 3, "\"a/b\""), "quote: '/' left as it is (no \\/)");
    CHECK(quoted_is("q\"b\\", 4, "\"q\\\"b\\\\\""), "quote: quote and backslash escaped");
    CHECK(quoted_is("\n\r\t\b\f", 5, "\"\\n\\r\\t\\b\\f\""), "quote: the short escapes");
    CHECK(quoted_is("\x01\x1f\x7f", 3, "\"\\u0001\\u001f\\u007f\""),
          "quote: other control bytes and DEL as \\u00XX");
    CHECK(quoted_is("a\0b", 3, "\"a\\u0000b\""), "quote: a NUL byte");
    CHECK(quoted_is("caf\xc3\xa9", 5, "\"caf\xc3\xa9\""), "quote: UTF-8 as it is");

    CHECK(unescaped_is("\"abc\"", "abc", 3), "unescape: no escapes");
    CHECK(unescaped_is("\"a\\nb\\/c\\\"\"", "a\nb/c\"", 6), "unescape: short escapes");
    CHECK(unescaped_is("\"\\u0041\\u00e9\"", "A\xc3\xa9", 3), "unescape: \\u to UTF-8");
    CHECK(unescaped_is("\"\\u20AC\"", "\xe2\x82\xac", 3), "unescape: upper-case hex");
    CHECK(unescaped_is("\"\\ud83d\\ude00\"", "\xf0\x9f\x98\x80", 4), "unescape: a surrogate pair");
    CHECK(unescaped_is("\"\\u0000\"", "\0", 1), "unescape: \\u0000 is a NUL byte");
    CHECK(unescape_fails("\"\\ud83d\""), "unescape: a lone high surrogate fails");
    CHECK(unescape_fails("\"\\ude00\""), "unescape: a lone low surrogate fails");
    CHECK(unescape_fails("\"\\ud83dx\\ude00\""),
          "unescape: a high surrogate not followed by a low one fails");

    CHECK(!js_needs_requote("\"plain\"", 7), "requote: plain text is already ours");
    CHECK(!js_needs_requote("\"a\\nb\\\"\\\\\"", 10), "requote: the short escapes are ours");
    CHECK(js_needs_requote("\"a\\/b\"", 6), "requote: \\/ is not ours");
    CHECK(js_needs_requote("\"\\u0041\"", 8), "requote: \\u escapes are read again");
    CHECK(js_needs_requote("\"a\x7f\"", 4), "requote: a raw DEL byte is written \\u007f");
    return unit_finish();
}
