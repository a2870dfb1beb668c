/* FPU/SSE/AVX state: the rounding modes of x87 and MXCSR, and values live in xmm/ymm registers
 * across the blocking read (kept by inline asm around the wait). */
#include "zdtm.h"
#include <fenv.h>
#include <immintrin.h>

static void check(void)
{
	unsigned short cw;
	__asm__ volatile("fnstcw %0" : "=m"(cw));
	if ((cw & 0xc00) != 0x800)
		fail("x87 rounding %x", cw & 0xc00);
	if ((_mm_getcsr() & 0x6000) != 0x4000 || !(_mm_getcsr() & 0x8040))
		fail("mxcsr %x", _mm_getcsr());
}

int main(void)
{
	unsigned short cw;
	__asm__ volatile("fnstcw %0" : "=m"(cw));
	cw = (unsigned short)((cw & ~0xc00) | 0x800); /* round up */
	__asm__ volatile("fldcw %0" : : "m"(cw));
	_mm_setcsr((_mm_getcsr() & ~0x6000u) | 0x4000u | 0x8040u); /* round up, FTZ, DAZ */
	/* xmm15/ymm15 hold a value across the whole wait: nothing in glibc's read path touches them */
	double in = 3.25, out = 0;
	__asm__ volatile("movsd %0, %%xmm15" : : "m"(in) : "xmm15");
	char line[64];
	zd_write("ready\n");
	while (zd_readline(line, sizeof line) == 0) {
		/* right after the blocking read, before any string function could use the register */
		__asm__ volatile("movsd %%xmm15, %0" : "=m"(out));
		if (!strcmp(line, "touch")) {
			__asm__ volatile("movsd %0, %%xmm15" : : "m"(in) : "xmm15");
			zd_write("touched\n");
		} else if (!strcmp(line, "check")) {
			zd_failed = 0;
			if (out != 3.25)
				fail("xmm15 %f, want 3.25", out);
			check();
			char buf[700];
			snprintf(buf, sizeof buf, zd_failed ? "FAIL %s\n" : "PASS\n", zd_why);
			zd_write(buf);
		} else if (!strcmp(line, "exit")) {
			exit(0);
		}
	}
	return 1;
}
