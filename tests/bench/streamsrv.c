/* streamsrv: a paced upstream in C that replays the sandbox's own answers, byte for byte.
 *
 * Built and driven by tests/bench/replay.py, which captures the sandbox's answers (the
 * response head, the SSE events, the JSON reply) and writes them as "parts":
 *
 *     <kind> <length>\n<bytes>       kind: I (send at once after the previous part)
 *                                          P (send --pace-ms after the previous part)
 *
 * The first part goes out as soon as a request is read. Every 12-character run of 'X' in a
 * part is replaced, per response, by a 12-digit hex counter, so request and message ids stay
 * unique. A request whose body contains "stream":true (or "stream": true) gets the stream
 * parts, any other the JSON parts. HTTP/1.1 keep-alive; one thread, epoll; the pacing queue
 * is a FIFO (every stream has the same pace, so due times are in order).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_PARTS 256
#define REQ_MAX 65536
#define PLACEHOLDER "XXXXXXXXXXXX"

struct part {
    char kind;
    char *data;
    size_t len;
    int holes[8];
    int n_holes;
};
struct script {
    struct part parts[MAX_PARTS];
    int n;
};

static struct script sse_script, json_script;
static double pace_s = 0.02;
static unsigned long long counter;
static long served;

struct conn {
    int fd;
    char *req;
    size_t req_len;
    struct script *script;
    int next;   /* next part to send; -1 when reading a request */
    unsigned long long id;
    char *pending;
    size_t pending_len, pending_off;
    int queued;
};

struct qent {
    struct conn *c;
    double due;
};
static struct qent *queue;
static size_t q_head, q_tail, q_cap;
static int epfd;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void load(const char *path, struct script *s) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        perror(path);
        exit(2);
    }
    char kind;
    size_t len;
    while (s->n < MAX_PARTS && fscanf(f, "%c %zu\n", &kind, &len) == 2) {
        struct part *p = &s->parts[s->n++];
        p->kind = kind;
        p->len = len;
        p->data = malloc(len + 1);
        if (fread(p->data, 1, len, f) != len) {
            fprintf(stderr, "%s: short part\n", path);
            exit(2);
        }
        p->data[len] = 0;
        for (char *h = p->data; (h = memmem(h, p->data + len - h, PLACEHOLDER, 12)) && p->n_holes < 8; h += 12)
            p->holes[p->n_holes++] = h - p->data;
    }
    fclose(f);
    if (s->n == 0) {
        fprintf(stderr, "%s: no parts\n", path);
        exit(2);
    }
}

static void release(struct conn *c) {
    free(c->req);
    free(c->pending);
    free(c);
}

/* Close the connection; free it now, or when its turn in the pacing queue comes. */
static void drop(struct conn *c) {
    epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->fd = -1;
    if (!c->queued) release(c);
}

static void want(struct conn *c, unsigned events) {
    struct epoll_event ev = {.events = events, .data.ptr = c};
    epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
}

/* Write bytes, keeping what the socket would not take; -1 when the connection is gone. */
static int put(struct conn *c, const char *data, size_t len) {
    if (c->pending_len > c->pending_off) {
        c->pending = realloc(c->pending, c->pending_len + len);
        memcpy(c->pending + c->pending_len, data, len);
        c->pending_len += len;
        return 0;
    }
    while (len) {
        ssize_t n = write(c->fd, data, len);
        if (n < 0) {
            if (errno == EAGAIN) break;
            return -1;
        }
        data += n;
        len -= n;
    }
    if (len) {
        free(c->pending);
        c->pending = malloc(len);
        memcpy(c->pending, data, len);
        c->pending_len = len;
        c->pending_off = 0;
        want(c, EPOLLIN | EPOLLOUT);
    }
    return 0;
}

static int send_part(struct conn *c, struct part *p) {
    if (!p->n_holes) return put(c, p->data, p->len);
    char stackbuf[16384];
    char *buf = p->len <= sizeof stackbuf ? stackbuf : malloc(p->len);
    memcpy(buf, p->data, p->len);
    char hex[13];
    snprintf(hex, sizeof hex, "%012llx", c->id);
    for (int i = 0; i < p->n_holes; i++) memcpy(buf + p->holes[i], hex, 12);
    int r = put(c, buf, p->len);
    if (buf != stackbuf) free(buf);
    return r;
}

static void enqueue(struct conn *c, double due) {
    if (q_tail - q_head == q_cap) {
        fprintf(stderr, "pacing queue full\n");
        exit(3);
    }
    queue[q_tail++ % q_cap] = (struct qent){c, due};
    c->queued = 1;
}

/* Send parts from c->next on: immediate ones now, stop at a paced one (queued). */
static int advance(struct conn *c, int first) {
    struct script *s = c->script;
    while (c->next < s->n) {
        struct part *p = &s->parts[c->next];
        if (p->kind == 'P' && !first) {
            enqueue(c, now_s() + pace_s);
            return 0;
        }
        first = 0;
        if (send_part(c, p) < 0) return -1;
        c->next++;
    }
    c->next = -1; /* the response is complete: read the next request */
    served++;
    return 0;
}

static int try_request(struct conn *c) {
    char *end = memmem(c->req, c->req_len, "\r\n\r\n", 4);
    if (!end) return 0;
    size_t head = end - c->req + 4;
    long long length = 0;
    for (char *h = c->req; h && h < end; h = memmem(h, end - h, "\r\n", 2)) {
        h += 2;
        if (strncasecmp(h, "content-length:", 15) == 0) length = atoll(h + 15);
    }
    if (c->req_len < head + length) return 0;
    char *body = c->req + head;
    int stream = memmem(body, length, "\"stream\":true", 13) || memmem(body, length, "\"stream\": true", 14);
    size_t used = head + length;
    memmove(c->req, c->req + used, c->req_len - used);
    c->req_len -= used;
    c->script = stream ? &sse_script : &json_script;
    c->next = 0;
    c->id = ++counter;
    return advance(c, 1) < 0 ? -1 : 1;
}

static void on_read(struct conn *c) {
    for (;;) {
        if (c->req_len == REQ_MAX) {
            drop(c);
            return;
        }
        ssize_t n = read(c->fd, c->req + c->req_len, REQ_MAX - c->req_len);
        if (n == 0 || (n < 0 && errno != EAGAIN)) {
            drop(c);
            return;
        }
        if (n < 0) break;
        c->req_len += n;
    }
    while (c->next < 0) {
        int r = try_request(c);
        if (r < 0) {
            drop(c);
            return;
        }
        if (r == 0) break;
    }
}

static void on_write(struct conn *c) {
    while (c->pending_off < c->pending_len) {
        ssize_t n = write(c->fd, c->pending + c->pending_off, c->pending_len - c->pending_off);
        if (n < 0) {
            if (errno == EAGAIN) return;
            drop(c);
            return;
        }
        c->pending_off += n;
    }
    c->pending_off = c->pending_len = 0;
    want(c, EPOLLIN);
}

int main(int argc, char **argv) {
    int port = 0;
    const char *sse = NULL, *json = NULL;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--port")) port = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--sse")) sse = argv[i + 1];
        else if (!strcmp(argv[i], "--json")) json = argv[i + 1];
        else if (!strcmp(argv[i], "--pace-ms")) pace_s = atof(argv[i + 1]) / 1000;
    }
    if (!port || !sse || !json) {
        fprintf(stderr, "usage: streamsrv --port P --sse FILE --json FILE [--pace-ms 20]\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    load(sse, &sse_script);
    load(json, &json_script);
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
    q_cap = 1 << 17;
    queue = malloc(sizeof *queue * q_cap);

    int ls = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    int one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(port)};
    inet_pton(AF_INET, "127.0.0.1", &sa.sin_addr);
    if (bind(ls, (struct sockaddr *)&sa, sizeof sa) < 0 || listen(ls, 4096) < 0) {
        perror("bind/listen");
        return 1;
    }
    epfd = epoll_create1(0);
    struct epoll_event lev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(epfd, EPOLL_CTL_ADD, ls, &lev);
    fprintf(stderr, "streamsrv listening on 127.0.0.1:%d\n", port);

    struct epoll_event events[512];
    for (;;) {
        int timeout = -1;
        if (q_head != q_tail) {
            double wait = queue[q_head % q_cap].due - now_s();
            timeout = wait <= 0 ? 0 : (int)(wait * 1000 + 0.999);
        }
        int n = epoll_wait(epfd, events, 512, timeout);
        for (int i = 0; i < n; i++) {
            struct conn *c = events[i].data.ptr;
            if (c == NULL) {
                for (;;) {
                    int fd = accept4(ls, NULL, NULL, SOCK_NONBLOCK);
                    if (fd < 0) break;
                    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    c = calloc(1, sizeof *c);
                    c->fd = fd;
                    c->next = -1;
                    c->req = malloc(REQ_MAX);
                    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
                    epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev);
                }
                continue;
            }
            if (c->fd < 0) continue;
            if (events[i].events & EPOLLOUT) on_write(c);
            else if (events[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) on_read(c);
        }
        double t = now_s();
        while (q_head != q_tail && queue[q_head % q_cap].due <= t + 0.0005) {
            struct qent e = queue[q_head++ % q_cap];
            e.c->queued = 0;
            if (e.c->fd < 0) { /* closed while waiting */
                release(e.c);
                continue;
            }
            if (send_part(e.c, &e.c->script->parts[e.c->next]) < 0) {
                drop(e.c);
                continue;
            }
            e.c->next++;
            if (advance(e.c, 0) < 0) drop(e.c);
        }
    }
}
