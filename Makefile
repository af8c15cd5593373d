# aigate: build, test, sanitizer build, fuzzing, valgrind, demo, benchmarks, install.
# `make demo` and `make test` install the Debian packages that are missing first (apt-get, as root or
# through sudo), so both work on a fresh Debian/Ubuntu machine.

PREFIX   ?= /usr/local
# Where installs before the library was built into the binary put the Lua files: uninstall removes them.
DATADIR  ?= $(PREFIX)/share/aigate
CC       ?= cc
PKGS     := lua5.4 libcurl libevent
CFLAGS   ?= -O2 -g
WARN     := -Wall -Wextra -Werror -Wshadow -Wstrict-prototypes -Wmissing-prototypes -Wno-missing-field-initializers
STD      := -std=c99 -D_DEFAULT_SOURCE -D_POSIX_C_SOURCE=200809L -pthread
DEPCFLAGS = $(shell pkg-config --cflags $(PKGS) 2>/dev/null || echo -I/usr/include/lua5.4)
DEPLIBS   = -l:liblua5.4-cjson.a $(shell pkg-config --libs $(PKGS) 2>/dev/null || echo -llua5.4 -lcurl -levent) -lm -pthread
ALL_CFLAGS = $(STD) $(WARN) $(CFLAGS) $(DEPCFLAGS)
ASAN_FLAGS = -O1 -g -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined -DAIGATE_DEBUG
# The sanitizer build uses clang when it is there (`make asan` installs it): clang's UBSan also flags
# arithmetic on a NULL pointer (NULL + 0, part of -fsanitize=pointer-overflow), which gcc's does not.
ASAN_CC  ?= $(shell command -v clang >/dev/null 2>&1 && echo clang || echo $(CC))
CLANG_PACKAGES := clang libclang-rt-dev
LUA_LIBS  = $(shell pkg-config --libs lua5.4 2>/dev/null || echo -llua5.4)

SRCS := src/main.c src/core.c src/task.c src/http_client.c src/http_server.c src/http_guard.c src/jsonscan.c \
        src/sse.c src/buf.c src/headers.c src/linereader.c src/idset.c \
        src/scan.c src/sys.c src/engine.c src/reply.c src/tmpl.c src/jsontext.c src/lineshape.c \
        src/library.c src/logfile.c src/jsonfields.c src/pool.c src/luamem.c
HDRS := $(wildcard src/*.h)
UNIT_TESTS := $(patsubst tests/unit/%.c,tests/unit/%,$(wildcard tests/unit/test_*.c))
UNIT_LIB := src/sse.c src/buf.c src/headers.c src/linereader.c src/idset.c src/jsonscan.c src/scan.c src/jsontext.c \
            src/tmpl.c src/lineshape.c src/reply.c src/pool.c src/luamem.c tests/unit/unit.c

DEB_PACKAGES := gcc make pkg-config liblua5.4-dev libcurl4-openssl-dev lua-cjson-dev libevent-dev curl ca-certificates \
                openssl \
                lua-check strace lua-penlight lua-filesystem \
                nodejs npm

.PHONY: all test asan asan-build fuzz fuzz-build fuzz-replays valgrind demo bench bench-startup bench-instructions deps \
        bench-serve bench-serve-deps \
        install uninstall clean clean-units units lint format

# ---- fuzz harnesses (tests/fuzz/) ------------------------------------------------------------------
# A harness is tests/fuzz/fuzz_<name>.c (libFuzzer's LLVMFuzzerTestOneInput), declared here with
#   FUZZ_TARGETS += <name>
#   FUZZ_<name>_SRCS := the src/*.c files it links besides itself
#   FUZZ_<name>_LIBS := extra libraries (optional)
# and its corpus, seeds and every input that ever crashed it, is tests/fuzz/corpus/<name>/. The rules
# further down build tests/fuzz/fuzz_<name> (clang, libFuzzer, ASan, UBSan) for `make fuzz`, and
# tests/fuzz/replay_<name> (the harness and tests/fuzz/replay.c, normal compiler) with which `make test`
# replays the corpus. Nothing else needs to change for a new harness.
FUZZ_TARGETS += sse
FUZZ_sse_SRCS := src/sse.c src/buf.c
FUZZ_sse_LIBS := $(LUA_LIBS)

FUZZ_TARGETS += headers
FUZZ_headers_SRCS := src/headers.c src/buf.c
FUZZ_headers_LIBS := $(LUA_LIBS) -lcurl

# The HTTP server's request parsing (evhttp under src/http_guard.c's limits), fed one connection's bytes.
FUZZ_TARGETS += http_request
FUZZ_http_request_SRCS := src/http_guard.c
FUZZ_http_request_LIBS := -levent

# The line reader against a plain split of the same bytes, fed through a pipe in pieces.
FUZZ_TARGETS += linereader
FUZZ_linereader_SRCS := src/linereader.c src/buf.c

# The id rule's scanner against lua-cjson (tests/fuzz/fuzz_line_id.c).
# The engine's reading of a line's shape and its writing of strings, against lua-cjson.
FUZZ_TARGETS += lineshape
FUZZ_lineshape_SRCS := src/lineshape.c src/jsonscan.c src/jsontext.c src/buf.c
FUZZ_lineshape_LIBS := -l:liblua5.4-cjson.a $(LUA_LIBS) -lm

FUZZ_TARGETS += line_id
FUZZ_line_id_SRCS := src/jsonscan.c src/buf.c
FUZZ_line_id_LIBS := -l:liblua5.4-cjson.a $(LUA_LIBS) -lm

all: aigate

# The Lua library built into the binary (src/library.h): every .lua under lua/, listed anew by each
# make, compiled to bytecode by tools/embed_lua (built with this Lua). A directory's time changes when
# a file is added to it or removed, so that rebuilds the library too. The generated file is data only:
# one object, for aigate and aigate-asan alike.
LUA_SRCS := $(shell find lua -name '*.lua' | LC_ALL=C sort)
LUA_DIRS := $(shell find lua -type d)
LIBRARY_OBJ := gen/lua_library.o

tools/embed_lua: tools/embed_lua.c
	$(CC) $(ALL_CFLAGS) -o $@ $< $(LUA_LIBS)

gen/lua_library.c: tools/embed_lua $(LUA_SRCS) $(LUA_DIRS)
	@mkdir -p gen
	tools/embed_lua $@ lua $(LUA_SRCS)

$(LIBRARY_OBJ): gen/lua_library.c src/library.h
	$(CC) $(STD) $(CFLAGS) $(DEPCFLAGS) -Isrc -c -o $@ $<

aigate: $(SRCS) $(HDRS) $(LIBRARY_OBJ)
	$(CC) $(ALL_CFLAGS) -o $@ $(SRCS) $(LIBRARY_OBJ) $(DEPLIBS)

aigate-asan: $(SRCS) $(HDRS) $(LIBRARY_OBJ)
	$(ASAN_CC) $(STD) $(WARN) $(ASAN_FLAGS) $(DEPCFLAGS) -o $@ $(SRCS) $(LIBRARY_OBJ) $(DEPLIBS)

tests/unit/%: tests/unit/%.c $(UNIT_LIB) $(HDRS) tests/unit/unit.h
	$(CC) $(ALL_CFLAGS) -Isrc -o $@ $< $(UNIT_LIB) $(DEPLIBS)

units: $(UNIT_TESTS)

# The fuzz rules expand each harness's variables when a rule is used, after the whole Makefile is read,
# so FUZZ_TARGETS lines anywhere in it count. LLVMFuzzerTestOneInput has no header: harnesses are built
# without -Wmissing-prototypes.
FUZZ_CC      ?= clang
FUZZ_FLAGS   := -O1 -g -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer
FUZZ_SECONDS ?= 60
FUZZ_OUT     ?= tests/fuzz/out
FUZZ_HDRS    := $(wildcard tests/fuzz/*.h)
FUZZ_BINS     = $(FUZZ_TARGETS:%=tests/fuzz/fuzz_%)
FUZZ_REPLAYS  = $(FUZZ_TARGETS:%=tests/fuzz/replay_%)

.SECONDEXPANSION:
tests/fuzz/fuzz_%: tests/fuzz/fuzz_%.c $$(FUZZ_$$*_SRCS) $(HDRS) $(FUZZ_HDRS)
	$(FUZZ_CC) $(STD) $(WARN) -Wno-missing-prototypes $(FUZZ_FLAGS) $(DEPCFLAGS) -Isrc -o $@ $< \
	  $(FUZZ_$*_SRCS) $(FUZZ_$*_LIBS) -lm

tests/fuzz/replay_%: tests/fuzz/fuzz_%.c tests/fuzz/replay.c $$(FUZZ_$$*_SRCS) $(HDRS) $(FUZZ_HDRS)
	$(CC) $(ALL_CFLAGS) -Wno-missing-prototypes -Isrc -o $@ $< tests/fuzz/replay.c \
	  $(FUZZ_$*_SRCS) $(FUZZ_$*_LIBS) -lm

fuzz-build: $$(FUZZ_BINS)

fuzz-replays: $$(FUZZ_REPLAYS)

# Runs each harness for FUZZ_SECONDS (one: `make fuzz FUZZ_TARGETS=sse`), seeded with its committed
# corpus; new inputs go to $(FUZZ_OUT)/<name>/new, crashes to $(FUZZ_OUT)/<name>/crashes (the
# corpus only grows by commits). Fails when a harness crashed, saying where the input is.
fuzz:
	$(MAKE) deps DEB_PACKAGES="$(CLANG_PACKAGES)"
	$(MAKE) fuzz-build
	FUZZ_SECONDS=$(FUZZ_SECONDS) FUZZ_OUT=$(FUZZ_OUT) tests/fuzz/fuzz.sh $(FUZZ_TARGETS)

# Installs the Debian packages the build and the tests need, when some are missing. A package
# counts as there when an installed one provides it too (a nodejs build that carries its own npm
# provides npm, and conflicts with Debian's).
deps:
	@provided=" $$(dpkg-query -W -f='$${Status}|$${Provides}\n' 2>/dev/null | sed -n 's/^install ok installed|//p' \
	  | tr ',' '\n' | sed 's/^ *//; s/ .*//' | tr '\n' ' ')"; \
	missing=""; for p in $(DEB_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || \
	    case "$$provided" in *" $$p "*) ;; *) missing="$$missing $$p" ;; esac; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

test: deps
	$(MAKE) aigate units fuzz-replays
	AIGATE_BIN=./aigate tests/run.sh

# The whole suite on the sanitizer build (clang's, see ASAN_CC), the unit tests and corpus replays too.
asan: deps
	$(MAKE) deps DEB_PACKAGES="$(CLANG_PACKAGES)"
	$(MAKE) asan-build
	ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 UBSAN_OPTIONS=print_stacktrace=1 AIGATE_BIN=./aigate-asan AIGATE_ASAN=1 tests/run.sh; \
	  rc=$$?; $(MAKE) clean-units; exit $$rc

# (A make of its own, so that ASAN_CC sees the clang just installed. The binary is made again, not
# all it depends on: the built-in Lua library is data, the same for both builds.)
asan-build:
	rm -f aigate-asan
	$(MAKE) aigate-asan
	$(MAKE) clean-units
	$(MAKE) units fuzz-replays CC="$(ASAN_CC)" CFLAGS="$(ASAN_FLAGS)"

# A representative set (chats, a streamed chat, batches to a file, 200 requests in flight) under
# valgrind's memcheck: no error, nothing definitely lost.
valgrind: deps
	$(MAKE) aigate
	$(MAKE) deps DEB_PACKAGES=valgrind
	AIGATE_BIN=./aigate tests/valgrind.sh

demo: deps
	$(MAKE) aigate
	tests/demo.sh

bench: deps bench-serve-deps
	$(MAKE) aigate
	$(MAKE) -C tests/bench
	tests/bench/run.sh
	tests/bench/limits.sh
	tests/bench/startup.sh
	tests/bench/serve.sh
	tests/bench/plugins.sh

# `aigate serve` side by side with the upstream reached directly and with Portkey's gateway, alone.
bench-serve: deps bench-serve-deps
	$(MAKE) aigate
	$(MAKE) -C tests/bench
	tests/bench/serve.sh

# What serve.sh needs besides the build: wrk, socat (the relay floor), node and npm (Debian's, when there is no node yet), and
# Portkey's gateway at the version pinned by tests/bench/node/package-lock.json. Without the gateway
# (no network, say) serve.sh leaves it out and says so.
BENCH_NODE := tests/bench/node
bench-serve-deps:
	$(MAKE) deps DEB_PACKAGES="wrk socat"
	@command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 || $(MAKE) deps DEB_PACKAGES="nodejs npm"
	@$(MAKE) --no-print-directory $(BENCH_NODE)/node_modules/.package-lock.json || \
	  echo "Portkey's gateway could not be installed in $(BENCH_NODE): serve.sh leaves it out"

# npm ci installs exactly the lockfile, which names no registry (.npmrc: omit-lockfile-registry-resolved);
# no install script runs (the gateway's only one applies patches it does not ship).
$(BENCH_NODE)/node_modules/.package-lock.json: $(BENCH_NODE)/package.json $(BENCH_NODE)/package-lock.json $(BENCH_NODE)/.npmrc
	@if grep -q '"resolved"' $(BENCH_NODE)/package-lock.json; then \
	  echo "$(BENCH_NODE)/package-lock.json names where packages come from: make it again with its .npmrc"; exit 1; fi
	cd $(BENCH_NODE) && npm ci --ignore-scripts --no-audit --no-fund
	touch $@

# Start-up alone: aigate's short commands against a program that only initialises libcurl.
bench-startup: deps
	$(MAKE) aigate
	$(MAKE) -C tests/bench
	tests/bench/startup.sh

# Instructions per request (callgrind): figures that do not move between runs, for judging a change.
bench-instructions: deps
	$(MAKE) aigate
	$(MAKE) -C tests/bench
	$(MAKE) deps DEB_PACKAGES=valgrind
	tests/bench/instructions.sh

C_FORMATTED = src/*.c src/*.h tools/*.c tests/unit/*.c tests/unit/*.h tests/bench/*.c tests/bench/*.h $(wildcard tests/fuzz/*.c tests/fuzz/*.h)

# luacheck over every Lua file (part of `make test` too), and clang-format's verdict on the C sources.
lint:
	luacheck -q lua scripts tests/lua tests/e2e/json_get.lua tests/e2e/upstream.lua
	@if command -v clang-format >/dev/null 2>&1; then \
	  clang-format --dry-run --Werror $(C_FORMATTED) && echo "clang-format: clean"; \
	else echo "clang-format not installed: C formatting not checked"; fi

format:
	clang-format -i $(C_FORMATTED)

# The binary is the whole install: the Lua library is built into it.
install: aigate
	install -d $(DESTDIR)$(PREFIX)/bin
	install -m 755 aigate $(DESTDIR)$(PREFIX)/bin/aigate

uninstall:
	rm -f $(DESTDIR)$(PREFIX)/bin/aigate
	rm -rf $(DESTDIR)$(DATADIR)

clean-units:
	rm -f $(UNIT_TESTS) $(FUZZ_REPLAYS)

clean: clean-units
	rm -f aigate aigate-asan $(FUZZ_BINS) tools/embed_lua
	rm -rf gen
