/*
 * libcurl_driver.c: the benchmark's baseline. A plain libcurl multi loop in C that POSTs the same chat
 * request N times with C transfers in flight (connections reused), keeping each reply body, and
 * nothing else: what aigate batch is measured against.
 *
 * Usage: libcurl_driver URL N CONCURRENCY [BODY_FILE]. The body is bench.h's short-form request, or
 * the bytes of BODY_FILE (run.sh gives each line shape's request, so that the driver sends what aigate
 * sends for it). Prints "requests N ok OK seconds S" on stdout; exits 1 when a request failed or
 * answered other than 200.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

#include <curl/curl.h>

#include "bench.h"

/* Reads all of PATH into *body (NUL-terminated; freed by the caller); returns its length, or -1. */
static long read_body(const char *path, char **body)
{
    FILE *f = fopen(path, "rb");
    long len;

    if (f == NULL || fseek(f, 0, SEEK_END) != 0 || (len = ftell(f)) < 0 || fseek(f, 0, SEEK_SET) != 0 ||
        (*body = malloc((size_t)len + 1)) == NULL) {
        if (f)
            fclose(f);
        return -1;
    }
    if (fread(*body, 1, (size_t)len, f) != (size_t)len) {
        free(*body);
        fclose(f);
        return -1;
    }
    (*body)[len] = '\0';
    fclose(f);
    return len;
}

struct slot {
    CURL *easy;
    struct bench_body reply;
};

int main(int argc, char **argv)
{
    CURLM *multi;
    struct curl_slist *headers = NULL;
    struct slot *slots;
    struct rlimit rl;
    long n, conc, started = 0, done = 0, ok = 0, i;
    const char *body = bench_request_body;
    char *body_file = NULL;
    long body_len = (long)(sizeof(bench_request_body) - 1);
    double t0;

    if (argc < 4) {
        fprintf(stderr, "usage: libcurl_driver URL N CONCURRENCY [BODY_FILE]\n");
        return 2;
    }
    if (argc > 4) {
        body_len = read_body(argv[4], &body_file);
        if (body_len < 0) {
            fprintf(stderr, "libcurl_driver: cannot read %s\n", argv[4]);
            return 2;
        }
        body = body_file;
    }
    n = atol(argv[2]);
    conc = atol(argv[3]);
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    curl_global_init(CURL_GLOBAL_DEFAULT);
    multi = curl_multi_init();
    headers = bench_request_headers();
    slots = calloc((size_t)conc, sizeof(*slots));
    t0 = bench_now();
    for (i = 0; i < conc && started < n; i++) {
        struct slot *s = &slots[i];
        s->easy = curl_easy_init();
        curl_easy_setopt(s->easy, CURLOPT_URL, argv[1]);
        curl_easy_setopt(s->easy, CURLOPT_HTTPHEADER, headers);
        curl_easy_setopt(s->easy, CURLOPT_POSTFIELDS, body);
        curl_easy_setopt(s->easy, CURLOPT_POSTFIELDSIZE, body_len);
        curl_easy_setopt(s->easy, CURLOPT_WRITEFUNCTION, bench_body_write);
        curl_easy_setopt(s->easy, CURLOPT_WRITEDATA, &s->reply);
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
            s->reply.len = 0;
            curl_multi_remove_handle(multi, s->easy);
            if (started < n) {
                curl_multi_add_handle(multi, s->easy);
                started++;
            }
        }
        if (done < n)
            curl_multi_poll(multi, NULL, 0, 1000, NULL);
    }
    printf("requests %ld ok %ld seconds %.4f\n", n, ok, bench_now() - t0);
    for (i = 0; i < conc; i++) {
        if (slots[i].easy)
            curl_easy_cleanup(slots[i].easy);
        free(slots[i].reply.data);
    }
    free(slots);
    free(body_file);
    curl_slist_free_all(headers);
    curl_multi_cleanup(multi);
    curl_global_cleanup();
    return ok == n ? 0 : 1;
}
