/* guest_layout.c: /init of a Linux guest that shows where a multi-threaded
 * prefault puts a buffer in guest-physical memory (bench/guest_layout.py).
 *
 * It mmaps LMB MiB of private anonymous memory, has LT threads write one byte
 * per 4 KiB page of their own slice at the same time (as mig_mon's mm_dirty
 * does), then prints the buffer's virtual->physical runs from
 * /proc/self/pagemap, so the host can see how the guest's page allocator
 * (per-CPU page lists refilled `batch` pages at a time) interleaves threads.
 * LMB and LT come from the kernel command line: the kernel hands unknown
 * key=value words to init as environment variables.
 *
 * Output on the console, one fact per line, "key value...":
 *   kernel <release>
 *   layout threads <T> cpus <online> mib <MiB> npages <n> each <slice pages>
 *   thp_enabled <sysfs line>      thp_defrag <sysfs line>
 *   prefault_seconds <s>
 *   zone <name> managed <n> min <n> low <n> pcp_high <n> pcp_batch <n>
 *   thp_fault_alloc <n>           thp_fault_fallback <n>
 *   runs
 *   <first virtual page index> <first pfn> <pages>     (one line per run)
 *   end runs <count> notpresent <count>
 * or "error <what>" on a failure. It then powers the guest off.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <sys/utsname.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096UL
#define PRESENT(e) ((e) >> 63)
#define PFN(e) ((e) & ((1ULL << 55) - 1))

static char *buf;

struct slice { size_t lo, hi; };

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* Ascending, one write per page: each write is one anonymous page fault. */
static void *touch(void *arg)
{
	struct slice *s = arg;

	for (size_t p = s->lo; p < s->hi; p++)
		((volatile char *)buf)[p * PAGE] = 1;
	return NULL;
}

/* The first line of a sysfs file, after `key`. */
static void show_line(const char *key, const char *path)
{
	char line[256] = "?\n";
	FILE *f = fopen(path, "r");

	if (f) {
		if (!fgets(line, sizeof line, f))
			strcpy(line, "?\n");
		fclose(f);
	}
	printf("%s %s", key, line);
}

/* The lines of a "name value" file (/proc/vmstat) whose name starts with prefix. */
static void show_matching(const char *path, const char *prefix)
{
	char line[256];
	FILE *f = fopen(path, "r");

	if (!f)
		return;
	while (fgets(line, sizeof line, f))
		if (!strncmp(line, prefix, strlen(prefix)))
			fputs(line, stdout);
	fclose(f);
}

/* One line per zone from /proc/zoneinfo: its watermarks and CPU 0's per-CPU
 * page list settings. high and batch are the same on every CPU of a zone in
 * 6.1, and batch is how many pages one refill takes from the buddy lists. */
struct zone { char name[32]; long managed, min, low, pcp_high, pcp_batch; };

static void print_zone(const struct zone *z)
{
	if (z->name[0])
		printf("zone %s managed %ld min %ld low %ld pcp_high %ld pcp_batch %ld\n",
		       z->name, z->managed, z->min, z->low, z->pcp_high, z->pcp_batch);
}

static void show_zones(void)
{
	char line[512], *s;
	struct zone z = { "", -1, -1, -1, -1, -1 };
	int node, cpu = -1;
	FILE *f = fopen("/proc/zoneinfo", "r");

	if (!f)
		return;
	while (fgets(line, sizeof line, f)) {
		s = line + strspn(line, " ");
		if (!strncmp(s, "Node ", 5)) {
			struct zone fresh = { "", -1, -1, -1, -1, -1 };

			print_zone(&z);
			z = fresh;
			sscanf(s, "Node %d, zone %31s", &node, z.name);
			cpu = -1;
			continue;
		}
		/* Watermarks are "min 1399"; the per-CPU lines have a colon. */
		sscanf(s, "managed %ld", &z.managed);
		sscanf(s, "min %ld", &z.min);
		sscanf(s, "low %ld", &z.low);
		sscanf(s, "cpu: %d", &cpu);
		if (cpu == 0) {
			sscanf(s, "high: %ld", &z.pcp_high);
			sscanf(s, "batch: %ld", &z.pcp_batch);
		}
	}
	print_zone(&z);
	fclose(f);
}

/* The runs of virtually consecutive pages that are also physically
 * consecutive, in virtual order. */
static int show_runs(size_t npages)
{
	uint64_t *pm = malloc(npages * 8);
	size_t got = 0, off = (uintptr_t)buf / PAGE * 8, nruns = 0, absent = 0;
	int fd = open("/proc/self/pagemap", O_RDONLY);

	if (!pm || fd < 0) {
		printf("error cannot read /proc/self/pagemap\n");
		return -1;
	}
	while (got < npages * 8) {
		ssize_t r = pread(fd, (char *)pm + got, npages * 8 - got, off + got);

		if (r <= 0) {
			printf("error pagemap read at %zu\n", got);
			return -1;
		}
		got += r;
	}
	close(fd);
	printf("runs\n");
	for (size_t i = 0, j; i < npages; i = j) {
		j = i + 1;
		if (!PRESENT(pm[i])) {
			absent++;
			continue;
		}
		while (j < npages && PRESENT(pm[j]) && PFN(pm[j]) == PFN(pm[i]) + (j - i))
			j++;
		printf("%zu %llu %zu\n", i, (unsigned long long)PFN(pm[i]), j - i);
		nruns++;
	}
	printf("end runs %zu notpresent %zu\n", nruns, absent);
	free(pm);
	return 0;
}

/* T threads each write their slice at once; the main thread writes the
 * leftover (npages % T) after starting them, then joins them. */
static int prefault(size_t npages, int T)
{
	size_t each = npages / T;
	struct slice *s = calloc(T + 1, sizeof *s);
	pthread_t *th = calloc(T, sizeof *th);
	double t0 = now();

	if (!s || !th) {
		printf("error calloc\n");
		return -1;
	}
	for (int i = 0; i < T; i++) {
		s[i].lo = i * each;
		s[i].hi = (i + 1) * each;
		if (pthread_create(&th[i], NULL, touch, &s[i])) {
			printf("error pthread_create %d\n", i);
			return -1;
		}
	}
	s[T].lo = T * each;
	s[T].hi = npages;
	touch(&s[T]);
	for (int i = 0; i < T; i++)
		pthread_join(th[i], NULL);
	printf("prefault_seconds %.3f\n", now() - t0);
	free(s);
	free(th);
	return 0;
}

static void setup_console(void)
{
	int fd;

	mkdir("/proc", 0755);
	mkdir("/sys", 0755);
	mkdir("/dev", 0755);
	mount("proc", "/proc", "proc", 0, 0);
	mount("sysfs", "/sys", "sysfs", 0, 0);
	mount("devtmpfs", "/dev", "devtmpfs", 0, 0);
	fd = open("/dev/console", O_RDWR);
	if (fd >= 0) {
		dup2(fd, 1);
		dup2(fd, 2);
		if (fd > 2)
			close(fd);
	}
	/* One big buffer: line-at-a-time writes to the serial port are slow. */
	setvbuf(stdout, NULL, _IOFBF, 1 << 20);
}

int main(void)
{
	const char *lmb = getenv("LMB"), *lt = getenv("LT");
	size_t mib = lmb ? strtoul(lmb, NULL, 0) : 1536, npages = mib << 20 >> 12;
	long cpus = sysconf(_SC_NPROCESSORS_ONLN);
	int T = lt ? atoi(lt) : (int)cpus;
	struct utsname u;

	setup_console();
	uname(&u);
	printf("kernel %s\n", u.release);
	printf("layout threads %d cpus %ld mib %zu npages %zu each %zu\n",
	       T, cpus, mib, npages, T > 0 ? npages / T : 0);
	show_line("thp_enabled", "/sys/kernel/mm/transparent_hugepage/enabled");
	show_line("thp_defrag", "/sys/kernel/mm/transparent_hugepage/defrag");
	fflush(stdout);
	if (T < 1 || (size_t)T > npages) {
		printf("error bad thread count %d\n", T);
		goto off;
	}
	/* No madvise: the THP policy in effect is the system-wide one. */
	buf = mmap(NULL, npages * PAGE, PROT_READ | PROT_WRITE,
		   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (buf == MAP_FAILED) {
		printf("error mmap %zu MiB\n", mib);
		goto off;
	}
	if (prefault(npages, T))
		goto off;
	show_zones();
	show_matching("/proc/vmstat", "thp_fault_");
	show_runs(npages);
off:
	fflush(stdout);
	sync();
	reboot(RB_POWER_OFF);
	return 0;
}
