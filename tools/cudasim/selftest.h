// Kernels that check the emulator's CUDA semantics (tests/test_cudasim.py).
#pragma once

#include <pybind11/pybind11.h>

namespace cudasim_selftest {

void define(pybind11::module_& module);

}  // namespace cudasim_selftest
