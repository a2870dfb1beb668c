/* A network namespace of its own: only a loopback, down, and no route anywhere. */
#include "zdtm.h"
#include <sched.h>
#include <net/if.h>

static void check(void)
{
	struct if_nameindex *ifs = if_nameindex(), *i;
	int n = 0;
	for (i = ifs; i && i->if_index; i++)
		n++;
	if (n != 1)
		fail("%d interfaces (its own network namespace has only lo)", n);
	if (ifs)
		if_freenameindex(ifs);
}

int main(void)
{
	if (unshare(CLONE_NEWNET))
		die("netns");
	zd_main(NULL, check);
}
