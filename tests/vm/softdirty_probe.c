/* Proves that soft-dirty tracking works in the running kernel (Documentation/vm/soft-dirty.txt).
 *
 * Run inside the QEMU guest by tests/vm/test_vm_smoke.py; on a kernel without
 * CONFIG_MEM_SOFT_DIRTY (this project's host) it fails at the first check that needs bit 55.
 * Prints one "ok ..." line per check; exits 0 only if every check passed, else 1 (2: set-up error).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define NPAGES 64
#define SOFT_DIRTY (1ULL << 55)

static long page;
static int pagemap_fd;
static int failures;

static void die(const char *what) {
    fprintf(stderr, "setup error: %s: %s\n", what, strerror(errno));
    exit(2);
}

static void clear_refs(void) {
    int fd = open("/proc/self/clear_refs", O_WRONLY);
    if (fd < 0) die("open clear_refs");
    if (write(fd, "4", 1) != 1) die("write clear_refs");
    close(fd);
}

/* Bit 55 of each page's pagemap entry, as a bitmask over up to 64 pages. */
static uint64_t dirty_mask(const char *base, int npages) {
    uint64_t entries[NPAGES], mask = 0;
    off_t off = (off_t)((uintptr_t)base / (uintptr_t)page) * 8;
    if (pread(pagemap_fd, entries, (size_t)npages * 8, off) != (ssize_t)npages * 8) die("pread pagemap");
    for (int i = 0; i < npages; i++)
        if (entries[i] & SOFT_DIRTY) mask |= 1ULL << i;
    return mask;
}

static void expect(const char *name, uint64_t got, uint64_t want) {
    if (got == want) {
        printf("ok   %s\n", name);
    } else {
        printf("FAIL %s: dirty mask %016llx, want %016llx\n", name, (unsigned long long)got,
               (unsigned long long)want);
        failures++;
    }
}

static char *map_pages(void *at, int npages, int flags) {
    char *p = mmap(at, (size_t)npages * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | flags,
                   -1, 0);
    if (p == MAP_FAILED) die("mmap");
    return p;
}

int main(void) {
    page = sysconf(_SC_PAGESIZE);
    pagemap_fd = open("/proc/self/pagemap", O_RDONLY);
    if (pagemap_fd < 0) die("open pagemap");
    const uint64_t all = ~0ULL;

    /* Guard pages (PROT_NONE) around each region keep the kernel from merging our test VMAs
     * with each other, which would blur which mapping is "new". */
    char *arena = mmap(NULL, (size_t)(3 * NPAGES + 4) * page, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (arena == MAP_FAILED) die("mmap arena");
    char *a = map_pages(arena + page, NPAGES, MAP_FIXED);
    char *b_at = arena + (NPAGES + 2) * page;

    /* 1. Touch every page so all are present, then clear: nothing may be soft-dirty. */
    for (int i = 0; i < NPAGES; i++) a[i * page] = 1;
    clear_refs();
    expect("after clear_refs no page of 64 is soft-dirty", dirty_mask(a, NPAGES), 0);

    /* 2. Reads must not set the bit; writes to pages 5, 17, 42 must set exactly those. */
    volatile char sink = 0;
    for (int i = 0; i < NPAGES; i++) sink += a[i * page];
    (void)sink;
    expect("reads leave pages clean", dirty_mask(a, NPAGES), 0);
    a[5 * page] = 2;
    a[17 * page + 100] = 3;
    a[42 * page + page - 1] = 4;
    expect("writes to pages 5, 17, 42 mark exactly those", dirty_mask(a, NPAGES),
           (1ULL << 5) | (1ULL << 17) | (1ULL << 42));

    /* 3. A new mapping is soft-dirty as a whole, touched or not (VM_SOFTDIRTY on the VMA). */
    clear_refs();
    char *b = map_pages(b_at, NPAGES, MAP_FIXED);
    expect("fresh mmap is soft-dirty before any access", dirty_mask(b, NPAGES), all);
    b[0] = 1;
    expect("fresh mmap still soft-dirty after a write", dirty_mask(b, NPAGES), all);

    /* 4. Unmapping loses the bits: a region unmapped and mapped again at the same place is dirty. */
    for (int i = 0; i < NPAGES; i++) b[i * page] = 1;
    clear_refs();
    expect("re-used region clean after clear_refs", dirty_mask(b, NPAGES), 0);
    if (munmap(b, (size_t)NPAGES * page) != 0) die("munmap");
    char *c = map_pages(b_at, NPAGES, MAP_FIXED_NOREPLACE);
    if (c != b) {
        fprintf(stderr, "setup error: mmap at %p gave %p\n", (void *)b, (void *)c);
        return 2;
    }
    expect("munmap + mmap at the same address is soft-dirty", dirty_mask(c, NPAGES), all);

    /* 5. The first region kept its own state: clear_refs ran twice since its writes. */
    expect("old region untouched since clear stays clean", dirty_mask(a, NPAGES), 0);

    printf("%s: %d failure(s)\n", failures ? "SOFT_DIRTY_BROKEN" : "SOFT_DIRTY_OK", failures);
    return failures ? 1 : 0;
}
