// The Python module of lidr's CPU kernels (lidr/kernels.py builds and loads it).
#include "kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &lidr::rms_norm, "Gemma 3 RMS norm of rows (bf16)");
  m.def("add_norm", &lidr::add_norm, "h + norm(x), and optionally norm2 of the sum (bf16)");
  m.def("norm_rope", &lidr::norm_rope, "per-head norm and rotary embedding (bf16)");
  m.def("act_mul", &lidr::act_mul, "act(gate) * up through a table of the activation (bf16)");
  m.def("row_sum", &lidr::row_sum, "row sums in ATen's order for a vector width (float32)");
  m.def("int8_bounds", &lidr::int8_bounds, "the int8 screen's bounds and chunk maxima on a vocabulary block");
  m.def("int8_prepare", &lidr::int8_prepare, "rows quantized for the int8 screen, with its fp32 side and slack");
}
