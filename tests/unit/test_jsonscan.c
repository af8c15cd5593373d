/*
 * test_jsonscan.c: unit tests of the JSON scanners (src/jsonscan.c): the strict scanner the engine
 * copies bytes with, and js_line_read, the id rule's reading of a line as lua-cjson decodes it.
 * tests/fuzz/fuzz_line_id.c checks the same code against lua-cjson on random input; these pin the cases one
 * by one.
 */
#include <stdio.h>
#include <string.h>

#include "buf.h"
#include "jsonscan.h"
#include "unit.h"

/* ---- the strict scanner ---------------------------------------------------------------------- */

/* Whether the strict scanner takes the whole text as one value (whitespace around it allowed). */
static int strict_len(const char *text, size_t len)
{
    struct js_scan s = { text, text + len, 0 };
    char kind;

    js_skip_ws(&s);
    if (js_scan_value(&s, NULL, &kind) != 0)
        return 0;
    js_skip_ws(&s);
    return s.p == s.end;
}

static int strict(const char *text)
{
    return strict_len(text, strlen(text));
}

/* The token of a value that is a string or a number. */
static int token_of(const char *text, struct js_token *tok, char *kind)
{
    struct js_scan s = { text, text + strlen(text), 0 };

    return js_scan_value(&s, tok, kind) == 0 && s.p == s.end;
}

static void test_values(void)
{
    CHECK(strict("null") && strict("true") && strict("false"), "the three literals");
    CHECK(!strict("nul") && !strict("True") && !strict("NULL") && !strict("nullx"), "literals are exact");
    CHECK(strict("{}") && strict("[]") && strict(" { } ") && strict("\t[\r\n]\n"),
          "empty containers, white space");
    CHECK(strict("{\"a\":[1,{\"b\":null}],\"c\":\"d\"}"), "nested values");
    CHECK(!strict("{\"a\":1,}") && !strict("[1,]") && !strict("[,1]"), "no trailing or leading comma");
    CHECK(!strict("{\"a\" 1}") && !strict("{a:1}") && !strict("{'a':1}"), "keys are strings before a colon");
    CHECK(!strict("{\"a\":1}}") && !strict("[1] [2]") && !strict(""), "one value, nothing after it");
    CHECK(!strict("[1") && !strict("{\"a\":") && !strict("\"abc"), "cut short");
    CHECK(!strict("\f1") && !strict("1\v"), "white space is space, tab, CR and LF only");
}

static int member_scan(void *ctx, struct js_scan *s, const struct js_token *key)
{
    char kind;

    (void)key;
    ++*(int *)ctx;
    return js_scan_value(s, NULL, &kind);
}

static void test_whole_object(void)
{
    int n = 0;

    CHECK(js_scan_whole_object(" {\"a\":1,\"b\":[2]} ", 17, member_scan, &n) == 0 && n == 2,
          "whole object: each member seen");
    n = 0;
    CHECK(js_scan_whole_object("[1]", 3, member_scan, &n) != 0, "whole object: an array is not one");
    CHECK(js_scan_whole_object("{\"a\":1} x", 9, member_scan, &n) != 0, "whole object: nothing after it");
}

static void test_strings(void)
{
    struct js_token t;
    char kind;

    CHECK(token_of("\"abc\"", &t, &kind) && kind == '"' && t.is_string && !t.escaped && t.len == 5,
          "a plain string: its token holds the quotes");
    CHECK(token_of("\"\\\" \\\\ \\/ \\b \\f \\n \\r \\t\"", &t, &kind) && t.escaped, "every short escape");
    CHECK(token_of("\"\\u00e9\\u20AC\"", &t, &kind) && t.escaped, "\\u escapes, either case");
    CHECK(!strict("\"\\x\"") && !strict("\"\\'\"") && !strict("\"\\U0041\""), "unknown escapes are refused");
    CHECK(!strict("\"\\u12\"") && !strict("\"\\u12g4\""), "a \\u escape needs four hex digits");
    CHECK(!strict("\"\\ud83d\\ude00\""), "strict: an escaped surrogate is left to Lua");
    CHECK(!strict("\"a\nb\"") && !strict("\"a\tb\"") && !strict("\"\x01\""), "raw control bytes are refused");
    CHECK(token_of("\"a\x7f\"", &t, &kind) && t.escaped,
          "a DEL byte is taken but marked (we would escape it)");
    CHECK(strict("\"0123456789abcdef0123456789abcdef\""), "a long plain string (read 8 bytes at a time)");
    CHECK(!strict_len("\"abc\0def\"", 9), "a NUL byte is a control byte");
}

static void test_numbers(void)
{
    static const char *const good[] = { "0",
                                        "-0",
                                        "7",
                                        "-12",
                                        "1.5",
                                        "0.25",
                                        "-0.0",
                                        "1e5",
                                        "1E5",
                                        "1e+5",
                                        "1e-5",
                                        "2.5E-10",
                                        "123456789012345678901234567890" };
    static const char *const bad[] = { "01",   "-01", "+1",  ".5",   "1.",       "-",   "1e", "1e+",  "0x10",
                                       "1.e5", "--1", "NaN", "-inf", "Infinity", "1 2", "0.", "1.5.2" };
    struct js_token t;
    char kind;
    size_t i;
    char name[80];

    for (i = 0; i < sizeof(good) / sizeof(good[0]); i++) {
        snprintf(name, sizeof(name), "JSON allows the number %s", good[i]);
        CHECK(strict(good[i]), name);
    }
    for (i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        snprintf(name, sizeof(name), "JSON refuses the number %s", bad[i]);
        CHECK(!strict(bad[i]), name);
    }
    CHECK(token_of("42", &t, &kind) && kind == '0' && t.is_int && !t.is_string && t.len == 2,
          "an integer token");
    CHECK(token_of("4.0", &t, &kind) && !t.is_int, "a fraction is not an integer");
    CHECK(token_of("4e0", &t, &kind) && !t.is_int, "nor an exponent");
    CHECK(token_of("-7", &t, &kind) && js_plain_int(&t, kind), "plain int: -7");
    CHECK(token_of("-0", &t, &kind) && !js_plain_int(&t, kind), "plain int: not -0 (the decoder gives 0)");
    CHECK(token_of("123456789012345", &t, &kind) && js_plain_int(&t, kind), "plain int: 15 digits");
    CHECK(token_of("1234567890123456", &t, &kind) && !js_plain_int(&t, kind), "plain int: not 16 digits");
}

static void test_depth(void)
{
    char text[2 * (JS_STRICT_DEPTH + 1) + 1];
    int i;

    for (i = 0; i < JS_STRICT_DEPTH; i++) {
        text[i] = '[';
        text[2 * JS_STRICT_DEPTH - 1 - i] = ']';
    }
    CHECK(strict_len(text, 2 * JS_STRICT_DEPTH), "nesting up to the strict depth is taken");
    for (i = 0; i < JS_STRICT_DEPTH + 1; i++) {
        text[i] = '[';
        text[2 * (JS_STRICT_DEPTH + 1) - 1 - i] = ']';
    }
    CHECK(!strict_len(text, 2 * (JS_STRICT_DEPTH + 1)), "one level deeper is refused");
}

static void test_utf8(void)
{
    static const struct {
        const char *s;
        size_t n; /* what js_utf8_char says of its first character */
        const char *name;
    } cases[] = {
        { "A", 1, "ASCII" },
        { "\xc3\xa9", 2, "a two-byte character" },
        { "\xe2\x82\xac", 3, "a three-byte character" },
        { "\xf0\x9f\x98\x80", 4, "a four-byte character" },
        { "\xf4\x8f\xbf\xbf", 4, "U+10FFFF" },
        { "\x80", 0, "a lone continuation byte" },
        { "\xc0\x80", 0, "an overlong NUL" },
        { "\xc1\xbf", 0, "an overlong two-byte form" },
        { "\xe0\x80\x80", 0, "an overlong three-byte form" },
        { "\xf0\x80\x80\x80", 0, "an overlong four-byte form" },
        { "\xed\xa0\x80", 0, "a surrogate" },
        { "\xf4\x90\x80\x80", 0, "past U+10FFFF" },
        { "\xf5\x80\x80\x80", 0, "a lead byte past F4" },
        { "\xe2\x82", 0, "cut short" },
        { "\xe2\x28\xa1", 0, "a bad continuation" },
    };
    size_t i;
    char name[80];

    for (i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        const unsigned char *p = (const unsigned char *)cases[i].s;
        snprintf(name, sizeof(name), "utf8 char: %s", cases[i].name);
        CHECK(js_utf8_char(p, p + strlen(cases[i].s)) == cases[i].n, name);
    }
    CHECK(js_utf8_check("plain ascii text, longer than 8", 31) == 31, "utf8 check: ASCII");
    CHECK(js_utf8_check("0123456789\xc3\xa9xyz\xff", 16) == 15,
          "utf8 check: the offset of the first bad byte");
    CHECK(js_utf8_check("01234567\xe2\x82", 10) == 8, "utf8 check: a character cut at the end");
    CHECK(js_utf8_check("", 0) == 0, "utf8 check: empty");
    CHECK(strict("\"caf\xc3\xa9 \xf0\x9f\x98\x80\""), "strict: UTF-8 in strings");
    CHECK(!strict("\"caf\xe9\"") && !strict("\"\xed\xa0\x80\""),
          "strict: bytes that are not UTF-8 are refused");
}

static void test_misc(void)
{
    struct js_token key = { "\"model\"", 7, 0, 0, 1 };

    CHECK(js_key_is(&key, "model") && !js_key_is(&key, "mode") && !js_key_is(&key, "models"), "key_is");
    CHECK(js_hash("", 0) == 2166136261u && js_hash("a", 1) == 0xe40c292cu, "js_hash is FNV-1a");
}

/* ---- js_line_read ---------------------------------------------------------------------------- */

static struct buf idbuf;

static struct js_line line_read(const char *line, size_t len)
{
    struct js_line r;

    js_line_read(line, len, &r, &idbuf);
    return r;
}

#define READ(lit) line_read((lit), sizeof(lit) - 1)

static int id_is(const char *want)
{
    return idbuf.len == strlen(want) && memcmp(idbuf.data, want, idbuf.len) == 0;
}

static void test_line_ids(void)
{
    struct js_line r;

    r = READ("{\"id\":\"x\",\"custom_id\":\"c\"}");
    CHECK(r.problem == JS_OK && r.id == JS_ID_TEXT && id_is("c") && strcmp(r.id_field, "custom_id") == 0,
          "line: custom_id comes before id");
    r = READ("{\"custom_id\":null,\"id\":\"x\"}");
    CHECK(r.id == JS_ID_TEXT && id_is("x") && strcmp(r.id_field, "id") == 0,
          "line: a null custom_id: the id");
    r = READ("{\"prompt\":\"p\",\"body\":{\"id\":\"inner\"}}");
    CHECK(r.problem == JS_OK && r.id == JS_ID_NONE, "line: an id inside another object does not name it");
    r = READ("{\"id\":42}");
    CHECK(r.id == JS_ID_TEXT && id_is("42"), "line: an integer id, its digits");
    r = READ("{\"id\":4.5}");
    CHECK(r.id == JS_ID_NUMBER, "line: another number: only the decoder can write it");
    r = READ("{\"id\":\"\"}");
    CHECK(r.problem == JS_OK && r.id == JS_ID_BAD, "line: the empty string is a bad id");
    r = READ("{\"id\":true}");
    CHECK(r.id == JS_ID_BAD && strcmp(r.id_field, "id") == 0, "line: true is a bad id");
    r = READ("{\"id\":[1]}");
    CHECK(r.id == JS_ID_BAD, "line: an array is a bad id");
    r = READ("{\"id\":\"caf\\u00e9 \\ud83d\\ude00\\n\"}");
    CHECK(r.id == JS_ID_TEXT && id_is("caf\xc3\xa9 \xf0\x9f\x98\x80\n"), "line: an escaped id is decoded");
    r = READ("{\"id\":\"a\",\"id\":\"b\"}");
    CHECK(r.problem == JS_DUP_KEY && r.id == JS_ID_UNKNOWN, "line: a repeated id cannot be told");
}

static void test_line_problems(void)
{
    struct js_line r;

    r = READ("{\"id\":\"a\0\"}");
    CHECK(r.problem == JS_NUL && r.offset == 8, "line: a NUL byte, where");
    r = READ("{\"id\":}");
    CHECK(r.problem == JS_INVALID && r.offset == 6, "line: invalid JSON, where the scan stopped");
    r = READ("[1,2]");
    CHECK(r.problem == JS_NOT_OBJECT && r.id == JS_ID_NONE, "line: valid JSON that is not an object");
    r = READ("  ");
    CHECK(r.problem == JS_INVALID, "line: white space alone is not JSON");
    r = READ("{\"a\":\"\xff\"}");
    CHECK(r.problem == JS_BAD_UTF8 && r.offset == 6, "line: a byte that is not UTF-8, where");
    r = READ("{\"id\":\"\xc3\x28\"}");
    CHECK(r.problem == JS_BAD_UTF8 && r.id == JS_ID_UNKNOWN, "line: an id that is not UTF-8 cannot be told");
    r = READ("{\"a\":1,\"a\":2}");
    CHECK(r.problem == JS_DUP_KEY && r.offset == 7 && r.key_len == 3 && memcmp(r.key, "\"a\"", 3) == 0,
          "line: a duplicate key, its second place and text");
    r = READ("{\"a\":1,\"\\u0061\":2}");
    CHECK(r.problem == JS_DUP_KEY && r.key_len == 8, "line: keys compare decoded");
    r = READ("{\"a\":{\"a\":1},\"b\":{\"a\":2}}");
    CHECK(r.problem == JS_OK && r.members == 4, "line: the same key in different objects is no duplicate");
    r = READ("{\"a\":{\"b\":1,\"b\":2}}");
    CHECK(r.problem == JS_DUP_KEY && r.offset == 12, "line: a duplicate in an inner object");
    r = READ("{\"a\":\"\xff\",\"a\":1}");
    CHECK(r.problem == JS_BAD_UTF8, "line: bad UTF-8 is reported before a duplicate key");
}

/* Many keys take the sorted path: the duplicate reported is the one whose repeat comes first. */
static void test_many_keys(void)
{
    struct buf line;
    struct js_line r;
    char key[32];
    int i;

    buf_init(&line);
    buf_append_char(&line, '{');
    for (i = 0; i < 40; i++) {
        snprintf(key, sizeof(key), "%s\"k%d\":%d", i ? "," : "", i == 30 ? 25 : i == 35 ? 3 : i, i);
        buf_append(&line, key, strlen(key));
    }
    buf_append_char(&line, '}');
    r = line_read(line.data, line.len);
    CHECK(r.problem == JS_DUP_KEY && r.key_len == 5 && memcmp(r.key, "\"k25\"", 5) == 0 && r.members == 40,
          "line: 40 keys, two repeats: the first repeat in the line");
    buf_free(&line);
}

/* Numbers as lua-cjson reads them (decode_invalid_numbers off), not as RFC 8259 has them. */
static void test_line_numbers(void)
{
    static const char *const taken[] = { "{\"a\":1.}", "{\"a\":-.5}", "{\"a\":-0}", "{\"a\":1E+2}",
                                         "{\"a\":0.}" };
    static const char *const refused[] = { "{\"a\":.5}",   "{\"a\":01}",  "{\"a\":0x1}",
                                           "{\"a\":-inf}", "{\"a\":NaN}", "{\"a\":+1}",
                                           "{\"a\":-}",    "{\"a\":1e}",  "{\"a\":1E+}" };
    size_t i;
    char name[80];

    for (i = 0; i < sizeof(taken) / sizeof(taken[0]); i++) {
        struct js_line r = line_read(taken[i], strlen(taken[i]));
        snprintf(name, sizeof(name), "line: the decoder takes %s", taken[i]);
        CHECK(r.problem == JS_OK, name);
    }
    for (i = 0; i < sizeof(refused) / sizeof(refused[0]); i++) {
        struct js_line r = line_read(refused[i], strlen(refused[i]));
        snprintf(name, sizeof(name), "line: the decoder refuses %s", refused[i]);
        CHECK(r.problem == JS_INVALID, name);
    }
}

/* {"a": [[...]]} with `arrays` arrays: the object counts as one level. */
static struct js_line nested(int arrays)
{
    struct buf text;
    struct js_line r;
    int i;

    buf_init(&text);
    buf_append(&text, "{\"a\":", 5);
    for (i = 0; i < arrays; i++)
        buf_append_char(&text, '[');
    for (i = 0; i < arrays; i++)
        buf_append_char(&text, ']');
    buf_append_char(&text, '}');
    r = line_read(text.data, text.len);
    buf_free(&text);
    return r;
}

static void test_line_depth(void)
{
    CHECK(nested(JS_LINE_DEPTH - 1).problem == JS_OK, "line: nesting up to the decoder's depth is taken");
    CHECK(nested(JS_LINE_DEPTH).problem == JS_INVALID, "line: one level deeper is refused");
}

int main(void)
{
    buf_init(&idbuf);
    test_values();
    test_whole_object();
    test_strings();
    test_numbers();
    test_depth();
    test_utf8();
    test_misc();
    test_line_ids();
    test_line_problems();
    test_many_keys();
    test_line_numbers();
    test_line_depth();
    buf_free(&idbuf);
    return unit_finish();
}
