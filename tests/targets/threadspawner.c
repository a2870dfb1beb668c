/* A target whose threads come and go all the time, to catch threads created while a freeze attaches.
 *
 * A spawner thread creates short-lived detached workers in a loop (at most MAX_ALIVE at once); one
 * worker in four creates another worker before it exits, so new threads also come from threads
 * other than the spawner. The main thread blocks in read(0) and answers:
 *   count   -> "created N alive M"
 *   exit    -> exit(0)
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "lineio.h"

#define MAX_ALIVE 12
static volatile long created, alive;

static void *worker(void *arg);

static void spawn_one(void) {
    if (__atomic_load_n(&alive, __ATOMIC_RELAXED) >= MAX_ALIVE) { sched_yield(); return; }
    pthread_attr_t a;
    pthread_attr_init(&a);
    pthread_attr_setdetachstate(&a, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&a, 64 * 1024);
    pthread_t t;
    __atomic_add_fetch(&alive, 1, __ATOMIC_RELAXED);
    if (pthread_create(&t, &a, worker, NULL)) __atomic_sub_fetch(&alive, 1, __ATOMIC_RELAXED);
    else __atomic_add_fetch(&created, 1, __ATOMIC_RELAXED);
    pthread_attr_destroy(&a);
}

static void *worker(void *arg) {
    (void)arg;
    volatile unsigned long x = 0;
    for (int i = 0; i < 20000; i++) x += (unsigned long)i;
    if (__atomic_load_n(&created, __ATOMIC_RELAXED) % 4 == 0) spawn_one();
    __atomic_sub_fetch(&alive, 1, __ATOMIC_RELAXED);
    return NULL;
}

static void *spawner(void *arg) {
    (void)arg;
    for (;;) spawn_one();
    return NULL;
}

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    pthread_t s;
    pthread_create(&s, NULL, spawner, NULL);
    while (__atomic_load_n(&created, __ATOMIC_RELAXED) < 100) sched_yield();
    printf("ready %d\n", getpid());
    char line[64];
    for (;;) {
        if (!read_command(line, sizeof line)) return 0;
        if (!strncmp(line, "count", 5)) printf("created %ld alive %ld\n", created, alive);
        else if (!strncmp(line, "exit", 4)) return 0;
        else puts("unknown");
    }
}
