// The emulated-GPU build of csrc/cuda as a Python module: the reid_ext schemas in
// their own namespace, reid_ext_cudasim, whose CPU kernels are csrc/cuda's glue and
// kernels compiled against tools/cudasim/include (see tools/cudasim.py), and the
// emulator's controls.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/library.h>

#include "cudasim/runtime.h"
#include "schemas.h"
#include "selftest.h"

TORCH_LIBRARY(reid_ext_cudasim, m) { reid_ext::define_schemas(m); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "reid-ext's CUDA kernels on an emulated GPU (CPU threads)";
  module.def("multiprocessor_count", &cudasim::multiprocessor_count,
             "The multiprocessor count the launchers see (cudaDevAttrMultiProcessorCount).");
  module.def("set_multiprocessor_count", &cudasim::set_multiprocessor_count, pybind11::arg("count"));
  module.def("launch_counts", &cudasim::launch_counts, "Launches per kernel name since the last reset.");
  module.def("reset_launch_counts", &cudasim::reset_launch_counts);
  pybind11::module_ selftest = module.def_submodule("selftest", "Kernels that check the emulator's own semantics.");
  cudasim_selftest::define(selftest);
}
