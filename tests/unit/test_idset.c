/* test_idset.c: unit tests of the id set (src/idset.c). */
#include <stdio.h>
#include <string.h>

#include "idset.h"
#include "jsonscan.h"
#include "unit.h"

static long long add(struct idset *set, const char *id, long long lineno)
{
    return idset_add(set, id, strlen(id), lineno);
}

static void test_basics(void)
{
    struct idset set;

    idset_init(&set);
    CHECK(idset_find(&set, "a", 1) == 0, "an empty set finds nothing");
    CHECK(add(&set, "a", 1) == 0, "a new id: 0");
    CHECK(add(&set, "b", 2) == 0, "another new id: 0");
    CHECK(add(&set, "a", 5) == 1, "a repeated id: the line it was first seen on");
    CHECK(add(&set, "a", 9) == 1, "the first line is kept, not the last");
    CHECK(set.n == 2, "repeats are not counted");
    CHECK(idset_find(&set, "b", 1) == 2, "find: the line of an id");
    CHECK(idset_find(&set, "c", 1) == 0, "find: 0 for an id not there");
    CHECK(add(&set, "", 3) == 0 && add(&set, "", 4) == 3, "the empty id is an id");
    CHECK(idset_add(&set, "a\0b", 3, 6) == 0 && idset_add(&set, "a\0c", 3, 7) == 0,
          "ids with NUL bytes differ past it");
    CHECK(idset_add(&set, "a\0b", 3, 8) == 6, "and repeat by all their bytes");
    CHECK(add(&set, "ab", 10) == 0, "a prefix of an id is another id");
    CHECK(add(&set, "z", 0) == -1 && idset_find(&set, "z", 1) == 0, "line 0 is refused, nothing added");
    CHECK(add(&set, "big", 5000000000LL) == 0 && idset_find(&set, "big", 3) == 4294967295LL,
          "a line past 2^32 - 1 is kept as 2^32 - 1");
    idset_free(&set);
    CHECK(set.e == NULL && set.n == 0 && set.keys.data == NULL, "free empties the set");
    idset_free(&set);
    CHECK(set.cap == 0, "free twice is harmless");
}

/* Many ids through several doublings: every one found again with its line, repeats reported. */
static void test_growth(void)
{
    struct idset set;
    char id[32];
    long i;
    long wrong = 0;

    idset_init(&set);
    for (i = 1; i <= 200000; i++) {
        snprintf(id, sizeof(id), "req-%ld", i);
        if (add(&set, id, i) != 0)
            wrong++;
    }
    CHECK(wrong == 0, "200000 distinct ids are new");
    CHECK(set.n == 200000 && set.n * 4 <= set.cap * 3, "counted, the table at most three quarters full");
    for (i = 1; i <= 200000; i++) {
        snprintf(id, sizeof(id), "req-%ld", i);
        if (idset_find(&set, id, strlen(id)) != i || add(&set, id, i + 300000) != i)
            wrong++;
    }
    CHECK(wrong == 0, "each found again with its first line after the table grew");
    CHECK(set.n == 200000, "repeats added nothing");
    idset_free(&set);
}

/* Ids whose hashes share their low 10 bits all start at one slot of the 1024-slot table: each is
 * still found, the probe walking past the others. */
static void test_collisions(void)
{
    struct idset set;
    char ids[700][16];
    char id[16];
    int n = 0;
    int i;
    int wrong = 0;

    for (i = 0; n < 700; i++) {
        snprintf(id, sizeof(id), "c%d", i);
        if ((js_hash(id, strlen(id)) & 1023) == 0)
            memcpy(ids[n++], id, sizeof(id));
    }
    idset_init(&set);
    for (i = 0; i < n; i++)
        if (add(&set, ids[i], i + 1) != 0)
            wrong++;
    CHECK(wrong == 0 && set.cap == 1024, "700 ids of one slot, in a table that did not grow");
    for (i = 0; i < n; i++)
        if (idset_find(&set, ids[i], strlen(ids[i])) != i + 1 || add(&set, ids[i], 999) != i + 1)
            wrong++;
    CHECK(wrong == 0, "each found with its line");
    CHECK(idset_find(&set, "c-none", 6) == 0, "an id not there is not found");
    idset_free(&set);
}

int main(void)
{
    test_basics();
    test_growth();
    test_collisions();
    return unit_finish();
}
