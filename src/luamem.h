/*
 * luamem.h: the Lua state's allocator. Small blocks (most of what Lua allocates: strings, tables,
 * closures, table parts, coroutines' stacks) come from free lists of fixed size classes carved from
 * slabs; larger ones from malloc.
 *
 * Why: serve creates and drops some hundred small objects per request, and glibc's malloc and free
 * took 14 % of serve's CPU at 64 connections (perf), much of it consolidating and unlinking chunks.
 * Lua tells the allocator each block's size when it frees or resizes it, so a free list needs no
 * header and a block's size class is known without a lookup.
 *
 * What is freed goes back to its class's list and stays there for Lua's next allocations: the slabs
 * go back to the system when the state closes (luamem_close). The memory is bounded by the Lua heap's
 * peak, which Lua's collector bounds.
 *
 * Under AddressSanitizer, blocks on the free lists and a block's bytes past its size are poisoned, so
 * a use after free or an overflow in a pooled block is still reported.
 */
#ifndef AIGATE_LUAMEM_H
#define AIGATE_LUAMEM_H

#include <stddef.h>

#define LUAMEM_GRAIN    16  /* the size classes' step (and blocks' alignment) */
#define LUAMEM_MAX      512 /* larger blocks come from malloc */
#define LUAMEM_CLASSES  (LUAMEM_MAX / LUAMEM_GRAIN)
#define LUAMEM_SLAB_MIN 4096
#define LUAMEM_SLAB_MAX (64 * 1024)

struct luamem_slab;

struct luamem {
    void *free[LUAMEM_CLASSES];       /* each class's free blocks, linked through their first word */
    size_t slab_size[LUAMEM_CLASSES]; /* the next slab's size for that class (doubles up to the max) */
    struct luamem_slab *slabs;        /* every slab, for luamem_close */
    size_t slab_bytes;                /* their total size */
};

/* A lua_Alloc: lua_newstate(luamem_alloc, &a_struct_luamem_zeroed). */
void *luamem_alloc(void *ud, void *ptr, size_t osize, size_t nsize);

/* Frees the slabs, after lua_close. */
void luamem_close(struct luamem *m);

#endif
