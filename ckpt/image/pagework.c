/* The per-page work of a full dump's chunks, in one call that runs without Python's GIL.
 *
 * Why hand-written C: the writer's pool threads spend ~250 us of each 1 MiB chunk in short C calls
 * that hold the GIL (numpy's gather ~90 us, 256 per-page xxh3 calls ~133 us, the chunk's xxh3
 * ~30 us) against zstd's ~350 us that release it, so two threads reached ~1.2 CPUs where zstd alone
 * reaches 1.8 (docs/benchmarks.md, wall9). No library offers the call: python-xxhash hashes one
 * buffer per call and holds the GIL, numpy's take holds it, and one ctypes call per page costs more
 * than it frees. ctypes releases the GIL around a foreign call, so one call per chunk lets both
 * pool threads run. The results are the same xxh3_64 values python-xxhash gives (seed 0), so
 * layers are byte for byte those of the pure-Python path (ckpt/image/pagescan.py), which stays the
 * fallback where this library is not built. */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

#define PAGE 4096
#define ABI 2 /* ckpt/image/pagework.py refuses a library built from another version of this file */

int ckpt_pagework_abi(void) { return ABI; }

/* Whether this CPU runs the build made with -mavx2 (setup.sh makes both; the loader asks this one). */
int ckpt_has_avx2(void) { return __builtin_cpu_supports("avx2"); }

/* Page `rows[i]` of `pages` copied to page i of `out`, its xxh3_64 into digests[i], for i < n;
 * returns the xxh3_64 of the n pages as gathered. Each page is hashed twice while it is in L1. */
uint64_t ckpt_gather_digest(const uint8_t *pages, const int64_t *rows, size_t n, uint8_t *out,
                            uint64_t *digests) {
    XXH3_state_t st;
    XXH3_64bits_reset(&st);
    for (size_t i = 0; i < n; i++) {
        uint8_t *dst = out + i * PAGE;
        memcpy(dst, pages + (size_t)rows[i] * PAGE, PAGE);
        digests[i] = XXH3_64bits(dst, PAGE);
        XXH3_64bits_update(&st, dst, PAGE);
    }
    return XXH3_64bits_digest(&st);
}

/* The same for n pages already back to back in `buf`: no copy. */
uint64_t ckpt_digest_pages(const uint8_t *buf, size_t n, uint64_t *digests) {
    XXH3_state_t st;
    XXH3_64bits_reset(&st);
    for (size_t i = 0; i < n; i++) {
        digests[i] = XXH3_64bits(buf + i * PAGE, PAGE);
        XXH3_64bits_update(&st, buf + i * PAGE, PAGE);
    }
    return XXH3_64bits_digest(&st);
}

/* zero[i] = 1 where page i of the n pages at `pages` is all zero bytes, else 0. A page of data
 * almost always has a non-zero word among its first ones, so the loop leaves it at once. */
void ckpt_zero_pages(const uint8_t *pages, size_t n, uint8_t *zero) {
    for (size_t i = 0; i < n; i++) {
        const uint64_t *w = (const uint64_t *)(pages + i * PAGE);
        uint64_t acc = 0;
        size_t j = 0;
        while (j < PAGE / 8 && !(acc = w[j] | w[j + 1] | w[j + 2] | w[j + 3])) j += 4;
        zero[i] = acc == 0;
    }
}

/* xxh3_64 of one buffer: the loader's probe that this build hashes as python-xxhash does. */
uint64_t ckpt_xxh3(const uint8_t *buf, size_t len) { return XXH3_64bits(buf, len); }
