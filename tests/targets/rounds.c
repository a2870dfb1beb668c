/* A single-threaded restore target: numbered rounds of work on a memory region, driven by commands.
 *
 * usage: rounds NPAGES [FILE [LOG [EXTRAS]]]
 * It maps NPAGES anonymous pages and fills them from a fixed seed; maps FILE (optional) privately and
 * changes one of its pages; opens LOG (optional) with O_APPEND; keeps a read-only region and a
 * PROT_NONE guard. Between commands it blocks in read(0), so a dump finds it inside a syscall.
 * EXTRAS is a comma-separated list of resources restore does not support, to test its refusals:
 * socket (a socketpair), pipe (a pipe on fds above 2), shm (shared anonymous memory), sysv (a SysV
 * shared memory segment, removed at once so none is left behind), thread (a second thread), tcp (a
 * TCP socket listening on 127.0.0.1; socketpairs and pipes are restored since issue 12 B1/B5).
 * Everything is deterministic: two runs given the same commands print the same lines.
 *
 * Commands (one per line on stdin, one line of answer on stdout):
 *   info              -> "pid N region ADDR npages N brk ADDR"
 *   round             -> one more round of writes; "round R sum HEX"
 *   sum               -> "sum HEX": FNV-1a 64 over the region, the read-only region, the file
 *                        mapping, the heap grown by `grow`, and the round counter
 *   grow N            -> sbrk(N) and fill the new bytes -> "brk ADDR"
 *   sleep MS          -> nanosleep(MS) (restarted on EINTR with the time left) -> "slept"
 *   sigwait           -> sigwaitinfo for SIGUSR1 (blocked since start) -> "sig N"
 *   pause             -> pause() until SIGUSR2 (a handler counts it) -> "paused N"
 *   log TEXT          -> TEXT appended to LOG -> "ok"
 *   fread N           -> read N bytes from FILE through an fd kept open since the start
 *                        -> "fread OFFSET HEX" (the offset after, FNV-1a of the bytes)
 *   mix               -> the whole region rewritten: 1/4 random, 1/4 zeros, 1/2 text -> "ok"
 *                        (the mixed data of the benchmarks)
 *   exit N            -> exit(N)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/ipc.h>
#include <sys/mman.h>
#include <sys/shm.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define PG 4096
static unsigned char *region, *rodata, *fmap, *heap0;
static size_t npages, fpages, heap_len;
static uint64_t rng = 0x9E3779B97F4A7C15ull;
static unsigned long rounds_done;
static volatile sig_atomic_t usr2_count;
static int logfd = -1, datafd = -1;

static uint64_t next_rand(void) {
    rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
    return rng;
}

static void fill_random(unsigned char *p, size_t n) {
    for (size_t i = 0; i + 8 <= n; i += 8) { uint64_t r = next_rand(); memcpy(p + i, &r, 8); }
}

static uint64_t fnv(uint64_t h, const unsigned char *p, size_t n) {
    for (size_t i = 0; i < n; i++) { h ^= p[i]; h *= 0x100000001b3ull; }
    return h;
}

static uint64_t checksum(void) {
    uint64_t h = 0xcbf29ce484222325ull;
    h = fnv(h, region, npages * PG);
    h = fnv(h, rodata, 4 * PG);
    if (fmap) h = fnv(h, fmap, fpages * PG);
    if (heap_len) h = fnv(h, heap0, heap_len);
    h = fnv(h, (unsigned char *)&rounds_done, sizeof rounds_done);
    return h;
}

static void *idle_thread(void *arg) { (void)arg; for (;;) pause(); return NULL; }

static void add_extras(const char *list) {
    int fds[2];
    pthread_t th;
    if (strstr(list, "socket") && socketpair(AF_UNIX, SOCK_STREAM, 0, fds) < 0) _exit(5);
    if (strstr(list, "pipe") && pipe(fds) < 0) _exit(5);
    if (strstr(list, "shm")) {
        unsigned char *p = mmap(NULL, PG, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) _exit(5);
        p[0] = 1;
    }
    if (strstr(list, "sysv")) {
        int id = shmget(IPC_PRIVATE, PG, IPC_CREAT | 0600);
        if (id < 0) _exit(5);
        unsigned char *p = shmat(id, NULL, 0);
        shmctl(id, IPC_RMID, NULL);
        if (p == (void *)-1) _exit(5);
        p[0] = 1;
    }
    if (strstr(list, "thread") && pthread_create(&th, NULL, idle_thread, NULL)) _exit(5);
    if (strstr(list, "tcp")) {
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
        int s = socket(AF_INET, SOCK_STREAM, 0);
        if (s < 0 || bind(s, (struct sockaddr *)&a, sizeof a) || listen(s, 1)) _exit(5);
    }
}

static void on_usr2(int sig) { (void)sig; usr2_count++; }

static void reply(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void reply(const char *fmt, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf - 1, fmt, ap);
    va_end(ap);
    buf[n++] = '\n';
    for (int off = 0; off < n;) {
        ssize_t w = write(1, buf + off, n - off);
        if (w < 0) { if (errno == EINTR) continue; _exit(3); }
        off += w;
    }
}

static int read_line(char *buf, size_t cap) {
    size_t n = 0;
    while (n + 1 < cap) {
        char c;
        ssize_t r = read(0, &c, 1);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return -1;
        if (c == '\n') break;
        buf[n++] = c;
    }
    buf[n] = 0;
    return (int)n;
}

int main(int argc, char **argv) {
    npages = argc > 1 ? strtoul(argv[1], NULL, 0) : 256;
    region = mmap(NULL, npages * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (region == MAP_FAILED) return 1;
    fill_random(region, npages / 2 * PG);  /* the upper half stays untouched: not present */
    rodata = mmap(NULL, 6 * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    fill_random(rodata, 4 * PG);
    mprotect(rodata, 4 * PG, PROT_READ);
    mprotect(rodata + 4 * PG, 2 * PG, PROT_NONE);
    if (argc > 2 && argv[2][0]) {
        int fd = open(argv[2], O_RDONLY);
        if (fd < 0) return 2;
        fpages = (size_t)(lseek(fd, 0, SEEK_END) / PG);
        lseek(fd, 0, SEEK_SET);
        fmap = mmap(NULL, fpages * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
        datafd = fd;  /* kept open: its offset is state a restore must bring back */
        if (fmap == MAP_FAILED) return 2;
        if (fpages > 1) memset(fmap + PG, 0x5a, PG);  /* one COW page; the others stay the file's */
        mprotect(fmap, PG, PROT_READ);
    }
    if (argc > 3 && argv[3][0]) {
        logfd = open(argv[3], O_WRONLY | O_CREAT | O_APPEND, 0600);
        if (logfd < 0) return 4;
    }
    if (argc > 4) add_extras(argv[4]);
    sigset_t usr1;
    sigemptyset(&usr1);
    sigaddset(&usr1, SIGUSR1);
    sigprocmask(SIG_BLOCK, &usr1, NULL);
    struct sigaction sa = {0};
    sa.sa_handler = on_usr2;
    sigaction(SIGUSR2, &sa, NULL);
    heap0 = sbrk(0);

    reply("ready %d", getpid());
    char line[256];
    while (read_line(line, sizeof line) >= 0) {
        if (!strcmp(line, "info")) {
            reply("pid %d region %p npages %zu brk %p", getpid(), (void *)region, npages, sbrk(0));
        } else if (!strcmp(line, "round")) {
            rounds_done++;
            for (size_t i = rounds_done % 7; i < npages; i += 7) fill_random(region + i * PG, 64);
            reply("round %lu sum %016llx", rounds_done, (unsigned long long)checksum());
        } else if (!strcmp(line, "sum")) {
            reply("sum %016llx", (unsigned long long)checksum());
        } else if (!strncmp(line, "grow ", 5)) {
            size_t n = strtoul(line + 5, NULL, 0);
            unsigned char *p = sbrk(n);
            if (p == (void *)-1) { reply("error %d", errno); continue; }
            fill_random(p, n);
            heap_len += n;
            reply("brk %p", sbrk(0));
        } else if (!strncmp(line, "sleep ", 6)) {
            long ms = strtol(line + 6, NULL, 0);
            struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L}, rem;
            while (nanosleep(&ts, &rem) < 0 && errno == EINTR) ts = rem;
            reply("slept");
        } else if (!strcmp(line, "sigwait")) {
            siginfo_t si;
            int s;
            do s = sigwaitinfo(&usr1, &si); while (s < 0 && errno == EINTR);
            reply("sig %d", s);
        } else if (!strcmp(line, "pause")) {
            sig_atomic_t before = usr2_count;
            while (usr2_count == before) pause();
            reply("paused %d", (int)usr2_count);
        } else if (!strncmp(line, "log ", 4)) {
            if (logfd < 0 || write(logfd, line + 4, strlen(line + 4)) < 0 || write(logfd, "\n", 1) < 0)
                reply("error");
            else
                reply("ok");
        } else if (!strncmp(line, "fread ", 6)) {
            unsigned char buf[4096];
            size_t n = strtoul(line + 6, NULL, 0);
            ssize_t r = read(datafd, buf, n > sizeof buf ? sizeof buf : n);
            if (r < 0) { reply("error %d", errno); continue; }
            reply("fread %ld %016llx", (long)lseek(datafd, 0, SEEK_CUR),
                  (unsigned long long)fnv(0xcbf29ce484222325ull, buf, (size_t)r));
        } else if (!strcmp(line, "mix")) {
            static const char words[] = "the quick brown fox jumps over the lazy dog; checkpoint restore page ";
            fill_random(region, npages / 4 * PG);
            memset(region + npages / 4 * PG, 0, npages / 4 * PG);
            for (size_t i = npages / 2 * PG; i < npages * PG; i++)
                region[i] = (unsigned char)words[(i / 7 + i) % (sizeof(words) - 1)];
            reply("ok");
        } else if (!strncmp(line, "exit ", 5)) {
            exit(atoi(line + 5));
        } else {
            reply("unknown %s", line);
        }
    }
    return 0;
}
