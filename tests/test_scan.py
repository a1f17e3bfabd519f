"""Scanned and rematerialised blocks: the same network as the unrolled model, in another layout.

`scan_blocks` and `remat` change how the program is built, never what it computes; the
converters of `models.scan` move weights between the two layouts, so weights files (always
unrolled) serve either model.
"""

import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax import create_model, pretrained
from resnet_jax.bench import benchmark_config
from resnet_jax.data import fake
from resnet_jax.models import scan
from resnet_jax.models.layers import drop_path
from resnet_jax.training import checkpointing, loop, optimizers
from resnet_jax.training.config import validate_config



def assert_close(actual, expected):
  """Equal up to float32 rounding: within 1e-5 of each value and of `expected`'s largest one
  (the layouts sum over blocks, batch and space in different orders)."""
  scale = max(float(np.max(np.abs(leaf))) for leaf in jax.tree.leaves(expected))
  chex.assert_trees_all_close(actual, expected, rtol=1e-5, atol=1e-5 * scale)


def images(size=16, batch=2):
  return jax.random.normal(jax.random.key(1), (batch, size, size, 3))


def abstract_variables(model, x):
  return jax.eval_shape(model.init, jax.random.key(0), x)


def random_variables(model, x):
  """Unrolled variables of `model`'s shapes, BatchNorm statistics included, drawn by NumPy
  (no initialiser programs to compile)."""
  rng = np.random.default_rng(0)

  def draw(path, leaf):
    name, shape = path[-1].key, leaf.shape
    if name == "kernel":
      return rng.normal(0, np.sqrt(2 / np.prod(shape[:-1])), shape).astype(np.float32)
    if name in ("scale", "var"):
      return rng.uniform(0.5, 1.5, shape).astype(np.float32)
    return rng.normal(0, 0.1, shape).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, abstract_variables(model, x))


@functools.partial(jax.jit, static_argnums=0)
def forward(model, variables, x):
  """Eval logits, train logits and the updated batch_stats."""
  logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
  return model.apply(variables, x), logits, updates["batch_stats"]


@functools.partial(jax.jit, static_argnums=0)
def outputs(model, variables, x):
  """Eval logits, train logits, the updated batch_stats and the gradients of a train loss."""

  def loss(params):
    logits, updates = model.apply({**variables, "params": params}, x, train=True,
                                  mutable=["batch_stats"])
    return jnp.sum(logits * jnp.arange(logits.shape[-1])), (logits, updates["batch_stats"])

  grads, (train_logits, batch_stats) = jax.grad(loss, has_aux=True)(variables["params"])
  return model.apply(variables, x), train_logits, batch_stats, grads


@pytest.fixture(scope="module")
def resnet20():
  """(unrolled model, its variables, images, its outputs)."""
  model, x = create_model("resnet20"), images()
  variables = random_variables(model, x)
  return model, variables, x, outputs(model, variables, x)


@pytest.mark.parametrize("fields", [
    dict(scan_blocks=True),
    dict(scan_blocks=True, remat=True, remat_policy="conv_outputs_saveable"),  # layer{i}_0 too
    pytest.param(dict(remat=True), marks=pytest.mark.slow),
], ids=str)
def test_scanned_and_rematted_resnet20_computes_what_the_unrolled_one_does(resnet20, fields):
  model, variables, x, (eval_logits, train_logits, batch_stats, grads) = resnet20
  variant = create_model("resnet20", **fields)
  converted = scan.in_layout_of(variables, abstract_variables(variant, x))
  got_eval, got_train, got_stats, got_grads = outputs(variant, converted, x)
  assert_close((got_eval, got_train), (eval_logits, train_logits))
  assert_close(scan.to_unrolled({"batch_stats": got_stats}), {"batch_stats": batch_stats})
  assert_close(scan.to_unrolled({"params": got_grads}), {"params": grads})


def test_scanned_bottleneck_blocks_compute_what_unrolled_ones_do():
  x = images(size=16)
  narrow = dict(width=8, num_classes=10, stage_sizes=(2, 3))  # resnet50's blocks, two stages
  unrolled = create_model("resnet50", **narrow)
  variables = random_variables(unrolled, x)
  expected_eval, expected_train, expected_stats = forward(unrolled, variables, x)
  scanned = create_model("resnet50", **narrow, scan_blocks=True)
  got_eval, got_train, got_stats = forward(scanned, scan.to_scanned(variables), x)
  assert_close((got_eval, got_train), (expected_eval, expected_train))
  assert_close(scan.to_unrolled({"batch_stats": got_stats}), {"batch_stats": expected_stats})


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's convolution layouts")
def test_every_convolution_of_a_scanned_gradient_is_in_the_layout_xla_cpu_runs_fast(resnet20):
  # XLA:CPU's fast convolutions take NHWC × HWIO → NHWC only; it rewrites autodiff's other
  # layouts outside loops but not inside them, where they ran as loop nests 30× slower.
  model, variables, x, _ = resnet20
  scanned = create_model("resnet20", scan_blocks=True)
  compiled = outputs.lower(scanned, scan.to_scanned(variables), x).compile().as_text()
  layouts = re.findall(r" convolution\(.*?dim_labels=([0-9a-z_>-]+)", compiled)
  assert len(layouts) >= 3 * 2 * 2  # forward, input and weight gradients, in and out of loops
  assert set(layouts) == {"b01f_01io->b01f"}


def test_scanned_model_stacks_each_stage_after_its_first_block():
  variables = jax.eval_shape(create_model("resnet20", scan_blocks=True).init,
                             jax.random.key(0), images())
  params, stats = variables["params"], variables["batch_stats"]
  assert sorted(k for k in params if k.startswith("layer")) == [
      "layer1_0", "layer1_scan", "layer2_0", "layer2_scan", "layer3_0", "layer3_scan"]
  assert params["layer2_scan"]["conv1"]["kernel"].shape == (2, 3, 3, 32, 32)
  assert stats["layer3_scan"]["bn2"]["mean"].shape == (2, 64)
  assert params["layer2_0"]["conv1"]["kernel"].shape == (3, 3, 16, 32)


def test_stages_of_one_or_two_blocks_are_not_looped():
  x, sizes = images(), dict(stage_sizes=(1, 2, 3))
  params = abstract_variables(create_model("resnet20", **sizes, scan_blocks=True), x)["params"]
  assert sorted(k for k in params if k.startswith("layer")) == [
      "layer1_0", "layer2_0", "layer2_1", "layer3_0", "layer3_scan"]
  unrolled = random_variables(create_model("resnet20", **sizes), x)
  chex.assert_trees_all_equal_shapes(scan.to_scanned(unrolled)["params"], params)


def test_converters_round_trip_and_give_the_scanned_models_layout(resnet20):
  _, variables, x, _ = resnet20
  scanned = scan.to_scanned(variables)
  chex.assert_trees_all_equal_shapes_and_dtypes(
      scanned, abstract_variables(create_model("resnet20", scan_blocks=True), x))
  chex.assert_trees_all_equal(scan.to_unrolled(scanned), variables)
  assert scan.is_scanned(scanned) and not scan.is_scanned(variables)
  chex.assert_trees_all_equal(scan.to_unrolled(variables), variables)  # stays unrolled


def test_converters_refuse_what_does_not_fit_their_layout(resnet20):
  _, variables, _, _ = resnet20
  with pytest.raises(ValueError, match="scanned layout already"):
    scan.to_scanned(scan.to_scanned(variables))
  params = dict(variables["params"])
  params["layer1_2"] = params["layer2_1"]  # 32 channels among 16-channel blocks
  with pytest.raises(ValueError, match=r"stage 1: layer1_2\['bn1'\]\['bias'\] has shape \(32,\)"):
    scan.to_scanned({"params": params})
  stacked = scan.to_scanned(variables)["params"]
  stacked["layer1_scan"] = {**stacked["layer1_scan"], "conv1": {"kernel": jnp.zeros((3, 3, 3,
                                                                                    16, 16))}}
  with pytest.raises(ValueError, match="layer1_scan does not hold stacked blocks"):
    scan.to_unrolled({"params": stacked})
  del params["layer1_1"]
  with pytest.raises(ValueError, match=r"blocks \[0, 2\]: they must be numbered layer1_0"):
    scan.to_scanned({"params": params})


def test_drop_path_rates_grow_linearly_over_all_blocks():
  rates = create_model("resnet20", drop_path_rate=0.4).drop_path_rates()
  np.testing.assert_allclose(rates, np.linspace(0.0, 0.4, 9))


def test_drop_path_with_a_traced_rate_draws_the_same_mask_as_a_static_one():
  class Holder:  # drop_path needs only make_rng
    make_rng = staticmethod(lambda name: jax.random.key(7))

  x = jnp.ones((64, 2, 2, 3))
  static = drop_path(Holder, x, 0.3, train=True)
  traced = jax.jit(lambda rate: drop_path(Holder, x, rate, train=True))(jnp.float32(0.3))
  chex.assert_trees_all_close(traced, static)
  assert 0 < int(jnp.sum(static[:, 0, 0, 0] == 0)) < 64


def test_scanned_drop_path_trains_stochastically_and_evaluates_as_unrolled(resnet20):
  _, variables, x, (eval_logits, *_) = resnet20
  model = create_model("resnet20", scan_blocks=True, drop_path_rate=0.5)

  @jax.jit
  def run(variables):
    train = [model.apply(variables, x, train=True, mutable=["batch_stats"],
                         rngs={"drop_path": jax.random.key(seed)})[0] for seed in (0, 1)]
    return model.apply(variables, x), *train

  got_eval, train_0, train_1 = run(scan.to_scanned(variables))
  assert_close(got_eval, eval_logits)
  assert not np.allclose(train_0, train_1)


def saved_residuals(model, x, capsys) -> str:
  """What the train-mode gradient of `model` on `x` keeps for its backward pass, as JAX lists it."""
  variables = random_variables(model, x)

  def loss(params):
    logits, _ = model.apply({**variables, "params": params}, x, train=True,
                            mutable=["batch_stats"])
    return jnp.sum(logits)

  capsys.readouterr()
  jax.ad_checkpoint.print_saved_residuals(loss, variables["params"])
  return capsys.readouterr().out


@pytest.mark.parametrize("layer_impl", ["tuned", "plain"])
def test_conv_outputs_saveable_keeps_each_conv_output_and_nothing_saveable_none(layer_impl,
                                                                               capsys):
  # One basic block (two convs) rematerialised; the stem stays outside remat.
  x = images(size=8)

  def saved_conv_outputs(policy):
    model = create_model("resnet20", width=4, stage_sizes=(1,), remat=True, remat_policy=policy,
                         layer_impl=layer_impl)
    return saved_residuals(model, x, capsys).count("named 'conv_output'")

  # Outside remat the stem's conv output may be kept too (the tuned BatchNorm keeps its input).
  outside_remat = saved_conv_outputs("nothing_saveable")
  assert outside_remat <= 1
  assert saved_conv_outputs("conv_outputs_saveable") == outside_remat + 2


def test_a_scanned_stage_reads_its_kernels_from_the_stacked_params_not_a_stacked_copy(capsys):
  # Every conv of the looped bottleneck blocks (1×1 ones included) keeps its kernel for the
  # backward pass as the parameter itself, so no kernel is stacked a second time per block.
  x = images(size=8)
  model = create_model("resnet50", width=4, stage_sizes=(3,), num_classes=3, scan_blocks=True,
                       layer_impl="tuned")
  saved = saved_residuals(model, x, capsys)
  for conv in ("conv1", "conv2", "conv3"):
    assert f"from the argument params['layer1_scan']['{conv}']['kernel']" in saved
  squeezed_1x1_kernels = re.findall(r"f32\[2,(?:16,4|4,16)\] output of scan", saved)
  assert not squeezed_1x1_kernels, saved


def test_an_unknown_remat_policy_is_named_with_the_choices():
  with pytest.raises(ValueError,
                     match="remat_policy='dots'.*nothing_saveable, conv_outputs_saveable"):
    abstract_variables(create_model("resnet20", remat=True, remat_policy="dots"), images())
  config = benchmark_config("resnet20", batch_size=8, image_size=8, dtype="float32")
  config.remat_policy = "dots"
  with pytest.raises(ValueError, match="config.remat_policy='dots'"):
    validate_config(config)


def test_scanned_blocks_refuse_per_variable_trust_ratios():
  config = benchmark_config("resnet20", batch_size=8, image_size=8, dtype="float32")
  config.scan_blocks, config.optimizer = True, "lars"
  with pytest.raises(ValueError, match="config.optimizer='lars'.*scan_blocks"):
    validate_config(config)


def test_stacked_norm_scales_get_no_weight_decay(resnet20):
  mask = optimizers.weight_decay_mask(scan.to_scanned(resnet20[1])["params"])
  assert mask["layer2_scan"]["conv1"]["kernel"] and mask["fc"]["kernel"]
  assert not mask["layer2_scan"]["bn1"]["scale"] and not mask["fc"]["bias"]


@pytest.fixture(scope="module")
def scanned_run(tmp_path_factory):
  """Unrolled weights on disk; a scanned run started from them, and its checkpoint."""
  root = tmp_path_factory.mktemp("scan")
  model = create_model("resnet20", num_classes=fake.NUM_CLASSES)
  weights = random_variables(model, images(size=8))
  info = pretrained.ModelInfo(model="resnet20", num_classes=fake.NUM_CLASSES, image_size=8)
  pretrained.save(str(root / "weights"), weights, info)
  config = benchmark_config("resnet20", batch_size=8, image_size=8, dtype="float32")
  config.scan_blocks, config.init_from = True, str(root / "weights")
  exp = loop.setup(config)
  manager = checkpointing.make_checkpoint_manager(str(root / "workdir"), 1, "eval/accuracy")
  checkpointing.save(manager, exp.initial_state, loop.data_position(exp, 0),
                     loop.model_info(exp).to_json())
  manager.wait_until_finished()
  return weights, exp, manager


def test_unrolled_weights_start_a_scanned_run_with_the_same_logits(scanned_run):
  weights, exp, _ = scanned_run
  variables = jax.device_get(exp.initial_state.variables)
  assert scan.is_scanned(variables)
  chex.assert_trees_all_equal(scan.to_unrolled(variables), weights)
  x = images(size=8)
  unrolled = create_model("resnet20", num_classes=fake.NUM_CLASSES)
  assert_close(jax.jit(exp.model.apply)(variables, x), jax.jit(unrolled.apply)(weights, x))


def test_a_scanned_runs_checkpoint_loads_unrolled_for_predict_and_export(scanned_run):
  weights, _, manager = scanned_run
  loaded = pretrained.load(str(manager.directory))
  chex.assert_trees_all_equal(loaded.variables, weights)


def test_resuming_with_another_scan_blocks_setting_is_a_clear_error(scanned_run):
  _, exp, manager = scanned_run
  state = exp.initial_state
  unrolled = scan.to_unrolled(state.variables)
  template = state.replace(params=unrolled["params"], batch_stats=unrolled["batch_stats"],
                           opt_state=state.tx.init(unrolled["params"]))
  with pytest.raises(ValueError, match="written with config.scan_blocks=True"):
    checkpointing.restore_latest(manager, template)
