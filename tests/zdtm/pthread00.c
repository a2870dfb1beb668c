/* Threads: each with its TLS values, blocked on a condition variable; woken after the restore. */
#include "zdtm.h"
#include <pthread.h>

#define N 4
static __thread long tls_value = -1;
static __thread char tls_buf[256];
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static int go, ready, bad[N];
static pthread_t th[N];
static pid_t tids[N];

static void *worker(void *arg)
{
	long i = (long)arg;
	tls_value = i * 1000 + 7;
	snprintf(tls_buf, sizeof tls_buf, "thread %ld", i);
	tids[i] = (pid_t)syscall(SYS_gettid);
	pthread_mutex_lock(&mu);
	ready++;
	pthread_cond_broadcast(&cv);
	while (!go)
		pthread_cond_wait(&cv, &mu);
	pthread_mutex_unlock(&mu);
	char want[256];
	snprintf(want, sizeof want, "thread %ld", i);
	bad[i] = tls_value != i * 1000 + 7 || strcmp(tls_buf, want) || tids[i] != (pid_t)syscall(SYS_gettid);
	return (void *)(i + 1);
}

static void check(void)
{
	pthread_mutex_lock(&mu);
	go = 1;
	pthread_cond_broadcast(&cv);
	pthread_mutex_unlock(&mu);
	for (long i = 0; i < N; i++) {
		void *ret;
		if (pthread_join(th[i], &ret) || ret != (void *)(i + 1))
			fail("join %ld: %p", i, ret);
		if (bad[i])
			fail("thread %ld: TLS or tid differ", i);
	}
	if (tls_value != 99)
		fail("main TLS %ld", tls_value);
}

int main(void)
{
	tls_value = 99;
	for (long i = 0; i < N; i++)
		if (pthread_create(&th[i], NULL, worker, (void *)i))
			die("pthread_create");
	pthread_mutex_lock(&mu);
	while (ready < N)
		pthread_cond_wait(&cv, &mu);
	pthread_mutex_unlock(&mu);
	zd_main(NULL, check);
}
