/* CRC32C (Castagnoli, reflected polynomial 0x82F63B78) for the journal codec.
 *
 * Two implementations with one answer: the SSE4.2 crc32 instruction when the CPU has it
 * (checked once at module init with __builtin_cpu_supports; on x86-64, three streams at once
 * on long buffers), else slicing-by-8 tables.
 * erq_crc32c(crc, buf, n) continues a previous result exactly like google_crc32c.extend:
 * erq_crc32c(erq_crc32c(0, a), b) == erq_crc32c(0, a + b).
 *
 * Also the little-endian loads and stores the record format needs (byte-wise, so they are
 * correct on any host; compilers turn them into single moves on little-endian machines).
 */
#ifndef ERQ_CRC32C_H
#define ERQ_CRC32C_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define ERQ_CRC32C_X86 1
#include <nmmintrin.h>
#endif

#define ERQ_CRC32C_POLY 0x82F63B78u

static inline uint32_t erq_load32(const unsigned char *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

static inline uint64_t erq_load64(const unsigned char *p) {
    return (uint64_t)erq_load32(p) | ((uint64_t)erq_load32(p + 4) << 32);
}

static inline void erq_store32(unsigned char *p, uint32_t v) {
    p[0] = (unsigned char)v;
    p[1] = (unsigned char)(v >> 8);
    p[2] = (unsigned char)(v >> 16);
    p[3] = (unsigned char)(v >> 24);
}

static inline void erq_store64(unsigned char *p, uint64_t v) {
    erq_store32(p, (uint32_t)v);
    erq_store32(p + 4, (uint32_t)(v >> 32));
}

/* table[k][b]: the CRC of byte b followed by k zero bytes; filled by erq_crc32c_init. */
static uint32_t erq_crc32c_table[8][256];

/* Raw (not pre/post-inverted) update, slicing-by-8. */
static uint32_t erq_crc32c_sw_update(uint32_t crc, const unsigned char *p, size_t n) {
    uint32_t (*t)[256] = erq_crc32c_table;
    while (n && ((uintptr_t)p & 7)) {
        crc = t[0][(crc ^ *p++) & 0xff] ^ (crc >> 8);
        n--;
    }
    while (n >= 8) {
        uint32_t lo = erq_load32(p) ^ crc;
        uint32_t hi = erq_load32(p + 4);
        crc = t[7][lo & 0xff] ^ t[6][(lo >> 8) & 0xff] ^ t[5][(lo >> 16) & 0xff] ^ t[4][lo >> 24] ^
              t[3][hi & 0xff] ^ t[2][(hi >> 8) & 0xff] ^ t[1][(hi >> 16) & 0xff] ^ t[0][hi >> 24];
        p += 8;
        n -= 8;
    }
    while (n--) {
        crc = t[0][(crc ^ *p++) & 0xff] ^ (crc >> 8);
    }
    return crc;
}

#ifdef ERQ_CRC32C_X86
#if defined(__x86_64__)
/* Three streams. The crc32 instruction has a latency of three cycles and a throughput of one
 * a cycle, so one dependent chain of them runs at a third of the unit's rate. A long buffer is
 * cut into rounds of three adjacent blocks of `block` bytes, each block's CRC computed from
 * zero by its own chain, and the three are then joined to the running CRC:
 * crc(A B) = shift_|B|(crc(A)) ^ crc(B) (raw, non-inverted values), where shift_n, "append n
 * zero bytes", is multiplication by x^(8n) modulo the polynomial. That is linear, so for a
 * fixed n it is four table look-ups, one per byte of the CRC (tables filled at init).
 * The technique is the one of Mark Adler's crc32c.c hardware path and of Intel's crc_pcl;
 * this is erq's own code. Long rounds make the join's cost negligible; short rounds take the
 * rest of a long buffer, and what is left runs on one chain. */
#define ERQ_CRC32C_LONG 8192
#define ERQ_CRC32C_SHORT 256

/* shift[k][b]: the image by "append n zero bytes" of a CRC whose only nonzero byte is byte k,
 * equal to b (n = ERQ_CRC32C_LONG or ERQ_CRC32C_SHORT). */
static uint32_t erq_crc32c_long_shift[4][256];
static uint32_t erq_crc32c_short_shift[4][256];

/* a * b modulo the polynomial, both in the CRC's reflected order (bit 31 holds x^0). */
static uint32_t erq_crc32c_mulmod(uint32_t a, uint32_t b) {
    uint32_t product = 0;
    for (int bit = 31; bit >= 0; bit--) {
        if ((a >> bit) & 1) {
            product ^= b;
        }
        b = (b & 1) ? (b >> 1) ^ ERQ_CRC32C_POLY : b >> 1; /* b * x */
    }
    return product;
}

/* The tables of "append n zero bytes", i.e. of multiplying by x^(8n). x^(8n) is the product
 * of x^(8 * 2^i) over the bits i set in n (square is x^8, x^16, x^32, ... in turn). */
static void erq_crc32c_fill_shift(uint32_t (*shift)[256], size_t n) {
    uint32_t power = 0x80000000u, square = 0x00800000u; /* x^0 and x^8 */
    for (; n; n >>= 1) {
        if (n & 1) {
            power = erq_crc32c_mulmod(power, square);
        }
        square = erq_crc32c_mulmod(square, square);
    }
    for (int k = 0; k < 4; k++) {
        for (uint32_t b = 0; b < 256; b++) {
            shift[k][b] = erq_crc32c_mulmod(b << (8 * k), power);
        }
    }
}

static inline uint32_t erq_crc32c_shift(uint32_t (*shift)[256], uint32_t crc) {
    return shift[0][crc & 0xff] ^ shift[1][(crc >> 8) & 0xff] ^ shift[2][(crc >> 16) & 0xff] ^
           shift[3][crc >> 24];
}

/* One round over 3 * block bytes at p (block a multiple of 8): crc, the CRC before them,
 * becomes the CRC after them. The three chains start from zero, so that they need not wait
 * for the previous round's joins, which run beside them. */
__attribute__((target("sse4.2"), always_inline))
static inline uint32_t erq_crc32c_hw_round(uint32_t crc, const unsigned char *p, size_t block,
                                           uint32_t (*shift)[256]) {
    uint64_t c0 = 0, c1 = 0, c2 = 0;
    const unsigned char *end = p + block;
    do {
        uint64_t v0, v1, v2;
        memcpy(&v0, p, 8);
        memcpy(&v1, p + block, 8);
        memcpy(&v2, p + 2 * block, 8);
        c0 = _mm_crc32_u64(c0, v0);
        c1 = _mm_crc32_u64(c1, v1);
        c2 = _mm_crc32_u64(c2, v2);
        p += 8;
    } while (p < end);
    crc = erq_crc32c_shift(shift, crc) ^ (uint32_t)c0;
    crc = erq_crc32c_shift(shift, crc) ^ (uint32_t)c1;
    return erq_crc32c_shift(shift, crc) ^ (uint32_t)c2;
}
#endif

/* The k < 8 bytes at p: a byte, two, then four, as the bits of k say (in that order, so that
 * for k = -p mod 8 each load is aligned and p + k is a multiple of 8). */
__attribute__((target("sse4.2"), always_inline))
static inline uint32_t erq_crc32c_hw_under8(uint32_t crc, const unsigned char *p, size_t k) {
    if (k & 1) {
        crc = _mm_crc32_u8(crc, *p);
        p += 1;
    }
    if (k & 2) {
        uint16_t v;
        memcpy(&v, p, 2);
        crc = _mm_crc32_u16(crc, v);
        p += 2;
    }
    if (k & 4) {
        uint32_t v;
        memcpy(&v, p, 4);
        crc = _mm_crc32_u32(crc, v);
    }
    return crc;
}

__attribute__((target("sse4.2")))
static uint32_t erq_crc32c_hw_update(uint32_t crc, const unsigned char *p, size_t n) {
#if defined(__x86_64__)
    if (n >= 3 * ERQ_CRC32C_SHORT) {
        /* Align p to 8 for the rounds (a record may start at any offset). A short buffer goes
         * unaligned: its few loads cost less than the branches that would align them. */
        size_t k = (size_t)(-(uintptr_t)p & 7);
        crc = erq_crc32c_hw_under8(crc, p, k);
        p += k;
        n -= k;
        while (n >= 3 * ERQ_CRC32C_LONG) {
            crc = erq_crc32c_hw_round(crc, p, ERQ_CRC32C_LONG, erq_crc32c_long_shift);
            p += 3 * ERQ_CRC32C_LONG;
            n -= 3 * ERQ_CRC32C_LONG;
        }
        while (n >= 3 * ERQ_CRC32C_SHORT) {
            crc = erq_crc32c_hw_round(crc, p, ERQ_CRC32C_SHORT, erq_crc32c_short_shift);
            p += 3 * ERQ_CRC32C_SHORT;
            n -= 3 * ERQ_CRC32C_SHORT;
        }
    }
    uint64_t c64 = crc;
    while (n >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        c64 = _mm_crc32_u64(c64, v);
        p += 8;
        n -= 8;
    }
    crc = (uint32_t)c64;
#else
    while (n >= 8) {
        uint32_t v0, v1;
        memcpy(&v0, p, 4);
        memcpy(&v1, p + 4, 4);
        crc = _mm_crc32_u32(_mm_crc32_u32(crc, v0), v1);
        p += 8;
        n -= 8;
    }
#endif
    return erq_crc32c_hw_under8(crc, p, n);
}
#endif

static uint32_t (*erq_crc32c_update)(uint32_t, const unsigned char *, size_t) = erq_crc32c_sw_update;
static int erq_crc32c_uses_hw = 0;

/* Fill the tables and pick the implementation; call once before any erq_crc32c. Inline only
   so that the modules which include this header for its loads and stores (and never call the
   CRC: their copy of the tables stays empty) compile it without an unused-function warning. */
static inline void erq_crc32c_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) {
            c = (c & 1) ? (c >> 1) ^ ERQ_CRC32C_POLY : c >> 1;
        }
        erq_crc32c_table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++) {
        for (int k = 1; k < 8; k++) {
            uint32_t prev = erq_crc32c_table[k - 1][i];
            erq_crc32c_table[k][i] = (prev >> 8) ^ erq_crc32c_table[0][prev & 0xff];
        }
    }
#ifdef ERQ_CRC32C_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("sse4.2")) {
#if defined(__x86_64__)
        erq_crc32c_fill_shift(erq_crc32c_long_shift, ERQ_CRC32C_LONG);
        erq_crc32c_fill_shift(erq_crc32c_short_shift, ERQ_CRC32C_SHORT);
#endif
        erq_crc32c_update = erq_crc32c_hw_update;
        erq_crc32c_uses_hw = 1;
    }
#endif
}

static inline uint32_t erq_crc32c(uint32_t crc, const unsigned char *p, size_t n) {
    return ~erq_crc32c_update(~crc, p, n);
}

/* The table implementation whatever the CPU (tests compare it with the hardware path). */
static inline uint32_t erq_crc32c_portable(uint32_t crc, const unsigned char *p, size_t n) {
    return ~erq_crc32c_sw_update(~crc, p, n);
}

#endif /* ERQ_CRC32C_H */
