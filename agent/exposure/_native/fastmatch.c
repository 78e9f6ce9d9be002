/* Bulk Exposure Notification matching kernel (optional C extension).
 *
 * For each diagnosis key: RPIK = HKDF-SHA256(tek, salt=NULL, info="EN-RPIK", 16)
 * (RFC 5869: one extract, one expand block), then RPI_j = AES-128-ECB(RPIK, PaddedData_j)
 * for j in 0..period-1 (Exposure Notification Cryptography Specification v1.2), and a
 * look-up of the RPI's first 4 bytes (little-endian, masked) in a prefix table.
 * On a prefix hit the RPI is looked up exactly (binary search in the sorted stored
 * RPIs). Returns the (key index, j) pairs of exact hits.
 * The GIL is released during the loop so that threads use every core.
 */
#define PY_SSIZE_T_CLEAN
#define OPENSSL_API_COMPAT 0x10100000L
#include <Python.h>
#include <openssl/evp.h>
#include <openssl/sha.h>
#include <string.h>
#include <stdint.h>

static void hkdf_rpik(const SHA256_CTX *salt_in, const SHA256_CTX *salt_out, const uint8_t tek[16], uint8_t rpik[16]) {
    uint8_t ih[32], prk[32], kpad[64], okm[32];
    static const uint8_t info[8] = {'E', 'N', '-', 'R', 'P', 'I', 'K', 0x01};
    SHA256_CTX c = *salt_in;
    SHA256_Update(&c, tek, 16);
    SHA256_Final(ih, &c);
    c = *salt_out;
    SHA256_Update(&c, ih, 32);
    SHA256_Final(prk, &c);
    memset(kpad, 0x36, 64);
    for (int i = 0; i < 32; i++) kpad[i] ^= prk[i];
    SHA256_Init(&c);
    SHA256_Update(&c, kpad, 64);
    SHA256_Update(&c, info, 8);
    SHA256_Final(ih, &c);
    memset(kpad, 0x5c, 64);
    for (int i = 0; i < 32; i++) kpad[i] ^= prk[i];
    SHA256_Init(&c);
    SHA256_Update(&c, kpad, 64);
    SHA256_Update(&c, ih, 32);
    SHA256_Final(okm, &c);
    memcpy(rpik, okm, 16);
}

static PyObject *scan(PyObject *self, PyObject *args) {
    Py_buffer teks, starts, periods, table, sorted;
    unsigned int bits;
    if (!PyArg_ParseTuple(args, "y*y*y*y*Iy*", &teks, &starts, &periods, &table, &bits, &sorted)) return NULL;
    const uint8_t *sr = sorted.buf;
    Py_ssize_t nsorted = sorted.len / 16;
    Py_ssize_t n = teks.len / 16;
    PyObject *result = NULL;
    if (starts.len != n * 4 || periods.len != n * 2 || bits > 32 || (bits < 32 && table.len < ((Py_ssize_t)1 << bits))) {
        PyErr_SetString(PyExc_ValueError, "inconsistent buffer sizes");
        goto done;
    }
    size_t cap = 1024, count = 0;
    uint32_t *hits = malloc(cap * 2 * sizeof(uint32_t));
    uint8_t *in = malloc(16 * 144), *out = malloc(16 * 144 + 16);
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    int ok = hits && in && out && ctx && EVP_EncryptInit_ex(ctx, EVP_aes_128_ecb(), NULL, NULL, NULL) == 1;
    if (ok) EVP_CIPHER_CTX_set_padding(ctx, 0);
    const uint8_t *tk = teks.buf, *tb = table.buf;
    const uint8_t *st = starts.buf, *pe = periods.buf;
    uint32_t mask = bits >= 32 ? 0xFFFFFFFFu : ((1u << bits) - 1);
    SHA256_CTX salt_in, salt_out;
    uint8_t pad[64];
    memset(pad, 0x36, 64); SHA256_Init(&salt_in); SHA256_Update(&salt_in, pad, 64);
    memset(pad, 0x5c, 64); SHA256_Init(&salt_out); SHA256_Update(&salt_out, pad, 64);
    int bad = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; ok && i < n; i++) {
        uint32_t start = (uint32_t)st[4*i] | (uint32_t)st[4*i+1] << 8 | (uint32_t)st[4*i+2] << 16 | (uint32_t)st[4*i+3] << 24;
        unsigned period = (unsigned)pe[2*i] | (unsigned)pe[2*i+1] << 8;
        if (period == 0 || period > 144) { bad = 1; break; }
        uint8_t rpik[16];
        hkdf_rpik(&salt_in, &salt_out, tk + 16 * i, rpik);
        for (unsigned j = 0; j < period; j++) {
            uint8_t *b = in + 16 * j;
            memcpy(b, "EN-RPI\0\0\0\0\0\0", 12);
            uint32_t e = start + j;
            b[12] = e & 0xFF; b[13] = (e >> 8) & 0xFF; b[14] = (e >> 16) & 0xFF; b[15] = (e >> 24) & 0xFF;
        }
        int outl = 0;
        if (EVP_EncryptInit_ex(ctx, NULL, NULL, rpik, NULL) != 1 ||
            EVP_EncryptUpdate(ctx, out, &outl, in, 16 * (int)period) != 1 || outl != 16 * (int)period) { ok = 0; break; }
        for (unsigned j = 0; j < period; j++) {
            const uint8_t *r = out + 16 * j;
            uint32_t p = ((uint32_t)r[0] | (uint32_t)r[1] << 8 | (uint32_t)r[2] << 16 | (uint32_t)r[3] << 24) & mask;
            int found = 0;
            if (tb[p]) {
                Py_ssize_t lo = 0, hi = nsorted;
                while (lo < hi) {
                    Py_ssize_t mid = (lo + hi) / 2;
                    int c = memcmp(sr + 16 * mid, r, 16);
                    if (c == 0) { found = 1; break; }
                    if (c < 0) lo = mid + 1; else hi = mid;
                }
            }
            if (found) {
                if (count == cap) {
                    uint32_t *g = realloc(hits, cap * 4 * sizeof(uint32_t));
                    if (!g) { ok = 0; break; }
                    hits = g; cap *= 2;
                }
                hits[2*count] = (uint32_t)i; hits[2*count+1] = j; count++;
            }
        }
    }
    Py_END_ALLOW_THREADS
    if (bad) PyErr_SetString(PyExc_ValueError, "rolling period out of 1..144");
    else if (!ok) PyErr_SetString(PyExc_RuntimeError, "OpenSSL failure in the matching kernel");
    else {
        result = PyList_New((Py_ssize_t)count);
        for (size_t k = 0; result && k < count; k++)
            PyList_SET_ITEM(result, (Py_ssize_t)k, Py_BuildValue("(II)", hits[2*k], hits[2*k+1]));
    }
    if (ctx) EVP_CIPHER_CTX_free(ctx);
    free(hits); free(in); free(out);
done:
    PyBuffer_Release(&teks); PyBuffer_Release(&starts); PyBuffer_Release(&periods); PyBuffer_Release(&table);
    PyBuffer_Release(&sorted);
    return result;
}

static PyMethodDef methods[] = {
    {"scan", scan, METH_VARARGS, "scan(teks, starts_u32le, periods_u16le, prefix_table, bits, sorted_rpis) -> [(key, j)]"},
    {NULL, NULL, 0, NULL}
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastmatch", NULL, -1, methods};

PyMODINIT_FUNC PyInit__fastmatch(void) { return PyModule_Create(&module); }
