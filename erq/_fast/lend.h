/* A bytes object made once and lent again and again: its length set to what the next use
 * fills, as _PyBytes_Resize sets it when it shrinks in place, within the size it was made with.
 *
 * Only for an object nothing else holds (its reference count is the lender's one), so nothing
 * can have kept its old bytes or their hash: the hash cache is reset all the same, and the
 * terminating NUL every bytes carries is written at the new end. The epoll layer lends its
 * read chunk this way, the wire its VALUE block.
 */
#ifndef ERQ_LEND_H
#define ERQ_LEND_H

#include <Python.h>

static inline void erq_lend_bytes(PyObject *bytes, Py_ssize_t size) {
    Py_SET_SIZE(bytes, size);
    PyBytes_AS_STRING(bytes)[size] = '\0';
    _Py_COMP_DIAG_PUSH
    _Py_COMP_DIAG_IGNORE_DEPR_DECLS
    ((PyBytesObject *)bytes)->ob_shash = -1;
    _Py_COMP_DIAG_POP
}

#endif
