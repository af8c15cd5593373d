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
    CHECK(scan("{\"choices\":[{}],\"model\":\"m\\/x\"}", &r) != 0, "a model with escapes: Lua decides");
    CHECK(scan("{\"choices\":[{}],\"id\":\"a\\u0041\"}", &r) != 0, "an id with escapes: Lua decides");
    CHECK(scan("{\"choices\":[{}]}\n", &r) != 0, "a body of more than one line: Lua decides");
    CHECK(scan(" {\"choices\":[{}]}", &r) != 0, "a body that does not start with its object: Lua decides");
    CHECK(scan("{\"choices\":[{}]", &r) != 0, "invalid JSON: Lua decides");
    CHECK(scan("", &r) != 0, "an empty body: Lua decides");
    return unit_finish();
}
