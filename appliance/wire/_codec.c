/* The hot half of decode_frame (appliance/wire/frames.py) in C: every check of a frame's
 * header, shape, trace, padding and sizes, in one call that touches a few cache lines.
 *
 * decode(buf, max_bytes) returns the fields of a frame that passes every check, or None for
 * anything else: a bad frame, an ERROR frame (its message is decoded in Python), a trace name
 * that is not plain ASCII, a buffer that is not contiguous. On None, frames.py runs the Python
 * decoder, which gives the exact error. So this accepts a subset of what the Python decoder
 * accepts and never decides an error message; tests/appliance/test_frames.py checks that the
 * two agree on valid, corrupted and random frames.
 *
 * Optional: when it was not built (no C compiler), frames.py decodes in Python alone.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define HEADER_BYTES 64
#define FORMAT_VERSION 2
#define KIND_ERROR 3
#define KNOWN_FLAGS 0x0001
#define FLAG_TAGGED 0x0001
#define MAX_NDIM 8
#define MAX_TRACE 64
#define MAX_NODE_NAME_BYTES 64
#define MAX_EXT_BYTES 4096
#define TAG_BYTES 32
#define PAYLOAD_ALIGN 8
#define TRACE_TAIL 8 /* start u16, end u16, ms f32 */

static uint16_t u16(const unsigned char *p) { return (uint16_t)(p[0] | (p[1] << 8)); }

static uint32_t u32(const unsigned char *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) |
           ((uint32_t)p[3] << 24);
}

static uint64_t u64(const unsigned char *p) {
    return (uint64_t)u32(p) | ((uint64_t)u32(p + 4) << 32);
}

static int itemsize(unsigned int dtype_code) {
    switch (dtype_code) {
    case 1: return 4; /* float32 */
    case 2: return 2; /* float16 */
    case 3: return 1; /* uint8 */
    case 4: return 8; /* int64 */
    default: return 0;
    }
}

/* The trace section's entry count, or -1 when the Python decoder must look at it. */
static int check_trace(const unsigned char *wire, size_t size) {
    size_t pos = 0;
    int count = 0;
    while (pos < size) {
        size_t name_len = wire[pos];
        size_t tail = pos + 1 + name_len;
        if (count == MAX_TRACE || name_len == 0 || name_len > MAX_NODE_NAME_BYTES ||
            tail + TRACE_TAIL > size)
            return -1;
        for (size_t i = pos + 1; i < tail; i++)
            if (wire[i] & 0x80) return -1; /* not ASCII: utf-8 is checked in Python */
        if (u16(wire + tail) > u16(wire + tail + 2)) return -1; /* start > end */
        pos = tail + TRACE_TAIL;
        count++;
    }
    return count;
}

static PyObject *decode_fields(const unsigned char *p, size_t size, unsigned long long max_bytes) {
    if (size > max_bytes || size < HEADER_BYTES) Py_RETURN_NONE;
    unsigned int kind = p[5], dtype = p[20], ndim = p[21];
    unsigned int flags = u16(p + 6), trace_len = u16(p + 22), error_len = u16(p + 24),
                 ext_len = u16(p + 26);
    int isize = itemsize(dtype);
    if (memcmp(p, "ARMD", 4) != 0 || p[4] != FORMAT_VERSION || kind < 1 || kind > 4 ||
        isize == 0 || (flags & ~KNOWN_FLAGS) || ndim > MAX_NDIM || u32(p + 28) != 0 ||
        error_len != 0 || kind == KIND_ERROR || ext_len > MAX_EXT_BYTES)
        Py_RETURN_NONE;
    size_t trace_at = HEADER_BYTES + 4 * (size_t)ndim;
    size_t ext_at = trace_at + trace_len;
    size_t variable_end = ext_at + ext_len;
    size_t length_at = variable_end + ((PAYLOAD_ALIGN - (variable_end + 8) % PAYLOAD_ALIGN) %
                                       PAYLOAD_ALIGN);
    size_t payload_at = length_at + 8;
    if (payload_at > size) Py_RETURN_NONE;
    for (size_t i = variable_end; i < length_at; i++)
        if (p[i]) Py_RETURN_NONE;
    int count = trace_len ? check_trace(p + trace_at, trace_len) : 0;
    if (count < 0) Py_RETURN_NONE;
    uint64_t payload_len = u64(p + length_at);
    size_t tag = (flags & FLAG_TAGGED) ? TAG_BYTES : 0;
    if (payload_len > size || payload_at + payload_len + tag != size) Py_RETURN_NONE;
    uint64_t items = 1;
    PyObject *shape = PyTuple_New(ndim);
    if (shape == NULL) return NULL;
    for (unsigned int i = 0; i < ndim; i++) {
        uint32_t dim = u32(p + HEADER_BYTES + 4 * i);
        if (items && dim && items > UINT64_MAX / dim) { /* cannot match any payload */
            Py_DECREF(shape);
            Py_RETURN_NONE;
        }
        items *= dim;
        PyObject *d = PyLong_FromUnsignedLong(dim);
        if (d == NULL) {
            Py_DECREF(shape);
            return NULL;
        }
        PyTuple_SET_ITEM(shape, i, d);
    }
    if (items > UINT64_MAX / (uint64_t)isize || payload_len != items * (uint64_t)isize) {
        Py_DECREF(shape);
        Py_RETURN_NONE;
    }
    /* kind, request id, attempt, fingerprint, start block, dtype code, shape, trace bytes,
       trace entries, extension bytes, payload offset, tagged */
    return Py_BuildValue("(IKIy#IINy#iy#nO)", kind, (unsigned long long)u64(p + 8), u16(p + 16),
                         (const char *)(p + 32), (Py_ssize_t)32, u16(p + 18), dtype, shape,
                         (const char *)(p + trace_at), (Py_ssize_t)trace_len, count,
                         (const char *)(p + ext_at), (Py_ssize_t)ext_len,
                         (Py_ssize_t)payload_at, tag ? Py_True : Py_False);
}

static PyObject *decode(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "decode(buf, max_bytes) takes 2 arguments");
        return NULL;
    }
    unsigned long long max_bytes = PyLong_AsUnsignedLongLong(args[1]);
    if (max_bytes == (unsigned long long)-1 && PyErr_Occurred()) return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) != 0) {
        PyErr_Clear(); /* not a contiguous buffer: the Python decoder says what it is */
        Py_RETURN_NONE;
    }
    PyObject *out = decode_fields((const unsigned char *)view.buf, (size_t)view.len, max_bytes);
    PyBuffer_Release(&view);
    return out;
}

static PyMethodDef methods[] = {
    {"decode", (PyCFunction)(void (*)(void))decode, METH_FASTCALL,
     "decode(buf, max_bytes): a good frame's fields, or None (see the module's source)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_codec", "The C half of decode_frame (appliance.wire.frames).", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__codec(void) { return PyModule_Create(&module); }
