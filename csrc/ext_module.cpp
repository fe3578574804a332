// The importable module `stg_ext._C`. It carries no Python functions: importing it runs the
// TORCH_LIBRARY static registrations, and the ops are reached as torch.ops.stg_ext.*.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
