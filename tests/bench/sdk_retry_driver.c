/*
 * sdk_retry_driver.c: the baseline for an upstream that says no. A plain libcurl multi loop in C, like
 * libcurl_driver.c (the same request, connections reused), that POSTs N requests with C in flight and
 * retries each one as the official openai SDKs do by default, so that `aigate batch` can be compared
 * with what a script on an SDK would get. Used by tests/bench/limits.sh.
 *
 * The policy, as documented for the openai Node and Python SDKs (maxRetries 2 by default):
 *   - at most 2 retries, so 3 tries in all;
 *   - retried: connection errors and timeouts (any transfer that ends without an HTTP reply), and the
 *     statuses 408, 409, 429 and 500 and above; anything else is final;
 *   - the delay before a retry is what the reply asks for, when it asks for more than 0 and less than
 *     60 s: `retry-after-ms` (milliseconds) first, else `retry-after` (seconds, or an HTTP date);
 *     otherwise min(0.5 * 2^retries, 8) seconds (retries: those made before this one, so 0.5 s then
 *     1 s), times a jitter factor 1 - random() * 0.25;
 *   - the timeout of a try is the SDKs' default, 10 minutes.
 * The SDKs also obey an `x-should-retry` header; the canned upstream never sends one, so it is left out.
 *
 * A request waiting for its retry keeps its slot: no other request starts in its place, as with a
 * script that runs a fixed pool of C workers, each calling the SDK (which sleeps inside the call).
 * The jitter comes from a fixed seed, so runs differ only by timing.
 *
 * Usage: sdk_retry_driver URL N CONCURRENCY. Prints "requests N ok OK failed F tries T seconds S" on
 * stdout; exits 1 when a request failed in the end. On SIGTERM or SIGINT it stops within a second and
 * prints the same line, "failed" then counting the requests not done, and exits 1.
 */
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/resource.h>
#include <time.h>

#include <curl/curl.h>

#include "bench.h"

#define MAX_RETRIES       2
#define INITIAL_DELAY_S   0.5
#define MAX_DELAY_S       8.0
#define MAX_RETRY_AFTER_S 60.0
#define TRY_TIMEOUT_MS    600000L

/* One request in flight (or waiting for its retry), in one of the C slots. */
struct slot {
    CURL *easy;
    int retries;          /* retries made so far for the current request */
    double wake_at;       /* monotonic seconds when the retry is due; 0: none pending */
    double retry_after_s; /* from the last reply's headers; < 0: none */
    struct bench_body reply;
};

static uint64_t rng_state = 1;
static volatile sig_atomic_t stopping;

static void stop_handler(int sig)
{
    (void)sig;
    stopping = 1;
}

/* The value of header NAME in the header line LINE (LEN bytes), copied to OUT (NUL-terminated, trailing
 * blanks dropped); 1 if LINE is that header, else 0. */
static int header_value(const char *line, size_t len, const char *name, char *out, size_t out_size)
{
    size_t name_len = strlen(name);
    size_t n;

    if (len <= name_len || line[name_len] != ':' || strncasecmp(line, name, name_len) != 0)
        return 0;
    line += name_len + 1;
    len -= name_len + 1;
    while (len > 0 && (*line == ' ' || *line == '\t')) {
        line++;
        len--;
    }
    while (len > 0 && (line[len - 1] == '\r' || line[len - 1] == '\n' || line[len - 1] == ' '))
        len--;
    n = len < out_size - 1 ? len : out_size - 1;
    memcpy(out, line, n);
    out[n] = '\0';
    return 1;
}

/* A number of VALUE as the SDKs read it (parseFloat / float): 1 and *OUT if it is one, else 0. */
static int parse_number(const char *value, double *out)
{
    char *end;
    double v = strtod(value, &end);

    if (end == value)
        return 0;
    *out = v;
    return 1;
}

/* Reads retry-after-ms, else retry-after, into the slot's retry_after_s. */
static size_t header_cb(char *data, size_t size, size_t nmemb, void *userdata)
{
    struct slot *s = userdata;
    size_t n = size * nmemb;
    char value[128];
    double v;

    if (header_value(data, n, "retry-after-ms", value, sizeof(value))) {
        if (parse_number(value, &v))
            s->retry_after_s = v / 1000.0;
    } else if (header_value(data, n, "retry-after", value, sizeof(value)) && s->retry_after_s < 0) {
        if (parse_number(value, &v)) {
            s->retry_after_s = v;
        } else {
            time_t when = curl_getdate(value, NULL);
            if (when != -1)
                s->retry_after_s = difftime(when, time(NULL));
        }
    }
    return n;
}

/* Whether a try that ended with RESULT and STATUS is retried (tries left aside). */
static int retryable(CURLcode result, long status)
{
    if (result != CURLE_OK)
        return 1;
    return status == 408 || status == 409 || status == 429 || status >= 500;
}

/* Seconds to wait before the slot's next try. */
static double retry_delay(const struct slot *s)
{
    double d;

    if (s->retry_after_s > 0 && s->retry_after_s < MAX_RETRY_AFTER_S)
        return s->retry_after_s;
    d = INITIAL_DELAY_S;
    for (int i = 0; i < s->retries; i++)
        d *= 2;
    if (d > MAX_DELAY_S)
        d = MAX_DELAY_S;
    return d * (1.0 - bench_random(&rng_state) * 0.25);
}

/* Starts a try of the slot's request. */
static void start_try(CURLM *multi, struct slot *s)
{
    s->reply.len = 0;
    s->retry_after_s = -1;
    s->wake_at = 0;
    curl_multi_add_handle(multi, s->easy);
}

static void setup_slot(struct slot *s, const char *url, struct curl_slist *headers)
{
    s->easy = curl_easy_init();
    curl_easy_setopt(s->easy, CURLOPT_URL, url);
    curl_easy_setopt(s->easy, CURLOPT_HTTPHEADER, headers);
    curl_easy_setopt(s->easy, CURLOPT_POSTFIELDS, bench_request_body);
    curl_easy_setopt(s->easy, CURLOPT_POSTFIELDSIZE, (long)(sizeof(bench_request_body) - 1));
    curl_easy_setopt(s->easy, CURLOPT_WRITEFUNCTION, bench_body_write);
    curl_easy_setopt(s->easy, CURLOPT_WRITEDATA, &s->reply);
    curl_easy_setopt(s->easy, CURLOPT_HEADERFUNCTION, header_cb);
    curl_easy_setopt(s->easy, CURLOPT_HEADERDATA, s);
    curl_easy_setopt(s->easy, CURLOPT_TIMEOUT_MS, TRY_TIMEOUT_MS);
    curl_easy_setopt(s->easy, CURLOPT_PRIVATE, s);
}

/* Milliseconds until the first pending retry is due (at most 1000). */
static int poll_timeout_ms(const struct slot *slots, long conc)
{
    double t = bench_now();
    double wait = 1.0;

    for (long i = 0; i < conc; i++)
        if (slots[i].wake_at > 0 && slots[i].wake_at - t < wait)
            wait = slots[i].wake_at - t;
    return wait > 0 ? (int)(wait * 1000.0) + 1 : 0;
}

int main(int argc, char **argv)
{
    CURLM *multi;
    struct curl_slist *headers = NULL;
    struct slot *slots;
    struct rlimit rl;
    long n, conc, started = 0, done = 0, ok = 0, tries = 0, i;
    double t0;

    if (argc < 4) {
        fprintf(stderr, "usage: sdk_retry_driver URL N CONCURRENCY\n");
        return 2;
    }
    n = atol(argv[2]);
    conc = atol(argv[3]);
    if (n < 0 || conc < 1) {
        fprintf(stderr, "sdk_retry_driver: N must be >= 0 and CONCURRENCY >= 1\n");
        return 2;
    }
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    signal(SIGTERM, stop_handler);
    signal(SIGINT, stop_handler);
    curl_global_init(CURL_GLOBAL_DEFAULT);
    multi = curl_multi_init();
    headers = bench_request_headers();
    slots = calloc((size_t)conc, sizeof(*slots));
    if (multi == NULL || slots == NULL)
        return 1;
    t0 = bench_now();
    for (i = 0; i < conc && started < n; i++) {
        setup_slot(&slots[i], argv[1], headers);
        start_try(multi, &slots[i]);
        started++;
        tries++;
    }
    while (done < n && !stopping) {
        int running;
        int left;
        CURLMsg *msg;
        double t;

        curl_multi_perform(multi, &running);
        while ((msg = curl_multi_info_read(multi, &left)) != NULL) {
            struct slot *s;
            long status = 0;
            if (msg->msg != CURLMSG_DONE)
                continue;
            curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **)&s);
            curl_easy_getinfo(msg->easy_handle, CURLINFO_RESPONSE_CODE, &status);
            curl_multi_remove_handle(multi, s->easy);
            if (retryable(msg->data.result, status) && s->retries < MAX_RETRIES) {
                s->wake_at = bench_now() + retry_delay(s);
                s->retries++;
                continue;
            }
            if (msg->data.result == CURLE_OK && status == 200)
                ok++;
            done++;
            s->retries = 0;
            if (started < n) {
                start_try(multi, s);
                started++;
                tries++;
            }
        }
        t = bench_now();
        for (i = 0; i < conc; i++) {
            if (slots[i].wake_at > 0 && slots[i].wake_at <= t) {
                start_try(multi, &slots[i]);
                tries++;
            }
        }
        if (done < n)
            curl_multi_poll(multi, NULL, 0, poll_timeout_ms(slots, conc), NULL);
    }
    printf("requests %ld ok %ld failed %ld tries %ld seconds %.4f\n", n, ok, n - ok, tries, bench_now() - t0);
    for (i = 0; i < conc; i++) {
        if (slots[i].easy)
            curl_easy_cleanup(slots[i].easy);
        free(slots[i].reply.data);
    }
    free(slots);
    curl_slist_free_all(headers);
    curl_multi_cleanup(multi);
    curl_global_cleanup();
    return ok == n ? 0 : 1;
}
