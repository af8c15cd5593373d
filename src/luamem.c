/*
 * luamem.c: the Lua state's allocator (see luamem.h).
 */
#include "luamem.h"

#include <stdlib.h>
#include <string.h>

#if defined(__has_feature)
#if __has_feature(address_sanitizer)
#define LUAMEM_ASAN 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__)
#define LUAMEM_ASAN 1
#endif

#ifdef LUAMEM_ASAN
#include <sanitizer/asan_interface.h>
#define POISON(p, n)   ASAN_POISON_MEMORY_REGION((p), (n))
#define UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION((p), (n))
#else
#define POISON(p, n)   ((void)(p), (void)(n))
#define UNPOISON(p, n) ((void)(p), (void)(n))
#endif

/* A slab: this header, then its blocks (the header's size keeps them LUAMEM_GRAIN-aligned). */
struct luamem_slab {
    struct luamem_slab *next;
    size_t size;
};
#define SLAB_HEADER LUAMEM_GRAIN

/* The class of a block of n bytes (1 <= n <= LUAMEM_MAX) and that class's block size. */
static size_t class_of(size_t n)
{
    return (n - 1) / LUAMEM_GRAIN;
}

static size_t class_size(size_t c)
{
    return (c + 1) * LUAMEM_GRAIN;
}

/* Adds a slab of blocks to class c's (empty) free list; 0, or -1 when malloc fails. */
static int refill(struct luamem *m, size_t c)
{
    size_t bs = class_size(c);
    size_t size = m->slab_size[c] ? m->slab_size[c] : LUAMEM_SLAB_MIN;
    size_t n = (size - SLAB_HEADER) / bs;
    struct luamem_slab *slab = malloc(size);
    char *first;
    size_t i;

    if (slab == NULL)
        return -1;
    slab->size = size;
    slab->next = m->slabs;
    m->slabs = slab;
    m->slab_bytes += size;
    if (size < LUAMEM_SLAB_MAX)
        m->slab_size[c] = size * 2;
    first = (char *)slab + SLAB_HEADER;
    for (i = 0; i + 1 < n; i++)
        memcpy(first + i * bs, &(void *){ first + (i + 1) * bs }, sizeof(void *));
    memcpy(first + (n - 1) * bs, &(void *){ m->free[c] }, sizeof(void *));
    m->free[c] = first;
    POISON(first, n * bs);
    return 0;
}

static void *take(struct luamem *m, size_t n)
{
    size_t c = class_of(n);
    char *b = m->free[c];

    if (b == NULL) {
        if (refill(m, c) != 0)
            return NULL;
        b = m->free[c];
    }
    UNPOISON(b, sizeof(void *));
    memcpy(&m->free[c], b, sizeof(void *));
    UNPOISON(b, n);
    return b;
}

static void give(struct luamem *m, void *b, size_t n)
{
    size_t c = class_of(n);

    UNPOISON(b, sizeof(void *));
    memcpy(b, &m->free[c], sizeof(void *));
    m->free[c] = b;
    POISON(b, class_size(c));
}

void *luamem_alloc(void *ud, void *ptr, size_t osize, size_t nsize)
{
    struct luamem *m = ud;
    void *nb;

    if (ptr == NULL) /* (osize is then the kind of object, not a size) */
        return nsize == 0 ? NULL : nsize <= LUAMEM_MAX ? take(m, nsize) : malloc(nsize);
    if (nsize == 0) {
        if (osize <= LUAMEM_MAX)
            give(m, ptr, osize);
        else
            free(ptr);
        return NULL;
    }
    if (osize > LUAMEM_MAX && nsize > LUAMEM_MAX)
        return realloc(ptr, nsize);
    if (osize <= LUAMEM_MAX && nsize <= LUAMEM_MAX && class_of(osize) == class_of(nsize)) {
        POISON(ptr, class_size(class_of(osize)));
        UNPOISON(ptr, nsize);
        return ptr;
    }
    nb = nsize <= LUAMEM_MAX ? take(m, nsize) : malloc(nsize);
    if (nb == NULL)
        return NULL; /* Lua collects and tries again, or raises a memory error; ptr is kept */
    memcpy(nb, ptr, osize < nsize ? osize : nsize);
    if (osize <= LUAMEM_MAX)
        give(m, ptr, osize);
    else
        free(ptr);
    return nb;
}

void luamem_close(struct luamem *m)
{
    struct luamem_slab *s = m->slabs;

    while (s != NULL) {
        struct luamem_slab *next = s->next;
        UNPOISON(s, s->size);
        free(s);
        s = next;
    }
    memset(m, 0, sizeof(*m));
}
