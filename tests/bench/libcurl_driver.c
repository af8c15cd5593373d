/*
 * libcurl_driver.c: the benchmark's baseline. A plain libcurl multi loop in C that POSTs the same chat
 * request N times with C transfers in flight (connections reused), keeping each reply body, and
 * nothing else: what aigate batch is measured against.
 *
 * Usage: libcurl_driver URL N CONCURRENCY. Prints "requests N ok OK seconds S" on stdout; exits 1
 * when a request failed or answered other than 200.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

#include <curl/curl.h>

#ifndef AIGATE_UA
#define AIGATE_UA "aigate/0.1.0"
#endif

/* The same request aigate batch sends for the benchmark's line (run.sh checks that the two are the
 * same bytes, the Host port aside): its body and headers, so that both do the same work per request. */
static const char request_body[] = "{\"messages\":[{\"content\":\"Say hello.\",\"role\":\"user\"}],"
                                   "\"model\":\"workers-ai/@cf/meta/llama-3.3-70b-instruct-fp8-fast\"}";

struct slot {
    CURL *easy;
    char *body;
    size_t len;
    size_t cap;
};

static size_t write_cb(char *data, size_t size, size_t nmemb, void *userdata)
{
    struct slot *s = userdata;
    size_t n = size * nmemb;

    if (s->len + n + 1 > s->cap) {
        size_t cap = s->cap ? s->cap * 2 : 1024;
        char *p;
        while (cap < s->len + n + 1)
            cap *= 2;
        p = realloc(s->body, cap);
        if (p == NULL)
            return 0;
        s->body = p;
        s->cap = cap;
    }
    memcpy(s->body + s->len, data, n);
    s->len += n;
    return n;
}

static double now(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
    CURLM *multi;
    struct curl_slist *headers = NULL;
    struct slot *slots;
    struct rlimit rl;
    long n, conc, started = 0, done = 0, ok = 0, i;
    double t0;

    if (argc < 4) {
        fprintf(stderr, "usage: libcurl_driver URL N CONCURRENCY\n");
        return 2;
    }
    n = atol(argv[2]);
    conc = atol(argv[3]);
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    curl_global_init(CURL_GLOBAL_DEFAULT);
    multi = curl_multi_init();
    headers = curl_slist_append(headers, "content-type: application/json");
    headers = curl_slist_append(headers, "accept: application/json");
    headers = curl_slist_append(headers, "authorization: Bearer bench-token");
    headers = curl_slist_append(headers, "user-agent: " AIGATE_UA);
    headers = curl_slist_append(headers, "Expect:");
    slots = calloc((size_t)conc, sizeof(*slots));
    t0 = now();
    for (i = 0; i < conc && started < n; i++) {
        struct slot *s = &slots[i];
        s->easy = curl_easy_init();
        curl_easy_setopt(s->easy, CURLOPT_URL, argv[1]);
        curl_easy_setopt(s->easy, CURLOPT_HTTPHEADER, headers);
        curl_easy_setopt(s->easy, CURLOPT_POSTFIELDS, request_body);
        curl_easy_setopt(s->easy, CURLOPT_POSTFIELDSIZE, (long)(sizeof(request_body) - 1));
        curl_easy_setopt(s->easy, CURLOPT_WRITEFUNCTION, write_cb);
        curl_easy_setopt(s->easy, CURLOPT_WRITEDATA, s);
        curl_easy_setopt(s->easy, CURLOPT_PRIVATE, s);
        curl_multi_add_handle(multi, s->easy);
        started++;
    }
    while (done < n) {
        int running;
        int left;
        CURLMsg *msg;

        curl_multi_perform(multi, &running);
        while ((msg = curl_multi_info_read(multi, &left)) != NULL) {
            struct slot *s;
            long status = 0;
            if (msg->msg != CURLMSG_DONE)
                continue;
            curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **)&s);
            curl_easy_getinfo(msg->easy_handle, CURLINFO_RESPONSE_CODE, &status);
            if (msg->data.result == CURLE_OK && status == 200)
                ok++;
            done++;
            s->len = 0;
            curl_multi_remove_handle(multi, s->easy);
            if (started < n) {
                curl_multi_add_handle(multi, s->easy);
                started++;
            }
        }
        if (done < n)
            curl_multi_poll(multi, NULL, 0, 1000, NULL);
    }
    printf("requests %ld ok %ld seconds %.4f\n", n, ok, now() - t0);
    for (i = 0; i < conc; i++) {
        if (slots[i].easy)
            curl_easy_cleanup(slots[i].easy);
        free(slots[i].body);
    }
    free(slots);
    curl_slist_free_all(headers);
    curl_multi_cleanup(multi);
    curl_global_cleanup();
    return ok == n ? 0 : 1;
}
