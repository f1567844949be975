/*
 * walship's native launcher: the `walship` command where a C compiler was found at install time.
 *
 * PostgreSQL runs restore_command and archive_command once per WAL file, one call at a time;
 * replay, or archiving, waits for each. When the work of a call was already done ahead, the call
 * itself is a few system calls, and starting a Python interpreter for it (about 8 ms of CPU and
 * 9 ms of wall time on the machines we measure) would be nearly all of its cost. This program
 * answers exactly those calls:
 *   - `walship wal-fetch <name> <path>` while a prefetch worker runs: a file it has sealed in
 *     its cache is delivered with the checks of walship.spool.deliver_cached and a rename;
 *     one it neither holds nor is downloading (a history file, the end of the archive) it
 *     looks up now, asked through ask/ as walship.spool.ask does. Its fresh "missing" is the
 *     only "not found" (exit 1) this program ever gives;
 *   - `walship wal-push <path>` when the background pusher has recorded that file as durably
 *     stored and the file still matches the record: walship.spool.take_pushed;
 * and hands every other call, unchanged, to the Python program (`walship-py`, installed beside
 * it) by execv. Whenever it cannot answer with certainty it hands over, so it can make a call
 * faster, never change its outcome.
 *
 * What it must agree on with walship/spool.py (tests/test_launcher.py checks both sides):
 *   - the cache: <dirname of path>/walship/prefetch/; with WALSHIP_CACHE_DIR (an absolute
 *     path), <it>/pg_wal-<st_dev>-<st_ino> of <dirname of path>, both in lowercase hex
 *     (spool.cache_dir); a config file that mentions cache_dir at all, or that exists but cannot
 *     be read, hands the call to Python, which reads the setting (spool.configured_cache_dir);
 *     a cache on another filesystem than <dirname of path> hands delivery to Python (a copy);
 *   - the seal <name>.ok: "<boot id> <inode> <size> <settings fingerprint>\n", valid while the
 *     boot id is this boot's, the file has that inode and size, and its mtime is exactly
 *     1970-01-01 00:00:01 (SEALED_MTIME_NS); a seal with more (the worker's notes, "note
 *     <text>\n" lines: a fall-over to a mirror) is handed to Python, which prints them;
 *   - the settings fingerprint: the first 32 hex digits of SHA-256 over "KEY=VALUE\0" for every
 *     WALSHIP_* and AZURE_* variable in key order, then the config file's identity;
 *   - a live worker holds an flock on worker.lock; `want` holds "<name> <size>\n", and a
 *     byte written to the FIFO `wake` after it is changed wakes the worker;
 *   - a lookup: ask/<name>.ask holds "<nonce> <settings fingerprint>\n", the worker answers
 *     in ask/<name>.answer "<nonce> found|missing|error\n";
 *   - the push record <dirname of path>/walship/pushed/<name>: "<file fingerprint> <settings
 *     fingerprint>\n", the file fingerprint being "<size>:<mtime ns>:<inode>:<first 16 hex
 *     digits of SHA-256 over the first 8 KiB and the last 8 KiB>"; the pusher's marker
 *     pushing/<name> and its lock pusher.lock;
 *   - the log lines written to stderr;
 *   - the safety rule (spool.safe_dir): nothing of the spool is used unless pg_wal (followed)
 *     and every spool directory below it (never a symbolic link) belong to the effective user
 *     and are writable by nobody else; the sealed file must be a regular file, not a link; a
 *     WAL file that is not a regular file is never opened (a FIFO would block).
 * Linux only (boot id, /proc/self/exe); built by setup.py with no library beyond libc.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

extern char **environ;

#define PYTHON_PROGRAM "walship-py"
#define CONFIG_FILE "/etc/walship/walship.toml"
#define RECOVERY_FAILED 134 /* ExitStatus.RECOVERY_FAILED: recovery must stop, not end */
#define FAILED 6
#define SEALED_MTIME_SEC 1
#define WAIT_SECONDS 10.0 /* spool.WAIT_SECONDS */
#define ASK_SECONDS 10.0  /* spool.ASK_SECONDS */

/* spool.wait_limit: seconds, cut to WALSHIP_CALL_TIMEOUT when the environment sets less. */
static double wait_limit(double seconds) {
    const char *text = getenv("WALSHIP_CALL_TIMEOUT");
    if (!text || !*text) return seconds;
    char *end;
    double limit = strtod(text, &end);
    while (*end == ' ' || *end == '\t' || *end == '\n') end++;
    return !*end && limit > 0 && limit < seconds ? limit : seconds; /* (nan: seconds) */
}

/* ---- SHA-256 (FIPS 180-4) ------------------------------------------------------------------ */
typedef struct {
    uint32_t state[8];
    uint64_t length;
    unsigned char block[64];
    size_t used;
} sha256_ctx;

static const uint32_t K[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
    0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
    0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
    0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
    0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
    0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
    0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
    0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
    0xc67178f2};

#define ROTR(x, n) (((x) >> (n)) | ((x) << (32 - (n))))

static void sha256_block(sha256_ctx *c, const unsigned char *p) {
    uint32_t w[64], s[8], t1, t2;
    for (int i = 0; i < 16; i++)
        w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16 |
               (uint32_t)p[4 * i + 2] << 8 | p[4 * i + 3];
    for (int i = 16; i < 64; i++) {
        uint32_t s0 = ROTR(w[i - 15], 7) ^ ROTR(w[i - 15], 18) ^ (w[i - 15] >> 3);
        uint32_t s1 = ROTR(w[i - 2], 17) ^ ROTR(w[i - 2], 19) ^ (w[i - 2] >> 10);
        w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    memcpy(s, c->state, sizeof s);
    for (int i = 0; i < 64; i++) {
        t1 = s[7] + (ROTR(s[4], 6) ^ ROTR(s[4], 11) ^ ROTR(s[4], 25)) +
             ((s[4] & s[5]) ^ (~s[4] & s[6])) + K[i] + w[i];
        t2 = (ROTR(s[0], 2) ^ ROTR(s[0], 13) ^ ROTR(s[0], 22)) +
             ((s[0] & s[1]) ^ (s[0] & s[2]) ^ (s[1] & s[2]));
        memmove(s + 1, s, 7 * sizeof s[0]);
        s[4] += t1;
        s[0] = t1 + t2;
    }
    for (int i = 0; i < 8; i++) c->state[i] += s[i];
}

static void sha256_init(sha256_ctx *c) {
    static const uint32_t initial[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                                        0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
    memcpy(c->state, initial, sizeof initial);
    c->length = 0;
    c->used = 0;
}

static void sha256_update(sha256_ctx *c, const void *data, size_t n) {
    const unsigned char *p = data;
    c->length += n;
    while (n > 0) {
        size_t take = 64 - c->used < n ? 64 - c->used : n;
        memcpy(c->block + c->used, p, take);
        c->used += take;
        p += take;
        n -= take;
        if (c->used == 64) {
            sha256_block(c, c->block);
            c->used = 0;
        }
    }
}

static void sha256_hex(sha256_ctx *c, char out[65]) {
    uint64_t bits = c->length * 8;
    unsigned char pad = 0x80, zero = 0, tail[8];
    sha256_update(c, &pad, 1);
    while (c->used != 56) sha256_update(c, &zero, 1);
    for (int i = 0; i < 8; i++) tail[i] = (unsigned char)(bits >> (56 - 8 * i));
    sha256_update(c, tail, 8);
    for (int i = 0; i < 8; i++) sprintf(out + 8 * i, "%08x", c->state[i]);
}

/* ---- settings fingerprint (spool.settings_fingerprint) ------------------------------------- */
static size_t key_length(const char *entry) {
    const char *eq = strchr(entry, '=');
    return eq ? (size_t)(eq - entry) : strlen(entry);
}

static int by_key(const void *a, const void *b) {
    const char *x = *(const char *const *)a, *y = *(const char *const *)b;
    size_t nx = key_length(x), ny = key_length(y);
    int order = memcmp(x, y, nx < ny ? nx : ny);
    return order ? order : (nx > ny) - (nx < ny);
}

/* Writes the fingerprint into out; -1 where it cannot be told exactly as Python would. */
static int settings_fingerprint(char out[33]) {
    size_t count = 0, total = 0;
    for (char **e = environ; *e; e++) total++;
    const char **chosen = malloc((total + 1) * sizeof *chosen);
    if (!chosen) return -1;
    for (char **e = environ; *e; e++)
        if ((!strncmp(*e, "WALSHIP_", 8) || !strncmp(*e, "AZURE_", 6)) && strchr(*e, '='))
            chosen[count++] = *e;
    qsort(chosen, count, sizeof *chosen, by_key);
    sha256_ctx c;
    sha256_init(&c);
    for (size_t i = 0; i < count; i++) {
        if (i > 0 && by_key(&chosen[i - 1], &chosen[i]) == 0) {
            free(chosen); /* a variable set twice: leave it to Python's reading of it */
            return -1;
        }
        sha256_update(&c, chosen[i], strlen(chosen[i]) + 1); /* "KEY=VALUE\0" */
    }
    free(chosen);
    const char *config = getenv("WALSHIP_CONFIG");
    if (!config || !*config) config = CONFIG_FILE;
    struct stat st;
    char identity[PATH_MAX + 96];
    if (stat(config, &st) == 0) {
        long long mtime_ns = (long long)st.st_mtim.tv_sec * 1000000000LL + st.st_mtim.tv_nsec;
        int n = snprintf(identity, sizeof identity, "%s:%llu:%lld:%lld", config,
                         (unsigned long long)st.st_ino, mtime_ns, (long long)st.st_size);
        if (n < 0 || (size_t)n >= sizeof identity) return -1;
        sha256_update(&c, identity, (size_t)n);
    } else {
        sha256_update(&c, "no config file", 14);
    }
    char hex[65];
    sha256_hex(&c, hex);
    memcpy(out, hex, 32);
    out[32] = '\0';
    return 0;
}

/* ---- safe spool directories (spool.safe_dir) ------------------------------------------------ */
static int private_dir(const struct stat *st) {
    return S_ISDIR(st->st_mode) && st->st_uid == geteuid() && !(st->st_mode & 022);
}

/* Whether <base>/<first>[/<second>] may be used: base followed, the rest never links. */
static int safe_dir(const char *base, const char *first, const char *second) {
    char path[PATH_MAX];
    struct stat st;
    if (stat(base, &st) != 0 || !private_dir(&st)) return 0;
    if ((size_t)snprintf(path, sizeof path, "%s/%s", base, first) >= sizeof path ||
        lstat(path, &st) != 0 || !private_dir(&st))
        return 0;
    if (!second) return 1;
    size_t n = strlen(path);
    if ((size_t)snprintf(path + n, sizeof path - n, "/%s", second) >= sizeof path - n ||
        lstat(path, &st) != 0 || !private_dir(&st))
        return 0;
    return 1;
}

/* ---- the prefetch cache (spool.deliver_cached) --------------------------------------------- */
static int read_small(const char *path, char *buffer, size_t size) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    ssize_t n = read(fd, buffer, size - 1);
    close(fd);
    if (n < 0) return -1;
    buffer[n] = '\0';
    return (int)n;
}

/* Whether some process holds an flock on <dir>/<file> (spool._flock_held). */
static int lock_held(const char *dir, const char *file) {
    char lock[PATH_MAX + 32];
    snprintf(lock, sizeof lock, "%s/%s", dir, file);
    int fd = open(lock, O_RDWR | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) return 0;
    int held = flock(fd, LOCK_EX | LOCK_NB) != 0 && errno == EWOULDBLOCK;
    close(fd); /* releases a lock we may have taken */
    return held;
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static int exists(const char *path) {
    struct stat st;
    return stat(path, &st) == 0;
}

/* While the worker is downloading the segment (its .inflight marker), wait for the seal, as
 * spool.await_sealed does. Returns 1 when the seal is there, 0 when it is not coming (no
 * marker, or it went without a seal, the worker died, time is up): then the worker is asked. */
static int await_seal(const char *cache, const char *name, const char *seal) {
    char marker[PATH_MAX + 16];
    snprintf(marker, sizeof marker, "%s/%s.inflight", cache, name);
    double started = now(), checked = started, limit = wait_limit(WAIT_SECONDS);
    const struct timespec pause = {0, 2000000};
    while (!exists(seal)) {
        if (!exists(marker)) return exists(seal);
        double t = now();
        if (t - started > limit) return 0;
        if (t - checked > 0.05) {
            if (!lock_held(cache, "worker.lock")) return exists(seal);
            checked = t;
        }
        nanosleep(&pause, NULL);
    }
    return 1;
}

/* spool.wake_worker: a byte on the worker's FIFO makes it read `want` now. */
static void wake_worker(const char *cache) {
    char path[PATH_MAX + 8];
    snprintf(path, sizeof path, "%s/wake", cache);
    int fd = open(path, O_WRONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) return; /* no worker listens */
    struct stat st;
    if (fstat(fd, &st) == 0 && S_ISFIFO(st.st_mode) && write(fd, "!", 1) < 0) {
        /* full: the worker has bytes to read, so it is awake anyway */
    }
    close(fd);
}

/* The directory part of path, as os.path.dirname(path) or "." (-1 when too long). */
static int parent_dir(const char *path, char dir[PATH_MAX]) {
    const char *slash = strrchr(path, '/');
    if (!slash) {
        strcpy(dir, ".");
        return 0;
    }
    const char *end = slash;
    while (end > path && end[-1] == '/') end--; /* dirname drops trailing slashes ... */
    if (end == path) end = slash + 1;            /* ... but keeps a root of slashes */
    if ((size_t)(end - path) >= PATH_MAX) return -1;
    memcpy(dir, path, (size_t)(end - path));
    dir[end - path] = '\0';
    return 0;
}

/* fastpath._plain_name: a segment, .partial, .history or .backup file name. */
static int hex_run(const char *p, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (!((p[i] >= '0' && p[i] <= '9') || (p[i] >= 'A' && p[i] <= 'F'))) return 0;
    return 1;
}

static int segment_name(const char *name) {
    return strlen(name) == 24 && hex_run(name, 24);
}

static int plain_name(const char *name) {
    size_t n = strlen(name);
    if (n == 16 && !strcmp(name + 8, ".history")) return hex_run(name, 8);
    if (n < 24 || !hex_run(name, 24)) return 0;
    const char *suffix = name + 24;
    return !*suffix || !strcmp(suffix, ".partial") ||
           (strlen(suffix) == 16 && suffix[0] == '.' && hex_run(suffix + 1, 8) &&
            !strcmp(suffix + 9, ".backup"));
}

/* spool.write_atomically: text into path through a temporary file and a rename. */
static int write_atomically(const char *path, const char *text) {
    char temp[PATH_MAX + 32];
    if ((size_t)snprintf(temp, sizeof temp, "%s.tmp%ld", path, (long)getpid()) >= sizeof temp)
        return -1;
    int fd = open(temp, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0644);
    if (fd < 0) return -1;
    size_t n = strlen(text);
    int ok = write(fd, text, n) == (ssize_t)n;
    close(fd);
    if (ok && rename(temp, path) == 0) return 0;
    unlink(temp);
    return -1;
}

/* Whether the config file mentions cache_dir: 1 yes, 0 no (or it does not exist), -1 it cannot
 * be read. */
static int config_names_cache_dir(void) {
    const char *config = getenv("WALSHIP_CONFIG");
    if (!config || !*config) config = CONFIG_FILE;
    int fd = open(config, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return errno == ENOENT ? 0 : -1;
    static const char word[] = "cache_dir";
    char buffer[65536];
    size_t kept = 0;
    for (;;) {
        ssize_t n = read(fd, buffer + kept, sizeof buffer - kept);
        if (n <= 0) {
            close(fd);
            return n < 0 ? -1 : 0;
        }
        size_t have = kept + (size_t)n;
        if (memmem(buffer, have, word, sizeof word - 1)) {
            close(fd);
            return 1;
        }
        kept = have < sizeof word - 2 ? have : sizeof word - 2; /* a word across two reads */
        memmove(buffer, buffer + have - kept, kept);
    }
}

/* spool.cache_dir of dir, with the cache_dir setting as spool.configured_cache_dir reads it;
 * -1 where it cannot be told here (then Python takes the call). */
static int cache_path(const char *dir, char cache[PATH_MAX]) {
    const char *configured = getenv("WALSHIP_CACHE_DIR");
    int n;
    if (configured && *configured) {
        struct stat st;
        if (configured[0] != '/' || stat(dir, &st) != 0) return -1;
        n = snprintf(cache, PATH_MAX, "%s/pg_wal-%llx-%llx", configured,
                     (unsigned long long)st.st_dev, (unsigned long long)st.st_ino);
    } else {
        if (config_names_cache_dir() != 0) return -1;
        n = snprintf(cache, PATH_MAX, "%s/walship/prefetch", dir);
    }
    return n > 0 && n < PATH_MAX ? 0 : -1;
}

/* spool.ask: have the running worker look name up in the repository now. 1: found (then it
 * is sealed in the cache); 0: missing (the repository, asked after this call began, says so);
 * -1: no answer (no worker, other settings, an error, time is up): Python finds out itself. */
static int ask(const char *cache, const char *name, const char *settings) {
    char directory[PATH_MAX], request[PATH_MAX + 32], answer[PATH_MAX + 32];
    if ((size_t)snprintf(directory, sizeof directory, "%s/ask", cache) >= sizeof directory)
        return -1;
    snprintf(request, sizeof request, "%s/%s.ask", directory, name);
    snprintf(answer, sizeof answer, "%s/%s.answer", directory, name);
    unsigned char random[8];
    int fd = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    ssize_t got = read(fd, random, sizeof random);
    close(fd);
    if (got != (ssize_t)sizeof random) return -1;
    char nonce[17], line[128];
    for (int i = 0; i < 8; i++) sprintf(nonce + 2 * i, "%02x", random[i]);
    snprintf(line, sizeof line, "%s %s\n", nonce, settings);
    if ((mkdir(directory, 0777) != 0 && errno != EEXIST) || write_atomically(request, line) != 0)
        return -1;
    wake_worker(cache);
    int verdict = -1;
    double started = now(), checked = started, limit = wait_limit(ASK_SECONDS);
    const struct timespec pause = {0, 1000000};
    for (;;) {
        char text[128], seen[64], word[16], extra[2];
        if (read_small(answer, text, sizeof text) >= 0 &&
            sscanf(text, "%63s %15s %1s", seen, word, extra) == 2 && !strcmp(seen, nonce)) {
            verdict = !strcmp(word, "found") ? 1 : !strcmp(word, "missing") ? 0 : -1;
            break;
        }
        double t = now();
        if (t - started > limit) break;
        if (t - checked > 0.05) {
            if (!lock_held(cache, "worker.lock")) break;
            checked = t;
        }
        nanosleep(&pause, NULL);
    }
    unlink(request);
    unlink(answer);
    return verdict;
}

/* fastpath.wal_fetch, for a worker that runs: 0 delivered from the cache, 1 not found (the
 * worker's fresh lookup says so), -1 not answered here (nothing was changed). */
static int fetch(const char *name, const char *destination) {
    double started = now();
    if (!plain_name(name)) return -1;
    char dir[PATH_MAX], cache[PATH_MAX], path[PATH_MAX], seal[PATH_MAX];
    if (parent_dir(destination, dir) != 0 || cache_path(dir, cache) != 0 ||
        (size_t)snprintf(path, sizeof path, "%s/%s", cache, name) >= sizeof path ||
        (size_t)snprintf(seal, sizeof seal, "%s.ok", path) >= sizeof seal)
        return -1;
    const char *configured = getenv("WALSHIP_CACHE_DIR");
    if (configured && *configured ? !safe_dir(configured, strrchr(cache, '/') + 1, NULL)
                                  : !safe_dir(dir, "walship", "prefetch"))
        return -1; /* Python decides (spool.safe_dir) */
    if (!lock_held(cache, "worker.lock")) return -1; /* Python starts one */
    char fingerprint[33];
    if (settings_fingerprint(fingerprint) != 0) return -1;
    if (!await_seal(cache, name, seal)) {
        /* Neither cached nor being downloaded (a history file, the end of the archive, a
         * download that failed): the worker looks it up now, with its warm connection. */
        int verdict = ask(cache, name, fingerprint);
        if (verdict < 0) return -1;
        if (verdict == 0) {
            fprintf(stderr,
                    "walship: wal-fetch %s not found in the archive (asked by the prefetch "
                    "worker) seconds=%.3f\n",
                    name, now() - started);
            return 1;
        }
    }

    char text[256], boot[64], ino[32], size[32], settings[64], extra[2];
    if (read_small(seal, text, sizeof text) < 0 ||
        sscanf(text, "%63s %31s %31s %63s %1s", boot, ino, size, settings, extra) != 4)
        return -1;
    char this_boot[64];
    if (read_small("/proc/sys/kernel/random/boot_id", this_boot, sizeof this_boot) <= 0)
        return -1;
    this_boot[strcspn(this_boot, " \t\r\n")] = '\0';
    if (!this_boot[0] || strcmp(boot, this_boot) != 0 || strcmp(settings, fingerprint) != 0)
        return -1;

    struct stat st;
    char st_ino[32], st_size[32];
    if (lstat(path, &st) != 0 || !S_ISREG(st.st_mode)) return -1;
    snprintf(st_ino, sizeof st_ino, "%llu", (unsigned long long)st.st_ino);
    snprintf(st_size, sizeof st_size, "%lld", (long long)st.st_size);
    if (strcmp(ino, st_ino) || strcmp(size, st_size) || st.st_mtim.tv_sec != SEALED_MTIME_SEC ||
        st.st_mtim.tv_nsec != 0)
        return -1;
    struct stat wal_dir;
    if (stat(dir, &wal_dir) != 0 || wal_dir.st_dev != st.st_dev)
        return -1; /* a cache on another filesystem: Python copies (spool._copy_sealed) */

    /* Delivered with the present as its mtime, like any file just written. */
    if (utimensat(AT_FDCWD, path, NULL, 0) != 0) return -1;
    if (rename(path, destination) != 0) return -1;
    unlink(seal);

    if (segment_name(name)) {
        /* Move the prefetch window (spool.want); delivered whatever happens here. */
        char want[PATH_MAX], line[64];
        snprintf(line, sizeof line, "%s %s\n", name, st_size);
        if ((size_t)snprintf(want, sizeof want, "%s/want", cache) < sizeof want)
            write_atomically(want, line);
        wake_worker(cache);
    }
    fprintf(stderr,
            "walship: wal-fetch %s delivered from prefetch cache in=%s out=%s seconds=%.3f\n",
            name, st_size, st_size, now() - started);
    return 0;
}

/* ---- push-ahead records (spool.take_pushed) -------------------------------------------------- */
#define EDGE 8192

/* spool.file_fingerprint: "<size>:<mtime ns>:<inode>:<16 hex digits>". */
static int file_fingerprint(const char *path, char *out, size_t size) {
    int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC); /* a FIFO must not block */
    if (fd < 0) return -1;
    struct stat st;
    unsigned char buffer[2 * EDGE];
    size_t have = 0;
    int ok = fstat(fd, &st) == 0 && S_ISREG(st.st_mode);
    while (ok && have < EDGE) { /* the first 8 KiB */
        ssize_t n = read(fd, buffer + have, EDGE - have);
        if (n < 0) ok = 0;
        if (n <= 0) break;
        have += (size_t)n;
    }
    if (ok && st.st_size > EDGE) { /* then the last 8 KiB, never twice the same bytes */
        off_t from = st.st_size - EDGE > EDGE ? st.st_size - EDGE : EDGE;
        size_t start = have;
        while (ok && have < start + EDGE) {
            ssize_t n = pread(fd, buffer + have, start + EDGE - have,
                              from + (off_t)(have - start));
            if (n < 0) ok = 0;
            if (n <= 0) break;
            have += (size_t)n;
        }
    }
    close(fd);
    if (!ok) return -1;
    sha256_ctx c;
    char hex[65];
    sha256_init(&c);
    sha256_update(&c, buffer, have);
    sha256_hex(&c, hex);
    long long mtime_ns = (long long)st.st_mtim.tv_sec * 1000000000LL + st.st_mtim.tv_nsec;
    int n = snprintf(out, size, "%lld:%lld:%llu:%.16s", (long long)st.st_size, mtime_ns,
                     (unsigned long long)st.st_ino, hex);
    return n > 0 && (size_t)n < size ? 0 : -1;
}

/* 0: the file was pushed ahead and is unchanged (its record is consumed). -1: not answered
 * here; the record, if any, is left for Python, which reads it again. */
static int already_pushed(const char *wal_path) {
    double started = now();
    char wal_dir[PATH_MAX], spool[PATH_MAX], record[PATH_MAX], marker[PATH_MAX];
    const char *name = strrchr(wal_path, '/');
    name = name ? name + 1 : wal_path;
    if (!plain_name(name) || parent_dir(wal_path, wal_dir) != 0 ||
        (size_t)snprintf(spool, sizeof spool, "%s/walship", wal_dir) >= sizeof spool ||
        (size_t)snprintf(record, sizeof record, "%s/pushed/%s", spool, name) >= sizeof record ||
        (size_t)snprintf(marker, sizeof marker, "%s/pushing/%s", spool, name) >= sizeof marker)
        return -1;
    if (!safe_dir(wal_dir, "walship", NULL)) return -1; /* spool.take_pushed */
    struct stat wal;
    if (stat(wal_path, &wal) != 0 || !S_ISREG(wal.st_mode)) return -1; /* fastpath.wal_push */
    if (!exists(record)) { /* spool.await_pushed: the pusher is uploading it right now */
        if (!exists(marker) || !lock_held(spool, "pusher.lock")) return -1;
        double checked = started, limit = wait_limit(WAIT_SECONDS);
        const struct timespec pause = {0, 2000000};
        while (exists(marker) && !exists(record)) {
            double t = now();
            if (t - started > limit) return -1;
            if (t - checked > 0.05) {
                if (!lock_held(spool, "pusher.lock")) break;
                checked = t;
            }
            nanosleep(&pause, NULL);
        }
    }
    char text[256], recorded[160], settings[64], extra[2];
    if (!safe_dir(wal_dir, "walship", "pushed") || read_small(record, text, sizeof text) < 0 ||
        sscanf(text, "%159s %63s %1s", recorded, settings, extra) != 2)
        return -1;
    char fingerprint[33], file[160];
    if (settings_fingerprint(fingerprint) != 0 || strcmp(settings, fingerprint) != 0 ||
        file_fingerprint(wal_path, file, sizeof file) != 0 || strcmp(recorded, file) != 0)
        return -1;
    if (unlink(record) != 0) return -1; /* consumed: PostgreSQL asks once per file */
    long long size = atoll(file);
    fprintf(stderr, "walship: wal-push %s already pushed ahead in=%lld out=%lld seconds=%.3f\n",
            name, size, size, now() - started);
    return 0;
}

/* ---- everything else: the Python program ---------------------------------------------------- */
static int recovery_call(int argc, char **argv) {
    for (int i = 1; i < argc; i++)
        if (!strcmp(argv[i], "wal-fetch")) return 1;
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 4 && !strcmp(argv[1], "wal-fetch")) {
        int status = fetch(argv[2], argv[3]);
        if (status >= 0) return status;
    }
    if (argc == 3 && !strcmp(argv[1], "wal-push") && already_pushed(argv[2]) == 0) return 0;

    char self[PATH_MAX], program[PATH_MAX + sizeof PYTHON_PROGRAM];
    ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
    if (n > 0) {
        self[n] = '\0';
    } else if (strchr(argv[0], '/') && strlen(argv[0]) < sizeof self) {
        strcpy(self, argv[0]);
    } else {
        self[0] = '\0';
    }
    char *slash = strrchr(self, '/');
    if (slash) {
        slash[1] = '\0';
        snprintf(program, sizeof program, "%s%s", self, PYTHON_PROGRAM);
        argv[0] = program;
        execv(program, argv);
    }
    fprintf(stderr,
            "walship: ERROR: cannot start %s beside the walship launcher: %s "
            "(hint: reinstall walship)\n",
            slash ? program : PYTHON_PROGRAM, slash ? strerror(errno) : "its path is unknown");
    return recovery_call(argc, argv) ? RECOVERY_FAILED : FAILED;
}
