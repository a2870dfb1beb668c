/* A restore target that sets process properties and checks them itself, one switch per property.
 *
 * usage: props LIST [FILE]
 * LIST is a comma-separated list of the properties below; FILE is a scratch file (for locks and a
 * shared file mapping). Each property is set at start; the command `check` reads every one back the
 * way the program would see it and answers one line: "ok" or "bad NAME: what it found; ...".
 * Between commands it blocks in read(0), so a dump finds it inside a syscall.
 *
 *   shm        MAP_SHARED|MAP_ANONYMOUS pages with known bytes, and a shared /dev/zero mapping:
 *              the bytes, the mapping still shared (a forked child's write is seen by the parent)
 *   oom        oom_score_adj 400
 *   loginuid   /proc/self/loginuid 3
 *   thp        prctl(PR_SET_THP_DISABLE, 1)
 *   rseq       glibc's rseq area still registered with the kernel
 *   membarrier MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED: the command works (EPERM unregistered)
 *   mlock      an mlock()ed mapping (VmFlags "lo")
 *   madvise    MADV_DONTFORK, MADV_WIPEONFORK, MADV_HUGEPAGE, MADV_NOHUGEPAGE on four mappings
 *   guard      a MADV_GUARD_INSTALL guard page (pagemap bit 58 on 6.14+)
 *   growsdown  a MAP_GROWSDOWN mapping (not the stack) that grows when the page below is touched
 *   filemode   FILE opened O_RDWR, mapped MAP_SHARED read-only: mprotect to read-write works
 *   itimer     ITIMER_REAL, ITIMER_VIRTUAL and ITIMER_PROF armed with intervals
 *   ptimer     three POSIX timers, the middle one deleted (ids 0 and 2 left), one armed
 *   flock      flock(LOCK_EX) on FILE
 *   posixlock  fcntl(F_SETLK) write lock on bytes 10-29 of FILE
 *   vdso       the [vdso] (with [vvar]) moved elsewhere by mremap
 *   altstack   sigaltstack() with a 64 KiB stack
 *   robust     glibc's robust futex list (get_robust_list) where it was
 *   tidaddr    glibc's clear_child_tid address (PR_GET_TID_ADDRESS) where it was
 *   nice       nice 7
 *   sched      SCHED_BATCH with SCHED_RESET_ON_FORK
 *   affinity   CPU affinity of CPU 0 alone
 *   timerslack prctl(PR_SET_TIMERSLACK, 123457)
 *   pdeathsig  prctl(PR_SET_PDEATHSIG, SIGUSR2)
 *   subreaper  prctl(PR_SET_CHILD_SUBREAPER, 1)
 *   coredump   /proc/self/coredump_filter 0x5a
 *   ioprio     ioprio_set: best-effort class, level 6
 *   prctl      PR_MCE_KILL early, PR_SET_IO_FLUSHER, PR_SET_MEMORY_MERGE, speculative store bypass
 *              disabled, PR_SET_MDWE, ARCH_SET_CPUID 0: each that this kernel and CPU allow (at least
 *              the first); the check compares every getter with its value at start
 *   mseal      a sealed mapping (mseal): restore refuses it
 *   lease      a read lease on FILE (F_SETLEASE): restore refuses it
 *   sigpending SIGUSR1 (kill) and SIGRTMIN twice (sigqueue, values 5 and 6), blocked and pending; the
 *              check takes them (in order, with their values) and sends them again
 * Commands: `check`; `zap`: MADV_DONTNEED on the second shared anonymous page, whose bytes stay in
 * the shared object but leave the page table (a dump that looked at the page table alone would lose
 * them); `grow`: touch the page below the growsdown mapping; `exit N`.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/rseq.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "lineio.h"

#define PG 4096
#ifndef MADV_GUARD_INSTALL
#define MADV_GUARD_INSTALL 102
#endif
#define MEMBARRIER_CMD_PRIVATE_EXPEDITED (1 << 3)
#define MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED (1 << 4)

static char report[8192];
static size_t rlen;
static unsigned char *shm, *zero, *locked, *adv[4], *guard, *grows, *fmap;
static int filefd = -1, lockfd = -1, probefd = -1;
static timer_t timers[3];
static const struct itimerval itv[3] = {
    {{500, 0}, {1000, 0}}, {{600, 0}, {1100, 0}}, {{700, 0}, {1200, 0}},
};

static void bad(const char *name, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void bad(const char *name, const char *fmt, ...) {
    va_list ap;
    if (rlen < sizeof report)
        rlen += snprintf(report + rlen, sizeof report - rlen, "%s%s: ", rlen ? "; " : "bad ", name);
    va_start(ap, fmt);
    if (rlen < sizeof report) rlen += vsnprintf(report + rlen, sizeof report - rlen, fmt, ap);
    va_end(ap);
}

static void die(const char *what) { printf("setup failed: %s: %s\n", what, strerror(errno)); fflush(stdout); _exit(3); }

static long read_long(const char *path) {
    char buf[64] = {0};
    int fd = open(path, O_RDONLY);
    if (fd < 0) return -999;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    return n > 0 ? strtol(buf, NULL, 10) : -999;
}

static int write_str(const char *path, const char *s) {
    int fd = open(path, O_WRONLY);
    if (fd < 0) return -1;
    ssize_t n = write(fd, s, strlen(s));
    close(fd);
    return n == (ssize_t)strlen(s) ? 0 : -1;
}

/* The VmFlags line of the mapping at addr, from /proc/self/smaps. */
static int vmflags(void *addr, char *out, size_t size) {
    FILE *f = fopen("/proc/self/smaps", "r");
    char line[512];
    int in = 0;
    if (!f) return -1;
    out[0] = 0;
    while (fgets(line, sizeof line, f)) {
        unsigned long s, e;
        if (sscanf(line, "%lx-%lx ", &s, &e) == 2 && strchr(line, '-') < strchr(line, ' ')) {
            in = (uintptr_t)addr >= s && (uintptr_t)addr < e;
        } else if (in && !strncmp(line, "VmFlags:", 8)) {
            snprintf(out, size, "%s", line + 9);
            out[strcspn(out, "\n")] = 0;
            break;
        }
    }
    fclose(f);
    return 0;
}

static int has_flag(void *addr, const char *flag) {
    char fl[256], *p;
    vmflags(addr, fl, sizeof fl);
    for (p = strtok(fl, " "); p; p = strtok(NULL, " "))
        if (!strcmp(p, flag)) return 1;
    return 0;
}

static void want_flag(const char *name, void *addr, const char *flag) {
    char fl[256];
    if (!has_flag(addr, flag)) {
        vmflags(addr, fl, sizeof fl);
        bad(name, "VmFlags of %p lack %s (%s)", addr, flag, fl);
    }
}

static uint64_t pagemap(void *addr) {
    uint64_t e = 0;
    int fd = open("/proc/self/pagemap", O_RDONLY);
    if (fd < 0) return 0;
    if (pread(fd, &e, 8, (uintptr_t)addr / PG * 8) != 8) e = 0;
    close(fd);
    return e;
}

static unsigned char pattern(size_t i) { return (unsigned char)(i * 131 + 7); }

static void move_vdso(void);

#define NPRCTL 7
static long prctl_got[NPRCTL];

static long prctl_get(int i) {
    int v = 0;
    switch (i) {
    case 0: return prctl(34, 0, 0, 0, 0);                     /* PR_MCE_KILL_GET */
    case 1: return prctl(58, 0, 0, 0, 0);                     /* PR_GET_IO_FLUSHER */
    case 2: return prctl(68, 0, 0, 0, 0);                     /* PR_GET_MEMORY_MERGE */
    case 3: return prctl(52, 0, 0, 0, 0);                     /* PR_GET_SPECULATION_CTRL store bypass */
    case 4: return prctl(66, 0, 0, 0, 0);                     /* PR_GET_MDWE */
    case 5: return syscall(SYS_arch_prctl, 0x1011, 0);        /* ARCH_GET_CPUID */
    case 6: return prctl(PR_GET_TSC, &v, 0, 0, 0) ? -1 : v;
    }
    return -1;
}

static void set_prctls(void) {
    if (prctl(33, 1, 1, 0, 0)) die("PR_MCE_KILL");  /* PR_MCE_KILL_SET, PR_MCE_KILL_EARLY */
    prctl(57, 1, 0, 0, 0);                          /* PR_SET_IO_FLUSHER */
    prctl(67, 1, 0, 0, 0);                          /* PR_SET_MEMORY_MERGE (KSM) */
    prctl(53, 0, 4, 0, 0);                          /* store bypass: PR_SPEC_DISABLE */
    syscall(SYS_arch_prctl, 0x1012, 0);             /* ARCH_SET_CPUID 0: cpuid faults */
    prctl(65, 1, 0, 0, 0);                          /* PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN */
    for (int i = 0; i < NPRCTL; i++) prctl_got[i] = prctl_get(i);
}

static void send_pending(void) {
    union sigval v5 = {.sival_int = 5}, v6 = {.sival_int = 6};
    if (kill(getpid(), SIGUSR1) || sigqueue(getpid(), SIGRTMIN, v5) || sigqueue(getpid(), SIGRTMIN, v6))
        die("sending signals");
}
static void *robust_head, *tid_address;
static size_t robust_len;
static char altstack[65536];
#define IOPRIO_VALUE ((2 << 13) | 6)

/* -- set up -------------------------------------------------------------------------------------- */
static void setup(const char *list, const char *file) {
    if (strstr(list, "shm")) {
        shm = mmap(NULL, 3 * PG, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
        if (shm == MAP_FAILED) die("mmap shared");
        for (size_t i = 0; i < 2 * PG; i++) shm[i] = pattern(i);  /* the third page never touched */

        int z = open("/dev/zero", O_RDWR);
        if (z < 0) die("/dev/zero");
        zero = mmap(NULL, 2 * PG, PROT_READ | PROT_WRITE, MAP_SHARED, z, 0);
        if (zero == MAP_FAILED) die("mmap /dev/zero");
        close(z);
        memcpy(zero + PG, "shared zero", 12);
    }
    if (strstr(list, "oom") && write_str("/proc/self/oom_score_adj", "400")) die("oom_score_adj");
    if (strstr(list, "loginuid") && write_str("/proc/self/loginuid", "3")) die("loginuid");
    if (strstr(list, "thp") && prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0)) die("PR_SET_THP_DISABLE");
    if (strstr(list, "membarrier") && syscall(SYS_membarrier, MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED, 0, 0))
        die("membarrier");
    if (strstr(list, "mlock")) {
        locked = mmap(NULL, 2 * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (locked == MAP_FAILED || mlock(locked, 2 * PG)) die("mlock");
        locked[0] = 42;
    }
    if (strstr(list, "madvise")) {
        static const int advice[4] = {MADV_DONTFORK, MADV_WIPEONFORK, MADV_HUGEPAGE, MADV_NOHUGEPAGE};
        /* Four mappings kept apart by PROT_NONE gaps, so that the kernel merges none of them. */
        unsigned char *base = mmap(NULL, 8 * PG, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (base == MAP_FAILED) die("mmap madvise");
        for (int i = 0; i < 4; i++) {
            adv[i] = base + 2 * i * PG;
            if (mprotect(adv[i], PG, PROT_READ | PROT_WRITE) || madvise(adv[i], PG, advice[i])) die("madvise");
            adv[i][0] = (unsigned char)(i + 1);
        }
    }
    if (strstr(list, "guard")) {
        guard = mmap(NULL, 3 * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (guard == MAP_FAILED) die("mmap guard");
        guard[0] = guard[2 * PG] = 9;
        if (madvise(guard + PG, PG, MADV_GUARD_INSTALL)) die("MADV_GUARD_INSTALL");
    }
    if (strstr(list, "growsdown")) {
        /* Room below it: a PROT_NONE reservation that stays, with a hole of 4 pages at its top under
         * the growsdown mapping. Not the whole room freed: the kernel places later mmaps (FILE's
         * below) at exactly stack_guard_gap (256 pages) under a growsdown mapping, after which its
         * growth is refused (SIGSEGV at `grow`) whatever a dump does; 1 start in ~400 did so. An
         * inaccessible neighbour is outside the guard-gap rule, so the growth into the hole works. */
        unsigned char *room = mmap(NULL, 1024 * PG, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (room == MAP_FAILED) die("mmap room");
        munmap(room + 1016 * PG, 4 * PG);
        munmap(room + 1020 * PG, 4 * PG);
        grows = mmap(room + 1020 * PG, 4 * PG, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_GROWSDOWN | MAP_FIXED_NOREPLACE, -1, 0);
        if (grows == MAP_FAILED) die("mmap growsdown");
        grows[PG] = 77;
    }
    if (file && (strstr(list, "filemode") || strstr(list, "flock") || strstr(list, "posixlock"))) {
        filefd = open(file, O_RDWR);
        /* Another open file description of FILE, never closed: closing any fd of a file drops the
         * process's POSIX locks on it, so the checks must not open and close one. */
        probefd = open(file, O_RDWR);
        if (filefd < 0 || probefd < 0) die("open FILE");
    }
    if (strstr(list, "filemode")) {
        fmap = mmap(NULL, PG, PROT_READ, MAP_SHARED, filefd, 0);
        if (fmap == MAP_FAILED) die("mmap FILE");
    }
    if (strstr(list, "itimer")) {
        signal(SIGALRM, SIG_IGN);
        signal(SIGVTALRM, SIG_IGN);
        signal(SIGPROF, SIG_IGN);
        for (int w = 0; w < 3; w++)
            if (setitimer(w, &itv[w], NULL)) die("setitimer");
    }
    if (strstr(list, "ptimer")) {
        struct sigevent ev = {.sigev_notify = SIGEV_SIGNAL, .sigev_signo = SIGUSR1};
        signal(SIGUSR1, SIG_IGN);
        for (int i = 0; i < 3; i++) {
            ev.sigev_value.sival_int = 100 + i;
            if (i == 2) ev.sigev_signo = SIGUSR2;
            if (timer_create(i == 1 ? CLOCK_REALTIME : CLOCK_MONOTONIC, &ev, &timers[i])) die("timer_create");
        }
        timer_delete(timers[1]);
        struct itimerspec its = {{300, 0}, {900, 0}};
        if (timer_settime(timers[2], 0, &its, NULL)) die("timer_settime");
    }
    if (strstr(list, "flock") && flock(filefd, LOCK_EX | LOCK_NB)) die("flock");
    if (strstr(list, "posixlock")) {
        lockfd = open(file, O_RDWR);
        struct flock fl = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 10, .l_len = 20};
        if (lockfd < 0 || fcntl(lockfd, F_SETLK, &fl)) die("F_SETLK");
    }
    if (strstr(list, "vdso")) move_vdso();
    if (strstr(list, "altstack")) {
        stack_t ss = {.ss_sp = altstack, .ss_size = sizeof altstack, .ss_flags = 0};
        if (sigaltstack(&ss, NULL)) die("sigaltstack");
    }
    if (syscall(SYS_get_robust_list, 0, &robust_head, &robust_len)) die("get_robust_list");
    if (prctl(PR_GET_TID_ADDRESS, &tid_address, 0, 0, 0)) die("PR_GET_TID_ADDRESS");
    if (strstr(list, "nice") && setpriority(PRIO_PROCESS, 0, 7)) die("setpriority");
    if (strstr(list, "sched")) {
        struct sched_param sp = {0};
        if (sched_setscheduler(0, SCHED_BATCH | SCHED_RESET_ON_FORK, &sp)) die("sched_setscheduler");
    }
    if (strstr(list, "affinity")) {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(0, &set);
        if (sched_setaffinity(0, sizeof set, &set)) die("sched_setaffinity");
    }
    if (strstr(list, "timerslack") && prctl(PR_SET_TIMERSLACK, 123457, 0, 0, 0)) die("timerslack");
    /* Ignored: the restored process's parent is `ckpt restore`, whose --detach exit sends it. */
    if (strstr(list, "pdeathsig") && (signal(SIGUSR2, SIG_IGN) == SIG_ERR || prctl(PR_SET_PDEATHSIG, SIGUSR2, 0, 0, 0)))
        die("pdeathsig");
    if (strstr(list, "subreaper") && prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) die("subreaper");
    if (strstr(list, "coredump") && write_str("/proc/self/coredump_filter", "0x5a")) die("coredump_filter");
    if (strstr(list, "ioprio") && syscall(SYS_ioprio_set, 1, 0, IOPRIO_VALUE)) die("ioprio_set");
    if (strstr(list, "prctl")) set_prctls();
    if (strstr(list, "mseal")) {
        unsigned char *p = mmap(NULL, PG, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED || syscall(462, p, PG, 0)) die("mseal");
    }
    if (strstr(list, "lease")) {
        int fd = open(file, O_RDONLY);
        if (fd < 0 || fcntl(fd, F_SETLEASE, F_RDLCK)) die("F_SETLEASE");
    }
    if (strstr(list, "sigpending")) {
        sigset_t set;
        sigemptyset(&set);
        sigaddset(&set, SIGUSR1);
        sigaddset(&set, SIGRTMIN);
        sigprocmask(SIG_BLOCK, &set, NULL);
        send_pending();
    }
}

/* [vvar], [vvar_vclock] and [vdso] are contiguous: move them, part by part, to a free place. */
static void move_vdso(void) {
    {
        FILE *f = fopen("/proc/self/maps", "r");
        char line[512];
        unsigned long lo = 0, hi = 0, s, e;
        while (f && fgets(line, sizeof line, f)) {
            if (sscanf(line, "%lx-%lx", &s, &e) != 2) continue;
            if (strstr(line, "[vvar") || strstr(line, "[vdso]")) {
                if (!lo) lo = s;
                hi = e;
            }
        }
        if (f) fclose(f);
        unsigned char *to = mmap(NULL, hi - lo + 64 * PG, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (!lo || to == MAP_FAILED) die("vdso");
        munmap(to, hi - lo + 64 * PG);
        for (unsigned long a = lo; a < hi;) {  /* each part separately: mremap moves one mapping */
            f = fopen("/proc/self/maps", "r");
            unsigned long ps = 0, pe = 0;
            while (fgets(line, sizeof line, f))
                if (sscanf(line, "%lx-%lx", &s, &e) == 2 && s == a) { ps = s; pe = e; }
            fclose(f);
            if (!pe) die("vdso part");
            if (mremap((void *)ps, pe - ps, pe - ps, MREMAP_MAYMOVE | MREMAP_FIXED, to + 32 * PG + (ps - lo))
                == MAP_FAILED) die("mremap vdso");
            a = pe;
        }
    }
}

/* -- check --------------------------------------------------------------------------------------- */
static void check_shm(void) {
    for (size_t i = 0; i < 2 * PG; i++)
        if (shm[i] != pattern(i)) { bad("shm", "byte %zu is %d", i, shm[i]); return; }
    for (size_t i = 2 * PG; i < 3 * PG; i++)
        if (shm[i]) { bad("shm", "untouched byte %zu is %d", i, shm[i]); return; }
    if (memcmp(zero + PG, "shared zero", 12) || zero[0]) bad("shm", "/dev/zero mapping bytes differ");
    pid_t c = fork();
    if (c == 0) { shm[5] = 0xEE; zero[5] = 0xEF; _exit(0); }
    int st;
    if (c < 0 || waitpid(c, &st, 0) != c) { bad("shm", "fork failed"); return; }
    if (shm[5] != 0xEE) bad("shm", "a child's write to the shared anonymous mapping is not seen");
    if (zero[5] != 0xEF) bad("shm", "a child's write to the /dev/zero mapping is not seen");
    shm[5] = pattern(5);
    zero[5] = 0;
}

static void check_rseq(void) {
    /* Unregistering with a wrong signature: EPERM if that area is registered (with that length),
     * EINVAL if not. Nothing changes either way. */
    struct rseq *area = (struct rseq *)((char *)__builtin_thread_pointer() + __rseq_offset);
    if (!__rseq_size) { bad("rseq", "glibc did not register rseq at start"); return; }
    for (unsigned len = 20; len <= 1024; len += 4) {
        if (syscall(SYS_rseq, area, len, RSEQ_FLAG_UNREGISTER, 0x12345678) == -1 && errno == EPERM) return;
    }
    bad("rseq", "the area %p is not registered", (void *)area);
}

static void check_timers(const char *list) {
    struct itimerval cur;
    if (strstr(list, "itimer")) {
        for (int w = 0; w < 3; w++) {
            if (getitimer(w, &cur)) { bad("itimer", "getitimer %d: %s", w, strerror(errno)); continue; }
            if (cur.it_interval.tv_sec != itv[w].it_interval.tv_sec || cur.it_interval.tv_usec)
                bad("itimer", "timer %d interval %ld.%06ld", w, (long)cur.it_interval.tv_sec, (long)cur.it_interval.tv_usec);
            if (cur.it_value.tv_sec <= 0 || cur.it_value.tv_sec > itv[w].it_value.tv_sec)
                bad("itimer", "timer %d value %ld.%06ld", w, (long)cur.it_value.tv_sec, (long)cur.it_value.tv_usec);
        }
    }
    if (strstr(list, "ptimer")) {
        struct itimerspec its;
        if (timer_gettime(timers[0], &its) || its.it_value.tv_sec || its.it_interval.tv_sec)
            bad("ptimer", "timer 0: %s, value %ld", strerror(errno), (long)its.it_value.tv_sec);
        if (timer_gettime(timers[1], &its) != -1 || errno != EINVAL) bad("ptimer", "the deleted timer 1 exists");
        if (timer_gettime(timers[2], &its)) bad("ptimer", "timer 2: %s", strerror(errno));
        else if (its.it_interval.tv_sec != 300 || its.it_value.tv_sec <= 0 || its.it_value.tv_sec > 900)
            bad("ptimer", "timer 2: value %ld interval %ld", (long)its.it_value.tv_sec, (long)its.it_interval.tv_sec);
        if (timer_getoverrun(timers[2]) != 0) bad("ptimer", "timer 2 has overruns");
        /* The id, signal, value and clock of each, as the kernel shows them. */
        FILE *f = fopen("/proc/self/timers", "r");
        char line[256], all[1024] = "\n";
        while (f && fgets(line, sizeof line, f)) strncat(all, line, sizeof all - strlen(all) - 1);
        if (f) fclose(f);
        if (!strstr(all, "\nID: 0\nsignal: 10/0000000000000064\nnotify: signal/pid.") ||
            !strstr(all, "\nID: 2\nsignal: 12/0000000000000066\nnotify: signal/pid.") || strstr(all, "\nID: 1\n"))
            bad("ptimer", "/proc/self/timers is now [%s]", all);
    }
}

static void check_locks(const char *list) {
    if (strstr(list, "flock")) {
        /* Another open file description cannot take the lock while ours holds it. */
        if (flock(probefd, LOCK_EX | LOCK_NB) == 0 || errno != EWOULDBLOCK) {
            bad("flock", "the file is not locked (another open file took the lock)");
            flock(probefd, LOCK_UN);
        }
    }
    if (strstr(list, "posixlock")) {
        /* F_OFD_GETLK from another open file description sees our process's POSIX lock. */
        struct flock fl = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 0, .l_len = 0};
        if (fcntl(probefd, F_OFD_GETLK, &fl)) bad("posixlock", "F_OFD_GETLK: %s", strerror(errno));
        else if (fl.l_type != F_WRLCK || fl.l_start != 10 || fl.l_len != 20 || fl.l_pid != getpid())
            bad("posixlock", "lock is type %d start %ld len %ld pid %d", fl.l_type, (long)fl.l_start,
                (long)fl.l_len, fl.l_pid);
    }
}

static void check_task(const char *list) {
    long v;
    if (strstr(list, "altstack")) {
        stack_t ss;
        if (sigaltstack(NULL, &ss) || ss.ss_sp != altstack || ss.ss_size != sizeof altstack || ss.ss_flags)
            bad("altstack", "sigaltstack is %p size %zu flags %d", ss.ss_sp, ss.ss_size, ss.ss_flags);
    }
    if (strstr(list, "robust")) {
        void *head = NULL;
        size_t len = 0;
        if (syscall(SYS_get_robust_list, 0, &head, &len) || head != robust_head || len != robust_len)
            bad("robust", "robust list %p len %zu, was %p len %zu", head, len, robust_head, robust_len);
    }
    if (strstr(list, "tidaddr")) {
        void *a = NULL;
        if (prctl(PR_GET_TID_ADDRESS, &a, 0, 0, 0) || a != tid_address)
            bad("tidaddr", "clear_child_tid %p, was %p", a, tid_address);
    }
    errno = 0;
    if (strstr(list, "nice") && (v = getpriority(PRIO_PROCESS, 0)) != 7) bad("nice", "nice %ld", v);
    if (strstr(list, "sched") && (v = sched_getscheduler(0)) != (SCHED_BATCH | SCHED_RESET_ON_FORK))
        bad("sched", "policy %#lx", v);
    if (strstr(list, "affinity")) {
        cpu_set_t set;
        if (sched_getaffinity(0, sizeof set, &set) || CPU_COUNT(&set) != 1 || !CPU_ISSET(0, &set))
            bad("affinity", "%d CPUs", CPU_COUNT(&set));
    }
    if (strstr(list, "timerslack") && (v = prctl(PR_GET_TIMERSLACK, 0, 0, 0, 0)) != 123457)
        bad("timerslack", "%ld", v);
    if (strstr(list, "pdeathsig")) {
        int sig = 0;
        if (prctl(PR_GET_PDEATHSIG, &sig, 0, 0, 0) || sig != SIGUSR2) bad("pdeathsig", "%d", sig);
    }
    if (strstr(list, "subreaper")) {
        int on = 0;
        if (prctl(PR_GET_CHILD_SUBREAPER, &on, 0, 0, 0) || on != 1) bad("subreaper", "%d", on);
    }
    if (strstr(list, "coredump")) {
        char buf[32] = {0};
        int fd = open("/proc/self/coredump_filter", O_RDONLY);
        if (fd < 0 || read(fd, buf, sizeof buf - 1) <= 0 || strtol(buf, NULL, 16) != 0x5a)
            bad("coredump", "coredump_filter %s", buf);
        if (fd >= 0) close(fd);
    }
    if (strstr(list, "ioprio") && (v = syscall(SYS_ioprio_get, 1, 0)) != IOPRIO_VALUE) bad("ioprio", "%#lx", v);
}

static void check_pending(void) {
    sigset_t set;
    siginfo_t si;
    struct timespec zero = {0, 0};
    sigemptyset(&set);
    sigaddset(&set, SIGUSR1);
    if (sigtimedwait(&set, &si, &zero) != SIGUSR1) bad("sigpending", "SIGUSR1 is not pending");
    sigemptyset(&set);
    sigaddset(&set, SIGRTMIN);
    for (int want = 5; want <= 6; want++) {
        if (sigtimedwait(&set, &si, &zero) != SIGRTMIN) bad("sigpending", "SIGRTMIN #%d is not pending", want - 4);
        else if (si.si_code != SI_QUEUE || si.si_value.sival_int != want)
            bad("sigpending", "SIGRTMIN code %d value %d, not %d", si.si_code, si.si_value.sival_int, want);
    }
    if (sigtimedwait(&set, &si, &zero) != -1) bad("sigpending", "a third SIGRTMIN");
    send_pending();
}

static void check(const char *list) {
    long v;
    rlen = 0;
    report[0] = 0;
    if (shm) check_shm();
    if (strstr(list, "oom") && (v = read_long("/proc/self/oom_score_adj")) != 400) bad("oom", "oom_score_adj %ld", v);
    if (strstr(list, "loginuid") && (v = read_long("/proc/self/loginuid")) != 3) bad("loginuid", "loginuid %ld", v);
    if (strstr(list, "thp") && (v = prctl(PR_GET_THP_DISABLE, 0, 0, 0, 0)) != 1) bad("thp", "THP disable %ld", v);
    if (strstr(list, "rseq")) check_rseq();
    if (strstr(list, "membarrier") && syscall(SYS_membarrier, MEMBARRIER_CMD_PRIVATE_EXPEDITED, 0, 0))
        bad("membarrier", "private expedited: %s", strerror(errno));
    if (locked) {
        want_flag("mlock", locked, "lo");
        if (locked[0] != 42) bad("mlock", "bytes differ");
    }
    if (adv[0]) {
        static const char *fl[4] = {"dc", "wf", "hg", "nh"};
        for (int i = 0; i < 4; i++) {
            want_flag("madvise", adv[i], fl[i]);
            if (adv[i][0] != i + 1) bad("madvise", "bytes of mapping %d differ", i);
        }
    }
    if (guard) {
        if (!(pagemap(guard + PG) >> 58 & 1)) bad("guard", "the guard page is not a guard (pagemap %#llx)",
                                                  (unsigned long long)pagemap(guard + PG));
        if (guard[0] != 9 || guard[2 * PG] != 9) bad("guard", "bytes differ");
    }
    if (grows) {
        want_flag("growsdown", grows, "gd");
        if (grows[PG] != 77) bad("growsdown", "bytes differ");
    }
    if (fmap) {
        if (mprotect(fmap, PG, PROT_READ | PROT_WRITE)) bad("filemode", "mprotect read-write: %s", strerror(errno));
        else mprotect(fmap, PG, PROT_READ);
    }
    check_timers(list);
    check_locks(list);
    check_task(list);
    if (strstr(list, "sigpending")) check_pending();
    if (strstr(list, "prctl"))
        for (int i = 0; i < NPRCTL; i++)
            if (prctl_get(i) != prctl_got[i]) bad("prctl", "getter %d gives %ld, was %ld", i, prctl_get(i), prctl_got[i]);
    printf("%s\n", rlen ? report : "ok");
}

int main(int argc, char **argv) {
    const char *list = argc > 1 ? argv[1] : "";
    char line[256];
    setup(list, argc > 2 ? argv[2] : NULL);
    printf("ready %d\n", getpid());
    fflush(stdout);
    setvbuf(stdout, NULL, _IONBF, 0);
    while (read_command(line, sizeof line)) {
        if (!strncmp(line, "check", 5)) {
            check(list);
        } else if (!strncmp(line, "movevdso", 8)) {
            move_vdso();
            printf("moved\n");
        } else if (!strncmp(line, "zap", 3)) {
            printf("%s\n", madvise(shm + PG, PG, MADV_DONTNEED) ? "failed" : "zapped");
        } else if (!strncmp(line, "grow", 4)) {
            grows[-PG] = 5;  /* the page below the growsdown mapping: the kernel extends it */
            printf("grew %d\n", grows[-PG] == 5 && has_flag(grows - PG, "gd"));
        } else if (!strncmp(line, "exit", 4)) {
            exit(atoi(line + 5));
        } else {
            printf("unknown command\n");
        }
    }
    return 0;
}
