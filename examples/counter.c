/* The demo's target: a table of counters that it keeps updating, a few pages a second.
 * Usage: counter READY_PATH — writes the table's address to READY_PATH (a FIFO) once it is ready. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define PAGES 2048
static uint64_t table[PAGES * 512];

int main(int argc, char **argv) {
    for (size_t i = 0; i < PAGES * 512; i += 8) table[i] = i;  /* touch every page */
    FILE *f = fopen(argc > 1 ? argv[1] : "/dev/stdout", "w");
    if (!f) { perror("ready"); return 1; }
    fprintf(f, "%p\n", (void *)table);
    fclose(f);
    struct timespec ts = {0, 20 * 1000 * 1000};
    for (uint64_t round = 0;; round++) {
        table[(round * 7919 % PAGES) * 512] = round;  /* one page per round */
        table[0] = round;
        nanosleep(&ts, NULL);
    }
}
