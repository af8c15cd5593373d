/*
 * bench.h: what the benchmark's C helpers share (canned_upstream.c, libcurl_driver.c,
 * sdk_retry_driver.c), so that the two drivers send the same request and all three draw the same
 * random numbers and read the same clock. Header-only: each helper is one C file.
 */
#ifndef AIGATE_BENCH_H
#define AIGATE_BENCH_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* Monotonic seconds. */
static inline double bench_now(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* splitmix64: a uniform draw in [0, 1) from *state, the same sequence on every platform. */
static inline double bench_random(uint64_t *state)
{
    uint64_t z = (*state += 0x9e3779b97f4a7c15u);

    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9u;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebu;
    z ^= z >> 31;
    return (double)(z >> 11) / 9007199254740992.0;
}

#ifdef LIBCURL_VERSION
#ifndef AIGATE_UA
#define AIGATE_UA "aigate/0.1.0"
#endif

/* The same request aigate batch sends for the benchmark's line (run.sh checks that the two are the
 * same bytes, the Host port aside): its body and headers, so that both do the same work per request. */
static const char bench_request_body[] = "{\"messages\":[{\"content\":\"Say hello.\",\"role\":\"user\"}],"
                                         "\"model\":\"workers-ai/@cf/meta/llama-3.3-70b-instruct-fp8-fast\"}";

static inline struct curl_slist *bench_request_headers(void)
{
    struct curl_slist *headers = NULL;

    headers = curl_slist_append(headers, "content-type: application/json");
    headers = curl_slist_append(headers, "accept: application/json");
    headers = curl_slist_append(headers, "authorization: Bearer bench-token");
    headers = curl_slist_append(headers, "user-agent: " AIGATE_UA);
    headers = curl_slist_append(headers, "Expect:");
    return headers;
}

/* A reply body kept in full, as a client keeps it. */
struct bench_body {
    char *data;
    size_t len;
    size_t cap;
};

/* CURLOPT_WRITEFUNCTION for a struct bench_body (CURLOPT_WRITEDATA). */
static inline size_t bench_body_write(char *data, size_t size, size_t nmemb, void *userdata)
{
    struct bench_body *b = userdata;
    size_t n = size * nmemb;

    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap * 2 : 1024;
        char *p;
        while (cap < b->len + n + 1)
            cap *= 2;
        p = realloc(b->data, cap);
        if (p == NULL)
            return 0;
        b->data = p;
        b->cap = cap;
    }
    memcpy(b->data + b->len, data, n);
    b->len += n;
    return n;
}
#endif

#endif
