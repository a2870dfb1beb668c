/* Credentials: real/effective/saved uid and gid all different, supplementary groups, fsuid. */
#include "zdtm.h"
#include <grp.h>
#include <sys/fsuid.h>

static void check(void)
{
	uid_t r, e, s;
	gid_t gr, ge, gs, g[8];
	getresuid(&r, &e, &s);
	if (r != 1001 || e != 1002 || s != 1003)
		fail("uids %d %d %d", r, e, s);
	getresgid(&gr, &ge, &gs);
	if (gr != 2001 || ge != 2002 || gs != 2003)
		fail("gids %d %d %d", gr, ge, gs);
	int n = getgroups(8, g);
	if (n != 3 || g[0] != 3001 || g[1] != 3002 || g[2] != 3003)
		fail("groups: %d", n);
	if (setfsuid((uid_t)-1) != 1002)
		fail("fsuid %d", setfsuid((uid_t)-1));
}

int main(void)
{
	gid_t g[3] = {3001, 3002, 3003};
	if (setgroups(3, g) || setresgid(2001, 2002, 2003) || setresuid(1001, 1002, 1003))
		die("set ids");
	zd_main(NULL, check);
}
