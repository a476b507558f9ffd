// pybind11 bindings: the only file that knows Python. softprompt.ops validates user input with
// friendly messages first; the checks here are a second line so that a direct call to _core can
// raise but never read or write out of bounds. Arrays must already be C-contiguous with the right
// dtype (noconvert: nothing is silently cast or copied here). Kernels run without the GIL.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <optional>
#include <string>
#include <vector>

#include "layers.h"
#include "linear.h"
#include "prefix_attention.h"
#include "prepend.h"
#include "threads.h"

namespace py = pybind11;
using namespace softprompt;

namespace {

template <typename T>
using Array = py::array_t<T, py::array::c_style>;
using Mask = std::optional<py::array_t<bool, py::array::c_style>>;

std::string shape_str(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  return s + (a.ndim() == 1 ? ",)" : ")");
}

// Raises ValueError unless `a` has exactly the shape `want`.
void expect_shape(const py::array& a, const char* name, const std::vector<py::ssize_t>& want) {
  bool ok = a.ndim() == py::ssize_t(want.size());
  for (size_t i = 0; ok && i < want.size(); ++i) ok = a.shape(i) == want[i];
  if (!ok) {
    std::string w = "(";
    for (size_t i = 0; i < want.size(); ++i) w += (i ? ", " : "") + std::to_string(want[i]);
    throw py::value_error(std::string(name) + ": expected shape " + w +
                          (want.size() == 1 ? ",)" : ")") + ", got " + shape_str(a));
  }
}

void expect_ndim(const py::array& a, const char* name, py::ssize_t ndim) {
  if (a.ndim() != ndim)
    throw py::value_error(std::string(name) + ": expected " + std::to_string(ndim) +
                          " dimensions, got shape " + shape_str(a));
}

// Reads and checks the attention sizes from q [B,T,H,D], k [B,S,Hkv,D], prefix [(B,)P,Hkv,D].
template <typename T>
AttentionShape attention_shape(const Array<T>& q, const Array<T>& k, const Array<T>& v,
                               const Array<T>& pk, const Array<T>& pv, const Mask& mask,
                               bool causal, double scale, int64_t window, double softcap) {
  expect_ndim(q, "q", 4);
  expect_ndim(k, "k", 4);
  AttentionShape s{};
  s.B = q.shape(0), s.T = q.shape(1), s.H = q.shape(2), s.D = q.shape(3);
  s.S = k.shape(1), s.Hkv = k.shape(2);
  if (s.B < 1 || s.T < 1 || s.H < 1 || s.D < 1 || s.S < 1 || s.Hkv < 1)
    throw py::value_error("q, k: every dimension must be at least 1, got q " + shape_str(q) +
                          " and k " + shape_str(k));
  if (s.H % s.Hkv)
    throw py::value_error("k: kv heads (" + std::to_string(s.Hkv) +
                          ") must divide the query heads (" + std::to_string(s.H) + ")");
  expect_shape(k, "k", {s.B, s.S, s.Hkv, s.D});
  expect_shape(v, "v", {s.B, s.S, s.Hkv, s.D});
  if (window < 0) throw py::value_error("window: expected 0 (none) or a positive key count, got " +
                                        std::to_string(window));
  s.window = window;
  if (!(softcap >= 0) || std::isinf(softcap))
    throw py::value_error("softcap: expected 0 (none) or a positive finite number, got " +
                          std::to_string(softcap));
  s.softcap = softcap;
  s.prefix_per_row = pk.ndim() == 4;
  if (pk.ndim() != 3 && pk.ndim() != 4)
    throw py::value_error("prefix_k: expected 3 or 4 dimensions, got shape " + shape_str(pk));
  s.P = pk.shape(pk.ndim() - 3);
  if (s.prefix_per_row) {
    expect_shape(pk, "prefix_k", {s.B, s.P, s.Hkv, s.D});
    expect_shape(pv, "prefix_v", {s.B, s.P, s.Hkv, s.D});
  } else {
    expect_shape(pk, "prefix_k", {s.P, s.Hkv, s.D});
    expect_shape(pv, "prefix_v", {s.P, s.Hkv, s.D});
  }
  if (mask) expect_shape(*mask, "key_padding_mask", {s.B, s.S});
  s.causal = causal;
  s.scale = scale;
  return s;
}

const uint8_t* mask_ptr(const Mask& mask) {
  return mask ? reinterpret_cast<const uint8_t*>(mask->data()) : nullptr;
}

// A frozen weight from Python: float32 [rows, cols], or the raw blocks of a quantized format as
// uint8 [rows, cols / 32 * block bytes]; C-contiguous either way.
Weight weight_arg(const py::array& data, int format, py::ssize_t cols) {
  if (format < 0 || format >= kNumFormats)
    throw py::value_error("format: expected a code in [0, " + std::to_string(kNumFormats) + "), got " + std::to_string(format));
  const auto f = WeightFormat(format);
  const bool f32 = f == WeightFormat::f32;
  if (!(data.flags() & py::array::c_style))
    throw py::value_error("weight: expected a C-contiguous array");
  if (f32 ? !py::isinstance<py::array_t<float>>(data) : !py::isinstance<py::array_t<uint8_t>>(data))
    throw py::type_error(std::string("weight: expected ") + (f32 ? "float32" : "uint8 blocks") + ", got " +
                         std::string(py::str(data.dtype())));
  expect_ndim(data, "weight", 2);
  const int64_t be = block_elems(f);
  if (cols < 1 || cols % be)
    throw py::value_error("cols: expected a positive multiple of " + std::to_string(be) + " (whole blocks), got " +
                          std::to_string(cols));
  Weight w{f, static_cast<const uint8_t*>(data.data()), data.shape(0), cols};
  expect_shape(data, "weight", {w.rows, f32 ? cols : w.row_bytes()});
  return w;
}

#ifdef SOFTPROMPT_SIMD
Array<float> linear_fwd(const Array<float>& x, const py::array& data, int format, py::ssize_t cols,
                        const std::optional<Array<float>>& bias, bool few) {
  const Weight w = weight_arg(data, format, cols);
  expect_ndim(x, "x", 2);
  expect_shape(x, "x", {x.shape(0), w.cols});
  if (bias) expect_shape(*bias, "bias", {w.rows});
  Array<float> y({x.shape(0), py::ssize_t(w.rows)});
  float* yp = y.mutable_data();
  const float* bp = bias ? bias->data() : nullptr;
  {
    py::gil_scoped_release release;
    if (few) linear_forward_few(x.shape(0), x.data(), w, bp, yp);
    else linear_forward(x.shape(0), x.data(), w, bp, yp);
  }
  return y;
}

Array<float> linear_bwd(const Array<float>& dy, const py::array& data, int format, py::ssize_t cols) {
  const Weight w = weight_arg(data, format, cols);
  expect_ndim(dy, "dy", 2);
  expect_shape(dy, "dy", {dy.shape(0), w.rows});
  Array<float> dx({dy.shape(0), py::ssize_t(w.cols)});
  float* dxp = dx.mutable_data();
  {
    py::gil_scoped_release release;
    linear_backward(dy.shape(0), dy.data(), w, dxp);
  }
  return dx;
}
#endif

Array<float> dequantize_py(const py::array& data, int format, py::ssize_t cols) {
  const Weight w = weight_arg(data, format, cols);
  Array<float> out({py::ssize_t(w.rows), py::ssize_t(w.cols)});
  float* op = out.mutable_data();
  {
    py::gil_scoped_release release;
    for (int64_t r = 0; r < w.rows; ++r) dequantize_row(w, r, 0, w.cols, op + r * w.cols);
  }
  return out;
}

template <typename T>
py::tuple attention_forward(const Array<T>& q, const Array<T>& k, const Array<T>& v,
                            const Array<T>& pk, const Array<T>& pv, bool causal,
                            const Mask& mask, double scale, int64_t window, double softcap) {
  const AttentionShape s = attention_shape(q, k, v, pk, pv, mask, causal, scale, window, softcap);
  Array<T> out({s.B, s.T, s.H, s.D}), lse({s.B, s.H, s.T});
  T *o = out.mutable_data(), *l = lse.mutable_data();
  {
    py::gil_scoped_release release;
    prefix_attention_forward<T>(s, q.data(), k.data(), v.data(), pk.data(), pv.data(),
                                mask_ptr(mask), o, l);
  }
  return py::make_tuple(out, lse);
}

template <typename T>
py::tuple attention_backward(const Array<T>& dout, const Array<T>& q, const Array<T>& k,
                             const Array<T>& v, const Array<T>& pk, const Array<T>& pv,
                             const Array<T>& out, const Array<T>& lse, bool causal,
                             const Mask& mask, double scale, int64_t window, double softcap) {
  const AttentionShape s = attention_shape(q, k, v, pk, pv, mask, causal, scale, window, softcap);
  expect_shape(dout, "dout", {s.B, s.T, s.H, s.D});
  expect_shape(out, "out", {s.B, s.T, s.H, s.D});
  expect_shape(lse, "lse", {s.B, s.H, s.T});
  Array<T> dq({s.B, s.T, s.H, s.D}), dk({s.B, s.S, s.Hkv, s.D}), dv({s.B, s.S, s.Hkv, s.D});
  std::vector<py::ssize_t> pshape(pk.shape(), pk.shape() + pk.ndim());
  Array<T> dpk(pshape), dpv(pshape);
  T *dqp = dq.mutable_data(), *dkp = dk.mutable_data(), *dvp = dv.mutable_data();
  T *dpkp = dpk.mutable_data(), *dpvp = dpv.mutable_data();
  {
    py::gil_scoped_release release;
    prefix_attention_backward<T>(s, dout.data(), q.data(), k.data(), v.data(), pk.data(),
                                 pv.data(), mask_ptr(mask), out.data(), lse.data(), dqp, dkp,
                                 dvp, dpkp, dpvp);
  }
  return py::make_tuple(dq, dk, dv, dpk, dpv);
}

template <typename T>
Array<T> prepend_fwd(const Array<T>& prompt, const Array<T>& x) {
  expect_ndim(x, "x", 3);
  const py::ssize_t B = x.shape(0), T_ = x.shape(1), D = x.shape(2);
  const bool per_row = prompt.ndim() == 3;
  if (prompt.ndim() != 2 && !per_row)
    throw py::value_error("prompt: expected 2 or 3 dimensions, got shape " + shape_str(prompt));
  const py::ssize_t P = prompt.shape(prompt.ndim() - 2);
  if (per_row) expect_shape(prompt, "prompt", {B, P, D});
  else expect_shape(prompt, "prompt", {P, D});
  Array<T> y({B, P + T_, D});
  T* yp = y.mutable_data();
  {
    py::gil_scoped_release release;
    prepend_forward<T>(B, P, T_, D, prompt.data(), per_row, x.data(), yp);
  }
  return y;
}

template <typename T>
py::tuple prepend_bwd(const Array<T>& dy, py::ssize_t prompt_length, bool shared) {
  expect_ndim(dy, "dy", 3);
  const py::ssize_t B = dy.shape(0), L = dy.shape(1), D = dy.shape(2);
  if (prompt_length < 0 || prompt_length > L)
    throw py::value_error("prompt_length: expected 0 <= prompt_length <= " + std::to_string(L) +
                          ", got " + std::to_string(prompt_length));
  const py::ssize_t P = prompt_length, T_ = L - P;
  Array<T> dprompt = shared ? Array<T>({P, D}) : Array<T>({B, P, D});
  Array<T> dx({B, T_, D});
  T *dpp = dprompt.mutable_data(), *dxp = dx.mutable_data();
  {
    py::gil_scoped_release release;
    prepend_backward<T>(B, P, T_, D, dy.data(), shared, dpp, dxp);
  }
  return py::make_tuple(dprompt, dx);
}

// ---- fused layers (layers.h): 2-D row-major operands; N rows each
template <typename T>
py::tuple rmsnorm_fwd(const Array<T>& x, const Array<T>& w, double eps) {
  expect_ndim(x, "x", 2);
  const py::ssize_t N = x.shape(0), C = x.shape(1);
  expect_shape(w, "weight", {C});
  Array<T> y({N, C}), rstd({N});
  T *yp = y.mutable_data(), *rp = rstd.mutable_data();
  {
    py::gil_scoped_release release;
    rmsnorm_forward<T>(N, C, x.data(), w.data(), T(eps), yp, rp);
  }
  return py::make_tuple(y, rstd);
}

template <typename T>
Array<T> rmsnorm_bwd(const Array<T>& dy, const Array<T>& x, const Array<T>& rstd,
                     const Array<T>& w, const std::optional<Array<T>>& residual) {
  expect_ndim(x, "x", 2);
  const py::ssize_t N = x.shape(0), C = x.shape(1);
  expect_shape(dy, "dy", {N, C});
  expect_shape(rstd, "rstd", {N});
  expect_shape(w, "weight", {C});
  if (residual) expect_shape(*residual, "residual", {N, C});
  Array<T> dx({N, C});
  T* dxp = dx.mutable_data();
  const T* rp = residual ? residual->data() : nullptr;
  {
    py::gil_scoped_release release;
    rmsnorm_backward<T>(N, C, dy.data(), x.data(), rstd.data(), w.data(), rp, dxp);
  }
  return dx;
}

template <typename T>
Array<T> swiglu_fwd(const Array<T>& gu) {
  expect_ndim(gu, "gate_up", 2);
  if (gu.shape(1) % 2) throw py::value_error("gate_up: expected an even width [N, 2F], got " + shape_str(gu));
  const py::ssize_t N = gu.shape(0), F = gu.shape(1) / 2;
  Array<T> a({N, F});
  T* ap = a.mutable_data();
  {
    py::gil_scoped_release release;
    swiglu_forward<T>(N, F, gu.data(), ap);
  }
  return a;
}

template <typename T>
Array<T> swiglu_bwd(const Array<T>& da, const Array<T>& gu) {
  expect_ndim(gu, "gate_up", 2);
  if (gu.shape(1) % 2) throw py::value_error("gate_up: expected an even width [N, 2F], got " + shape_str(gu));
  const py::ssize_t N = gu.shape(0), F = gu.shape(1) / 2;
  expect_shape(da, "da", {N, F});
  Array<T> dgu({N, 2 * F});
  T* dp = dgu.mutable_data();
  {
    py::gil_scoped_release release;
    swiglu_backward<T>(N, F, da.data(), gu.data(), dp);
  }
  return dgu;
}

template <typename T>
py::tuple rope_split_py(const Array<T>& qkv, const Array<T>& cos, const Array<T>& sin,
                        py::ssize_t H, py::ssize_t Hkv, py::ssize_t D) {
  if (H < 1 || Hkv < 1 || D < 2 || D % 2)
    throw py::value_error("rope_split: expected H, Hkv >= 1 and an even head_dim D >= 2");
  expect_ndim(qkv, "qkv", 2);
  const py::ssize_t N = qkv.shape(0);
  expect_shape(qkv, "qkv", {N, (H + 2 * Hkv) * D});
  expect_shape(cos, "cos", {N, D / 2});
  expect_shape(sin, "sin", {N, D / 2});
  Array<T> q({N, H, D}), k({N, Hkv, D}), v({N, Hkv, D});
  T *qp = q.mutable_data(), *kp = k.mutable_data(), *vp = v.mutable_data();
  {
    py::gil_scoped_release release;
    rope_split<T>(N, H, Hkv, D, qkv.data(), cos.data(), sin.data(), qp, kp, vp);
  }
  return py::make_tuple(q, k, v);
}

template <typename T>
Array<T> rope_merge_py(const Array<T>& dq, const Array<T>& dk, const Array<T>& dv,
                       const Array<T>& cos, const Array<T>& sin) {
  expect_ndim(dq, "dq", 3);
  const py::ssize_t N = dq.shape(0), H = dq.shape(1), D = dq.shape(2);
  if (D % 2) throw py::value_error("dq: expected an even head_dim, got " + shape_str(dq));
  expect_ndim(dk, "dk", 3);
  const py::ssize_t Hkv = dk.shape(1);
  expect_shape(dk, "dk", {N, Hkv, D});
  expect_shape(dv, "dv", {N, Hkv, D});
  expect_shape(cos, "cos", {N, D / 2});
  expect_shape(sin, "sin", {N, D / 2});
  Array<T> dqkv({N, (H + 2 * Hkv) * D});
  T* p = dqkv.mutable_data();
  {
    py::gil_scoped_release release;
    rope_merge<T>(N, H, Hkv, D, dq.data(), dk.data(), dv.data(), cos.data(), sin.data(), p);
  }
  return dqkv;
}

template <typename T>
py::array_t<double> softmax_xent(Array<T>& logits, const py::array_t<int64_t, py::array::c_style>& labels,
                                 double scale) {
  expect_ndim(logits, "logits", 2);
  const py::ssize_t N = logits.shape(0), V = logits.shape(1);
  expect_shape(labels, "labels", {N});
  const int64_t* lp = labels.data();
  for (py::ssize_t n = 0; n < N; ++n)
    if (lp[n] < 0 || lp[n] >= V)
      throw py::value_error("labels: expected values in [0, " + std::to_string(V) + "), got " +
                            std::to_string(lp[n]));
  py::array_t<double> loss({N});
  double* out = loss.mutable_data();
  T* zp = logits.mutable_data();
  {
    py::gil_scoped_release release;
    softmax_cross_entropy<T>(N, V, zp, lp, scale, out);
  }
  return loss;
}

template <typename T>
void bind_dtype(py::module_& m) {
  m.def("prefix_attention_forward", &attention_forward<T>, py::arg("q").noconvert(),
        py::arg("k").noconvert(), py::arg("v").noconvert(), py::arg("prefix_k").noconvert(),
        py::arg("prefix_v").noconvert(), py::arg("causal"), py::arg("key_padding_mask").noconvert(),
        py::arg("scale"), py::arg("window") = 0, py::arg("softcap") = 0.0);
  m.def("prefix_attention_backward", &attention_backward<T>, py::arg("dout").noconvert(),
        py::arg("q").noconvert(), py::arg("k").noconvert(), py::arg("v").noconvert(),
        py::arg("prefix_k").noconvert(), py::arg("prefix_v").noconvert(),
        py::arg("out").noconvert(), py::arg("lse").noconvert(), py::arg("causal"),
        py::arg("key_padding_mask").noconvert(), py::arg("scale"), py::arg("window") = 0, py::arg("softcap") = 0.0);
  m.def("prepend_forward", &prepend_fwd<T>, py::arg("prompt").noconvert(),
        py::arg("x").noconvert());
  m.def("prepend_backward", &prepend_bwd<T>, py::arg("dy").noconvert(),
        py::arg("prompt_length"), py::arg("shared"));
  m.def("rmsnorm_forward", &rmsnorm_fwd<T>, py::arg("x").noconvert(), py::arg("weight").noconvert(),
        py::arg("eps"));
  m.def("rmsnorm_backward", &rmsnorm_bwd<T>, py::arg("dy").noconvert(), py::arg("x").noconvert(),
        py::arg("rstd").noconvert(), py::arg("weight").noconvert(),
        py::arg("residual").noconvert() = py::none());
  m.def("swiglu_forward", &swiglu_fwd<T>, py::arg("gate_up").noconvert());
  m.def("swiglu_backward", &swiglu_bwd<T>, py::arg("da").noconvert(), py::arg("gate_up").noconvert());
  m.def("rope_split", &rope_split_py<T>, py::arg("qkv").noconvert(), py::arg("cos").noconvert(),
        py::arg("sin").noconvert(), py::arg("num_heads"), py::arg("num_kv_heads"), py::arg("head_dim"));
  m.def("rope_merge", &rope_merge_py<T>, py::arg("dq").noconvert(), py::arg("dk").noconvert(),
        py::arg("dv").noconvert(), py::arg("cos").noconvert(), py::arg("sin").noconvert());
  m.def("softmax_cross_entropy", &softmax_xent<T>, py::arg("logits").noconvert(),
        py::arg("labels").noconvert(), py::arg("scale"));
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "softprompt's compiled kernels (Eigen + OpenMP); use softprompt.ops instead.";
  bind_dtype<float>(m);
  bind_dtype<double>(m);
#ifdef SOFTPROMPT_SIMD  // the GEMM needs GCC/Clang vector extensions; softprompt falls back to NumPy
  m.def("linear_forward", &linear_fwd, py::arg("x").noconvert(), py::arg("weight"), py::arg("format"),
        py::arg("cols"), py::arg("bias").noconvert() = py::none(), py::arg("few_rows") = false);
  m.def("linear_backward", &linear_bwd, py::arg("dy").noconvert(), py::arg("weight"), py::arg("format"),
        py::arg("cols"));
#endif
  m.def("dequantize", &dequantize_py, py::arg("weight"), py::arg("format"), py::arg("cols"));
  m.def("set_num_threads", [](int n) {
    if (n < 1) throw py::value_error("n: expected a thread count >= 1, got " + std::to_string(n));
    set_num_threads(n);
  }, py::arg("n"));
  m.def("get_num_threads", &num_threads);
  m.def("set_adaptive_threads", &set_adaptive_threads, py::arg("enabled"));
  m.def("get_adaptive_threads", &adaptive_threads);
  m.def("threads_for", &threads_for, py::arg("work"));  // for tests: the team size a call of `work` flops gets
  m.def("free_cores", &free_cores);
  m.def("has_openmp", &has_openmp);
  // Which attention implementation runs: "simd" (default where built) or "eigen". For tests and
  // benchmarks; both compute the same thing.
  m.def("set_attention_kernel", [](const std::string& name) {
    if (name != "simd" && name != "eigen")
      throw py::value_error("kernel: expected 'simd' or 'eigen', got '" + name + "'");
    if (name == "simd" && !has_simd_kernel())
      throw py::value_error("kernel: 'simd' was not built (compiler without vector extensions)");
    set_attention_kernel(name == "simd" ? AttentionKernel::simd : AttentionKernel::eigen);
  }, py::arg("kernel"));
  m.def("get_attention_kernel", [] {
    return attention_kernel() == AttentionKernel::simd ? "simd" : "eigen";
  });
}
