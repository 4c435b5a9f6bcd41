/* The hot path of a hop in C: the checks of a received frame (decode), the NNG calls that
 * receive and send one (recv, send), and a receiver that hands each message to a callback on
 * NNG's own thread (Receiver).
 *
 * decode: the hot half of decode_frame (appliance/wire/frames.py): every check of a frame's
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

/* ---------------------------------------------------------------- NNG: recv and send
 * pynng links NNG into its own extension; transport.py hands us the addresses of the few NNG
 * functions we call (bind), taken from pynng's cffi module, whose declarations give their
 * types: the ones below. A socket is NNG's struct of one uint32 id. */
typedef struct nng_msg nng_msg;
typedef struct { uint32_t id; } nng_socket;
static int (*nng_recvmsg_)(nng_socket, nng_msg **, int);
static int (*nng_sendmsg_)(nng_socket, nng_msg *, int);
static int (*nng_msg_alloc_)(nng_msg **, size_t);
static void (*nng_msg_free_)(nng_msg *);
static void *(*nng_msg_body_)(nng_msg *);
static size_t (*nng_msg_len_)(nng_msg *);

static PyObject *bind(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long recvmsg, sendmsg, alloc, free_, body, len;
    if (!PyArg_ParseTuple(args, "KKKKKK", &recvmsg, &sendmsg, &alloc, &free_, &body, &len))
        return NULL;
    if (!recvmsg || !sendmsg || !alloc || !free_ || !body || !len) {
        PyErr_SetString(PyExc_ValueError, "bind: a NULL function address");
        return NULL;
    }
    nng_recvmsg_ = (int (*)(nng_socket, nng_msg **, int))(uintptr_t)recvmsg;
    nng_sendmsg_ = (int (*)(nng_socket, nng_msg *, int))(uintptr_t)sendmsg;
    nng_msg_alloc_ = (int (*)(nng_msg **, size_t))(uintptr_t)alloc;
    nng_msg_free_ = (void (*)(nng_msg *))(uintptr_t)free_;
    nng_msg_body_ = (void *(*)(nng_msg *))(uintptr_t)body;
    nng_msg_len_ = (size_t (*)(nng_msg *))(uintptr_t)len;
    Py_RETURN_NONE;
}

/* A received NNG message, read and written in place through the buffer protocol (a
 * memoryview of it, numpy arrays over that); freed with the last reference. */
typedef struct {
    PyObject_HEAD
    nng_msg *msg;
    char *body;
    Py_ssize_t len;
} Message;

static char empty_body[1];

static void Message_dealloc(Message *m) {
    if (m->msg != NULL) nng_msg_free_(m->msg);
    Py_TYPE(m)->tp_free((PyObject *)m);
}

static int Message_getbuffer(Message *m, Py_buffer *view, int flags) {
    return PyBuffer_FillInfo(view, (PyObject *)m, m->body, m->len, 0, flags);
}

static PyBufferProcs Message_as_buffer = {(getbufferproc)Message_getbuffer, NULL};

static PyTypeObject MessageType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "appliance.wire._codec.Message",
    .tp_basicsize = sizeof(Message),
    .tp_dealloc = (destructor)Message_dealloc,
    .tp_as_buffer = &Message_as_buffer,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A received NNG message (its body through the buffer protocol).",
};

/* A Message that owns msg (freed with it); NULL, and msg freed, when out of memory. */
static PyObject *new_message(nng_msg *msg) {
    Message *m = PyObject_New(Message, &MessageType);
    if (m == NULL) {
        nng_msg_free_(msg);
        return NULL;
    }
    m->msg = msg;
    m->len = (Py_ssize_t)nng_msg_len_(msg);
    m->body = m->len ? (char *)nng_msg_body_(msg) : empty_body;
    return (PyObject *)m;
}

/* recv(socket_id): the next message as a Message, or NNG's error number (an int). Blocks, up
 * to the socket's receive timeout, without the GIL. */
static PyObject *recv(PyObject *self, PyObject *arg) {
    (void)self;
    if (nng_recvmsg_ == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "recv before bind");
        return NULL;
    }
    unsigned long id = PyLong_AsUnsignedLong(arg);
    if (id == (unsigned long)-1 && PyErr_Occurred()) return NULL;
    nng_socket sock = {(uint32_t)id};
    nng_msg *msg = NULL;
    int rv;
    Py_BEGIN_ALLOW_THREADS
    rv = nng_recvmsg_(sock, &msg, 0);
    Py_END_ALLOW_THREADS
    if (rv != 0) return PyLong_FromLong(rv);
    return new_message(msg);
}

/* send(socket_id, head, payload, tag): one message of the three buffers (payload may be
 * None), copied in once; 0, or NNG's error number. Blocks, up to the socket's send timeout,
 * without the GIL. */
static PyObject *send(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "send(socket_id, head, payload, tag)");
        return NULL;
    }
    if (nng_sendmsg_ == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "send before bind");
        return NULL;
    }
    unsigned long id = PyLong_AsUnsignedLong(args[0]);
    if (id == (unsigned long)-1 && PyErr_Occurred()) return NULL;
    Py_buffer parts[3];
    size_t size = 0;
    for (int i = 0; i < 3; i++) {
        if (args[i + 1] == Py_None) {
            parts[i].buf = NULL;
            parts[i].len = 0;
            parts[i].obj = NULL;
            continue;
        }
        if (PyObject_GetBuffer(args[i + 1], &parts[i], PyBUF_C_CONTIGUOUS) != 0) {
            for (int j = 0; j < i; j++)
                if (parts[j].obj != NULL) PyBuffer_Release(&parts[j]);
            return NULL;
        }
        size += (size_t)parts[i].len;
    }
    nng_msg *msg = NULL;
    int rv = nng_msg_alloc_(&msg, size);
    if (rv == 0) {
        char *body = (char *)nng_msg_body_(msg);
        for (int i = 0; i < 3; i++) {
            if (parts[i].len) memcpy(body, parts[i].buf, (size_t)parts[i].len);
            body += parts[i].len;
        }
    }
    for (int i = 0; i < 3; i++)
        if (parts[i].obj != NULL) PyBuffer_Release(&parts[i]);
    if (rv != 0) return PyLong_FromLong(rv);
    Py_BEGIN_ALLOW_THREADS
    rv = nng_sendmsg_((nng_socket){(uint32_t)id}, msg, 0);
    if (rv != 0) nng_msg_free_(msg); /* not sent: still ours */
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(rv);
}

/* ---------------------------------------------------------------- NNG: a receiver
 * Receiver(socket_id, callback) receives every message of a socket and calls callback with it
 * (a Message) on NNG's own thread, the one that completed the receive: a message is handled
 * without waking a Python thread that waits in recv, one thread hand-off less per message.
 * The callback runs with the GIL (taken with PyGILState_Ensure); an exception it raises is
 * printed as unraisable and the next message is received all the same. Another error than a
 * closed socket or a stop is passed to it as NNG's error number (an int).
 *
 * stop() stops it and waits (without the GIL) until a callback that runs has returned; after
 * it, callback is never called again. A running Receiver holds a reference to itself, so it
 * lives until stopped; stop() must be called before the interpreter finalizes (transport.py
 * stops every running one at exit), and never from the callback itself (that waits forever). */
typedef struct nng_aio nng_aio;
static int (*nng_aio_alloc_)(nng_aio **, void (*)(void *), void *);
static void (*nng_aio_free_)(nng_aio *);
static void (*nng_aio_stop_)(nng_aio *);
static int (*nng_aio_result_)(nng_aio *);
static nng_msg *(*nng_aio_get_msg_)(nng_aio *);
static void (*nng_recv_aio_)(nng_socket, nng_aio *);
static void (*nng_aio_set_timeout_)(nng_aio *, int32_t);

#define NNG_ECLOSED_ 7
#define NNG_ECANCELED_ 20
#define NNG_DURATION_INFINITE_ (-1)

static PyObject *bind_aio(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long a[7];
    if (!PyArg_ParseTuple(args, "KKKKKKK", &a[0], &a[1], &a[2], &a[3], &a[4], &a[5], &a[6]))
        return NULL;
    for (int i = 0; i < 7; i++) {
        if (!a[i]) {
            PyErr_SetString(PyExc_ValueError, "bind_aio: a NULL function address");
            return NULL;
        }
    }
    nng_aio_alloc_ = (int (*)(nng_aio **, void (*)(void *), void *))(uintptr_t)a[0];
    nng_aio_free_ = (void (*)(nng_aio *))(uintptr_t)a[1];
    nng_aio_stop_ = (void (*)(nng_aio *))(uintptr_t)a[2];
    nng_aio_result_ = (int (*)(nng_aio *))(uintptr_t)a[3];
    nng_aio_get_msg_ = (nng_msg * (*)(nng_aio *))(uintptr_t) a[4];
    nng_recv_aio_ = (void (*)(nng_socket, nng_aio *))(uintptr_t)a[5];
    nng_aio_set_timeout_ = (void (*)(nng_aio *, int32_t))(uintptr_t)a[6];
    Py_RETURN_NONE;
}

typedef struct {
    PyObject_HEAD
    nng_aio *aio;
    nng_socket sock;
    PyObject *callback;
    int stopped; /* set once, by the first stop(): atomically */
} Receiver;

static void receiver_done(void *arg) {
    Receiver *r = (Receiver *)arg;
    int rv = nng_aio_result_(r->aio);
    nng_msg *msg = rv == 0 ? nng_aio_get_msg_(r->aio) : NULL;
    if (__atomic_load_n(&r->stopped, __ATOMIC_ACQUIRE) || rv == NNG_ECLOSED_ ||
        rv == NNG_ECANCELED_) {
        if (msg != NULL) nng_msg_free_(msg);
        return; /* stopped, or the socket closed: no further receive */
    }
    PyGILState_STATE gil = PyGILState_Ensure();
    PyObject *got = msg != NULL ? new_message(msg) : PyLong_FromLong(rv);
    PyObject *out = got != NULL ? PyObject_CallOneArg(r->callback, got) : NULL;
    if (out == NULL) PyErr_WriteUnraisable(r->callback);
    Py_XDECREF(out);
    Py_XDECREF(got);
    PyGILState_Release(gil);
    nng_recv_aio_(r->sock, r->aio); /* after a stop, NNG does nothing with it */
}

static PyObject *Receiver_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    unsigned long id;
    PyObject *callback;
    static char *names[] = {"socket_id", "callback", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "kO:Receiver", names, &id, &callback))
        return NULL;
    if (nng_recv_aio_ == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Receiver before bind_aio");
        return NULL;
    }
    if (!PyCallable_Check(callback)) {
        PyErr_SetString(PyExc_TypeError, "Receiver: callback is not callable");
        return NULL;
    }
    Receiver *r = (Receiver *)type->tp_alloc(type, 0);
    if (r == NULL) return NULL;
    r->sock = (nng_socket){(uint32_t)id};
    Py_INCREF(callback);
    r->callback = callback;
    int rv = nng_aio_alloc_(&r->aio, receiver_done, r);
    if (rv != 0) {
        r->aio = NULL;
        Py_DECREF(r);
        return PyErr_Format(PyExc_OSError, "nng_aio_alloc failed (NNG error %d)", rv);
    }
    nng_aio_set_timeout_(r->aio, NNG_DURATION_INFINITE_);
    Py_INCREF(r); /* running: held until stop() */
    nng_recv_aio_(r->sock, r->aio);
    return (PyObject *)r;
}

static PyObject *Receiver_stop(Receiver *r, PyObject *unused) {
    (void)unused;
    int first = __atomic_exchange_n(&r->stopped, 1, __ATOMIC_ACQ_REL) == 0;
    if (r->aio != NULL) {
        nng_aio *aio = r->aio;
        Py_BEGIN_ALLOW_THREADS
        nng_aio_stop_(aio); /* waits for a running callback, which may want the GIL */
        Py_END_ALLOW_THREADS
    }
    if (first) Py_DECREF(r); /* the caller still holds a reference */
    Py_RETURN_NONE;
}

static void Receiver_dealloc(Receiver *r) {
    /* only once stopped (a running Receiver holds itself), or never started */
    if (r->aio != NULL) {
        nng_aio_stop_(r->aio);
        nng_aio_free_(r->aio);
    }
    Py_XDECREF(r->callback);
    Py_TYPE(r)->tp_free((PyObject *)r);
}

static PyMethodDef Receiver_methods[] = {
    {"stop", (PyCFunction)Receiver_stop, METH_NOARGS,
     "Stop receiving; returns once no callback runs, and none will."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ReceiverType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "appliance.wire._codec.Receiver",
    .tp_basicsize = sizeof(Receiver),
    .tp_dealloc = (destructor)Receiver_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = Receiver_new,
    .tp_methods = Receiver_methods,
    .tp_doc = "Receiver(socket_id, callback): every message of a socket to callback, on "
              "NNG's own thread (see _codec.c).",
};

static PyMethodDef methods[] = {
    {"decode", (PyCFunction)(void (*)(void))decode, METH_FASTCALL,
     "decode(buf, max_bytes): a good frame's fields, or None (see the module's source)."},
    {"bind", bind, METH_VARARGS,
     "bind(recvmsg, sendmsg, msg_alloc, msg_free, msg_body, msg_len): NNG's functions."},
    {"bind_aio", bind_aio, METH_VARARGS,
     "bind_aio(aio_alloc, aio_free, aio_stop, aio_result, aio_get_msg, recv_aio, "
     "aio_set_timeout): NNG's functions for Receiver."},
    {"recv", recv, METH_O, "recv(socket_id): a Message, or NNG's error number."},
    {"send", (PyCFunction)(void (*)(void))send, METH_FASTCALL,
     "send(socket_id, head, payload, tag): 0, or NNG's error number."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_codec", "The hot path of a hop: decode_frame's checks, NNG recv, send and Receiver.", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__codec(void) {
    if (PyType_Ready(&MessageType) < 0 || PyType_Ready(&ReceiverType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    Py_INCREF(&MessageType);
    if (PyModule_AddObject(m, "Message", (PyObject *)&MessageType) < 0) {
        Py_DECREF(&MessageType);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&ReceiverType);
    if (PyModule_AddObject(m, "Receiver", (PyObject *)&ReceiverType) < 0) {
        Py_DECREF(&ReceiverType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
