/* gameserver: a game-server-like loop (cf. the Quake 3 server of Clark et al., NSDI 2005).
 *
 *   gameserver [-e ENTITIES] [-t TICKS/s] [-M MAPSIZE] [-f READYFILE]
 *
 * A static level map (MAPSIZE, default 32M, written once at start and only read after), an entity
 * table (ENTITIES x 64 bytes, default 8192: 512 KiB) every entity of which moves every tick, and a
 * ring of 64 per-tick snapshots (16 KiB each) written one slot per tick, as servers keep for lag
 * compensation. Its writable working set is small and hot (entities + recent snapshots), its
 * memory large: the case pre-copy handles well. Readiness and checksum as examples/dirtier.c.
 * Build: gcc -O2 -o gameserver examples/gameserver.c */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define SNAPS 64
#define SNAP_BYTES (16 << 10)

struct entity { float pos[3], vel[3]; uint32_t id, hp, frame, pad[7]; };

static volatile sig_atomic_t stop;
static void on_signal(int s) { (void)s; stop = 1; }

static uint64_t fnv(const void *p, size_t n, uint64_t h) {
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++) h = (h ^ b[i]) * 1099511628211ULL;
    return h;
}

int main(int argc, char **argv) {
    size_t n = 8192, map_bytes = 32UL << 20;
    double tps = 30;
    const char *ready = NULL;
    int c;
    while ((c = getopt(argc, argv, "e:t:M:f:")) != -1) {
        switch (c) {
        case 'e': n = strtoul(optarg, NULL, 0); break;
        case 't': tps = atof(optarg); break;
        case 'M': map_bytes = strtoul(optarg, NULL, 0) << 20; break;
        case 'f': ready = optarg; break;
        default: fprintf(stderr, "usage: gameserver [-e ENTITIES] [-t TICKS/s] [-M MAP_MiB] [-f READYFILE]\n"); return 2;
        }
    }
    if (n == 0 || tps <= 0) { fprintf(stderr, "gameserver: entities and tick rate must be positive\n"); return 2; }
    unsigned char *map = mmap(NULL, map_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    struct entity *ents = calloc(n, sizeof *ents);
    unsigned char *snaps = malloc(SNAPS * SNAP_BYTES);
    if (map == MAP_FAILED || !ents || !snaps) { perror("alloc"); return 1; }
    uint64_t r = 88172645463325252ULL;
    for (size_t i = 0; i < map_bytes; i += 8) { r ^= r << 13; r ^= r >> 7; r ^= r << 17; memcpy(map + i, &r, 8); }
    for (size_t i = 0; i < n; i++) {
        ents[i].id = (uint32_t)i;
        ents[i].hp = 100;
        for (int k = 0; k < 3; k++) { ents[i].pos[k] = (float)(i % 1000); ents[i].vel[k] = (float)((i * 7 + k) % 5) - 2; }
    }
    memset(snaps, 0, SNAPS * SNAP_BYTES);
    struct sigaction sa = {.sa_handler = on_signal};
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    printf("ready pid=%d entities=%zu map=%zu\n", getpid(), n, map_bytes);
    fflush(stdout);
    if (ready) { FILE *f = fopen(ready, "w"); if (f) { fprintf(f, "%d\n", getpid()); fclose(f); } }
    long period = (long)(1e9 / tps);
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    uint32_t tick = 0;
    while (!stop) {
        for (size_t i = 0; i < n; i++) {  /* physics: every entity moves, reads the map under it */
            struct entity *e = &ents[i];
            for (int k = 0; k < 3; k++) e->pos[k] += e->vel[k] / (float)tps;
            size_t cell = ((size_t)(e->pos[0] * 1024) ^ (size_t)(e->pos[1] * 7)) % map_bytes;
            if (map[cell] == 0) e->hp--;
            e->frame = tick;
        }
        unsigned char *slot = snaps + (tick % SNAPS) * SNAP_BYTES;  /* delta snapshot of this tick */
        size_t take = n * sizeof *ents < SNAP_BYTES ? n * sizeof *ents : SNAP_BYTES;
        memcpy(slot, ents, take);
        tick++;
        t.tv_nsec += period;
        while (t.tv_nsec >= 1000000000L) { t.tv_sec++; t.tv_nsec -= 1000000000L; }
        while (!stop && clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &t, NULL) == EINTR) {}
    }
    uint64_t h = fnv(map, map_bytes, 1469598103934665603ULL);
    h = fnv(ents, n * sizeof *ents, h);
    printf("checksum %016llx ticks %u\n", (unsigned long long)fnv(snaps, SNAPS * SNAP_BYTES, h), tick);
    return 0;
}
