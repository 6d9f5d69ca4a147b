"""The model against Hugging Face transformers' GptOssForCausalLM on the same random checkpoints, in float32."""

import json

import pytest
import torch
from safetensors import safe_open

import ossrun.model.gpt_oss as gpt_oss
from ossrun.model.attention import DenseAttention
from ossrun.model.checkpoint import load_checkpoint
from ossrun.model.config import ModelConfig, yarn_parameters
from ossrun.model.gpt_oss import GptOss
from tests.conftest import load_hf_reference

ATOL = 1e-4


def dense_logits(model: GptOss, ids: torch.Tensor) -> torch.Tensor:
    """Logits of one whole sequence on the model's device, back on the CPU."""
    ids = ids.to(model.device)
    positions = torch.arange(len(ids), device=model.device)
    return model(ids, positions, DenseAttention(torch.zeros_like(positions), positions)).cpu()


def random_ids(n: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def ours(checkpoints, device):
    return {name: GptOss.from_checkpoint(load_checkpoint(path), torch.float32, device) for name, path in checkpoints.items()}


@pytest.fixture(scope="module")
def hf_models(checkpoints):
    return {name: load_hf_reference(checkpoints[name]) for name in ("hf", "small_vocab_hf")}


def test_yarn_parameters_of_20b():
    concentration, low, high = yarn_parameters(ModelConfig())
    assert concentration == pytest.approx(1.346574, abs=1e-6)
    assert low == pytest.approx(8.0928, abs=1e-4)
    assert high == pytest.approx(17.3980, abs=1e-4)


@pytest.mark.parametrize("variant", ["hf", "small_vocab_hf"])
def test_logits_match_transformers_beyond_the_window(ours, hf_models, variant):
    model = ours[variant]
    assert model.config.sliding_window == 128 and model.config.num_hidden_layers >= 2  # both layer types
    ids = random_ids(300, model.config.vocab_size)  # > 2 windows: the sliding mask matters
    with torch.no_grad():
        expected = hf_models[variant](ids[None]).logits[0].float()
    got = dense_logits(model, ids)
    assert got.shape == (300, model.config.vocab_size)
    assert torch.allclose(got, expected, atol=ATOL, rtol=0), (got - expected).abs().max()


def test_full_vocabulary_variant(ours):
    assert ours["hf"].config.vocab_size == 201088


def test_both_layouts_give_identical_logits(ours):
    ids = random_ids(200, 201088, seed=3)
    assert torch.equal(dense_logits(ours["original"], ids), dense_logits(ours["hf"], ids))


def test_batched_sequences_equal_separate_runs(ours):
    """The flat batch: two sequences side by side compute exactly what each computes alone."""
    model = ours["small_vocab_hf"]
    a, b = random_ids(150, 1024, 1), random_ids(40, 1024, 2)
    ids = torch.cat([a, b])
    positions = torch.cat([torch.arange(150), torch.arange(40)])
    seq_ids = torch.cat([torch.zeros(150, dtype=torch.long), torch.ones(40, dtype=torch.long)])
    ids, positions, seq_ids = (t.to(model.device) for t in (ids, positions, seq_ids))
    both = model(ids, positions, DenseAttention(seq_ids, positions)).cpu()
    assert torch.allclose(both[:150], dense_logits(model, a), atol=1e-5)
    assert torch.allclose(both[150:], dense_logits(model, b), atol=1e-5)


def test_swiglu_clamps_fire(ours, monkeypatch):
    """The random experts are scaled so pre-activations cross ±7: the clamp is exercised, not idle."""
    seen = []
    original = gpt_oss.swiglu

    def recording(h, limit):
        seen.append((h[..., 0::2].max().item(), h[..., 1::2].abs().max().item()))
        return original(h, limit)

    monkeypatch.setattr(gpt_oss, "swiglu", recording)
    dense_logits(ours["hf"], random_ids(64, 201088))
    assert max(glu for glu, _ in seen) > 7.0
    assert max(lin for _, lin in seen) > 7.0


def test_checkpoint_files_are_official_safetensors(checkpoints):
    """Our streaming writer's files read back with the safetensors library; configs carry the official fields."""
    original = json.loads((checkpoints["original"] / "config.json").read_text())
    assert sorted(original) == sorted([
        "num_hidden_layers", "num_experts", "experts_per_token", "vocab_size", "hidden_size", "intermediate_size",
        "swiglu_limit", "head_dim", "num_attention_heads", "num_key_value_heads", "sliding_window",
        "initial_context_length", "rope_theta", "rope_scaling_factor", "rope_ntk_alpha", "rope_ntk_beta"])
    with safe_open(checkpoints["original"] / "model.safetensors", "pt") as f:
        blocks = f.get_tensor("block.0.mlp.mlp1_weight.blocks")
        assert blocks.dtype == torch.uint8 and blocks.shape == (8, 128, 2, 16)
        assert f.get_tensor("embedding.weight").dtype == torch.bfloat16
    with safe_open(checkpoints["hf"] / "model.safetensors", "pt") as f:
        assert "model.layers.0.mlp.experts.gate_up_proj_blocks" in f.keys()
        assert "model.layers.3.self_attn.q_proj.weight" in f.keys()


def test_experts_stay_packed_and_memory_mapped(ours, checkpoints):
    checkpoint = load_checkpoint(checkpoints["original"])
    blocks = checkpoint.tensors["block.0.mlp.mlp1_weight.blocks"]
    assert blocks.dtype == torch.uint8
    moe = GptOss.from_checkpoint(checkpoint, torch.bfloat16).blocks[0].mlp
    assert moe.mlp1_blocks.dtype == torch.uint8
    assert moe.mlp1_blocks.data_ptr() == blocks.data_ptr()  # no copy: a view of the file's mapping


def test_only_routed_experts_are_expanded(ours, monkeypatch):
    calls = []
    original = gpt_oss.mxfp4.dequantize
    monkeypatch.setattr(gpt_oss.mxfp4, "dequantize", lambda b, s, d: calls.append(1) or original(b, s, d))
    model = ours["small_vocab_hf"]
    for block in model.blocks:
        monkeypatch.setattr(block.mlp, "use_kernel", False)  # the PyTorch path
    dense_logits(model, random_ids(1, 1024))  # one token routes to k experts per layer
    assert len(calls) == 2 * model.config.experts_per_token * model.config.num_hidden_layers


def test_fused_kernel_equals_the_pytorch_path(ours, monkeypatch):
    """Every expert, row counts across the kernel's 16-row tiles, against expand-then-matmul."""
    from ossrun.model.kernels import mxfp4_kernel_available

    if not mxfp4_kernel_available(torch.device("cpu")):
        pytest.skip("no C compiler here: the fused kernel is not built")
    moe = ours["hf"].blocks[1].mlp
    if moe.mlp1_blocks.device.type != "cpu":
        pytest.skip("the fused C kernel is the CPU path")
    g = torch.Generator().manual_seed(4)
    sizes = [1, 5, 16, 17, 3, 40, 2, 9]  # one group per expert, some over a tile
    x = torch.randn(sum(sizes), moe.config.hidden_size, generator=g)
    offsets = torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()])
    experts = torch.tensor([3, 0, 7, 1, 6, 2, 5, 4])
    fused = moe.grouped_experts(x, offsets, experts)
    plain = torch.cat([moe.expert(int(e), x[offsets[i]:offsets[i + 1]]) for i, e in enumerate(experts)])
    assert torch.allclose(fused, plain, atol=1e-5, rtol=1e-5)


def test_whole_model_with_and_without_the_kernel(ours, monkeypatch):
    model = ours["small_vocab_hf"]
    ids = random_ids(40, 1024, seed=9)
    with_kernel = dense_logits(model, ids)
    for block in model.blocks:
        monkeypatch.setattr(block.mlp, "use_kernel", False)
    assert torch.allclose(with_kernel, dense_logits(model, ids), atol=1e-4, rtol=0)


def test_missing_tensor_is_a_clear_error(tmp_path, checkpoints):
    import shutil

    from ossrun.model.safetensors_io import open_mmap, write_streaming, TensorSpec

    shutil.copy(checkpoints["small_vocab_original"] / "config.json", tmp_path / "config.json")
    tensors = open_mmap(checkpoints["small_vocab_original"] / "model.safetensors")
    del tensors["norm.scale"]
    specs = [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    write_streaming(tmp_path / "model.safetensors", specs, lambda s: tensors[s.name])
    with pytest.raises(ValueError, match="norm.scale"):
        load_checkpoint(tmp_path)
