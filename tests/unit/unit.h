/*
 * unit.h: a minimal harness for the C unit tests. Each check prints `ok - name` or
 * `not ok - name: detail`; unit_finish prints `N passed, N failed` and returns the exit status.
 */
#ifndef AIGATE_UNIT_H
#define AIGATE_UNIT_H

void unit_check(int cond, const char *file, const char *name, const char *detail);
int unit_finish(void);

#define CHECK(cond, name) unit_check((cond), __FILE__, (name), #cond)

#endif
