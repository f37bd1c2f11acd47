/* placement-probe: how far apart two CPUs are, as the time one cache line takes to go
 * from one to the other and back (BENCHMARKS.md, "why the TCP cells flip").
 *
 *   gcc -O2 -pthread -o /tmp/placement-probe scripts/placement-probe.c
 *   /tmp/placement-probe [CPU_A CPU_B [ROUND_TRIPS]]      (default 0 1 200000)
 *
 * Prints nanoseconds per round trip.  Run it while the machine is idle: a busy CPU delays
 * the thread pinned there, and the number then measures the scheduler.  On the 2-vCPU VM
 * of BENCHMARKS.md it reads about 55 ns or about 350 ns, depending on where the host runs
 * the vCPUs at the time.  Not part of the product or the tests. */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static _Atomic long line __attribute__((aligned(64)));
static long rounds = 200000;

static void *answer(void *unused)
{
    for (long i = 0; i < rounds; i++) {
        while (atomic_load_explicit(&line, memory_order_acquire) != 2 * i + 1)
            ;
        atomic_store_explicit(&line, 2 * i + 2, memory_order_release);
    }
    return unused;
}

static int pin(pthread_attr_t *attr, int cpu)
{
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    if (attr)
        return pthread_attr_setaffinity_np(attr, sizeof set, &set);
    return pthread_setaffinity_np(pthread_self(), sizeof set, &set);
}

int main(int argc, char **argv)
{
    int a = argc > 2 ? atoi(argv[1]) : 0, b = argc > 2 ? atoi(argv[2]) : 1;
    pthread_attr_t attr;
    pthread_t other;
    struct timespec t0, t1;

    if (argc > 3)
        rounds = atol(argv[3]);
    if (a == b || rounds <= 0) {     /* one CPU: every hand-off would wait for a time slice */
        fprintf(stderr, "placement-probe: two different CPUs and a positive count, please\n");
        return 2;
    }
    if (pin(NULL, a) != 0 || pthread_attr_init(&attr) != 0 || pin(&attr, b) != 0 ||
        pthread_create(&other, &attr, answer, NULL) != 0) {
        fprintf(stderr, "placement-probe: can't run on CPUs %d and %d\n", a, b);
        return 1;
    }
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (long i = 0; i < rounds; i++) {
        atomic_store_explicit(&line, 2 * i + 1, memory_order_release);
        while (atomic_load_explicit(&line, memory_order_acquire) != 2 * i + 2)
            ;
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    pthread_join(other, NULL);
    printf("%.0f ns/roundtrip\n",
           ((t1.tv_sec - t0.tv_sec) * 1e9 + (t1.tv_nsec - t0.tv_nsec)) / rounds);
    return 0;
}
