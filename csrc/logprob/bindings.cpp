// Python module gil_megatron._C. Importing it loads this library, whose static initialisers register
// the gil_megatron::* operators (schemas + CPU kernels in logprob_cpu.cpp, CUDA kernels in
// logprob_cuda.cu when built). The ops are called through torch.ops.gil_megatron.*; the module itself
// only says how it was built.
#include <Python.h>

#ifndef GIL_WITH_CUDA
#define GIL_WITH_CUDA 0
#endif

static PyModuleDef gil_megatron_c_module = {
    PyModuleDef_HEAD_INIT,
    "gil_megatron._C",
    "Compiled kernels of gil_megatron (operators live in torch.ops.gil_megatron).",
    -1,
    nullptr,
};

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&gil_megatron_c_module);
  if (m == nullptr) return nullptr;
  if (PyModule_AddIntConstant(m, "cuda_compiled", GIL_WITH_CUDA) != 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
