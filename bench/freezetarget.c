/* A target for bench_freeze.py: MIB MiB of data, NTHREADS threads all idle (or busy) the same way.
 *
 *   freezetarget MODE NTHREADS MIB      MODE: sigwait | nanosleep | read | busy | dirty
 *
 * Prints "ready PID" once every thread is in place, then the main thread idles like the others
 * (read mode: main reads stdin, which the bench never writes; workers read a pipe nobody writes).
 * Busy threads each write 8 pages of their own in a loop. dirty: like read, but the main thread takes
 * commands on stdin: "write PERMILLE" writes new bytes into that many pages per thousand (evenly
 * spread) and answers "written N"; "stream RATE" starts a thread writing RATE pages a millisecond all over
 * the region (a busy writer) and answers "streaming RATE".
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static const char *mode;
static int idle_pipe[2];
static volatile int started;
static unsigned char *mem;
static size_t npages;

static void idle(void) {
    if (!strcmp(mode, "sigwait")) {
        sigset_t s;
        sigemptyset(&s);
        sigaddset(&s, SIGUSR1);
        for (;;) sigwaitinfo(&s, NULL);
    } else if (!strcmp(mode, "nanosleep")) {
        struct timespec ts = {3600, 0};
        for (;;) clock_nanosleep(CLOCK_MONOTONIC, 0, &ts, NULL);
    } else if (!strcmp(mode, "read") || !strcmp(mode, "dirty")) {
        char c;
        for (;;) (void)!read(idle_pipe[0], &c, 1);
    } else {
        /* Busy, and writing: 8 pages of its own, so an incremental dump has some dirty pages. */
        static volatile int next;
        int me = __atomic_fetch_add(&next, 1, __ATOMIC_SEQ_CST);
        for (unsigned long x = 0;; x++)
            for (int k = 0; k < 8; k++) mem[(((size_t)me * 8 + k) % npages) * 4096 + 8] = (unsigned char)x;
    }
}

static volatile long stream_rate;

/* A busy writer for the pre-copy bench: stream_rate pages a millisecond, spread over the whole region
 * (a stride prime to its size), for as long as the process lives. */
static void *streamer(void *arg) {
    (void)arg;
    size_t p = 0;
    struct timespec ms = {0, 1000000};
    for (unsigned long x = 1;; x++) {
        for (long k = 0; k < stream_rate; k++) {
            p = (p + 7919) % npages;
            ((volatile unsigned long *)(mem + p * 4096))[1] = x;
        }
        nanosleep(&ms, NULL);
    }
    return NULL;
}

static void *worker(void *arg) {
    (void)arg;
    __atomic_add_fetch(&started, 1, __ATOMIC_SEQ_CST);
    idle();
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 4) { fprintf(stderr, "usage: freezetarget MODE NTHREADS MIB\n"); return 2; }
    mode = argv[1];
    int nthreads = atoi(argv[2]);
    size_t mib = (size_t)atol(argv[3]);
    setvbuf(stdout, NULL, _IOLBF, 0);
    sigset_t s;
    sigemptyset(&s);
    sigaddset(&s, SIGUSR1);
    pthread_sigmask(SIG_BLOCK, &s, NULL);  /* inherited by the workers: sigwaitinfo needs it blocked */
    if (pipe(idle_pipe)) return 1;
    npages = mib * 256;
    mem = mmap(NULL, npages * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) return 1;
    unsigned long x = 88172645463325252UL;
    for (size_t i = 0; i < npages * 4096 / 8; i++) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        ((unsigned long *)mem)[i] = x;
    }
    for (int i = 1; i < nthreads; i++) {
        pthread_t t;
        pthread_create(&t, NULL, worker, NULL);
    }
    while (__atomic_load_n(&started, __ATOMIC_SEQ_CST) < nthreads - 1) sched_yield();
    printf("ready %d\n", getpid());
    if (!strcmp(mode, "read")) {
        char c;
        for (;;) if (read(0, &c, 1) != 1) return 0;  /* the bench never writes: idle, until EOF */
    }
    if (!strcmp(mode, "dirty")) {
        char line[64];
        size_t n = 0;
        for (;;) {
            if (read(0, line + n, 1) != 1) return 0;
            if (line[n] != '\n' && n + 2 < sizeof line) { n++; continue; }
            line[n] = 0;
            n = 0;
            if (line[0] == 's') {  /* "stream RATE": a thread writes RATE pages every ms from now on */
                static pthread_t w;
                stream_rate = atol(line + 7);
                if (!w) pthread_create(&w, NULL, streamer, NULL);
                printf("streaming %ld\n", stream_rate);
                continue;
            }
            long permille = atol(line + 6), written = 0;
            for (size_t i = 0; permille > 0 && i < npages; i += (size_t)(1000 / permille), written++) {
                x ^= x << 13; x ^= x >> 7; x ^= x << 17;
                ((unsigned long *)(mem + i * 4096))[0] = x;
            }
            printf("written %ld\n", written);
        }
    }
    idle();
}
