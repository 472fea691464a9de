/* Large blocks for XLA:CPU's buffers, kept mapped between calls and architectures.

   Loaded with LD_PRELOAD (wrcor_jax/allocator.py). Aligned requests of LARGE bytes or more
   (XLA:CPU asks for its buffers through posix_memalign / aligned_alloc) are cut from one
   reserved address range, best fit, and go back to a free list on free(), their whole pages
   marked MADV_FREE instead of unmapped: they stay mapped and cost no fault when a later
   call reuses them, but the kernel may take them whenever the machine needs the memory.
   Everything else is glibc's. glibc offers no such release: its trim unmaps, and on a
   virtual machine that reports free pages to its host a GB unmapped took 1.3-1.5 s to touch
   again (docs/mbv2_engine.md). */

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

extern void *__libc_malloc(size_t);
extern void *__libc_realloc(void *, size_t);
extern void __libc_free(void *);
extern void *__libc_memalign(size_t, size_t);

#define LARGE ((size_t)1 << 20)      /* smaller requests stay glibc's */
#define GRAIN ((size_t)64 << 10)     /* blocks are whole multiples of this */
#define HUGE_PAGE ((size_t)2 << 20)  /* free advises whole 2 MB pages only */
#define MAX_RANGES 65536             /* free ranges; beyond that, glibc serves */

typedef struct {
  uintptr_t start, end;
} range_t;

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static uintptr_t base, limit;     /* the reserved address range; base 0 until reserved */
static int unavailable;           /* reserving failed: glibc serves everything */
static range_t free_ranges[MAX_RANGES];  /* sorted by address, never adjacent */
static size_t n_free;
static size_t in_use;             /* bytes of blocks handed out, headers and rounding too */
static uintptr_t touched;         /* the highest address ever handed out */
static size_t machine;            /* bytes of memory the machine has */

static uintptr_t round_up(uintptr_t x, size_t to) { return (x + to - 1) / to * to; }
static uintptr_t round_down(uintptr_t x, size_t to) { return x / to * to; }

/* Whether the kernel counts every mapping against a commit limit (vm.overcommit_memory 2):
   there a reserved range would be charged in full, so glibc serves everything. */
static int strict_overcommit(void) {
  int fd = open("/proc/sys/vm/overcommit_memory", O_RDONLY | O_CLOEXEC);
  char mode = '0';
  if (fd >= 0) {
    if (read(fd, &mode, 1) != 1) mode = '0';
    close(fd);
  }
  return mode == '2';
}

/* Reserve twice the machine's memory (address space only), else less: 2 MB aligned so
   that transparent huge pages cover it from its first byte. */
static int reserve(void) {
  if (base || unavailable) return base != 0;
  machine = (size_t)sysconf(_SC_PHYS_PAGES) * sysconf(_SC_PAGE_SIZE);
  for (size_t size = round_up(machine * 2, HUGE_PAGE); size >= ((size_t)1 << 30); size /= 2) {
    if (strict_overcommit()) break;
    void *p = mmap(NULL, size + HUGE_PAGE, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) continue;
    base = round_up((uintptr_t)p, HUGE_PAGE);
    limit = base + size;
    madvise((void *)base, size, MADV_HUGEPAGE);
    free_ranges[0] = (range_t){base, limit};
    n_free = 1;
    touched = base;
    return 1;
  }
  unavailable = 1;
  return 0;
}

static int ours(const void *p) { return (uintptr_t)p > base && (uintptr_t)p < limit; }

/* glibc's header for a mapped chunk sits just before the pointer, so that
   malloc_usable_size and friends keep working on our blocks; the word before it holds our
   block's start. */
static void write_header(uintptr_t block, uintptr_t user, size_t size) {
  ((uintptr_t *)user)[-2] = block;
  ((size_t *)user)[-1] = (size - (user - block)) | 2; /* 2: IS_MMAPPED */
}

static uintptr_t block_of(const void *p) { return ((const uintptr_t *)p)[-2]; }
static size_t block_size(const void *p) {
  return (((const size_t *)p)[-1] & ~(size_t)7) + ((uintptr_t)p - block_of(p));
}

/* Best fit: the smallest free range that holds `size`, the lowest of equals. */
static void *take(size_t size, size_t alignment) {
  size_t header = round_up(2 * sizeof(size_t), alignment);
  size_t need = round_up(size + header, GRAIN);
  size_t best = n_free;
  for (size_t i = 0; i < n_free; i++) {
    size_t len = free_ranges[i].end - free_ranges[i].start;
    if (len >= need && (best == n_free || len < free_ranges[best].end - free_ranges[best].start))
      best = i;
  }
  if (best == n_free) return NULL;
  uintptr_t block = free_ranges[best].start;
  free_ranges[best].start += need;
  if (free_ranges[best].start == free_ranges[best].end) {
    memmove(&free_ranges[best], &free_ranges[best + 1], (n_free - best - 1) * sizeof(range_t));
    n_free--;
  }
  in_use += need;
  if (block + need > touched) touched = block + need;
  uintptr_t user = block + header;
  write_header(block, user, need);
  return (void *)user;
}

/* Put a block back, merged with the free ranges beside it; 0 where the list is full. */
static int give_back(uintptr_t start, uintptr_t end) {
  size_t lo = 0, hi = n_free; /* the first range after `start` */
  while (lo < hi) {
    size_t mid = (lo + hi) / 2;
    if (free_ranges[mid].start < start) lo = mid + 1; else hi = mid;
  }
  int joins_left = lo > 0 && free_ranges[lo - 1].end == start;
  int joins_right = lo < n_free && free_ranges[lo].start == end;
  if (joins_left && joins_right) {
    free_ranges[lo - 1].end = free_ranges[lo].end;
    memmove(&free_ranges[lo], &free_ranges[lo + 1], (n_free - lo - 1) * sizeof(range_t));
    n_free--;
  } else if (joins_left) {
    free_ranges[lo - 1].end = end;
  } else if (joins_right) {
    free_ranges[lo].start = start;
  } else {
    if (n_free == MAX_RANGES) return 0;
    memmove(&free_ranges[lo + 1], &free_ranges[lo], (n_free - lo) * sizeof(range_t));
    free_ranges[lo] = (range_t){start, end};
    n_free++;
  }
  return 1;
}

/* Mark MADV_FREE the whole 2 MB pages of the block just given back [start, end) that lie
   in free memory now (a page shared with a block in use waits for that block's free; a
   partial page would be split): still mapped, reused without a fault, but the kernel's to
   take if it needs the memory. Under the lock, so that no one is handed them meanwhile. */
static void advise_free(uintptr_t start, uintptr_t end) {
  size_t i = 0;
  while (free_ranges[i].end < end) i++; /* the free range that now holds the block */
  uintptr_t lo = round_down(start, HUGE_PAGE), hi = round_up(end, HUGE_PAGE);
  if (lo < free_ranges[i].start) lo += HUGE_PAGE;
  if (hi > free_ranges[i].end) hi -= HUGE_PAGE;
  if (hi > lo) madvise((void *)lo, hi - lo, MADV_FREE);
}

static void *large(size_t alignment, size_t size) {
  if (size < LARGE || alignment > GRAIN || (alignment & (alignment - 1))) return NULL;
  void *p = NULL;
  pthread_mutex_lock(&lock);
  /* More than the machine has goes to glibc, whose mmap fails at once (a clean error)
     where the kernel refuses it: cut from the range it would be granted, then killed. */
  if (reserve() && size <= machine) p = take(size, alignment < 16 ? 16 : alignment);
  pthread_mutex_unlock(&lock);
  return p;
}

void free(void *p) {
  if (!p || !ours(p)) {
    __libc_free(p);
    return;
  }
  uintptr_t start = block_of(p);
  size_t size = block_size(p);
  pthread_mutex_lock(&lock);
  if (give_back(start, start + size)) { /* a full list leaks the block, never corrupts it */
    in_use -= size;
    advise_free(start, start + size);
  }
  pthread_mutex_unlock(&lock);
}

int posix_memalign(void **out, size_t alignment, size_t size) {
  if (alignment < sizeof(void *) || (alignment & (alignment - 1))) return EINVAL;
  void *p = large(alignment, size);
  if (!p) p = __libc_memalign(alignment, size);
  if (!p) return ENOMEM;
  *out = p;
  return 0;
}

void *aligned_alloc(size_t alignment, size_t size) {
  void *p = large(alignment, size);
  return p ? p : __libc_memalign(alignment, size);
}

void *memalign(size_t alignment, size_t size) { return aligned_alloc(alignment, size); }

void *realloc(void *p, size_t size) {
  if (!p || !ours(p)) return __libc_realloc(p, size);
  size_t usable = block_size(p) - ((uintptr_t)p - block_of(p));
  if (size <= usable) return p;
  void *q = __libc_malloc(size);
  if (q) {
    memcpy(q, p, usable);
    free(p);
  }
  return q;
}

void *reallocarray(void *p, size_t n, size_t size) {
  size_t bytes;
  if (__builtin_mul_overflow(n, size, &bytes)) {
    errno = ENOMEM;
    return NULL;
  }
  return realloc(p, bytes);
}

/* Bytes of blocks in use, and bytes handed out at some time and free now. */
void wrcor_large_blocks_usage(size_t *used, size_t *free_within) {
  pthread_mutex_lock(&lock);
  *used = in_use;
  *free_within = base ? (touched - base) - in_use : 0;
  pthread_mutex_unlock(&lock);
}
