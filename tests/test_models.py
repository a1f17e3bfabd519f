"""Specification of the model zoo: sizes, shapes, dtypes, variants and error messages."""

import functools
import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import resnet_jax
from resnet_jax.models import (
    BasicBlock, BottleneckBlock, PreActBasicBlock, PreActBottleneckBlock)
from resnet_jax.models.layers import make_conv, make_norm
from resnet_jax.summary import count, format_summary, main as summary_main, summarize


def abstract_variables(model, image_size):
  image = jnp.zeros((1, image_size, image_size, model.in_channels))
  return jax.eval_shape(lambda: model.init(jax.random.key(0), image))


def init(model, x):
  return model.init({"params": jax.random.key(0), "drop_path": jax.random.key(1)}, x)


TORCHVISION_PARAMS = {
    "resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032,
    "resnet101": 44_549_160, "resnet152": 60_192_808, "wide_resnet50_2": 68_883_240,
    "wide_resnet101_2": 126_886_696, "resnext50_32x4d": 25_028_904,
    "resnext101_32x8d": 88_791_336, "resnext101_64x4d": 83_455_272,
}


@pytest.mark.parametrize("name,expected", sorted(TORCHVISION_PARAMS.items()))
def test_parameter_count_equals_torchvision(name, expected):
  variables = abstract_variables(resnet_jax.create_model(name, num_classes=1000), 64)
  assert count(variables["params"]) == expected


def test_batch_stats_entries_equal_torchvision_buffers():
  variables = abstract_variables(resnet_jax.create_model("resnet50"), 64)
  assert count(variables["batch_stats"]) == 53_120  # running_mean + running_var


@pytest.mark.parametrize("name,millions", [("resnet20", 0.27), ("resnet32", 0.46),
                                           ("resnet44", 0.66), ("resnet56", 0.85)])
def test_cifar_parameter_count_matches_paper_table6(name, millions):
  variables = abstract_variables(resnet_jax.create_model(name, num_classes=10), 32)
  assert round(count(variables["params"]) / 1e6, 2) == millions


def test_resnet8_is_resnet20_without_the_later_blocks_of_each_stage():
  resnet8 = abstract_variables(resnet_jax.create_model("resnet8", num_classes=10), 32)["params"]
  resnet20 = abstract_variables(resnet_jax.create_model("resnet20", num_classes=10), 32)["params"]
  kept = {name: tree for name, tree in resnet20.items() if not name.endswith(("_1", "_2"))}
  chex.assert_trees_all_equal_shapes_and_dtypes(resnet8, kept)
  assert count(resnet8) == 75_290  # 0.08 M


def test_resnet110_parameter_count_matches_paper_table6():
  variables = abstract_variables(resnet_jax.create_model("resnet110", num_classes=10), 32)
  assert round(count(variables["params"]) / 1e6, 1) == 1.7


def test_resnet50_forward_is_about_8_2_gflops():
  summary = summarize(resnet_jax.create_model("resnet50"), 224, depth=1)
  assert 8.2e9 * 0.95 <= summary.forward_flops <= 8.2e9 * 1.05


@pytest.mark.parametrize("name", [
    pytest.param(name, marks=pytest.mark.slow) if name == "resnet1202" else name  # 11 s tracing
    for name in resnet_jax.list_models()])
def test_every_model_outputs_logits_of_input_dtype(name):
  model = resnet_jax.create_model(name, num_classes=7)
  image = jax.ShapeDtypeStruct((2, model.min_image_size, model.min_image_size, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), image)
  logits = jax.eval_shape(functools.partial(model.apply, train=False), variables, image)
  chex.assert_shape(logits, (2, 7))
  assert logits.dtype == jnp.float32


def test_return_features_gives_pooled_features():
  model = resnet_jax.create_model("resnet18")
  x = jnp.zeros((2, 32, 32, 3))
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
  features = jax.eval_shape(lambda v: model.apply(v, x, return_features=True), variables)
  chex.assert_shape(features, (2, 512))


def test_batch_stats_change_in_train_mode_only():
  model = resnet_jax.create_model("resnet20")
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
  variables = init(model, x)
  _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)),
                         variables["batch_stats"], updates["batch_stats"])
  assert all(jax.tree.leaves(changed))
  _, eval_updates = model.apply(variables, x, train=False, mutable=["batch_stats"])
  chex.assert_trees_all_equal(eval_updates["batch_stats"], variables["batch_stats"])


def capture_output_shapes(model, x, **kwargs):
  """Each layer's output shapes, traced (nothing runs)."""
  def intermediates(x):
    _, state = model.apply(init(model, x), x, capture_intermediates=True,
                           mutable=["intermediates", "batch_stats"], **kwargs)
    return state["intermediates"]
  return jax.tree.map(lambda a: a.shape, jax.eval_shape(intermediates, x))


@pytest.mark.parametrize("stride_in_1x1,conv1_side,conv2_side", [(False, 8, 4), (True, 4, 4)])
def test_v1_strides_the_1x1_and_v1_5_the_3x3(stride_in_1x1, conv1_side, conv2_side):
  model = resnet_jax.create_model("resnet50", stride_in_1x1=stride_in_1x1, width=4)
  shapes = capture_output_shapes(model, jnp.ones((1, 32, 32, 3)))
  block = shapes["layer2_0"]  # first block of stage 2 halves 8×8 to 4×4
  assert block["conv1"]["__call__"][0][1] == conv1_side
  assert block["conv2"]["__call__"][0][1] == conv2_side


def make_block(block_cls, planes, zero_init, train=True, **kwargs):
  return block_cls(
      planes=planes, conv=make_conv(jnp.float32, jnp.float32),
      norm=make_norm("batch", train=train, momentum=0.9, epsilon=1e-5, axis_name=None,
                     dtype=jnp.float32, param_dtype=jnp.float32),
      zero_init_residual=zero_init, **kwargs)


@pytest.mark.parametrize("block_cls", [BasicBlock, BottleneckBlock])
def test_zero_init_makes_v1_block_return_relu_of_its_input(block_cls):
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 16))
  block = make_block(block_cls, 16 // block_cls.expansion, zero_init=True)
  variables = block.init(jax.random.key(1), x)
  y, _ = block.apply(variables, x, train=True, mutable=["batch_stats"])
  chex.assert_trees_all_close(y, nn.relu(x), atol=1e-6)


@pytest.mark.parametrize("block_cls", [PreActBasicBlock, PreActBottleneckBlock])
def test_zero_init_makes_v2_block_the_identity_with_identity_jacobian(block_cls):
  x = jax.random.normal(jax.random.key(0), (2, 3, 3, 8))
  block = make_block(block_cls, 8 // block_cls.expansion, zero_init=True)
  variables = block.init(jax.random.key(1), x)

  def forward(x):
    return block.apply(variables, x, train=True, mutable=["batch_stats"])[0]

  chex.assert_trees_all_close(forward(x), x, atol=1e-6)
  jacobian = jax.jacobian(forward)(x).reshape(x.size, x.size)
  chex.assert_trees_all_close(jacobian, jnp.eye(x.size), atol=1e-6)


def test_without_zero_init_residual_branch_is_not_zero():
  x = jax.random.normal(jax.random.key(0), (2, 3, 3, 8))
  block = make_block(PreActBasicBlock, 8, zero_init=False)
  variables = block.init(jax.random.key(1), x)
  y, _ = block.apply(variables, x, train=True, mutable=["batch_stats"])
  assert float(jnp.max(jnp.abs(y - x))) > 1e-3


def test_bfloat16_compute_keeps_float32_params_and_statistics():
  model = resnet_jax.create_model("resnet20", dtype=jnp.bfloat16)
  x = jnp.ones((2, 8, 8, 3))
  variables = init(model, x)
  chex.assert_trees_all_equal_dtypes(variables, jax.tree.map(lambda _: jnp.zeros(()), variables))
  (logits, state) = model.apply(variables, x, train=True, capture_intermediates=True,
                                mutable=["intermediates", "batch_stats"])
  assert logits.dtype == jnp.bfloat16
  activations = jax.tree.leaves(state["intermediates"])
  assert activations and all(a.dtype == jnp.bfloat16 for a in activations)
  assert all(s.dtype == jnp.float32 for s in jax.tree.leaves(state["batch_stats"]))


def test_stochastic_depth_is_a_function_of_the_key_and_off_in_eval():
  model = resnet_jax.create_model("resnet20", drop_path_rate=0.5)
  x = jax.random.normal(jax.random.key(0), (8, 8, 8, 3))
  variables = init(model, x)

  def train_logits(seed):
    return model.apply(variables, x, train=True, mutable=["batch_stats"],
                       rngs={"drop_path": jax.random.key(seed)})[0]

  chex.assert_trees_all_equal(train_logits(1), train_logits(1))
  assert not np.allclose(train_logits(1), train_logits(2))
  no_drop = resnet_jax.create_model("resnet20", drop_path_rate=0.0)
  chex.assert_trees_all_equal(model.apply(variables, x), no_drop.apply(variables, x))


def test_option_a_shortcut_has_no_parameters_and_option_b_projects():
  option_a = abstract_variables(resnet_jax.create_model("resnet20"), 32)["params"]
  option_b = abstract_variables(resnet_jax.create_model("resnet20", shortcut="projection"), 32)
  assert "downsample" not in option_a["layer2_0"]
  assert set(option_b["params"]["layer2_0"]["downsample"]) == {"conv", "bn"}


PLAIN_NETS = {"plain20": "resnet20", "plain32": "resnet32", "plain44": "resnet44",
              "plain56": "resnet56", "plain110": "resnet110", "plain18": "resnet18",
              "plain34": "resnet34"}


@pytest.mark.parametrize("plain,resnet", sorted(PLAIN_NETS.items()))
def test_plain_net_has_no_shortcut_and_the_option_a_resnets_parameter_count(plain, resnet):
  plain_model = resnet_jax.create_model(plain)
  plain_variables = abstract_variables(plain_model, plain_model.min_image_size)
  option_a = abstract_variables(resnet_jax.create_model(resnet, shortcut="zero_pad"),
                                plain_model.min_image_size)
  assert "downsample" not in str(jax.tree_util.tree_structure(plain_variables))
  assert count(plain_variables["params"]) == count(option_a["params"])
  assert count(plain_variables["batch_stats"]) == count(option_a["batch_stats"])


def test_plain_block_has_no_skip_path():
  # With its last BatchNorm scale at zero the branch outputs 0: a residual block then
  # returns relu(x), a plain block 0.
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 16))
  norm = make_norm("batch", train=False, momentum=0.9, epsilon=1e-5, axis_name=None,
                   dtype=jnp.float32, param_dtype=jnp.float32)
  conv = make_conv(jnp.float32, jnp.float32)
  for kind, expected in (("zero_pad", jax.nn.relu(x)), ("none", jnp.zeros_like(x))):
    block = BasicBlock(16, conv, norm, shortcut=kind, zero_init_residual=True)
    chex.assert_trees_all_close(block.apply(block.init(jax.random.key(1), x), x), expected)


def test_resnet_d_uses_deep_stem_and_avgpool_shortcut():
  model = resnet_jax.create_model("resnet50d", width=8)
  shapes = capture_output_shapes(model, jnp.ones((1, 32, 32, 3)))
  assert {"conv1_0", "conv1_1", "conv1_2"} <= set(shapes)
  chex.assert_equal(shapes["layer2_0"]["downsample"]["__call__"][0], (1, 4, 4, 64))


def test_group_norm_variant_has_no_batch_stats():
  model = resnet_jax.create_model("resnet20", norm="group")
  variables = abstract_variables(model, 8)
  assert "batch_stats" not in variables


def test_squeeze_excite_adds_its_two_convs_per_block():
  variables = abstract_variables(resnet_jax.create_model("resnet18", se_ratio=1 / 16), 32)
  assert set(variables["params"]["layer1_0"]["se"]) == {"fc1", "fc2"}


def test_unknown_model_name_lists_close_matches():
  with pytest.raises(ValueError, match="Did you mean.*resnet50"):
    resnet_jax.create_model("resnet5O")


def test_unknown_override_names_the_field():
  with pytest.raises(ValueError, match="num_clases"):
    resnet_jax.create_model("resnet18", num_clases=10)


@pytest.mark.parametrize("shape", [(8, 8, 3), (1, 8, 8, 1), (1, 3, 8, 8)])
def test_wrong_input_rank_or_channels_names_expected_shape(shape):
  model = resnet_jax.create_model("resnet20")
  with pytest.raises(ValueError, match=r"\(batch, height, width, 3\)"):
    model.init(jax.random.key(0), jnp.zeros(shape))


def test_too_small_image_names_the_minimum_size():
  model = resnet_jax.create_model("resnet50")
  with pytest.raises(ValueError, match="at least 32"):
    model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))


def test_summary_lists_layers_in_call_order_with_totals(capsys):
  summary_main(["resnet20", "--image_size", "32", "--depth", "1"])
  out = capsys.readouterr().out
  layers = [line.split()[0] for line in out.splitlines()[2:14]]
  assert layers[:4] == ["conv1", "bn1", "layer1_0", "layer1_1"]
  assert "269,722 parameters" in out and "1,376 batch_stats entries" in out


def test_summary_rows_add_up_to_total_parameters():
  summary = summarize(resnet_jax.create_model("resnet18"), 64, depth=1)
  assert sum(r.num_params for r in summary.rows) == summary.num_params
  assert "resnet18" in format_summary("resnet18", summary)


@pytest.mark.parametrize("impl,stride_in_1x1,train", [
    ("tuned", False, False), ("tuned", True, False), ("tuned", False, True),
    ("onednn", False, True)])
def test_tuned_layers_equal_plain_xla_layers_in_outputs_and_gradients(impl, stride_in_1x1, train):
  # Two narrow bottleneck stages: strided and unstrided 1×1 convs, a strided projection and
  # the stem's max-pool, on an even side (10) here; "onednn" also runs the 7×7 stem and the
  # 3×3 convs on oneDNN.
  tuned, plain = (resnet_jax.ResNet(stage_sizes=(1, 2), block_cls=BottleneckBlock, width=8,
                                    num_classes=5, stride_in_1x1=stride_in_1x1, layer_impl=i)
                   for i in (impl, "plain"))
  x = jax.random.normal(jax.random.key(0), (4, 19, 19, 3))  # odd sides: ceil in strided slices
  variables = plain.init(jax.random.key(1), x)
  chex.assert_trees_all_equal_shapes_and_dtypes(jax.eval_shape(tuned.init, jax.random.key(1), x),
                                                variables)

  def logits_and_grads(model):
    def loss(params):
      logits, updates = model.apply({**variables, "params": params}, x, train=train,
                                    mutable=["batch_stats"])
      return jnp.sum(logits**2), (logits, updates)
    (_, outputs), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
    return outputs, grads

  tuned_outputs, tuned_grads = logits_and_grads(tuned)
  plain_outputs, plain_grads = logits_and_grads(plain)
  chex.assert_trees_all_close(tuned_outputs, plain_outputs, rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(tuned_grads, plain_grads, rtol=1e-4, atol=1e-4)


def test_select_relu_equals_jax_relu_in_values_and_gradients():
  from resnet_jax.models.layers import select_relu
  x = jnp.array([-jnp.inf, -2.0, -1e-30, -0.0, 0.0, 1e-30, 3.0, jnp.inf, jnp.nan])
  np.testing.assert_array_equal(select_relu(x), jax.nn.relu(x))
  for f in (select_relu, jax.nn.relu):  # both: gradient 0 at 0, NaN where x is NaN
    assert jax.grad(f)(0.0) == 0.0 and jax.grad(f)(2.0) == 1.0 and jax.grad(f)(-2.0) == 0.0
  np.testing.assert_array_equal(jax.vmap(jax.grad(select_relu))(x),
                                jax.vmap(jax.grad(jax.nn.relu))(x))


def test_tuned_train_step_fusions_do_not_grow_with_the_number_of_blocks():
  # XLA:CPU duplicated max(x, 0) at each block's output into the next block's fusion, so
  # the last block's fusion grew with the stage's depth; the select form stops that.
  x = jnp.ones((2, 8, 8, 3))

  def largest_fusion(blocks):
    model = resnet_jax.create_model("resnet20", width=4, stage_sizes=(blocks,), num_classes=3,
                                    layer_impl="tuned")
    variables = model.init(jax.random.key(0), x)

    def loss(params):
      logits, _ = model.apply({**variables, "params": params}, x, train=True,
                              mutable=["batch_stats"])
      return jnp.sum(logits)

    hlo = jax.jit(jax.grad(loss)).lower(variables["params"]).compile().as_text()
    return max(len(operands.split(","))
               for operands in re.findall(r"= \S+ fusion\(([^)]*)\), kind=kLoop", hlo))

  assert largest_fusion(8) == largest_fusion(3)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_train_batch_norm_equals_flax_batch_norm_in_outputs_statistics_and_gradients(dtype):
  from resnet_jax.models.layers import TrainBatchNorm
  x = (jax.random.normal(jax.random.key(0), (4, 5, 5, 8)) * 3 + 1).astype(dtype)
  weights = jax.random.normal(jax.random.key(1), x.shape)
  ours = TrainBatchNorm(momentum=0.9, epsilon=1e-5, dtype=dtype, param_dtype=jnp.float32)
  flax_bn = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5, dtype=dtype)
  variables = flax_bn.init(jax.random.key(2), x)
  chex.assert_trees_all_equal_shapes_and_dtypes(jax.eval_shape(ours.init, jax.random.key(2), x),
                                                variables)
  params = jax.tree.map(lambda p: p + jax.random.uniform(jax.random.key(3), p.shape),
                        variables["params"])

  def run(module):
    def loss(params, x):
      y, updates = module.apply({**variables, "params": params}, x, mutable=["batch_stats"])
      return jnp.sum(y.astype(jnp.float32) * weights), (y, updates)
    (_, outputs), grads = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(params, x)
    return outputs, grads

  (y, statistics), grads = run(ours)
  (flax_y, flax_statistics), flax_grads = run(flax_bn)
  assert y.dtype == dtype and grads[1].dtype == dtype
  chex.assert_trees_all_close((y, statistics), (flax_y, flax_statistics), rtol=1e-6, atol=1e-6)
  tolerance = 1e-5 if dtype == jnp.float32 else 1e-2  # bfloat16 dx: within one rounding
  chex.assert_trees_all_close(grads, flax_grads, rtol=tolerance, atol=tolerance)


def test_train_batch_norm_backward_keeps_no_full_size_temporary():
  # The normalised input is never an array of its own: XLA:CPU would write and read it back
  # in full for every norm (ResNet-50's train step: 1,065 → 726 MiB of temp memory).
  from resnet_jax.models.layers import batch_norm_train, select_relu
  x, weights = jnp.ones((8, 28, 28, 64)), jnp.ones((8, 28, 28, 64))

  def loss(x, scale, bias):
    return jnp.sum(select_relu(batch_norm_train(x, scale, bias, 1e-5, x.dtype)[0]) * weights)

  grads = jax.jit(jax.grad(loss, (0, 1, 2))).lower(x, jnp.ones(64), jnp.zeros(64)).compile()
  assert grads.memory_analysis().temp_size_in_bytes < 0.1 * x.nbytes


def test_an_unknown_layer_impl_names_the_choices():
  with pytest.raises(ValueError,
                     match="layer_impl='fast': must be one of auto, onednn, tuned, plain"):
    resnet_jax.create_model("resnet18", layer_impl="fast").init(jax.random.key(0),
                                                                jnp.ones((1, 32, 32, 3)))


@pytest.mark.parametrize("side", [9, 10])
def test_tuned_max_pool_equals_reduce_window_in_output_and_gradient(side):
  from resnet_jax.models.layers import max_pool_3x3_s2
  x = jax.nn.relu(jax.random.normal(jax.random.key(0), (2, side, side, 3)))
  for f in (lambda x, impl: max_pool_3x3_s2(x, impl),
            jax.grad(lambda x, impl: jnp.sum(max_pool_3x3_s2(x, impl)**2))):
    f = jax.jit(f, static_argnums=1)
    chex.assert_trees_all_equal(f(x, "tuned"), f(x, "plain"))


@pytest.mark.parametrize("kernel_size,padding", [(3, ((1, 1), (1, 1))), (3, ((0, 2), (2, 0))),
                                                 (5, ((2, 2), (1, 3))), (1, ((0, 0), (0, 0)))])
def test_conv_with_written_out_gradients_equals_xla_conv_in_output_and_gradients(kernel_size,
                                                                                 padding):
  from resnet_jax.models.layers import NHWC_HWIO, conv_with_canonical_grads
  x = jax.random.normal(jax.random.key(0), (2, 9, 7, 5))
  kernel = jax.random.normal(jax.random.key(1), (kernel_size, kernel_size, 5, 6))

  def loss(conv):
    return jax.jit(jax.value_and_grad(lambda x, k: jnp.sum(jnp.sin(conv(x, k))), (0, 1)))

  got = loss(lambda x, k: conv_with_canonical_grads(x, k, padding))(x, kernel)
  expected = loss(lambda x, k: jax.lax.conv_general_dilated(
      x, k, (1, 1), padding, dimension_numbers=NHWC_HWIO))(x, kernel)
  chex.assert_trees_all_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["tuned", "onednn"])
def test_tuned_cifar_resnet_equals_plain_layers_in_outputs_and_gradients(impl):
  # Option-A shortcuts, 16-channel convs and 3×3 stride-2 convs on even sides.
  tuned, plain = (resnet_jax.create_model("resnet8", width=4, num_classes=3, layer_impl=i)
                  for i in (impl, "plain"))
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
  variables = plain.init(jax.random.key(1), x)

  def outputs_and_grads(model):
    def loss(params):
      logits, updates = model.apply({**variables, "params": params}, x, train=True,
                                    mutable=["batch_stats"])
      return jnp.sum(logits**2), (logits, updates)
    return jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])

  chex.assert_trees_all_close(outputs_and_grads(tuned), outputs_and_grads(plain), rtol=1e-4,
                              atol=1e-5)
