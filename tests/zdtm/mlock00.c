/* mlockall(MCL_CURRENT|MCL_FUTURE) and mlock2(MLOCK_ONFAULT): VmLck and the lock flags stay. */
#include "zdtm.h"

#define PG 4096
static char *onfault;

static void check(void)
{
	char vf[600];
	char *later = mmap(NULL, PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (zd_vmflags(onfault, vf, sizeof vf) || !zd_has_flag(vf, "lf"))
		fail("MLOCK_ONFAULT mapping: %s", vf);
	if (zd_vmflags(later, vf, sizeof vf) || !zd_has_flag(vf, "lo"))
		fail("a mapping made after the restore is not locked (MCL_FUTURE lost): %s", vf);
	if (zd_vmflags(&vf, vf, sizeof vf) || !zd_has_flag(vf, "lo"))
		fail("the stack is not locked: %s", vf);
}

int main(void)
{
	if (mlockall(MCL_CURRENT | MCL_FUTURE))
		die("mlockall");
	onfault = mmap(NULL, 4 * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (syscall(SYS_mlock2, onfault, 4 * PG, 1 /* MLOCK_ONFAULT */))
		die("mlock2");
	zd_main(NULL, check);
}
