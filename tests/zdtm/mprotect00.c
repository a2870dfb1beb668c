/* mprotect: one mapping split into parts with every protection, PROT_NONE pages with bytes in them. */
#include "zdtm.h"

#define PG 4096
static char *m;
static const int prots[6] = {PROT_READ, PROT_NONE, PROT_READ | PROT_WRITE, PROT_READ | PROT_EXEC,
			     PROT_WRITE, PROT_READ | PROT_WRITE | PROT_EXEC};

static void check(void)
{
	char line[256];
	FILE *f = fopen("/proc/self/maps", "r");
	int seen = 0;
	while (fgets(line, sizeof line, f)) {
		unsigned long lo, hi;
		char perms[5];
		if (sscanf(line, "%lx-%lx %4s", &lo, &hi, perms) != 3)
			continue;
		for (int i = 0; i < 6; i++) {
			unsigned long a = (unsigned long)m + (unsigned long)(i * 2 * PG);
			if (a < lo || a >= hi)
				continue;
			seen++;
			char want[5] = {prots[i] & PROT_READ ? 'r' : '-', prots[i] & PROT_WRITE ? 'w' : '-',
					prots[i] & PROT_EXEC ? 'x' : '-', 'p', 0};
			if (strcmp(perms, want) || hi - lo != 2 * PG)
				fail("part %d: %s %lx-%lx, want %s of 2 pages", i, perms, lo, hi, want);
		}
	}
	fclose(f);
	if (seen != 6)
		fail("%d parts found", seen);
	for (int i = 0; i < 6; i++) {
		mprotect(m + i * 2 * PG, 2 * PG, PROT_READ);
		for (int j = 0; j < 2 * PG; j += 512)
			if (m[i * 2 * PG + j] != (char)(i + j / 512))
				fail("part %d byte %d: %d", i, j, m[i * 2 * PG + j]);
	}
}

int main(void)
{
	m = mmap(NULL, 12 * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	for (int i = 0; i < 6; i++)
		for (int j = 0; j < 2 * PG; j += 512)
			m[i * 2 * PG + j] = (char)(i + j / 512);
	for (int i = 0; i < 6; i++)
		mprotect(m + i * 2 * PG, 2 * PG, prots[i]);
	zd_main(NULL, check);
}
