/* The ordinary course of a freeze's stops, each in one call without Python's GIL.
 *
 * Why hand-written C: every stop of a frozen target is a hand-off (ckpt resumes a thread, waits for
 * its next stop, reads what it did) made of a few ptrace requests and a wait; from Python, with the
 * bookkeeping around them, each cost the freezing thread ~30-60 us of CPU beyond the target's own
 * round trip (docs/benchmarks.md), where a C tracer's requests cost a few (bench/stopfloor.c). An
 * incremental dump of one thread makes seven such stops (the seize's, the batch's three: its code
 * mapped by a single step, its run, its code unmapped; the settle of that step, left to Python; the
 * thaw's two per thread that goes back into a blocking syscall: ckpt/ptrace/parting.py), eight
 * threads ~30. No
 * library offers ptrace's injection or parting steps; python-ptrace is Python as well.
 *
 * Each entry does only what the Python code does when nothing unexpected happens, and stops at the
 * first thing that is not that: a stop that is not the one expected (someone's signal, a group
 * stop, a step that ended elsewhere) is reported with its wait status, the thread left in it; no
 * stop at all (the thread running on, an exit, a timeout) as QS_RUNNING. ckpt/ptrace/quickstops.py
 * then hands the thread to the Python loop that would have seen the same stop (inject.py,
 * freeze.py), which holds the signal, resumes or refuses exactly as before. Exits are never reaped
 * here (waitid without WEXITED): the Python wait decides, as it does for a leader that is its
 * caller's child.
 *
 * The wait is woken by the event: SIGCHLD is blocked in every thread of ckpt while it traces, and
 * the calling thread's signalfd for it (ckpt/ptrace/sigchld.py) is polled with the time left. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/uio.h>
#include <sys/user.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define ABI 9 /* ckpt/ptrace/quickstops.py refuses a library built from another version of this file */

int ckpt_quickstops_abi(void) { return ABI; }

enum { QS_OK = 0, QS_STOPPED = 1, QS_RUNNING = 2, QS_ERRNO = 3 };
#define TRAP_BRKPT_CODE 1
#define SI_TKILL_CODE (-6)
#define PTRACE_EVENT_STOP_ 128
#define PTRACE_GET_SYSCALL_INFO_ 0x420e
#define SYSCALL_INFO_ENTRY_ 1

/* One stop's work and its outcome; the layout of quickstops.py's Job. */
struct job {
    int32_t tid;
    int32_t pid;          /* the process: for a leader whose exit waitid may not report */
    int32_t sfd;          /* the calling thread's signalfd for SIGCHLD */
    int32_t timeout_ms;
    int32_t leader_check; /* tid is the leader and other threads are held: look at /proc when woken for nothing */
    int32_t sig;          /* a blob's end signal */
    int32_t tgid;         /* the process's own pid (its pid namespace's): the end signal's sender */
    int32_t pad0;
    uint64_t done_rip;    /* where the stop expected must be */
    struct user_regs_struct call; /* set before the resume */
    struct user_regs_struct own;  /* put back after an expected stop */
    /* out */
    int32_t kind;
    int32_t status;       /* QS_STOPPED: the stop's wait status */
    int32_t err;          /* QS_ERRNO: errno */
    int32_t timed_out;    /* QS_RUNNING: the time ran out (else an exit, or a leader gone) */
    int64_t result;       /* a step's syscall result (rax) */
    int64_t want;         /* a parting thread's syscall: the one it goes back into */
    uint64_t fault_rip;   /* a blob that unmaps its own code: where its return from munmap faults (0: none) */
    int32_t unmapped;     /* out: the blob ended there, its code unmapped */
    int32_t pad1;
};

static int64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* The leader gone although waitid has nothing: its state in /proc is Z or X, or it is missing. */
static int leader_gone(int pid) {
    char path[64], buf[512];
    snprintf(path, sizeof path, "/proc/%d/task/%d/stat", pid, pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 1;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return 1;
    buf[n] = 0;
    char *p = strrchr(buf, ')');
    return !p || p[1] != ' ' || p[2] == 'Z' || p[2] == 'X';
}

/* 1 and *status: a stop of tid, consumed. 0: none came (an exit pending, the leader gone, or the
 * deadline passed: *timed_out says which). -1 with errno: waitid failed. */
static int wait_stop(struct job *j, int64_t deadline, int *status, int *timed_out) {
    *timed_out = 0;
    for (;;) {
        siginfo_t si;
        memset(&si, 0, sizeof si);
        if (waitid(P_PID, (id_t)j->tid, &si, WSTOPPED | WNOHANG | __WALL) < 0)
            return errno == ECHILD ? 0 : -1;
        if (si.si_pid != 0) {
            /* A ptrace stop's si_status is its exit code (event << 8 | signal): waitpid's form. */
            *status = (si.si_status << 8) | 0x7f;
            return 1;
        }
        memset(&si, 0, sizeof si);
        if (waitid(P_PID, (id_t)j->tid, &si, WEXITED | WNOHANG | WNOWAIT | __WALL) == 0 && si.si_pid != 0)
            return 0;
        if (j->leader_check && leader_gone(j->pid))
            return 0;
        int64_t left = deadline - now_ms();
        if (left <= 0) {
            *timed_out = 1;
            return 0;
        }
        struct pollfd p = {.fd = j->sfd, .events = POLLIN};
        int r = poll(&p, 1, left > INT32_MAX ? INT32_MAX : (int)left);
        if (r > 0) {
            char drain[128 * 8];
            (void)!read(j->sfd, drain, sizeof drain);
        } else if (r < 0 && errno != EINTR) {
            return -1;
        }
    }
}

static int failed(struct job *j) {
    j->kind = QS_ERRNO;
    j->err = errno ? errno : EIO;
    return j->kind;
}

/* Waited for the stop the caller expects; QS_OK when it came, else the job says what did. */
static int await(struct job *j, int64_t deadline, int *status) {
    int timed_out = 0;
    int r = wait_stop(j, deadline, status, &timed_out);
    if (r < 0)
        return failed(j);
    if (r == 0) {
        j->kind = QS_RUNNING;
        j->timed_out = timed_out;
        return j->kind;
    }
    return QS_OK;
}

/* The thread's next stop, waited for from now with the job's time: QS_OK and its status, or the
 * job says what came instead. */
static int next_stop(struct job *j, int *status) {
    j->kind = QS_OK;
    errno = 0;
    return await(j, now_ms() + j->timeout_ms, status);
}

/* Resumed towards its syscall's enter-stop with its options TRACESYSGOOD alone (parting.py). */
static int resume_into_syscall(struct job *j) {
    if (ptrace(PTRACE_SETOPTIONS, j->tid, 0, PTRACE_O_TRACESYSGOOD) < 0 || ptrace(PTRACE_SYSCALL, j->tid, 0, 0) < 0)
        return failed(j);
    return QS_OK;
}

static int stray(struct job *j, int status) {
    j->kind = QS_STOPPED;
    j->status = status;
    return j->kind;
}

static int signal_stop(int status, int sig) {
    /* A signal-delivery-stop: no event, and not a syscall-stop (SIGTRAP | 0x80). */
    return WIFSTOPPED(status) && (status >> 16) == 0 && WSTOPSIG(status) == sig;
}

/* A syscall single-stepped at call.rip (Frozen.syscall(quick=True), inject.step_over_syscall):
 * the step's forced SIGTRAP stop with rip at done_rip and si_code TRAP_BRKPT is the end; the
 * result is read and the thread's own registers put back. */
int ckpt_qs_step(struct job *j) {
    int64_t deadline = now_ms() + j->timeout_ms;
    j->kind = QS_OK;
    errno = 0;
    if (ptrace(PTRACE_SETREGS, j->tid, 0, &j->call) < 0 || ptrace(PTRACE_SINGLESTEP, j->tid, 0, 0) < 0)
        return failed(j);
    int status;
    if (await(j, deadline, &status) != QS_OK)
        return j->kind;
    if (!signal_stop(status, SIGTRAP))
        return stray(j, status);
    struct user_regs_struct r;
    siginfo_t si;
    if (ptrace(PTRACE_GETREGS, j->tid, 0, &r) < 0 || ptrace(PTRACE_GETSIGINFO, j->tid, 0, &si) < 0)
        return failed(j);
    if (r.rip != j->done_rip || si.si_code != TRAP_BRKPT_CODE)
        return stray(j, status);
    j->result = (int64_t)r.rax;
    if (ptrace(PTRACE_SETREGS, j->tid, 0, &j->own) < 0)
        return failed(j);
    return QS_OK;
}

/* A blob started: its registers set and the thread resumed (Frozen._run_blobs). */
int ckpt_qs_start(struct job *j) {
    j->kind = QS_OK;
    errno = 0;
    if (ptrace(PTRACE_SETREGS, j->tid, 0, &j->call) < 0 || ptrace(PTRACE_CONT, j->tid, 0, 0) < 0)
        return failed(j);
    return QS_OK;
}

/* A started blob's end (Frozen._wait_blob, _blob_stop): the signal-delivery-stop of its own end
 * signal, sent by tkill from the process itself, at done_rip; or, for a blob that unmaps its own code
 * (fault_rip), of the SIGSEGV its return from munmap faults with (unmapped set). The thread's own
 * registers put back. */
int ckpt_qs_end(struct job *j) {
    int status;
    j->unmapped = 0;
    if (next_stop(j, &status) != QS_OK)
        return j->kind;
    int fault = j->fault_rip && signal_stop(status, SIGSEGV);
    if (!fault && !signal_stop(status, j->sig))
        return stray(j, status);
    struct user_regs_struct r;
    siginfo_t si;
    if (ptrace(PTRACE_GETSIGINFO, j->tid, 0, &si) < 0 || ptrace(PTRACE_GETREGS, j->tid, 0, &r) < 0)
        return failed(j);
    if (fault) {
        /* Its munmap of its own code returned into the unmapped page: the fetch's fault, nothing else
         * (si_addr is the instruction's own address; a SIGSEGV sent by someone has another si_code). */
        if (r.rip != j->fault_rip || si.si_code != SEGV_MAPERR || (uint64_t)si.si_addr != j->fault_rip)
            return stray(j, status);
        j->unmapped = 1;
    } else if (r.rip != j->done_rip || si.si_signo != j->sig || si.si_code != SI_TKILL_CODE || si.si_pid != j->tgid)
        return stray(j, status);
    if (ptrace(PTRACE_SETREGS, j->tid, 0, &j->own) < 0)
        return failed(j);
    return QS_OK;
}

/* A thread the thaw kicked (Frozen._kick: interrupted and resumed) back in a stop inside get_signal,
 * its interrupt-stop (Frozen._back_in_get_signal), then sent on towards its syscall's enter-stop as
 * parting.start_into does: its options TRACESYSGOOD alone, resumed by PTRACE_SYSCALL, from where the
 * kernel's restart of the syscall runs. */
int ckpt_qs_part(struct job *j) {
    int status;
    if (next_stop(j, &status) != QS_OK)
        return j->kind;
    if (!WIFSTOPPED(status) || (status >> 16) != PTRACE_EVENT_STOP_ || WSTOPSIG(status) != SIGTRAP)
        return stray(j, status);
    return resume_into_syscall(j);
}

/* Its end (parting.into_syscall): the syscall-enter-stop of the syscall it was stopped in (want),
 * from which it is resumed into that syscall by PTRACE_SYSCALL, traced until the caller's thread
 * exits (the module docstring of ckpt/ptrace/parting.py says why not a detach). */
int ckpt_qs_enter(struct job *j) {
    int status;
    if (next_stop(j, &status) != QS_OK)
        return j->kind;
    if (!WIFSTOPPED(status) || (status >> 16) != 0 || WSTOPSIG(status) != (SIGTRAP | 0x80))
        return stray(j, status);
    unsigned char info[88];
    struct user_regs_struct r;
    if (ptrace(PTRACE_GET_SYSCALL_INFO_, j->tid, (void *)sizeof info, info) < 0 || ptrace(PTRACE_GETREGS, j->tid, 0, &r) < 0)
        return failed(j);
    if (info[0] != SYSCALL_INFO_ENTRY_ || (int64_t)r.orig_rax != j->want)
        return stray(j, status);
    return resume_into_syscall(j);
}

/* A stopped tracee's registers and signal mask: 0, or the errno of the request that failed. */
static int32_t own_state(int32_t tid, struct user_regs_struct *regs, uint64_t *mask) {
    errno = 0;
    if (ptrace(PTRACE_GETREGS, tid, 0, regs) < 0 ||
        ptrace((enum __ptrace_request)0x420a /* PTRACE_GETSIGMASK */, tid, (void *)8, mask) < 0)
        return errno ? errno : EIO;
    return 0;
}

/* The freeze's first stop of each of n threads just seized and interrupted (Frozen._wait_first_stop),
 * in the order given (the leader last): each one's wait status in statuses, and of each that came
 * to a stop its registers and signal mask (regs[i], masks[i]; rerrs[i] 0, or the errno of the
 * request that failed): the batch's first look at its threads, which cost two requests made from
 * Python a thread (~25 us of a one-thread freeze). Returns how many came;
 * at the first thread that reported none (it exits, or the time ran out: j->timed_out), or a wait
 * that failed (j->kind QS_ERRNO), it stops there and the caller waits for the rest itself.
 * j->leader_check: the process has other threads (what a wait for its leader must then also ask /proc). */
int ckpt_qs_stops(struct job *j, const int32_t *tids, int32_t n, int32_t *statuses, struct user_regs_struct *regs,
                  uint64_t *masks, int32_t *rerrs) {
    int multi = j->leader_check;
    j->kind = QS_OK;
    errno = 0;
    for (int32_t i = 0; i < n; i++) {
        int64_t deadline = now_ms() + j->timeout_ms;
        j->tid = tids[i];
        j->leader_check = multi && tids[i] == j->pid;
        int status;
        int r = await(j, deadline, &status);
        j->leader_check = multi;
        if (r != QS_OK)
            return i;
        statuses[i] = status;
        rerrs[i] = WIFSTOPPED(status) ? own_state(tids[i], &regs[i], &masks[i]) : -1; /* (-1: no stop) */
    }
    return n;
}

/* Of each of n stopped tracees of the calling thread: its registers and signal mask (a batch's
 * first look at its threads: Frozen._read_own, one call for all of them instead of two requests
 * made from Python a thread). errs[i]: 0, or the errno of the request that failed (the caller asks
 * again from Python, where the error is told). */
int ckpt_qs_regs(const int32_t *tids, int32_t n, struct user_regs_struct *regs, uint64_t *masks, int32_t *errs) {
    for (int32_t i = 0; i < n; i++)
        errs[i] = own_state(tids[i], &regs[i], &masks[i]);
    return n;
}

/* Of each of n stopped tracees of the calling thread: its XSAVE image (NT_X86_XSTATE) into its
 * xcap bytes of xbuf (xlens[i]: the kernel's length; xcap itself: it may have been cut, and the
 * caller asks again), and its rseq registration (PTRACE_GET_RSEQ_CONFIGURATION: 24 bytes into
 * rseq[i]; rerr[i] its errno, EIO/EINVAL on a kernel without). errs[i]: the XSAVE request's errno.
 * A dump's collect, one call for every thread (Frozen.read_threads). */
int ckpt_qs_threads(const int32_t *tids, int32_t n, char *xbuf, int64_t xcap, int64_t *xlens,
                    char *rseq, int32_t *errs, int32_t *rerr) {
    for (int32_t i = 0; i < n; i++) {
        struct iovec iov = {xbuf + (size_t)i * (size_t)xcap, (size_t)xcap};
        errs[i] = rerr[i] = 0;
        xlens[i] = 0;
        if (ptrace(PTRACE_GETREGSET, tids[i], (void *)0x202 /* NT_X86_XSTATE */, &iov) < 0)
            errs[i] = errno ? errno : EIO;
        else
            xlens[i] = (int64_t)iov.iov_len;
        memset(rseq + (size_t)i * 32, 0, 32);
        if (ptrace((enum __ptrace_request)0x420f /* PTRACE_GET_RSEQ_CONFIGURATION */, tids[i], (void *)24,
                   rseq + (size_t)i * 32) < 0)
            rerr[i] = errno ? errno : EIO;
    }
    return n;
}

/* The freeze's seize of n threads (Frozen._attach_all): each PTRACE_SEIZE'd with `options`, then
 * PTRACE_INTERRUPT'ed, one after the other, as Frozen._seize does for one. errs[i]: 0, or the errno
 * of a seize that failed (the thread is not seized: the caller seizes it again from Python, where
 * each error has its meaning: gone, not allowed, the option refused); ierrs[i]: the errno of an
 * interrupt that failed after its seize (ESRCH: exiting, which its wait reports). Returns how many
 * were seized. */
int ckpt_qs_seize(const int32_t *tids, int32_t n, int64_t options, int32_t *errs, int32_t *ierrs) {
    int32_t seized = 0;
    for (int32_t i = 0; i < n; i++) {
        errs[i] = ierrs[i] = 0;
        if (ptrace((enum __ptrace_request)0x4206 /* PTRACE_SEIZE */, tids[i], 0, (void *)(intptr_t)options) < 0) {
            errs[i] = errno ? errno : EIO;
            continue;
        }
        seized++;
        if (ptrace((enum __ptrace_request)0x4207 /* PTRACE_INTERRUPT */, tids[i], 0, 0) < 0)
            ierrs[i] = errno ? errno : EIO;
    }
    return seized;
}
