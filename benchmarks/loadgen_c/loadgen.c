/* A small HTTP/1.1 keep-alive load generator for benchmarks/overhead.py.
 *
 * Why not Python: a Python sender costs about 0.3 ms of CPU per request, so on 2 cores it
 * saturates at a few thousand requests/s and distorts what it measures. This one is a single
 * thread on epoll with non-blocking sockets and costs a few microseconds per request.
 *
 * Modes:
 *   closed loop (--rate 0): each of N connections sends its next request as soon as the
 *     previous answer is complete; the achieved rate is the maximum rate of the target.
 *     Latency is measured from the send.
 *   open loop (--rate R): request i is scheduled at start + i/R, whatever happened before.
 *     It goes out on a free connection at its scheduled time or, when none is free, as soon as
 *     one is; its latency is measured from the SCHEDULED time, so a stall of the target counts
 *     for every request it delayed (coordinated omission corrected, as wrk2 does).
 *
 * Every connection has at most one request outstanding (no pipelining). A response must carry
 * Content-Length (Envoy's answers do); anything else is counted as an error and the
 * connection is reopened. Latencies go into a log-linear histogram (64 linear steps per power
 * of two of microseconds: under 1.6% error), and the result is printed as one JSON object.
 *
 * Usage: loadgen --host 127.0.0.1 --port P --path /v2/models/m/infer --header 'k: v' ...
 *                --body-file F | --body-size N, --connections 32 --duration 10 --rate R
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#define SUB_BITS 6
#define SUB (1 << SUB_BITS)
#define EXPS 40
#define RBUF 65536
#define MAX_STATUS 600

typedef struct {
    int fd;
    int busy;            /* a request is outstanding */
    size_t wrote;        /* bytes of the request written so far */
    double t0;           /* latency origin: send time (closed) or scheduled time (open) */
    char buf[RBUF];
    size_t len;
} conn_t;

static uint64_t hist[EXPS * SUB];
static uint64_t status_count[MAX_STATUS];
static uint64_t completed, errors, connect_errors, max_us;
static double sum_us;
static struct sockaddr_in target;
static char *request;
static size_t request_len;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static int bucket_of(uint64_t us) {
    if (us < SUB) return (int)us;
    int e = 63 - __builtin_clzll(us);          /* us >= 2^e, e >= SUB_BITS */
    int shift = e - SUB_BITS;
    int idx = (shift + 1) * SUB + (int)((us >> shift) - SUB);
    return idx < EXPS * SUB ? idx : EXPS * SUB - 1;
}

static double value_of(int idx) {                 /* the middle of the bucket, in us */
    if (idx < SUB) return idx;
    int shift = idx / SUB - 1;
    double low = (double)((uint64_t)(idx % SUB + SUB) << shift);
    return low + (double)(1ULL << shift) / 2.0;
}

static void record(double latency_s, int status) {
    uint64_t us = latency_s > 0 ? (uint64_t)(latency_s * 1e6) : 0;
    hist[bucket_of(us)]++;
    sum_us += (double)us;
    if (us > max_us) max_us = us;
    completed++;
    if (status > 0 && status < MAX_STATUS) status_count[status]++;
}

static double percentile(double p) {
    uint64_t want = (uint64_t)(p / 100.0 * (double)completed + 0.5);
    if (want < 1) want = 1;
    uint64_t seen = 0;
    for (int i = 0; i < EXPS * SUB; i++) {
        seen += hist[i];
        if (seen >= want) return value_of(i) / 1000.0;
    }
    return (double)max_us / 1000.0;
}

static int open_conn(int ep, conn_t *c) {
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (c->fd < 0) return -1;
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(c->fd, (struct sockaddr *)&target, sizeof target) < 0 && errno != EINPROGRESS) {
        close(c->fd);
        c->fd = -1;
        return -1;
    }
    c->busy = 0;
    c->len = 0;
    c->wrote = 0;
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLET, .data.ptr = c};
    return epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev);
}

static void reopen(int ep, conn_t *c) {
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    if (open_conn(ep, c) < 0) connect_errors++;
}

static void flush_request(int ep, conn_t *c) {
    while (c->busy && c->wrote < request_len) {
        ssize_t n = write(c->fd, request + c->wrote, request_len - c->wrote);
        if (n > 0) {
            c->wrote += (size_t)n;
        } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            return;                               /* EPOLLOUT (edge) resumes it */
        } else {
            errors++;
            reopen(ep, c);
            return;
        }
    }
}

static void start_request(int ep, conn_t *c, double t0) {
    c->busy = 1;
    c->wrote = 0;
    c->t0 = t0;
    flush_request(ep, c);
}

/* 1: a whole response was consumed; 0: need more bytes; -1: unusable response. */
static int parse_response(conn_t *c, int *status) {
    char *end = memmem(c->buf, c->len, "\r\n\r\n", 4);
    if (end == NULL) return c->len >= RBUF ? -1 : 0;
    size_t head = (size_t)(end - c->buf) + 4;
    if (c->len < 12 || memcmp(c->buf, "HTTP/1.", 7) != 0) return -1;
    *status = atoi(c->buf + 9);
    long body = -1;
    for (char *line = strstr(c->buf, "\r\n"); line && line < end; line = strstr(line + 2, "\r\n")) {
        if (strncasecmp(line + 2, "content-length:", 15) == 0) body = atol(line + 17);
    }
    if (body < 0) return -1;
    size_t total = head + (size_t)body;
    if (total > RBUF) return -1;
    if (c->len < total) return 0;
    memmove(c->buf, c->buf + total, c->len - total);
    c->len -= total;
    return 1;
}

/* Read what there is; returns the number of responses completed on this connection. */
static int drain(int ep, conn_t *c) {
    int done = 0;
    for (;;) {
        ssize_t n = read(c->fd, c->buf + c->len, RBUF - c->len);
        if (n > 0) {
            c->len += (size_t)n;
            int status = 0, r = 0;
            while (c->busy && (r = parse_response(c, &status)) == 1) {
                record(now_s() - c->t0, status);
                c->busy = 0;
                done++;
            }
            if (c->busy && r < 0) break;
            continue;
        }
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return done;
        break;                                    /* EOF or error */
    }
    if (c->busy) errors++;
    reopen(ep, c);
    return done;
}

static char *read_file(const char *path, size_t *size) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    struct stat st;
    fstat(fileno(f), &st);
    char *data = malloc((size_t)st.st_size + 1);
    *size = fread(data, 1, (size_t)st.st_size, f);
    fclose(f);
    return data;
}

static void build_request(const char *path, const char *headers, const char *body, size_t blen) {
    size_t cap = strlen(path) + strlen(headers) + blen + 256;
    request = malloc(cap);
    int n = snprintf(request, cap,
                     "POST %s HTTP/1.1\r\nhost: bench\r\n%scontent-length: %zu\r\n\r\n",
                     path, headers, blen);
    memcpy(request + n, body, blen);
    request_len = (size_t)n + blen;
}

static void print_json(double elapsed, double rate, int conns, uint64_t late) {
    printf("{\"completed\": %llu, \"errors\": %llu, \"connect_errors\": %llu, ",
           (unsigned long long)completed, (unsigned long long)errors,
           (unsigned long long)connect_errors);
    printf("\"elapsed_s\": %.4f, \"rate_target\": %.1f, \"connections\": %d, ", elapsed, rate,
           conns);
    printf("\"achieved_rps\": %.1f, \"sent_late\": %llu, ", completed / elapsed,
           (unsigned long long)late);
    printf("\"latency_ms\": {\"p50\": %.4f, \"p90\": %.4f, \"p99\": %.4f, \"p999\": %.4f, "
           "\"max\": %.4f, \"mean\": %.4f}, \"status\": {",
           percentile(50), percentile(90), percentile(99), percentile(99.9),
           (double)max_us / 1000.0, completed ? sum_us / completed / 1000.0 : 0.0);
    int first = 1;
    for (int s = 0; s < MAX_STATUS; s++) {
        if (!status_count[s]) continue;
        printf("%s\"%d\": %llu", first ? "" : ", ", s, (unsigned long long)status_count[s]);
        first = 0;
    }
    printf("}}\n");
}

static void arm(int tfd, double at) {              /* absolute CLOCK_MONOTONIC time */
    struct itimerspec its = {0};
    its.it_value.tv_sec = (time_t)at;
    its.it_value.tv_nsec = (long)((at - (double)(time_t)at) * 1e9);
    if (its.it_value.tv_sec == 0 && its.it_value.tv_nsec == 0) its.it_value.tv_nsec = 1;
    timerfd_settime(tfd, TFD_TIMER_ABSTIME, &its, NULL);
}

static void disarm(int tfd) {
    struct itimerspec its = {0};
    timerfd_settime(tfd, 0, &its, NULL);
}

int main(int argc, char **argv) {
    const char *host = "127.0.0.1", *path = "/", *body_file = NULL;
    int port = 0, nconn = 32;
    double duration = 5, rate = 0;
    long body_size = -1;
    char headers[8192] = "";
    for (int i = 1; i + 1 < argc; i += 2) {
        const char *k = argv[i], *v = argv[i + 1];
        if (!strcmp(k, "--host")) host = v;
        else if (!strcmp(k, "--port")) port = atoi(v);
        else if (!strcmp(k, "--path")) path = v;
        else if (!strcmp(k, "--connections")) nconn = atoi(v);
        else if (!strcmp(k, "--duration")) duration = atof(v);
        else if (!strcmp(k, "--rate")) rate = atof(v);
        else if (!strcmp(k, "--body-file")) body_file = v;
        else if (!strcmp(k, "--body-size")) body_size = atol(v);
        else if (!strcmp(k, "--header")) {
            strncat(headers, v, sizeof headers - strlen(headers) - 3);
            strcat(headers, "\r\n");
        } else {
            fprintf(stderr, "loadgen: unknown option %s\n", k);
            return 2;
        }
    }
    if (port <= 0 || nconn <= 0 || duration <= 0) {
        fprintf(stderr, "loadgen: --port, --connections and --duration must be positive\n");
        return 2;
    }
    size_t blen = 0;
    char *body = NULL;
    if (body_file) {
        body = read_file(body_file, &blen);
        if (!body) { perror(body_file); return 2; }
    } else {
        blen = body_size > 0 ? (size_t)body_size : 2;
        body = malloc(blen + 1);
        memset(body, 'x', blen);
        if (body_size < 0) memcpy(body, "{}", 2);
    }
    build_request(path, headers, body, blen);
    target.sin_family = AF_INET;
    target.sin_port = htons((uint16_t)port);
    if (inet_pton(AF_INET, host, &target.sin_addr) != 1) {
        fprintf(stderr, "loadgen: --host must be an IPv4 address\n");
        return 2;
    }
    int ep = epoll_create1(0);
    int tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK);
    struct epoll_event tev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(ep, EPOLL_CTL_ADD, tfd, &tev);
    conn_t *conns = calloc((size_t)nconn, sizeof(conn_t));
    for (int i = 0; i < nconn; i++) {
        if (open_conn(ep, &conns[i]) < 0) { perror("connect"); return 1; }
    }
    double start = now_s(), stop = start + duration, grace = stop + 2.0;
    double interval = rate > 0 ? 1.0 / rate : 0, next = start;
    uint64_t scheduled = 0, late = 0;
    int outstanding = 0;
    struct epoll_event events[256];
    if (rate > 0) arm(tfd, next);
    for (;;) {
        double t = now_s();
        if (t >= grace || (t >= stop && outstanding == 0)) break;
        /* Send whatever is due on free connections: every free one in closed loop. */
        for (int i = 0; i < nconn && t < stop; i++) {
            conn_t *c = &conns[i];
            if (c->busy || c->fd < 0) continue;
            if (rate > 0) {
                if (next > t) break;
                if (t - next > 0.001) late++;
                start_request(ep, c, next);
                scheduled++;
                next = start + (double)scheduled * interval;
            } else {
                start_request(ep, c, t);
            }
        }
        outstanding = 0;
        for (int i = 0; i < nconn; i++) outstanding += conns[i].busy;
        /* A request due with no connection free waits for a completion, not the timer: a
         * timer armed in the past fires at once, and the loop would spin a whole core away
         * from the target it measures exactly when the target is behind. */
        if (rate > 0 && t < stop) {
            if (next > t) arm(tfd, next < stop ? next : stop);
            else disarm(tfd);
        }
        int timeout_ms = t < stop ? (rate > 0 ? 100 : 10) : 10;
        int n = epoll_wait(ep, events, 256, timeout_ms);
        for (int k = 0; k < n; k++) {
            conn_t *c = events[k].data.ptr;
            if (c == NULL) {
                uint64_t ticks;
                if (read(tfd, &ticks, sizeof ticks) < 0) { /* spurious wake: nothing to do */ }
                continue;
            }
            if (events[k].events & EPOLLOUT) flush_request(ep, c);
            if (events[k].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) drain(ep, c);
        }
    }
    double elapsed = now_s() - start;
    if (elapsed > duration && outstanding == 0) elapsed = duration;
    print_json(rate > 0 ? duration : elapsed, rate, nconn, late);
    return 0;
}
