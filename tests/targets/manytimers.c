/* N POSIX timers (argv[1]), SIGEV_NONE, armed with an interval of its own each: enough calls that a
 * dump's questions to the leader take several injected runs. Commands: "check" says "ok" when each
 * timer is still there with its interval; "map K" maps K separate anonymous mappings and touches them. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <time.h>
#include <sys/mman.h>
#include "lineio.h"

#define MAXT 512

int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 60;
    static timer_t ids[MAXT];
    if (n < 0 || n > MAXT) return 2;
    for (int i = 0; i < n; i++) {
        struct sigevent sev = {.sigev_notify = SIGEV_NONE};
        struct itimerspec its = {.it_interval = {1000 + i, 0}, .it_value = {100000 + i, 0}};
        if (timer_create(CLOCK_MONOTONIC, &sev, &ids[i]) || timer_settime(ids[i], 0, &its, NULL)) {
            perror("timer");
            return 1;
        }
    }
    printf("ready %d\n", n);
    fflush(stdout);
    char line[128];
    while (read_command(line, sizeof line)) {
        if (!strncmp(line, "check", 5)) {
            int bad = -1;
            for (int i = 0; i < n && bad < 0; i++) {
                struct itimerspec its;
                if (timer_gettime(ids[i], &its) || its.it_interval.tv_sec != 1000 + i ||
                    its.it_value.tv_sec > 100000 + i || its.it_value.tv_sec == 0)
                    bad = i;
            }
            if (bad < 0) printf("ok\n");
            else printf("timer %d differs\n", bad);
        } else if (!strncmp(line, "map ", 4)) {
            int k = atoi(line + 4), made = 0;
            for (int i = 0; i < k; i++) {
                /* alternate protections so that neighbours never merge into one mapping */
                char *p = mmap(NULL, 4096, i % 2 ? PROT_READ | PROT_WRITE : PROT_READ | PROT_WRITE | PROT_EXEC,
                               MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
                if (p == MAP_FAILED) break;
                p[0] = (char)i;
                made++;
            }
            printf("mapped %d\n", made);
        } else {
            printf("?\n");
        }
        fflush(stdout);
    }
    return 0;
}
