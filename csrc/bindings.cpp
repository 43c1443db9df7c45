// pybind11 entry point of prefprune._C.
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "prefprune native ops";
  m.def("build_info", []() { return std::string("prefprune._C cpu"); },
        "Describe how this extension was built.");
}
