// Every reid_ext operator schema, and the stub that makes reid_ext._C importable.
//
// Backends register their kernels with TORCH_LIBRARY_IMPL in csrc/cpu and
// csrc/cuda; autograd and fake (meta) kernels are registered from Python
// (reid_ext/ops.py) through torch.library.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing reid_ext._C runs the static registrations below; the module itself is empty.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
}

TORCH_LIBRARY(reid_ext, m) {
  m.def("cosine_similarity(Tensor x, Tensor? y, float eps) -> Tensor");
  m.def("_cosine_similarity_backward(Tensor grad, Tensor sim, Tensor x, Tensor? y, float eps) -> (Tensor, Tensor)");
  // Per-anchor loss, validity and the two log-sum-exps that the backward reuses.
  m.def(
      "unified_triplet_loss(Tensor x, Tensor labels, Tensor? modalities, Tensor? ref, Tensor? ref_labels, "
      "Tensor? ref_modalities, float gamma, float margin, int mode) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "_unified_triplet_loss_backward(Tensor grad_loss, Tensor x, Tensor labels, Tensor? modalities, Tensor? ref, "
      "Tensor? ref_labels, Tensor? ref_modalities, Tensor valid, Tensor lse_neg, Tensor lse_pos, float gamma, "
      "float margin, int mode, bool ref_requires_grad) -> (Tensor, Tensor)");
}
