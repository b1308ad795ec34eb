// Every reid_ext operator schema, and the stub that makes reid_ext._C importable.
//
// Backends register their kernels with TORCH_LIBRARY_IMPL in csrc/cpu and
// csrc/cuda; autograd and fake (meta) kernels are registered from Python
// (reid_ext/ops.py) through torch.library.
#include <Python.h>
#include <torch/library.h>

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
  m.def("cosine_similarity(Tensor x, Tensor? y, float eps) -> Tensor");
  // Needs no S: the radial term of the normalization Jacobian is xn_i . (sum_j dS_ij yn_j).
  m.def("_cosine_similarity_backward(Tensor grad, Tensor x, Tensor? y, float eps) -> (Tensor, Tensor)");
  // Per-anchor loss, validity and the two log-sum-exps that the backward reuses.
  m.def(
      "unified_triplet_loss(Tensor x, Tensor labels, Tensor? modalities, Tensor? ref, Tensor? ref_labels, "
      "Tensor? ref_modalities, float gamma, float margin, int mode) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "_unified_triplet_loss_backward(Tensor grad_loss, Tensor x, Tensor labels, Tensor? modalities, Tensor? ref, "
      "Tensor? ref_labels, Tensor? ref_modalities, Tensor valid, Tensor lse_neg, Tensor lse_pos, float gamma, "
      "float margin, int mode, bool ref_requires_grad) -> (Tensor, Tensor)");
  // Reduced loss (mean over valid anchors, or sum) with its gradients to x and ref, for a
  // backward that only scales them: the CPU kernel's fast path for small problems.
  m.def(
      "_unified_triplet_loss_with_grad(Tensor x, Tensor labels, Tensor? modalities, Tensor? ref, "
      "Tensor? ref_labels, Tensor? ref_modalities, float gamma, float margin, int mode, bool mean, "
      "bool ref_requires_grad) -> (Tensor, Tensor, Tensor)");
  // Per-anchor loss, validity, hardest positive / negative index (-1: none) and their distances.
  m.def(
      "batch_hard_triplet_loss(Tensor x, Tensor labels, float margin, int metric, bool soft_margin) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "_batch_hard_triplet_loss_backward(Tensor grad_loss, Tensor x, Tensor pos_idx, Tensor neg_idx, "
      "Tensor dist_ap, Tensor dist_an, float margin, int metric, bool soft_margin) -> Tensor");
  // Mean of the (normalized) rows of each group 0 <= group[i] < num_groups, and the group sizes.
  m.def("modality_centers(Tensor x, Tensor group, SymInt num_groups, bool normalize) -> (Tensor, Tensor)");
  m.def(
      "_modality_centers_backward(Tensor grad_centers, Tensor x, Tensor group, Tensor counts, bool normalize) "
      "-> Tensor");
  // Per-anchor loss and the log-sum-exp of its logits, which the backward reuses.
  m.def(
      "cosine_softmax_loss(Tensor x, Tensor weight, Tensor labels, float scale, float margin, "
      "float label_smoothing) -> (Tensor, Tensor)");
  m.def(
      "_cosine_softmax_loss_backward(Tensor grad_loss, Tensor x, Tensor weight, Tensor labels, Tensor lse, "
      "float scale, float margin, float label_smoothing, bool x_requires_grad, bool weight_requires_grad) "
      "-> (Tensor, Tensor)");
  // Reduced loss (mean over the N anchors, or sum) with its gradients to x and weight: the CPU
  // kernel's fast path for problems of one tile.
  m.def(
      "_cosine_softmax_loss_with_grad(Tensor x, Tensor weight, Tensor labels, float scale, float margin, "
      "float label_smoothing, bool mean, bool x_requires_grad, bool weight_requires_grad) "
      "-> (Tensor, Tensor, Tensor)");
  // For each row of x, the k most (largest) or least similar rows of y (y = None: of x, itself included), sorted,
  // ties to the lower index, and the row's similarity extreme at the other end. Not differentiable.
  m.def("topk_similarity(Tensor x, Tensor? y, int k, bool largest, float eps) -> (Tensor, Tensor, Tensor)");
}
