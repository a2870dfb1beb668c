/* N threads (argv[1]), each with a thread keyring of its own (keyctl KEYCTL_GET_KEYRING_ID, create):
 * "ready" once all have one; each line read is answered "pong". */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <unistd.h>
#include "lineio.h"

static pthread_barrier_t all;

static void *thread(void *arg) {
    (void)arg;
    if (syscall(SYS_keyctl, 0, -1L, 1L) < 0) {  /* KEYCTL_GET_KEYRING_ID, KEY_SPEC_THREAD_KEYRING */
        perror("keyctl");
        exit(1);
    }
    pthread_barrier_wait(&all);
    for (;;) pause();
}

int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 70;
    pthread_barrier_init(&all, NULL, n + 1);
    for (int i = 0; i < n; i++) {
        pthread_t t;
        if (pthread_create(&t, NULL, thread, NULL)) return 1;
    }
    pthread_barrier_wait(&all);
    printf("ready %d\n", n);
    fflush(stdout);
    char line[64];
    while (read_command(line, sizeof line)) {
        printf("pong\n");
        fflush(stdout);
    }
    return 0;
}
