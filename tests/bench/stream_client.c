/*
 * stream_client.c: the streaming client of tests/bench/serve.sh. Sends streamed chat requests (the
 * body of BODY_FILE, which has "stream":true) to 127.0.0.1:PORT PATH over plain sockets, decodes the
 * replies (chunked or not) and counts their events, in one of three modes:
 *
 *   ttft SECONDS     one request after another for SECONDS, each on a fresh connection: the time from
 *                    sending the request (connected already) to the first byte of its first event.
 *                    Prints "ttft n N failed F p50_us X p90_us Y p99_us Z".
 *   hold N           N requests at once, each read to its end: how many streams complete (status 200,
 *                    EVENTS content events, [DONE], the body's end), how many were open at once, and
 *                    with -r PID that process's resident memory (VmRSS) sampled every 20 ms while it
 *                    runs. Prints "hold n N complete C failed F max_open M seconds S rss_open_kb K
 *                    rss_peak_kb P" (rss_open_kb: the largest sample taken while all N were open).
 *   cancel LOG       TRIALS times: sends a request, waits until the upstream has it (a new "arrived"
 *                    line in the canned upstream's --events-log LOG) or, with -s, until its first
 *                    event came back, closes the connection, and waits for the upstream to log the
 *                    request's connection "closed". Prints "cancel trials T cancelled C median_ms X
 *                    max_ms Y" or, when the upstream saw no close within -w seconds (default 5),
 *                    "cancel trials T cancelled C not_within_s W" (and stops trying).
 *
 * Usage: stream_client [-H HEADER]... [-e EVENTS] [-r PID] [-t TRIALS] [-s] [-w SECONDS]
 *                      MODE PORT PATH BODY_FILE ARG
 * Loopback only. Exits 0 when the figures are printed, 1 when a request failed (ttft, hold), 2 on
 * bad usage or a setup error.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>

#include "bench.h"

#define MAX_HEADERS 16

/* A growable byte buffer. */
struct text {
    char *data;
    size_t len;
    size_t cap;
};

static void text_add(struct text *t, const char *data, size_t n)
{
    if (t->len + n + 1 > t->cap) {
        size_t cap = t->cap ? t->cap * 2 : 4096;
        while (cap < t->len + n + 1)
            cap *= 2;
        t->data = realloc(t->data, cap);
        if (t->data == NULL) {
            fprintf(stderr, "stream_client: out of memory\n");
            exit(2);
        }
        t->cap = cap;
    }
    memcpy(t->data + t->len, data, n);
    t->len += n;
    t->data[t->len] = '\0';
}

/* How far a reply has come. */
enum phase { SENDING, HEADERS, BODY, DONE, FAILED };

/* One request on its own connection, and its reply as far as it has come. */
struct stream {
    int fd;
    enum phase phase;
    size_t sent;
    struct text raw;  /* bytes received and not yet decoded */
    struct text body; /* the decoded body */
    int status;
    int chunked;
    long left;     /* bytes left of the current chunk, or of a Content-Length body; -1: until EOF */
    int need_crlf; /* a chunk's data is over: its CRLF comes next */
    double t0;     /* when the request was sent */
    double t_first;
    const char *why; /* why it failed */
};

static struct text request;
static int want_events = 5;

/* Connects to 127.0.0.1:PORT, non-blocking when asked; returns the socket or -1. */
static int open_conn(int port, int nonblocking)
{
    struct sockaddr_in sa;
    int fd = socket(AF_INET, SOCK_STREAM, 0), one = 1;

    if (fd < 0)
        return -1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    memset(&sa, 0, sizeof(sa));
    sa.sin_family = AF_INET;
    sa.sin_port = htons((unsigned short)port);
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (nonblocking)
        fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) != 0 && errno != EINPROGRESS) {
        close(fd);
        return -1;
    }
    return fd;
}

static void fail(struct stream *s, const char *why)
{
    s->phase = FAILED;
    s->why = why;
}

/* Counts the occurrences of NEEDLE in the decoded body. */
static int count_in_body(const struct stream *s, const char *needle)
{
    int n = 0;
    const char *p = s->body.data;

    while (p && (p = strstr(p, needle)) != NULL) {
        n++;
        p += strlen(needle);
    }
    return n;
}

/* The body is over: a complete stream has status 200, the content events asked for and [DONE]. */
static void body_done(struct stream *s)
{
    if (s->status != 200)
        fail(s, "status other than 200");
    else if (count_in_body(s, "\"delta\":") != want_events)
        fail(s, "not every event came");
    else if (strstr(s->body.data ? s->body.data : "", "data: [DONE]") == NULL)
        fail(s, "no [DONE]");
    else
        s->phase = DONE;
}

/* Reads the status line and headers once they are all in; 0 while more must come. */
static int parse_headers(struct stream *s)
{
    char *end = s->raw.data ? strstr(s->raw.data, "\r\n\r\n") : NULL;
    char *line;
    size_t consumed;

    if (end == NULL)
        return 0;
    *end = '\0';
    if (sscanf(s->raw.data, "HTTP/1.%*d %d", &s->status) != 1) {
        fail(s, "no status line");
        return 1;
    }
    s->left = -1;
    for (line = strstr(s->raw.data, "\r\n"); line; line = strstr(line + 2, "\r\n")) {
        const char *h = line + 2;
        if (strncasecmp(h, "transfer-encoding:", 18) == 0 && strstr(h, "chunked"))
            s->chunked = 1;
        else if (strncasecmp(h, "content-length:", 15) == 0)
            s->left = atol(h + 15);
    }
    if (s->chunked)
        s->left = 0;
    else if (s->left == 0)
        body_done(s);
    consumed = (size_t)(end + 4 - s->raw.data);
    memmove(s->raw.data, s->raw.data + consumed, s->raw.len - consumed);
    s->raw.len -= consumed;
    s->raw.data[s->raw.len] = '\0';
    if (s->phase == HEADERS)
        s->phase = BODY;
    return 1;
}

/* Decodes what has come of the body (chunked: size lines, data, CRLFs; else Content-Length bytes). */
static void parse_body(struct stream *s)
{
    size_t pos = 0;

    while (s->phase == BODY && pos < s->raw.len) {
        size_t avail = s->raw.len - pos;
        if (!s->chunked || s->left > 0) {
            size_t n = s->left >= 0 && (size_t)s->left < avail ? (size_t)s->left : avail;
            text_add(&s->body, s->raw.data + pos, n);
            pos += n;
            if (s->left > 0) {
                s->left -= (long)n;
                if (s->left == 0 && !s->chunked)
                    body_done(s);
                else if (s->left == 0)
                    s->need_crlf = 1;
            }
        } else if (s->need_crlf) {
            if (avail < 2)
                break;
            pos += 2;
            s->need_crlf = 0;
        } else {
            char *eol = memchr(s->raw.data + pos, '\n', avail);
            if (eol == NULL)
                break;
            s->left = strtol(s->raw.data + pos, NULL, 16);
            pos = (size_t)(eol + 1 - s->raw.data);
            if (s->left == 0)
                body_done(s); /* the last chunk: trailers, if any, are not waited for */
        }
    }
    memmove(s->raw.data, s->raw.data + pos, s->raw.len - pos);
    s->raw.len -= pos;
    if (s->t_first == 0 && s->body.data && strstr(s->body.data, "data:"))
        s->t_first = bench_now();
}

/* Sends what is left of the request, then reads what the socket has. */
static void on_ready(struct stream *s, short revents)
{
    char buf[16384];
    ssize_t n;

    if (s->phase == SENDING && (revents & (POLLOUT | POLLERR | POLLHUP))) {
        n = send(s->fd, request.data + s->sent, request.len - s->sent, MSG_NOSIGNAL);
        if (n < 0 && errno != EAGAIN && errno != EINPROGRESS) {
            fail(s, "cannot send the request");
            return;
        }
        if (n > 0)
            s->sent += (size_t)n;
        if (s->sent == request.len)
            s->phase = HEADERS;
        return;
    }
    if (!(revents & (POLLIN | POLLERR | POLLHUP)))
        return;
    while ((n = recv(s->fd, buf, sizeof(buf), MSG_DONTWAIT)) > 0) {
        text_add(&s->raw, buf, (size_t)n);
        if (s->phase == HEADERS && !parse_headers(s))
            continue;
        if (s->phase == BODY)
            parse_body(s);
        if (s->phase != BODY && s->phase != HEADERS)
            return;
    }
    if (n == 0 && s->phase == BODY && s->left == -1)
        body_done(s); /* a body that ends with the connection */
    else if (n == 0 || (n < 0 && errno != EAGAIN))
        fail(s, "the connection closed before the reply's end");
}

static void stream_reset(struct stream *s)
{
    free(s->raw.data);
    free(s->body.data);
    memset(s, 0, sizeof(*s));
    s->fd = -1;
}

static void stream_close(struct stream *s)
{
    if (s->fd >= 0)
        close(s->fd);
    s->fd = -1;
}

/* VmRSS of PID in KiB, or 0. */
static long rss_kb(int pid)
{
    char path[64], line[256];
    long kb = 0;
    FILE *f;

    snprintf(path, sizeof(path), "/proc/%d/status", pid);
    f = fopen(path, "r");
    if (f == NULL)
        return 0;
    while (fgets(line, sizeof(line), f))
        if (sscanf(line, "VmRSS: %ld", &kb) == 1)
            break;
    fclose(f);
    return kb;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;

    return x < y ? -1 : x > y;
}

/* The P-th percentile (nearest rank) of N sorted values. */
static double percentile(const double *v, size_t n, double p)
{
    size_t rank = (size_t)(p / 100.0 * (double)n + 0.999999);

    if (n == 0)
        return 0;
    return v[rank == 0 ? 0 : rank > n ? n - 1 : rank - 1];
}

/* Drives one stream to its end (or TIMEOUT seconds): the blocking form of the loop in hold. */
static void run_one(struct stream *s, double timeout)
{
    double end = bench_now() + timeout;

    while (s->phase != DONE && s->phase != FAILED) {
        struct pollfd pfd = { s->fd, (short)(s->phase == SENDING ? POLLOUT : POLLIN), 0 };
        double left = end - bench_now();
        if (left <= 0) {
            fail(s, "timed out");
            return;
        }
        if (poll(&pfd, 1, (int)(left * 1000) + 1) > 0)
            on_ready(s, pfd.revents);
    }
}

static int mode_ttft(int port, double seconds)
{
    size_t n = 0, cap = 1024, failed = 0;
    double *ttft = malloc(cap * sizeof(*ttft));
    double end = bench_now() + seconds;
    struct stream s;

    memset(&s, 0, sizeof(s));
    while (ttft && bench_now() < end) {
        stream_reset(&s);
        s.fd = open_conn(port, 0);
        if (s.fd < 0) {
            fprintf(stderr, "stream_client: cannot connect to port %d\n", port);
            return 2;
        }
        fcntl(s.fd, F_SETFL, fcntl(s.fd, F_GETFL) | O_NONBLOCK);
        s.t0 = bench_now();
        run_one(&s, 10.0);
        stream_close(&s);
        if (s.phase != DONE) {
            if (failed++ == 0)
                fprintf(stderr, "stream_client: a stream failed: %s\n", s.why);
            continue;
        }
        if (n == cap && (ttft = realloc(ttft, (cap *= 2) * sizeof(*ttft))) == NULL)
            break;
        ttft[n++] = (s.t_first - s.t0) * 1e6;
    }
    stream_reset(&s);
    if (ttft == NULL)
        return 2;
    qsort(ttft, n, sizeof(*ttft), cmp_double);
    printf("ttft n %zu failed %zu p50_us %.1f p90_us %.1f p99_us %.1f\n", n, failed, percentile(ttft, n, 50),
           percentile(ttft, n, 90), percentile(ttft, n, 99));
    free(ttft);
    return failed ? 1 : 0;
}

static int mode_hold(int port, long n, int pid)
{
    struct stream *s = calloc((size_t)n, sizeof(*s));
    struct pollfd *pfd = calloc((size_t)n, sizeof(*pfd));
    long i, complete = 0, failed = 0, open_now, max_open = 0;
    long rss_open = 0, rss_peak = 0;
    double t0 = bench_now(), next_sample = t0, end = t0 + 120;
    const char *why = NULL;

    if (s == NULL || pfd == NULL)
        return 2;
    for (i = 0; i < n; i++) {
        s[i].fd = open_conn(port, 1);
        if (s[i].fd < 0)
            fail(&s[i], "cannot connect");
        s[i].t0 = t0;
    }
    for (;;) {
        long active = 0;
        open_now = 0;
        for (i = 0; i < n; i++) {
            if (s[i].phase == DONE || s[i].phase == FAILED) {
                stream_close(&s[i]);
                pfd[i].fd = -1;
                continue;
            }
            active++;
            open_now += s[i].t_first > 0;
            pfd[i].fd = s[i].fd;
            pfd[i].events = (short)(s[i].phase == SENDING ? POLLOUT : POLLIN);
            pfd[i].revents = 0;
        }
        if (open_now > max_open)
            max_open = open_now;
        if (pid > 0 && bench_now() >= next_sample) {
            long kb = rss_kb(pid);
            if (kb > rss_peak)
                rss_peak = kb;
            if (open_now == n && kb > rss_open)
                rss_open = kb;
            next_sample = bench_now() + 0.02;
        }
        if (active == 0 || bench_now() > end)
            break;
        if (poll(pfd, (nfds_t)n, 20) < 0 && errno != EINTR)
            break;
        for (i = 0; i < n; i++)
            if (pfd[i].fd >= 0 && pfd[i].revents)
                on_ready(&s[i], pfd[i].revents);
    }
    for (i = 0; i < n; i++) {
        if (s[i].phase == DONE)
            complete++;
        else {
            failed++;
            if (why == NULL)
                why = s[i].phase == FAILED ? s[i].why : "timed out";
        }
        stream_close(&s[i]);
        stream_reset(&s[i]);
    }
    if (why)
        fprintf(stderr, "stream_client: %ld of %ld streams failed; the first: %s\n", failed, n, why);
    printf("hold n %ld complete %ld failed %ld max_open %ld seconds %.3f rss_open_kb %ld rss_peak_kb %ld\n",
           n, complete, failed, max_open, bench_now() - t0, rss_open, rss_peak);
    free(s);
    free(pfd);
    return failed ? 1 : 0;
}

/* The size of PATH, or 0. */
static long file_size(const char *path)
{
    FILE *f = fopen(path, "r");
    long size;

    if (f == NULL)
        return 0;
    fseek(f, 0, SEEK_END);
    size = ftell(f);
    fclose(f);
    return size < 0 ? 0 : size;
}

/* Looks in LOG past byte FROM for a line "WHAT T"; returns T, or 0 when there is none yet. */
static double find_event(const char *log, long from, const char *what)
{
    FILE *f = fopen(log, "r");
    char line[128], name[32];
    double t = 0, when;

    if (f == NULL)
        return 0;
    fseek(f, from, SEEK_SET);
    while (fgets(line, sizeof(line), f))
        if (sscanf(line, "%31s %lf", name, &when) == 2 && strcmp(name, what) == 0) {
            t = when;
            break;
        }
    fclose(f);
    return t;
}

static int mode_cancel(int port, const char *log, int trials, int streamed, double wait_s)
{
    double ms[64];
    int t, cancelled = 0;

    if (trials > 64)
        trials = 64;
    for (t = 0; t < trials; t++) {
        struct stream s;
        long from = file_size(log);
        double deadline, closed = 0, t_close;

        memset(&s, 0, sizeof(s));
        s.fd = open_conn(port, 0);
        if (s.fd < 0 || send(s.fd, request.data, request.len, MSG_NOSIGNAL) != (ssize_t)request.len) {
            fprintf(stderr, "stream_client: cannot send the request to port %d\n", port);
            return 2;
        }
        s.phase = HEADERS;
        fcntl(s.fd, F_SETFL, fcntl(s.fd, F_GETFL) | O_NONBLOCK);
        deadline = bench_now() + 10;
        if (streamed) {
            while (s.t_first == 0 && s.phase != FAILED && s.phase != DONE && bench_now() < deadline) {
                struct pollfd pfd = { s.fd, POLLIN, 0 };
                if (poll(&pfd, 1, 10) > 0)
                    on_ready(&s, pfd.revents);
            }
        } else {
            while (find_event(log, from, "arrived") == 0 && bench_now() < deadline)
                usleep(500);
        }
        if (bench_now() >= deadline || (streamed && s.t_first == 0)) {
            fprintf(stderr,
                    "stream_client: the request did not reach the upstream (or no event came back)\n");
            stream_close(&s);
            stream_reset(&s);
            return 2;
        }
        t_close = bench_now();
        stream_close(&s);
        stream_reset(&s);
        deadline = t_close + wait_s;
        while ((closed = find_event(log, from, "closed")) == 0 && bench_now() < deadline)
            usleep(200);
        if (closed == 0) {
            printf("cancel trials %d cancelled %d not_within_s %g\n", t + 1, cancelled, wait_s);
            return 0;
        }
        ms[cancelled++] = (closed - t_close) * 1e3;
        usleep(20000); /* let the proxy settle before the next trial */
    }
    qsort(ms, (size_t)cancelled, sizeof(*ms), cmp_double);
    printf("cancel trials %d cancelled %d median_ms %.3f max_ms %.3f\n", trials, cancelled,
           percentile(ms, (size_t)cancelled, 50), ms[cancelled - 1]);
    return 0;
}

static int usage(void)
{
    fprintf(stderr, "usage: stream_client [-H HEADER]... [-e EVENTS] [-r PID] [-t TRIALS] [-s] [-w SECONDS] "
                    "ttft|hold|cancel PORT PATH BODY_FILE SECONDS|N|EVENTS_LOG\n");
    return 2;
}

int main(int argc, char **argv)
{
    const char *headers[MAX_HEADERS];
    int nheaders = 0, pid = 0, trials = 5, streamed = 0, port, i, opt;
    double wait_s = 5;
    struct rlimit rl;
    char line[512];
    FILE *f;
    struct text body = { NULL, 0, 0 };

    while ((opt = getopt(argc, argv, "H:e:r:t:sw:")) != -1) {
        switch (opt) {
        case 'H':
            if (nheaders == MAX_HEADERS)
                return usage();
            headers[nheaders++] = optarg;
            break;
        case 'e':
            want_events = atoi(optarg);
            break;
        case 'r':
            pid = atoi(optarg);
            break;
        case 't':
            trials = atoi(optarg);
            break;
        case 's':
            streamed = 1;
            break;
        case 'w':
            wait_s = atof(optarg);
            break;
        default:
            return usage();
        }
    }
    if (argc - optind != 5 || trials < 1)
        return usage();
    port = atoi(argv[optind + 1]);
    f = fopen(argv[optind + 3], "rb");
    if (f == NULL) {
        fprintf(stderr, "stream_client: cannot read %s\n", argv[optind + 3]);
        return 2;
    }
    while (fgets(line, sizeof(line), f))
        text_add(&body, line, strlen(line));
    fclose(f);
    snprintf(line, sizeof(line),
             "POST %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\n"
             "Accept: text/event-stream\r\n",
             argv[optind + 2], port);
    text_add(&request, line, strlen(line));
    for (i = 0; i < nheaders; i++) {
        text_add(&request, headers[i], strlen(headers[i]));
        text_add(&request, "\r\n", 2);
    }
    snprintf(line, sizeof(line), "Content-Length: %zu\r\n\r\n", body.len);
    text_add(&request, line, strlen(line));
    text_add(&request, body.data, body.len);
    free(body.data);
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    if (strcmp(argv[optind], "ttft") == 0)
        return mode_ttft(port, atof(argv[optind + 4]));
    if (strcmp(argv[optind], "hold") == 0)
        return mode_hold(port, atol(argv[optind + 4]), pid);
    if (strcmp(argv[optind], "cancel") == 0)
        return mode_cancel(port, argv[optind + 4], trials, streamed, wait_s);
    return usage();
}
