"""LoRA: our adapters equal transformers + peft, and one batch serves base and adapter requests side by side."""

import json
import os
from pathlib import Path

import pytest
import torch

from ossrun.engine.engine import Engine, EngineOptions
from ossrun.engine.errors import UnknownAdapterError
from ossrun.engine.request import Request, SamplingParams
from ossrun.model.attention import DenseAttention, PagedAttention, PagedGroup, paged_kernel
from ossrun.model.checkpoint import load_checkpoint
from ossrun.model.gpt_oss import GptOss
from ossrun.model.lora import AdapterError, LoraBatch, load_peft_adapter, write_random_adapter
from ossrun.model.safetensors_io import TensorSpec, open_mmap, write_streaming
from tests.conftest import load_hf_reference


@pytest.fixture(scope="module")
def model(checkpoints):
    return GptOss.from_checkpoint(load_checkpoint(checkpoints["hf"]), torch.float32)


@pytest.fixture(scope="module")
def adapters(model, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {
        "one": write_random_adapter(model.config, root / "one", rank=8, seed=1),
        "two": write_random_adapter(model.config, root / "two", rank=4, seed=2, targets=("q_proj", "v_proj")),
    }


def logits(model, ids, lora=None):
    positions = torch.arange(len(ids))
    return model(ids, positions, DenseAttention(torch.zeros(len(ids), dtype=torch.long), positions), lora=lora)


@pytest.mark.parametrize("name", ["one", "two"])
def test_logits_equal_transformers_with_peft(model, adapters, checkpoints, name):
    from peft import PeftModel

    ids = torch.randint(0, 201088, (160,), generator=torch.Generator().manual_seed(5))
    adapter = load_peft_adapter(adapters[name], model.config, name)
    ours = logits(model, ids, LoraBatch([(torch.arange(len(ids)), adapter)]))
    reference = PeftModel.from_pretrained(load_hf_reference(checkpoints["hf"]), adapters[name]).eval()
    with torch.no_grad():
        expected = reference(ids[None]).logits[0]
    assert torch.allclose(ours, expected, atol=1e-4, rtol=0), (ours - expected).abs().max()
    assert not torch.allclose(ours, logits(model, ids), atol=1e-2)  # the adapter does change the output


def test_an_all_linear_adapter_saved_by_peft_equals_peft(model, checkpoints, tmp_path):
    """Hunt round 19 C-F3. PEFT saves `target_modules="all-linear"` as the full module paths it matched
    (`model.layers.0.self_attn.k_proj`, ...): it was refused, the message calling q_proj "not supported"."""
    from peft import LoraConfig, PeftModel, get_peft_model

    torch.manual_seed(3)
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, lora_dropout=0.0)
    get_peft_model(load_hf_reference(checkpoints["hf"]), peft_config).save_pretrained(tmp_path / "all")
    assert "model.layers.0.self_attn.k_proj" in json.loads((tmp_path / "all" / "adapter_config.json").read_text())["target_modules"]
    ids = torch.randint(0, 201088, (40,), generator=torch.Generator().manual_seed(5))
    adapter = load_peft_adapter(tmp_path / "all", model.config, "all")
    ours = logits(model, ids, LoraBatch([(torch.arange(len(ids)), adapter)]))
    reference = PeftModel.from_pretrained(load_hf_reference(checkpoints["hf"]), tmp_path / "all").eval()
    with torch.no_grad():
        expected = reference(ids[None]).logits[0]
    assert torch.allclose(ours, expected, atol=1e-4, rtol=0), (ours - expected).abs().max()


@pytest.mark.parametrize("targets", [
    "all-linear", "ALL-Linear", r".*\.(q_proj|k_proj|v_proj|o_proj)", r"model\.layers\.\d+\.self_attn\.[qkvo]_proj",
    ["self_attn.q_proj", "k_proj", "model.layers.0.self_attn.v_proj", "v_proj", "o_proj"],
])
def test_target_modules_are_matched_as_peft_matches_them(model, adapters, tmp_path, targets):
    """Hunt round 19 C-F3: a list entry names a module by its full path or by a dotted tail of it, a string is a
    regular expression over the full path (PEFT's `check_target_module_exists`), "all-linear" the linear layers."""
    import shutil

    shutil.copytree(adapters["one"], tmp_path / "a")
    settings = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**settings, "target_modules": targets}))
    loaded = load_peft_adapter(tmp_path / "a", model.config, "a")
    plain = load_peft_adapter(adapters["one"], model.config, "one")
    assert loaded.weights.keys() == plain.weights.keys() and loaded.scaling == plain.scaling


@pytest.mark.parametrize("targets, message", [
    (["q_proj", "router"], r"target_modules matches modules we do not adapt: mlp\.router \(only q_proj"),
    (["q_proj", "lm_head"], r"target_modules matches modules we do not adapt: lm_head \("),
    (r".*mlp.*", r"target_modules matches modules we do not adapt: mlp, mlp\.experts, mlp\.router \("),
    (["q_proj", "gate_up_proj"], r"target_modules \['gate_up_proj'\] name no module of the model"),
    (r"nothing", r"target_modules 'nothing' matches no module of the model"),
    (r"(", r"target_modules '\(' is not a regular expression"),
])
def test_target_modules_we_do_not_adapt_are_named(model, adapters, tmp_path, targets, message):
    import shutil

    shutil.copytree(adapters["one"], tmp_path / "a")
    settings = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**settings, "target_modules": targets}))
    with pytest.raises(AdapterError, match=message):
        load_peft_adapter(tmp_path / "a", model.config, "a")


def _edited(source: Path, out: Path, settings: dict, layers: set[int] | None = None) -> Path:
    """A copy of the adapter at `source` with its config updated by `settings`, and only `layers`' tensors."""
    import shutil

    shutil.copytree(source, out)
    config = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**config, **settings}))
    if layers is not None:
        values = {k: v.clone() for k, v in open_mmap(source / "adapter_model.safetensors").items()
                  if int(k.split(".layers.")[1].split(".")[0]) in layers}
        write_streaming(out / "adapter_model.safetensors", [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in values.items()],
                        lambda spec: values[spec.name])
    return out


@pytest.mark.parametrize("adapter, settings, message", [
    ("one", {"target_modules": ["q_proj"]}, "adapts layer 0 k_proj, layer 0 o_proj, .* which adapter_config.json does not target"),
    ("one", {"layers_to_transform": [0]}, "adapts layer 1 k_proj, .* which adapter_config.json does not target"),
    ("one", {"layers_to_transform": 1}, "adapts layer 0 k_proj, .* which adapter_config.json does not target"),
    ("one", {"layers_to_transform": [0], "layers_pattern": "layers"}, "adapts layer 1 k_proj"),
    ("one", {"exclude_modules": ["q_proj"]}, "adapts layer 0 q_proj, layer 1 q_proj, .* which adapter_config.json does not target"),
    ("one", {"exclude_modules": r".*\.3\..*"}, "adapts layer 3 k_proj"),
    ("two", {"target_modules": ["q_proj", "k_proj", "v_proj"]}, "targets layer 0 k_proj, .* which adapter_model.safetensors has no tensors for"),
])
def test_a_config_and_tensors_that_disagree_on_the_modules_are_not_a_pair(model, adapters, tmp_path, adapter, settings, message):
    """Hunt round 19 C-F4. Before: every tensor was applied whatever the config targets (PEFT follows the config, so
    answers differed). Now a disagreement is told as a pair mismatch (each file may fit another partner)."""
    from ossrun.model.lora import AdapterPairMismatch

    with pytest.raises(AdapterPairMismatch, match=message):
        load_peft_adapter(_edited(adapters[adapter], tmp_path / "a", settings), model.config, "a")


@pytest.mark.parametrize("settings, layers", [
    ({"layers_to_transform": [0, 2]}, {0, 2}),
    ({"layers_to_transform": 3, "layers_pattern": "layers"}, {3}),
    ({"target_modules": ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.v_proj",
                         "model.layers.1.self_attn.o_proj"], "layers_to_transform": [0]}, {1}),  # PEFT: a full path is exact
    ({"exclude_modules": ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "layers.0.self_attn.v_proj",
                          "0.self_attn.o_proj"]}, {1, 2, 3}),
])
def test_a_config_that_limits_its_layers_fits_the_tensors_of_those(model, adapters, tmp_path, settings, layers):
    adapter = load_peft_adapter(_edited(adapters["one"], tmp_path / "a", settings, layers), model.config, "a")
    assert set(adapter.weights) == layers


@pytest.mark.parametrize("settings, message", [
    ({"lora_bias": True}, "lora_bias"),
    ({"layer_replication": [[0, 2], [1, 4]]}, "layer_replication"),
    ({"target_parameters": ["mlp.experts.gate_up_proj"]}, "target_parameters"),
    ({"layers_to_transform": "0"}, "layers_to_transform must be"),
    ({"layers_to_transform": [0.0]}, "layers_to_transform must be"),
    ({"layers_pattern": 3, "layers_to_transform": [0]}, "layers_pattern must be"),
    ({"exclude_modules": 5}, "exclude_modules must be"),
    ({"exclude_modules": "("}, "exclude_modules '\\(' is not a regular expression"),
    ({"layers_to_transform": [0], "layers_pattern": ["blocks"]}, "targets no module"),
    ({"layers_to_transform": [0], "layers_pattern": "("}, "layers_pattern '\\(' is not a regular expression"),
])
def test_settings_that_change_where_the_lora_applies_are_checked(model, adapters, tmp_path, settings, message):
    with pytest.raises(AdapterError, match=message):
        load_peft_adapter(_edited(adapters["one"], tmp_path / "a", settings), model.config, "a")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("settings, key", [
    ({"target_modules": "(.*)*x"}, "target_modules"),
    ({"exclude_modules": "(.|.)*x"}, "exclude_modules"),
    ({"layers_to_transform": [0], "layers_pattern": "(.*)*x"}, "layers_pattern"),
])
def test_a_regular_expression_that_backtracks_without_end_is_refused_in_seconds(model, adapters, tmp_path, settings, key):
    """A config's regular expression is the uploader's: `(.*)*x` against a 31-character module name backtracks for
    minutes in Python's `re`, holding the GIL (one upload froze the server). It is matched in a child process with
    a deadline and refused by name."""
    import time

    start = time.monotonic()
    with pytest.raises(AdapterError, match=rf"{key} .* did not finish matching the model's \d+ module names in 5 s"):
        load_peft_adapter(_edited(adapters["one"], tmp_path / "a", settings), model.config, "a")
    assert time.monotonic() - start < 30


def test_mixed_batch_equals_each_request_alone(model, adapters):
    def engine():
        e = Engine(model, EngineOptions(kv_dtype=torch.float32, kv_cache_bytes=32 * 1024**2, max_model_len=2048, max_tokens_per_step=128))
        e.adapters.register("one", adapters["one"])
        e.adapters.register("two", adapters["two"])
        return e

    prompt = list(range(500, 540))  # the same prompt: only the adapter differs
    requests = [Request(f"r{i}", prompt, SamplingParams(max_tokens=8, temperature=0), lora=lora)
                for i, lora in enumerate([None, "one", "two", None, "two", "one"])]
    together = engine().generate(requests)
    outputs = {}
    for request in requests:
        alone = engine().generate([Request(request.request_id, request.prompt_token_ids, request.params, lora=request.lora)])
        got = [e.token_id for e in together[request.request_id]]
        assert got == [e.token_id for e in alone[request.request_id]], request.lora
        outputs[request.lora] = got
    assert len({tuple(v) for v in outputs.values()}) == 3  # base, one and two really differ


@pytest.fixture(scope="module")
def fast_model(checkpoints):
    model = GptOss.from_checkpoint(load_checkpoint(checkpoints["hf"]), torch.float32, precision="fast")
    if model.native is None:
        pytest.skip("no C compiler: the fast precision's native blocks are not built")
    return model


def zero_b_copy(source, out):
    """The adapter at `source` with every lora_B zeroed: it must compute exactly what the base model does."""
    import shutil

    out.mkdir()
    shutil.copy(source / "adapter_config.json", out / "adapter_config.json")
    values = {k: torch.zeros_like(t) if ".lora_B." in k else t for k, t in open_mmap(source / "adapter_model.safetensors").items()}
    specs = [TensorSpec(k, t.dtype, tuple(t.shape)) for k, t in values.items()]
    write_streaming(out / "adapter_model.safetensors", specs, lambda spec: values[spec.name])
    return out


def paged_prefill(model, prompts, adapters):
    """One step prefilling `prompts` side by side over a fresh fp32 paged cache, through the attention kernel of the
    model's precision → each prompt's logits. `adapters[i]`: prompt i's LoraAdapter, or None for the base model."""
    c, size = model.config, 16
    lens = [len(p) for p in prompts]
    widths = [(n + size - 1) // size for n in lens]
    caches = [tuple(torch.zeros(1 + sum(widths), size, c.num_key_value_heads, c.head_dim) for _ in "kv") for _ in model.blocks]
    firsts = torch.tensor([0, *widths]).cumsum(0)[:-1] + 1  # block 0 is the null block
    tables = torch.tensor([[f + i if i < w else 0 for i in range(max(widths))] for f, w in zip(firsts.tolist(), widths)])
    positions = torch.cat([torch.arange(n) for n in lens])
    seq = torch.cat([torch.full((n,), i) for i, n in enumerate(lens)])
    group = PagedGroup(tables[seq, positions // size] * size + positions % size, tables, torch.zeros(len(lens), dtype=torch.long),
                       torch.tensor(lens))
    starts = [sum(lens[:i]) for i in range(len(lens))]
    attention = PagedAttention(caches, size, {"full": group, "sliding": group}, starts, lens, positions,
                               kernel=paged_kernel(model.device, model.precision))
    attention.prepare()
    groups = [(torch.arange(start, start + n), adapter) for start, n, adapter in zip(starts, lens, adapters) if adapter is not None]
    ids = torch.tensor([t for p in prompts for t in p])
    return model(ids, positions, attention, lora=LoraBatch(groups) if groups else None).split(lens)


def test_fast_base_rows_ignore_adapter_rows_and_a_zero_adapter_is_the_base(fast_model, adapters, tmp_path):
    """fast precision on the CPU: a base prompt's logits are the same, bit for bit, alone and beside an adapter's
    prompt in one step, and an adapter whose B matrices are zero gives the base model's logits. (A step with an
    adapter row used to leave the native blocks for the modules: other arithmetic for every row of it.)"""
    c, dtype = fast_model.config, torch.float32
    one = load_peft_adapter(adapters["one"], c, "one", dtype)
    zero = load_peft_adapter(zero_b_copy(adapters["one"], tmp_path / "zero"), c, "zero", dtype)
    base, other = list(range(500, 540)), list(range(700, 730))
    (alone,) = paged_prefill(fast_model, [base], [None])
    beside, with_one = paged_prefill(fast_model, [base, other], [None, one])
    assert torch.equal(beside, alone)
    assert torch.equal(paged_prefill(fast_model, [base], [zero])[0], alone)
    assert not torch.allclose(with_one, paged_prefill(fast_model, [other], [None])[0], atol=1e-2)  # the adapter does act


def test_adapters_do_not_share_prefix_cache_entries(model, adapters):
    e = Engine(model, EngineOptions(kv_dtype=torch.float32, kv_cache_bytes=32 * 1024**2, max_model_len=2048))
    e.adapters.register("one", adapters["one"])
    prompt = list(range(100, 180))
    e.generate([Request("a", prompt, SamplingParams(max_tokens=2, temperature=0))])
    with_adapter = e.generate([Request("b", prompt, SamplingParams(max_tokens=2, temperature=0), lora="one")])["b"]
    assert with_adapter[-1].num_cached_tokens == 0


def test_unknown_adapter_is_rejected_up_front(model):
    e = Engine(model, EngineOptions(kv_cache_bytes=32 * 1024**2, max_model_len=2048))
    with pytest.raises(UnknownAdapterError):
        e.add(Request("x", [1, 2, 3], SamplingParams(max_tokens=2), lora="nope"))


def test_eviction_under_budget_reloads_on_demand(model, adapters):
    e = Engine(model, EngineOptions(kv_dtype=torch.float32, kv_cache_bytes=32 * 1024**2, max_model_len=2048, adapter_budget_bytes=1))
    e.adapters.register("one", adapters["one"])
    e.adapters.register("two", adapters["two"])
    assert e.adapters.loaded_names == ["two"]  # over budget: only the pinned newest stays
    out = e.generate([Request("x", [1, 2, 3], SamplingParams(max_tokens=3, temperature=0), lora="one")])["x"]
    assert len(out) == 3 and e.adapters.loaded_names == ["one"]


def test_a_loaded_adapter_holds_its_weights_in_memory(model, adapters, tmp_path):
    """Hunt round 19 C-F1. Before: its tensors were views of a private map of the file, whose pages not yet
    written show the file's later contents: a rewrite in place changed the loaded adapter."""
    import shutil

    folder = tmp_path / "live"
    shutil.copytree(adapters["one"], folder)
    adapter = load_peft_adapter(folder, model.config, "live")
    before = {(layer, target): (a.clone(), b.clone()) for layer, pairs in adapter.weights.items() for target, (a, b) in pairs.items()}
    other = write_random_adapter(model.config, tmp_path / "other", rank=8, seed=9)  # the same size, other numbers
    with open(folder / "adapter_model.safetensors", "wb") as f:
        f.write((other / "adapter_model.safetensors").read_bytes())
    for layer, pairs in adapter.weights.items():
        for target, (a, b) in pairs.items():
            assert torch.equal(a, before[layer, target][0]) and torch.equal(b, before[layer, target][1])


def test_a_resident_adapter_is_never_evicted_nor_read_again(model, adapters, tmp_path):
    """Hunt round 19 C-F1. A `--lora` adapter lives in the operator's folder, which may change while the server runs:
    evicted and read again under the same version, it came back with other weights (and the old version's cached
    KV). Registered `resident`, it stays in memory until it is replaced, whatever the budget."""
    import shutil

    folder = tmp_path / "live"
    shutil.copytree(adapters["one"], folder)
    params = SamplingParams(max_tokens=6, temperature=0)
    e = Engine(model, EngineOptions(kv_dtype=torch.float32, kv_cache_bytes=32 * 1024**2, max_model_len=2048, adapter_budget_bytes=1))
    e.adapters.register("live", folder, resident=True)
    want = [ev.token_id for ev in e.generate([Request("a", [5, 6, 7], params, lora="live")])["a"]]
    e.adapters.register("two", adapters["two"])  # over budget: only what may be read again goes
    assert e.adapters.loaded_names == ["live", "two"]
    shutil.copyfile(adapters["two"] / "adapter_config.json", folder / "adapter_config.json")
    shutil.copyfile(adapters["two"] / "adapter_model.safetensors", folder / "adapter_model.safetensors")
    assert [ev.token_id for ev in e.generate([Request("b", [5, 6, 7], params, lora="live")])["b"]] == want


@pytest.mark.parametrize("change, message", [
    ({"r": 64}, "over the maximum of 32"),
    ({"use_dora": True}, "DoRA"),
    # hunt round 19 C-F2: an activated LoRA applies only from its invocation tokens on; it was served on every token
    ({"alora_invocation_tokens": [200006, 173781]}, "alora_invocation_tokens"),
    ({"kasa_config": {"init_method": "svd"}}, "kasa_config"),
    ({"use_bdlora": {"nblocks": 2}}, "use_bdlora"),
])
def test_bad_adapters_are_explained(model, adapters, tmp_path, change, message):
    import shutil

    shutil.copytree(adapters["one"], tmp_path / "bad")
    settings = json.loads((tmp_path / "bad" / "adapter_config.json").read_text())
    settings.update(change)
    (tmp_path / "bad" / "adapter_config.json").write_text(json.dumps(settings))
    with pytest.raises(AdapterError, match=message):
        load_peft_adapter(tmp_path / "bad", model.config, "bad")


def test_missing_adapter_file_is_explained(model, adapters, tmp_path):
    import shutil

    shutil.copytree(adapters["one"], tmp_path / "half")
    (tmp_path / "half" / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match="adapter_model.safetensors"):
        load_peft_adapter(tmp_path / "half", model.config, "half")


def _finish(e: Engine, request_id: str, events: list) -> list[int]:
    while e.has_work:
        events.extend(ev for ev in e.step() if ev.request_id == request_id)
    return [ev.token_id for ev in events if ev.token_id is not None]


def test_a_reregistered_adapter_gets_its_own_kv_and_running_requests_keep_their_version(model, adapters, tmp_path):
    """Registering a name again (a fine-tune's re-upload) makes a new version: a prefix cached under the old weights
    is not reused (a 32-token hit gave an answer of neither adapter), and a request already running finishes with
    the version it started with (it switched mid-answer)."""
    other = write_random_adapter(model.config, tmp_path / "other", rank=8, seed=9)

    def engine():
        return Engine(model, EngineOptions(kv_dtype=torch.float32, kv_cache_bytes=32 * 1024**2, max_model_len=2048))

    def alone(path) -> list[int]:
        e = engine()
        e.adapters.register("ft", path)
        return [ev.token_id for ev in e.generate([Request("x", prompt, params, lora="ft")])["x"]]

    prompt, params = list(range(300, 350)), SamplingParams(max_tokens=12, temperature=0)
    old, new = alone(adapters["one"]), alone(other)
    assert old != new

    e = engine()
    e.adapters.register("ft", adapters["one"])
    assert [ev.token_id for ev in e.generate([Request("a", prompt, params, lora="ft")])["a"]] == old
    e.add(Request("b", prompt, params, lora="ft"))  # starts on the old version (its prefix cached)...
    events = e.step() + e.step()
    e.adapters.register("ft", other)  # ...which is replaced mid-answer
    assert _finish(e, "b", events) == old
    after = e.generate([Request("c", prompt, params, lora="ft")])["c"]
    assert after[-1].num_cached_tokens == 0 and [ev.token_id for ev in after] == new
    assert e.adapters.loaded_names == ["ft"] and len(e.adapters._loaded) == 1  # the old version went with its last request


def test_an_old_version_evicted_before_it_is_replaced_still_serves_its_requests(model, adapters, tmp_path):
    """A waiting request's version may have been evicted (budget); its files are about to be replaced, so the
    registry loads it back before they are."""
    import shutil

    folder = tmp_path / "ft"
    shutil.copytree(adapters["one"], folder)
    other = write_random_adapter(model.config, tmp_path / "other", rank=8, seed=9)
    params = SamplingParams(max_tokens=6, temperature=0)
    reference = Engine(model, EngineOptions(kv_dtype=torch.float32, kv_cache_bytes=32 * 1024**2, max_model_len=2048))
    reference.adapters.register("ft", adapters["one"])
    want = [ev.token_id for ev in reference.generate([Request("x", [5, 6, 7], params, lora="ft")])["x"]]

    e = Engine(model, EngineOptions(kv_dtype=torch.float32, kv_cache_bytes=32 * 1024**2, max_model_len=2048, adapter_budget_bytes=1))
    e.adapters.register("ft", folder)
    e.add(Request("x", [5, 6, 7], params, lora="ft"))
    e.adapters.register("two", adapters["two"])  # over budget: "ft" is evicted before any step ran it

    def install() -> Path:
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            os.replace(tmp_path / "other" / name, folder / name)
        return folder

    e.adapters.register("ft", tmp_path / "other", install)
    assert _finish(e, "x", []) == want


@pytest.mark.parametrize("settings, tensors, message", [
    ({}, {"nan_in": "B"}, "NaN or infinite"),
    ({}, {"inf_in": "A"}, "NaN or infinite"),
    ({"lora_alpha": float("nan")}, {}, "lora_alpha must be a number"),
    ({"lora_alpha": 1e308}, {}, "lora_alpha must be a number"),
    ({"lora_alpha": "16"}, {}, "lora_alpha must be a number"),
    ({"lora_alpha": None}, {}, "lora_alpha must be a number"),
    ({"lora_alpha": [16]}, {}, "lora_alpha must be a number"),
    ({"r": True}, {}, "integer r"),
    ({"target_modules": 5}, {}, "target_modules must be a list"),
    ({"target_modules": {"q_proj": 1}}, {}, "target_modules must be a list"),
    ({"use_rslora": "yes"}, {}, "use_rslora must be true or false"),
    ({"modules_to_save": ["lm_head"]}, {}, "modules_to_save"),
    ({}, {"dtype": torch.int8}, "adapters hold F32, F16 or BF16"),
    ({}, {"dtype": torch.bool}, "adapters hold F32, F16 or BF16"),
    ({}, {"raw": b"\xff" * 8 + b"{}"}, "header length"),
    ({}, {"f64": True}, "dtype 'F64'"),
])
def test_unusable_adapter_values_are_explained(model, adapters, tmp_path, settings, tensors, message):
    """Non-finite numbers gave NaN answers (and 500s, and bare NaN in streams); wrong types gave Python's own error
    text, or were taken silently (`r: true` as rank 1, int8 tensors cast, `modules_to_save` ignored)."""
    import shutil

    from ossrun.model.safetensors_io import open_mmap, write_streaming, TensorSpec

    bad = tmp_path / "bad"
    shutil.copytree(adapters["one"], bad)
    config = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**config, **settings}))
    values = {k: v.clone() for k, v in open_mmap(adapters["one"] / "adapter_model.safetensors").items()}
    first = next(k for k in values if k.endswith("lora_A.weight"))
    if "nan_in" in tensors or "inf_in" in tensors:
        half = tensors.get("nan_in") or tensors["inf_in"]
        key = first.replace("lora_A", f"lora_{half}")
        values[key][0, 0] = float("nan") if "nan_in" in tensors else float("inf")
    if "dtype" in tensors:
        values = {k: v.to(tensors["dtype"]) for k, v in values.items()}
    specs = [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in values.items()]
    write_streaming(bad / "adapter_model.safetensors", specs, lambda spec: values[spec.name])
    if "raw" in tensors:
        (bad / "adapter_model.safetensors").write_bytes(tensors["raw"])
    if "f64" in tensors:
        raw = (bad / "adapter_model.safetensors").read_bytes().replace(b'"F32"', b'"F64"', 1)
        (bad / "adapter_model.safetensors").write_bytes(raw)
    with pytest.raises(AdapterError, match=message):
        load_peft_adapter(bad, model.config, "bad")


def test_lora_alpha_defaults_as_in_peft_and_a_rank_mismatch_is_told_apart(model, adapters, tmp_path):
    """PEFT's `LoraConfig.lora_alpha` defaults to 8 (it was taken as r); a config whose r is not the tensors' rank
    raises `AdapterPairMismatch` (each file is fine alone: a fine-tune changing rank has sent one of the two)."""
    import shutil

    from ossrun.model.lora import AdapterPairMismatch

    folder = tmp_path / "a"
    shutil.copytree(adapters["two"], folder)  # rank 4
    config = json.loads((folder / "adapter_config.json").read_text())
    del config["lora_alpha"]
    (folder / "adapter_config.json").write_text(json.dumps(config))
    assert load_peft_adapter(folder, model.config, "a").scaling == 8 / 4
    (folder / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))
    with pytest.raises(AdapterPairMismatch, match="r=8 but the tensors of adapter_model.safetensors have rank 4"):
        load_peft_adapter(folder, model.config, "a")
