// An empty Python module: importing lambdapo_ext._C loads this library so that the
// TORCH_LIBRARY registrations run. No functions are bound through Python.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr,
  };
  return PyModule_Create(&module_def);
}
}
