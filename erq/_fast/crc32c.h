/* CRC32C (Castagnoli, reflected polynomial 0x82F63B78) for the journal codec.
 *
 * Two implementations with one answer: the SSE4.2 crc32 instruction when the CPU has it
 * (checked once at module init with __builtin_cpu_supports), else slicing-by-8 tables.
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
__attribute__((target("sse4.2")))
static uint32_t erq_crc32c_hw_update(uint32_t crc, const unsigned char *p, size_t n) {
    while (n && ((uintptr_t)p & 7)) {
        crc = _mm_crc32_u8(crc, *p++);
        n--;
    }
#if defined(__x86_64__)
    uint64_t c64 = crc;
    while (n >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        c64 = _mm_crc32_u64(c64, v);
        p += 8;
        n -= 8;
    }
    crc = (uint32_t)c64;
#endif
    while (n >= 4) {
        uint32_t v;
        memcpy(&v, p, 4);
        crc = _mm_crc32_u32(crc, v);
        p += 4;
        n -= 4;
    }
    while (n--) {
        crc = _mm_crc32_u8(crc, *p++);
    }
    return crc;
}
#endif

static uint32_t (*erq_crc32c_update)(uint32_t, const unsigned char *, size_t) = erq_crc32c_sw_update;
static int erq_crc32c_uses_hw = 0;

/* Fill the tables and pick the implementation; call once before any erq_crc32c. */
static void erq_crc32c_init(void) {
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
