"""Bottleneck adapters (Houlsby et al. 2019): identity at start, parameter formula, lorakit's own
folder format, no merge, clear config errors, and a falling loss through `lorakit train`."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_MODELS, tiny_batch, tiny_llama
from _method_runs import losses, make_workdir, run_method
from torch import nn

import lorakit
from lorakit.adapters import Bottleneck, apply, load_adapter, merge, save_adapter, trainable_parameters, unload
from lorakit.errors import AdapterError, ConfigError


def _perturb(model: nn.Module, seed: int = 1) -> None:
    """Give every adapter weight random values, so the adapter changes the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in (p for p in model.parameters() if p.requires_grad):
            param.copy_(torch.randn(param.shape, generator=generator) * 0.5)


@pytest.mark.parametrize("arch", sorted(TINY_MODELS))
@pytest.mark.parametrize("placement,per_layer", [("attention", 1), ("mlp", 1), ("both", 2)])
def test_starts_equal_to_base_and_counts_parameters(arch, placement, per_layer):
    base, ids = TINY_MODELS[arch](), tiny_batch()
    expected = base(input_ids=ids).logits
    model = apply(TINY_MODELS[arch](), Bottleneck(size=5, placement=placement, activation="gelu"))
    assert torch.equal(model(input_ids=ids).logits, expected)
    d, layers, size = model.config.hidden_size, model.config.num_hidden_layers, 5
    trainable, total = trainable_parameters(model)
    assert trainable == layers * per_layer * (2 * d * size + size + d)  # W_down, b_down, W_up, b_up
    assert total == sum(p.numel() for p in base.parameters()) + trainable
    _perturb(model)
    assert not torch.allclose(model(input_ids=ids).logits, expected, atol=1e-3)


def test_adapter_sits_after_the_sublayer_output():
    """The hook output equals y + W_up relu(W_down y + b) + b_up for the sub-block's own output y."""
    model = apply(tiny_llama(), Bottleneck(size=3, placement="mlp"))
    _perturb(model)
    mlp, seen = model.model.layers[0].mlp, {}
    mlp.down_proj.register_forward_hook(lambda module, args, out: seen.setdefault("y", out))
    hidden = torch.randn(2, 4, 32)
    adapter = mlp.lorakit_bottleneck
    out = mlp(hidden)
    y = seen["y"]  # (2, 4, 32): the MLP's own output, before the adapter
    assert torch.equal(out, y + adapter.up(torch.relu(adapter.down(y))))


def test_save_load_round_trip_in_lorakit_format(tmp_path):
    ids = tiny_batch()
    model = apply(tiny_llama(), Bottleneck(size=4, placement="both", activation="tanh"))
    _perturb(model)
    expected = model(input_ids=ids).logits
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path="tiny")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["lorakit_method"] == "bottleneck" and config["base_model_name_or_path"] == "tiny"
    assert config["config"] == {"size": 4, "placement": "both", "activation": "tanh", "init_scale": 0.01}
    loaded = load_adapter(tiny_llama(), tmp_path / "adapter")
    assert torch.equal(loaded(input_ids=ids).logits, expected)
    assert trainable_parameters(loaded) == trainable_parameters(model)


def test_load_refuses_weights_that_do_not_fit(tmp_path):
    save_adapter(apply(tiny_llama(), Bottleneck(size=4)), tmp_path / "adapter")
    wider = tiny_llama(hidden_size=48, intermediate_size=64)
    with pytest.raises(AdapterError, match=r"'model.layers.0.mlp.lorakit_bottleneck.down.weight' is \(4, 32\) "
                                           r"in the file but \(4, 48\) in the model"):
        load_adapter(wider, tmp_path / "adapter")
    assert lorakit.adapters.state.get_state(wider) is None  # left as it was: no adapter
    assert not hasattr(wider.model.layers[0].self_attn, "lorakit_bottleneck")


def test_merge_is_refused_and_unload_restores_the_base():
    ids = tiny_batch()
    expected = tiny_llama()(input_ids=ids).logits
    model = apply(tiny_llama(), Bottleneck(size=4))
    _perturb(model)
    with pytest.raises(AdapterError, match="bottleneck adapters cannot be merged"):
        merge(model)
    plain = unload(model)
    assert torch.equal(plain(input_ids=ids).logits, expected)
    assert not any("lorakit" in name for name, _ in plain.named_modules())
    apply(plain, lorakit.LoRA(r=2))  # the model is plain again: another adapter may go on


@pytest.mark.parametrize("fields,message", [
    ({"size": 0}, "method.size: must be > 0 (got 0)"),
    ({"size": -3}, "method.size: must be > 0 (got -3)"),
    ({"placement": "ffn"}, "method.placement: must be one of attention, mlp, both (got 'ffn')"),
    ({"activation": "swish"}, "method.activation: must be one of relu, gelu, silu, tanh (got 'swish')"),
])
def test_bad_configs_are_named(fields, message):
    with pytest.raises(ConfigError, match=f"^{message}$".replace("(", r"\(").replace(")", r"\)")):
        Bottleneck(**fields)


def test_model_without_decoder_sublayers_is_refused():
    model = nn.Sequential(nn.Linear(4, 4))
    model.config = type("Config", (), {"hidden_size": 4})()
    with pytest.raises(AdapterError, match="has no decoder layer with a attention sub-block named self_attn"):
        apply(model, Bottleneck(size=2))


def test_lorakit_train_with_method_bottleneck(tmp_path, one_thread):
    root = make_workdir(tmp_path)
    result = run_method(root, {"name": "bottleneck", "size": 8, "init_scale": 0.1}, steps=12, lr=5e-2)
    curve = losses(result.run_dir)  # full-batch steps on the same rows
    assert curve[-1] < curve[0] - 0.5
    assert "aux_loss" not in (result.run_dir / "metrics.jsonl").read_text()  # no auxiliary loss to log
    from lorakit.models import load_model

    reloaded = load_adapter(load_model(str(root / "base")), result.output)
    ids = tiny_batch(length=6)
    result.model.eval()
    assert torch.equal(reloaded(input_ids=ids).logits, result.model(input_ids=ids).logits)


def test_parameter_report_groups_the_adapters():
    model = apply(tiny_llama(), Bottleneck(size=4, placement="mlp"))
    rows = {line[:28].strip(): line[28:].split() for line in lorakit.parameter_report(model).splitlines()[2:]}
    assert rows["bottleneck adapter"] == ["4", "584", "584"]  # down + up in 2 layers: 2 x (2*32*4 + 4 + 32)
    assert rows["Linear"][1] == "0"


def test_unknown_lorakit_method_in_a_folder_is_named(tmp_path):
    folder = save_adapter(apply(tiny_llama(), Bottleneck(size=2)), tmp_path / "adapter")
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "lorakit_method": "bottelneck"}))
    with pytest.raises(AdapterError, match="lorakit_method 'bottelneck' has no folder loader; lorakit's own folders "
                                           "hold one of: bottleneck, modality, mole"):
        load_adapter(tiny_llama(), folder)
