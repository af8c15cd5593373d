/*
 * http.h: what http_client.c shares with other kinds of transfer on its curl multi handle (lane.c).
 *
 * Every easy handle on the multi handle has CURLOPT_PRIVATE set to a struct xfer, whose done
 * function is called once when curl reports the transfer finished (after the handle was removed
 * from the multi handle).
 */
#ifndef AIGATE_HTTP_H
#define AIGATE_HTTP_H

#include <stddef.h>

#include <curl/curl.h>
#include <lua.h>

#include "buf.h"

#define HTTP_DEFAULT_MAX_SIZE (64 * 1024 * 1024)

struct xfer {
    void (*done)(struct xfer *x, CURLcode rc);
};

/* Sets the socket callbacks every easy handle on the shared multi handle must have. */
void http_easy_sockets(CURL *easy);
/* Starts an easy handle on the shared multi handle; 0 or -1. */
int http_client_add(CURL *easy);
/* Takes it off again (before reuse or when cancelled). */
void http_client_remove(CURL *easy);

/* One header line from curl's header callback: a status line sets *status and clears hdrs; a
 * "Name: value" line appends "name\0value\0" (name lowercased, value trimmed). */
void http_header_line(struct buf *hdrs, long *status, const char *data, size_t len);
/* Pushes the table name -> value of hdrs (repeated names joined with ", "). */
void http_push_headers(lua_State *L, const struct buf *hdrs);
/* Pushes core.request's error string for a failed transfer: "kind: detail". */
void http_push_error(lua_State *L, CURLcode rc, const char *errbuf, size_t received, size_t max_size);

#endif
