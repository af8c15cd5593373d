/* test_buf.c: unit tests of the growable buffer (src/buf.c). */
#include <string.h>

#include "buf.h"
#include "unit.h"

int main(void)
{
    struct buf b;
    int i;

    buf_init(&b);
    CHECK(b.len == 0 && b.data == NULL, "starts empty without allocating");
    buf_append(&b, "hello", 5);
    CHECK(b.len == 5 && strcmp(b.data, "hello") == 0, "append keeps a terminating NUL");
    buf_append_char(&b, '!');
    CHECK(strcmp(b.data, "hello!") == 0, "append_char");
    buf_consume(&b, 2);
    CHECK(b.len == 4 && strcmp(b.data, "llo!") == 0, "consume drops the front");
    buf_consume(&b, 100);
    CHECK(b.len == 0 && b.data[0] == '\0', "consume past the end empties");
    for (i = 0; i < 100000; i++)
        buf_append(&b, "0123456789", 10);
    CHECK(b.len == 1000000 && b.cap > b.len, "grows to a million bytes");
    CHECK(memcmp(b.data + 999990, "0123456789", 10) == 0, "content intact after growth");
    buf_reset(&b);
    CHECK(b.len == 0 && b.cap >= 1000000, "reset keeps the capacity");
    buf_append(&b, "", 0);
    CHECK(b.len == 0 && b.data[0] == '\0', "empty append");
    buf_free(&b);
    CHECK(b.data == NULL && b.cap == 0, "free releases");
    return unit_finish();
}
