/* madvise flags that show in VmFlags (dc, wf, hg, nh, dd, sr, rr, mg) and mlock (lo). */
#include "zdtm.h"

#define PG 4096
static char *m[8];
static const int advs[8] = {MADV_DONTFORK, MADV_WIPEONFORK, MADV_HUGEPAGE, MADV_NOHUGEPAGE, MADV_DONTDUMP,
			    MADV_SEQUENTIAL, MADV_RANDOM, MADV_MERGEABLE};
static const char *flags[8] = {"dc", "wf", "hg", "nh", "dd", "sr", "rr", "mg"};
static char *locked;

static void check(void)
{
	char vf[600];
	for (int i = 0; i < 8; i++) {
		if (zd_vmflags(m[i], vf, sizeof vf) || !zd_has_flag(vf, flags[i]))
			fail("mapping %d lost VmFlag %s: %s", i, flags[i], vf);
		if (m[i][5] != (char)i)
			fail("mapping %d byte", i);
	}
	if (zd_vmflags(locked, vf, sizeof vf) || !zd_has_flag(vf, "lo"))
		fail("mlocked mapping: %s", vf);
}

int main(void)
{
	for (int i = 0; i < 8; i++) {
		/* separate mappings with a gap, so that they cannot merge */
		m[i] = mmap(NULL, 4 * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		munmap(m[i] + 2 * PG, 2 * PG);
		if (madvise(m[i], 2 * PG, advs[i]))
			die("madvise %s", flags[i]);
		m[i][5] = (char)i;
	}
	locked = mmap(NULL, 2 * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mlock(locked, 2 * PG))
		die("mlock");
	zd_main(NULL, check);
}
