/*
 * osbuilder-boot-init: the /init of the small initrd osbuilder makes for Debian's kernel
 * (osbuilder/vm/boot_initrd.py), so that it boots images that carry no /lib/modules.
 *
 * 1. Mounts devtmpfs on /dev (the console for stdio) and proc on /proc (the command line).
 * 2. Loads every module in /lib/modules with finit_module(), in name order: the builder numbered
 *    them in dependency order, uncompressed. A module already present (EEXIST) is fine; any other
 *    failure is a warning line, and the boot goes on (a missing driver shows later, named).
 * 3. Waits for the device named by root= (a /dev path) for rootdelay= seconds (default 30).
 * 4. Mounts it on /root as rootfstype= (else each type of /proc/filesystems) with rootflags= and
 *    read-only unless rw, moves /dev and /proc into it and makes it the root (switch_root).
 * 5. Runs init= (default /sbin/init) with the arguments the kernel gave this program.
 *
 * Every line it prints starts with "osbuilder-init: "; a failure that stops the boot says
 * "osbuilder-init: error: ..." (osbuilder's console watcher matches it), waits for the console
 * to show it, and exits, which makes the kernel panic. Modules loaded here stay loaded after the
 * switch: the guest keeps its disk or NVDIMM, virtio-serial port, network and power button.
 *
 * Build: gcc -static -Os -Wall -Wextra -Werror -std=gnu11 -s -o init boot_init.c
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define MODULES_DIR "/lib/modules"
#define NEW_ROOT "/root"
#define DEFAULT_INIT "/sbin/init"
#define DEFAULT_ROOT_DELAY 30 /* seconds to wait for the root device */
#define POLL_MS 10
#define MAX_CMDLINE 4096

struct boot_params {
    const char *root;
    const char *rootfstype;
    const char *rootflags;
    const char *init;
    int read_only;
    int root_delay;
};

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...)
{
    char line[1024];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line - 1, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if ((size_t)n > sizeof line - 2)
        n = sizeof line - 2;
    line[n++] = '\n';
    if (write(STDOUT_FILENO, "osbuilder-init: ", 16) == 16)
        (void)!write(STDOUT_FILENO, line, (size_t)n);
}

/* A failure that stops the boot: the line reaches the console before the kernel panics. */
static void fail(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void fail(const char *fmt, ...)
{
    char line[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    say("error: %s", line);
    tcdrain(STDOUT_FILENO);
    exit(1);
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* As the booted system mounts them itself: it keeps them (switch_root moves them into its root). */
static void mount_api(const char *type, const char *dir, unsigned long flags)
{
    mkdir(dir, 0755);
    if (mount(type, dir, type, flags, NULL) != 0 && errno != EBUSY)
        fail("cannot mount %s on %s: %s", type, dir, strerror(errno));
}

static void console_stdio(void)
{
    int fd = open("/dev/console", O_RDWR | O_NOCTTY);
    if (fd < 0)
        return; /* keep what the kernel gave us */
    for (int i = 0; i < 3; i++)
        dup2(fd, i);
    if (fd > 2)
        close(fd);
}

/* The next word of a kernel command line (double quotes group and are dropped, as the kernel does). */
static char *next_word(char **cursor)
{
    char *in = *cursor, *out;
    while (*in == ' ' || *in == '\t' || *in == '\n')
        in++;
    if (!*in)
        return NULL;
    char *word = out = in;
    int quoted = 0;
    for (; *in && (quoted || (*in != ' ' && *in != '\t' && *in != '\n')); in++) {
        if (*in == '"')
            quoted = !quoted;
        else
            *out++ = *in;
    }
    if (*in)
        in++;
    *out = '\0';
    *cursor = in;
    return word;
}

static void read_cmdline(struct boot_params *p, char *buf, size_t size)
{
    int fd = open("/proc/cmdline", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        fail("cannot read /proc/cmdline: %s", strerror(errno));
    ssize_t n = read(fd, buf, size - 1);
    close(fd);
    buf[n > 0 ? n : 0] = '\0';
    char *cursor = buf, *word;
    while ((word = next_word(&cursor)) != NULL) {
        if (strcmp(word, "--") == 0)
            break; /* the rest is for init */
        if (strncmp(word, "root=", 5) == 0)
            p->root = word + 5;
        else if (strncmp(word, "rootfstype=", 11) == 0)
            p->rootfstype = word + 11;
        else if (strncmp(word, "rootflags=", 10) == 0)
            p->rootflags = word + 10;
        else if (strncmp(word, "init=", 5) == 0)
            p->init = word + 5;
        else if (strncmp(word, "rootdelay=", 10) == 0)
            p->root_delay = atoi(word + 10);
        else if (strcmp(word, "ro") == 0)
            p->read_only = 1;
        else if (strcmp(word, "rw") == 0)
            p->read_only = 0;
    }
}

static int is_module(const struct dirent *entry)
{
    size_t len = strlen(entry->d_name);
    return len > 3 && strcmp(entry->d_name + len - 3, ".ko") == 0;
}

static void load_modules(void)
{
    struct dirent **names;
    double started = now();
    int n = scandir(MODULES_DIR, &names, is_module, alphasort);
    if (n < 0) {
        say("warning: no %s: %s; no modules loaded", MODULES_DIR, strerror(errno));
        return;
    }
    int loaded = 0;
    for (int i = 0; i < n; i++) {
        char path[512];
        snprintf(path, sizeof path, "%s/%s", MODULES_DIR, names[i]->d_name);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0) {
            say("warning: cannot open module %s: %s", path, strerror(errno));
        } else {
            if (syscall(SYS_finit_module, fd, "", 0) == 0)
                loaded++;
            else if (errno != EEXIST)
                say("warning: cannot load module %s: %s", names[i]->d_name, strerror(errno));
            close(fd);
        }
        unlink(path); /* the initramfs is memory: free it */
        free(names[i]);
    }
    free(names);
    say("loaded %d of %d modules in %.2fs", loaded, n, now() - started);
}

static void wait_for_root(const struct boot_params *p)
{
    if (!p->root)
        fail("no root= on the kernel command line");
    if (strncmp(p->root, "/dev/", 5) != 0)
        fail("root=%s: only a device path (/dev/...) is supported", p->root);
    double started = now(), deadline = started + p->root_delay;
    struct stat st;
    while (stat(p->root, &st) != 0 || !S_ISBLK(st.st_mode)) {
        if (now() >= deadline)
            fail("root device %s did not appear within %ds (root=, rootdelay=)", p->root, p->root_delay);
        usleep(POLL_MS * 1000);
    }
    if (now() - started > 0.1)
        say("root device %s appeared after %.2fs", p->root, now() - started);
}

static int try_mount(const struct boot_params *p, const char *type, unsigned long flags)
{
    if (mount(p->root, NEW_ROOT, type, flags, p->rootflags) == 0) {
        say("mounted %s (%s, %s%s%s) on %s", p->root, type, p->read_only ? "ro" : "rw",
            p->rootflags ? "," : "", p->rootflags ? p->rootflags : "", NEW_ROOT);
        return 1;
    }
    return 0;
}

/* Each type of /proc/filesystems that needs a device, as the kernel tries them without rootfstype=. */
static int mount_any_type(const struct boot_params *p, unsigned long flags)
{
    FILE *f = fopen("/proc/filesystems", "re");
    char line[128];
    int mounted = 0;
    while (f && !mounted && fgets(line, sizeof line, f)) {
        if (strncmp(line, "nodev", 5) == 0)
            continue;
        line[strcspn(line, "\n")] = '\0';
        mounted = try_mount(p, line + strspn(line, " \t"), flags);
    }
    if (f)
        fclose(f);
    return mounted;
}

static void mount_root(const struct boot_params *p)
{
    unsigned long flags = p->read_only ? MS_RDONLY : 0;
    mkdir(NEW_ROOT, 0755);
    if (!p->rootfstype) {
        if (!mount_any_type(p, flags))
            fail("cannot mount root device %s as any filesystem type of /proc/filesystems (rootflags=%s)",
                 p->root, p->rootflags ? p->rootflags : "");
        return;
    }
    char types[256];
    snprintf(types, sizeof types, "%s", p->rootfstype);
    int err = 0;
    for (char *save, *type = strtok_r(types, ",", &save); type; type = strtok_r(NULL, ",", &save)) {
        if (try_mount(p, type, flags))
            return;
        err = errno;
    }
    fail("cannot mount root device %s as %s (rootflags=%s): %s", p->root, p->rootfstype,
         p->rootflags ? p->rootflags : "", strerror(err));
}

/* /dev and /proc go along into the new root (or away); then it becomes / . */
static void switch_root(void)
{
    const char *api[] = {"/dev", "/proc"};
    for (size_t i = 0; i < sizeof api / sizeof api[0]; i++) {
        char target[64];
        snprintf(target, sizeof target, NEW_ROOT "%s", api[i]);
        if (mount(api[i], target, NULL, MS_MOVE, NULL) != 0)
            umount2(api[i], MNT_DETACH);
    }
    unlink("/init");
    if (chdir(NEW_ROOT) != 0 || mount(".", "/", NULL, MS_MOVE, NULL) != 0 || chroot(".") != 0 ||
        chdir("/") != 0)
        fail("cannot switch the root to %s: %s", NEW_ROOT, strerror(errno));
}

int main(int argc, char **argv)
{
    (void)argc;
    static char cmdline[MAX_CMDLINE];
    struct boot_params p = {.init = DEFAULT_INIT, .read_only = 1, .root_delay = DEFAULT_ROOT_DELAY};

    mount_api("devtmpfs", "/dev", MS_NOSUID);
    console_stdio();
    mount_api("proc", "/proc", MS_NOSUID | MS_NODEV | MS_NOEXEC);
    read_cmdline(&p, cmdline, sizeof cmdline);
    load_modules();
    wait_for_root(&p);
    mount_root(&p);
    switch_root();
    if (access(p.init, X_OK) != 0)
        fail("no init to run: the root filesystem doesn't have requested %s (%s)", p.init, strerror(errno));
    say("running %s", p.init);
    argv[0] = (char *)p.init;
    execv(p.init, argv);
    fail("cannot run %s: %s", p.init, strerror(errno));
}
