/* export.bin's protobuf straight into arrays (optional C extension).
 *
 * Reads a serialized TemporaryExposureKeyExport (export.proto, proto2) the way the
 * protobuf runtime (upb) does: unknown fields and fields of an unexpected wire type are
 * skipped (groups too, to a depth of 100), the last value of a scalar wins, int32 fields
 * keep a varint's low 32 bits, sint32 is zigzag, a report_type outside the enum is
 * unknown (0), rolling_period defaults to 144; a varint longer than 10 bytes, a length
 * past the end, wire type 6 or 7, field number 0 or an unmatched end-group is malformed.
 * Then each key is checked as DiagnosisKey.validate checks it. The keys come out as
 * arrays, never as Python objects; the tests compare it with the protobuf runtime on
 * valid, random and corrupted files.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_DEPTH 100

typedef struct {
    const uint8_t *p, *end;
} rd;

/* 0: ok; -1: malformed */
static int varint(rd *r, uint64_t *out) {
    uint64_t v = 0;
    for (int i = 0; i < 10; i++) {
        if (r->p >= r->end) return -1;
        uint8_t b = *r->p++;
        if (i < 10) v |= (uint64_t)(b & 0x7f) << (7 * i);
        if (!(b & 0x80)) { *out = v; return 0; }
    }
    return -1;
}

static int skip_field(rd *r, uint32_t tag, int depth);

static int skip_group(rd *r, uint32_t field, int depth) {
    if (depth > MAX_DEPTH) return -1;
    for (;;) {
        uint64_t t;
        if (varint(r, &t) || t > 0xffffffffu) return -1;
        uint32_t tag = (uint32_t)t;
        if ((tag >> 3) == 0) return -1;
        if ((tag & 7) == 4) return (tag >> 3) == field ? 0 : -1;
        if (skip_field(r, tag, depth + 1)) return -1;
    }
}

static int skip_field(rd *r, uint32_t tag, int depth) {
    uint64_t v;
    switch (tag & 7) {
    case 0: return varint(r, &v);
    case 1: if (r->end - r->p < 8) return -1; r->p += 8; return 0;
    case 2:
        if (varint(r, &v) || v > 0x7fffffff || v > (uint64_t)(r->end - r->p)) return -1;
        r->p += v;
        return 0;
    case 3: return skip_group(r, tag >> 3, depth);
    case 5: if (r->end - r->p < 4) return -1; r->p += 4; return 0;
    default: return -1;   /* 4: an end-group without its start; 6, 7: no such wire type */
    }
}

static int bytes_field(rd *r, const uint8_t **data, uint64_t *len) {
    if (varint(r, len) || *len > 0x7fffffff || *len > (uint64_t)(r->end - r->p)) return -1;
    *data = r->p;
    r->p += *len;
    return 0;
}

/* ---- key arrays: Python bytes objects sized by a first pass ----------------------------- */

typedef struct {
    size_t n, cap;
    PyObject *obj[8];        /* key_data, start, period, risk, report, dso, has_dso, variant */
    uint8_t *key_data;
    uint32_t *start;
    uint16_t *period;
    int32_t *risk;
    uint8_t *report;
    int32_t *dso;
    uint8_t *has_dso;
    uint8_t *variant;
} keys_t;

static const Py_ssize_t key_field_size[8] = {16, 4, 2, 4, 1, 4, 1, 1};

static void keys_free(keys_t *k) {
    for (int f = 0; f < 8; f++) Py_CLEAR(k->obj[f]);
    memset(k, 0, sizeof *k);
}

/* room for ``cap`` keys (with the GIL) */
static int keys_alloc(keys_t *k, size_t cap) {
    for (int f = 0; f < 8; f++)
        if (!(k->obj[f] = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)cap * key_field_size[f]))) return -1;
    k->cap = cap;
    k->key_data = (uint8_t *)PyBytes_AS_STRING(k->obj[0]); k->start = (uint32_t *)PyBytes_AS_STRING(k->obj[1]);
    k->period = (uint16_t *)PyBytes_AS_STRING(k->obj[2]); k->risk = (int32_t *)PyBytes_AS_STRING(k->obj[3]);
    k->report = (uint8_t *)PyBytes_AS_STRING(k->obj[4]); k->dso = (int32_t *)PyBytes_AS_STRING(k->obj[5]);
    k->has_dso = (uint8_t *)PyBytes_AS_STRING(k->obj[6]); k->variant = (uint8_t *)PyBytes_AS_STRING(k->obj[7]);
    return 0;
}

/* (n, key_data, start, ...) of the keys read, the arrays cut to n (with the GIL) */
static PyObject *keys_tuple(keys_t *k) {
    for (int f = 0; f < 8; f++)
        if ((size_t)PyBytes_GET_SIZE(k->obj[f]) != k->n * (size_t)key_field_size[f] &&
            _PyBytes_Resize(&k->obj[f], (Py_ssize_t)k->n * key_field_size[f]))
            return NULL;
    PyObject *t = Py_BuildValue("(nOOOOOOOO)", (Py_ssize_t)k->n, k->obj[0], k->obj[1], k->obj[2], k->obj[3], k->obj[4],
                                k->obj[5], k->obj[6], k->obj[7]);
    return t;
}

/* how many keys (field 7) and revised keys (field 8) the message holds, read from its
 * top-level tags only; -1 when those are malformed (the full pass says how) */
static int count_keys(const uint8_t *buf, size_t len, size_t *keys, size_t *revised) {
    rd r = {buf, buf + len};
    *keys = *revised = 0;
    while (r.p < r.end) {
        uint64_t t;
        if (varint(&r, &t) || t > 0xffffffffu || (t >> 3) == 0) return -1;
        if (((uint32_t)t >> 3) == 7 && (t & 7) == 2) (*keys)++;
        else if (((uint32_t)t >> 3) == 8 && (t & 7) == 2) (*revised)++;
        if (skip_field(&r, (uint32_t)t, 1)) return -1;
    }
    return 0;
}

/* errors: the message DiagnosisKey.validate or the parser gives */
typedef struct {
    const char *msg;
    long long arg;
} perr;

/* 0: appended; -1: malformed; -2: a key validate() refuses (err says why); -3: no memory */
static int parse_key(const uint8_t *buf, size_t len, keys_t *k, perr *err) {
    rd r = {buf, buf + len};
    const uint8_t *kd = NULL;
    uint64_t kdlen = 0, v;
    int32_t risk = 0, start = 0, period = 144, dso = 0;
    uint8_t report = 0, has_dso = 0, variant = 0;
    while (r.p < r.end) {
        uint64_t t;
        if (varint(&r, &t) || t > 0xffffffffu || (t >> 3) == 0) goto bad;
        uint32_t tag = (uint32_t)t, field = tag >> 3, wt = tag & 7;
        if (field == 1 && wt == 2) { if (bytes_field(&r, &kd, &kdlen)) goto bad; }
        else if (((field >= 2 && field <= 6) || field == 8) && wt == 0) {
            if (varint(&r, &v)) goto bad;
            int32_t i32 = (int32_t)(uint32_t)v;
            switch (field) {
            case 2: risk = i32; break;
            case 3: start = i32; break;
            case 4: period = i32; break;
            case 5: if (i32 >= 0 && i32 <= 5) report = (uint8_t)i32; break;   /* closed enum: else unknown */
            case 6: { uint32_t u = (uint32_t)v; dso = (int32_t)((u >> 1) ^ (0u - (u & 1))); has_dso = 1; break; }
            case 8: if (i32 >= 0 && i32 <= 4) variant = (uint8_t)i32; break;  /* closed enum, as report_type */
            }
        } else if (skip_field(&r, tag, 1)) goto bad;
    }
    if (kdlen != 16 || !kd) { err->msg = "key_data must be 16 bytes, got %lld"; err->arg = kd ? (long long)kdlen : 0; return -2; }
    if (period < 1 || period > 144) { err->msg = "rolling_period must be 1..144, got %lld"; err->arg = period; return -2; }
    if (start < 0) { err->msg = "rolling_start_interval_number must be 0..2147483647"; err->arg = 0; return -2; }
    if (k->n == k->cap) return -3;   /* counted first: cannot happen */
    size_t i = k->n++;
    memcpy(k->key_data + 16 * i, kd, 16);
    k->start[i] = (uint32_t)start; k->period[i] = (uint16_t)period; k->risk[i] = risk; k->report[i] = report;
    k->dso[i] = dso; k->has_dso[i] = has_dso; k->variant[i] = variant;
    return 0;
bad:
    err->msg = "export.bin protobuf is truncated or malformed";
    return -1;
}


/* parse(buf) -> (start_ts, end_ts, region bytes, batch_num, batch_size, [signature_info bytes],
 *                keys, revised_keys, first invalid key's message or None, same for revised);
 *                keys = (n, key_data, start u32, period u16, risk i32, report u8, dso i32,
 *                has_dso u8, variant_of_concern u8), the valid keys only. ValueError(message) when malformed. */
static PyObject *parse(PyObject *mod, PyObject *arg) {
    Py_buffer b;
    if (!PyArg_Parse(arg, "y*", &b)) return NULL;
    PyObject *result = NULL, *infos = PyList_New(0);
    keys_t keys = {0}, revised = {0};
    perr err = {NULL, 0}, kerr = {NULL, 0}, rerr = {NULL, 0};
    int rc = 0;
    uint64_t start_ts = 0, end_ts = 0;
    int32_t batch_num = 0, batch_size = 0;
    const uint8_t *region = (const uint8_t *)"";
    uint64_t region_len = 0;
    if (!infos) goto out;
    size_t nk = 0, nr = 0;
    if (count_keys(b.buf, (size_t)b.len, &nk, &nr)) rc = -1;   /* its tags are malformed: so is the whole */
    else if (keys_alloc(&keys, nk) || keys_alloc(&revised, nr)) goto out;
    Py_BEGIN_ALLOW_THREADS
    rd r = {b.buf, (const uint8_t *)b.buf + b.len};
    while (!rc && r.p < r.end) {
        uint64_t t, v;
        if (varint(&r, &t) || t > 0xffffffffu || (t >> 3) == 0) { rc = -1; break; }
        uint32_t tag = (uint32_t)t, field = tag >> 3, wt = tag & 7;
        const uint8_t *data;
        if ((field == 1 || field == 2) && wt == 1) {
            if (r.end - r.p < 8) { rc = -1; break; }
            v = 0;
            for (int i = 7; i >= 0; i--) v = v << 8 | r.p[i];
            r.p += 8;
            if (field == 1) start_ts = v; else end_ts = v;
        } else if ((field == 4 || field == 5) && wt == 0) {
            if (varint(&r, &v)) { rc = -1; break; }
            if (field == 4) batch_num = (int32_t)(uint32_t)v; else batch_size = (int32_t)(uint32_t)v;
        } else if (field >= 6 && field <= 8 && wt == 2) {
            if (bytes_field(&r, &data, &v)) { rc = -1; break; }
            if (field == 6) {
                Py_BLOCK_THREADS
                PyObject *s = PyBytes_FromStringAndSize((const char *)data, (Py_ssize_t)v);
                int bad = !s || PyList_Append(infos, s);
                Py_XDECREF(s);
                Py_UNBLOCK_THREADS
                if (bad) { rc = -4; break; }
            } else {   /* an invalid key is reported after the whole file parsed, as validate() runs after */
                perr *e = field == 7 ? &kerr : &rerr;
                perr mine = {NULL, 0};
                int k = parse_key(data, v, field == 7 ? &keys : &revised, &mine);
                if (k == -2) { if (!e->msg) *e = mine; }
                else if (k) { rc = k; break; }
            }
        } else if (field == 3 && wt == 2) {
            if (bytes_field(&r, &region, &region_len)) { rc = -1; break; }
        } else if (skip_field(&r, tag, 1)) { rc = -1; break; }
    }
    Py_END_ALLOW_THREADS
    if (rc == -1) PyErr_SetString(PyExc_ValueError, err.msg ? err.msg : "export.bin protobuf is truncated or malformed");
    else if (rc == -2) PyErr_Format(PyExc_ValueError, err.msg, err.arg);
    else if (rc == -3) PyErr_SetString(PyExc_RuntimeError, "export.bin: more keys than counted");
    else if (rc == 0) {
        PyObject *k = keys_tuple(&keys), *rk = k ? keys_tuple(&revised) : NULL;
        PyObject *ke = kerr.msg ? PyUnicode_FromFormat(kerr.msg, kerr.arg) : Py_NewRef(Py_None);
        PyObject *re = rerr.msg ? PyUnicode_FromFormat(rerr.msg, rerr.arg) : Py_NewRef(Py_None);
        if (k && rk && ke && re)
            result = Py_BuildValue("(KKy#iiONNNN)", (unsigned long long)start_ts, (unsigned long long)end_ts,
                                   (const char *)region, (Py_ssize_t)region_len, batch_num, batch_size, infos, k, rk,
                                   ke, re);
        else { Py_XDECREF(k); Py_XDECREF(rk); Py_XDECREF(ke); Py_XDECREF(re); }
    }
out:
    Py_XDECREF(infos);
    keys_free(&keys); keys_free(&revised);
    PyBuffer_Release(&b);
    return result;
}

/* ---- writing --------------------------------------------------------------------------- */

static uint8_t *put_varint(uint8_t *o, uint64_t v) {
    while (v >= 0x80) { *o++ = (uint8_t)(v | 0x80); v >>= 7; }
    *o++ = (uint8_t)v;
    return o;
}

/* encode(field, n, key_data, start u32, period u16, risk i32, report u8, dso i32, has_dso u8, variant u8)
 * -> the keys as repeated ``field`` (7: keys, 8: revised_keys) of a TemporaryExposureKeyExport,
 * byte for byte what the protobuf runtime writes: key_data, transmission_risk_level,
 * rolling_start_interval_number and rolling_period always, report_type unless UNKNOWN,
 * days_since_onset_of_symptoms when present, variant_of_concern unless UNKNOWN, in field order. */
static PyObject *encode(PyObject *mod, PyObject *args) {
    int field;
    Py_ssize_t n;
    Py_buffer kd, st, pe, ri, re, ds, hd, va;
    if (!PyArg_ParseTuple(args, "iny*y*y*y*y*y*y*y*", &field, &n, &kd, &st, &pe, &ri, &re, &ds, &hd, &va)) return NULL;
    PyObject *out = NULL;
    if (n < 0 || field < 1 || field > 15 || kd.len != 16 * n || st.len != 4 * n || pe.len != 2 * n || ri.len != 4 * n ||
        re.len != n || ds.len != 4 * n || hd.len != n || va.len != n) {
        PyErr_SetString(PyExc_ValueError, "inconsistent key arrays");
        goto done;
    }
    /* per key at most: 2+16 key, 1+10 risk, 1+5 start, 1+3 period, 1+2 report, 1+5 dso, 1+2 variant, 2 header bytes */
    out = PyBytes_FromStringAndSize(NULL, n * 64);
    if (!out) goto done;
    uint8_t *o = (uint8_t *)PyBytes_AS_STRING(out);
    const uint8_t *k = kd.buf, *rep = re.buf, *has = hd.buf, *var = va.buf;
    const uint32_t *start = st.buf;
    const uint16_t *period = pe.buf;
    const int32_t *risk = ri.buf, *dso = ds.buf;
    Py_BEGIN_ALLOW_THREADS   /* the buffers stay ours: the other threads may run */
    for (Py_ssize_t i = 0; i < n; i++) {
        uint8_t body[64], *b = body;
        *b++ = 0x0a; *b++ = 16; memcpy(b, k + 16 * i, 16); b += 16;
        *b++ = 0x10; b = put_varint(b, (uint64_t)(int64_t)risk[i]);          /* int32: negative as 10 bytes */
        *b++ = 0x18; b = put_varint(b, (uint64_t)(int64_t)(int32_t)start[i]);
        *b++ = 0x20; b = put_varint(b, period[i]);
        if (rep[i]) { *b++ = 0x28; b = put_varint(b, rep[i]); }
        if (has[i]) { uint32_t z = ((uint32_t)dso[i] << 1) ^ (uint32_t)(dso[i] >> 31); *b++ = 0x30; b = put_varint(b, z); }
        if (var[i]) { *b++ = 0x40; b = put_varint(b, var[i]); }
        *o++ = (uint8_t)(field << 3 | 2);
        o = put_varint(o, (uint64_t)(b - body));
        memcpy(o, body, (size_t)(b - body));
        o += b - body;
    }
    Py_END_ALLOW_THREADS
    if (_PyBytes_Resize(&out, (Py_ssize_t)(o - (uint8_t *)PyBytes_AS_STRING(out)))) out = NULL;
done:
    PyBuffer_Release(&kd); PyBuffer_Release(&st); PyBuffer_Release(&pe); PyBuffer_Release(&ri);
    PyBuffer_Release(&re); PyBuffer_Release(&ds); PyBuffer_Release(&hd); PyBuffer_Release(&va);
    return out;
}

static PyMethodDef methods[] = {
    {"encode", encode, METH_VARARGS, "encode(field, n, key arrays...) -> the keys' protobuf wire format"},
    {"parse", parse, METH_O, "parse(protobuf bytes of a TemporaryExposureKeyExport) -> header fields and key arrays"},
    {NULL, NULL, 0, NULL}
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastexport", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__fastexport(void) { return PyModule_Create(&module); }
