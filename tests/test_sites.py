"""Each site's captured vectors equal a reference computed another way, in every mapped family.

References: `output_hidden_states` for the residual stream, a hand-written forward from the
block's own weights (float64) for the MLP and for GPT-2's attention, and this file's own
hooks for the other families' attention outputs, checked in turn by the residual sums
they must satisfy. Tiny models built from configs here, float32, offline.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import transformers

from memscan import sites
from memscan.errors import InputError, ModelError

B, T, VOCAB, WIDTH, FFN = 2, 7, 100, 32, 48
POSITIONS = torch.tensor([1, 4, 6])
CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(n_layer=2, n_embd=WIDTH, n_head=4, n_inner=FFN, n_positions=16),
    "neox-parallel": lambda: transformers.GPTNeoXConfig(num_hidden_layers=2, hidden_size=WIDTH, num_attention_heads=4,
                                                        intermediate_size=FFN, max_position_embeddings=16,
                                                        use_parallel_residual=True),
    "neox-sequential": lambda: transformers.GPTNeoXConfig(num_hidden_layers=2, hidden_size=WIDTH,
                                                          num_attention_heads=4, intermediate_size=FFN,
                                                          max_position_embeddings=16, use_parallel_residual=False),
    "llama": lambda: transformers.LlamaConfig(num_hidden_layers=2, hidden_size=WIDTH, num_attention_heads=4,
                                              num_key_value_heads=2, intermediate_size=FFN,
                                              max_position_embeddings=16),
    "mistral": lambda: transformers.MistralConfig(num_hidden_layers=2, hidden_size=WIDTH, num_attention_heads=4,
                                                  num_key_value_heads=2, intermediate_size=FFN,
                                                  max_position_embeddings=16),
    "opt": lambda: transformers.OPTConfig(num_hidden_layers=2, hidden_size=WIDTH, num_attention_heads=4, ffn_dim=FFN,
                                          max_position_embeddings=16, word_embed_proj_dim=WIDTH),
    "opt-post-ln": lambda: transformers.OPTConfig(num_hidden_layers=2, hidden_size=WIDTH, num_attention_heads=4,
                                                  ffn_dim=FFN, max_position_embeddings=16, word_embed_proj_dim=WIDTH,
                                                  do_layer_norm_before=False),
}
# Per family: the attention module (for this file's own hook), the final norm after the last block
# (None where there is none), and a module whose output `module:` is checked on.
MODULES = {
    "gpt2": ("transformer.h.{}.attn", "transformer.ln_f", "transformer.h.1.mlp.c_fc"),
    "gpt_neox": ("gpt_neox.layers.{}.attention", "gpt_neox.final_layer_norm", "gpt_neox.layers.1.mlp.dense_h_to_4h"),
    "llama": ("model.layers.{}.self_attn", "model.norm", "model.layers.1.mlp.gate_proj"),
    "mistral": ("model.layers.{}.self_attn", "model.norm", "model.layers.1.mlp.gate_proj"),
    "opt": ("model.decoder.layers.{}.self_attn", "model.decoder.final_layer_norm", "model.decoder.layers.1.fc1"),
}


def build(name: str) -> torch.nn.Module:
    """A 2-block float32 model in eval mode, weights drawn at unit-ish scale so errors are not hidden
    by HF's 0.02 init."""
    config = CONFIGS[name]()
    config.vocab_size = VOCAB
    config.bos_token_id = config.eos_token_id = config.pad_token_id = 0
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.3)
    return model


@pytest.fixture(scope="module", params=list(CONFIGS))
def family(request) -> tuple[torch.nn.Module, torch.Tensor]:
    """(model, token ids (B, T)) for each config."""
    model = build(request.param)
    torch.manual_seed(1)
    return model, torch.randint(1, VOCAB, (B, T))


@pytest.fixture(scope="module")
def gpt2() -> torch.nn.Module:
    return build("gpt2")


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual.double(), expected.double(), rtol=1e-5, atol=1e-5)


def captured(model: torch.nn.Module, spec: str, ids: torch.Tensor,
             positions: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    found = sites.parse(spec, model.config.num_hidden_layers, model)
    with torch.inference_mode(), sites.capture(model, found, positions) as got:
        model(input_ids=ids)
    return {site.label: value for site, value in zip(found, got.values())}


def hooked(model: torch.nn.Module, paths: list[str], ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Outputs of `paths` from plain forward hooks written here, (B, T, n), and the hidden states."""
    seen: dict[str, torch.Tensor] = {}

    def keep(path):
        def hook(module, args, output):
            value = output[0] if isinstance(output, tuple) else output
            seen[path] = value.detach().reshape(B, T, -1).clone()
        return hook

    handles = [model.get_submodule(path).register_forward_hook(keep(path)) for path in paths]
    try:
        with torch.inference_mode():
            seen["hidden"] = model(input_ids=ids, output_hidden_states=True).hidden_states
    finally:
        for handle in handles:
            handle.remove()
    return seen


# ---------------------------------------------------------------- hand-written references (float64)


def layer_norm(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    if module.__class__.__name__.endswith("RMSNorm"):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + module.variance_epsilon) * module.weight.double()
    weight = module.weight.double() if module.weight is not None else None
    bias = module.bias.double() if module.bias is not None else None
    return F.layer_norm(x, x.shape[-1:], weight, bias, module.eps)


def linear(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """nn.Linear (weight out x in) or GPT-2's Conv1D (weight in x out)."""
    weight = module.weight.double()
    y = x @ (weight if module.__class__.__name__ == "Conv1D" else weight.T)
    return y if module.bias is None else y + module.bias.double()


ACTIVATIONS = {
    "gelu_new": lambda x: 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3))),
    "gelu": lambda x: 0.5 * x * (1 + torch.erf(x / math.sqrt(2))),
    "silu": lambda x: x * torch.sigmoid(x),
    "relu": lambda x: x.clamp(min=0),
}


def mlp_by_hand(model: torch.nn.Module, block: int, resid_pre: torch.Tensor,
                resid_mid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mlp_hidden, mlp_out) of one block from its weights: act(fc(ln(x))) and its output projection."""
    config = model.config
    kind = config.model_type
    if kind == "gpt2":
        layer = model.transformer.h[block]
        hidden = ACTIVATIONS[config.activation_function](linear(layer.mlp.c_fc, layer_norm(layer.ln_2, resid_mid)))
        return hidden, linear(layer.mlp.c_proj, hidden)
    if kind == "gpt_neox":
        layer = model.gpt_neox.layers[block]
        source = resid_pre if config.use_parallel_residual else resid_mid
        hidden = ACTIVATIONS[config.hidden_act](linear(layer.mlp.dense_h_to_4h,
                                                       layer_norm(layer.post_attention_layernorm, source)))
        return hidden, linear(layer.mlp.dense_4h_to_h, hidden)
    if kind in ("llama", "mistral"):
        layer = model.model.layers[block]
        x = layer_norm(layer.post_attention_layernorm, resid_mid)
        hidden = ACTIVATIONS[config.hidden_act](linear(layer.mlp.gate_proj, x)) * linear(layer.mlp.up_proj, x)
        return hidden, linear(layer.mlp.down_proj, hidden)
    layer = model.model.decoder.layers[block]
    x = layer_norm(layer.final_layer_norm, resid_mid) if config.do_layer_norm_before else resid_mid
    hidden = ACTIVATIONS[config.activation_function](linear(layer.fc1, x))
    return hidden, linear(layer.fc2, hidden)


def gpt2_attention_by_hand(model: torch.nn.Module, block: int, resid_pre: torch.Tensor) -> torch.Tensor:
    """Causal multi-head attention of GPT-2 block `block` from c_attn and c_proj: (B, T, n)."""
    layer = model.transformer.h[block]
    heads = model.config.n_head
    q, k, v = linear(layer.attn.c_attn, layer_norm(layer.ln_1, resid_pre)).split(WIDTH, dim=-1)
    q, k, v = (t.reshape(B, T, heads, WIDTH // heads).transpose(1, 2) for t in (q, k, v))  # (B, h, T, d)
    scores = q @ k.transpose(-1, -2) / math.sqrt(WIDTH // heads)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    mixed = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, WIDTH)
    return linear(layer.attn.c_proj, mixed)


def references(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """`NAME:b` -> (B, T, n) float64 for every block site, computed without memscan.sites."""
    kind = model.config.model_type
    attention = MODULES[kind][0]
    blocks = model.config.num_hidden_layers
    seen = hooked(model, [attention.format(b) for b in range(blocks)], ids)
    hidden = [h.double() for h in seen["hidden"]]
    out: dict[str, torch.Tensor] = {}
    for b in range(blocks):
        resid_pre = hidden[b]
        attn = seen[attention.format(b)].double()
        if kind == "gpt2":
            close(attn, gpt2_attention_by_hand(model, b, resid_pre))
        resid_mid = resid_pre + attn
        if kind == "opt" and not model.config.do_layer_norm_before:
            resid_mid = layer_norm(model.model.decoder.layers[b].self_attn_layer_norm, resid_mid)
        mlp_hidden, mlp_out = mlp_by_hand(model, b, resid_pre, resid_mid)
        out |= {f"resid_pre:{b}": resid_pre, f"attn_out:{b}": attn, f"resid_mid:{b}": resid_mid,
                f"mlp_hidden:{b}": mlp_hidden, f"mlp_out:{b}": mlp_out}
    return out


def expected_resid_post(model: torch.nn.Module, refs: dict[str, torch.Tensor], block: int) -> torch.Tensor:
    """The block output the hand-written sums give: resid_mid + mlp_out (+ post-LN in OPT-350m),
    and resid_pre + attn_out + mlp_out for GPT-NeoX's parallel residual."""
    config = model.config
    if getattr(config, "use_parallel_residual", False):
        return refs[f"resid_pre:{block}"] + refs[f"attn_out:{block}"] + refs[f"mlp_out:{block}"]
    total = refs[f"resid_mid:{block}"] + refs[f"mlp_out:{block}"]
    if config.model_type == "opt" and not config.do_layer_norm_before:
        return layer_norm(model.model.decoder.layers[block].final_layer_norm, total)
    return total


# ---------------------------------------------------------------- values


def test_every_block_site_equals_its_reference(family):
    model, ids = family
    refs = references(model, ids)
    got = captured(model, ",".join(f"{site}:all" for site in sites.BLOCK_SITES), ids)
    assert len(got) == len(sites.BLOCK_SITES) * model.config.num_hidden_layers
    for label, expected in refs.items():
        close(got[label], expected)
    # The references themselves add up to the model's own block outputs.
    hidden = hooked(model, [], ids)["hidden"]
    close(got["resid_post:0"], hidden[1])
    close(hidden[1].double(), expected_resid_post(model, refs, 0))
    close(got["resid_post:1"].double(), expected_resid_post(model, refs, 1))


def test_resid_post_of_the_last_block_is_before_the_final_norm(family):
    """HF's last hidden state is the final norm of the last block's output (OPT-350m has no final norm)."""
    model, ids = family
    got = captured(model, "resid_post:-1", ids)["resid_post:1"]
    last = hooked(model, [], ids)["hidden"][-1]
    final_norm = MODULES[model.config.model_type][1]
    if model.config.model_type == "opt" and not model.config.do_layer_norm_before:
        close(got, last)
        return
    assert not torch.allclose(got, last, atol=1e-3)
    close(layer_norm(model.get_submodule(final_norm), got.double()), last)


def test_positions_are_taken_inside_the_hooks(family):
    model, ids = family
    spec = "resid_mid:0,mlp_hidden:1,attn_out:-1"
    whole = captured(model, spec, ids)
    some = captured(model, spec, ids, POSITIONS)
    for label, value in whole.items():
        assert some[label].shape == (B, len(POSITIONS), value.shape[-1])
        close(some[label], value[:, POSITIONS])
    assert whole["mlp_hidden:1"].shape[-1] == FFN


def test_module_path_equals_an_independent_hook(family):
    model, ids = family
    path = MODULES[model.config.model_type][2]
    got = captured(model, f"module:{path}", ids)[f"module:{path}"]
    close(got, hooked(model, [path], ids)[path])


# ---------------------------------------------------------------- hooks


def all_hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_hooks_are_removed_after_the_pass_and_after_an_error():
    model = build("gpt2")
    ids = torch.randint(1, VOCAB, (B, T))
    found = sites.parse("resid_pre:all,resid_mid:all,mlp_hidden:0,module:transformer.h.0.attn", 2, model)
    with sites.capture(model, found) as got:
        assert all_hooks(model) > 0
        model(input_ids=ids)
    assert all_hooks(model) == 0
    assert len(got.values()) == 6
    with pytest.raises(RuntimeError, match="boom"), sites.capture(model, found):
        raise RuntimeError("boom")
    assert all_hooks(model) == 0


def test_two_passes_in_one_capture_and_a_missing_pass_are_errors():
    model = build("gpt2")
    ids = torch.randint(1, VOCAB, (B, T))
    found = sites.parse("attn_out:0", 2, model)
    with pytest.raises(ModelError, match="ran twice"), sites.capture(model, found):
        model(input_ids=ids)
        model(input_ids=ids)
    assert all_hooks(model) == 0
    with sites.capture(model, found) as got:
        pass
    with pytest.raises(ModelError, match="did not run"):
        got.values()


def test_the_base_model_takes_paths_without_its_prefix():
    model = build("llama")
    ids = torch.randint(1, VOCAB, (B, T))
    [site] = sites.parse("mlp_hidden:1", 2, model.model)
    assert site.reads == (sites.Read("layers.1.mlp.down_proj", "input"),)
    with torch.inference_mode(), sites.capture(model.model, [site]) as got:
        model.model(input_ids=ids)
    close(got.values()[0], captured(model, "mlp_hidden:1", ids)["mlp_hidden:1"])


# ---------------------------------------------------------------- parsing


def test_parse_resolves_blocks_ranges_and_duplicates(gpt2):
    found = sites.parse("resid_post:all, attn_out:-1,resid_post:1,mlp_out:0-1,module:transformer.h.0.mlp.c_fc", 2,
                        gpt2)
    assert [s.label for s in found] == ["resid_post:0", "resid_post:1", "attn_out:1", "mlp_out:0", "mlp_out:1",
                                        "module:transformer.h.0.mlp.c_fc"]
    assert found[2].reads == (sites.Read("transformer.h.1.attn", "output"),)
    neox = sites.parse("resid_mid:0", 2, build("neox-parallel"))[0]
    assert neox.reads == (sites.Read("gpt_neox.layers.0", "input"),
                          sites.Read("gpt_neox.layers.0.post_attention_dropout", "output"))


@pytest.mark.parametrize("spec,words", [
    ("attn_outt:0", ["unknown site 'attn_outt'", "did you mean attn_out"]),
    ("attn_out:2", ["-2..1", "2 blocks", "got 2"]),
    ("attn_out:-3", ["-2..1", "got -3"]),
    ("attn_out:1-0", ["A <= B <= 1", "got 1-0"]),
    ("attn_out:0-2", ["A <= B <= 1", "got 0-2"]),
    ("attn_out:x", ["all, an index", "got 'x'"]),
    ("attn_out", ["needs blocks", "attn_out:all"]),
    ("resid_post:0,,attn_out:0", ["comma-separated"]),
    ("", ["comma-separated"]),
    ("module:transformer.h.0.mlp.c_fcc", ["names no module", "transformer.h.0.mlp.c_fc"]),
    ("module:", ["names no module"]),
])
def test_bad_specs_are_one_line_errors(gpt2, spec, words):
    with pytest.raises(InputError) as caught:
        sites.parse(spec, 2, gpt2)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("--sites")
    for word in words:
        assert word in message


# ---------------------------------------------------------------- a family without a table


@pytest.fixture(scope="module")
def gptj() -> torch.nn.Module:
    config = transformers.GPTJConfig(n_layer=2, n_embd=WIDTH, n_head=4, rotary_dim=4, n_positions=16,
                                     vocab_size=VOCAB, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def test_an_unknown_family_reads_the_residual_stream_and_modules(gptj):
    assert sites.family_of(gptj.config) is None
    ids = torch.randint(1, VOCAB, (B, T))
    got = captured(gptj, "resid_pre:all,resid_post:0,module:transformer.h.1.mlp.fc_in", ids)
    seen = hooked(gptj, ["transformer.h.1.mlp.fc_in"], ids)
    close(got["resid_pre:0"], seen["hidden"][0])
    close(got["resid_pre:1"], seen["hidden"][1])
    close(got["resid_post:0"], seen["hidden"][1])
    close(got["module:transformer.h.1.mlp.fc_in"], seen["transformer.h.1.mlp.fc_in"])


@pytest.mark.parametrize("name,candidates", [
    ("attn_out", ["module:transformer.h.0.attn"]),
    ("mlp_hidden", ["module:transformer.h.0.mlp.fc_in", "module:transformer.h.0.mlp.fc_out"]),
    ("resid_mid", ["module:transformer.h.0.ln_1"]),
])
def test_an_unknown_family_names_the_modules_a_site_could_mean(gptj, name, candidates):
    with pytest.raises(InputError) as caught:
        sites.parse(f"{name}:0", 2, gptj)
    message = str(caught.value)
    assert "\n" not in message
    assert "'gptj'" in message
    for candidate in candidates:
        assert candidate in message


def test_a_variant_lacking_a_tabled_module_is_a_one_line_error():
    model = build("llama")
    del model.model.layers[1].post_attention_layernorm
    sites.parse("resid_mid:0", 2, model)
    with pytest.raises(ModelError, match=r"reads resid_mid from module model\.layers\.1\.post_attention_layernorm"):
        sites.parse("resid_mid:all", 2, model)
