/* mlockall(MCL_CURRENT|MCL_FUTURE|MCL_ONFAULT): new mappings are locked on fault (lo lf). */
#include "zdtm.h"

static void check(void)
{
	char vf[600];
	char *later = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (zd_vmflags(later, vf, sizeof vf) || !zd_has_flag(vf, "lo") || !zd_has_flag(vf, "lf"))
		fail("a mapping made after the restore: %s (want lo lf: MCL_FUTURE|MCL_ONFAULT)", vf);
	if (zd_vmflags(&vf, vf, sizeof vf) || !zd_has_flag(vf, "lf"))
		fail("the stack: %s", vf);
}

int main(void)
{
	if (mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT))
		die("mlockall");
	zd_main(NULL, check);
}
