/* 64 MiB of anonymous memory with a pattern, some pages changed between the dumps, brk grown. */
#include "zdtm.h"

#define SZ (64u << 20)
static uint32_t *m;
static char *brk0, *brk1;

static uint32_t pat(size_t i, uint32_t gen) { return (uint32_t)(i * 2654435761u) ^ gen; }

static void touch(void)
{
	for (size_t i = 0; i < SZ / 4; i += 4096 * 7)
		m[i] = pat(i, 1);
}

static int touched;

static void check(void)
{
	for (size_t i = 0; i < SZ / 4; i++) {
		uint32_t want = pat(i, 0);
		if (m[i] != want && !(i % (4096 * 7) == 0 && m[i] == pat(i, 1))) {
			fail("word %zu: %x, want %x", i, m[i], want);
			break;
		}
	}
	if (sbrk(0) != brk1)
		fail("brk %p, was %p", sbrk(0), (void *)brk1);
	for (char *p = brk0; p < brk1; p += 4096)
		if (*p != 'b')
			fail("brk area byte at %p", (void *)p);
	(void)touched;
}

int main(void)
{
	m = mmap(NULL, SZ, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	for (size_t i = 0; i < SZ / 4; i++)
		m[i] = pat(i, 0);
	brk0 = sbrk(0);
	sbrk(1 << 20);
	brk1 = sbrk(0);
	for (char *p = brk0; p < brk1; p += 4096)
		*p = 'b';
	zd_main(touch, check);
}
