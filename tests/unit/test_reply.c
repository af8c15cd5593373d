/* test_reply.c: unit tests of the engine's reading of replies (src/reply.c). */
#include <string.h>

#include "reply.h"
#include "unit.h"

static int scan(const char *body, struct reply *r)
{
    return reply_scan(body, strlen(body), r);
}

int main(void)
{
    struct reply r;

    CHECK(scan("{\"id\":\"x\",\"model\":\"m\",\"choices\":[{\"message\":{}}],\"usage\":{\"prompt_tokens\":1,"
               "\"completion_tokens\":2,\"total_tokens\":3}}",
               &r) == 0 &&
              r.has_model && r.usage[0] == 1 && r.usage[1] == 2 && r.usage[2] == 3,
          "a usual completion: model and usage read");
    CHECK(scan("{\"choices\":[{}]}", &r) == 0 && !r.has_usage[0] && !r.has_model, "no usage, no model");
    CHECK(scan("{\"choices\":[{}],\"usage\":{\"prompt_tokens\":5}}", &r) == 0 && r.has_usage[0] &&
              !r.has_usage[1],
          "a partial usage");
    CHECK(scan("{\"choices\":[{}],\"error\":null}", &r) == 0, "error null is no error");
    CHECK(scan("{\"choices\":[{}],\"error\":{\"message\":\"x\"}}", &r) != 0, "an error object: Lua decides");
    CHECK(scan("{\"choices\":[{}],\"success\":false}", &r) != 0, "success false: Lua decides");
    CHECK(scan("{\"choices\":[]}", &r) != 0, "no choice: Lua decides");
    CHECK(scan("{\"choices\":[\"x\"]}", &r) != 0, "a choice that is not a table: Lua decides");
    CHECK(scan("{\"choices\":{}}", &r) != 0, "choices not an array: Lua decides");
    CHECK(scan("{\"choices\":[{}],\"usage\":{\"prompt_tokens\":1.5}}", &r) != 0,
          "a float count: Lua decides");
    CHECK(scan("{\"choices\":[{}],\"usage\":{\"prompt_tokens\":1,\"prompt_tokens\":2}}", &r) != 0,
          "a repeated count: Lua decides");
    {
        struct buf b;
        const char *m = NULL;
        size_t n = 0;
        buf_init(&b);
        CHECK(scan("{\"choices\":[{}],\"model\":\"m\\/x\\u00e9\"}", &r) == 0 && reply_model(&r, &b, &m, &n) &&
                  n == 5 && memcmp(m, "m/x\xc3\xa9", 5) == 0,
              "a model with escapes: read as the decoder reads it");
        CHECK(scan("{\"choices\":[{}],\"model\":\"plain\"}", &r) == 0 && reply_model(&r, &b, &m, &n) &&
                  n == 5 && memcmp(m, "plain", 5) == 0,
              "a model without escapes: its text in place");
        CHECK(scan("{\"choices\":[{}],\"model\":7}", &r) == 0 && !reply_model(&r, &b, &m, &n),
              "a model that is not a string: none");
        buf_free(&b);
    }
    CHECK(scan("{\"choices\":[{}],\"model\":\"\\ud800\"}", &r) != 0,
          "a model of a lone surrogate: Lua decides");
    CHECK(scan("{\"choices\":[{}],\"id\":\"a\\u0041\"}", &r) == 0 &&
              scan("{\"choices\":[{}],\"id\":12}", &r) == 0,
          "any id (the result line does not write it)");
    CHECK(scan("{\"choices\":[{}]}\n", &r) != 0, "a body of more than one line: Lua decides");
    CHECK(scan(" {\"choices\":[{}]}", &r) != 0, "a body that does not start with its object: Lua decides");
    CHECK(scan("{\"choices\":[{}]", &r) != 0, "invalid JSON: Lua decides");
    CHECK(scan("", &r) != 0, "an empty body: Lua decides");
    return unit_finish();
}
