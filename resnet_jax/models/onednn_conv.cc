// NHWC x HWIO float32 convolutions and their two gradients on oneDNN, as XLA FFI handlers.
//
// resnet_jax/models/onednn.py compiles this file on first use and calls the three handlers
// through jax.ffi. Each keeps XLA's layouts (activations NHWC, kernels HWIO); oneDNN picks
// its kernel layout and the HWIO kernel is reordered to it (or back, for the weight
// gradient). Primitives are built once per geometry and kept; each call brings its own
// scratchpad, so XLA may run calls on several threads at once.
#include <array>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using Tag = memory::format_tag;

namespace {

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// One conv's geometry: x [n, h, w, c] * kernel [kh, kw, c, o] -> y [n, oh, ow, o].
struct Geometry {
  int64_t n, h, w, c, kh, kw, o, oh, ow, sh, sw, pt, pb, pl, pr;
  std::array<int64_t, 15> Key() const { return {n, h, w, c, kh, kw, o, oh, ow, sh, sw, pt, pb, pl, pr}; }
  memory::desc X() const { return memory::desc({n, c, h, w}, memory::data_type::f32, Tag::nhwc); }
  memory::desc Y() const { return memory::desc({n, o, oh, ow}, memory::data_type::f32, Tag::nhwc); }
  memory::desc K(Tag tag) const { return memory::desc({o, c, kh, kw}, memory::data_type::f32, tag); }
  dnnl::convolution_forward::primitive_desc Forward(
      const dnnl::primitive_attr& attr = dnnl::primitive_attr()) const {
    return dnnl::convolution_forward::primitive_desc(
        Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, X(),
        K(Tag::any), Y(), {sh, sw}, {pt, pl}, {pb, pr}, attr);
  }
  // Both gradients' primitive descriptors take the same arguments.
  template <typename Primitive>
  typename Primitive::primitive_desc Backward(const dnnl::primitive_attr& attr) const {
    return typename Primitive::primitive_desc(
        Engine(), dnnl::algorithm::convolution_direct, X(), K(Tag::any), Y(), {sh, sw},
        {pt, pl}, {pb, pr}, Forward(), attr);
  }
};

// A primitive with its kernel's layout and the reorders between that layout and HWIO.
struct Plan {
  dnnl::primitive primitive;
  memory::desc kernel_desc;  // the primitive's own kernel layout
  bool kernel_is_hwio;
  dnnl::reorder kernel_reorder;  // HWIO -> kernel_desc (forward, input grad); back (weight grad)
  memory::desc scratchpad_desc;
};

enum class Op { kForward, kInputGrad, kWeightGrad };

template <typename Primitive>
void Keep(const typename Primitive::primitive_desc& pd, const memory::desc& kernel_desc,
          Plan& plan) {
  plan.primitive = Primitive(pd);
  plan.kernel_desc = kernel_desc;
  plan.scratchpad_desc = pd.scratchpad_desc();
}

Plan MakePlan(Op op, const Geometry& g) {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  Plan plan;
  if (op == Op::kForward) {
    auto pd = g.Forward(attr);
    Keep<dnnl::convolution_forward>(pd, pd.weights_desc(), plan);
  } else if (op == Op::kInputGrad) {
    auto pd = g.Backward<dnnl::convolution_backward_data>(attr);
    Keep<dnnl::convolution_backward_data>(pd, pd.weights_desc(), plan);
  } else {
    auto pd = g.Backward<dnnl::convolution_backward_weights>(attr);
    Keep<dnnl::convolution_backward_weights>(pd, pd.diff_weights_desc(), plan);
  }
  plan.kernel_is_hwio = plan.kernel_desc == g.K(Tag::hwio);
  if (!plan.kernel_is_hwio) {
    if (op == Op::kWeightGrad) {
      plan.kernel_reorder = dnnl::reorder(dnnl::reorder::primitive_desc(
          Engine(), plan.kernel_desc, Engine(), g.K(Tag::hwio)));
    } else {
      plan.kernel_reorder = dnnl::reorder(dnnl::reorder::primitive_desc(
          Engine(), g.K(Tag::hwio), Engine(), plan.kernel_desc));
    }
  }
  return plan;
}

const Plan& GetPlan(Op op, const Geometry& g) {
  static std::mutex mutex;
  static std::map<std::pair<int, std::array<int64_t, 15>>, Plan> plans;
  std::lock_guard<std::mutex> lock(mutex);
  auto key = std::make_pair(static_cast<int>(op), g.Key());
  auto it = plans.find(key);
  if (it == plans.end()) it = plans.emplace(key, MakePlan(op, g)).first;
  return it->second;
}

// Runs `op`; x, kernel (HWIO) and y (all NHWC) point at XLA's buffers, one of them the output.
void Run(Op op, const Geometry& g, float* x, float* kernel, float* y) {
  const Plan& plan = GetPlan(op, g);
  dnnl::stream stream(Engine());
  thread_local std::vector<char> scratch, kernel_copy;
  scratch.resize(plan.scratchpad_desc.get_size());
  memory scratchpad(plan.scratchpad_desc, Engine(), scratch.data());
  memory x_mem(g.X(), Engine(), x), y_mem(g.Y(), Engine(), y);
  memory hwio(g.K(Tag::hwio), Engine(), kernel);
  memory kernel_mem = hwio;
  if (!plan.kernel_is_hwio) {
    kernel_copy.resize(plan.kernel_desc.get_size());
    kernel_mem = memory(plan.kernel_desc, Engine(), kernel_copy.data());
    if (op != Op::kWeightGrad) plan.kernel_reorder.execute(stream, hwio, kernel_mem);
  }
  if (op == Op::kForward) {
    plan.primitive.execute(stream, {{DNNL_ARG_SRC, x_mem}, {DNNL_ARG_WEIGHTS, kernel_mem},
                                    {DNNL_ARG_DST, y_mem}, {DNNL_ARG_SCRATCHPAD, scratchpad}});
  } else if (op == Op::kInputGrad) {
    plan.primitive.execute(stream, {{DNNL_ARG_DIFF_SRC, x_mem}, {DNNL_ARG_WEIGHTS, kernel_mem},
                                    {DNNL_ARG_DIFF_DST, y_mem}, {DNNL_ARG_SCRATCHPAD, scratchpad}});
  } else {
    plan.primitive.execute(stream, {{DNNL_ARG_SRC, x_mem}, {DNNL_ARG_DIFF_WEIGHTS, kernel_mem},
                                    {DNNL_ARG_DIFF_DST, y_mem}, {DNNL_ARG_SCRATCHPAD, scratchpad}});
    if (!plan.kernel_is_hwio) plan.kernel_reorder.execute(stream, kernel_mem, hwio);
  }
  stream.wait();
}

Geometry MakeGeometry(ffi::Span<const int64_t> x, ffi::Span<const int64_t> kernel,
                      ffi::Span<const int64_t> y, int64_t sh, int64_t sw, int64_t pt, int64_t pb,
                      int64_t pl, int64_t pr) {
  return Geometry{x[0], x[1], x[2], x[3], kernel[0], kernel[1], kernel[3], y[1], y[2],
                  sh, sw, pt, pb, pl, pr};
}

template <Op op>
ffi::Error Call(ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b, ffi::ResultBuffer<ffi::F32> out,
                int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  try {
    if (op == Op::kForward) {  // a = x, b = kernel, out = y
      Geometry g = MakeGeometry(a.dimensions(), b.dimensions(), out->dimensions(),
                                sh, sw, pt, pb, pl, pr);
      Run(op, g, a.typed_data(), b.typed_data(), out->typed_data());
    } else if (op == Op::kInputGrad) {  // a = dy, b = kernel, out = dx
      Geometry g = MakeGeometry(out->dimensions(), b.dimensions(), a.dimensions(),
                                sh, sw, pt, pb, pl, pr);
      Run(op, g, out->typed_data(), b.typed_data(), a.typed_data());
    } else {  // a = x, b = dy, out = dkernel
      Geometry g = MakeGeometry(a.dimensions(), out->dimensions(), b.dimensions(),
                                sh, sw, pt, pb, pl, pr);
      Run(op, g, a.typed_data(), out->typed_data(), b.typed_data());
    }
  } catch (const dnnl::error& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN: ") + e.what());
  }
  return ffi::Error::Success();
}

auto Binding() {
  return ffi::Ffi::Bind()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Ret<ffi::Buffer<ffi::F32>>()
      .Attr<int64_t>("stride_h")
      .Attr<int64_t>("stride_w")
      .Attr<int64_t>("pad_top")
      .Attr<int64_t>("pad_bottom")
      .Attr<int64_t>("pad_left")
      .Attr<int64_t>("pad_right");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvForward, Call<Op::kForward>, Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvInputGrad, Call<Op::kInputGrad>, Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvWeightGrad, Call<Op::kWeightGrad>, Binding());
