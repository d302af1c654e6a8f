/*
 * osbuilder-agent: a tiny guest agent for osbuilder images.
 *
 * Serves newline-delimited JSON requests (ping, version, exec, poweroff) on the
 * virtio-serial port "agent.channel.0", or on an inherited fd (--fd N, used by tests).
 * It is a static binary with no dependencies and can run as PID 1 (then it mounts the
 * API filesystems, reaps orphans and never exits). The protocol is documented in
 * osbuilder/agent/client.py.
 *
 * Build: gcc -static -Os -Wall -Wextra -Werror -std=gnu11 -s -o osbuilder-agent agent.c
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define AGENT_VERSION "0.1.0"
#define PROTOCOL_VERSION 1
#define PORT_NAME "agent.channel.0"

#define MAX_LINE (64 * 1024)     /* max request line, without the newline */
#define MAX_OUTPUT (1024 * 1024) /* max captured bytes per exec output stream */
#define MAX_ARGV 4096
#define MAX_DEPTH 16 /* JSON nesting limit */
#define DEFAULT_TIMEOUT 30.0
#define MAX_TIMEOUT 3600.0
#define RETRY_MS 150       /* back-off while the port is absent / host not connected */
#define DRAIN_GRACE_MS 500 /* read output this long after the child exits */
#define KILL_GRACE_MS 5000 /* give up waiting for a SIGKILLed child after this */

static const char *const DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

static int is_pid1;
static int sigchld_pipe[2] = {-1, -1};   /* self-pipe written by the SIGCHLD handler */
static volatile sig_atomic_t child_pgid; /* process group of the running exec child */
static pid_t tracked_pid;                /* the exec child whose status we want */
static int tracked_status, tracked_done;

/* ------------------------------------------------------------------ utilities */

static void logmsg(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void logmsg(const char *fmt, ...)
{
    char line[512];
    va_list ap;
    int n = snprintf(line, sizeof line, "osbuilder-agent: ");
    va_start(ap, fmt);
    vsnprintf(line + n, sizeof line - (size_t)n - 1, fmt, ap);
    va_end(ap);
    size_t len = strlen(line);
    line[len++] = '\n';
    ssize_t r;
    do
        r = write(STDERR_FILENO, line, len);
    while (r < 0 && errno == EINTR); /* best effort: stderr may be gone */
}

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int set_nonblock(int fd)
{
    int fl = fcntl(fd, F_GETFL);
    return fl < 0 ? -1 : fcntl(fd, F_SETFL, fl | O_NONBLOCK);
}

static void close_fd(int *fd)
{
    if (*fd >= 0) {
        close(*fd); /* EINTR on close must not be retried on Linux */
        *fd = -1;
    }
}

/* Reap every exited child; remember the status of the one exec is waiting for. */
static void reap_children(void)
{
    for (;;) {
        int st;
        pid_t p = waitpid(-1, &st, WNOHANG);
        if (p > 0) {
            if (p == tracked_pid) {
                tracked_status = st;
                tracked_done = 1;
            }
            continue;
        }
        if (p < 0 && errno == EINTR)
            continue;
        return; /* 0: children left but running; ECHILD: none */
    }
}

static void drain_sigchld_pipe(void)
{
    char tmp[64];
    while (read(sigchld_pipe[0], tmp, sizeof tmp) > 0)
        ;
}

/* Sleep up to `ms` while still reaping children (matters when we are PID 1). */
static void idle_wait(int ms)
{
    int64_t end = now_ms() + ms;
    for (;;) {
        reap_children();
        int64_t left = end - now_ms();
        if (left <= 0)
            return;
        struct pollfd p = {.fd = sigchld_pipe[0], .events = POLLIN};
        if (poll(&p, 1, (int)left) > 0)
            drain_sigchld_pipe();
    }
}

static void on_sigchld(int sig)
{
    (void)sig;
    int saved = errno;
    ssize_t r = write(sigchld_pipe[1], "c", 1); /* non-blocking; a full pipe is fine */
    (void)r;
    errno = saved;
}

/* As PID 1: pass termination signals on to the running exec child, otherwise ignore them. */
static void on_forward(int sig)
{
    pid_t pg = child_pgid;
    if (pg > 0)
        kill(-pg, sig);
}

/* ------------------------------------------------------------------ growable buffer */

struct buf {
    char *p;
    size_t len, cap;
    int oom;
};

static int buf_reserve(struct buf *b, size_t extra)
{
    if (b->oom)
        return -1;
    if (extra > SIZE_MAX / 2 - b->len) {
        b->oom = 1;
        return -1;
    }
    if (b->len + extra + 1 <= b->cap)
        return 0;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + extra + 1)
        cap *= 2;
    char *p = realloc(b->p, cap);
    if (!p) {
        b->oom = 1;
        return -1;
    }
    b->p = p;
    b->cap = cap;
    return 0;
}

static void buf_add(struct buf *b, const void *data, size_t n)
{
    if (buf_reserve(b, n) < 0)
        return;
    memcpy(b->p + b->len, data, n);
    b->len += n;
    b->p[b->len] = '\0';
}

static void buf_str(struct buf *b, const char *s) { buf_add(b, s, strlen(s)); }

static void buf_fmt(struct buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void buf_fmt(struct buf *b, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n <= 0 || buf_reserve(b, (size_t)n) < 0)
        return;
    va_start(ap, fmt);
    vsnprintf(b->p + b->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
}

static void buf_free(struct buf *b)
{
    free(b->p);
    memset(b, 0, sizeof *b);
}

/* ------------------------------------------------------------------ UTF-8 and JSON output */

/* Length (1-4) of the well-formed UTF-8 sequence at s, or 0 if it is not well-formed (RFC 3629). */
static size_t utf8_seq_len(const unsigned char *s, size_t n)
{
    unsigned char c = s[0];
    size_t len;
    unsigned char lo = 0x80, hi = 0xBF; /* allowed range of the second byte */
    if (c < 0x80)
        return 1;
    if (c >= 0xC2 && c <= 0xDF)
        len = 2;
    else if (c >= 0xE0 && c <= 0xEF) {
        len = 3;
        if (c == 0xE0)
            lo = 0xA0; /* no overlongs */
        else if (c == 0xED)
            hi = 0x9F; /* no surrogates */
    } else if (c >= 0xF0 && c <= 0xF4) {
        len = 4;
        if (c == 0xF0)
            lo = 0x90;
        else if (c == 0xF4)
            hi = 0x8F; /* <= U+10FFFF */
    } else
        return 0;
    if (n < len || s[1] < lo || s[1] > hi)
        return 0;
    for (size_t i = 2; i < len; i++)
        if ((s[i] & 0xC0) != 0x80)
            return 0;
    return len;
}

/* Append s as a JSON string. Bytes that are not part of well-formed UTF-8 become \ufffd. */
static void buf_json_string(struct buf *b, const char *str, size_t n)
{
    const unsigned char *s = (const unsigned char *)str;
    buf_add(b, "\"", 1);
    size_t i = 0;
    while (i < n && !b->oom) {
        unsigned char c = s[i];
        if (c == '"' || c == '\\') {
            char e[2] = {'\\', (char)c};
            buf_add(b, e, 2);
            i++;
        } else if (c < 0x20 || c == 0x7F) {
            switch (c) {
            case '\n': buf_str(b, "\\n"); break;
            case '\r': buf_str(b, "\\r"); break;
            case '\t': buf_str(b, "\\t"); break;
            case '\b': buf_str(b, "\\b"); break;
            case '\f': buf_str(b, "\\f"); break;
            default: buf_fmt(b, "\\u%04x", c); break;
            }
            i++;
        } else {
            /* copy the longest run of plain printable / well-formed bytes in one go */
            size_t start = i;
            while (i < n) {
                c = s[i];
                if (c == '"' || c == '\\' || c < 0x20 || c == 0x7F)
                    break;
                size_t l = utf8_seq_len(s + i, n - i);
                if (!l)
                    break;
                i += l;
            }
            buf_add(b, s + start, i - start);
            if (i < n && s[i] >= 0x80 && !utf8_seq_len(s + i, n - i)) {
                buf_str(b, "\\ufffd");
                i++;
            }
        }
    }
    buf_add(b, "\"", 1);
}

/* ------------------------------------------------------------------ JSON parser */

enum jtype { J_NULL, J_BOOL, J_NUM, J_STR, J_ARR, J_OBJ };

struct jval {
    enum jtype type;
    int boolean;
    double num;
    char *str; /* J_STR: decoded bytes (NUL-terminated, may contain NUL); J_NUM: raw token */
    size_t len;
    struct jval *items; /* J_ARR elements / J_OBJ member values */
    struct jval *keys;  /* J_OBJ member names (J_STR) */
    size_t n;
};

struct parser {
    const char *p, *start, *end;
    char err[128];
};

static int perr(struct parser *ps, const char *what)
{
    if (!ps->err[0])
        snprintf(ps->err, sizeof ps->err, "invalid JSON: %s at offset %ld", what, (long)(ps->p - ps->start));
    return -1;
}

static void jfree(struct jval *v)
{
    for (size_t i = 0; i < v->n; i++) {
        if (v->items)
            jfree(&v->items[i]);
        if (v->keys)
            jfree(&v->keys[i]);
    }
    free(v->items);
    free(v->keys);
    free(v->str);
    memset(v, 0, sizeof *v);
}

static void skip_ws(struct parser *ps)
{
    while (ps->p < ps->end && (*ps->p == ' ' || *ps->p == '\t' || *ps->p == '\n' || *ps->p == '\r'))
        ps->p++;
}

static int hex4(struct parser *ps, unsigned *out)
{
    if (ps->end - ps->p < 4)
        return perr(ps, "truncated \\u escape");
    unsigned v = 0;
    for (int i = 0; i < 4; i++) {
        char c = *ps->p++;
        v <<= 4;
        if (c >= '0' && c <= '9')
            v |= (unsigned)(c - '0');
        else if (c >= 'a' && c <= 'f')
            v |= (unsigned)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F')
            v |= (unsigned)(c - 'A' + 10);
        else
            return perr(ps, "bad hex digit in \\u escape");
    }
    *out = v;
    return 0;
}

static void put_utf8(struct buf *b, unsigned cp)
{
    unsigned char o[4];
    size_t n;
    if (cp < 0x80) {
        o[0] = (unsigned char)cp;
        n = 1;
    } else if (cp < 0x800) {
        o[0] = (unsigned char)(0xC0 | cp >> 6);
        o[1] = (unsigned char)(0x80 | (cp & 0x3F));
        n = 2;
    } else if (cp < 0x10000) {
        o[0] = (unsigned char)(0xE0 | cp >> 12);
        o[1] = (unsigned char)(0x80 | ((cp >> 6) & 0x3F));
        o[2] = (unsigned char)(0x80 | (cp & 0x3F));
        n = 3;
    } else {
        o[0] = (unsigned char)(0xF0 | cp >> 18);
        o[1] = (unsigned char)(0x80 | ((cp >> 12) & 0x3F));
        o[2] = (unsigned char)(0x80 | ((cp >> 6) & 0x3F));
        o[3] = (unsigned char)(0x80 | (cp & 0x3F));
        n = 4;
    }
    buf_add(b, o, n);
}

static int parse_string(struct parser *ps, struct jval *out)
{
    struct buf b = {0};
    ps->p++; /* opening quote */
    for (;;) {
        if (ps->p >= ps->end) {
            buf_free(&b);
            return perr(ps, "unterminated string");
        }
        unsigned char c = (unsigned char)*ps->p;
        if (c == '"') {
            ps->p++;
            break;
        }
        if (c < 0x20) {
            buf_free(&b);
            return perr(ps, "control character in string");
        }
        if (c == '\\') {
            ps->p++;
            if (ps->p >= ps->end) {
                buf_free(&b);
                return perr(ps, "unterminated string");
            }
            char e = *ps->p++;
            const char *simple = NULL;
            switch (e) {
            case '"': simple = "\""; break;
            case '\\': simple = "\\"; break;
            case '/': simple = "/"; break;
            case 'b': simple = "\b"; break;
            case 'f': simple = "\f"; break;
            case 'n': simple = "\n"; break;
            case 'r': simple = "\r"; break;
            case 't': simple = "\t"; break;
            case 'u': break;
            default:
                ps->p--;
                buf_free(&b);
                return perr(ps, "bad escape in string");
            }
            if (simple) {
                buf_add(&b, simple, 1);
                continue;
            }
            unsigned cp, lo;
            if (hex4(ps, &cp) < 0) {
                buf_free(&b);
                return -1;
            }
            if (cp >= 0xD800 && cp <= 0xDBFF) {
                if (ps->end - ps->p < 2 || ps->p[0] != '\\' || ps->p[1] != 'u') {
                    buf_free(&b);
                    return perr(ps, "unpaired surrogate in \\u escape");
                }
                ps->p += 2;
                if (hex4(ps, &lo) < 0) {
                    buf_free(&b);
                    return -1;
                }
                if (lo < 0xDC00 || lo > 0xDFFF) {
                    buf_free(&b);
                    return perr(ps, "unpaired surrogate in \\u escape");
                }
                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
            } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
                buf_free(&b);
                return perr(ps, "unpaired surrogate in \\u escape");
            }
            put_utf8(&b, cp);
            continue;
        }
        size_t l = utf8_seq_len((const unsigned char *)ps->p, (size_t)(ps->end - ps->p));
        if (!l) {
            buf_free(&b);
            return perr(ps, "invalid UTF-8 in string");
        }
        buf_add(&b, ps->p, l);
        ps->p += l;
    }
    if (b.oom || buf_reserve(&b, 0) < 0) {
        buf_free(&b);
        return perr(ps, "out of memory");
    }
    out->type = J_STR;
    out->str = b.p;
    out->len = b.len;
    return 0;
}

static int parse_number(struct parser *ps, struct jval *out)
{
    const char *s = ps->p;
    const char *p = s;
#define DIGITS_AT(q) ((q) < ps->end && *(q) >= '0' && *(q) <= '9')
    if (p < ps->end && *p == '-')
        p++;
    if (!DIGITS_AT(p))
        return perr(ps, "bad number");
    if (*p == '0')
        p++;
    else
        while (DIGITS_AT(p))
            p++;
    if (p < ps->end && *p == '.') {
        p++;
        if (!DIGITS_AT(p))
            return perr(ps, "bad number");
        while (DIGITS_AT(p))
            p++;
    }
    if (p < ps->end && (*p == 'e' || *p == 'E')) {
        p++;
        if (p < ps->end && (*p == '+' || *p == '-'))
            p++;
        if (!DIGITS_AT(p))
            return perr(ps, "bad number");
        while (DIGITS_AT(p))
            p++;
    }
#undef DIGITS_AT
    size_t n = (size_t)(p - s);
    char *raw = malloc(n + 1);
    if (!raw)
        return perr(ps, "out of memory");
    memcpy(raw, s, n);
    raw[n] = '\0';
    out->type = J_NUM;
    out->str = raw;
    out->len = n;
    out->num = strtod(raw, NULL); /* never setlocale()d, so the decimal point is '.' */
    ps->p = p;
    return 0;
}

static int parse_value(struct parser *ps, struct jval *out, int depth);

/* Parse the elements of an array (keys == NULL) or the members of an object. */
static int parse_container(struct parser *ps, struct jval *out, int depth, int object)
{
    char close = object ? '}' : ']';
    size_t cap = 0;
    out->type = object ? J_OBJ : J_ARR;
    ps->p++;
    skip_ws(ps);
    if (ps->p < ps->end && *ps->p == close) {
        ps->p++;
        return 0;
    }
    for (;;) {
        if (out->n == cap) {
            size_t ncap = cap ? cap * 2 : 4;
            struct jval *ni = realloc(out->items, ncap * sizeof *ni);
            if (!ni)
                return perr(ps, "out of memory");
            out->items = ni;
            if (object) {
                struct jval *nk = realloc(out->keys, ncap * sizeof *nk);
                if (!nk)
                    return perr(ps, "out of memory");
                out->keys = nk;
            }
            cap = ncap;
        }
        struct jval *item = &out->items[out->n];
        memset(item, 0, sizeof *item);
        if (object) {
            struct jval *key = &out->keys[out->n];
            memset(key, 0, sizeof *key);
            skip_ws(ps);
            if (ps->p >= ps->end || *ps->p != '"')
                return perr(ps, "expected member name");
            out->n++; /* count it now so jfree() cleans up a half-parsed member */
            if (parse_string(ps, key) < 0)
                return -1;
            skip_ws(ps);
            if (ps->p >= ps->end || *ps->p != ':')
                return perr(ps, "expected ':'");
            ps->p++;
        } else {
            out->n++;
        }
        if (parse_value(ps, item, depth + 1) < 0)
            return -1;
        skip_ws(ps);
        if (ps->p < ps->end && *ps->p == ',') {
            ps->p++;
            continue;
        }
        if (ps->p < ps->end && *ps->p == close) {
            ps->p++;
            return 0;
        }
        return perr(ps, object ? "expected ',' or '}'" : "expected ',' or ']'");
    }
}

static int parse_value(struct parser *ps, struct jval *out, int depth)
{
    if (depth > MAX_DEPTH)
        return perr(ps, "nested too deeply");
    skip_ws(ps);
    if (ps->p >= ps->end)
        return perr(ps, "unexpected end of input");
    size_t left = (size_t)(ps->end - ps->p);
    switch (*ps->p) {
    case '{': return parse_container(ps, out, depth, 1);
    case '[': return parse_container(ps, out, depth, 0);
    case '"': return parse_string(ps, out);
    case 't':
        if (left >= 4 && !memcmp(ps->p, "true", 4)) {
            out->type = J_BOOL;
            out->boolean = 1;
            ps->p += 4;
            return 0;
        }
        break;
    case 'f':
        if (left >= 5 && !memcmp(ps->p, "false", 5)) {
            out->type = J_BOOL;
            ps->p += 5;
            return 0;
        }
        break;
    case 'n':
        if (left >= 4 && !memcmp(ps->p, "null", 4)) {
            out->type = J_NULL;
            ps->p += 4;
            return 0;
        }
        break;
    default:
        if (*ps->p == '-' || (*ps->p >= '0' && *ps->p <= '9'))
            return parse_number(ps, out);
    }
    return perr(ps, "unexpected character");
}

static int parse_document(struct parser *ps, const char *s, size_t n, struct jval *out)
{
    memset(out, 0, sizeof *out);
    ps->p = ps->start = s;
    ps->end = s + n;
    ps->err[0] = '\0';
    if (parse_value(ps, out, 0) < 0) {
        jfree(out);
        return -1;
    }
    skip_ws(ps);
    if (ps->p != ps->end) {
        jfree(out);
        return perr(ps, "trailing characters after the value");
    }
    return 0;
}

static const struct jval *jget(const struct jval *obj, const char *key)
{
    size_t kl = strlen(key);
    for (size_t i = 0; i < obj->n; i++)
        if (obj->keys[i].len == kl && !memcmp(obj->keys[i].str, key, kl))
            return &obj->items[i];
    return NULL;
}

/* ------------------------------------------------------------------ replies */

static void reply_start(struct buf *b, const struct jval *id, int ok)
{
    buf_str(b, "{");
    if (id) {
        buf_str(b, "\"id\":");
        switch (id->type) {
        case J_NULL: buf_str(b, "null"); break;
        case J_BOOL: buf_str(b, id->boolean ? "true" : "false"); break;
        case J_NUM: buf_add(b, id->str, id->len); break; /* verbatim token */
        case J_STR: buf_json_string(b, id->str, id->len); break;
        default: buf_str(b, "null"); break; /* not reached: id is checked to be a scalar */
        }
        buf_str(b, ",");
    }
    buf_str(b, ok ? "\"ok\":true" : "\"ok\":false");
}

static void reply_error(struct buf *b, const struct jval *id, const char *msg)
{
    b->len = 0;
    reply_start(b, id, 0);
    buf_str(b, ",\"error\":");
    buf_json_string(b, msg, strlen(msg));
    buf_str(b, "}");
}

/* Write all of data; -1 (errno set) if the peer is gone. Waits out EAGAIN on non-blocking fds. */
static int write_all(int fd, const char *data, size_t len)
{
    while (len) {
        ssize_t w = write(fd, data, len);
        if (w > 0) {
            data += w;
            len -= (size_t)w;
        } else if (w < 0 && errno == EINTR) {
            continue;
        } else if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            struct pollfd p = {.fd = fd, .events = POLLOUT};
            if (poll(&p, 1, 1000) < 0 && errno != EINTR)
                return -1;
            reap_children();
        } else {
            if (w == 0)
                errno = EIO;
            return -1;
        }
    }
    return 0;
}

/* ------------------------------------------------------------------ exec */

struct capture {
    int fd;
    struct buf data;
    int truncated;
};

static void capture_read(struct capture *c)
{
    char chunk[65536];
    /* bounded, so a child that writes without pause cannot keep us from checking the timeout */
    for (int i = 0; i < 16; i++) {
        ssize_t r = read(c->fd, chunk, sizeof chunk);
        if (r > 0) {
            size_t room = c->data.len < MAX_OUTPUT ? MAX_OUTPUT - c->data.len : 0;
            size_t take = (size_t)r < room ? (size_t)r : room;
            if (take)
                buf_add(&c->data, chunk, take);
            if (take < (size_t)r)
                c->truncated = 1; /* keep reading so the child never blocks on a full pipe */
            continue;
        }
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return;
        close_fd(&c->fd); /* EOF or error */
        return;
    }
}

static void child_exec(char **argv, int in_fd, int out_fd, int err_fd)
{
    sigset_t all;
    sigemptyset(&all);
    sigprocmask(SIG_SETMASK, &all, NULL);
    for (int s = 1; s < NSIG; s++)
        if (s != SIGKILL && s != SIGSTOP)
            signal(s, SIG_DFL); /* undo our SIG_IGN for SIGPIPE etc.; errors for RT sigs are harmless */
    setpgid(0, 0);
    /* 0-2 are always open in the agent, so the pipe fds are >= 3 and dup2 never aliases */
    if (dup2(in_fd, 0) < 0 || dup2(out_fd, 1) < 0 || dup2(err_fd, 2) < 0)
        _exit(127);
    execvp(argv[0], argv);
    int e = errno;
    char msg[512];
    int n = snprintf(msg, sizeof msg, "osbuilder-agent: cannot execute '%s': %s\n", argv[0], strerror(e));
    if (n > 0) {
        ssize_t w = write(2, msg, (size_t)n < sizeof msg ? (size_t)n : sizeof msg - 1);
        (void)w;
    }
    _exit(e == ENOENT || e == ENOTDIR ? 127 : 126);
}

/* A validated exec request; argv points into the request's strings and ends with NULL. */
struct exec_req {
    char **argv;
    double timeout;      /* seconds */
    const char *in_data; /* NULL: no stdin (the child sees EOF at once) */
    size_t in_len;
};

/* The parent's side of a running exec: the child's pipes and what went through them so far. */
struct exec_io {
    struct capture out, err;
    int in_fd;
    const char *in_data;
    size_t in_len, in_off;
};

/* Deadlines of the exec I/O loop. */
struct exec_clock {
    int64_t deadline;  /* kill the child at this time */
    int64_t finish_by; /* once the child is gone (or killed): stop waiting at this time */
    int timed_out, exit_seen;
};

struct exec_result {
    int reaped; /* status holds the child's wait status */
    int status;
    int timed_out;
};

/* Check "argv": 1 to MAX_ARGV strings without NUL, the first one non-empty. NULL if valid, else the error. */
static const char *exec_check_argv(const struct jval *jargv)
{
    if (!jargv || jargv->type != J_ARR)
        return "\"argv\" must be a non-empty array of strings";
    if (jargv->n == 0 || jargv->n > MAX_ARGV)
        return "\"argv\" must be a non-empty array of strings (at most 4096)";
    for (size_t i = 0; i < jargv->n; i++) {
        const struct jval *a = &jargv->items[i];
        if (a->type != J_STR)
            return "\"argv\" must be a non-empty array of strings";
        if (memchr(a->str, '\0', a->len))
            return "\"argv\" strings must not contain NUL";
    }
    if (jargv->items[0].len == 0)
        return "\"argv\"[0] must not be empty";
    return NULL;
}

/* Validate an exec request into *x. NULL on success (free x->argv later), else the error for the reply. */
static const char *exec_parse(const struct jval *req, struct exec_req *x)
{
    const struct jval *jargv = jget(req, "argv");
    const struct jval *jtimeout = jget(req, "timeout");
    const struct jval *jstdin = jget(req, "stdin");
    const char *bad = exec_check_argv(jargv);
    if (bad)
        return bad;
    *x = (struct exec_req){.timeout = DEFAULT_TIMEOUT};
    if (jtimeout && jtimeout->type != J_NULL) {
        if (jtimeout->type != J_NUM || !(jtimeout->num > 0) || jtimeout->num > MAX_TIMEOUT)
            return "\"timeout\" must be a number of seconds in (0, 3600]";
        x->timeout = jtimeout->num;
    }
    if (jstdin && jstdin->type != J_NULL) {
        if (jstdin->type != J_STR)
            return "\"stdin\" must be a string or null";
        x->in_data = jstdin->str;
        x->in_len = jstdin->len;
    }
    x->argv = calloc(jargv->n + 1, sizeof *x->argv);
    if (!x->argv)
        return "out of memory";
    for (size_t i = 0; i < jargv->n; i++)
        x->argv[i] = jargv->items[i].str;
    return NULL;
}

/* Reply with "<what>: <strerror(err)>". */
static void reply_errno(struct buf *reply, const struct jval *id, const char *what, int err)
{
    char msg[128];
    snprintf(msg, sizeof msg, "%s: %s", what, strerror(err));
    reply_error(reply, id, msg);
}

/* Create the child's stdin, stdout and stderr pipes (close-on-exec; all fds must start as -1).
 * Returns 0, or an errno value with no pipe left open. */
static int exec_open_pipes(int in[2], int out[2], int err[2])
{
    if (pipe2(in, O_CLOEXEC) == 0 && pipe2(out, O_CLOEXEC) == 0 && pipe2(err, O_CLOEXEC) == 0)
        return 0;
    int e = errno;
    for (int i = 0; i < 2; i++) {
        close_fd(&in[i]);
        close_fd(&out[i]);
        close_fd(&err[i]);
    }
    return e;
}

/* Fork the child into its own process group with the pipes as its stdio, and track it as the exec
 * child. Closes the child's pipe ends (on failure all of them). Returns the pid, or -1 with errno set. */
static pid_t exec_spawn(char **argv, int in[2], int out[2], int err[2])
{
    tracked_done = 0;
    pid_t pid = fork();
    if (pid == 0)
        child_exec(argv, in[0], out[1], err[1]); /* does not return */
    int fork_errno = errno;
    close_fd(&in[0]);
    close_fd(&out[1]);
    close_fd(&err[1]);
    if (pid < 0) {
        close_fd(&in[1]);
        close_fd(&out[0]);
        close_fd(&err[0]);
        errno = fork_errno;
        return -1;
    }
    tracked_pid = pid;
    if (setpgid(pid, pid) < 0 && errno != EACCES && errno != ESRCH)
        logmsg("setpgid(%d): %s", (int)pid, strerror(errno)); /* the child does it too */
    child_pgid = pid;
    return pid;
}

/* Take over the parent's pipe ends, all non-blocking. An empty stdin is closed at once. */
static void exec_io_init(struct exec_io *io, const struct exec_req *x, int in_fd, int out_fd, int err_fd)
{
    *io = (struct exec_io){
        .out = {.fd = out_fd},
        .err = {.fd = err_fd},
        .in_fd = in_fd,
        .in_data = x->in_data,
        .in_len = x->in_len,
    };
    if (io->in_len == 0)
        close_fd(&io->in_fd);
    set_nonblock(io->out.fd);
    set_nonblock(io->err.fd);
    if (io->in_fd >= 0)
        set_nonblock(io->in_fd);
}

/* Write the next piece of stdin; close it once all is written or the child closed its end (EPIPE). */
static void exec_feed_stdin(struct exec_io *io)
{
    ssize_t w = write(io->in_fd, io->in_data + io->in_off, io->in_len - io->in_off);
    if (w > 0)
        io->in_off += (size_t)w;
    if ((w < 0 && errno != EINTR && errno != EAGAIN) || io->in_off == io->in_len)
        close_fd(&io->in_fd);
}

/* Wait up to wait_ms for SIGCHLD or a ready pipe, then capture output and feed stdin. */
static void exec_pump(struct exec_io *io, int wait_ms)
{
    struct pollfd p[4] = {
        {.fd = sigchld_pipe[0], .events = POLLIN},
        {.fd = io->out.fd, .events = POLLIN}, /* entries with fd -1 are skipped by poll */
        {.fd = io->err.fd, .events = POLLIN},
        {.fd = io->in_fd, .events = POLLOUT},
    };
    if (poll(p, 4, wait_ms > 0 ? wait_ms : 0) < 0) {
        if (errno != EINTR) {
            logmsg("poll: %s", strerror(errno));
            idle_wait(10);
        }
        return;
    }
    if (p[0].revents)
        drain_sigchld_pipe();
    if (io->out.fd >= 0 && p[1].revents)
        capture_read(&io->out);
    if (io->err.fd >= 0 && p[2].revents)
        capture_read(&io->err);
    if (io->in_fd >= 0 && p[3].revents)
        exec_feed_stdin(io);
}

static void exec_kill_group(pid_t pid)
{
    kill(-pid, SIGKILL); /* the whole process group ... */
    kill(pid, SIGKILL);  /* ... and the child itself, in case setpgid lost a race */
}

/* Advance the loop's deadlines at time now: once the child has exited, drain its pipes only briefly;
 * on timeout, kill its process group. Returns 1 when the loop is over. */
static int exec_tick(struct exec_clock *c, pid_t pid, const struct exec_io *io, int64_t now)
{
    if (tracked_done && !c->exit_seen) {
        /* the child is gone; collect what its leftover descendants still write, briefly */
        c->exit_seen = 1;
        if (!c->finish_by || c->finish_by > now + DRAIN_GRACE_MS)
            c->finish_by = now + DRAIN_GRACE_MS;
    }
    if (!tracked_done && !c->timed_out && now >= c->deadline) {
        c->timed_out = 1;
        exec_kill_group(pid);
        c->finish_by = now + KILL_GRACE_MS;
    }
    return c->finish_by && (now >= c->finish_by || (io->out.fd < 0 && io->err.fd < 0 && tracked_done));
}

/* Move data until the child has exited and its output is drained, or the grace periods ran out.
 * Returns 1 if the child timed out (and was killed). */
static int exec_wait(pid_t pid, struct exec_io *io, double timeout)
{
    struct exec_clock c = {.deadline = now_ms() + (int64_t)(timeout * 1000.0 + 0.5)};
    for (;;) {
        reap_children();
        int64_t now = now_ms();
        if (exec_tick(&c, pid, io, now))
            return c.timed_out;
        int64_t wake = c.finish_by ? c.finish_by : c.deadline;
        exec_pump(io, (int)(wake - now));
    }
}

/* Close the parent's pipe ends, stop tracking the child and record its wait status if it was reaped. */
static void exec_collect(pid_t pid, struct exec_io *io, struct exec_result *res)
{
    close_fd(&io->in_fd);
    close_fd(&io->out.fd);
    close_fd(&io->err.fd);
    child_pgid = 0;
    res->reaped = tracked_done;
    res->status = tracked_status;
    tracked_pid = 0; /* if it never died, the main loop reaps it eventually */
    if (!res->reaped)
        logmsg("exec: child %d did not exit after SIGKILL; giving up on it", (int)pid);
}

static void exec_reply(struct buf *reply, const struct jval *id, const struct exec_io *io,
                       const struct exec_result *res)
{
    const struct buf *o = &io->out.data, *e = &io->err.data;
    if (o->oom || e->oom) {
        reply_error(reply, id, "out of memory");
        return;
    }
    reply->len = 0;
    reply_start(reply, id, 1);
    if (res->reaped && WIFEXITED(res->status))
        buf_fmt(reply, ",\"status\":%d,\"signal\":null", WEXITSTATUS(res->status));
    else if (res->reaped && WIFSIGNALED(res->status))
        buf_fmt(reply, ",\"status\":null,\"signal\":%d", WTERMSIG(res->status));
    else
        buf_str(reply, ",\"status\":null,\"signal\":null");
    buf_str(reply, ",\"stdout\":");
    buf_json_string(reply, o->p ? o->p : "", o->len);
    buf_str(reply, ",\"stderr\":");
    buf_json_string(reply, e->p ? e->p : "", e->len);
    buf_fmt(reply, ",\"timed_out\":%s,\"truncated\":%s}", res->timed_out ? "true" : "false",
            io->out.truncated || io->err.truncated ? "true" : "false");
}

static void cmd_exec(struct buf *reply, const struct jval *req, const struct jval *id)
{
    struct exec_req x;
    const char *bad = exec_parse(req, &x);
    if (bad) {
        reply_error(reply, id, bad);
        return;
    }
    int in[2] = {-1, -1}, out[2] = {-1, -1}, err[2] = {-1, -1};
    int e = exec_open_pipes(in, out, err);
    if (e) {
        free(x.argv);
        reply_errno(reply, id, "exec: pipe", e);
        return;
    }
    pid_t pid = exec_spawn(x.argv, in, out, err);
    e = errno;
    free(x.argv);
    if (pid < 0) {
        reply_errno(reply, id, "exec: fork", e);
        return;
    }
    struct exec_io io;
    struct exec_result res;
    exec_io_init(&io, &x, in[1], out[0], err[0]);
    res.timed_out = exec_wait(pid, &io, x.timeout);
    exec_collect(pid, &io, &res);
    exec_reply(reply, id, &io, &res);
    buf_free(&io.out.data);
    buf_free(&io.err.data);
}

/* ------------------------------------------------------------------ dispatch */

/* Handle one request line; returns 1 if the agent should power off after sending the reply. */
static int handle_line(const char *line, size_t len, struct buf *reply)
{
    reply->len = 0;
    struct parser ps;
    struct jval req;
    if (parse_document(&ps, line, len, &req) < 0) {
        reply_error(reply, NULL, ps.err);
        return 0;
    }
    int poweroff = 0;
    const struct jval *id = NULL;
    if (req.type != J_OBJ) {
        reply_error(reply, NULL, "request must be a JSON object");
        goto out;
    }
    id = jget(&req, "id");
    if (id && (id->type == J_ARR || id->type == J_OBJ)) {
        reply_error(reply, NULL, "\"id\" must be a string, number, boolean or null");
        goto out;
    }
    const struct jval *cmd = jget(&req, "cmd");
    if (!cmd) {
        reply_error(reply, id, "missing \"cmd\"");
        goto out;
    }
    if (cmd->type != J_STR) {
        reply_error(reply, id, "\"cmd\" must be a string");
        goto out;
    }
    if (!strcmp(cmd->str, "ping") && cmd->len == 4) {
        reply_start(reply, id, 1);
        buf_str(reply, ",\"version\":\"" AGENT_VERSION "\"}");
    } else if (!strcmp(cmd->str, "version") && cmd->len == 7) {
        reply_start(reply, id, 1);
        buf_fmt(reply, ",\"version\":\"" AGENT_VERSION "\",\"protocol\":%d,\"pid1\":%s}", PROTOCOL_VERSION,
                is_pid1 ? "true" : "false");
    } else if (!strcmp(cmd->str, "exec") && cmd->len == 4) {
        cmd_exec(reply, &req, id);
    } else if (!strcmp(cmd->str, "poweroff") && cmd->len == 8) {
        if (!is_pid1) {
            reply_error(reply, id, "poweroff is only available when the agent runs as PID 1");
        } else {
            reply_start(reply, id, 1);
            buf_str(reply, "}");
            poweroff = 1;
        }
    } else {
        char msg[128];
        snprintf(msg, sizeof msg, "unknown cmd \"%.64s\"", cmd->str);
        reply_error(reply, id, msg);
    }
out:
    if (reply->oom) {
        buf_free(reply);
        /* may still fail; then nothing is sent */
        buf_str(reply, "{\"ok\":false,\"error\":\"out of memory\"}");
    }
    jfree(&req);
    return poweroff;
}

static void do_poweroff(void)
{
    logmsg("powering off");
    sync();
    if (reboot(RB_POWER_OFF) < 0)
        logmsg("reboot(RB_POWER_OFF): %s", strerror(errno));
}

/* ------------------------------------------------------------------ port discovery */

static int try_open(const char *path, int *last_errno)
{
    int fd = open(path, O_RDWR | O_CLOEXEC | O_NOCTTY);
    if (fd < 0)
        *last_errno = errno;
    return fd;
}

/* Find /dev/<vportNpM> whose sysfs name is PORT_NAME (for systems without udev symlinks). */
static int find_port_in_sysfs(char *path, size_t size)
{
    DIR *d = opendir("/sys/class/virtio-ports");
    if (!d)
        return -1;
    struct dirent *e;
    int found = -1;
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.')
            continue;
        char name_path[PATH_MAX], name[128];
        snprintf(name_path, sizeof name_path, "/sys/class/virtio-ports/%s/name", e->d_name);
        int fd = open(name_path, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
            continue;
        ssize_t r;
        do
            r = read(fd, name, sizeof name - 1);
        while (r < 0 && errno == EINTR);
        close(fd);
        if (r <= 0)
            continue;
        name[r] = '\0';
        name[strcspn(name, "\n")] = '\0';
        if (!strcmp(name, PORT_NAME)) {
            snprintf(path, size, "/dev/%s", e->d_name);
            found = 0;
            break;
        }
    }
    closedir(d);
    return found;
}

/* Open the port, waiting (and reaping) until it appears. Never fails. */
static int open_port(const char *explicit_path)
{
    int logged = 0, last_errno = 0;
    for (;;) {
        int fd = -1;
        char path[PATH_MAX];
        if (explicit_path) {
            snprintf(path, sizeof path, "%s", explicit_path);
            fd = try_open(path, &last_errno);
        } else {
            snprintf(path, sizeof path, "/dev/virtio-ports/" PORT_NAME);
            fd = try_open(path, &last_errno);
            if (fd < 0 && find_port_in_sysfs(path, sizeof path) == 0)
                fd = try_open(path, &last_errno);
        }
        if (fd >= 0) {
            logmsg("serving on %s", path);
            return fd;
        }
        if (!logged) {
            logmsg("waiting for virtio-serial port %s (%s)", explicit_path ? explicit_path : PORT_NAME,
                   strerror(last_errno));
            logged = 1;
        }
        idle_wait(100);
    }
}

/* ------------------------------------------------------------------ PID 1 setup */

static int is_mountpoint(const char *dir)
{
    struct stat a, b;
    char parent[PATH_MAX];
    snprintf(parent, sizeof parent, "%s/..", dir);
    if (stat(dir, &a) < 0 || stat(parent, &b) < 0)
        return 0;
    return a.st_dev != b.st_dev || a.st_ino == b.st_ino;
}

static void mount_api_filesystems(void)
{
    static const struct {
        const char *src, *dir, *type, *opts;
        unsigned long flags;
    } m[] = {
        {"proc", "/proc", "proc", NULL, MS_NOSUID | MS_NODEV | MS_NOEXEC},
        {"sysfs", "/sys", "sysfs", NULL, MS_NOSUID | MS_NODEV | MS_NOEXEC},
        {"devtmpfs", "/dev", "devtmpfs", "mode=0755", MS_NOSUID},
        {"tmpfs", "/run", "tmpfs", "mode=0755", MS_NOSUID | MS_NODEV},
    };
    for (size_t i = 0; i < sizeof m / sizeof m[0]; i++) {
        if (mkdir(m[i].dir, 0755) < 0 && errno != EEXIST)
            logmsg("mkdir %s: %s", m[i].dir, strerror(errno));
        if (is_mountpoint(m[i].dir))
            continue;
        if (mount(m[i].src, m[i].dir, m[i].type, m[i].flags, m[i].opts) < 0 && errno != EBUSY)
            logmsg("mount %s on %s: %s", m[i].type, m[i].dir, strerror(errno));
    }
}

/* Make sure fds 0-2 are open so later pipes never land on them. */
static void ensure_std_fds(void)
{
    for (int fd = 0; fd < 3; fd++) {
        if (fcntl(fd, F_GETFD) >= 0 || errno != EBADF)
            continue;
        int n = open("/dev/null", O_RDWR);
        if (n < 0) {
            int p[2];
            if (pipe(p) == 0) { /* no /dev/null yet: any open fd will do */
                n = p[0];
                if (p[1] != fd)
                    close(p[1]);
            }
        }
        if (n >= 0 && n != fd) {
            dup2(n, fd);
            close(n);
        }
    }
}

static void setup_signals(void)
{
    if (pipe2(sigchld_pipe, O_CLOEXEC | O_NONBLOCK) < 0) {
        logmsg("pipe2: %s", strerror(errno));
        if (!is_pid1)
            exit(1);
        for (;;) /* cannot work without it; as PID 1 we must never exit */
            pause();
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART | SA_NOCLDSTOP;
    sa.sa_handler = on_sigchld;
    sigaction(SIGCHLD, &sa, NULL);
    sa.sa_flags = SA_RESTART;
    sa.sa_handler = SIG_IGN;
    sigaction(SIGPIPE, &sa, NULL);
    if (is_pid1) {
        sa.sa_handler = on_forward;
        sigaction(SIGTERM, &sa, NULL);
        sigaction(SIGINT, &sa, NULL);
        sigaction(SIGHUP, &sa, NULL);
    }
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
}

/* ------------------------------------------------------------------ main loop */

static void usage(FILE *f)
{
    fprintf(f, "usage: osbuilder-agent [--port PATH] [--fd N] [--no-mount] [--version]\n"
               "Serves newline-delimited JSON requests on the virtio-serial port " PORT_NAME ".\n");
}

int main(int argc, char **argv)
{
    const char *port_path = NULL;
    int use_fd = -1, no_mount = 0;
    is_pid1 = getpid() == 1;

    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--version")) {
            printf("osbuilder-agent " AGENT_VERSION "\n");
            return 0;
        } else if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(stdout);
            return 0;
        } else if (!strcmp(a, "--no-mount")) {
            no_mount = 1;
        } else if (!strcmp(a, "--port") && i + 1 < argc) {
            port_path = argv[++i];
        } else if (!strcmp(a, "--fd") && i + 1 < argc) {
            char *end;
            errno = 0;
            long v = strtol(argv[++i], &end, 10);
            if (errno || *end || end == argv[i] || v < 0 || v > INT_MAX) {
                fprintf(stderr, "osbuilder-agent: bad --fd value '%s'\n", argv[i]);
                if (!is_pid1)
                    return 2;
                continue;
            }
            use_fd = (int)v;
        } else if (is_pid1) {
            /* the kernel passes unrecognised boot parameters to init: ignore them */
            logmsg("ignoring argument '%s'", a);
        } else {
            usage(stderr);
            return 2;
        }
    }

    if (is_pid1) {
        if (!no_mount)
            mount_api_filesystems();
        if (chdir("/") < 0)
            logmsg("chdir /: %s", strerror(errno));
    }
    ensure_std_fds();
    if (!getenv("PATH"))
        setenv("PATH", DEFAULT_PATH, 1);
    setup_signals();
    logmsg("version %s starting%s", AGENT_VERSION, is_pid1 ? " as PID 1" : "");

    int fd;
    if (use_fd >= 0) {
        fd = use_fd;
        if (fcntl(fd, F_SETFD, FD_CLOEXEC) < 0) {
            logmsg("--fd %d: %s", fd, strerror(errno));
            if (!is_pid1)
                return 2;
            fd = -1;
        }
    } else {
        fd = open_port(port_path);
    }

    static char line[MAX_LINE + 1];
    static char chunk[65536];
    size_t line_len = 0;
    int discarding = 0, write_err_logged = 0;
    struct buf reply = {0};

    for (;;) {
        if (fd < 0) { /* --fd peer gone while PID 1: nothing left to serve, keep reaping */
            idle_wait(60000);
            continue;
        }
        struct pollfd p[2] = {{.fd = fd, .events = POLLIN}, {.fd = sigchld_pipe[0], .events = POLLIN}};
        int r = poll(p, 2, -1);
        reap_children();
        if (r < 0) {
            if (errno != EINTR) {
                logmsg("poll: %s", strerror(errno));
                idle_wait(RETRY_MS);
            }
            continue;
        }
        if (p[1].revents)
            drain_sigchld_pipe();
        if (!p[0].revents)
            continue;
        if (p[0].revents & POLLNVAL) {
            logmsg("port fd became invalid");
            if (use_fd >= 0) {
                if (!is_pid1)
                    return 1;
                fd = -1;
            } else {
                fd = open_port(port_path);
            }
            continue;
        }
        ssize_t n = read(fd, chunk, sizeof chunk);
        if (n < 0) {
            if (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK)
                continue;
            logmsg("read: %s", strerror(errno));
            line_len = 0;
            discarding = 0;
            if (use_fd >= 0) {
                if (!is_pid1)
                    return 1;
                close_fd(&fd);
            } else { /* e.g. the device was unplugged: find it again */
                close_fd(&fd);
                idle_wait(RETRY_MS);
                fd = open_port(port_path);
            }
            continue;
        }
        if (n == 0) {
            /* --fd: the peer closed. Port: the host side is not connected (virtio-serial
             * returns EOF and polls POLLHUP until it is), so back off instead of spinning. */
            line_len = 0;
            discarding = 0;
            if (use_fd >= 0) {
                if (!is_pid1)
                    return 0;
                logmsg("peer closed fd %d; PID 1 keeps running", fd);
                close_fd(&fd);
            } else {
                idle_wait(RETRY_MS);
            }
            continue;
        }
        const char *s = chunk;
        size_t left = (size_t)n;
        while (left) {
            const char *nl = memchr(s, '\n', left);
            size_t seg = nl ? (size_t)(nl - s) : left;
            if (!discarding) {
                if (line_len + seg > MAX_LINE)
                    discarding = 1;
                else {
                    memcpy(line + line_len, s, seg);
                    line_len += seg;
                }
            }
            s += seg;
            left -= seg;
            if (!nl)
                break;
            s++; /* the newline */
            left--;
            int poweroff = 0;
            if (discarding) {
                reply.len = 0;
                reply_error(&reply, NULL, "request line longer than 65536 bytes");
            } else {
                size_t k = 0;
                while (k < line_len && (line[k] == ' ' || line[k] == '\t' || line[k] == '\r'))
                    k++;
                if (k == line_len) { /* blank line: ignored (clients send one to resync) */
                    line_len = 0;
                    continue;
                }
                poweroff = handle_line(line, line_len, &reply);
            }
            line_len = 0;
            discarding = 0;
            buf_add(&reply, "\n", 1);
            if (!reply.oom && write_all(fd, reply.p, reply.len) < 0) {
                if (!write_err_logged)
                    logmsg("write reply: %s (host not connected?); dropping it", strerror(errno));
                write_err_logged = 1;
            } else {
                write_err_logged = 0;
            }
            if (reply.cap > 4 * MAX_LINE) /* do not keep a multi-MiB exec reply around */
                buf_free(&reply);
            if (poweroff)
                do_poweroff();
        }
    }
}
