/* streamgen: N concurrent streaming POST requests over epoll, every SSE frame timed.
 *
 * Built and run by tests/bench/streamgen.py (gcc -O2, cached); see there for the options.
 * One thread, non-blocking sockets, level-triggered epoll, no allocation per frame: the
 * generator must never be the reason a frame arrives late.
 *
 * A frame is one SSE event (ended by a blank line). A frame is STALLED when it arrives more
 * than --stall-ms after the frame before it, beyond the pacing: the expected gap is --pace-ms
 * for a content_block_delta that follows another delta, 0 for every other frame. The first
 * frame of a stream has no predecessor (its wait is the time to first byte, reported apart).
 * Frames completed by the same read() share that read's timestamp.
 *
 * Output: one JSON object on stdout.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_HEADER 16384
#define LINE_KEEP 64
#define STALL_POSITIONS 8
#define MAX_KINDS 16

enum { S_CONNECTING, S_HEADERS, S_BODY, S_DONE };
enum { B_SIZE, B_SIZE_EXT, B_DATA, B_DATA_CR, B_DATA_LF, B_IDENTITY, B_END };

struct conn {
    int fd;
    int state;
    int round;
    size_t sent;
    double t_start, t_first_byte, t_prev_frame, t_prev_delta;
    int frames, deltas, stopped, status, stalls;
    /* headers */
    char hbuf[MAX_HEADER];
    int hlen;
    /* body framing */
    int bstate;
    long long remaining; /* chunk bytes left, or content-length left */
    long long chunk_size;
    /* SSE line scan */
    char line[LINE_KEEP];
    int line_len;   /* bytes of the current line seen (may exceed LINE_KEEP) */
    int event_kind; /* of the event being read: 0 other, 1 delta, 2 stop, 3 error */
    int has_field;
    int leaving;    /* --disconnect-after reached: close after this read */
    double wake_at; /* > 0: waiting --error-pause-ms before the next request */
};

/* options */
static const char *host = "127.0.0.1";
static int port = 0;
static const char *path = "/v1/messages";
static int concurrency = 1;
static int rounds = 1;
static double pace_ms = 20.0, stall_ms = 50.0, timeout_s = 120.0;
static int expect_deltas = 0;
static double duration_s = 0.0, error_pause_s = 0.0;
static int disconnect_after = 0;
static double t_end;
static char *request_buf;
static size_t request_len;

/* results */
static long delivered, disconnected, sleeping;
static long ok_count, err_count, total_frames, stalled_frames, stalled_streams;
static long stalls_by_pos[STALL_POSITIONS + 1]; /* delta index 1..8, then later (and others) */
static double max_excess_ms;
static double *ttfb, *ttft, *gaps;
static long n_ttfb, n_ttft, n_gaps, cap_streams, cap_gaps;
static char kinds[MAX_KINDS][48];
static long kind_counts[MAX_KINDS];
static int n_kinds;
static double max_loop_ms;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void error_kind(const char *kind) {
    err_count++;
    for (int i = 0; i < n_kinds; i++)
        if (strcmp(kinds[i], kind) == 0) {
            kind_counts[i]++;
            return;
        }
    if (n_kinds < MAX_KINDS) {
        snprintf(kinds[n_kinds], sizeof kinds[0], "%s", kind);
        kind_counts[n_kinds++] = 1;
    }
}

static int epfd;
static int active;

static int open_conn(struct conn *c) {
    int round = c->round;
    memset(c, 0, offsetof(struct conn, hbuf));
    c->round = round;
    c->wake_at = 0;
    c->hlen = 0;
    c->line_len = 0;
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (c->fd < 0) {
        perror("socket");
        return -1;
    }
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(port)};
    inet_pton(AF_INET, host, &sa.sin_addr);
    c->t_start = now_s();
    c->state = S_CONNECTING;
    if (connect(c->fd, (struct sockaddr *)&sa, sizeof sa) < 0 && errno != EINPROGRESS) {
        close(c->fd);
        c->fd = -1;
        error_kind("connect");
        return -1;
    }
    struct epoll_event ev = {.events = EPOLLOUT | EPOLLIN, .data.ptr = c};
    epoll_ctl(epfd, EPOLL_CTL_ADD, c->fd, &ev);
    active++;
    return 0;
}

static void finish(struct conn *c, const char *error) {
    if (c->fd >= 0) {
        epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
        close(c->fd);
        c->fd = -1;
        active--;
    }
    if (c->leaving) {
        disconnected++;
        c->state = S_DONE;
        c->leaving = 0;
        goto next;
    }
    if (error == NULL && c->status != 200) {
        static char buf[32];
        snprintf(buf, sizeof buf, "http %d", c->status);
        error = buf;
    }
    if (error == NULL && !c->stopped) error = "stream without message_stop";
    if (error == NULL && expect_deltas && c->deltas != expect_deltas) error = "wrong delta count";
    if (error) error_kind(error);
    else ok_count++;
    if (c->stalls) stalled_streams++;
    c->state = S_DONE;
next:
    if (duration_s > 0) {
        double t = now_s();
        if (t >= t_end || rounds == 0) return;
        if (error && error_pause_s > 0) {
            c->wake_at = t + error_pause_s;
            sleeping++;
        } else open_conn(c);
    } else if (++c->round < rounds) open_conn(c);
}

static void on_frame(struct conn *c, double t) {
    total_frames++;
    c->frames++;
    if (c->frames > 1) {
        double expected = (c->event_kind == 1 && c->deltas > 0) ? pace_ms : 0.0;
        double excess = (t - c->t_prev_frame) * 1000.0 - expected;
        if (excess > max_excess_ms) max_excess_ms = excess;
        if (excess > stall_ms) {
            stalled_frames++;
            c->stalls++;
            int pos = c->event_kind == 1 ? c->deltas + 1 : STALL_POSITIONS + 1;
            stalls_by_pos[pos > STALL_POSITIONS ? STALL_POSITIONS : pos - 1]++;
        }
    }
    c->t_prev_frame = t;
    if (c->event_kind == 1) {
        if (c->deltas == 0) {
            if (n_ttft < cap_streams) ttft[n_ttft++] = t - c->t_start;
        } else if (n_gaps < cap_gaps) {
            gaps[n_gaps++] = t - c->t_prev_delta;
        }
        c->deltas++;
        c->t_prev_delta = t;
        if (disconnect_after && c->deltas == disconnect_after) c->leaving = 1;
    } else if (c->event_kind == 2) {
        c->stopped = 1;
    }
}

/* Feed decoded body bytes to the SSE line scanner. */
static void sse(struct conn *c, const char *p, size_t n, double t) {
    for (size_t i = 0; i < n; i++) {
        char ch = p[i];
        if (ch != '\n') {
            if (c->line_len < LINE_KEEP) c->line[c->line_len] = ch;
            c->line_len++;
            continue;
        }
        int len = c->line_len;
        if (len > 0 && len <= LINE_KEEP && c->line[len - 1] == '\r') len--;
        c->line_len = 0;
        if (len == 0) {
            if (c->has_field) on_frame(c, t);
            c->has_field = 0;
            c->event_kind = 0;
            continue;
        }
        if (c->line[0] == ':') continue;
        c->has_field = 1;
        if (len >= 6 && memcmp(c->line, "event:", 6) == 0) {
            int k = len > LINE_KEEP ? LINE_KEEP : len;
            const char *v = c->line + 6;
            int vl = k - 6;
            while (vl > 0 && *v == ' ') v++, vl--;
            if (vl == 19 && memcmp(v, "content_block_delta", 19) == 0) c->event_kind = 1;
            else if (vl == 12 && memcmp(v, "message_stop", 12) == 0) c->event_kind = 2;
            else if (vl == 5 && memcmp(v, "error", 5) == 0) c->event_kind = 3;
            else c->event_kind = 0;
        }
    }
}

/* Body framing (chunked or identity); returns 1 when the body is complete. */
static int body(struct conn *c, const char *p, size_t n, double t) {
    size_t i = 0;
    while (i < n) {
        switch (c->bstate) {
        case B_IDENTITY: {
            size_t take = n - i;
            if (c->remaining >= 0 && (long long)take > c->remaining) take = c->remaining;
            sse(c, p + i, take, t);
            i += take;
            if (c->remaining >= 0) {
                c->remaining -= take;
                if (c->remaining == 0) return 1;
            }
            break;
        }
        case B_SIZE: {
            char ch = p[i++];
            int d = -1;
            if (ch >= '0' && ch <= '9') d = ch - '0';
            else if (ch >= 'a' && ch <= 'f') d = ch - 'a' + 10;
            else if (ch >= 'A' && ch <= 'F') d = ch - 'A' + 10;
            if (d >= 0) c->chunk_size = c->chunk_size * 16 + d;
            else if (ch == '\n') {
                if (c->chunk_size == 0) return 1;
                c->remaining = c->chunk_size;
                c->bstate = B_DATA;
            } else c->bstate = B_SIZE_EXT; /* ';' extension or '\r' */
            break;
        }
        case B_SIZE_EXT:
            if (p[i++] == '\n') {
                if (c->chunk_size == 0) return 1;
                c->remaining = c->chunk_size;
                c->bstate = B_DATA;
            }
            break;
        case B_DATA: {
            size_t take = n - i;
            if ((long long)take > c->remaining) take = c->remaining;
            sse(c, p + i, take, t);
            i += take;
            c->remaining -= take;
            if (c->remaining == 0) c->bstate = B_DATA_CR;
            break;
        }
        case B_DATA_CR:
        case B_DATA_LF:
            if (p[i++] == '\n') {
                c->bstate = B_SIZE;
                c->chunk_size = 0;
            }
            break;
        default:
            return 1;
        }
    }
    return 0;
}

static void headers_done(struct conn *c, int end) {
    c->status = atoi(c->hbuf + 9);
    if (c->status == 200) delivered++;
    c->bstate = B_IDENTITY;
    c->remaining = -1;
    char *line = strstr(c->hbuf, "\r\n");
    while (line && line < c->hbuf + end) {
        line += 2;
        if (strncasecmp(line, "transfer-encoding:", 18) == 0 && strcasestr(line, "chunked")) {
            c->bstate = B_SIZE;
            c->chunk_size = 0;
        } else if (strncasecmp(line, "content-length:", 15) == 0) {
            c->remaining = atoll(line + 15);
        }
        line = strstr(line, "\r\n");
    }
}

static void on_readable(struct conn *c) {
    char buf[65536];
    for (;;) {
        ssize_t n = read(c->fd, buf, sizeof buf);
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) return;
            finish(c, "read error");
            return;
        }
        if (n == 0) {
            if (c->state == S_BODY && c->bstate == B_IDENTITY && c->remaining < 0) finish(c, NULL);
            else finish(c, "connection closed early");
            return;
        }
        double t = now_s();
        if (c->t_first_byte == 0) {
            c->t_first_byte = t;
            if (n_ttfb < cap_streams) ttfb[n_ttfb++] = t - c->t_start;
        }
        const char *p = buf;
        size_t len = n;
        if (c->state == S_HEADERS) {
            size_t room = MAX_HEADER - 1 - c->hlen;
            size_t take = len < room ? len : room;
            memcpy(c->hbuf + c->hlen, p, take);
            int old = c->hlen;
            c->hlen += take;
            c->hbuf[c->hlen] = 0;
            char *end = strstr(c->hbuf, "\r\n\r\n");
            if (!end) {
                if (c->hlen >= MAX_HEADER - 1) finish(c, "headers too large");
                continue;
            }
            int hend = end - c->hbuf + 4;
            headers_done(c, hend);
            c->state = S_BODY;
            p += hend - old;
            len -= hend - old;
            if (c->bstate == B_IDENTITY && c->remaining == 0) {
                finish(c, NULL);
                return;
            }
        }
        if (len && body(c, p, len, t)) {
            finish(c, NULL);
            return;
        }
        if (c->leaving) { /* --disconnect-after: the client goes away mid-stream */
            finish(c, NULL);
            return;
        }
    }
}

static void on_writable(struct conn *c) {
    if (c->state == S_CONNECTING) {
        int err = 0;
        socklen_t l = sizeof err;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &l);
        if (err) {
            finish(c, "connect");
            return;
        }
        c->state = S_HEADERS;
    }
    while (c->sent < request_len) {
        ssize_t n = write(c->fd, request_buf + c->sent, request_len - c->sent);
        if (n < 0) {
            if (errno == EAGAIN) return;
            finish(c, "write error");
            return;
        }
        c->sent += n;
    }
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
    epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static void print_dist(const char *name, double *v, long n, int last) {
    if (n == 0) {
        printf("\"%s\":null%s", name, last ? "" : ",");
        return;
    }
    qsort(v, n, sizeof *v, cmp);
    long i50 = (long)(0.50 * n + 0.5) - 1, i99 = (long)(0.99 * n + 0.5) - 1;
    if (i50 < 0) i50 = 0;
    if (i99 < 0) i99 = 0;
    printf("\"%s\":{\"p50\":%.3f,\"p99\":%.3f,\"max\":%.3f,\"n\":%ld}%s", name, v[i50] * 1000,
           v[i99] * 1000, v[n - 1] * 1000, n, last ? "" : ",");
}

static void usage(void) {
    fprintf(stderr,
            "usage: streamgen --port P --body-file F [--host 127.0.0.1] [--path /v1/messages]\n"
            "                 [--header 'name: value']... [--concurrency N] [--rounds R]\n"
            "                 [--pace-ms 20] [--stall-ms 50] [--expect-deltas 64] [--timeout 120]\n"
            "                 [--duration S] [--error-pause-ms MS] [--disconnect-after K]\n");
    exit(2);
}

int main(int argc, char **argv) {
    const char *body_file = NULL;
    char headers[8192] = "";
    size_t hl = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (i + 1 >= argc) usage();
        const char *v = argv[++i];
        if (!strcmp(a, "--host")) host = v;
        else if (!strcmp(a, "--port")) port = atoi(v);
        else if (!strcmp(a, "--path")) path = v;
        else if (!strcmp(a, "--concurrency")) concurrency = atoi(v);
        else if (!strcmp(a, "--rounds")) rounds = atoi(v);
        else if (!strcmp(a, "--pace-ms")) pace_ms = atof(v);
        else if (!strcmp(a, "--stall-ms")) stall_ms = atof(v);
        else if (!strcmp(a, "--expect-deltas")) expect_deltas = atoi(v);
        else if (!strcmp(a, "--timeout")) timeout_s = atof(v);
        else if (!strcmp(a, "--duration")) duration_s = atof(v);
        else if (!strcmp(a, "--error-pause-ms")) error_pause_s = atof(v) / 1000;
        else if (!strcmp(a, "--disconnect-after")) disconnect_after = atoi(v);
        else if (!strcmp(a, "--body-file")) body_file = v;
        else if (!strcmp(a, "--header")) {
            int w = snprintf(headers + hl, sizeof headers - hl, "%s\r\n", v);
            if (w < 0 || (size_t)w >= sizeof headers - hl) usage();
            hl += w;
        } else usage();
    }
    if (!port || !body_file || concurrency < 1 || rounds < 1) usage();
    if (strcmp(host, "127.0.0.1") != 0) {
        fprintf(stderr, "streamgen: only 127.0.0.1 targets\n");
        return 2;
    }
    FILE *f = fopen(body_file, "rb");
    if (!f) {
        perror(body_file);
        return 2;
    }
    static char payload[1 << 16];
    size_t plen = fread(payload, 1, sizeof payload, f);
    fclose(f);
    request_buf = malloc(plen + hl + 512);
    request_len = sprintf(request_buf,
                          "POST %s HTTP/1.1\r\nhost: %s:%d\r\ncontent-type: application/json\r\n"
                          "accept: text/event-stream\r\ncontent-length: %zu\r\n%s\r\n",
                          path, host, port, plen, headers);
    memcpy(request_buf + request_len, payload, plen);
    request_len += plen;

    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);

    cap_streams = (long)concurrency * rounds;
    if (duration_s > 0) cap_streams = (long)concurrency * (long)(duration_s * 20 + 16);
    cap_gaps = cap_streams * (expect_deltas ? expect_deltas : 256);
    ttfb = malloc(sizeof(double) * cap_streams);
    ttft = malloc(sizeof(double) * cap_streams);
    gaps = malloc(sizeof(double) * cap_gaps);
    struct conn *conns = calloc(concurrency, sizeof *conns);
    epfd = epoll_create1(EPOLL_CLOEXEC);

    struct rusage ru0, ru1;
    getrusage(RUSAGE_SELF, &ru0);
    double t0 = now_s();
    for (int i = 0; i < concurrency; i++) {
        conns[i].fd = -1;
        open_conn(&conns[i]);
    }
    t_end = t0 + duration_s;
    double deadline = t0 + duration_s + timeout_s;
    struct epoll_event events[512];
    while (active > 0 || sleeping > 0) {
        double t = now_s();
        double left = deadline - t;
        if (left <= 0) break;
        if (sleeping > 0) {
            for (int i = 0; i < concurrency; i++) {
                struct conn *c = &conns[i];
                if (c->wake_at <= 0) continue;
                if (c->wake_at <= t || t >= t_end) {
                    c->wake_at = 0;
                    sleeping--;
                    if (t < t_end) open_conn(c);
                } else if (c->wake_at - t < left) left = c->wake_at - t;
            }
            if (active == 0 && sleeping == 0) break;
        }
        int n = epoll_wait(epfd, events, 512, (int)(left * 1000) + 1);
        double t1 = now_s();
        for (int i = 0; i < n; i++) {
            struct conn *c = events[i].data.ptr;
            if (c->fd < 0) continue;
            if (events[i].events & (EPOLLOUT)) on_writable(c);
            if (c->fd >= 0 && (events[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR))) on_readable(c);
        }
        double loop = (now_s() - t1) * 1000;
        if (loop > max_loop_ms) max_loop_ms = loop;
    }
    for (int i = 0; i < concurrency; i++)
        if (conns[i].fd >= 0) {
            rounds = 0; /* no new round after a timeout */
            finish(&conns[i], "timeout");
        }
    double wall = now_s() - t0;
    getrusage(RUSAGE_SELF, &ru1);
    double cpu = (ru1.ru_utime.tv_sec - ru0.ru_utime.tv_sec) +
                 (ru1.ru_utime.tv_usec - ru0.ru_utime.tv_usec) / 1e6 +
                 (ru1.ru_stime.tv_sec - ru0.ru_stime.tv_sec) +
                 (ru1.ru_stime.tv_usec - ru0.ru_stime.tv_usec) / 1e6;

    printf("{\"concurrency\":%d,\"rounds\":%d,\"ok\":%ld,\"errors\":%ld,\"delivered\":%ld,"
           "\"disconnected\":%ld,\"error_kinds\":{",
           concurrency, rounds, ok_count, err_count, delivered, disconnected);
    for (int i = 0; i < n_kinds; i++) printf("%s\"%s\":%ld", i ? "," : "", kinds[i], kind_counts[i]);
    printf("},\"frames\":%ld,\"stalled_frames\":%ld,\"stalled_streams\":%ld,\"stalls_by_delta\":[",
           total_frames, stalled_frames, stalled_streams);
    for (int i = 0; i <= STALL_POSITIONS; i++) printf("%s%ld", i ? "," : "", stalls_by_pos[i]);
    printf("],\"max_excess_ms\":%.3f,\"wall_s\":%.3f,\"cpu_s\":%.3f,\"max_loop_ms\":%.3f,",
           max_excess_ms, wall, cpu, max_loop_ms);
    print_dist("ttfb_ms", ttfb, n_ttfb, 0);
    print_dist("ttft_ms", ttft, n_ttft, 0);
    print_dist("gap_ms", gaps, n_gaps, 1);
    printf("}\n");
    return 0;
}
