/* Bulk Exposure Notification matching kernel (optional C extension).
 *
 * For each diagnosis key: RPIK = HKDF-SHA256(tek, salt=NULL, info="EN-RPIK", 16)
 * (RFC 5869: one extract, one expand block: six SHA-256 compressions, the two
 * constant HMAC pads of the zero salt pre-hashed), then RPI_j = AES-128-ECB(RPIK,
 * PaddedData_j) (Exposure Notification Cryptography Specification v1.2, "Rolling
 * Proximity Identifier") for the intervals j that can meet a stored encounter, and a
 * look-up of each RPI among the stored ones.
 *
 * The look-up is built so that its cost does not grow with the store: the stored RPIs
 * are filtered per day (an RPI of interval e can only match an encounter whose
 * [first - tolerance, last + tolerance] reaches e's day) by a small register-blocked
 * Bloom filter per day (16 bits per RPI, 4 bits in one 64-bit word: ~0.3 % false
 * positives, one cache line per test; the keys are sorted by day so that one day's
 * filter stays in the core's cache), and only the rare survivors probe an exact hash
 * table. The hashes are keyed with random seeds per index, so RPIs chosen by whoever
 * broadcast them cannot crowd one word or one probe sequence.
 *
 * Threads: the scan runs on pthreads of its own with the GIL released; they take chunks
 * of the day-sorted keys from a shared counter. Results are (key, j, entry) triples,
 * sorted; the caller checks time and metadata of those few.
 */
#define PY_SSIZE_T_CLEAN
#define OPENSSL_API_COMPAT 0x10100000L
#include <Python.h>
#include <openssl/evp.h>
#include <openssl/sha.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define PERIOD_MAX 144          /* TEKRollingPeriod */
#define MAX_DAYS 4096           /* days one index may span */
#define FILTER_BITS_PER_RPI 32
#define CHUNK_KEYS 256          /* keys a thread takes at a time */
#define MAX_THREADS 64

/* ---- HKDF-SHA256 with six bare compressions ------------------------------------------ */

typedef struct {
    SHA256_CTX ipad0, opad0; /* HMAC pads of the all-zero salt, compressed once */
} hkdf_pre;

static void be64(uint8_t *p, uint64_t v) { for (int i = 7; i >= 0; i--) { p[i] = (uint8_t)v; v >>= 8; } }

static void state_bytes(const SHA256_CTX *c, uint8_t out[32]) {
    for (int i = 0; i < 8; i++) {
        uint32_t h = c->h[i];
        out[4*i] = (uint8_t)(h >> 24); out[4*i+1] = (uint8_t)(h >> 16); out[4*i+2] = (uint8_t)(h >> 8); out[4*i+3] = (uint8_t)h;
    }
}

/* the final block of a message of 64 + n bytes whose last n bytes are ``tail`` */
static void last_block(uint8_t blk[64], const uint8_t *tail, unsigned n) {
    memcpy(blk, tail, n);
    blk[n] = 0x80;
    memset(blk + n + 1, 0, 64 - 8 - n - 1);
    be64(blk + 56, (uint64_t)(64 + n) * 8);
}

static void hkdf_pre_init(hkdf_pre *p) {
    uint8_t pad[64];
    memset(pad, 0x36, 64); SHA256_Init(&p->ipad0); SHA256_Transform(&p->ipad0, pad);
    memset(pad, 0x5c, 64); SHA256_Init(&p->opad0); SHA256_Transform(&p->opad0, pad);
}

static void hkdf_rpik(const hkdf_pre *p, const uint8_t tek[16], uint8_t rpik[16]) {
    static const uint8_t info[8] = {'E', 'N', '-', 'R', 'P', 'I', 'K', 0x01};
    uint8_t blk[64], ih[32], prk[32], kp[64];
    SHA256_CTX c = p->ipad0;                   /* extract: PRK = HMAC(zeros, tek) */
    last_block(blk, tek, 16); SHA256_Transform(&c, blk); state_bytes(&c, ih);
    c = p->opad0;
    last_block(blk, ih, 32); SHA256_Transform(&c, blk); state_bytes(&c, prk);
    for (int i = 0; i < 32; i++) kp[i] = prk[i] ^ 0x36;   /* expand: T(1) = HMAC(PRK, info|1) */
    memset(kp + 32, 0x36, 32);
    SHA256_Init(&c); SHA256_Transform(&c, kp);
    last_block(blk, info, 8); SHA256_Transform(&c, blk); state_bytes(&c, ih);
    for (int i = 0; i < 32; i++) kp[i] = prk[i] ^ 0x5c;
    memset(kp + 32, 0x5c, 32);
    SHA256_Init(&c); SHA256_Transform(&c, kp);
    last_block(blk, ih, 32); SHA256_Transform(&c, blk); state_bytes(&c, ih);
    memcpy(rpik, ih, 16);
}

/* ---- x86-64: AES-NI, SHA-NI, BMI2 ------------------------------------------------------------
 * Used where the CPU has them and OPENSSL_ia32cap does not mask them (OpenSSL's own switch,
 * read the way OpenSSL reads it, so that masking AES-NI to stand in for a Raspberry Pi's
 * software AES masks it here too). Each is cross-checked against OpenSSL by the tests. */
#if defined(__x86_64__) && defined(__GNUC__)
#define HAVE_X86 1
#include <cpuid.h>
#include <immintrin.h>

static int cpu_aesni, cpu_sha, cpu_avx2, cpu_vaes;

static void cpu_detect(void) {
    unsigned a, b, c, d;
    uint64_t w0 = 0, w1 = 0;
    if (__get_cpuid(1, &a, &b, &c, &d)) w0 = (uint64_t)d | (uint64_t)c << 32;
    if (__get_cpuid_count(7, 0, &a, &b, &c, &d)) w1 = (uint64_t)b | (uint64_t)c << 32;
    int ymm_ok = 0;
    if (w0 & ((uint64_t)1 << 59)) {                /* OSXSAVE: the OS saves YMM registers? */
        unsigned lo, hi;
        __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
        ymm_ok = (lo & 6) == 6;
    }
    const char *env = getenv("OPENSSL_ia32cap");   /* "[~]0xW0[:[~]0xW1]" (OPENSSL_ia32cap(3)) */
    if (env) {
        uint64_t *w[2] = {&w0, &w1};
        const char *p = env;
        for (int k = 0; k < 2 && *p; k++) {
            int neg = *p == '~';
            if (neg) p++;
            char *end;
            uint64_t v = strtoull(p, &end, 0);
            if (end != p) *w[k] = neg ? (*w[k] & ~v) : (*w[k] & v);
            p = strchr(end, ':');
            if (!p) break;
            p++;
        }
    }
    cpu_aesni = (w0 >> 57) & 1;                    /* CPUID.1:ECX.AES */
    cpu_sha = ((w1 >> 29) & 1) && ((w0 >> 51) & 1); /* CPUID.7:EBX.SHA, SSE4.1 */
    cpu_avx2 = ymm_ok && ((w1 >> 5) & 1) && ((w1 >> 8) & 1);   /* AVX2, BMI2 */
    cpu_vaes = cpu_aesni && ymm_ok && ((w1 >> 5) & 1) && ((w1 >> 41) & 1); /* AVX2, CPUID.7:ECX.VAES */
}

/* SHA-256 compression on SHA-NI, two independent messages at once (their rounds
 * interleave: one chain alone waits on the latency of sha256rnds2). The state is kept
 * as (ABEF, CDGH); messages are given as words (W0..W15 in four vectors). */
static const uint32_t K256[64] __attribute__((aligned(16))) = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};

typedef struct { __m128i s0, s1; } shastate;   /* ABEF, CDGH */

#define SHA_TARGET __attribute__((target("sha,sse4.1")))

SHA_TARGET static inline void sha_compress2(shastate *x, const __m128i wx[4], shastate *y, const __m128i wy[4]) {
    __m128i a0 = x->s0, a1 = x->s1, b0 = y->s0, b1 = y->s1;
    __m128i A[4] = {wx[0], wx[1], wx[2], wx[3]}, B[4] = {wy[0], wy[1], wy[2], wy[3]};
#pragma GCC unroll 16
    for (int g = 0; g < 16; g++) {
        __m128i k = _mm_load_si128((const __m128i *)(K256 + 4 * g));
        __m128i ma = _mm_add_epi32(A[g & 3], k), mb = _mm_add_epi32(B[g & 3], k);
        a1 = _mm_sha256rnds2_epu32(a1, a0, ma);
        b1 = _mm_sha256rnds2_epu32(b1, b0, mb);
        if (g >= 3 && g < 15) {
            A[(g + 1) & 3] = _mm_sha256msg2_epu32(_mm_add_epi32(A[(g + 1) & 3], _mm_alignr_epi8(A[g & 3], A[(g - 1) & 3], 4)), A[g & 3]);
            B[(g + 1) & 3] = _mm_sha256msg2_epu32(_mm_add_epi32(B[(g + 1) & 3], _mm_alignr_epi8(B[g & 3], B[(g - 1) & 3], 4)), B[g & 3]);
        }
        a0 = _mm_sha256rnds2_epu32(a0, a1, _mm_shuffle_epi32(ma, 0x0E));
        b0 = _mm_sha256rnds2_epu32(b0, b1, _mm_shuffle_epi32(mb, 0x0E));
        if (g >= 1 && g < 13) {
            A[(g - 1) & 3] = _mm_sha256msg1_epu32(A[(g - 1) & 3], A[g & 3]);
            B[(g - 1) & 3] = _mm_sha256msg1_epu32(B[(g - 1) & 3], B[g & 3]);
        }
    }
    x->s0 = _mm_add_epi32(x->s0, a0); x->s1 = _mm_add_epi32(x->s1, a1);
    y->s0 = _mm_add_epi32(y->s0, b0); y->s1 = _mm_add_epi32(y->s1, b1);
}

/* (ABEF, CDGH) -> the digest's words: (A, B, C, D), (E, F, G, H) */
SHA_TARGET static inline void sha_words(const shastate *s, __m128i *abcd, __m128i *efgh) {
    __m128i t = _mm_shuffle_epi32(s->s0, 0x1B), u = _mm_shuffle_epi32(s->s1, 0xB1);
    *abcd = _mm_blend_epi16(t, u, 0xF0);
    *efgh = _mm_alignr_epi8(u, t, 8);
}

SHA_TARGET static inline shastate sha_from_words(__m128i abcd, __m128i efgh) {
    __m128i t = _mm_shuffle_epi32(abcd, 0xB1), u = _mm_shuffle_epi32(efgh, 0x1B);
    shastate s = {_mm_alignr_epi8(t, u, 8), _mm_blend_epi16(u, t, 0xF0)};
    return s;
}

typedef struct { shastate iv, ipad0, opad0; } hkdf_ni;

SHA_TARGET static void hkdf_ni_init(hkdf_ni *p) {
    p->iv = sha_from_words(_mm_setr_epi32(0x6a09e667, (int)0xbb67ae85, 0x3c6ef372, (int)0xa54ff53a),
                           _mm_setr_epi32(0x510e527f, (int)0x9b05688c, 0x1f83d9ab, 0x5be0cd19));
    __m128i w36[4], w5c[4];
    for (int i = 0; i < 4; i++) { w36[i] = _mm_set1_epi32(0x36363636); w5c[i] = _mm_set1_epi32(0x5c5c5c5c); }
    p->ipad0 = p->iv; p->opad0 = p->iv;
    sha_compress2(&p->ipad0, w36, &p->opad0, w5c);
}

/* the RPIKs of two TEKs (HKDF-SHA256, salt NULL, info "EN-RPIK", 16 bytes) */
SHA_TARGET static void hkdf_rpik2_ni(const hkdf_ni *p, const uint8_t *tek_a, const uint8_t *tek_b, uint8_t *out_a, uint8_t *out_b) {
    const __m128i bswap = _mm_setr_epi8(3, 2, 1, 0, 7, 6, 5, 4, 11, 10, 9, 8, 15, 14, 13, 12);
    const __m128i pad32 = _mm_setr_epi32((int)0x80000000, 0, 0, 0), zero = _mm_setzero_si128();
    const __m128i len80 = _mm_setr_epi32(0, 0, 0, (64 + 16) * 8), len96 = _mm_setr_epi32(0, 0, 0, (64 + 32) * 8);
    const __m128i i36 = _mm_set1_epi32(0x36363636), o5c = _mm_set1_epi32(0x5c5c5c5c);
    /* extract: inner = H(ipad0 || tek), PRK = H(opad0 || inner) */
    shastate x = p->ipad0, y = p->ipad0;
    __m128i wa[4] = {_mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)tek_a), bswap), pad32, zero, len80};
    __m128i wb[4] = {_mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)tek_b), bswap), pad32, zero, len80};
    sha_compress2(&x, wa, &y, wb);
    sha_words(&x, &wa[0], &wa[1]); wa[2] = pad32; wa[3] = len96;
    sha_words(&y, &wb[0], &wb[1]); wb[2] = pad32; wb[3] = len96;
    x = p->opad0; y = p->opad0;
    sha_compress2(&x, wa, &y, wb);
    __m128i pa0, pa1, pb0, pb1;                   /* the PRKs */
    sha_words(&x, &pa0, &pa1); sha_words(&y, &pb0, &pb1);
    /* expand: T(1) = H(PRK^opad || H(PRK^ipad || "EN-RPIK" 0x01)) */
    shastate xi = p->iv, yi = p->iv, xo = p->iv, yo = p->iv;
    __m128i ka[4] = {_mm_xor_si128(pa0, i36), _mm_xor_si128(pa1, i36), i36, i36};
    __m128i kb[4] = {_mm_xor_si128(pb0, i36), _mm_xor_si128(pb1, i36), i36, i36};
    sha_compress2(&xi, ka, &yi, kb);
    __m128i la[4] = {_mm_xor_si128(pa0, o5c), _mm_xor_si128(pa1, o5c), o5c, o5c};
    __m128i lb[4] = {_mm_xor_si128(pb0, o5c), _mm_xor_si128(pb1, o5c), o5c, o5c};
    sha_compress2(&xo, la, &yo, lb);
    const __m128i info[4] = {_mm_setr_epi32(0x454e2d52, 0x50494b01, (int)0x80000000, 0), zero, zero,
                             _mm_setr_epi32(0, 0, 0, (64 + 8) * 8)};
    sha_compress2(&xi, info, &yi, info);
    sha_words(&xi, &wa[0], &wa[1]); wa[2] = pad32; wa[3] = len96;
    sha_words(&yi, &wb[0], &wb[1]); wb[2] = pad32; wb[3] = len96;
    sha_compress2(&xo, wa, &yo, wb);
    __m128i oa, ob, unused;
    sha_words(&xo, &oa, &unused); sha_words(&yo, &ob, &unused);
    _mm_storeu_si128((__m128i *)out_a, _mm_shuffle_epi8(oa, bswap));
    _mm_storeu_si128((__m128i *)out_b, _mm_shuffle_epi8(ob, bswap));
}

/* AES-128 key schedule (FIPS 197) with AESKEYGENASSIST */
#define AES_TARGET __attribute__((target("aes,sse4.1")))
AES_TARGET static inline __m128i aes_expand_step(__m128i k, __m128i a) {
    a = _mm_shuffle_epi32(a, 0xff);
    k = _mm_xor_si128(k, _mm_slli_si128(k, 4));
    k = _mm_xor_si128(k, _mm_slli_si128(k, 4));
    k = _mm_xor_si128(k, _mm_slli_si128(k, 4));
    return _mm_xor_si128(k, a);
}

AES_TARGET static void aes128_schedule(const uint8_t key[16], __m128i rk[11]) {
    rk[0] = _mm_loadu_si128((const __m128i *)key);
    rk[1] = aes_expand_step(rk[0], _mm_aeskeygenassist_si128(rk[0], 0x01));
    rk[2] = aes_expand_step(rk[1], _mm_aeskeygenassist_si128(rk[1], 0x02));
    rk[3] = aes_expand_step(rk[2], _mm_aeskeygenassist_si128(rk[2], 0x04));
    rk[4] = aes_expand_step(rk[3], _mm_aeskeygenassist_si128(rk[3], 0x08));
    rk[5] = aes_expand_step(rk[4], _mm_aeskeygenassist_si128(rk[4], 0x10));
    rk[6] = aes_expand_step(rk[5], _mm_aeskeygenassist_si128(rk[5], 0x20));
    rk[7] = aes_expand_step(rk[6], _mm_aeskeygenassist_si128(rk[6], 0x40));
    rk[8] = aes_expand_step(rk[7], _mm_aeskeygenassist_si128(rk[7], 0x80));
    rk[9] = aes_expand_step(rk[8], _mm_aeskeygenassist_si128(rk[8], 0x1b));
    rk[10] = aes_expand_step(rk[9], _mm_aeskeygenassist_si128(rk[9], 0x36));
}

/* RPI_j = AES128(RPIK, "EN-RPI" 0^6 ENIN_j) for ENIN_j = e0 .. e0 + count - 1, 8 blocks at a time */
AES_TARGET static void rpis_aesni(const uint8_t rpik[16], uint32_t e0, unsigned count, uint8_t *out) {
    __m128i rk[11];
    aes128_schedule(rpik, rk);
    const __m128i one = _mm_setr_epi32(0, 0, 0, 1);
    __m128i ctr = _mm_insert_epi32(_mm_setr_epi8('E', 'N', '-', 'R', 'P', 'I', 0, 0, 0, 0, 0, 0, 0, 0, 0, 0), (int)e0, 3);
    unsigned j = 0;
    for (; j + 8 <= count; j += 8) {
        __m128i b[8];
        for (int k = 0; k < 8; k++) { b[k] = _mm_xor_si128(ctr, rk[0]); ctr = _mm_add_epi32(ctr, one); }
        for (int r = 1; r < 10; r++) for (int k = 0; k < 8; k++) b[k] = _mm_aesenc_si128(b[k], rk[r]);
        for (int k = 0; k < 8; k++) _mm_storeu_si128((__m128i *)(out + 16 * (j + k)), _mm_aesenclast_si128(b[k], rk[10]));
    }
    for (; j < count; j++) {
        __m128i b = _mm_xor_si128(ctr, rk[0]);
        ctr = _mm_add_epi32(ctr, one);
        for (int r = 1; r < 10; r++) b = _mm_aesenc_si128(b, rk[r]);
        _mm_storeu_si128((__m128i *)(out + 16 * j), _mm_aesenclast_si128(b, rk[10]));
    }
}

/* the same with VAES: two blocks per 256-bit register, 16 in flight */
__attribute__((target("vaes,avx2,aes,sse4.1"))) static void rpis_vaes(const uint8_t rpik[16], uint32_t e0, unsigned count, uint8_t *out) {
    __m128i rk[11];
    aes128_schedule(rpik, rk);
    __m256i rk2[11];
    for (int r = 0; r < 11; r++) rk2[r] = _mm256_broadcastsi128_si256(rk[r]);
    __m128i c0 = _mm_insert_epi32(_mm_setr_epi8('E', 'N', '-', 'R', 'P', 'I', 0, 0, 0, 0, 0, 0, 0, 0, 0, 0), (int)e0, 3);
    __m256i ctr = _mm256_add_epi32(_mm256_broadcastsi128_si256(c0), _mm256_setr_epi32(0, 0, 0, 0, 0, 0, 0, 1));
    const __m256i two = _mm256_setr_epi32(0, 0, 0, 2, 0, 0, 0, 2);
    unsigned j = 0;
    for (; j + 16 <= count; j += 16) {
        __m256i b[8];
        for (int k = 0; k < 8; k++) { b[k] = _mm256_xor_si256(ctr, rk2[0]); ctr = _mm256_add_epi32(ctr, two); }
        for (int r = 1; r < 10; r++) for (int k = 0; k < 8; k++) b[k] = _mm256_aesenc_epi128(b[k], rk2[r]);
        for (int k = 0; k < 8; k++) _mm256_storeu_si256((__m256i *)(out + 16 * (j + 2 * k)), _mm256_aesenclast_epi128(b[k], rk2[10]));
    }
    for (; j + 2 <= count; j += 2) {
        __m256i b = _mm256_xor_si256(ctr, rk2[0]);
        ctr = _mm256_add_epi32(ctr, two);
        for (int r = 1; r < 10; r++) b = _mm256_aesenc_epi128(b, rk2[r]);
        _mm256_storeu_si256((__m256i *)(out + 16 * j), _mm256_aesenclast_epi128(b, rk2[10]));
    }
    if (j < count) {
        __m128i b = _mm_xor_si128(_mm256_castsi256_si128(ctr), rk[0]);
        for (int r = 1; r < 10; r++) b = _mm_aesenc_si128(b, rk[r]);
        _mm_storeu_si128((__m128i *)(out + 16 * j), _mm_aesenclast_si128(b, rk[10]));
    }
}
#endif

/* ---- keyed hashing of RPIs -------------------------------------------------------------- */

typedef struct { uint64_t s0, s1, m0, m1, m2; } hseed;

static inline uint64_t ld64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }

static inline uint64_t rpi_hash(const hseed *k, const uint8_t *r) {
    uint64_t h = ((ld64(r) ^ k->s0) * k->m0) ^ ((ld64(r + 8) ^ k->s1) * k->m1);
    h ^= h >> 32;
    return h * k->m2;
}

/* The filter needs no key: the RPIs looked up are AES outputs, and whoever chooses stored
 * RPIs can only fill words (false positives cost one probe of the exact table each). */
static inline uint64_t filter_mask(uint64_t h) {
    return (1ull << (h & 63)) | (1ull << ((h >> 6) & 63)) | (1ull << ((h >> 12) & 63)) | (1ull << ((h >> 18) & 63));
}

/* ---- the index ------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    Py_buffer rpis;          /* n x 16 bytes, kept alive (no copy) */
    Py_ssize_t n;
    int64_t lo, hi;          /* intervals looked up: the days of min(first)-tol .. max(last)+tol */
    int64_t day0;            /* day of filters[0] */
    Py_ssize_t ndays;
    uint64_t **filters;      /* per day: 2^wbits words */
    unsigned *wbits;
    uint64_t *table;         /* per distinct RPI: entry + 1 of its first entry | its hash's low 32 bits << 32; 0: empty */
    unsigned tbits;
    uint32_t *next;          /* next entry with the same RPI, + 1 */
    int32_t *dlo, *dhi;      /* each entry's days: those of [first - tol, last + tol], from day0 */
    hseed seed;
    Py_ssize_t distinct;
} IndexObject;

static void index_free_parts(IndexObject *self) {
    if (self->filters) { for (Py_ssize_t d = 0; d < self->ndays; d++) free(self->filters[d]); free(self->filters); }
    free(self->wbits); free(self->table); free(self->next); free(self->dlo); free(self->dhi);
    self->filters = NULL; self->wbits = NULL; self->table = NULL; self->next = NULL; self->dlo = NULL; self->dhi = NULL;
    if (self->rpis.obj) PyBuffer_Release(&self->rpis);
}

static void index_dealloc(IndexObject *self) {
    index_free_parts(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int64_t floordiv144(int64_t e) { return e >= 0 ? e / PERIOD_MAX : -((-e + PERIOD_MAX - 1) / PERIOD_MAX); }

static unsigned ceil_log2(uint64_t v) { unsigned b = 0; while (((uint64_t)1 << b) < v) b++; return b; }

static int index_init(IndexObject *self, PyObject *args, PyObject *kw) {
    static char *names[] = {"rpis", "first", "last", "tolerance", "seed", NULL};
    Py_buffer first = {0}, last = {0}, seed = {0};
    int tol;
    if (self->table || self->rpis.obj) {
        PyErr_SetString(PyExc_RuntimeError, "an Index is built once");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kw, "y*y*y*iy*", names, &self->rpis, &first, &last, &tol, &seed))
        return -1;
    int rc = -1;
    Py_ssize_t n = self->rpis.len / 16;
    uint32_t *count = NULL;
    if (self->rpis.len % 16 || first.len != n * 4 || last.len != n * 4 || seed.len != 40 || tol < 0 || tol > 100000 ||
        n >= 0x7fffffff) {
        PyErr_SetString(PyExc_ValueError, "inconsistent index buffers");
        goto out;
    }
    self->n = n;
    const uint8_t *sd = seed.buf;
    self->seed.s0 = ld64(sd); self->seed.s1 = ld64(sd + 8);
    self->seed.m0 = ld64(sd + 16) | 1; self->seed.m1 = ld64(sd + 24) | 1; self->seed.m2 = ld64(sd + 32) | 1;
    const uint32_t *fi = first.buf, *la = last.buf;
    const uint8_t *rp = self->rpis.buf;
    if (n == 0) { self->lo = 1; self->hi = 0; self->ndays = 0; rc = 0; goto out; }
    int64_t lo = INT64_MAX, hi = INT64_MIN;
    for (Py_ssize_t i = 0; i < n; i++) {
        int64_t f = fi[i], l = la[i] < fi[i] ? fi[i] : la[i];
        if (f - tol < lo) lo = f - tol;
        if (l + tol > hi) hi = l + tol;
    }
    self->day0 = floordiv144(lo);
    self->ndays = (Py_ssize_t)(floordiv144(hi) - self->day0 + 1);
    /* whole days: an RPI is looked up on every day some encounter's window reaches */
    self->lo = self->day0 * PERIOD_MAX;
    self->hi = (self->day0 + self->ndays) * PERIOD_MAX - 1;
    if (self->ndays > MAX_DAYS) {
        PyErr_Format(PyExc_ValueError, "the encounters span %zd days, more than %d", self->ndays, MAX_DAYS);
        goto out;
    }
    count = calloc((size_t)self->ndays, sizeof(uint32_t));
    self->filters = calloc((size_t)self->ndays, sizeof(uint64_t *));
    self->wbits = calloc((size_t)self->ndays, sizeof(unsigned));
    self->tbits = ceil_log2((uint64_t)n * 2 < 16 ? 16 : (uint64_t)n * 2);
    self->table = calloc((size_t)1 << self->tbits, sizeof(uint64_t));
    self->next = calloc((size_t)n, sizeof(uint32_t));
    self->dlo = malloc((size_t)n * sizeof(int32_t));
    self->dhi = malloc((size_t)n * sizeof(int32_t));
    if (!count || !self->filters || !self->wbits || !self->table || !self->next || !self->dlo || !self->dhi) {
        PyErr_NoMemory();
        goto out;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        int64_t l = la[i] < fi[i] ? fi[i] : la[i];
        self->dlo[i] = (int32_t)(floordiv144((int64_t)fi[i] - tol) - self->day0);
        self->dhi[i] = (int32_t)(floordiv144(l + tol) - self->day0);
        for (int32_t d = self->dlo[i]; d <= self->dhi[i]; d++) count[d]++;
    }
    for (Py_ssize_t d = 0; d < self->ndays; d++) {
        unsigned wb = ceil_log2(((uint64_t)count[d] * FILTER_BITS_PER_RPI + 63) / 64);
        if (wb < 3) wb = 3;
        self->wbits[d] = wb;
        if (count[d] && !(self->filters[d] = calloc((size_t)1 << wb, sizeof(uint64_t)))) { PyErr_NoMemory(); goto out; }
    }
    uint64_t tmask = ((uint64_t)1 << self->tbits) - 1;
    for (Py_ssize_t i = 0; i < n; i++) {
        const uint8_t *r = rp + 16 * i;
        uint64_t h = rpi_hash(&self->seed, r);
        for (int32_t k = self->dlo[i]; k <= self->dhi[i]; k++)
            self->filters[k][ld64(r) >> (64 - self->wbits[k])] |= filter_mask(ld64(r + 8));
        uint64_t s = (h ^ (h >> 29)) >> (64 - self->tbits), fp = h << 32;
        for (;; s = (s + 1) & tmask) {
            uint64_t slot = self->table[s];
            uint32_t e = (uint32_t)slot;
            if (e == 0) { self->table[s] = fp | ((uint32_t)i + 1); self->distinct++; break; }
            if ((slot >> 32) == (h & 0xffffffffu) && memcmp(rp + 16 * (size_t)(e - 1), r, 16) == 0) {
                /* the same RPI: chain this entry after the first */
                self->next[i] = self->next[e - 1];
                self->next[e - 1] = (uint32_t)i + 1;
                break;
            }
        }
    }
    rc = 0;
out:
    free(count);
    if (first.obj) PyBuffer_Release(&first);
    if (last.obj) PyBuffer_Release(&last);
    if (seed.obj) PyBuffer_Release(&seed);
    if (rc) index_free_parts(self);
    return rc;
}

/* ---- the scan ----------------------------------------------------------------------------- */

typedef struct {
    uint32_t *v;             /* (key, j, entry) triples */
    size_t count, cap;
} hits_t;

typedef struct scan_job scan_job;
typedef struct scan_worker scan_worker;
typedef struct {
    void (*rpik2)(const scan_job *, const uint8_t *, const uint8_t *, uint8_t *, uint8_t *);
    int (*rpis)(EVP_CIPHER_CTX *, const scan_job *, const uint8_t *, int64_t, unsigned, uint8_t *);
    int (*lookup)(scan_worker *, uint32_t, int64_t, int64_t, int64_t, const uint8_t *);
} kernel_fns;

struct scan_job {
    const IndexObject *ix;
    const uint8_t *teks;
    const uint32_t *starts;
    const uint8_t *periods;  /* u16 little-endian */
    const uint32_t *order;   /* keys sorted by day */
    Py_ssize_t n;
    const uint8_t *padded;   /* PaddedData of intervals ix->lo.. */
    int64_t padded_lo;
    hkdf_pre pre;
#ifdef HAVE_X86
    hkdf_ni pre_ni;
#endif
    kernel_fns fns;
    volatile Py_ssize_t next_chunk;
    pthread_mutex_t lock;
    int failed;              /* 1: OpenSSL, 2: memory */
};

struct scan_worker {
    scan_job *job;
    hits_t hits;
    uint64_t derived, rpis, candidates;
};

static Py_ssize_t take_chunk(scan_job *job) {
    pthread_mutex_lock(&job->lock);
    Py_ssize_t c = job->failed ? -1 : job->next_chunk++;
    pthread_mutex_unlock(&job->lock);
    return c;
}

static void fail(scan_job *job, int why) {
    pthread_mutex_lock(&job->lock);
    if (!job->failed) job->failed = why;
    pthread_mutex_unlock(&job->lock);
}

static int add_hit(hits_t *h, uint32_t key, uint32_t j, uint32_t entry) {
    if (h->count == h->cap) {
        size_t cap = h->cap ? h->cap * 2 : 256;
        uint32_t *v = realloc(h->v, cap * 3 * sizeof(uint32_t));
        if (!v) return -1;
        h->v = v; h->cap = cap;
    }
    h->v[3*h->count] = key; h->v[3*h->count+1] = j; h->v[3*h->count+2] = entry;
    h->count++;
    return 0;
}

/* the exact look-up of an RPI of day ``day`` (from day0) that passed the filter: every
 * entry with that RPI whose days include it */
static int exact_hits(scan_worker *w, uint32_t key, uint32_t j, int32_t day, const uint8_t *r) {
    const IndexObject *ix = w->job->ix;
    const uint8_t *rp = ix->rpis.buf;
    uint64_t h = rpi_hash(&ix->seed, r), tmask = ((uint64_t)1 << ix->tbits) - 1;
    w->candidates++;
    for (uint64_t s = (h ^ (h >> 29)) >> (64 - ix->tbits);; s = (s + 1) & tmask) {
        uint64_t slot = ix->table[s];
        uint32_t en = (uint32_t)slot;
        if (en == 0) return 0;
        if ((slot >> 32) == (h & 0xffffffffu) && memcmp(rp + 16 * (size_t)(en - 1), r, 16) == 0) {
            for (; en; en = ix->next[en - 1])
                if (ix->dlo[en - 1] <= day && day <= ix->dhi[en - 1] && add_hit(&w->hits, key, j, en - 1)) return -1;
            return 0;
        }
    }
}

/* the RPIs of intervals a..b (in ``out``) looked up in the filter of each one's day */
static inline __attribute__((always_inline)) int lookup_body(scan_worker *w, uint32_t key, int64_t start, int64_t a,
                                                             int64_t b, const uint8_t *out) {
    const IndexObject *ix = w->job->ix;
    for (int64_t e = a; e <= b;) {
        int64_t d = floordiv144(e), end = (d + 1) * PERIOD_MAX - 1;
        if (end > b) end = b;
        const uint64_t *f = ix->filters[d - ix->day0];
        if (f) {
            unsigned shift = 64 - ix->wbits[d - ix->day0];
            for (int64_t x = e; x <= end; x++) {
                const uint8_t *r = out + 16 * (x - a);
                uint64_t m = filter_mask(ld64(r + 8));
                if ((f[ld64(r) >> shift] & m) == m && exact_hits(w, key, (uint32_t)(x - start), (int32_t)(d - ix->day0), r)) return -1;
            }
        }
        e = end + 1;
    }
    return 0;
}

static int lookup_generic(scan_worker *w, uint32_t key, int64_t start, int64_t a, int64_t b, const uint8_t *out) {
    return lookup_body(w, key, start, a, b, out);
}

#ifdef HAVE_X86
__attribute__((target("avx2"))) static inline __m256i mask4_avx2(__m256i hi, __m256i one, __m256i m63) {
    __m256i m = _mm256_sllv_epi64(one, _mm256_and_si256(hi, m63));
    m = _mm256_or_si256(m, _mm256_sllv_epi64(one, _mm256_and_si256(_mm256_srli_epi64(hi, 6), m63)));
    m = _mm256_or_si256(m, _mm256_sllv_epi64(one, _mm256_and_si256(_mm256_srli_epi64(hi, 12), m63)));
    return _mm256_or_si256(m, _mm256_sllv_epi64(one, _mm256_and_si256(_mm256_srli_epi64(hi, 18), m63)));
}

/* the same, four RPIs at a time: AVX2 gathers their filter words and makes their masks */
__attribute__((target("avx2,bmi2"))) static int lookup_avx2(scan_worker *w, uint32_t key, int64_t start, int64_t a,
                                                            int64_t b, const uint8_t *out) {
    const IndexObject *ix = w->job->ix;
    const __m256i one = _mm256_set1_epi64x(1), m63 = _mm256_set1_epi64x(63);
    static const int lane_rpi[4] = {0, 2, 1, 3};   /* unpack*_epi64 of (r0 r1), (r2 r3) orders lanes r0 r2 r1 r3 */
    for (int64_t e = a; e <= b;) {
        int64_t d = floordiv144(e), end = (d + 1) * PERIOD_MAX - 1;
        if (end > b) end = b;
        const uint64_t *f = ix->filters[d - ix->day0];
        if (f) {
            unsigned shift = 64 - ix->wbits[d - ix->day0];
            __m128i sh = _mm_cvtsi32_si128((int)shift);
            int64_t x = e;
            /* eight at a time: two gathers in flight hide each other's latency */
            for (; x + 8 <= end + 1; x += 8) {
                const uint8_t *r = out + 16 * (x - a);
                __m256i p0 = _mm256_loadu_si256((const __m256i *)r), q0 = _mm256_loadu_si256((const __m256i *)(r + 32));
                __m256i p1 = _mm256_loadu_si256((const __m256i *)(r + 64)), q1 = _mm256_loadu_si256((const __m256i *)(r + 96));
                __m256i lo0 = _mm256_unpacklo_epi64(p0, q0), hi0 = _mm256_unpackhi_epi64(p0, q0);
                __m256i lo1 = _mm256_unpacklo_epi64(p1, q1), hi1 = _mm256_unpackhi_epi64(p1, q1);
                __m256i w0 = _mm256_i64gather_epi64((const long long *)f, _mm256_srl_epi64(lo0, sh), 8);
                __m256i w1 = _mm256_i64gather_epi64((const long long *)f, _mm256_srl_epi64(lo1, sh), 8);
                __m256i m0 = mask4_avx2(hi0, one, m63), m1 = mask4_avx2(hi1, one, m63);
                int pass = _mm256_movemask_pd(_mm256_castsi256_pd(_mm256_cmpeq_epi64(_mm256_and_si256(w0, m0), m0))) |
                           _mm256_movemask_pd(_mm256_castsi256_pd(_mm256_cmpeq_epi64(_mm256_and_si256(w1, m1), m1))) << 4;
                for (; pass; pass &= pass - 1) {
                    int k = __builtin_ctz((unsigned)pass);
                    int64_t y = x + (k & 4) + lane_rpi[k & 3];
                    if (exact_hits(w, key, (uint32_t)(y - start), (int32_t)(d - ix->day0), out + 16 * (y - a))) return -1;
                }
            }
            for (; x + 4 <= end + 1; x += 4) {
                const uint8_t *r = out + 16 * (x - a);
                __m256i p = _mm256_loadu_si256((const __m256i *)r), q = _mm256_loadu_si256((const __m256i *)(r + 32));
                __m256i lo = _mm256_unpacklo_epi64(p, q), hi = _mm256_unpackhi_epi64(p, q);
                __m256i word = _mm256_i64gather_epi64((const long long *)f, _mm256_srl_epi64(lo, sh), 8);
                __m256i m = mask4_avx2(hi, one, m63);
                int pass = _mm256_movemask_pd(_mm256_castsi256_pd(_mm256_cmpeq_epi64(_mm256_and_si256(word, m), m)));
                for (; pass; pass &= pass - 1) {
                    int k = __builtin_ctz((unsigned)pass);
                    int64_t y = x + lane_rpi[k];
                    if (exact_hits(w, key, (uint32_t)(y - start), (int32_t)(d - ix->day0), out + 16 * (y - a))) return -1;
                }
            }
            for (; x <= end; x++) {
                const uint8_t *r = out + 16 * (x - a);
                uint64_t mk = filter_mask(ld64(r + 8));
                if ((f[ld64(r) >> shift] & mk) == mk && exact_hits(w, key, (uint32_t)(x - start), (int32_t)(d - ix->day0), r)) return -1;
            }
        }
        e = end + 1;
    }
    return 0;
}
#endif


static void rpik2_openssl(const scan_job *job, const uint8_t *ta, const uint8_t *tb, uint8_t *oa, uint8_t *ob) {
    hkdf_rpik(&job->pre, ta, oa);
    hkdf_rpik(&job->pre, tb, ob);
}

static int rpis_openssl(EVP_CIPHER_CTX *ctx, const scan_job *job, const uint8_t *rpik, int64_t a, unsigned count,
                        uint8_t *out) {
    int len = 16 * (int)count, outl = 0;
    return EVP_EncryptInit_ex(ctx, NULL, NULL, rpik, NULL) == 1 &&
           EVP_EncryptUpdate(ctx, out, &outl, job->padded + 16 * (a - job->padded_lo), len) == 1 && outl == len;
}

#ifdef HAVE_X86
static void rpik2_shani(const scan_job *job, const uint8_t *ta, const uint8_t *tb, uint8_t *oa, uint8_t *ob) {
    hkdf_rpik2_ni(&job->pre_ni, ta, tb, oa, ob);
}
static int rpis_aes_ni(EVP_CIPHER_CTX *ctx, const scan_job *job, const uint8_t *rpik, int64_t a, unsigned count,
                       uint8_t *out) {
    rpis_aesni(rpik, (uint32_t)a, count, out);
    return 1;
}
static int rpis_vaes_ni(EVP_CIPHER_CTX *ctx, const scan_job *job, const uint8_t *rpik, int64_t a, unsigned count,
                        uint8_t *out) {
    rpis_vaes(rpik, (uint32_t)a, count, out);
    return 1;
}
#endif

static kernel_fns pick_kernel(int portable) {
    kernel_fns k = {rpik2_openssl, rpis_openssl, lookup_generic};
#ifdef HAVE_X86
    if (!portable) {
        if (cpu_sha) k.rpik2 = rpik2_shani;
        if (cpu_vaes) k.rpis = rpis_vaes_ni;
        else if (cpu_aesni) k.rpis = rpis_aes_ni;
        if (cpu_avx2) k.lookup = lookup_avx2;
    }
#endif
    return k;
}

static void *scan_thread(void *arg) {
    scan_worker *w = arg;
    scan_job *job = w->job;
    const IndexObject *ix = job->ix;
    kernel_fns fn = job->fns;
    uint8_t out[16 * PERIOD_MAX + 32];
    uint32_t todo[CHUNK_KEYS];
    int64_t lo_of[CHUNK_KEYS], hi_of[CHUNK_KEYS];
    uint8_t rpik[CHUNK_KEYS + 1][16];
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    if (!ctx || EVP_EncryptInit_ex(ctx, EVP_aes_128_ecb(), NULL, NULL, NULL) != 1) { fail(job, 1); goto done; }
    EVP_CIPHER_CTX_set_padding(ctx, 0);
    for (;;) {
        Py_ssize_t c = take_chunk(job);
        if (c < 0 || c * CHUNK_KEYS >= job->n) break;
        Py_ssize_t end = (c + 1) * CHUNK_KEYS < job->n ? (c + 1) * CHUNK_KEYS : job->n;
        int m = 0;
        for (Py_ssize_t o = c * CHUNK_KEYS; o < end; o++) {   /* keys with intervals to look up */
            uint32_t i = job->order[o];
            int64_t start = job->starts[i];
            unsigned period = (unsigned)job->periods[2*i] | (unsigned)job->periods[2*i+1] << 8;
            int64_t a = start > ix->lo ? start : ix->lo, b = start + period - 1 < ix->hi ? start + period - 1 : ix->hi;
            if (a > b) continue;
            todo[m] = i; lo_of[m] = a; hi_of[m] = b; m++;
            __builtin_prefetch(job->teks + 16 * (size_t)i);   /* keys are taken in day order, not memory order */
        }
        for (int k = 0; k < m; k += 2)   /* two at a time: their hash chains interleave */
            fn.rpik2(job, job->teks + 16 * (size_t)todo[k], job->teks + 16 * (size_t)todo[k + 1 < m ? k + 1 : k],
                     rpik[k], rpik[k + 1]);
        for (int k = 0; k < m; k++) {
            uint32_t i = todo[k];
            unsigned count = (unsigned)(hi_of[k] - lo_of[k] + 1);
            if (!fn.rpis(ctx, job, rpik[k], lo_of[k], count, out)) { fail(job, 1); goto done; }
            w->derived++;
            w->rpis += count;
            if (fn.lookup(w, i, job->starts[i], lo_of[k], hi_of[k], out)) { fail(job, 2); goto done; }
        }
    }
done:
    if (ctx) EVP_CIPHER_CTX_free(ctx);
    return NULL;
}

static int cmp_triple(const void *x, const void *y) {
    const uint32_t *a = x, *b = y;
    for (int k = 0; k < 3; k++) if (a[k] != b[k]) return a[k] < b[k] ? -1 : 1;
    return 0;
}

/* scan(teks, starts_u32, periods_u16, threads) -> (hits bytes of u32 triples, derived, rpis, candidates) */
static PyObject *index_scan(IndexObject *self, PyObject *args) {
    Py_buffer teks, starts, periods;
    int threads, portable = 0;
    if (!PyArg_ParseTuple(args, "y*y*y*i|p", &teks, &starts, &periods, &threads, &portable)) return NULL;
    PyObject *result = NULL;
    scan_job job;
    memset(&job, 0, sizeof job);
    scan_worker workers[MAX_THREADS];
    memset(workers, 0, sizeof workers);
    uint32_t *order = NULL, *cnt = NULL;
    uint8_t *padded = NULL;
    Py_ssize_t n = teks.len / 16;
    if (teks.len % 16 || starts.len != n * 4 || periods.len != n * 2 || n >= 0xffffffffLL) {
        PyErr_SetString(PyExc_ValueError, "inconsistent key buffers");
        goto out;
    }
    const uint32_t *st = starts.buf;
    const uint8_t *pe = periods.buf;
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned p = (unsigned)pe[2*i] | (unsigned)pe[2*i+1] << 8;
        if (p == 0 || p > PERIOD_MAX || st[i] > 0x7fffffffu) {
            PyErr_SetString(PyExc_ValueError, "a key's rolling period is out of 1..144 or its start out of range");
            goto out;
        }
    }
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (n == 0 || self->n == 0) { result = Py_BuildValue("(y#KKK)", "", (Py_ssize_t)0, 0ull, 0ull, 0ull); goto out; }
    /* keys sorted by day (a counting sort), so that one day's filter stays in cache */
    Py_ssize_t nd = self->ndays + 2;
    order = malloc((size_t)n * sizeof(uint32_t));
    cnt = calloc((size_t)nd + 1, sizeof(uint32_t));
    int64_t plen = self->hi - self->lo + 1;
    padded = malloc((size_t)plen * 16);
    if (!order || !cnt || !padded) { PyErr_NoMemory(); goto out; }
    for (Py_ssize_t i = 0; i < n; i++) {
        int64_t d = floordiv144((int64_t)st[i]) - self->day0 + 1;
        if (d < 0) d = 0;
        if (d > nd - 1) d = nd - 1;
        cnt[d + 1]++;
    }
    for (Py_ssize_t d = 0; d < nd; d++) cnt[d + 1] += cnt[d];
    for (Py_ssize_t i = 0; i < n; i++) {
        int64_t d = floordiv144((int64_t)st[i]) - self->day0 + 1;
        if (d < 0) d = 0;
        if (d > nd - 1) d = nd - 1;
        order[cnt[d]++] = (uint32_t)i;
    }
    for (int64_t e = 0; e < plen; e++) {   /* PaddedData_j = "EN-RPI" 0^6 ENIN_j (32-bit little-endian) */
        uint8_t *b = padded + 16 * e;
        uint32_t v = (uint32_t)(self->lo + e);
        memcpy(b, "EN-RPI\0\0\0\0\0\0", 12);
        b[12] = (uint8_t)v; b[13] = (uint8_t)(v >> 8); b[14] = (uint8_t)(v >> 16); b[15] = (uint8_t)(v >> 24);
    }
    job.ix = self; job.teks = teks.buf; job.starts = st; job.periods = pe; job.order = order; job.n = n;
    job.padded = padded; job.padded_lo = self->lo;
    hkdf_pre_init(&job.pre);
#ifdef HAVE_X86
    if (cpu_sha) hkdf_ni_init(&job.pre_ni);
#endif
    job.fns = pick_kernel(portable);
    pthread_mutex_init(&job.lock, NULL);
    Py_ssize_t chunks = (n + CHUNK_KEYS - 1) / CHUNK_KEYS;
    if (threads > chunks) threads = (int)chunks;
    pthread_t tids[MAX_THREADS];
    int started = 0;
    Py_BEGIN_ALLOW_THREADS
    for (int t = 0; t < threads; t++) workers[t].job = &job;
    for (int t = 1; t < threads; t++) {
        if (pthread_create(&tids[t], NULL, scan_thread, &workers[t]) != 0) break;
        started = t;
    }
    scan_thread(&workers[0]);
    for (int t = 1; t <= started; t++) pthread_join(tids[t], NULL);
    Py_END_ALLOW_THREADS
    pthread_mutex_destroy(&job.lock);
    if (job.failed) {
        if (job.failed == 2) PyErr_NoMemory();
        else PyErr_SetString(PyExc_RuntimeError, "OpenSSL failure in the matching kernel");
        goto out;
    }
    size_t total = 0;
    uint64_t derived = 0, rpis = 0, cand = 0;
    for (int t = 0; t < threads; t++) {
        total += workers[t].hits.count;
        derived += workers[t].derived; rpis += workers[t].rpis; cand += workers[t].candidates;
    }
    PyObject *buf = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(total * 3 * sizeof(uint32_t)));
    if (!buf) goto out;
    uint32_t *dst = (uint32_t *)PyBytes_AS_STRING(buf);
    for (int t = 0; t < threads; t++) {
        if (workers[t].hits.count)
            memcpy(dst, workers[t].hits.v, workers[t].hits.count * 3 * sizeof(uint32_t));
        dst += workers[t].hits.count * 3;
    }
    qsort(PyBytes_AS_STRING(buf), total, 3 * sizeof(uint32_t), cmp_triple);
    result = Py_BuildValue("(NKKK)", buf, (unsigned long long)derived, (unsigned long long)rpis,
                           (unsigned long long)cand);
out:
    for (int t = 0; t < MAX_THREADS; t++) free(workers[t].hits.v);
    free(order); free(cnt); free(padded);
    PyBuffer_Release(&teks); PyBuffer_Release(&starts); PyBuffer_Release(&periods);
    return result;
}

static PyObject *index_info(IndexObject *self, PyObject *Py_UNUSED(ignored)) {
    size_t filter_bytes = 0;
    for (Py_ssize_t d = 0; d < self->ndays; d++) if (self->filters && self->filters[d]) filter_bytes += (size_t)8 << self->wbits[d];
    return Py_BuildValue("{s:n,s:n,s:L,s:L,s:n,s:n,s:n}", "entries", self->n, "distinct", self->distinct,
                         "lo", (long long)self->lo, "hi", (long long)self->hi, "days", self->ndays,
                         "filter_bytes", (Py_ssize_t)filter_bytes,
                         "table_bytes", (Py_ssize_t)((((size_t)1 << self->tbits) * 8 + (size_t)self->n * 12)));
}

/* rpiks(teks, portable) -> the RPIKs; rpis(rpik, e0, count, portable) -> the RPIs: the
 * primitives of both paths, for the tests' cross-check against the reference */
static PyObject *py_rpiks(PyObject *mod, PyObject *args) {
    Py_buffer teks;
    int portable = 0;
    if (!PyArg_ParseTuple(args, "y*|p", &teks, &portable)) return NULL;
    PyObject *r = NULL;
    Py_ssize_t n = teks.len / 16;
    if (teks.len % 16) { PyErr_SetString(PyExc_ValueError, "TEKs are 16 bytes each"); goto out; }
    r = PyBytes_FromStringAndSize(NULL, teks.len);
    if (!r) goto out;
    scan_job job;
    memset(&job, 0, sizeof job);
    hkdf_pre_init(&job.pre);
#ifdef HAVE_X86
    if (cpu_sha) hkdf_ni_init(&job.pre_ni);
#endif
    kernel_fns fn = pick_kernel(portable);
    const uint8_t *t = teks.buf;
    uint8_t *o = (uint8_t *)PyBytes_AS_STRING(r), spare[16];
    for (Py_ssize_t i = 0; i < n; i += 2)
        fn.rpik2(&job, t + 16 * i, t + 16 * (i + 1 < n ? i + 1 : i), o + 16 * i, i + 1 < n ? o + 16 * (i + 1) : spare);
out:
    PyBuffer_Release(&teks);
    return r;
}

static PyObject *py_rpis(PyObject *mod, PyObject *args) {
    Py_buffer key;
    unsigned int e0, count;
    int portable = 0;
    if (!PyArg_ParseTuple(args, "y*II|p", &key, &e0, &count, &portable)) return NULL;
    PyObject *r = NULL;
    uint8_t *padded = NULL;
    EVP_CIPHER_CTX *ctx = NULL;
    if (key.len != 16 || count == 0 || count > PERIOD_MAX) { PyErr_SetString(PyExc_ValueError, "bad RPI request"); goto out; }
    padded = malloc(16 * (size_t)count);
    ctx = EVP_CIPHER_CTX_new();
    if (!padded || !ctx || EVP_EncryptInit_ex(ctx, EVP_aes_128_ecb(), NULL, NULL, NULL) != 1) { PyErr_NoMemory(); goto out; }
    EVP_CIPHER_CTX_set_padding(ctx, 0);
    for (unsigned j = 0; j < count; j++) {
        uint8_t *b = padded + 16 * j;
        uint32_t v = e0 + j;
        memcpy(b, "EN-RPI\0\0\0\0\0\0", 12);
        b[12] = (uint8_t)v; b[13] = (uint8_t)(v >> 8); b[14] = (uint8_t)(v >> 16); b[15] = (uint8_t)(v >> 24);
    }
    scan_job job;
    memset(&job, 0, sizeof job);
    job.padded = padded; job.padded_lo = e0;
    r = PyBytes_FromStringAndSize(NULL, 16 * (Py_ssize_t)count + 32);
    if (r && !pick_kernel(portable).rpis(ctx, &job, key.buf, e0, count, (uint8_t *)PyBytes_AS_STRING(r))) {
        Py_CLEAR(r);
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL failure");
    }
    if (r) Py_SET_SIZE(r, 16 * (Py_ssize_t)count);
out:
    if (ctx) EVP_CIPHER_CTX_free(ctx);
    free(padded);
    PyBuffer_Release(&key);
    return r;
}

static PyMethodDef index_methods[] = {
    {"scan", (PyCFunction)index_scan, METH_VARARGS,
     "scan(teks, starts_u32le, periods_u16le, threads, portable=False) -> (hits: u32 triples (key, j, entry), derived, "
     "rpis, candidates); portable: OpenSSL only, no AES-NI/SHA-NI/BMI2 code of its own"},
    {"info", (PyCFunction)index_info, METH_NOARGS, "sizes of the index's parts"},
    {NULL, NULL, 0, NULL}
};

static PyTypeObject IndexType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "agent.exposure._fastmatch.Index",
    .tp_basicsize = sizeof(IndexObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Index(rpis, first_u32, last_u32, tolerance, seed40): stored RPIs, filtered per day",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)index_init,
    .tp_dealloc = (destructor)index_dealloc,
    .tp_methods = index_methods,
};

static PyObject *py_features(PyObject *mod, PyObject *Py_UNUSED(ignored)) {
#ifdef HAVE_X86
    return Py_BuildValue("{s:O,s:O,s:O,s:O}", "aesni", cpu_aesni ? Py_True : Py_False, "vaes",
                         cpu_vaes ? Py_True : Py_False, "shani", cpu_sha ? Py_True : Py_False, "avx2",
                         cpu_avx2 ? Py_True : Py_False);
#else
    return PyDict_New();
#endif
}

static PyMethodDef methods[] = {
    {"features", py_features, METH_NOARGS, "the CPU's instructions the kernel uses (after OPENSSL_ia32cap)"},
    {"rpiks", py_rpiks, METH_VARARGS, "rpiks(teks, portable=False) -> RPIKs (HKDF-SHA256, 'EN-RPIK')"},
    {"rpis", py_rpis, METH_VARARGS, "rpis(rpik, first_enin, count, portable=False) -> RPIs"},
    {NULL, NULL, 0, NULL}
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastmatch", NULL, -1, methods};

PyMODINIT_FUNC PyInit__fastmatch(void) {
#ifdef HAVE_X86
    cpu_detect();
#endif
    if (PyType_Ready(&IndexType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    Py_INCREF(&IndexType);
    if (PyModule_AddObject(m, "Index", (PyObject *)&IndexType) < 0) { Py_DECREF(&IndexType); Py_DECREF(m); return NULL; }
    return m;
}
