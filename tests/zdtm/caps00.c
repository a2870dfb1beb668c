/* Capabilities: a root process with a narrowed effective, permitted, inheritable and bounding set. */
#include "zdtm.h"
#include <linux/capability.h>
#include <sys/prctl.h>

static struct __user_cap_data_struct d0[2];

static void check(void)
{
	struct __user_cap_header_struct h = {_LINUX_CAPABILITY_VERSION_3, 0};
	struct __user_cap_data_struct d[2];
	syscall(SYS_capget, &h, d);
	if (memcmp(d, d0, sizeof d))
		fail("caps eff %x/%x perm %x/%x inh %x/%x, were %x/%x %x/%x %x/%x", d[0].effective, d[1].effective,
		     d[0].permitted, d[1].permitted, d[0].inheritable, d[1].inheritable, d0[0].effective,
		     d0[1].effective, d0[0].permitted, d0[1].permitted, d0[0].inheritable, d0[1].inheritable);
	if (prctl(PR_CAPBSET_READ, CAP_NET_RAW) != 0 || prctl(PR_CAPBSET_READ, CAP_CHOWN) != 1)
		fail("bounding set: net_raw %d chown %d", prctl(PR_CAPBSET_READ, CAP_NET_RAW),
		     prctl(PR_CAPBSET_READ, CAP_CHOWN));
}

int main(void)
{
	struct __user_cap_header_struct h = {_LINUX_CAPABILITY_VERSION_3, 0};
	struct __user_cap_data_struct d[2];
	prctl(PR_CAPBSET_DROP, CAP_NET_RAW);
	syscall(SYS_capget, &h, d);
	d[0].effective &= ~(1u << CAP_SYS_ADMIN | 1u << CAP_KILL);
	d[0].permitted &= ~(1u << CAP_KILL);
	d[0].inheritable = 1u << CAP_CHOWN;
	if (syscall(SYS_capset, &h, d))
		die("capset");
	syscall(SYS_capget, &h, d0);
	zd_main(NULL, check);
}
