/*
 * headers.h: a reply's header set as the HTTP client and the batch engine keep it, and the parsing
 * of the header lines curl hands over.
 *
 * A header set is one buf of "name\0value\0" pairs in the order received: names lowercased, values
 * trimmed, neither holding a NUL. Everything here reads within the lengths it is given (curl's header
 * lines are not NUL-terminated) and does no arithmetic on an empty buf's NULL pointer. Apart from the
 * Lua table of http_push_headers it is pure C, so it is fuzzed (tests/fuzz/fuzz_headers.c) and
 * unit-tested (tests/unit/test_headers.c) without the event loop.
 */
#ifndef AIGATE_HEADERS_H
#define AIGATE_HEADERS_H

#include <stddef.h>

#include <lua.h>

#include "buf.h"

/* One header line from curl's header callback (data[0..len), not NUL-terminated): a status line
 * "HTTP/..." sets *status (0 when it has no 1 to 3 digit code) and clears hdrs; a "Name: value" line
 * appends its pair. A line holding a NUL byte, or without a colon (the blank line ending the head), is
 * ignored. */
void http_header_line(struct buf *hdrs, long *status, const char *data, size_t len);
/* Steps through the pairs of hdrs: from *pos (0 to start), sets *name and *value (NUL-terminated,
 * inside hdrs) and moves *pos past them. Returns 0, touching nothing, when none is left. */
int header_next(const struct buf *hdrs, size_t *pos, const char **name, const char **value);
/* Appends to out the value of header name (lowercase), repeated ones joined with ", "; returns how
 * many there were (0: absent). */
int header_value(const struct buf *hdrs, const char *name, struct buf *out);
/* Pushes the table name -> value of hdrs (repeated names joined with ", "). */
void http_push_headers(lua_State *L, const struct buf *hdrs);

#endif
