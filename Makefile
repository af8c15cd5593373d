# aigate: build, test, sanitizer build, demo, benchmarks, install.
# `make demo` and `make test` install the Debian packages that are missing first (apt-get, as root or
# through sudo), so both work on a fresh Debian/Ubuntu machine.

PREFIX   ?= /usr/local
DATADIR  ?= $(PREFIX)/share/aigate
CC       ?= cc
PKGS     := lua5.4 libcurl libevent
CFLAGS   ?= -O2 -g
WARN     := -Wall -Wextra -Werror -Wshadow -Wstrict-prototypes -Wmissing-prototypes -Wno-missing-field-initializers
STD      := -std=c99 -D_DEFAULT_SOURCE -D_POSIX_C_SOURCE=200809L -pthread
DEPCFLAGS = $(shell pkg-config --cflags $(PKGS) 2>/dev/null || echo -I/usr/include/lua5.4)
DEPLIBS   = -l:liblua5.4-cjson.a $(shell pkg-config --libs $(PKGS) 2>/dev/null || echo -llua5.4 -lcurl -levent) -lm -pthread
ALL_CFLAGS = $(STD) $(WARN) $(CFLAGS) $(DEPCFLAGS) -DAIGATE_DATADIR='"$(DATADIR)"'
ASAN_FLAGS = -O1 -g -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined -DAIGATE_DEBUG

SRCS := src/main.c src/core.c src/task.c src/http_client.c src/http_server.c src/lane.c src/jsonscan.c src/sse.c src/buf.c
HDRS := $(wildcard src/*.h)

# The id rule's scanner against lua-cjson (tests/fuzz/fuzz_line_id.c).
FUZZ_TARGETS += line_id
FUZZ_line_id_SRCS := src/jsonscan.c src/buf.c
FUZZ_line_id_LIBS := -l:liblua5.4-cjson.a $(shell pkg-config --libs lua5.4 2>/dev/null || echo -llua5.4) -lm

UNIT_TESTS := $(patsubst tests/unit/%.c,tests/unit/%,$(wildcard tests/unit/test_*.c))
UNIT_LIB := src/sse.c src/buf.c tests/unit/unit.c

DEB_PACKAGES := gcc make pkg-config liblua5.4-dev libcurl4-openssl-dev lua-cjson-dev libevent-dev curl ca-certificates \
                openssl \
                lua-check

.PHONY: all test asan demo bench bench-instructions deps install uninstall clean units lint format

all: aigate

aigate: $(SRCS) $(HDRS)
	$(CC) $(ALL_CFLAGS) -o $@ $(SRCS) $(DEPLIBS)

aigate-asan: $(SRCS) $(HDRS)
	$(CC) $(STD) $(WARN) $(ASAN_FLAGS) $(DEPCFLAGS) -o $@ $(SRCS) $(DEPLIBS)

tests/unit/%: tests/unit/%.c $(UNIT_LIB) $(HDRS) tests/unit/unit.h
	$(CC) $(ALL_CFLAGS) -Isrc -o $@ $< $(UNIT_LIB) $(DEPLIBS)

units: $(UNIT_TESTS)

# Installs the Debian packages the build and the tests need, when some are missing.
deps:
	@missing=""; for p in $(DEB_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

test: deps
	$(MAKE) aigate units
	AIGATE_BIN=./aigate tests/run.sh

asan: deps
	$(MAKE) aigate-asan
	$(MAKE) clean-units
	$(MAKE) units CFLAGS="$(ASAN_FLAGS)"
	ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 UBSAN_OPTIONS=print_stacktrace=1 AIGATE_BIN=./aigate-asan AIGATE_ASAN=1 tests/run.sh; \
	  rc=$$?; $(MAKE) clean-units; exit $$rc

demo: deps
	$(MAKE) aigate
	tests/demo.sh

bench: deps
	$(MAKE) aigate
	$(MAKE) -C tests/bench
	tests/bench/run.sh
	tests/bench/limits.sh

# Instructions per request (callgrind): figures that do not move between runs, for judging a change.
bench-instructions: deps
	$(MAKE) aigate
	$(MAKE) -C tests/bench
	$(MAKE) deps DEB_PACKAGES=valgrind
	tests/bench/instructions.sh

# luacheck over every Lua file (part of `make test` too), and clang-format's verdict on the C sources.
lint:
	luacheck -q lua scripts tests/lua tests/e2e/json_get.lua tests/e2e/upstream.lua
	@if command -v clang-format >/dev/null 2>&1; then \
	  clang-format --dry-run --Werror src/*.c src/*.h tests/unit/*.c tests/unit/*.h tests/bench/*.c tests/bench/*.h && echo "clang-format: clean"; \
	else echo "clang-format not installed: C formatting not checked"; fi

format:
	clang-format -i src/*.c src/*.h tests/unit/*.c tests/unit/*.h tests/bench/*.c tests/bench/*.h

install: aigate
	install -d $(DESTDIR)$(PREFIX)/bin
	install -m 755 aigate $(DESTDIR)$(PREFIX)/bin/aigate
	cd lua && find aigate -name '*.lua' | while read f; do \
	  install -D -m 644 "$$f" "$(DESTDIR)$(DATADIR)/$$f" || exit 1; done

uninstall:
	rm -f $(DESTDIR)$(PREFIX)/bin/aigate
	rm -rf $(DESTDIR)$(DATADIR)

clean-units:
	rm -f $(UNIT_TESTS)

clean: clean-units
	rm -f aigate aigate-asan
