/*
 * dlfill: fill N MiB of anonymous memory with pages that follow a sharing pattern.
 *
 * The region is laid out as [dup][zero][unique][volatile] pages:
 *   dup      depends on (seed, index) only: identical across instances with the same
 *            seed, so KSM merges them across processes or guests, never within one
 *            (unless --one-content).
 *   zero     written with zeros so that they are faulted in (KSM zero-page handling).
 *   unique   depends on (seed, instance, index): never merge.
 *   volatile depends on (seed, instance, index, generation) and, while --hold, is
 *            rewritten with a new generation at --volatile-rate pages per second, so it
 *            keeps changing under KSM's checksum and never merges.
 *
 * Every page starts with a header of (kind, index, instance, generation) words, so two
 * different pages are guaranteed to differ, not just likely to; the rest of the page is
 * splitmix64 output seeded from the header, so the whole 4 KiB carries entropy.
 *
 * --one-content makes every dup page a copy of dup page 0 (still per seed), so each
 * process's dup pages merge into one KSM page with up to max_page_sharing mappings (and
 * a chain of such pages beyond): the shape of the published rmap_walk_ksm benchmark.
 *
 * --fragment N then mprotect()s every other page at the start of the region so that it
 * becomes N VMAs. They are split from one faulted VMA, so they share one anon_vma:
 * the shape that makes rmap_walk_ksm expensive.
 *
 * While holding, SIGUSR1 scrambles the region: every page is rewritten with content
 * unique to this instance, which breaks every KSM sharing of the region (copy on
 * write). The saving that disappears is the saving the workload's pages were giving,
 * which is how densitylab tells it apart from sharing elsewhere in a guest.
 *
 * While holding, SIGUSR2 verifies the region: every page is read back through the
 * mapping (which faults swapped pages in) and compared with what the pattern says it
 * holds now: dup, zero, unique, volatile pages by the generation last written to each,
 * scrambled pages after a scramble. Verification runs in the thread that rewrites the
 * volatile pages, so a rewrite can never race it into a false mismatch. A page changed
 * behind our back (a wrong merge, migration or swap-in) is reported by its index.
 *
 * Output: one line "DLFILL DONE {json}" on stdout (and --console PATH) when ready,
 * "DLFILL SCRAMBLED {json}" after each scramble and "DLFILL VERIFIED {json}" after each
 * verification (pages, mismatches, the first mismatched page indices, a sequence number).
 * Exit status: 0 ok, 1 runtime failure, 2 bad arguments; errors are one "dlfill: " line.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <math.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE_BYTES 4096u
#define WORDS_PER_PAGE (PAGE_BYTES / sizeof(uint64_t))
#define FRACTION_TOLERANCE 1e-6

/* Kind tags go into word 0 so pages of different kinds can never be equal. */
enum page_kind { KIND_DUP = 1, KIND_UNIQUE = 3, KIND_VOLATILE = 4, KIND_SCRAMBLED = 5 };
#define KIND_MAGIC 0x646c66696c6c0000ull /* "dlfill\0\0" */

struct options {
	uint64_t mib;
	double dup, zero, unique, volatile_frac;
	double volatile_rate; /* pages per second */
	uint64_t fragment;    /* VMAs wanted; 0 = leave the region whole */
	int mergeable;
	int one_content; /* every dup page holds dup page 0's content */
	uint64_t seed, instance;
	int hold;
	const char *console;
};

struct layout {
	uint64_t pages;
	uint64_t dup, zero, unique, volatile_pages;
	uint64_t zero_start, unique_start, volatile_start;
};

static volatile sig_atomic_t stop_requested;
static volatile sig_atomic_t scramble_requested;
static volatile sig_atomic_t verify_requested;

#define MAX_REPORTED 16     /* mismatched page indices named in the verified line */
#define VOL_SCRAMBLED UINT64_MAX /* a volatile page last written by a scramble */

/* What the region holds now, beyond the layout: what a verification expects. */
struct history {
	uint64_t scramble_gen; /* generation of the last scramble; 0: never scrambled */
	uint64_t *vol_gen;     /* per volatile page: last generation written, or VOL_SCRAMBLED */
	uint64_t verify_seq;   /* verifications done */
};

/* The identity of a page's content: fill_page's arguments (kind 0: all zeros). */
struct content {
	enum page_kind kind;
	uint64_t index, instance, generation;
};

__attribute__((noreturn, format(printf, 2, 3)))
static void die(int status, const char *fmt, ...)
{
	va_list ap;
	fputs("dlfill: ", stderr);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	exit(status);
}

static uint64_t splitmix64(uint64_t *state)
{
	uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

/* Mix the page identity into one PRNG state; collisions here only affect the filler,
 * not page distinctness, which the header words guarantee. */
static uint64_t page_state(const uint64_t header[4], uint64_t seed)
{
	uint64_t s = seed;
	uint64_t acc = 0;
	for (int k = 0; k < 4; k++) {
		s ^= header[k] + 0x632be59bd9b4e019ull * (uint64_t)(k + 1);
		acc ^= splitmix64(&s);
	}
	return acc;
}

static void fill_page(uint64_t *page, uint64_t seed, enum page_kind kind, uint64_t index,
		      uint64_t instance, uint64_t generation)
{
	uint64_t header[4] = { KIND_MAGIC | (uint64_t)kind, index, instance, generation };
	uint64_t state = page_state(header, seed);
	memcpy(page, header, sizeof(header));
	for (size_t w = 4; w < WORDS_PER_PAGE; w++)
		page[w] = splitmix64(&state);
}

static uint64_t parse_u64(const char *name, const char *text)
{
	char *end;
	errno = 0;
	if (strchr(text, '-')) /* strtoull would silently wrap "-4" around */
		die(2, "--%s: expected an unsigned integer, got '%s'", name, text);
	unsigned long long v = strtoull(text, &end, 0);
	if (errno || end == text || *end)
		die(2, "--%s: expected an unsigned integer, got '%s'", name, text);
	return (uint64_t)v;
}

static double parse_fraction(const char *name, const char *text, double max)
{
	char *end;
	errno = 0;
	double v = strtod(text, &end);
	if (errno || end == text || *end || !isfinite(v) || v < 0 || v > max)
		die(2, "--%s: expected a number in [0, %g], got '%s'", name, max, text);
	return v;
}

static void usage(FILE *out)
{
	fputs("usage: dlfill --mib N [--dup F] [--zero F] [--unique F] [--volatile F]\n"
	      "              [--volatile-rate PAGES_PER_S] [--fragment VMAS] [--mergeable]\n"
	      "              [--one-content] [--seed S] [--instance I] [--hold]\n"
	      "              [--console PATH]\n"
	      "fractions default to 0 and must sum to 1\n",
	      out);
}

static struct options parse_args(int argc, char **argv)
{
	enum { O_MIB = 256, O_DUP, O_ZERO, O_UNIQUE, O_VOL, O_VRATE, O_FRAG, O_MERGE, O_SEED,
	       O_INST, O_HOLD, O_CONSOLE, O_ONE, O_HELP };
	static const struct option longopts[] = {
		{ "mib", required_argument, 0, O_MIB },
		{ "dup", required_argument, 0, O_DUP },
		{ "zero", required_argument, 0, O_ZERO },
		{ "unique", required_argument, 0, O_UNIQUE },
		{ "volatile", required_argument, 0, O_VOL },
		{ "volatile-rate", required_argument, 0, O_VRATE },
		{ "fragment", required_argument, 0, O_FRAG },
		{ "mergeable", no_argument, 0, O_MERGE },
		{ "seed", required_argument, 0, O_SEED },
		{ "instance", required_argument, 0, O_INST },
		{ "hold", no_argument, 0, O_HOLD },
		{ "console", required_argument, 0, O_CONSOLE },
		{ "one-content", no_argument, 0, O_ONE },
		{ "help", no_argument, 0, O_HELP },
		{ 0, 0, 0, 0 },
	};
	struct options o = { 0 };
	int have_mib = 0, c;

	opterr = 0; /* our own one-line errors instead of getopt's */
	/* A leading ':' makes a missing value come back as ':' rather than '?'. */
	while ((c = getopt_long(argc, argv, ":", longopts, NULL)) != -1) {
		switch (c) {
		case O_MIB: o.mib = parse_u64("mib", optarg); have_mib = 1; break;
		case O_DUP: o.dup = parse_fraction("dup", optarg, 1); break;
		case O_ZERO: o.zero = parse_fraction("zero", optarg, 1); break;
		case O_UNIQUE: o.unique = parse_fraction("unique", optarg, 1); break;
		case O_VOL: o.volatile_frac = parse_fraction("volatile", optarg, 1); break;
		case O_VRATE: o.volatile_rate = parse_fraction("volatile-rate", optarg, 1e9); break;
		case O_FRAG: o.fragment = parse_u64("fragment", optarg); break;
		case O_MERGE: o.mergeable = 1; break;
		case O_SEED: o.seed = parse_u64("seed", optarg); break;
		case O_INST: o.instance = parse_u64("instance", optarg); break;
		case O_HOLD: o.hold = 1; break;
		case O_CONSOLE: o.console = optarg; break;
		case O_ONE: o.one_content = 1; break;
		case O_HELP: usage(stdout); exit(0);
		case ':':
			die(2, "option '%s' needs a value", argv[optind - 1]);
		default:
			die(2, "bad option '%s' (see --help)", argv[optind - 1]);
		}
	}
	if (optind < argc)
		die(2, "unexpected argument '%s'", argv[optind]);
	if (!have_mib || o.mib == 0)
		die(2, "--mib N (N > 0) is required");
	/* Keep the byte count far from size_t overflow; 1 TiB is beyond any test here. */
	if (o.mib > (UINT64_C(1) << 20))
		die(2, "--mib %" PRIu64 " is too large", o.mib);
	double sum = o.dup + o.zero + o.unique + o.volatile_frac;
	if (fabs(sum - 1.0) > FRACTION_TOLERANCE)
		die(2, "fractions --dup + --zero + --unique + --volatile sum to %.9g, not 1", sum);
	return o;
}

static struct layout make_layout(const struct options *o)
{
	struct layout l = { 0 };
	l.pages = o->mib * ((1u << 20) / PAGE_BYTES);
	l.zero = (uint64_t)llround(o->zero * (double)l.pages);
	l.unique = (uint64_t)llround(o->unique * (double)l.pages);
	l.volatile_pages = (uint64_t)llround(o->volatile_frac * (double)l.pages);
	/* Three round-ups can overshoot by a page when dup is 0: take it back from the tail. */
	while (l.zero + l.unique + l.volatile_pages > l.pages) {
		if (l.volatile_pages) l.volatile_pages--;
		else if (l.unique) l.unique--;
		else l.zero--;
	}
	l.dup = l.pages - l.zero - l.unique - l.volatile_pages;
	l.zero_start = l.dup;
	l.unique_start = l.zero_start + l.zero;
	l.volatile_start = l.unique_start + l.unique;
	return l;
}

static double now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* PROT_NONE guard pages on both sides keep the region from merging with neighbouring
 * anonymous mappings, so its VMAs are exactly the ones we made. */
static uint8_t *map_region(uint64_t pages)
{
	size_t bytes = (size_t)pages * PAGE_BYTES;
	uint8_t *guard = mmap(NULL, bytes + 2 * PAGE_BYTES, PROT_NONE,
			      MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (guard == MAP_FAILED)
		die(1, "mmap of %zu bytes failed: %s", bytes, strerror(errno));
	uint8_t *region = mmap(guard + PAGE_BYTES, bytes, PROT_READ | PROT_WRITE,
			       MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
	if (region == MAP_FAILED)
		die(1, "mmap of %zu bytes failed: %s", bytes, strerror(errno));
	return region;
}

static void fill_region(uint8_t *region, const struct layout *l, const struct options *o)
{
	for (uint64_t i = 0; i < l->dup; i++)
		fill_page((uint64_t *)(region + i * PAGE_BYTES), o->seed, KIND_DUP,
			  o->one_content ? 0 : i, 0, 0);
	memset(region + l->zero_start * PAGE_BYTES, 0, l->zero * PAGE_BYTES);
	for (uint64_t i = 0; i < l->unique; i++)
		fill_page((uint64_t *)(region + (l->unique_start + i) * PAGE_BYTES), o->seed,
			  KIND_UNIQUE, i, o->instance, 0);
	for (uint64_t i = 0; i < l->volatile_pages; i++)
		fill_page((uint64_t *)(region + (l->volatile_start + i) * PAGE_BYTES), o->seed,
			  KIND_VOLATILE, i, o->instance, 0);
}

static long read_max_map_count(void)
{
	long v = -1;
	FILE *f = fopen("/proc/sys/vm/max_map_count", "r");
	if (f) {
		if (fscanf(f, "%ld", &v) != 1)
			v = -1;
		fclose(f);
	}
	return v;
}

/* N odd: protect pages 1,3,..,N-2 -> N VMAs with a writable tail.
 * N even: protect pages 0,2,..,N-2 -> N VMAs, the last one the writable rest. */
static void fragment_region(uint8_t *region, uint64_t vmas)
{
	if (vmas <= 1)
		return;
	uint64_t first = (vmas % 2) ? 1 : 0;
	for (uint64_t p = first; p + 1 < vmas; p += 2) {
		if (mprotect(region + p * PAGE_BYTES, PAGE_BYTES, PROT_READ) == 0)
			continue;
		int err = errno;
		die(1, "mprotect(page %" PRIu64 ") failed for --fragment %" PRIu64
		       ": %s (vm.max_map_count=%ld)", p, vmas, strerror(err), read_max_map_count());
	}
}

/* Count the VMAs of this process that overlap [start, end): what the kernel made of
 * our splits, not what we intended. Returns 0 when /proc is unavailable. */
static uint64_t count_vmas(uintptr_t start, uintptr_t end)
{
	FILE *f = fopen("/proc/self/maps", "r");
	if (!f)
		return 0;
	uint64_t n = 0;
	char line[512];
	while (fgets(line, sizeof(line), f)) {
		uintptr_t lo, hi;
		if (sscanf(line, "%" SCNxPTR "-%" SCNxPTR, &lo, &hi) == 2 && lo < end && hi > start)
			n++;
		/* Lines longer than the buffer (long paths) continue without a range: skip. */
		while (!strchr(line, '\n') && fgets(line, sizeof(line), f))
			;
	}
	fclose(f);
	return n;
}

static void on_signal(int sig)
{
	if (sig == SIGUSR1)
		scramble_requested = 1;
	else if (sig == SIGUSR2)
		verify_requested = 1;
	else
		stop_requested = 1;
}

static void install_handlers(void)
{
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_signal;
	sigemptyset(&sa.sa_mask);
	/* No SA_RESTART: a signal must cut the sleep short so we exit promptly. */
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGUSR1, &sa, NULL);
	sigaction(SIGUSR2, &sa, NULL);
}

/* The console first: whoever waits on stdout then finds the line on the console too. */
static void emit_line(const char *line, FILE *console)
{
	if (console) {
		fputs(line, console);
		fflush(console);
	}
	fputs(line, stdout);
	fflush(stdout);
}

/* Make every page of the region unique to this instance (see the header comment).
 * Fragmented pages are read-only, so the region is made writable first: the VMAs merge
 * back into one, which is fine at the end of a trial, where scrambling happens. */
static void scramble_region(uint8_t *region, const struct layout *l, const struct options *o,
			    struct history *h, FILE *console)
{
	double t0 = now_s();
	size_t bytes = (size_t)l->pages * PAGE_BYTES;
	if (mprotect(region, bytes, PROT_READ | PROT_WRITE) != 0)
		die(1, "mprotect before scrambling failed: %s", strerror(errno));
	uint64_t generation = ++h->scramble_gen;
	for (uint64_t i = 0; i < l->pages; i++)
		fill_page((uint64_t *)(region + i * PAGE_BYTES), o->seed, KIND_SCRAMBLED, i,
			  o->instance, generation);
	for (uint64_t k = 0; k < l->volatile_pages; k++)
		h->vol_gen[k] = VOL_SCRAMBLED;
	char line[160];
	snprintf(line, sizeof(line),
		 "DLFILL SCRAMBLED {\"pages\":%" PRIu64 ",\"generation\":%" PRIu64
		 ",\"scramble_s\":%.6f}\n", l->pages, generation, now_s() - t0);
	emit_line(line, console);
}

/* What page i of the region holds now, by the pattern and its history. */
static struct content expected_content(uint64_t i, const struct layout *l,
				       const struct options *o, const struct history *h)
{
	if (i >= l->volatile_start && h->vol_gen[i - l->volatile_start] != VOL_SCRAMBLED)
		return (struct content){ KIND_VOLATILE, i - l->volatile_start, o->instance,
					 h->vol_gen[i - l->volatile_start] };
	if (h->scramble_gen)
		return (struct content){ KIND_SCRAMBLED, i, o->instance, h->scramble_gen };
	if (i < l->zero_start)
		return (struct content){ KIND_DUP, o->one_content ? 0 : i, 0, 0 };
	if (i < l->unique_start)
		return (struct content){ 0, 0, 0, 0 };
	return (struct content){ KIND_UNIQUE, i - l->unique_start, o->instance, 0 };
}

static int same_content(const struct content *a, const struct content *b)
{
	return a->kind == b->kind && a->index == b->index && a->instance == b->instance &&
	       a->generation == b->generation;
}

/* Compare every page with its expected content and print the verified line. The
 * expected page is regenerated only when its identity changes (zero pages, one-content
 * dup pages), so a verification costs about one fill. */
static void verify_region(const uint8_t *region, const struct layout *l,
			  const struct options *o, struct history *h, FILE *console)
{
	static uint64_t want[WORDS_PER_PAGE];
	struct content have = { .kind = KIND_SCRAMBLED, .generation = UINT64_MAX };
	uint64_t mismatches = 0, first[MAX_REPORTED];
	double t0 = now_s();
	for (uint64_t i = 0; i < l->pages; i++) {
		struct content c = expected_content(i, l, o, h);
		if (!same_content(&c, &have)) {
			if (c.kind == 0)
				memset(want, 0, sizeof(want));
			else
				fill_page(want, o->seed, c.kind, c.index, c.instance, c.generation);
			have = c;
		}
		if (memcmp(region + i * PAGE_BYTES, want, PAGE_BYTES) == 0)
			continue;
		if (mismatches < MAX_REPORTED)
			first[mismatches] = i;
		mismatches++;
	}
	char line[160 + MAX_REPORTED * 22];
	int n = snprintf(line, sizeof(line),
			 "DLFILL VERIFIED {\"pages\":%" PRIu64 ",\"mismatches\":%" PRIu64
			 ",\"first\":[", l->pages, mismatches);
	for (uint64_t k = 0; k < mismatches && k < MAX_REPORTED; k++)
		n += snprintf(line + n, sizeof(line) - (size_t)n, "%s%" PRIu64, k ? "," : "",
			      first[k]);
	snprintf(line + n, sizeof(line) - (size_t)n,
		 "],\"seq\":%" PRIu64 ",\"verify_s\":%.6f}\n", ++h->verify_seq, now_s() - t0);
	emit_line(line, console);
}

/* Serve the requests the signal handler noted; runs between rewrites, never during. */
static void serve_requests(uint8_t *region, const struct layout *l, const struct options *o,
			   struct history *h, FILE *console)
{
	if (scramble_requested) {
		scramble_requested = 0;
		scramble_region(region, l, o, h, console);
	}
	if (verify_requested) {
		verify_requested = 0;
		verify_region(region, l, o, h, console);
	}
}

/* Rewrite volatile pages round robin at rate pages/s until a signal; each full pass
 * bumps the generation so a page never returns to content KSM has seen before. */
static void hold_region(uint8_t *region, const struct layout *l, const struct options *o,
			struct history *h, FILE *console)
{
	sigset_t block, old;
	sigemptyset(&block);
	sigaddset(&block, SIGTERM);
	sigaddset(&block, SIGINT);
	sigaddset(&block, SIGUSR1);
	sigaddset(&block, SIGUSR2);
	if (o->volatile_rate <= 0 || l->volatile_pages == 0) {
		sigprocmask(SIG_BLOCK, &block, &old);
		while (!stop_requested) {
			if (scramble_requested || verify_requested) {
				serve_requests(region, l, o, h, console);
				continue;
			}
			sigsuspend(&old); /* no lost wake-up between the check and the wait */
		}
		return;
	}
	const double tick_s = 0.01;
	uint64_t written = 0, next = 0, generation = 1;
	double t0 = now_s();
	while (!stop_requested) {
		serve_requests(region, l, o, h, console);
		uint64_t due = (uint64_t)((now_s() - t0) * o->volatile_rate);
		for (; written < due && !stop_requested; written++) {
			fill_page((uint64_t *)(region + (l->volatile_start + next) * PAGE_BYTES),
				  o->seed, KIND_VOLATILE, next, o->instance, generation);
			h->vol_gen[next] = generation;
			if (++next == l->volatile_pages) {
				next = 0;
				generation++;
			}
		}
		struct timespec ts = { 0, (long)(tick_s * 1e9) };
		nanosleep(&ts, NULL);
	}
}

static void emit_done(const struct layout *l, const struct options *o, uint64_t vmas,
		      double fill_s, uintptr_t addr, FILE *console)
{
	char line[512];
	snprintf(line, sizeof(line),
		 "DLFILL DONE {\"mib\":%" PRIu64 ",\"pages\":%" PRIu64 ",\"dup_pages\":%" PRIu64
		 ",\"zero_pages\":%" PRIu64 ",\"unique_pages\":%" PRIu64
		 ",\"volatile_pages\":%" PRIu64 ",\"vmas\":%" PRIu64 ",\"fill_s\":%.6f"
		 ",\"pid\":%ld,\"addr\":\"0x%" PRIxPTR "\",\"one_content\":%s}\n",
		 o->mib, l->pages, l->dup, l->zero, l->unique, l->volatile_pages, vmas, fill_s,
		 (long)getpid(), addr, o->one_content ? "true" : "false");
	if (fputs(line, stdout) == EOF || fflush(stdout) == EOF)
		die(1, "writing the done line to stdout failed: %s", strerror(errno));
	if (console && (fputs(line, console) == EOF || fflush(console) == EOF))
		die(1, "writing the done line to --console failed: %s", strerror(errno));
}

int main(int argc, char **argv)
{
	struct options o = parse_args(argc, argv);
	struct layout l = make_layout(&o);
	if (o.fragment > l.pages)
		die(2, "--fragment %" PRIu64 " exceeds the region's %" PRIu64 " pages", o.fragment,
		    l.pages);
	/* Rewriting a page that fragmentation made read-only would fault. */
	if (o.volatile_rate > 0 && l.volatile_pages && o.fragment > l.volatile_start + 1)
		die(2, "--fragment %" PRIu64 " reaches the volatile pages (from page %" PRIu64
		       "); lower it or drop --volatile-rate", o.fragment, l.volatile_start);
	if (sysconf(_SC_PAGESIZE) != PAGE_BYTES)
		die(1, "page size is %ld, dlfill assumes %u", sysconf(_SC_PAGESIZE), PAGE_BYTES);

	/* Open the console before the work so that a bad path fails fast. */
	FILE *console = NULL;
	if (o.console) {
		int fd = open(o.console, O_WRONLY | O_NOCTTY | O_APPEND | O_CLOEXEC);
		if (fd < 0 || !(console = fdopen(fd, "a")))
			die(1, "cannot open --console %s: %s", o.console, strerror(errno));
	}
	install_handlers();

	double t0 = now_s();
	uint8_t *region = map_region(l.pages);
	size_t bytes = (size_t)l.pages * PAGE_BYTES;
	if (o.mergeable && madvise(region, bytes, MADV_MERGEABLE) != 0)
		die(1, "madvise(MADV_MERGEABLE) failed: %s", strerror(errno));
	fill_region(region, &l, &o);
	fragment_region(region, o.fragment);
	double fill_s = now_s() - t0;

	uintptr_t start = (uintptr_t)region;
	uint64_t vmas = count_vmas(start, start + bytes);
	if (vmas == 0) /* no /proc: report what we built */
		vmas = o.fragment > 1 ? o.fragment : 1;
	emit_done(&l, &o, vmas, fill_s, start, console);
	if (o.hold) {
		/* Every volatile page starts at generation 0 (calloc's zeros, never touched
		 * until a rewrite or a verification reads them). */
		struct history h = { .vol_gen = calloc(l.volatile_pages ? l.volatile_pages : 1,
						       sizeof(uint64_t)) };
		if (!h.vol_gen)
			die(1, "cannot allocate the volatile page history: %s", strerror(errno));
		hold_region(region, &l, &o, &h, console);
		free(h.vol_gen);
	}
	return 0;
}
