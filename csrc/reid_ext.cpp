// The reid_ext operator library (schemas in schemas.h), and the stub that makes reid_ext._C importable.
//
// Backends register their kernels with TORCH_LIBRARY_IMPL in csrc/cpu and
// csrc/cuda; autograd and fake (meta) kernels are registered from Python
// (reid_ext/ops.py) through torch.library.
#include <Python.h>
#include <torch/library.h>

#include "schemas.h"

#ifdef REID_EXT_WITH_CUDA
#define REID_EXT_CUDA_BUILT 1
#else
#define REID_EXT_CUDA_BUILT 0
#endif

extern "C" {
// Importing reid_ext._C runs the static registrations below; the module only
// says how it was built: TORCH_VERSION (the torch it was compiled against) and WITH_CUDA.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* m = PyModule_Create(&module);
  if (m == nullptr) return nullptr;
  if (PyModule_AddStringConstant(m, "TORCH_VERSION", REID_EXT_TORCH_VERSION) < 0 ||
      PyModule_AddIntConstant(m, "WITH_CUDA", REID_EXT_CUDA_BUILT) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
}

TORCH_LIBRARY(reid_ext, m) {
  reid_ext::define_schemas(m);
  reid_ext::define_check_schemas(m);
}
