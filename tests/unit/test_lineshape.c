/* test_lineshape.c: unit tests of the shape of batch lines (src/lineshape.c). */
#include <stdio.h>
#include <string.h>

#include "lineshape.h"
#include "unit.h"

static int shape(const char *line, struct line_shape *s)
{
    return line_shape_read(line, strlen(line), s);
}

static int tok_is(const struct js_token *t, const char *text)
{
    return t->start && t->len == strlen(text) && memcmp(t->start, text, t->len) == 0;
}

int main(void)
{
    struct line_shape s;

    CHECK(shape("{\"id\":\"a\",\"prompt\":\"hi\"}", &s) == 0 && !s.openai && s.has_prompt && !s.has_model,
          "short form: id and prompt");
    CHECK(tok_is(&s.prompt, "\"hi\""), "short form: the prompt's token");
    CHECK(shape(" { \"prompt\" : \"h\\u00e9\" , \"model\" : \"m/x\" , \"id\" : 7 } ", &s) == 0 &&
              s.has_model && tok_is(&s.model, "\"m/x\"") && tok_is(&s.prompt, "\"h\\u00e9\""),
          "short form: spaces, any order, an escaped prompt, a model");
    CHECK(shape("{\"id\":\"a\",\"messages\":[{\"role\":\"user\",\"content\":\"u\"},{\"content\":\"a\","
                "\"role\":\"assistant\"}]}",
                &s) == 0 &&
              s.nmessages == 2 && tok_is(&s.messages[1].role, "\"assistant\""),
          "short form: messages of role and content, either order");
    CHECK(shape("{\"prompt\":\"x\"}", &s) == 0, "short form: no id (the id rule names it)");
    CHECK(shape("{\"id\":\"a\",\"prompt\":\"x\",\"messages\":[]}", &s) != 0,
          "short form: prompt and messages");
    CHECK(shape("{\"id\":\"a\"}", &s) != 0, "short form: neither prompt nor messages");
    CHECK(shape("{\"id\":\"a\",\"prompt\":\"x\",\"system\":\"s\"}", &s) != 0, "short form: another field");
    CHECK(shape("{\"id\":\"a\",\"prompt\":\"x\",\"temperature\":1}", &s) != 0, "short form: a parameter");
    CHECK(shape("{\"id\":\"a\",\"prompt\":3}", &s) != 0, "short form: a prompt that is not a string");
    CHECK(shape("{\"id\":\"a\",\"prompt\":\"x\",\"model\":\"m\\/x\"}", &s) != 0,
          "short form: a model with escapes");
    CHECK(shape("{\"id\":\"a\",\"pr\\u006fmpt\":\"x\"}", &s) != 0, "a key with escapes");
    CHECK(shape("{\"id\":\"a\",\"messages\":[{\"role\":\"user\",\"content\":\"u\",\"name\":\"n\"}]}", &s) !=
              0,
          "a message with another field");
    CHECK(shape("{\"id\":\"a\",\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"text\"}]}]}", &s) !=
              0,
          "a message whose content is not a string");
    CHECK(shape("{\"id\":\"a\",\"messages\":[{\"role\":\"user\"}]}", &s) != 0, "a message without content");
    CHECK(shape("{\"id\":\"a\",\"messages\":[\"x\"]}", &s) != 0, "a message that is not an object");
    CHECK(shape("{\"id\":\"a\",\"messages\":[{\"role\":\"us\\u0065r\",\"content\":\"u\"}]}", &s) != 0,
          "a role with escapes");

    CHECK(
        shape("{\"custom_id\":\"c\",\"method\":\"POST\",\"url\":\"/v1/chat/"
              "completions\",\"body\":{\"model\":\"m\","
              "\"messages\":[{\"role\":\"system\",\"content\":\"s\"},{\"role\":\"user\",\"content\":\"u\"}],"
              "\"max_tokens\":100,\"temperature\":0.5,\"user\":\"x\"}}",
              &s) == 0 &&
            s.openai && s.nmessages == 2 && s.nparams == 3 && tok_is(&s.method, "\"POST\"") &&
            tok_is(&s.url, "\"/v1/chat/completions\"") && tok_is(&s.params[0].name, "\"max_tokens\"") &&
            tok_is(&s.params[0].value, "100") && s.params[0].kind == '0' && s.params[2].kind == '"',
        "OpenAI Batch line: method, url, model, messages, parameters");
    CHECK(shape("{\"custom_id\":\"c\",\"body\":{\"messages\":[]}}", &s) == 0 && s.nmessages == 0 &&
              !s.has_model,
          "OpenAI Batch line: no method, url or model");
    CHECK(shape("{\"custom_id\":\"c\",\"body\":{\"model\":\"m\"}}", &s) != 0,
          "OpenAI Batch line: no messages");
    CHECK(shape("{\"custom_id\":\"c\",\"body\":{\"messages\":[],\"stream\":false}}", &s) != 0,
          "OpenAI Batch line: a boolean parameter");
    CHECK(shape("{\"custom_id\":\"c\",\"body\":{\"messages\":[],\"stop\":[\"x\"]}}", &s) != 0,
          "OpenAI Batch line: an array parameter");
    CHECK(shape("{\"custom_id\":\"c\",\"body\":{\"messages\":[],\"seed\":null}}", &s) != 0,
          "OpenAI Batch line: a null parameter");
    CHECK(shape("{\"custom_id\":\"c\",\"prompt\":\"x\",\"body\":{\"messages\":[]}}", &s) != 0,
          "the two forms mixed");
    CHECK(shape("{\"custom_id\":\"c\",\"method\":1,\"body\":{\"messages\":[]}}", &s) != 0,
          "OpenAI Batch line: a method that is not a string");
    CHECK(shape("{\"custom_id\":\"c\",\"url\":\"/v1/embeddings\",\"body\":{\"messages\":[],\"input\":\"x\"}}",
                &s) != 0,
          "OpenAI Batch line: url /v1/embeddings, whatever the body holds");
    CHECK(shape("{\"custom_id\":\"c\",\"url\":\"/v1/completions\",\"body\":{\"messages\":[]}}", &s) != 0,
          "OpenAI Batch line: another url");
    CHECK(shape("{\"custom_id\":\"c\",\"url\":\"\\/v1\\/chat\\/completions\",\"body\":{\"messages\":[]}}",
                &s) != 0,
          "OpenAI Batch line: a url with escapes (the general path reads it)");
    CHECK(shape("{\"custom_id\":\"c\",\"url\":\"/chat/completions\",\"body\":{\"messages\":[]}}", &s) == 0,
          "OpenAI Batch line: a url that is /chat/completions alone");
    CHECK(shape("{\"custom_id\":\"c\",\"method\":\"PUT\",\"body\":{\"messages\":[]}}", &s) != 0,
          "OpenAI Batch line: a method other than POST");
    CHECK(shape("[1]", &s) != 0 && shape("", &s) != 0 && shape("{}", &s) != 0,
          "not an object, empty, no fields");
    {
        char line[4096];
        size_t n = 0;
        int i;
        n += (size_t)snprintf(line + n, sizeof(line) - n, "{\"id\":\"a\",\"messages\":[");
        for (i = 0; i <= SHAPE_MAX_MESSAGES; i++)
            n += (size_t)snprintf(line + n, sizeof(line) - n, "%s{\"role\":\"user\",\"content\":\"u\"}",
                                  i ? "," : "");
        snprintf(line + n, sizeof(line) - n, "]}");
        CHECK(shape(line, &s) != 0, "more messages than SHAPE_MAX_MESSAGES: the general path");
    }
    return unit_finish();
}
