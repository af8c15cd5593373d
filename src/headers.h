/*
 * headers.h: a reply's header set as the HTTP client and the batch engine keep it, the parsing of the
 * header lines curl hands over, and the one builder of the header lists requests are sent with.
 *
 * A header set is one buf of "name\0value\0" pairs in the order received: names lowercased, values
 * trimmed, neither holding a NUL. Everything here reads within the lengths it is given (curl's header
 * lines are not NUL-terminated) and does no arithmetic on an empty buf's NULL pointer. Apart from the
 * Lua tables of http_push_headers and header_list_from_table it is pure C, so it is fuzzed
 * (tests/fuzz/fuzz_headers.c) and unit-tested (tests/unit/test_headers.c) without the event loop.
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

/* ---- request headers: curl's lists ---- */

struct curl_slist;

/* Appends the request header name: value to list as curl takes it: "name: value", or "name;" for an
 * empty value (curl's way to send a header with nothing after its colon, where "name:" would remove
 * the header). The text is cut at a NUL byte, as curl reads a C string. Returns the list (a new one
 * when list is NULL); aborts when out of memory, as buf.h does. */
struct curl_slist *header_list_append(struct curl_slist *list, const char *name, size_t name_len,
                                      const char *value, size_t value_len);
/* Whether the value at idx of L is nil (none) or a table of string names and string values: 0, or
 * -1 when it is not (the caller raises in its own words). */
int header_table_check(lua_State *L, int idx);
/* The request headers of the table at idx of L (name -> value; nil: none), then "Expect:" (no
 * "100-continue" round trip before a large body), into *list. 0; or -1 with *list NULL and nothing
 * allocated when header_table_check refuses the value. Raises nothing. */
int header_list_from_table(lua_State *L, int idx, struct curl_slist **list);

#endif
