/* A MAP_GROWSDOWN mapping other than the stack, grown after the restore. */
#include "zdtm.h"

static char *g;

static void check(void)
{
	char vf[600];
	if (zd_vmflags(g, vf, sizeof vf) || !zd_has_flag(vf, "gd"))
		fail("VmFlags %s: gd lost", vf);
	if (g[100] != 'g')
		fail("byte");
	g[-4096 + 5] = 'x'; /* grows by a page */
	if (g[-4096 + 5] != 'x')
		fail("did not grow");
}

int main(void)
{
	/* A PROT_NONE reservation around it that stays, but for a 4-page hole under it: an accessible
	 * mapping within stack_guard_gap (256 pages) below would refuse the growth, and a freed room is
	 * where later mmaps land (tests/targets/props.c met it). */
	char *r = mmap(NULL, 64 * 4096, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (r == MAP_FAILED)
		die("mmap room");
	munmap(r + 28 * 4096, 8 * 4096);
	g = mmap(r + 32 * 4096, 4 * 4096, PROT_READ | PROT_WRITE,
		 MAP_PRIVATE | MAP_ANONYMOUS | MAP_GROWSDOWN | MAP_FIXED_NOREPLACE, -1, 0);
	if (g == MAP_FAILED)
		die("mmap growsdown");
	g[100] = 'g';
	zd_main(NULL, check);
}
